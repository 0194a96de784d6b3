"""In-process backend: a transformers causal LM generating for many episodes at once, reusing
each episode's KV cache from one turn to the next.

An agent episode's prompt grows every turn by the model's own turn and a tool result; re-encoding
all of it each turn is what dominated evaluation (a 135M student: ~1,000 prompt tokens x ~4 turns
per episode, prefill-bound on a CPU). So the backend keeps, per episode (``keys``), the keys and
values of every token it has already run, and the next turn computes only what is new after the
longest common prefix with them (the re-rendered tool call may differ from the sampled text; the
cache is cut where they part, as vLLM's prefix caching does).

A turn: prompts are tokenized with the chat template (tools included, ``models.prompt``), sorted by
length and cut into batches of ``batch_size``. In a batch each row's cached past is left-padded to
the longest past and its new tokens left-padded to the longest new part; the attention mask zeroes
the holes and position ids count real tokens only, so a row computes exactly what it would alone.
Decoding is a plain greedy / temperature loop that stops a row at ``<|im_end|>`` (or EOS), at its
own token budget, or when its text loops (``loop.repeats``, checked every ``REPEAT_CHECK``
tokens: a plan that restates one step until the budget runs out is over long before that), and the
batch when every row stopped. Episodes that finished drop their cache.

Episodes of one suite start with the same system prompt and tool schemas (~300-400 tokens, a third
of an episode's prefill): on a new episode's first turn, the prefix it shares with the other new
prompts of the call is run once and every one of them starts from its keys and values.

A prompt that with ``max_new_tokens`` no longer fits ``max_context`` (default: the model's
``max_position_embeddings``) is not generated; its episode ends with ``context``.
"""

from __future__ import annotations

from coaflow.agent.loop import Completion, repeats

REPEAT_CHECK = 16  # tokens between two looks for a loop in a row's text
SHARED_PREFIX = 32  # fewest tokens worth running once for several new episodes


