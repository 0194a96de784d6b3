"""The pieces of agentic RL that sit between coaflow's agent loop and TRL's ``GRPOTrainer``.

- ``encode_episode``: one finished episode (chat messages, tool results included) -> the token
  ids TRL trains on, with ``env_mask`` = 1 on the tokens the model sampled (inside the chat
  template's ``{% generation %}`` spans: its text, tool calls and ``<|im_end|>``) and 0 on
  everything else (tool observations, the ``<|im_start|>assistant`` headers the loop inserts).
  TRL multiplies its loss mask by ``env_mask``, so a tool's output never carries loss.
- ``episode_rewards``: the verifiable reward of an episode (the suite's verifier from
  ``envs.rewards`` on the final ``<answer>``; an optional format term from
  ``rewards.format_reward``), documented in ``REWARD_DOC``.
- ``AgentGRPOTrainer``: ``GRPOTrainer`` plus DAPO's dynamic sampling: a group whose episodes all
  got the same reward has zero advantage and teaches nothing; its tokens are masked out of the
  batch (so they do not dilute the token-level normalizer either) and counted in
  ``rl/groups_dropped``. DAPO refills the batch by sampling more groups; TRL 1.16 has no hook for
  that, so here a step trains on the groups that kept signal (its loss is 0 if none did).
- ``make_rollout_func``: TRL's ``rollout_func``: whole multi-turn episodes per task, ``G`` per
  task (TRL's sampler repeats each prompt ``num_generations`` times), run by coaflow's one agent
  loop (``coaflow.agent.run_episodes``) against the live policy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from coaflow.envs import rewards
from coaflow.errors import PipelineError, UserError
from coaflow.models.prompt import stop_token_ids, tools_for

REWARD_DOC = (
    "reward = success + format_weight * format, where success is the suite's verifier "
    "(envs.rewards.score: kbqa exact match, calc numeric match) on the episode's last <answer> "
    "against the gold answer (0 without an <answer>), and format is 1 when every assistant turn is "
    "well formed (balanced tags, tool calls are JSON objects with a name) and the episode ends "
    "with exactly one <answer>. Logged beside them, never rewarded: evidence "
    "(envs.rewards.evidence), 1 when a real tool's result held the gold answer.")


def load_policy(model_dir):
    """``(model, tokenizer, template)`` of the SFT checkpoint; ``template`` is the chat template
    with ``{% generation %}`` markers used to mask the loss (None: the tokenizer's own)."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    from coaflow.models import load_model_and_tokenizer

    model, tok, _ = load_model_and_tokenizer(str(model_dir), field="rl: the sft model")
    if not tok.chat_template:
        raise PipelineError(f"rl: the sft model at {model_dir} has no chat template; the agent "
                            "loop and the loss mask need one")
    if "tool_call" not in tok.chat_template and "tools" not in tok.chat_template:
        raise PipelineError(f"rl: the chat template of {model_dir} has no tool-call support "
                            "(no 'tools' / '<tool_call>' in it); agentic RL needs tool calls")
    if has_generation_markers(tok.chat_template):
        return model, tok, None
    try:
        return model, tok, get_training_chat_template(tok)
    except ValueError:
        raise PipelineError(f"rl: the chat template of {model_dir} has no {{% generation %}} "
                            "markers and TRL has no training variant of it, so model tokens "
                            "cannot be told from tool observations") from None


@dataclass
class Encoded:
    """One episode as TRL sees it."""

    prompt_ids: list[int]
    completion_ids: list[int]
    env_mask: list[int]  # 1: sampled by the model (carries loss); 0: tool output / template
    truncated: bool  # cut at max_completion_length (no final <|im_end|>)


def encode_episode(tokenizer, messages: list[dict], chat_template: str | None,
                   max_completion_length: int, tools: list[dict] | None = None) -> Encoded:
    """Tokenize a finished episode with the template the model was trained with.

    The prompt is everything before the first assistant turn, rendered with the generation
    prompt, exactly as the agent loop renders it; the completion is the rest of the rendered
    conversation, cut after the last token the model produced (the final ``<|im_end|>``). An
    episode longer than ``max_completion_length`` is cut there and marked ``truncated``.
    """
    first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), None)
    if first is None:
        raise PipelineError("rl: an episode has no assistant turn (the agent loop produced "
                            "nothing to train on)")
    prompt = tokenizer.apply_chat_template(messages[:first], tools=tools, tokenize=True,
                                           return_dict=True, add_generation_prompt=True,
                                           chat_template=chat_template)["input_ids"]
    full = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True,
                                         chat_template=chat_template)
    ids, mask = list(full["input_ids"]), list(full["assistant_masks"])
    if ids[:len(prompt)] != list(prompt):
        raise PipelineError("rl: the chat template renders the prompt differently inside the "
                            "conversation, so sampled tokens cannot be lined up with it")
    ids, mask = ids[len(prompt):], mask[len(prompt):]
    marked = [i for i, m in enumerate(mask) if m]
    if not marked:
        raise PipelineError("rl: the chat template marks no assistant token of an episode "
                            "({% generation %} markers missing)")
    # End at the model's last end-of-turn token: what the template adds after it (a newline)
    # was never sampled, and TRL tells a finished episode from a cut one by its last token.
    ends = set(stop_token_ids(tokenizer))  # the end-of-turn rule every generator stops on
    last = next((i for i in reversed(marked) if ids[i] in ends), marked[-1])
    ids, mask = ids[:last + 1], mask[:last + 1]
    truncated = len(ids) > max_completion_length
    if truncated:
        ids, mask = ids[:max_completion_length], mask[:max_completion_length]
    return Encoded(list(prompt), ids, mask, truncated)


