"""The stage contract: what a stage is, what it hands on, and the graph the stages make.

Everything above it (the stages, the runner, the report, the Airflow DAG and the Kubeflow
pipeline) reads the stages through this module, and it imports nothing of coaflow but ``errors``.

A stage is a module ``coaflow/stages/<name>.py`` with

    NAME = "evaluate"                   # = CLI subcommand = config section = Airflow task id
    NEEDS = ("sft",)                    # stages whose results it must read (ctx.input)
    OPTIONAL = ("rl",)                  # stages it reads when they ran (ctx.optional)
    RESUMABLE = False                   # True: a killed attempt's files are kept for run() to resume
    CACHE = True                        # False: always runs (it acts on outside state: deploy)
    def cache_extras(cfg, run[, inputs][, registry_uri]) -> dict  # optional: outside state it
                                        # reads (a champion); inputs: {stage: cache key} of its
                                        # inputs; registry_uri: the run's model registry
    PATH_FIELDS = ("decontam_file",)    # config keys that name local files or folders: their
                                        # contents enter the cache key
    class Config(Section): ...          # its config section
    def run(cfg: Config, ctx: Context) -> Result: ...

A completed stage folder holds ``result.json`` (``Result.to_json``) and, written last, the
completion marker ``.complete`` holding the stage's cache key (``coaflow.runner`` computes it).
Paths in ``result.json`` that lie inside the stage folder are stored relative to it (``./model``),
so a stage folder copied to another machine or an object store still resolves.

A stage an engine fanned out (synthesize in ``synthesize.shards`` workers) leaves one folder per
shard, each naming its index in ``summary.shard``; the stage after it gets them all
(``--input synthesize=S0 --input synthesize=S1``) as one ``Result`` whose ``parts`` are the
shards in index order (``merge_shards``; ``Result.paths(name)`` lists an output of each).

The graph: ``ORDER`` is the pipeline order; ``reads(name)`` the stages whose folders a stage gets
(its NEEDS, then the OPTIONAL ones that exist); ``PROMOTION`` the stage whose refusal (exit 4)
skips the stages after it. The CLI runner, the Airflow DAG and the Kubeflow pipeline all wire
their tasks from these.
"""

from __future__ import annotations

import importlib
import json
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coaflow.errors import PipelineError, PromotionRefused

__all__ = ["MARKER", "ORDER", "PROMOTION", "RESULT", "Context", "PipelineError",
           "PromotionRefused", "Result", "load_stage", "merge_shards", "read_result", "reads"]

# Pipeline order: the stages, each the module coaflow.stages.<name>.
ORDER = ("synthesize", "gate", "sft", "rl", "evaluate", "register", "deploy")
PROMOTION = "register"  # its refusal (exit 4, PromotionRefused) skips the stages after it

MARKER = ".complete"
RESULT = "result.json"
STARTED = "key"  # the key of the attempt in progress: a resume must match it
REFUSED = "refused"  # a completed stage that refused a promotion: its reason (kept on cache hits)
REL = "./"  # prefix of an output path stored relative to its stage folder
OWNER = ".coaflow-stage"  # the stage name, written when coaflow makes a stage folder: only such
# a folder (or an empty one) is ever wiped


def load_stage(name: str):
    if name not in ORDER:
        raise PipelineError(f"unknown stage {name!r} (stages: {', '.join(ORDER)})")
    return importlib.import_module(f"coaflow.stages.{name}")


def needs(stage) -> tuple[str, ...]:
    """The stages ``stage`` (a name or a stage module) cannot run without."""
    module = load_stage(stage) if isinstance(stage, str) else stage
    return tuple(getattr(module, "NEEDS", ()))


def reads(stage, present: Iterable[str] | None = None) -> tuple[str, ...]:
    """Every stage whose folder ``stage`` (a name or a stage module) gets: its NEEDS, then its
    OPTIONAL stages among ``present`` (default: every stage that exists)."""
    module = load_stage(stage) if isinstance(stage, str) else stage
    required = needs(module)
    present = set(ORDER if present is None else present)
    return required + tuple(s for s in getattr(module, "OPTIONAL", ())
                            if s in present and s not in required)


# --- what a stage hands on ----------------------------------------------------------------------

def resolve_output(value: Any, base: Path | None) -> Any:
    """An output path of ``result.json`` as a path: ``./model`` lies in ``base`` (the stage
    folder); anything else (an absolute path, a URI, a number) is kept as it is."""
    if base is not None and isinstance(value, str) and value.startswith(REL):
        return str(Path(base) / value[len(REL):])
    return value


def _relative(value: Any, base: Path | None) -> Any:
    """``/w/runs/r/sft/model`` -> ``./model`` when under ``base``; anything else unchanged."""
    if base is None or not isinstance(value, str) or "://" in value or ":/" in value[:12]:
        return value
    p = Path(value)
    if not p.is_absolute():
        p = Path.cwd() / p
    try:
        rel = p.resolve().relative_to(base.resolve())
    except ValueError:
        return value
    return REL + rel.as_posix() if str(rel) != "." else REL