class TransformersBackend:
    asynchronous = False
    prefix_cache = True  # run_episodes passes episode keys

    def __init__(self, model: str, *, batch_size: int = 16, device: str | None = None,
                 dtype: str | None = None, max_context: int | None = None,
                 threads: int | None = None, field: str = "model"):
        """``model``: a local HF folder, a hub id or a named PyPI model (``models.sources``);
        ``dtype``: e.g. ``bfloat16`` (None: the folder's). ``threads``: torch CPU threads while
        generating (restored after; None: leave torch's setting). A small model gains little from
        intra-op threads, and on a busy CPU their barriers cost: 64 tokens at batch 16 took 4.2 s
        with 1 thread and 40 s with 2 on this 2-core machine under load."""
        import torch

        from coaflow.models.loading import load_model_and_tokenizer
        from coaflow.models.prompt import stop_token_ids

        self.model, self.tok, self.name = load_model_and_tokenizer(model, dtype=dtype, field=field)
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.batch_size, self.threads = batch_size, threads
        self.max_context = max_context or getattr(self.model.config, "max_position_embeddings",
                                                  None) or 4096
        self.stop_ids = stop_token_ids(self.tok)
        self.pad_id = self.tok.pad_token_id
        self.past: dict[str, tuple[list[int], list]] = {}  # key -> (tokens, per-layer (k, v))
        self.shared: list[tuple[list[int], list]] = []  # prefixes new episodes share
        # entropy_sum / sampled_tokens: the sampling distribution's mean entropy (nats per token,
        # at the sampling temperature) over the tokens sampled with temperature > 0
        self.stats = {"prompt_tokens": 0, "reused_tokens": 0, "generated_tokens": 0,
                      "entropy_sum": 0.0, "sampled_tokens": 0}

    def reset(self) -> None:
        """Forget every episode's cache (new episodes, or new weights: rl between steps)."""
        self.past.clear()
        self.shared.clear()

    def render(self, messages: list[dict], tools: list[dict] | None) -> str:
        return self.tok.apply_chat_template(messages, tools=tools, tokenize=False,
                                            add_generation_prompt=True)

    def generate(self, prompts: list[list[dict]], tools: list[list[dict]] | None = None, *,
                 max_new_tokens: int | list[int], temperature: float = 0.0, seed: int = 0,
                 keys: list[str] | None = None) -> list[Completion]:
        """One assistant turn per prompt, of at most ``max_new_tokens`` (one for all, or one per
        prompt). ``keys`` name the episodes: a key seen before reuses that episode's cache, and
        keys absent from this call are dropped (finished)."""
        import torch

        if keys is not None:
            for gone in set(self.past) - set(keys):
                del self.past[gone]
        if not self.threads or self.device != "cpu":
            return self._generate(prompts, tools, max_new_tokens, temperature, seed, keys)
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self._generate(prompts, tools, max_new_tokens, temperature, seed, keys)
        finally:
            torch.set_num_threads(before)

    def _generate(self, prompts, tools, max_new_tokens: int | list[int], temperature: float,
                  seed: int, keys: list[str] | None) -> list[Completion]:
        tools = tools or [None] * len(prompts)
        limits = (max_new_tokens if isinstance(max_new_tokens, list)
                  else [max_new_tokens] * len(prompts))
        ids = [self.tok(self.render(m, t), add_special_tokens=False)["input_ids"]
               for m, t in zip(prompts, tools, strict=True)]
        out: list[Completion | None] = [None] * len(ids)
        fits = [i for i, x in enumerate(ids) if len(x) + limits[i] <= self.max_context]
        for i in set(range(len(ids))) - set(fits):
            out[i] = Completion("", 0, "context")
            if keys:
                self.past.pop(keys[i], None)
        if keys:
            self._share_prefix([ids[i] for i in fits if keys[i] not in self.past])
        fits.sort(key=lambda i: len(ids[i]))
        for start in range(0, len(fits), self.batch_size):
            chunk = fits[start:start + self.batch_size]
            rows, looped = self._decode([ids[i] for i in chunk],
                                        [keys[i] if keys else None for i in chunk],
                                        [limits[i] for i in chunk], temperature, seed + start)
            for r, (i, row) in enumerate(zip(chunk, rows, strict=True)):
                out[i] = self._completion(row, r in looped)
        return out  # type: ignore[return-value]

    def _share_prefix(self, new: list[list[int]]) -> None:
        """Run once the longest prefix that several new episodes' prompts share (the system
        prompt and tool schemas of their suite), unless a shared prefix already covers it."""
        import torch
        from transformers import DynamicCache

        groups: dict[tuple, list[list[int]]] = {}
        for x in new:
            groups.setdefault(tuple(x[:SHARED_PREFIX]), []).append(x)
        for group in groups.values():
            if len(group) < 2 or len(group[0]) <= SHARED_PREFIX:
                continue
            n = min(len(x) for x in group) - 1  # each keeps at least one token of its own
            first = group[0]
            for x in group[1:]:
                n = next((i for i in range(n) if x[i] != first[i]), n)
            if n < SHARED_PREFIX or any(len(t) >= n and t[:n] == first[:n] for t, _ in self.shared):
                continue
            cache = DynamicCache(config=self.model.config)
            with torch.no_grad():
                self.model(input_ids=torch.tensor([first[:n]], device=self.device), cache=cache,
                           use_cache=True, logits_to_keep=1)
            self.shared.append((first[:n], [(layer.keys[0], layer.values[0])
                                            for layer in cache.layers]))
            self.stats["prompt_tokens"] += n

    def _reusable(self, key: str | None, ids: list[int]) -> tuple[int, list | None]:
        """How many leading tokens of ``ids`` a cache holds, and that cache: the episode's own,
        else a shared prefix."""
        candidates = [self.past[key]] if key is not None and key in self.past else self.shared
        best = (0, None)
        for tokens, kv in candidates:
            n = 0
            limit = min(len(tokens), len(ids) - 1)  # at least one new token to run
            while n < limit and tokens[n] == ids[n]:
                n += 1
            if n > best[0]:
                best = (n, kv)
        return best

    def _decode(self, prompts: list[list[int]], keys: list[str | None], limits: list[int],
                temperature: float, seed: int) -> tuple[list[list[int]], set[int]]:
        import torch
        dev = self.device
        reuse = [self._reusable(k, p) for k, p in zip(keys, prompts, strict=True)]
        past_len = max(n for n, _ in reuse)
        new = [p[n:] for p, (n, _) in zip(prompts, reuse, strict=True)]
        new_len = max(len(x) for x in new)
        b = len(prompts)
        self.stats["prompt_tokens"] += sum(len(p) for p in prompts)
        self.stats["reused_tokens"] += sum(n for n, _ in reuse)

        # [past (left-padded) | new (left-padded)]: the mask zeroes both holes
        mask = torch.zeros(b, past_len + new_len, dtype=torch.long)
        input_ids = torch.full((b, new_len), self.pad_id, dtype=torch.long)
        for r, ((n, _), x) in enumerate(zip(reuse, new, strict=True)):
            mask[r, past_len - n:past_len] = 1
            mask[r, past_len + new_len - len(x):] = 1
            input_ids[r, new_len - len(x):] = torch.tensor(x)
        cache = reserved_cache(self.model.config, past_len + new_len + max(limits))
        if past_len:
            for layer in range(self.model.config.num_hidden_layers):
                ks, vs = [], []
                for (n, kv) in reuse:
                    k, v = kv[layer] if kv is not None else (None, None)
                    ks.append(_left_pad(k, n, past_len, self.model, dev))
                    vs.append(_left_pad(v, n, past_len, self.model, dev))
                cache.update(torch.stack(ks), torch.stack(vs), layer)
        mask, input_ids = mask.to(dev), input_ids.to(dev)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)

        gen = torch.Generator(device=dev).manual_seed(seed) if temperature > 0 else None
        produced: list[list[int]] = [[] for _ in range(b)]
        looped: set[int] = set()
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        stops = torch.tensor(self.stop_ids, device=dev)
        limit = torch.tensor(limits, device=dev)
        step_ids, step_pos = input_ids, positions[:, past_len:]
        with torch.no_grad():
            for step in range(1, max(limits) + 1):
                logits = self.model(input_ids=step_ids, attention_mask=mask,
                                    position_ids=step_pos, cache=cache,
                                    use_cache=True, logits_to_keep=1).logits[:, -1, :].float()
                if gen is None:
                    nxt = logits.argmax(-1)
                else:
                    logp = torch.log_softmax(logits / temperature, -1)
                    probs = logp.exp()
                    nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
                    ent = -(probs * logp).nan_to_num().sum(-1)
                    self.stats["entropy_sum"] += float(ent[~done].sum())
                    self.stats["sampled_tokens"] += int((~done).sum())
                nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
                for r in (~done).nonzero().flatten().tolist():
                    produced[r].append(int(nxt[r]))
                done |= torch.isin(nxt, stops) | (limit <= step)
                if step % REPEAT_CHECK == 0:
                    for r in (~done).nonzero().flatten().tolist():
                        if repeats(self.tok.decode(produced[r])):
                            looped.add(r)
                            done[r] = True
                if bool(done.all()):
                    break
                step_ids = nxt[:, None]
                step_pos = step_pos[:, -1:] + 1
                mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
        if any(keys):
            self._keep(keys, prompts, produced, mask, cache, past_len + new_len)
        self.stats["generated_tokens"] += sum(len(p) for p in produced)
        return produced, looped

    def _keep(self, keys, prompts, produced, mask, cache, prompt_cols: int) -> None:
        """Store each row's real tokens and their keys/values: the prompt's, then the generated
        ones whose values the cache holds (all but the last sampled token)."""
        import torch

        layers = [(layer.keys, layer.values) for layer in cache.layers]
        for r, key in enumerate(keys):
            if key is None:
                continue
            real = mask[r, :prompt_cols].nonzero().flatten()
            gen_cols = list(range(prompt_cols, prompt_cols + len(produced[r]) - 1))
            cols = torch.cat([real, torch.tensor(gen_cols, dtype=torch.long, device=real.device)])
            kv = [(k[r, :, cols, :].clone(), v[r, :, cols, :].clone()) for k, v in layers]
            self.past[key] = (prompts[r] + produced[r][:-1], kv)

    def _completion(self, row: list[int], looped: bool = False) -> Completion:
        end = next((k for k, t in enumerate(row) if t in self.stop_ids), None)
        kept = row if end is None else row[:end]
        text = self.tok.decode(kept, skip_special_tokens=False)
        if self.tok.pad_token:
            text = text.replace(self.tok.pad_token, "")
        finish = "stop" if end is not None else "repetition" if looped else "length"
        return Completion(text, len(kept) + (end is not None), finish)


