"""``coaflow stage`` under torchrun: one training stage across processes, GPUs and nodes.

    torchrun --nnodes 1 --nproc_per_node 2 -m coaflow.launch stage sft --config smoke \\
        --out /data/r1/sft --input gate=/data/r1/gate --set sft.batch_size=2

The launcher is a prefix to the unchanged stage command (as open-instruct's and a Kubeflow
Trainer ``TrainJob``'s ``torchrun`` are): every process runs the same stage code, and the
trainer (TRL / accelerate) finds ``RANK``/``WORLD_SIZE`` and trains data-parallel (gloo on CPU,
NCCL on GPUs; DeepSpeed ZeRO when the config says so). Keep the *global* batch the same when the
process count changes: ``batch_size`` is per process.

- **Rank 0** is ``coaflow stage`` itself: it decides cached / resume / fresh, writes the stage
  folder, ``result.json`` and the completion marker, exactly as in one process.
- **The other ranks** are workers: they wait until rank 0 has started the attempt (its ``key``
  file is newer than this launch) or has found it complete, then run the stage module against a
  private scratch folder beside ``--out`` whose ``checkpoints`` is rank 0's (a shared volume
  across nodes), so every rank resumes from the same checkpoint after a restart
  (``torchrun --max-restarts``); the stage itself leaves saving and results to rank 0. The
  scratch folder is removed when the worker ends.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path

from coaflow.errors import EXIT_USER, PipelineError
from coaflow.orchestrate.command import parse

SHARED = ("checkpoints",)  # the folders of a stage's --out every rank must see (sft, rl)
WAIT_S = 1800.0  # how long a worker waits for rank 0 (torch's default collective timeout)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def prefix_per_attempt() -> None:
    """Make the trainer's own process group (accelerate, DeepSpeed: ``init_process_group`` from
    the env) keep its keys under a prefix per torchrun attempt.

    Why: after a restart (``torchrun --max-restarts``) the workers reach the agent's store again,
    where the previous attempt's ranks left their gloo addresses under the same keys; a restarted
    rank 0 connected to the dead rank 1 and failed (measured here). The group itself is still
    made by the trainer, when it wants it: made earlier, ``save_pretrained`` on rank > 0 writes
    nothing and a worker's own base-model folder stays empty."""
    import inspect

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    original = dist.init_process_group
    if world < 2 or getattr(original, "coaflow_prefixed", False):
        return
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    signature = inspect.signature(original)

    def init_process_group(*args, **kwargs):
        call = signature.bind_partial(*args, **kwargs).arguments
        if call.get("store") is None and call.get("init_method") in (None, "env://"):
            agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            timeout = call.get("timeout") or timedelta(seconds=WAIT_S)
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                  world, is_master=not agent_store and rank() == 0,
                                  timeout=timeout)
            call.pop("init_method", None)
            call["store"] = dist.PrefixStore(f"coaflow/attempt-{attempt}", store)
            if call.get("rank", -1) < 0:
                call["rank"] = rank()
            if call.get("world_size", -1) < 0:
                call["world_size"] = world
        return original(**call)

    init_process_group.coaflow_prefixed = True
    dist.init_process_group = init_process_group


def wait_for_rank0(out: Path, key: str, since: float, timeout: float = WAIT_S,
                   poll: float = 0.5) -> str:
    """``"train"`` once rank 0 has started this attempt (its key file, written after it decided
    resume or wipe, is newer than ``since``), ``"done"`` when the stage is already complete with
    ``key`` (rank 0 will not train); a ``PipelineError`` after ``timeout``."""
    from coaflow.contract import MARKER, STARTED

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        marker, started = out / MARKER, out / STARTED
        if marker.exists() and marker.read_text().strip() == key:
            return "done"
        if started.exists() and started.stat().st_mtime >= since - 1 \
                and started.read_text().strip() == key:
            return "train"
        time.sleep(poll)
    raise PipelineError(f"rank {rank()}: rank 0 did not start {out} within {timeout:.0f} s")


def worker(argv: list[str], since: float) -> int:
    """Run the stage as a non-zero rank: training only, in a scratch folder."""
    from coaflow.config import load_config
    from coaflow.contract import Context, load_stage
    from coaflow.runner import cache_key, stage_inputs
    from coaflow.tracking import Tracker

    args = parse(argv)
    cfg = load_config(args.config, args.overrides)
    module = load_stage(args.name)
    run = cfg.run.model_copy(update={"workdir": str(Path(cfg.run.workdir).resolve())})
    pairs = dict(item.split("=", 1) for item in args.inputs)
    inputs = stage_inputs(module, pairs)
    section = getattr(cfg, args.name, None)
    key = cache_key(args.name, module, section, run, {n: r.key or "" for n, r in inputs.items()})
    out = Path(args.out).resolve()
    if wait_for_rank0(out, key, since) == "done":
        return 0
    scratch = out.with_name(f".{out.name}.rank{rank()}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    for name in SHARED:
        (out / name).mkdir(parents=True, exist_ok=True)
        (scratch / name).symlink_to(out / name, target_is_directory=True)
    ctx = Context(run_id=args.run_id or os.environ.get("COAFLOW_RUN_ID") or "worker",
                  out=scratch, inputs=inputs, run=run,
                  tracker=Tracker(run.workdir, enabled=False), resume=True)
    try:
        module.run(section, ctx)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    since = time.time()
    if not argv or argv[0] != "stage":
        print("usage: torchrun ... -m coaflow.launch stage NAME --out DIR [coaflow stage "
              "options]", file=sys.stderr)
        return EXIT_USER
    prefix_per_attempt()
    if rank() == 0:
        from coaflow.cli import main as cli

        return cli.main(argv, prog_name="coaflow", standalone_mode=True) or 0
    return worker(argv, since)


if __name__ == "__main__":
    sys.exit(main())
