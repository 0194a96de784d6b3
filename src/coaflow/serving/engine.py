"""The transformers engine: one model, one generation thread, concurrent requests batched.

Requests arrive from many HTTP handlers; a single thread owns the model. It takes the first
waiting request, gathers the others that arrive within ``batch_wait_ms`` (up to ``max_batch``
sequences, same sampling settings), left-pads them into one ``generate`` call and streams each
row's tokens back to its own handler as they come. A row ends on its own: end-of-turn token,
a stop string, its ``max_tokens``, or its client going away (``Sequence.cancel``); ``generate``
stops when every row has. On a CPU batching is what matters (DESIGN.md: 242 tokens/s at batch 1,
2,078 at batch 16 for the tiny student).

No head-of-line blocking: when a request arrives while a batch decodes, the batch stops after
the current step, and its unfinished rows join the newcomer in the next batch, resuming from
their prompt plus what they generated so far (token ids, never re-tokenized). A short request
so waits one decode step and one prefill, not a whole 4,000-token stream: interleaving, the
poor man's continuous batching (vLLM does it without the second prefill).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Sequence:
    """One generated sequence (a request with ``n=3`` has three). Events go to ``events``:
    ``("text", delta)`` while it runs, then ``("done", finish_reason)``."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: tuple[bool, float, float]  # (do_sample, temperature, top_p)
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of text already sent
    finished: str | None = None
    ignore_eos: bool = False  # generate max_tokens whatever the model says (benchmarks; vLLM's)

    def emit(self, *event) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        """The client went away: the row stops at the next decode step (or is never started),
        and whoever waits on ``events`` gets ``("done", "cancelled")``."""
        if self.finished is None:
            self.finished = "cancelled"
            self.emit("done", "cancelled")

    @property
    def context_ids(self) -> list[int]:
        """What the model reads to continue this sequence: the prompt and the tokens so far."""
        return self.prompt_ids + self.ids


class EngineError(ValueError):
    """A request the engine cannot serve (too long for the model's context)."""


