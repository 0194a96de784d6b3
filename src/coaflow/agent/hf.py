"""In-process backend: a transformers causal LM generating for many episodes at once.

All prompts of a turn are rendered with the tokenizer's chat template, sorted by length (less
padding), left-padded into batches of ``batch_size`` and generated with a static KV cache
(allocated once per call, no per-step concatenation: 11 s instead of 19 s for the batched run of
bench/bench_evaluate.py here); a row stops at ``<|im_end|>`` (or the tokenizer's EOS). Episodes that finished leave the batch at the next
turn, so late turns run on small batches. On CPU this is where the speed is: one thread decodes
~8x more tokens per second at batch 16 than at batch 1 (docs/design.md).

A prompt that with ``max_new_tokens`` no longer fits ``max_context`` (default: the model's
``max_position_embeddings``) is not generated; its episode ends with ``context``.
"""

from __future__ import annotations

from coaflow.agent.loop import Completion


class TransformersBackend:
    asynchronous = False

    def __init__(self, model: str, *, batch_size: int = 16, device: str | None = None,
                 dtype: str | None = None, max_context: int | None = None,
                 send_tools: bool = False, threads: int | None = None, field: str = "model"):
        """``model``: a local HF folder or a hub id. ``send_tools``: show the suite's tool schemas
        even where training does not (the chat template renders them). ``threads``: torch CPU
        threads while generating (restored after; None: leave torch's setting). A tiny model
        gains nothing from intra-op threads, and on a busy CPU their barriers cost: 64 tokens at
        batch 16 took 4.2 s with 1 thread and 40 s with 2 on this 2-core machine under load."""
        import torch

        from coaflow.models.loading import load_model_and_tokenizer

        self.model, self.tok, self.name = load_model_and_tokenizer(model, dtype=dtype, field=field)
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.batch_size, self.send_tools, self.threads = batch_size, send_tools, threads
        self.max_context = max_context or getattr(self.model.config, "max_position_embeddings",
                                                  None) or 4096
        end = self.tok.convert_tokens_to_ids("<|im_end|>")
        ends = [end] if isinstance(end, int) and end != self.tok.unk_token_id else []
        self.stop_ids = [*ends, *([self.tok.eos_token_id] if self.tok.eos_token_id is not None
                                  and self.tok.eos_token_id not in ends else [])]
        if not self.stop_ids:
            raise ValueError(f"{self.name}: the tokenizer has neither <|im_end|> nor an EOS token")

    def render(self, messages: list[dict], tools: list[dict] | None) -> str:
        return self.tok.apply_chat_template(messages, tools=tools, tokenize=False,
                                            add_generation_prompt=True)

    def generate(self, prompts: list[list[dict]], tools: list[list[dict]] | None = None, *,
                 max_new_tokens: int, temperature: float = 0.0, seed: int = 0
                 ) -> list[Completion]:
        import torch

        if not self.threads or self.device != "cpu":
            return self._generate(prompts, tools, max_new_tokens, temperature, seed)
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self._generate(prompts, tools, max_new_tokens, temperature, seed)
        finally:
            torch.set_num_threads(before)

    def _generate(self, prompts, tools, max_new_tokens: int, temperature: float,
                  seed: int) -> list[Completion]:
        import torch

        tools = tools or [None] * len(prompts)
        ids = [self.tok(self.render(m, t), add_special_tokens=False)["input_ids"]
               for m, t in zip(prompts, tools, strict=True)]
        out: list[Completion | None] = [None] * len(ids)
        fits = [i for i, x in enumerate(ids) if len(x) + max_new_tokens <= self.max_context]
        for i in set(range(len(ids))) - set(fits):
            out[i] = Completion("", 0, "context")
        fits.sort(key=lambda i: len(ids[i]))
        sample = temperature > 0
        for start in range(0, len(fits), self.batch_size):
            chunk = fits[start:start + self.batch_size]
            batch = self.tok.pad({"input_ids": [ids[i] for i in chunk]}, return_tensors="pt")
            batch = {k: v.to(self.device) for k, v in batch.items()}
            if sample:
                torch.manual_seed(seed + start)
            with torch.no_grad():
                gen = self.model.generate(
                    **batch, max_new_tokens=max_new_tokens, do_sample=sample,
                    temperature=temperature if sample else None, top_p=None, top_k=None,
                    eos_token_id=self.stop_ids, pad_token_id=self.tok.pad_token_id,
                    cache_implementation="static")
            for i, row in zip(chunk, gen[:, batch["input_ids"].shape[1]:].tolist(), strict=True):
                out[i] = self._completion(row)
        return out  # type: ignore[return-value]

    def _completion(self, row: list[int]) -> Completion:
        end = next((k for k, t in enumerate(row) if t in self.stop_ids), None)
        kept = row if end is None else row[:end]
        text = self.tok.decode(kept, skip_special_tokens=False)
        if self.tok.pad_token:
            text = text.replace(self.tok.pad_token, "")
        return Completion(text, len(kept) + (end is not None), "length" if end is None else "stop")