def assistant_text(messages: list[dict]) -> str:
    """Every assistant turn's text (tool calls rendered as ``<tool_call>`` JSON), in order."""
    import json

    parts = []
    for m in messages:
        if m["role"] != "assistant":
            continue
        parts.append(m.get("content") or "")
        for c in m.get("tool_calls") or []:
            fn = c.get("function", c)
            args = fn.get("arguments", {})
            args = json.loads(args) if isinstance(args, str) and args.strip().startswith("{") else args
            parts.append("<tool_call>" + json.dumps({"name": fn.get("name"), "arguments": args})
                         + "</tool_call>")
    return "\n".join(p for p in parts if p)


def episode_rewards(suite: str, final_answer: str | None, reference, messages: list[dict]
                    ) -> dict[str, float]:
    """``{"success", "format", "evidence"}``, each 0/1 (see ``REWARD_DOC``; evidence is a
    diagnostic, not a reward term)."""
    return {"success": rewards.score(suite, final_answer, reference),
            "format": rewards.format_reward(assistant_text(messages)),
            "evidence": rewards.evidence(suite, reference, messages)}


def transcript(messages: list[dict], width: int = 400) -> str:
    """A readable episode for the rollout table (system prompt left out, long turns cut)."""
    lines = []
    for m in messages[1:] if messages and messages[0]["role"] == "system" else messages:
        text = assistant_text([m]) if m["role"] == "assistant" else str(m.get("content", ""))
        lines.append(f"[{m['role']}] {text if len(text) <= width else text[:width] + ' ...'}")
    return "\n".join(lines)


def success_reward(completions, success=None, **_) -> list[float]:
    """TRL reward function: the verifier's score, computed by the rollout (``success`` field)."""
    if success is None:
        raise PipelineError("rl: the rollout returned no 'success' field for the reward")
    return [float(s) for s in success]


def format_reward(completions, format=None, **_) -> list[float]:  # noqa: A002 (TRL field name)
    """TRL reward function: the shaped format term, computed by the rollout (``format`` field)."""
    if format is None:
        raise PipelineError("rl: the rollout returned no 'format' field for the reward")
    return [float(f) for f in format]


def zero_variance_groups(advantages, num_generations: int):
    """Boolean per group: every episode of the group got the same reward (all advantages 0)."""
    return advantages.view(-1, num_generations).abs().amax(dim=1) == 0


