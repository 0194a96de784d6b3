"""The transformers engine: one model, one thread, continuous batching over kept keys and values.

Requests arrive from many HTTP handlers; one thread owns the model and loops:

1. new requests join the prompts waiting to be encoded (a request with ``n: 3`` is one prompt
   and three rows); a prompt that starts with a context the prefix store holds (an agent's last
   turn, a shared system prompt and tool list) encodes only the rest;
2. one chunk (``prefill_chunk`` tokens) of the prompt with the least left to encode is encoded,
   so a short request waits for at most one chunk of a long one, never for all of it;
3. rows get places in the batch *by request*, not by row: the ``max_batch`` places are shared out
   one per request in turn (a request that needs fewer gets all it needs), so ``n: 16`` cannot
   hold every place while another request waits; a row past its request's share is set aside
   with its keys and values and comes back when places free;
4. one decode step: every placed row reads its last token and samples its next.

Rows keep their keys and values from their prefill to their end (``kvcache``): a step costs one
token per row whatever joins or leaves. A row ends on its own: end-of-turn, a stop string,
``max_tokens``, or its client going away (``Sequence.cancel``). On a CPU batching is what
matters (a step of 8 rows costs far less than 8 steps of one).
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coaflow.serving.kvcache import Decode, Prefill, PrefixStore, RowKV, Slots


@dataclass(eq=False)
class Sequence:
    """One generated sequence (a request with ``n=3`` has three). Events go to ``events``:
    ``("text", delta, logprob_count)`` while it runs, then ``("done", finish_reason)`` (or
    ``("error", message)``)."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: tuple[bool, float, float]  # (do_sample, temperature, top_p)
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    ids: list[int] = field(default_factory=list)
    text: str = ""  # starts with the forced text, if any
    sent: int = 0  # characters of text already sent
    finished: str | None = None
    ignore_eos: bool = False  # generate max_tokens tokens whatever the model says (benchmarks)
    logprobs: int | None = None  # None: none asked; k: the chosen token's and k alternatives
    token_logprobs: list = field(default_factory=list)  # (id, logprob, [(id, logprob), ...])
    generator: Any = None  # a torch.Generator when the request gave a seed
    # the engine's own
    group: Any = None
    slot: int | None = None
    kv: RowKV | None = None  # keys and values while outside the batch
    kv_len: int = 0  # tokens whose keys and values exist
    last: int | None = None  # the token the next step reads
    window: tuple[int, int] = (0, 0)  # incremental decoding: ids[a:b] is already text

    def emit(self, *event) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        """The client went away: the row stops at the next step (or is never started), and
        whoever waits on ``events`` gets ``("done", "cancelled")``."""
        if self.finished is None:
            self.finished = "cancelled"
            self.emit("done", "cancelled")


@dataclass(eq=False)
class _Request:
    prompt: list[int]
    seqs: list[Sequence]
    order: int
    kv: RowKV | None = None
    done: int = 0  # prompt tokens encoded


class EngineError(ValueError):
    """A request the engine cannot serve (too long for the model's context); ``field`` is the
    request field at fault."""

    def __init__(self, message: str, field: str = "messages"):
        super().__init__(message)
        self.field = field


def fair_shares(counts: list[int], places: int) -> list[int]:
    """Places per request (in arrival order): one each in turn until places or needs run out.

    >>> fair_shares([16, 1], 16), fair_shares([3, 3, 3], 4), fair_shares([1] * 3, 2)
    ([15, 1], [2, 1, 1], [1, 1, 0])
    """
    shares, left = [0] * len(counts), places
    while left:
        given = 0
        for i, c in enumerate(counts):
            if left and shares[i] < c:
                shares[i] += 1
                left -= 1
                given += 1
        if not given:
            break
    return shares


