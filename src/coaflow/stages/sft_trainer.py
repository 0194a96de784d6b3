"""sft's trainer: TRL's ``SFTTrainer`` with coaflow's loss, sampler and process-group set-up.

``build_trainer`` turns chat examples and an sft ``Config`` into a ready trainer (tokenizing,
assistant-only masks, packing, collator, DeepSpeed, LoRA); ``save_final`` writes the trained
model as a plain HF folder (sft's and rl's final model). Nothing heavy is imported before a
trainer is built.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import time
from pathlib import Path

from coaflow.contract import PipelineError

DEEPSPEED_DIR = Path(__file__).resolve().parent.parent / "configs" / "deepspeed"


def deepspeed_config(name: str | None) -> str | None:
    """Path of the ZeRO JSON for ``sft.deepspeed`` (None: no DeepSpeed)."""
    if name is None:
        return None
    path = DEEPSPEED_DIR / f"{name}.json"
    if not path.exists():
        raise PipelineError(f"sft.deepspeed={name!r}: no config at {path}")
    return str(path)


@contextlib.contextmanager
def process_group_env(enabled: bool):
    """DeepSpeed wants a process group even in one process not started by a launcher: set the
    values a launcher sets for rank 0 of 1, on a free port, for this training only, and take the
    group down afterwards, so that the next stage in the same process (Airflow's local mode,
    KFP's local runner) starts from a clean slate."""
    if not enabled or "WORLD_SIZE" in os.environ:
        yield
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    values = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0",
                  WORLD_SIZE="1")
    os.environ.update(values)
    try:
        yield
    finally:
        for k in values:
            os.environ.pop(k, None)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def build_trainer(cfg, model, tokenizer, examples: list[dict], output_dir: Path,
                  seed: int = 0, tracker=None, callbacks: tuple = ()):
    """``(SFTTrainer, history)`` for an sft ``Config`` ``cfg``: the trainer with its whole data
    path (tokenizing, masks, labels, packing, collator) set up; ``history`` fills with the logged
    dicts as training goes."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig

    from coaflow.models.loading import cpu_bf16
    from coaflow.stages.sft_data import decisive_pairs

    history: list[dict] = []

    class LogToTracker(TrainerCallback):
        """Loss, token accuracy, lr, tokens: into ``history`` and the stage's MLflow run."""

        def on_train_begin(self, args, state, control, **kw):
            self.start = time.time()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and state.is_world_process_zero:
                history.append({**logs, "step": state.global_step})
                if tracker is not None:
                    tracker.log_metrics({f"train/{k}": v for k, v in logs.items()},
                                        step=state.global_step)
                if "loss" in logs:  # one progress line per logging step (tqdm is off)
                    spent = time.time() - getattr(self, "start", time.time())
                    tokens = logs.get("num_tokens", 0)
                    print(f"[sft] step {state.global_step}/{state.max_steps}  loss "
                          f"{logs['loss']:.3f}  token acc {logs.get('mean_token_accuracy', 0):.3f}"
                          f"  {tokens / max(spent, 1e-9):.0f} tokens/s  {spent / 60:.1f} min",
                          flush=True)

    use_gpu = torch.cuda.is_available()
    args = SFTConfig(
        output_dir=str(output_dir), num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
        learning_rate=cfg.lr, lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, max_length=cfg.max_length,
        packing=cfg.packing, assistant_only_loss=True, logging_steps=cfg.logging_steps,
        logging_first_step=True, save_strategy="steps", save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit, report_to="none", seed=seed, data_seed=seed,
        bf16=cfg.bf16 and (use_gpu or cpu_bf16()),
        activation_checkpointing=cfg.gradient_checkpointing,
        deepspeed=deepspeed_config(cfg.deepspeed), disable_tqdm=True,
        dataloader_pin_memory=use_gpu, use_cpu=not use_gpu and cfg.deepspeed is None,
    )
    peft_config = None
    if cfg.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                 lora_dropout=cfg.lora_dropout, task_type="CAUSAL_LM",
                                 target_modules=cfg.lora_target_modules)
    # tools as JSON text: Arrow would unify the suites' schemas into one struct (TRL parses it)
    rows = [{"messages": e["messages"], "tools": json.dumps(e["tools"]) if e.get("tools") else None}
            for e in examples]
    trainer = sft_trainer()(model=model, args=args, train_dataset=Dataset.from_list(rows),
                            processing_class=tokenizer, peft_config=peft_config,
                            callbacks=[LogToTracker(), *callbacks])
    if cfg.decisive_weight != 1.0:
        trainer.decisive_pairs = decisive_pairs(tokenizer)
        if not trainer.decisive_pairs:
            raise PipelineError(
                f"sft.decisive_weight={cfg.decisive_weight}: the tokenizer has no single-token "
                "<tool_call>/<answer> tags to find the decisive spans by (a pretrained model's "
                "vocabulary splits them); set sft.decisive_weight=1")
        trainer.decisive_weight = cfg.decisive_weight
    trainer.length_grouped = cfg.length_grouped and not cfg.packing
    return trainer, history