def make_trainer_class():
    """``AgentGRPOTrainer`` (built lazily: importing TRL costs seconds)."""
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    class NoSignalNoStep(TrainerCallback):
        """A step whose every group was dropped back-propagates an all-zero gradient (the zero
        loss of ``compute_loss`` below); AdamW would still move every weight by its momentum:
        three such steps after one with signal re-applied its update 1.6 times over (0.67 +
        0.52 + 0.42 of it, with Adam's bias correction; the study in docs/rl.md). Torch
        optimizers skip a parameter whose ``.grad`` is None, its moments and step count
        included, so the policy stays where it was."""

        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            grads = [p for p in model.parameters() if p.grad is not None]
            if grads and not any(bool(p.grad.any()) for p in grads):
                for p in grads:
                    p.grad = None

    class AgentGRPOTrainer(GRPOTrainer):
        """``GRPOTrainer`` with DAPO dynamic sampling (``dynamic_sampling=True``); a step with no
        signal leaves the weights alone (``NoSignalNoStep``)."""

        def __init__(self, *a, dynamic_sampling: bool = True, timings: dict | None = None,
                     skip_malformed: bool = False, **kw):
            super().__init__(*a, **kw)
            self.dynamic_sampling = dynamic_sampling
            self.skip_malformed = skip_malformed
            self.timings = timings if timings is not None else {}
            self.add_callback(NoSignalNoStep())

        def _generate_and_score_completions(self, inputs):
            import torch

            start = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            # rollout + scoring (old / reference log-probs when TRL needs them, advantages)
            self.timings.setdefault("generate_and_score_s", []).append(time.perf_counter() - start)
            mode = "train" if self.model.training else "eval"
            g = self.num_generations if mode == "train" else self.num_generations_eval
            if g < 2 or out["advantages"].numel() % g:
                return out
            flat = zero_variance_groups(out["advantages"], g)
            self._metrics[mode]["groups_dropped"].append(flat.float().mean().item())
            rows = (~flat).repeat_interleave(g) if self.dynamic_sampling else \
                torch.ones(flat.numel() * g, dtype=torch.bool, device=flat.device)
            clean = self.timings.get("row_clean")
            if self.skip_malformed and clean is not None and len(clean) == rows.numel():
                # after the advantages: a malformed episode still counts in its group's baseline
                bad = ~torch.tensor(clean, dtype=torch.bool, device=rows.device)
                self._metrics[mode]["malformed_skipped"].append((bad & rows).float().mean().item())
                rows = rows & ~bad
            if bool(rows.all()):
                return out
            keep = rows.to(out["completion_mask"].dtype).unsqueeze(1)
            mask = out.get("tool_mask")
            if mask is None:
                out["completion_mask"] = out["completion_mask"] * keep
                mask = out["completion_mask"]
            else:
                out["tool_mask"] = mask * keep
                mask = out["completion_mask"] * out["tool_mask"]
            out["num_items_in_batch"] = self.accelerator.gather(mask.sum()).sum()
            return out

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """Episodes with no loss-carrying token (their group was dropped) leave the micro-batch
            before the forward pass, and a micro-batch with none left costs no forward/backward:
            on a CPU the update is paid per token, and most groups of a weak student are dropped.
            The dapo and bnpo losses are unchanged by it (those rows add 0 to the token sum and
            nothing to the normalizer); grpo and dr_grpo divide by the row count, so they keep
            every row."""
            if self.loss_type not in ("dapo", "bnpo") or return_outputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            mask = inputs["completion_mask"]
            if inputs.get("tool_mask") is not None:
                mask = mask * inputs["tool_mask"]
            keep = mask.sum(1) > 0
            if bool(keep.all()):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self._metrics["train"]["rows_skipped"].append(float((~keep).sum()))
            if not bool(keep.any()):
                # a zero that still reaches every parameter, so the backward is a no-op
                return sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)
            rows = keep.numel()
            return super().compute_loss(
                model, {k: v[keep] if hasattr(v, "shape") and v.dim() and v.shape[0] == rows
                        else v for k, v in inputs.items()}, return_outputs, num_items_in_batch)

    return AgentGRPOTrainer


def from_trajectory(traj) -> tuple[list[dict], str | None, dict]:
    """An agent-loop trajectory as ``(messages, final_answer, info)``: the chat rendered exactly
    as the loop rendered it for the model (``models.prompt.to_example``; the tool schemas are
    ``models.prompt.tools_for(suite)``), and its counts."""
    from coaflow.models.prompt import to_example

    messages = to_example(traj)["messages"]
    d = traj.details
    errors = sum(m["role"] == "tool" and str(m.get("content", "")).startswith("Error")
                 for m in messages)
    return messages, traj.outcome.final_answer, {
        "tool_calls": d.get("tool_calls", 0), "tool_errors": errors, "turns": d.get("turns", 0),
        "stop": d.get("stop"), "format_errors": d.get("format_errors", 0)}


