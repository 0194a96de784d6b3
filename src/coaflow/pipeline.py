"""The pipeline runner: stages in order, each cached, resumable and tracked.

A stage is a module with

    NAME = "gate"                       # = CLI subcommand = config section = Airflow task id
    NEEDS = ("synthesize",)             # stages whose results it reads (ctx.inputs)
    RESUMABLE = False                   # True: a killed attempt's files are kept for run() to resume
    class Config(Section): ...          # its config section
    def run(cfg: Config, ctx: Context) -> Result: ...

Each stage writes into ``<workdir>/runs/<run_id>/<stage>/``. When ``run`` returns, the runner writes
``result.json`` and then, last, the completion marker ``.complete`` holding the stage's cache key
(a hash of its config section, the results of the stages it needs and the coaflow version). A stage
whose marker holds the same key is skipped and its result reused. A stage killed half way has no
marker: its folder is wiped and the stage runs again, or, if ``RESUMABLE``, ``run`` is called with
``ctx.resume = True`` and picks up where it stopped.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import secrets
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from coaflow import __version__
from coaflow.tracking import Tracker, redact

# Pipeline order. A stage is listed (CLI, config, runner) once its module exists: nothing here
# pretends to work before it does.
ORDER = ("synthesize", "gate", "sft", "rl", "evaluate", "register", "deploy")
STAGES: dict[str, str] = {
    n: f"coaflow.stages.{n}" for n in ORDER if importlib.util.find_spec(f"coaflow.stages.{n}")
}

MARKER = ".complete"
RESULT = "result.json"


class PipelineError(RuntimeError):
    """A user-facing failure of a stage or of the run's set-up; the message is shown as is."""


@dataclass
class Result:
    """What a stage hands to the next ones: artifact paths, metrics and a small summary."""

    outputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    cached: bool = False

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("cached")
        return d

    @classmethod
    def from_json(cls, d: Mapping) -> Result:
        return cls(outputs=dict(d.get("outputs", {})), metrics=dict(d.get("metrics", {})),
                   summary=dict(d.get("summary", {})))


@dataclass
class Context:
    run_id: str
    run_dir: Path
    out: Path  # this stage's folder
    inputs: dict[str, Result]
    config: Any  # the whole resolved config
    tracker: Tracker
    resume: bool = False

    def input(self, stage: str) -> Result:
        if stage not in self.inputs:
            raise PipelineError(f"this stage needs the output of {stage!r}, which is not in run "
                                f"{self.run_id}: run it first (coaflow run --run-id {self.run_id})")
        return self.inputs[stage]


def load_stage(name: str):
    if name not in STAGES:
        raise PipelineError(f"unknown stage {name!r} (stages: {', '.join(STAGES) or 'none'})")
    return importlib.import_module(STAGES[name])


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_key(stage: str, section: Any, inputs: Mapping[str, Result]) -> str:
    conf = section.model_dump(mode="json") if hasattr(section, "model_dump") else section
    return _digest({"stage": stage, "config": conf, "version": __version__,
                    "inputs": {k: v.to_json() for k, v in sorted(inputs.items())}})


def read_result(stage_dir: Path) -> Result | None:
    """The result of a completed stage, or None if it never completed."""
    if not (stage_dir / MARKER).exists() or not (stage_dir / RESULT).exists():
        return None
    return Result.from_json(json.loads((stage_dir / RESULT).read_text()))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_stage(name: str, module, section, ctx_base: dict, log=print) -> Result:
    """Run one stage inside its folder, or return its cached result."""
    stage_dir: Path = ctx_base["run_dir"] / name
    inputs = {n: ctx_base["results"][n] for n in getattr(module, "NEEDS", ())
              if n in ctx_base["results"]}
    missing = [n for n in getattr(module, "NEEDS", ()) if n not in inputs]
    if missing:
        raise PipelineError(f"stage {name!r} needs {', '.join(missing)}, which has not completed "
                            f"in run {ctx_base['run_id']}")
    key = cache_key(name, section, inputs)
    marker = stage_dir / MARKER
    if marker.exists() and marker.read_text().strip() == key:
        result = read_result(stage_dir)
        if result is not None:
            log(f"[{name}] cached ({stage_dir})")
            result.cached = True
            return result
    resume = False
    if stage_dir.exists():
        if marker.exists() or not getattr(module, "RESUMABLE", False):
            shutil.rmtree(stage_dir)  # stale (other inputs/config) or a killed non-resumable try
        else:
            resume = True
            log(f"[{name}] resuming an interrupted attempt in {stage_dir}")
    stage_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(stage_dir / "key", key)
    tracker: Tracker = ctx_base["tracker"]
    ctx = Context(run_id=ctx_base["run_id"], run_dir=ctx_base["run_dir"], out=stage_dir,
                  inputs=inputs, config=ctx_base["config"], tracker=tracker, resume=resume)
    params = section.model_dump(mode="json") if hasattr(section, "model_dump") else {}
    log(f"[{name}] running -> {stage_dir}")
    start = time.time()
    with tracker.stage_run(name, ctx.run_id, params):
        result = module.run(section, ctx)
        result.metrics.setdefault("wall_seconds", round(time.time() - start, 2))
        tracker.log_metrics(result.metrics)
        _write_atomic(stage_dir / RESULT, json.dumps(redact(result.to_json()), indent=2))
        tracker.log_artifact(stage_dir / RESULT)
    _write_atomic(marker, key)  # last: the stage is complete only now
    return result