class TransformersEngine:
    """Load ``model_dir`` and serve it; ``stats`` counts batches for ``/metrics``."""

    def __init__(self, model_dir: str | Path, max_batch: int = 16, batch_wait_ms: float = 10.0,
                 device: str | None = None, dtype: str | None = None, threads: int = 0):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from coaflow.models.prompt import stop_token_ids

        if threads > 0:  # on a shared CPU one thread is often faster than contended ones
            torch.set_num_threads(threads)

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), padding_side="left")
        kw = {"dtype": getattr(torch, dtype)} if dtype else {}
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kw).to(self.device)
        self.model.eval()
        gen = self.model.generation_config
        self.eos_ids = set(stop_token_ids(self.tokenizer))  # the agent's and rl's end of turn
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else next(iter(self.eos_ids))
        self.default_sampling = (bool(gen.do_sample), float(gen.temperature or 1.0),
                                 float(gen.top_p or 1.0))
        self.context = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)
        self.max_batch, self.batch_wait = max_batch, batch_wait_ms / 1000
        self.pending: queue.Queue[Sequence] = queue.Queue()
        self.stats = {"batches": 0, "batched_sequences": 0, "max_batch_seen": 0,
                      "decode_steps": 0, "preemptions": 0}
        self._held: list[Sequence] = []
        self._thread = threading.Thread(target=self._loop, name="coaflow-engine", daemon=True)
        self._thread.start()

    # --- requests ----------------------------------------------------------------------------

    def prompt_ids(self, messages: list[dict], tools: list[dict] | None) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                                  add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

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
               loop: asyncio.AbstractEventLoop, ignore_eos: bool = False) -> list[Sequence]:
        if len(prompt_ids) + max_tokens > self.context:
            raise EngineError(f"the prompt ({len(prompt_ids)} tokens) plus max_tokens "
                              f"({max_tokens}) exceeds the model's context ({self.context})")
        seqs = [Sequence(list(prompt_ids), max_tokens, sampling, stop, loop, ignore_eos=ignore_eos)
                for _ in range(n)]
        for s in seqs:
            self.pending.put(s)
        return seqs

    # --- the generation thread -----------------------------------------------------------------

    def _first(self) -> Sequence:
        """A newcomer first (it is why a batch stopped), then rows held back, else wait."""
        if not self.pending.empty() or not self._held:
            return self.pending.get()
        return self._held.pop(0)

    def _next_batch(self) -> list[Sequence]:
        first = self._first()
        while first.finished is not None:  # cancelled while it waited
            first = self._first()
        batch, deadline = [first], time.monotonic() + self.batch_wait
        for s in list(self._held):  # held back earlier for other sampling settings
            if len(batch) < self.max_batch and s.sampling == first.sampling:
                batch.append(s)
                self._held.remove(s)
        while len(batch) < self.max_batch:
            try:
                s = self.pending.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if s.finished is None:
                (batch if s.sampling == first.sampling else self._held).append(s)
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            try:
                self._generate(batch)
            except Exception as e:  # one bad batch must not kill the server
                for s in batch:
                    if s.finished is None:
                        s.finished = "error"
                        s.emit("error", f"{type(e).__name__}: {e}")

    def _generate(self, batch: list[Sequence]) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        self.stats["batches"] += 1
        self.stats["batched_sequences"] += len(batch)
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(batch))
        rows = [s.context_ids for s in batch]  # a resumed row continues where it stopped
        width = max(len(r) for r in rows)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        engine, steps, yielded = self, [0], [False]

        class Rows(BaseStreamer):
            prompt_seen = False

            def put(self, value):
                if not self.prompt_seen:  # the first call hands over the prompts
                    self.prompt_seen = True
                    return
                steps[0] += 1
                engine.stats["decode_steps"] += 1
                for s, tok in zip(batch, value.view(-1).tolist(), strict=True):
                    if s.finished is None:
                        engine._step(s, int(tok))

            def end(self):
                if yielded[0]:  # stopped for a newcomer: the rows go on in the next batch
                    return
                for s in batch:
                    if s.finished is None:
                        engine._finish(s, "length")

        class RowsDone(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):
                done = [s.finished is not None for s in batch]
                if (steps[0] and not engine.pending.empty()
                        and 0 < done.count(False) < engine.max_batch):
                    if not yielded[0]:
                        engine.stats["preemptions"] += 1
                    yielded[0] = True  # a request waits: stop after this step, let it in
                    return torch.ones(len(batch), dtype=torch.bool, device=input_ids.device)
                return torch.tensor(done, device=input_ids.device)

        # rows end on end-of-turn in _step; generate stops on it only when no row ignores it
        eos = [self.pad_id] if any(s.ignore_eos for s in batch) else list(self.eos_ids)
        do_sample, temperature, top_p = batch[0].sampling
        kw: dict[str, Any] = {"do_sample": do_sample}
        if do_sample:
            kw.update(temperature=temperature, top_p=top_p)
        with torch.no_grad():
            self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                max_new_tokens=max(s.max_tokens - len(s.ids) for s in batch),
                                eos_token_id=eos, pad_token_id=self.pad_id,
                                streamer=Rows(), stopping_criteria=StoppingCriteriaList([RowsDone()]),
                                **kw)
        if yielded[0]:  # unfinished rows go on in the next batch, with the newcomer
            self._held[:0] = [s for s in batch if s.finished is None]

    def _step(self, s: Sequence, tok: int) -> None:
        if tok in self.eos_ids and not s.ignore_eos:
            self._finish(s, "stop")
            return
        s.ids.append(tok)
        text = self.tokenizer.decode(s.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half a multi-byte character: wait for the rest
            text = text[:-1]
        s.text = text
        for stop in s.stop:
            at = text.find(stop)
            if at >= 0:
                s.text = text[:at]
                self._finish(s, "stop")
                return
        # hold back a tail that could still become a stop string
        hold = max((k for stop in s.stop for k in range(1, len(stop))
                    if text.endswith(stop[:k])), default=0)
        if len(text) - hold > s.sent:
            s.emit("text", text[s.sent:len(text) - hold])
            s.sent = len(text) - hold
        if len(s.ids) >= s.max_tokens:
            self._finish(s, "length")

    def _finish(self, s: Sequence, reason: str) -> None:
        if len(s.text) > s.sent:
            s.emit("text", s.text[s.sent:])
            s.sent = len(s.text)
        s.finished = reason
        s.emit("done", reason)