# --- the curriculum ---------------------------------------------------------------------------


def usable(p: float, g: int) -> float:
    """Chance that a group of ``g`` episodes of a task with pass rate ``p`` has reward variance
    (is not dropped by dynamic sampling): ``1 - p^g - (1-p)^g``."""
    return 1.0 - p ** g - (1.0 - p) ** g


class Curriculum:
    """Which tasks a step trains on, by their measured pass rate under the current policy.

    Every task keeps a tally of its episodes' successes (``update``: the training rollouts
    themselves, so measuring costs nothing extra), older tallies halved each time the task is
    rolled out again (the policy moved since). A task's pass rate is estimated with the pool's
    mean rate as a prior worth ``prior_weight`` episodes, and ``pick`` takes the tasks most likely
    to give a group with signal (``usable(p, group)``); unseen tasks sit at the prior, tasks never
    (or always) solved sink below it, tasks solved sometimes rise above it. A task rolled out in
    the last ``cooldown`` steps waits (so one lucky task is not drilled). Ties go in a seeded
    random order."""

    def __init__(self, tasks: Sequence, group: int, seed: int = 0, prior_weight: float = 2.0,
                 decay: float = 0.5, cooldown: int = 1):
        import random

        self.tasks = list(tasks)
        self.group, self.prior_weight, self.decay, self.cooldown = group, prior_weight, decay, cooldown
        self.wins = {t.task_id: 0.0 for t in self.tasks}
        self.tries = {t.task_id: 0.0 for t in self.tasks}
        self.last = {t.task_id: -10**9 for t in self.tasks}
        self.rng = random.Random(seed)
        self.order = {t.task_id: self.rng.random() for t in self.tasks}

    def prior(self) -> float:
        tries = sum(self.tries.values())
        return (sum(self.wins.values()) + 0.5) / (tries + 1.0)

    def rate(self, task_id: str) -> float:
        m = self.prior_weight
        return (self.wins[task_id] + m * self.prior()) / (self.tries[task_id] + m)

    def update(self, task_id: str, successes: Sequence[float], step: int) -> None:
        self.wins[task_id] = self.wins[task_id] * self.decay + sum(successes)
        self.tries[task_id] = self.tries[task_id] * self.decay + len(successes)
        self.last[task_id] = step

    def pick(self, n: int, step: int) -> list:
        fresh = [t for t in self.tasks if step - self.last[t.task_id] > self.cooldown]
        pool = fresh if len(fresh) >= n else self.tasks
        ranked = sorted(pool, key=lambda t: (-round(usable(self.rate(t.task_id), self.group), 6),
                                              self.order[t.task_id]))
        return ranked[:n]

    def summary(self) -> dict[str, float]:
        seen = [t for t in self.tasks if self.tries[t.task_id] > 0]
        mixed = [t for t in seen if 0 < self.wins[t.task_id] < self.tries[t.task_id]]
        return {"curriculum_seen": float(len(seen)), "curriculum_mixed": float(len(mixed)),
                "curriculum_prior": self.prior()}


# --- the rollout ------------------------------------------------------------------------------


@dataclass
class RolloutSettings:
    max_completion_length: int  # the turn budgets are the episodes' own (agent.budget)
    temperature: float