def run_pipeline(cfg, run_id: str | None = None, only: list[str] | None = None,
                 start_from: str | None = None, stages: Mapping[str, Any] | None = None,
                 log=print) -> dict[str, Result]:
    """Run the stages of ``cfg`` in order. ``stages`` maps name -> module (default: STAGES)."""
    modules = dict(stages) if stages is not None else {n: load_stage(n) for n in STAGES}
    names = list(modules)
    for n in (only or []) + ([start_from] if start_from else []):
        if n not in modules:
            raise PipelineError(f"unknown stage {n!r} (stages: {', '.join(names)})")
    selected = [n for n in names if (not only or n in only)]
    if start_from:
        selected = [n for n in selected if names.index(n) >= names.index(start_from)]

    workdir = Path(cfg.run.workdir)
    run_id = run_id or new_run_id()
    run_dir = workdir / "runs" / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    config_json = cfg.model_dump(mode="json")
    _write_atomic(run_dir / "config.yaml", yaml.safe_dump(redact(config_json), sort_keys=False))
    tracker = Tracker(workdir, uri=cfg.tracking.uri, experiment=cfg.tracking.experiment or
                      cfg.run.name, enabled=cfg.tracking.enabled)
    results = {n: r for n in names if n not in selected and (r := read_result(run_dir / n))}
    ctx_base = {"run_id": run_id, "run_dir": run_dir, "config": cfg, "tracker": tracker,
                "results": results}
    log(f"run {run_id}: {' -> '.join(selected)}  ({run_dir})")
    with tracker.pipeline_run(run_id, config_json):
        for name in selected:
            results[name] = run_stage(name, modules[name], getattr(cfg, name, None), ctx_base, log)
            tracker.log_metrics({f"{name}.{k}": v for k, v in results[name].metrics.items()})
    return results


def _stage_dirs(run_dir: Path) -> list[Path]:
    order = list(STAGES)
    dirs = [p for p in run_dir.iterdir() if p.is_dir()]
    return sorted(dirs, key=lambda p: (order.index(p.name) if p.name in order else len(order), p.name))


def list_runs(workdir: str | Path) -> list[dict]:
    root = Path(workdir) / "runs"
    rows = []
    for run_dir in sorted(root.iterdir() if root.exists() else [], reverse=True):
        if run_dir.is_dir():
            stages = {p.name: ("done" if (p / MARKER).exists() else "incomplete")
                      for p in _stage_dirs(run_dir)}
            rows.append({"run_id": run_dir.name, "path": str(run_dir), "stages": stages})
    return rows


def show_run(workdir: str | Path, run_id: str) -> dict:
    run_dir = Path(workdir) / "runs" / run_id
    if not run_dir.is_dir():
        raise PipelineError(f"no run {run_id!r} under {Path(workdir) / 'runs'}")
    out: dict[str, Any] = {"run_id": run_id, "path": str(run_dir), "stages": {}}
    for p in _stage_dirs(run_dir):
        r = read_result(p)
        out["stages"][p.name] = {"status": "done" if r else "incomplete",
                                 **({"metrics": r.metrics, "outputs": r.outputs} if r else {})}
    return out