@functools.cache
def sft_trainer():
    """``CoaflowSFTTrainer`` (defined on first use: TRL loads only when training)."""
    from trl import SFTTrainer

    class CoaflowSFTTrainer(SFTTrainer):
        """TRL's ``SFTTrainer`` with its loss computed on the trained positions only, and two
        options, each TRL's own behaviour when off.

        The loss (``_trained_positions_loss``, one process on a CPU, or with decisive weights):
        TRL's fused LM head projects only the labelled positions on Triton devices and every
        position elsewhere; on a CPU that is two thirds wasted (an example is ~30 % assistant
        tokens): the LM head's 49k-wide matmul over untrained positions cost a fifth of a step.
        ``decisive_pairs``: the loss weighs the decisive tokens (``<tool_call>`` and ``<answer>``
        spans, ``sft_data.decisive_mask``) ``decisive_weight`` times the others and logs their
        token accuracy (``decisive_token_accuracy``) beside the overall one. Evaluation, MoE aux
        loss, padding-free rows and several processes take TRL's own loss.
        ``length_grouped``: batches from ``LengthBucketSampler`` (one process)."""

        decisive_pairs: list[tuple[int, int]] = []
        decisive_weight: float = 1.0
        length_grouped: bool = False

        def _get_train_sampler(self, train_dataset=None):
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            if not self.length_grouped or self.accelerator.num_processes > 1:
                return super()._get_train_sampler(train_dataset)
            return LengthBucketSampler([len(x) for x in dataset["input_ids"]],
                                       self.args.train_batch_size, self.args.seed)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            own = self.decisive_pairs or next(model.parameters()).device.type == "cpu"
            if (not own or not model.training or return_outputs
                    or "attention_mask" not in inputs or self.aux_loss_enabled
                    or self.accelerator.num_processes > 1):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return _trained_positions_loss(self, model, inputs, num_items_in_batch)

    return CoaflowSFTTrainer