def reserved_cache(config, capacity: int):
    """A ``DynamicCache`` whose layers write each step's keys and values into buffers of
    ``capacity`` positions reserved up front and hand attention a view of the filled part.
    ``DynamicCache`` concatenates instead: every decode step copies the whole cache (at batch 40
    and ~600 tokens of context, 1.1 GB a step for the 135M student); here a step took 297 ms
    instead of 458 on two cores, the same tokens out."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                shape = (*key_states.shape[:2], capacity, key_states.shape[-1])
                self.buffers = (key_states.new_empty(shape), value_states.new_empty(shape))
                self.filled = 0
            end = self.filled + key_states.shape[-2]
            if end > capacity:
                raise ValueError(f"the reserved cache holds {capacity} positions, not {end}")
            keys, values = self.buffers
            keys[..., self.filled:end, :] = key_states
            values[..., self.filled:end, :] = value_states
            self.filled = end
            self.keys, self.values = keys[..., :end, :], values[..., :end, :]
            return self.keys, self.values

    cache = DynamicCache(config=config)
    cache.layers = [ReservedLayer() for _ in cache.layers]
    return cache


def _left_pad(t, n: int, width: int, model, device):
    """``t`` ([heads, n, dim], or None when ``n`` is 0) left-padded with zeros to ``width``."""
    import torch

    cfg = model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    pad = torch.zeros(heads, width - n, dim, dtype=model.dtype, device=device)
    return pad if t is None or n == 0 else torch.cat([pad, t[:, :n, :]], dim=1)
