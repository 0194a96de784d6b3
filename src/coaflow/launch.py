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
  scratch folder (``.<out>.rank<N>``) follows ``--out``'s rule: it holds coaflow's marker, or
  is empty or absent, else the worker refuses it; it is removed when the worker ends.
- **Every rank checks its input** (argv, config, stage, input folders, ``$RANK``) before it
  waits or trains, and a bad one is one line and exit 2 on every rank: torchrun's summary, which
  the TrainJob launcher reads, then names a 2 (bad input), never a traceback's 1 (a bug). Every
  rank builds the cache key with the one function the runner uses (``runner.stage_setup``).
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
    """This process's rank (``$RANK``, set by torchrun); a value that is not a rank is bad input."""
    value = os.environ.get("RANK", "0")
    if not value.isdigit():
        raise PipelineError(f"RANK={value!r}: not a process rank (torchrun sets it to 0, 1, ...)")
    return int(value)


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


def check_worker(argv: list[str]):
    """Everything a worker checks before it waits for rank 0 or joins the process group (so a
    bad input is one line and exit 2 on every rank, and torchrun reports a 2, not a traceback
    that looks like a bug): the argv, the config, the stage, its input folders, and its scratch
    folder. Returns ``(args, stage setup, scratch folder)``."""
    from coaflow.config import load_config
    from coaflow.orchestrate.command import input_folders
    from coaflow.runner import owned_by, stage_setup

    args = parse(argv)
    cfg = load_config(args.config, args.overrides)
    setup = stage_setup(args.name, cfg, input_folders(args.inputs))
    out = Path(args.out).resolve()
    scratch = out.with_name(f".{out.name}.rank{rank()}")
    if not owned_by(scratch, args.name):  # the same rule as --out: coaflow's own, or refused
        raise PipelineError(f"--out {args.out}: rank {rank()}'s scratch folder {scratch} holds "
                            f"files coaflow did not write for stage {args.name!r}: refusing to "
                            "wipe it; move it away or pick another --out")
    return args, setup, scratch


def worker(argv: list[str], since: float) -> int:
    """Run the stage as a non-zero rank: training only, in a scratch folder."""
    from coaflow.contract import OWNER, RUN_ID_ENV, Context
    from coaflow.tracking import Tracker

    args, (module, run, section, inputs, key, registry), scratch = check_worker(argv)
    out = Path(args.out).resolve()
    if wait_for_rank0(out, key, since) == "done":
        return 0
    shutil.rmtree(scratch, ignore_errors=True)  # check_worker: absent, empty or a worker's
    scratch.mkdir(parents=True)
    (scratch / OWNER).write_text(args.name)  # what makes it a worker's, for the next attempt
    for name in SHARED:
        (out / name).mkdir(parents=True, exist_ok=True)
        (scratch / name).symlink_to(out / name, target_is_directory=True)
    ctx = Context(run_id=args.run_id or os.environ.get(RUN_ID_ENV) or "worker",
                  out=scratch, inputs=inputs, run=run,
                  tracker=Tracker(run.workdir, enabled=False), registry_uri=registry,
                  resume=True)
    try:
        module.run(section, ctx)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    from coaflow.errors import CoaflowError
    from coaflow.tracking import redact

    argv = list(sys.argv[1:] if argv is None else argv)
    since = time.time()
    if not argv or argv[0] != "stage":
        print("usage: torchrun ... -m coaflow.launch stage NAME --out DIR [coaflow stage "
              "options]", file=sys.stderr)
        return EXIT_USER
    try:
        prefix_per_attempt()
        if rank() == 0:
            from coaflow.cli import main as cli

            return cli.main(argv, prog_name="coaflow", standalone_mode=True) or 0
        return worker(argv, since)
    except CoaflowError as e:  # as the CLI shows it on rank 0: one line, the exit code
        print(f"Error: {redact(str(e))}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