@dataclass
class Result:
    """What a stage hands to the next ones: artifact paths, metrics and a small summary."""

    outputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    cached: bool = False
    key: str | None = None  # the cache key of the stage folder it came from
    parts: list[Result] = field(default_factory=list)  # a stage run in shards: one per shard
    data: str | None = None  # the output holding the trajectories it hands on (synthesize's
    # "trajectories", the gate's "accepted"): what `coaflow data` and `gate --input` read in it

    def path(self, name: str) -> Path:
        if self.parts:
            raise PipelineError(f"output {name!r}: the stage ran in {len(self.parts)} shards, "
                                "one folder each (read them with paths())")
        if name not in self.outputs:
            raise PipelineError(f"the stage result has no output {name!r} "
                                f"(outputs: {', '.join(self.outputs) or 'none'})")
        return Path(self.outputs[name])

    def paths(self, name: str) -> list[Path]:
        """Output ``name`` of every shard, in shard order (one path for an unsharded stage)."""
        return [p.path(name) for p in self.parts] if self.parts else [self.path(name)]

    def to_json(self, base: Path | None = None) -> dict:
        """JSON for ``result.json``; outputs inside ``base`` become ``./relative`` paths."""
        outputs = {k: _relative(v, base) for k, v in self.outputs.items()}
        return {"outputs": outputs, "metrics": self.metrics, "summary": self.summary,
                **({"data": self.data} if self.data else {})}

    @classmethod
    def from_json(cls, d: Mapping, base: Path | None = None) -> Result:
        outputs = {k: resolve_output(v, base) for k, v in dict(d.get("outputs", {})).items()}
        return cls(outputs=outputs, metrics=dict(d.get("metrics", {})),
                   summary=dict(d.get("summary", {})), data=d.get("data"))


SHARD = "shard"  # summary key of a shard's folder: {"index": i, "of": n, "run": digest, ...}


def merge_shards(stage: str, parts: list[Result], folders: list | None = None) -> Result:
    """One input of a stage whose engine ran it in shards (several folders for one stage):
    every shard of one run (the same ``run`` digest of its config and seed), in index order,
    each exactly once; its key is theirs, in that order. A lone shard of several, a missing or
    repeated index, or a shard of another run is refused naming its folder (``folders``)."""
    names = [str(f) for f in folders] if folders else [f"#{i}" for i in range(len(parts))]
    infos = [p.summary.get(SHARD) for p in parts]
    if len(parts) == 1:
        if isinstance(infos[0], dict) and infos[0].get("of", 1) > 1:
            raise PipelineError(f"input {stage}={names[0]}: shard {infos[0].get('index')} of "
                                f"{infos[0]['of']} alone: pass every shard of the run, one "
                                f"--input {stage}=DIR each")
        return parts[0]
    for name, info in zip(names, infos, strict=True):
        if not isinstance(info, dict):
            raise PipelineError(f"input {stage}={name}: {len(parts)} folders, but not all of "
                                "them are shards of one run (this one's result.json names no "
                                "shard index)")
    runs = [(i.get("run"), i.get("tasks")) for i in infos]
    common = max(runs, key=runs.count)  # the run most of them belong to: the odd one is named
    for name, info, run in zip(names, infos, runs, strict=True):
        if run != common:
            raise PipelineError(f"input {stage}={name}: shard {info.get('index')} comes from "
                                f"another run than {names[runs.index(common)]} (another config "
                                "or seed): every shard must come from one run")
    counts = {i["of"] for i in infos}
    order = sorted(range(len(parts)), key=lambda k: infos[k]["index"])
    if counts != {len(parts)} or [infos[k]["index"] for k in order] != list(range(len(parts))):
        raise PipelineError(f"input {stage}: shards {sorted(i['index'] for i in infos)} of "
                            f"{sorted(counts)}: every shard of one run, once each")
    parts = [parts[k] for k in order]
    return Result(summary={SHARD: {"of": len(parts)}}, parts=parts,
                  key="+".join(p.key or "" for p in parts))


def read_result(stage_dir: Path) -> Result | None:
    """The result of a completed stage folder, or None if it never completed."""
    stage_dir = Path(stage_dir)
    marker = stage_dir / MARKER
    if not marker.exists() or not (stage_dir / RESULT).exists():
        return None
    try:
        data = json.loads((stage_dir / RESULT).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    result = Result.from_json(data, base=stage_dir.resolve())
    result.key = marker.read_text().strip()
    return result


@dataclass
class Context:
    """What a running stage knows of its run."""

    run_id: str
    out: Path  # this stage's folder
    inputs: dict[str, Result]
    run: Any  # the ``run`` config section (name, seed, workdir as an absolute path)
    tracker: Any  # coaflow.tracking.Tracker: the stage's MLflow run
    tracking_uri: str = ""
    registry_uri: str = ""  # the run's model registry (``registry.registry_uri``)
    resume: bool = False

    def input(self, stage: str) -> Result:
        if stage not in self.inputs:
            raise PipelineError(f"this stage needs the output of {stage!r}, which is not among "
                                f"its inputs in run {self.run_id}: run {stage} first")
        return self.inputs[stage]

    def optional(self, stage: str) -> Result | None:
        return self.inputs.get(stage)


# --- run ids ----------------------------------------------------------------------------------

RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
RUN_ID_ENV = "COAFLOW_RUN_ID"  # the run id an engine hands a stage process (a pod, a worker)


def check_run_id(run_id: str) -> str:
    """A run id is a folder name under ``<workdir>/runs``: letters, digits and ``-_.``, never a
    path (``../../x`` or ``/abs`` would write outside the workdir)."""
    if not isinstance(run_id, str) or not RUN_ID.match(run_id):
        raise PipelineError(f"--run-id {run_id!r}: a run id is a name of letters, digits and "
                            "'-_.' (at most 128, starting with a letter or digit)")
    return run_id


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)