class LengthBucketSampler:
    """Indices in batches of similar length, the batches in a random order each epoch.

    Padding to the longest row of a random batch wastes a third of a CPU step on tiny
    trajectories (200-1,500 tokens); HF's ``group_by_length`` removes the padding but walks each
    mega-batch from long to short. Here lengths get a little noise (so batches differ between
    epochs), are sorted and cut into batches, and the batches are shuffled.

    >>> s = LengthBucketSampler([5, 100, 6, 101, 200, 210], batch_size=2, seed=0)
    >>> batches = [sorted(list(s)[i:i + 2]) for i in (0, 2, 4)]
    >>> sorted(batches)
    [[0, 2], [1, 3], [4, 5]]
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0, jitter: float = 0.1):
        self.lengths, self.batch_size, self.seed, self.jitter = lengths, batch_size, seed, jitter
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        import random

        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        noisy = [n * (1 + self.jitter * rng.random()) for n in self.lengths]
        order = sorted(range(len(noisy)), key=noisy.__getitem__)
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        rng.shuffle(batches)
        return iter([i for b in batches for i in b])


def _trained_positions_loss(trainer, model, inputs, num_items_in_batch):
    """Next-token loss over the positions with a label, the LM head run on those rows only (the
    backbone's last hidden states gathered first), decisive tokens weighted; the metrics
    ``SFTTrainer.compute_loss`` logs (entropy, token accuracy, tokens) plus the decisive-token
    accuracy. Equal to TRL's loss at ``decisive_weight`` 1 (a test compares them)."""
    import torch

    from coaflow.stages.sft_data import decisive_mask

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    hidden = lm.base_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                           use_cache=False).last_hidden_state[:, :-1]
    target = inputs["labels"][:, 1:]
    valid = target != -100
    logp = torch.log_softmax(lm.get_output_embeddings()(hidden[valid]).float(), dim=-1)
    token_logp = logp.gather(-1, target[valid][:, None]).squeeze(-1)
    weight = torch.ones_like(token_logp)
    decisive = None
    if trainer.decisive_pairs:
        decisive = decisive_mask(inputs["input_ids"], trainer.decisive_pairs)[:, 1:][valid]
        weight = weight + (trainer.decisive_weight - 1.0) * decisive.float()
    loss = -(token_logp * weight).sum() / weight.sum().clamp(min=1)
    n = int(valid.sum())
    if num_items_in_batch is not None:  # this micro-batch's share of the accumulated tokens
        loss = loss * n / torch.as_tensor(num_items_in_batch).clamp(min=1)
    with torch.no_grad():
        top1 = logp.argmax(-1) == target[valid]
        metrics = trainer._metrics["train"]
        metrics["entropy"].append(float(-(logp.exp() * logp).sum(-1).sum()) / max(n, 1))
        metrics["mean_token_accuracy"].append(float(top1.sum()) / max(n, 1))
        if decisive is not None and int(decisive.sum()):
            metrics["decisive_token_accuracy"].append(float(top1[decisive].sum())
                                                      / int(decisive.sum()))
    trainer._total_train_tokens += int(inputs["attention_mask"].sum())
    metrics["num_tokens"] = [trainer._total_train_tokens]
    return loss


def save_final(trainer, final: Path) -> Path:
    """The trained model as a plain HF folder (a PEFT model's adapters merged), written beside
    and renamed in: sft's and rl's final model."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if hasattr(trainer.model, "merge_and_unload"):  # PEFT: a plain model, adapters merged in
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(tmp)
        trainer.processing_class.save_pretrained(tmp)
    else:
        trainer.save_model(str(tmp))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def continue_from(trainer, history: list[dict], checkpoint: str | None) -> float:
    """On resume, make the metrics describe the whole training, not the resumed half: the
    checkpoint's logged history goes before this attempt's (``train_loss_initial`` is step 1's)
    and the token count continues from it (``train_tokens`` counts every step). Returns the
    tokens trained before this attempt. (``train_loss_mean`` stays the trainer's own, which is
    this attempt's: the loss of the steps between the last log and the checkpoint is lost.)"""
    if not checkpoint:
        return 0.0
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    earlier = [dict(h) for h in state.get("log_history", []) if "loss" in h]
    history[:0] = earlier
    trainer._total_train_tokens = max((h.get("num_tokens", 0) for h in earlier), default=0)
    return float(trainer._total_train_tokens)


def zero_stage(trainer) -> int | None:
    """The ZeRO stage the trainer really ran with (None: no DeepSpeed engine)."""
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return plugin.zero_stage if trainer.is_deepspeed_enabled and plugin else None