def make_rollout_func(tasks: Sequence, tokenizer, chat_template: str | None,
                      settings: RolloutSettings, episodes: Callable[[Any, list], list],
                      stats: dict[str, list], samples: int = 0,
                      curriculum: Curriculum | None = None):
    """TRL ``rollout_func(prompts, trainer)`` over coaflow tasks.

    ``prompts`` are task questions (the dataset's ``prompt`` column; TRL has already repeated
    each one ``num_generations`` times, in groups). ``episodes(trainer, tasks)`` runs one episode
    per task with the live policy and returns ``(messages, final_answer, info)`` per task, where
    ``info`` holds ``tool_calls`` and ``tool_errors``. Timing and tool counts go to ``stats``,
    the first ``samples`` episodes of every step to ``stats["samples"]``.

    With a ``curriculum`` the step's tasks are the curriculum's picks, not the sampler's: TRL's
    prompts only say how many groups to run (``len(prompts) // num_generations``); every entry
    returned carries its own prompt ids and reward fields, so the trainer needs nothing else of
    them. The step's outcomes go back into the curriculum's tallies.
    """
    by_question: dict[str, Any] = {}
    for t in tasks:
        if t.question in by_question:
            raise UserError(f"rl: two rl tasks share the question {t.question!r}; the rollout "
                            "finds a task by its question")
        by_question[t.question] = t

    def rollout(prompts: list, trainer) -> dict[str, list]:
        batch = []
        for p in prompts:
            q = p if isinstance(p, str) else p[-1]["content"]
            if q not in by_question:
                raise PipelineError(f"rl: the trainer asked for an unknown prompt {q[:80]!r}")
            batch.append(by_question[q])
        g = trainer.num_generations
        if curriculum is not None and len(batch) % g == 0:
            picks = curriculum.pick(len(batch) // g, trainer.state.global_step)
            batch = [t for t in picks for _ in range(g)]
        start = time.perf_counter()
        results = episodes(trainer, batch)
        stats["generate_s"].append(time.perf_counter() - start)
        out: dict[str, list] = {k: [] for k in ("prompt_ids", "completion_ids", "env_mask",
                                                "success", "format", "evidence", "task_id",
                                                "suite",
                                                "tool_calls", "tool_errors", "turns")}
        for task, (messages, answer, info) in zip(batch, results, strict=True):
            enc = encode_episode(tokenizer, messages, chat_template,
                                 settings.max_completion_length, tools_for(task.suite))
            if info.get("stop") == "turn_tokens" and not enc.truncated:
                # the last turn hit its token budget: the <|im_end|> the template closes it with
                # was never sampled; drop it, so TRL counts the episode as cut
                enc.completion_ids, enc.env_mask = enc.completion_ids[:-1], enc.env_mask[:-1]
            try:
                r = episode_rewards(task.suite, answer, task.answer, messages)
            except Exception as e:
                raise PipelineError(f"rl: the reward of task {task.task_id} ({task.suite}) "
                                    f"raised {type(e).__name__}: {e}") from None
            out["prompt_ids"].append(enc.prompt_ids)
            out["completion_ids"].append(enc.completion_ids)
            out["env_mask"].append(enc.env_mask)
            out["success"].append(r["success"])
            out["format"].append(r["format"])
            out["evidence"].append(r["evidence"])
            out["task_id"].append(task.task_id)
            out["suite"].append(task.suite)
            for k in ("tool_calls", "tool_errors", "turns"):
                out[k].append(info.get(k, 0))
            if len(out["success"]) <= samples:
                stats["samples"].append({
                    "step": trainer.state.global_step, "task_id": task.task_id,
                    "suite": task.suite, **r,
                    "answer": answer, "tool_calls": info.get("tool_calls", 0),
                    "transcript": transcript(messages)})
        if curriculum is not None:
            for i in range(0, len(batch), g):
                curriculum.update(batch[i].task_id, out["success"][i:i + g],
                                  trainer.state.global_step)
            for k, v in curriculum.summary().items():
                stats[k].append(v)
        # malformed: a call that did not parse or named no tool, or a void turn (neither a call
        # nor an answer); rl.skip_malformed keeps such episodes out of the loss
        clean = [not info.get("format_errors") and info.get("stop") != "no_action"
                 for _, _, info in results]
        stats["row_clean"] = clean
        n = max(len(batch), 1)
        stats["malformed"].append(1 - sum(clean) / n)
        stats["success"].append(sum(out["success"]) / n)
        stats["evidence"].append(sum(out["evidence"]) / n)
        stats["format"].append(sum(out["format"]) / n)
        stats["tool_calls"].append(sum(out["tool_calls"]) / n)
        stats["tool_errors"].append(sum(out["tool_errors"]) / n)
        stats["turns"].append(sum(out["turns"]) / n)
        stats["model_tokens"].append(sum(sum(m) for m in out["env_mask"]) / n)
        infos = [info for _, _, info in results]
        if infos and "rollout_entropy" in infos[0]:
            stats["rollout_entropy"].append(infos[0]["rollout_entropy"])
            stats["rollout_tokens_per_s"].append(
                sum(i["rollout_generated"] for i in infos) / max(stats["generate_s"][-1], 1e-9))
        return {**out, "logprobs": None}

    return rollout
