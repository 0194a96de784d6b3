"""The agent loop's backend over a vLLM engine: rl's rollouts on a GPU (TRL's colocated engine).

The prompt is rendered and the turn ended by the one prompt layer (``models.prompt``), as the
transformers backend (``agent.hf``) and the server do.
"""

from __future__ import annotations

from coaflow.agent.loop import Completion
from coaflow.models.prompt import render, stop_token_ids


class VLLMColocateBackend:
    """The agent loop's backend protocol over TRL's colocated ``vllm.LLM`` (its weights are the
    policy's: TRL syncs them before every rollout). It calls ``llm.generate(texts,
    SamplingParams(...), use_tqdm=False)`` and reads ``outputs[0].text / .token_ids /
    .finish_reason`` of each result; the CPU tests run it against a fake engine with that API
    (a real engine needs a GPU)."""

    asynchronous = False
    name = "policy-vllm"

    def __init__(self, llm, tokenizer):
        self.llm, self.tok = llm, tokenizer
        self.stop_ids = stop_token_ids(tokenizer)
        self.stop_texts = [tokenizer.convert_ids_to_tokens(i) for i in self.stop_ids]

    def generate(self, prompts: list[list[dict]], tools=None, *, max_new_tokens: int | list[int],
                 temperature: float = 0.0, seed: int = 0) -> list:
        from vllm import SamplingParams

        tools = tools or [None] * len(prompts)
        texts = [render({"messages": m, "tools": t}, self.tok.chat_template,
                        generation_prompt=True) for m, t in zip(prompts, tools, strict=True)]
        limits = (max_new_tokens if isinstance(max_new_tokens, list)
                  else [max_new_tokens] * len(prompts))
        per = {n: SamplingParams(max_tokens=n, temperature=temperature, seed=seed,
                                 stop_token_ids=self.stop_ids, skip_special_tokens=False)
               for n in set(limits)}  # vLLM takes one for all prompts, or one per prompt
        params = per[limits[0]] if len(per) == 1 else [per[n] for n in limits]
        out = []
        for r in self.llm.generate(texts, params, use_tqdm=False):
            c = r.outputs[0]
            stopped = c.finish_reason == "stop"
            text = c.text
            # with skip_special_tokens=False vLLM may keep the stop token's text; the loop wants
            # the turn without it (as the transformers backend returns it)
            for stop in self.stop_texts:
                if stop and text.endswith(stop):
                    text = text[:-len(stop)]
                    break
            out.append(Completion(text, len(c.token_ids), "stop" if stopped else "length"))
        return out