class TransformersEngine:
    """Load ``model_dir`` and serve it; ``stats`` counts steps and tokens for ``/metrics``."""

    def __init__(self, model_dir: str | Path, max_batch: int = 16, batch_wait_ms: float = 10.0,
                 device: str | None = None, dtype: str | None = None, threads: int = 0,
                 prefill_chunk: int = 256, prefix_cache_mb: int = 1024):
        import inspect

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from coaflow.models.prompt import stop_token_ids

        if threads > 0:  # on a shared CPU one thread is often faster than contended ones
            torch.set_num_threads(threads)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        kw = {"dtype": getattr(torch, dtype)} if dtype else {}
        # sdpa: the engine hands the model a boolean 4-D mask, which sdpa takes as is
        self.model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), attn_implementation="sdpa", **kw).to(self.device)
        self.model.eval()
        config = self.model.config.get_text_config()
        kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
        if kinds != {"full_attention"}:
            raise ValueError(f"layers of kind {sorted(kinds - {'full_attention'})} are not "
                             "supported by the transformers engine; serve it with --engine vllm")
        heads = config.num_attention_heads
        self.shape = (config.num_hidden_layers, getattr(config, "num_key_value_heads", None)
                      or heads, getattr(config, "head_dim", None) or config.hidden_size // heads)
        params = inspect.signature(self.model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.dtype = next(self.model.parameters()).dtype
        gen = self.model.generation_config
        self.eos_ids = set(stop_token_ids(self.tokenizer))  # the agent's and rl's end of turn
        self.default_sampling = (bool(gen.do_sample), float(gen.temperature or 1.0),
                                 float(gen.top_p or 1.0))
        self.context = int(getattr(config, "max_position_embeddings", 0) or 1 << 30)
        # the longest text one token stands for: a prompt longer than context x this cannot
        # fit, and is refused before it is tokenized
        # (+1: a SentencePiece token may stand for a space its lone decoding drops)
        self.max_token_chars = 1 + max(len(t) for t in self.tokenizer.batch_decode(
            [[i] for i in range(len(self.tokenizer))]))
        self.max_batch, self.batch_wait = max_batch, batch_wait_ms / 1000
        self.prefill_chunk = prefill_chunk
        self.slots = Slots(self.shape, self.dtype, self.device)
        self.store = PrefixStore(prefix_cache_mb << 20)
        self.incoming: queue.Queue[_Request] = queue.Queue()
        self.prefilling: list[_Request] = []
        self.running: list[Sequence] = []  # index == slot
        self.waiting: list[Sequence] = []  # prefilled rows without a place, in request order
        self.stats = {"decode_steps": 0, "decode_rows": 0, "decode_seconds": 0.0,
                      "prefill_tokens": 0, "prefill_chunks": 0, "prefill_seconds": 0.0,
                      "prefix_cache_tokens": 0,
                      "preemptions": 0, "requests": 0, "max_batch_seen": 0}
        self._order = itertools.count()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="coaflow-engine", daemon=True)
        self._thread.start()

    # --- requests (called from the HTTP handlers' threads) ------------------------------------

    def render(self, messages: list[dict], tools: list[dict] | None) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                                  add_generation_prompt=True)

    def prompt_ids(self, messages: list[dict], tools: list[dict] | None, max_tokens: int = 0,
                   forced: str = "") -> list[int]:
        """The prompt's token ids, refused (``EngineError``) when it cannot fit the context with
        ``max_tokens`` more: first by its length in characters (before tokenizing), then by its
        tokens. ``forced`` is text the reply must start with (a required tool call)."""
        if max_tokens >= self.context:
            raise EngineError(f"max_tokens: {max_tokens:,} leaves no room for a prompt in the "
                              f"model's context of {self.context:,} tokens", "max_tokens")
        text = self.render(messages, tools)
        room = self.context - max_tokens
        if len(text) + len(forced) > room * self.max_token_chars:
            raise EngineError(f"messages: the prompt has {len(text) + len(forced):,} characters, "
                              f"more than {room:,} tokens can hold (the model's context is "
                              f"{self.context:,} tokens, max_tokens {max_tokens:,})")
        # the forced start on its own: the tokens the model would have generated after the prompt
        return [t for part in (text, forced) if part
                for t in self.tokenizer(part, add_special_tokens=False)["input_ids"]]

    def queue_depth(self) -> int:
        return self.incoming.qsize() + sum(len(r.seqs) for r in list(self.prefilling)) + \
            len(self.waiting)

    def sampling(self, temperature: float | None, top_p: float | None) -> tuple[bool, float, float]:
        """OpenAI semantics over the model's own defaults: no temperature given -> the model's
        generation config (greedy for coaflow's students), 0 -> greedy."""
        if temperature is None:
            do, t, p = self.default_sampling
            return (do, t, top_p if top_p is not None else p)
        if temperature <= 0:
            return (False, 1.0, 1.0)
        return (True, float(temperature), float(top_p if top_p is not None else 1.0))

    def submit(self, prompt_ids: list[int], n: int, max_tokens: int, sampling, stop: list[str],
               loop: asyncio.AbstractEventLoop, ignore_eos: bool = False,
               logprobs: int | None = None, seed: int | None = None,
               forced: str = "") -> list[Sequence]:
        import torch

        if len(prompt_ids) + max_tokens > self.context:
            raise EngineError(f"the prompt ({len(prompt_ids)} tokens) plus max_tokens "
                              f"({max_tokens}) exceeds the model's context ({self.context})")
        if self._stopping.is_set():
            raise EngineError("the server is shutting down", "(server)")
        seqs = [Sequence(list(prompt_ids), max_tokens, sampling, stop, loop, text=forced,
                         ignore_eos=ignore_eos, logprobs=logprobs,
                         generator=torch.Generator().manual_seed(seed + i)
                         if seed is not None else None) for i in range(n)]
        req = _Request(list(prompt_ids), seqs, next(self._order))
        for s in seqs:
            s.group = req
        self.incoming.put(req)
        return seqs

    def shutdown(self, wait_s: float = 0) -> None:
        """Stop: every unfinished row ends with an error event within one step; wait up to
        ``wait_s`` for the loop to leave the model (a process exiting while a daemon thread is
        inside a torch op aborts)."""
        self._stopping.set()
        self.incoming.put(None)  # wakes an idle loop
        if wait_s:
            self._thread.join(wait_s)

    # --- the generation thread -----------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._admit()
            self._drop_finished()
            if self.prefilling:
                req = min(self.prefilling, key=lambda r: (len(r.prompt) - r.done, r.order))
                self._guard(self._prefill, req, req.seqs)
            self._place()
            if self.running:
                self._guard(self._decode, None, list(self.running))
        self._fail([s for r in self.prefilling for s in r.seqs] + self.waiting + self.running
                   + [s for r in _drain(self.incoming) if r is not None for s in r.seqs],
                   "the server is shutting down")

    def _guard(self, fn, arg, rows: list[Sequence]) -> None:
        """Run one step; a failure ends the rows it involved, never the server."""
        try:
            fn(arg) if arg is not None else fn()
        except Exception as e:  # noqa: BLE001 - reported to the rows' clients
            self._fail(rows, f"{type(e).__name__}: {e}")
            if arg is not None and arg in self.prefilling:
                self.prefilling.remove(arg)
            if arg is None:  # the batch's keys may be half written: drop the batch
                self.running.clear()
                self.slots.clear()

    @staticmethod
    def _fail(rows: list[Sequence], message: str) -> None:
        for s in rows:
            if s.finished is None:
                s.finished = "error"
                s.emit("error", message)

    def _admit(self) -> None:
        """Take new requests; wait for one when there is nothing else to do."""
        if not (self.prefilling or self.running or self.waiting):
            first = self.incoming.get()
            if first is None:
                return
            self.prefilling.append(first)
            self.stats["requests"] += 1
            time.sleep(self.batch_wait)  # requests sent together are encoded shortest first
        for req in _drain(self.incoming):
            if req is not None:
                self.prefilling.append(req)
                self.stats["requests"] += 1

    def _drop_finished(self) -> None:
        self.prefilling = [r for r in self.prefilling if any(s.finished is None for s in r.seqs)]
        self.waiting = [s for s in self.waiting if s.finished is None]
        for i in reversed(range(len(self.running))):
            s = self.running[i]
            if s.finished is None:
                continue
            if s.finished in ("stop", "length"):  # its context may start the next request
                self.store.add((s.prompt_ids + s.ids)[:s.kv_len], self.slots.take(i, s.kv_len))
            self._release(i)
        if not self.running:
            self.slots.clear()  # the memory goes back while idle

    def _release(self, i: int) -> None:
        """Slot ``i`` leaves the batch; the last row moves into it."""
        self.running[i].slot = None
        last = self.running.pop()
        if i < len(self.running):
            self.slots.move(len(self.running), i, last.kv_len)
            self.running[i], last.slot = last, i

    def _forward(self, ids, positions, mask, cache):
        out = self.model(input_ids=ids.to(self.device), position_ids=positions.to(self.device),
                         attention_mask=mask.to(self.device), use_cache=True, logits_to_keep=1,
                         **{self.cache_arg: cache})
        return out.logits[:, -1].float()

    def _prefill(self, req: _Request) -> None:
        import torch

        start = time.perf_counter()
        if req.kv is None:
            req.kv = RowKV.empty(self.shape, len(req.prompt), self.dtype, self.device)
            hit, shared = self.store.longest(req.prompt)
            shared = min(shared, len(req.prompt) - 1)  # the last token is read for its logits
            if hit is not None and shared > 0:
                hit.copy_into(req.kv, shared)
                req.done = shared
                self.stats["prefix_cache_tokens"] += shared
        end = min(len(req.prompt), req.done + self.prefill_chunk)
        q = torch.arange(req.done, end)
        mask = (torch.arange(end)[None, :] <= q[:, None])[None, None]
        with torch.no_grad():
            logits = self._forward(torch.tensor([req.prompt[req.done:end]]), q[None], mask,
                                   Prefill(req.kv, req.done))
        self.stats["prefill_tokens"] += end - req.done
        self.stats["prefill_chunks"] += 1
        req.done = req.kv.length = end
        self.stats["prefill_seconds"] += time.perf_counter() - start
        if end < len(req.prompt):
            return
        self.prefilling.remove(req)
        self.store.add(req.prompt, req.kv)
        rows = [s for s in req.seqs if s.finished is None]
        for s in rows:
            s.kv, s.kv_len = req.kv, len(req.prompt)  # shared until a row takes a place
        self._sample(rows, logits.expand(len(rows), -1))
        self.waiting += [s for s in rows if s.finished is None]

    def _place(self) -> None:
        """Places by request: shares as ``fair_shares``; rows past their share make room."""
        if not self.waiting:
            return
        groups: dict[_Request, list[Sequence]] = {}
        for s in sorted(self.running + self.waiting, key=lambda s: s.group.order):
            groups.setdefault(s.group, []).append(s)
        shares = fair_shares([len(v) for v in groups.values()], self.max_batch)
        chosen = set()
        for rows, share in zip(groups.values(), shares, strict=True):
            rows.sort(key=lambda s: s.slot is None)  # rows in place keep it
            chosen.update(rows[:share])
        over = [s for s in self.running if s not in chosen]
        for s in [s for s in self.waiting if s in chosen]:
            if len(self.running) >= self.max_batch:
                if not over:
                    break
                self._set_aside(over.pop())
            self.slots.ensure(len(self.running) + 1, s.kv_len + 1)
            self.slots.put(len(self.running), s.kv, s.kv_len)
            s.slot, s.kv = len(self.running), None
            self.running.append(s)
            self.waiting.remove(s)
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(self.running))

    def _set_aside(self, s: Sequence) -> None:
        s.kv = self.slots.take(s.slot, s.kv_len)
        self._release(s.slot)
        self.waiting.append(s)
        self.waiting.sort(key=lambda r: r.group.order)
        self.stats["preemptions"] += 1

    def _decode(self) -> None:
        import torch

        start = time.perf_counter()
        rows = list(self.running)
        pos = torch.tensor([s.kv_len for s in rows])
        width = int(pos.max()) + 1
        self.slots.ensure(len(rows), width)
        mask = (torch.arange(width)[None, :] <= pos[:, None])[:, None, None, :]
        with torch.no_grad():
            logits = self._forward(torch.tensor([[s.last] for s in rows]), pos[:, None], mask,
                                   Decode(self.slots, pos, width))
        for s in rows:
            s.kv_len += 1
        self._sample(rows, logits)
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += len(rows)
        self.stats["decode_seconds"] += time.perf_counter() - start

    def _sample(self, rows: list[Sequence], logits) -> None:
        """Each row's next token from its logits (greedy, or temperature and top-p), with its
        log-probability and the top alternatives when the row asked for them."""
        import torch

        tokens = logits.argmax(-1)
        for i, s in enumerate(rows):
            do_sample, temperature, top_p = s.sampling
            if do_sample:
                p = torch.softmax(logits[i] / temperature, -1)
                order = None
                if top_p < 1.0:  # keep the smallest set of tokens reaching top_p
                    p, order = p.sort(descending=True)
                    p[(p.cumsum(-1) - p) > top_p] = 0
                pick = torch.multinomial(p, 1, generator=s.generator)[0]
                tokens[i] = order[pick] if order is not None else pick
        asked = [i for i, s in enumerate(rows) if s.logprobs is not None]
        logp = torch.log_softmax(logits[asked], -1) if asked else None
        for i, s in enumerate(rows):
            if s.finished is not None:
                continue
            tok, entry = int(tokens[i]), None
            if s.logprobs is not None:
                row = logp[asked.index(i)]
                top = row.topk(s.logprobs) if s.logprobs else None
                entry = (tok, float(row[tok]), list(zip(top.indices.tolist(), top.values.tolist(),
                                                        strict=True)) if top is not None else [])
            s.last = tok
            self._step(s, tok, entry)

    def _step(self, s: Sequence, tok: int, entry) -> None:
        if tok in self.eos_ids and not s.ignore_eos:
            self._finish(s, "stop")
            return
        s.ids.append(tok)
        if entry is not None:
            s.token_logprobs.append(entry)
        a, b = s.window  # decode a few tokens, not the whole reply, at each step
        before = self.tokenizer.decode(s.ids[a:b], skip_special_tokens=True)
        now = self.tokenizer.decode(s.ids[a:], skip_special_tokens=True)
        if len(now) > len(before) and not now.endswith("\ufffd"):  # not half a character
            old = len(s.text)
            s.text += now[len(before):]
            s.window = (b, len(s.ids))
            for stop in s.stop:
                at = s.text.find(stop, max(0, old - len(stop) + 1))
                if at >= 0:
                    s.text = s.text[:at]
                    self._finish(s, "stop")
                    return
        # hold back a tail that could still become a stop string
        hold = max((k for stop in s.stop for k in range(1, len(stop))
                    if s.text.endswith(stop[:k])), default=0)
        if len(s.text) - hold > s.sent:
            s.emit("text", s.text[s.sent:len(s.text) - hold], len(s.token_logprobs))
            s.sent = len(s.text) - hold
        if len(s.ids) >= s.max_tokens:
            self._finish(s, "length")

    def _finish(self, s: Sequence, reason: str) -> None:
        if len(s.text) > s.sent:
            s.emit("text", s.text[s.sent:], len(s.token_logprobs))
            s.sent = len(s.text)
        s.finished = reason
        s.emit("done", reason)


def _drain(q: queue.Queue) -> list:
    out = []
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out
