"""The runner: every stage through one entry point, each cached, resumable and tracked.

Every engine calls ``execute(name, cfg, out_dir, inputs)``: ``coaflow run`` (``run_pipeline``
below), ``coaflow stage NAME --out DIR --input STAGE=DIR`` in a container, an Airflow task and a
KFP component. ``execute`` runs the stage (``coaflow.contract``) in ``out_dir`` and ends by
writing ``result.json`` and then, last, the completion marker holding the stage's **cache key**:
a hash of its config section, the run values it reads (``run.name``, ``run.seed``), the cache
keys of its inputs, ``cache_extras`` and coaflow's version and source. So a key names everything
a stage reads, and two stage folders with the same key hold the same result.

- Same key in ``out_dir`` already: a cache hit, nothing runs.
- Same key completed anywhere under the workdir (another run): its folder is hard-linked into
  ``out_dir`` (a cross-run hit, as KFP caches executions); ``use_cache=False`` forces work.
- A killed attempt (no marker) of a ``RESUMABLE`` stage whose started key matches is resumed
  (``ctx.resume``); any other leftover is wiped and the stage starts clean.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from coaflow import __version__
from coaflow.contract import (
    MARKER,
    ORDER,
    OWNER,
    REFUSED,
    RESULT,
    RUN_ID_ENV,
    STARTED,
    Context,
    Result,
    check_run_id,
    load_stage,
    merge_shards,
    needs,
    new_run_id,
    read_result,
    reads,
)
from coaflow.digest import code_digest, path_digest
from coaflow.digest import digest as _digest
from coaflow.errors import PipelineError, PromotionRefused, os_failure
from coaflow.registry import registry_uri, run_registry
from coaflow.tracking import Tracker, redact

__all__ = ["cache_key", "execute", "list_runs", "run_pipeline", "show_run", "stage_setup"]


def _field(section: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        section = getattr(section, part, None)
    return section


def cache_key(stage: str, module, section: Any, run: Any, input_keys: Mapping[str, str],
              registry: str | None = None) -> str:
    """Everything the stage reads: its section, the contents of the files its ``PATH_FIELDS``
    name, ``run.name``/``run.seed``, its inputs' keys, ``cache_extras`` (outside state, e.g. the
    champion's version in the ``registry``), the coaflow version and its source
    (``code_digest``)."""
    conf = section.model_dump(mode="json") if hasattr(section, "model_dump") else section
    files = {f: path_digest(_field(section, f)) for f in getattr(module, "PATH_FIELDS", ())}
    extras = None
    if hasattr(module, "cache_extras"):  # (cfg, run[, inputs][, registry_uri=]): what it takes
        params = inspect.signature(module.cache_extras).parameters
        args = [section, run] + ([dict(input_keys)] if len(set(params) - {"registry_uri"}) >= 3
                                 else [])
        kw = {"registry_uri": registry or registry_uri(run.workdir)} \
            if "registry_uri" in params else {}
        extras = module.cache_extras(*args, **kw)
    return _digest({"stage": stage, "config": conf, "version": __version__, "code": code_digest(),
                    "run": {"name": getattr(run, "name", None), "seed": getattr(run, "seed", None)},
                    "inputs": dict(sorted(input_keys.items())), "extras": extras,
                    **({"files": files} if files else {})})


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_result(out: Path, result: Result) -> None:
    """``out/result.json``: paths inside ``out`` relative, secrets redacted, written whole."""
    _write_atomic(out / RESULT, json.dumps(redact(result.to_json(base=out)), indent=2))


def owned_by(path: Path, name: str) -> bool:
    """Whether coaflow may wipe ``path`` for stage ``name``: it is absent or empty, or coaflow
    made it for this stage (its ``OWNER`` file names the stage). A folder from before ``OWNER``
    existed counts when it holds the ``STARTED`` key and nothing but stage files."""
    if not path.exists() and not path.is_symlink():
        return True
    if path.is_symlink() or not path.is_dir():
        return False
    if not any(path.iterdir()):
        return True
    owner = path / OWNER
    if owner.is_file() and not owner.is_symlink():
        return owner.read_text().strip() == name
    return (path / STARTED).is_file() and not (path / OWNER).exists()


def check_out_dir(name: str, out: Path, inputs: Mapping[str, Path | str]) -> None:
    """Refuse an output folder that would destroy what coaflow did not write: a folder that is
    not this stage's, or one that is, holds or lies inside an input folder."""
    out = Path(out)
    try:
        real = out.resolve(strict=False)
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise PipelineError(f"--out {out}: cannot resolve ({e})") from None
    for stage, value in inputs.items():
        for folder in folders(value):
            src = folder.resolve()
            if real == src or real in src.parents or src in real.parents:
                raise PipelineError(f"--out {out}: overlaps the input {stage}={folder} (the "
                                    f"same folder, inside it or holding it): pick a separate "
                                    f"folder")
    if real.exists() and not real.is_dir():
        raise PipelineError(f"--out {out}: exists and is not a folder")
    if not owned_by(real, name):
        raise PipelineError(f"--out {out}: holds files coaflow did not write for stage {name!r} "
                            f"(no {OWNER} naming it): refusing to wipe it; pick an empty or new "
                            f"folder")


def _wipe(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _clear(folder: Path) -> None:
    """Empty ``folder`` but keep it: it may be a mount point (a Kubernetes volume), which
    cannot be removed, only emptied."""
    for child in folder.iterdir() if folder.is_dir() else []:
        _wipe(child)


# --- the cross-run cache: <workdir>/cache/stages/<stage>-<key> holds the folder that has it ----

def _index(workdir: Path, name: str, key: str) -> Path:
    return workdir / "cache" / "stages" / f"{name}-{key}"


def _remember(workdir: Path, name: str, key: str, folder: Path) -> None:
    """Add ``folder`` to the completed folders of (name, key): a line each, newest last."""
    entry = _index(workdir, name, key)
    entry.parent.mkdir(parents=True, exist_ok=True)
    known = entry.read_text().split("\n") if entry.exists() else []
    known = [k for k in known if k and k != str(folder)] + [str(folder)]
    _write_atomic(entry, "\n".join(known) + "\n")


def _cached_folder(workdir: Path, name: str, key: str, out: Path) -> Path | None:
    """The newest folder that still holds a completed (name, key), other than ``out``."""
    entry = _index(workdir, name, key)
    if not entry.exists():
        return None
    for line in reversed(entry.read_text().split("\n")):
        src = Path(line.strip()) if line.strip() else None
        if src is None or src.resolve() == out.resolve():
            continue
        done = read_result(src)
        if done is not None and done.key == key:
            return src
    return None


def _link_tree(src: Path, dst: Path, name: str) -> None:
    """Copy ``src`` to ``dst`` as hard links (no data copied; a stage never rewrites a finished
    file), falling back to a real copy across file systems; the marker goes last. A failure (a
    read-only folder, a full disk) is the same one line as in a stage run, and leaves neither
    the half-made ``.linking`` folder nor a ``dst`` that looks complete."""
    tmp = dst.with_name(dst.name + ".linking")

    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    try:
        _wipe(tmp)
        shutil.copytree(src, tmp, copy_function=link, ignore=shutil.ignore_patterns(MARKER))
        _wipe(dst)
        tmp.rename(dst)
        shutil.copy2(src / MARKER, dst / MARKER)
    except (OSError, shutil.Error) as e:
        for left in (tmp, dst / MARKER):
            with contextlib.suppress(OSError):
                _wipe(left)
        if isinstance(e, shutil.Error):  # copytree's list of (src, dst, why): the first
            why = e.args[0][0][2] if e.args and e.args[0] else str(e)
            e = OSError(errno.ENOSPC if "No space" in why else errno.EIO, why)
        raise os_failure(e, f"stage {name} in {dst}") from None


# --- the one entry point --------------------------------------------------------------------

def folders(value: Path | str | Sequence[Path | str]) -> list[Path]:
    """The folders of one input: one, or a list (a stage an engine ran in shards)."""
    return [Path(value)] if isinstance(value, str | Path) else [Path(v) for v in value]


def stage_inputs(module, inputs: Mapping[str, Path | str | Sequence[Path | str]]
                 ) -> dict[str, Result]:
    """Read the completed input folders a stage needs; one clear error for each problem. An
    input given as several folders is a stage run in shards (``contract.merge_shards``)."""
    results: dict[str, Result] = {}
    for n, value in inputs.items():
        parts, given = [], folders(value)
        for d in given:
            r = read_result(d)
            if r is None:
                raise PipelineError(f"input {n}={d}: not a completed stage folder (no {RESULT} "
                                    f"and {MARKER}): the {n} stage did not finish there")
            owner = d / OWNER
            made_by = owner.read_text().strip() if owner.is_file() else n
            if made_by != n:
                raise PipelineError(f"input {n}={d}: a folder of stage {made_by!r}, not {n!r}")
            parts.append(r)
        if parts:
            results[n] = merge_shards(n, parts, given)
    missing = [n for n in needs(module) if n not in results]
    if missing:
        raise PipelineError(f"stage {module.NAME!r} needs the output of {', '.join(missing)} "
                            f"(pass --input {missing[0]}=DIR)")
    wanted = reads(module, present=results)
    return {n: r for n, r in results.items() if n in wanted}


class StageSetup(NamedTuple):
    module: Any  # the stage module
    run: Any  # the ``run`` section, its workdir an absolute path
    section: Any  # the stage's config section
    inputs: dict[str, Result]  # its completed input folders, read
    key: str  # its cache key
    registry: str  # where the run's model registry is (``registry.registry_uri``)


def stage_setup(name: str, cfg, inputs: Mapping[str, Any], module=None) -> StageSetup:
    """What stage ``name`` of ``cfg`` reads and its cache key: the one function that builds
    them, for ``execute`` and for every torchrun rank (``coaflow.launch``). Why one: a worker
    that built its key without the run's ``tracking.uri`` looked up another champion, waited
    for a key rank 0 never wrote, and hung for 30 minutes."""
    module = module or load_stage(name)
    run = cfg.run.model_copy(update={"workdir": str(Path(cfg.run.workdir).resolve())})
    section = getattr(cfg, name, None)
    results = stage_inputs(module, inputs)
    registry = run_registry(cfg, run.workdir)
    key = cache_key(name, module, section, run, {n: r.key or "" for n, r in results.items()},
                    registry=registry)
    return StageSetup(module, run, section, results, key, registry)


def execute(name: str, cfg, out_dir: str | Path, inputs: Mapping[str, Path | str] | None = None,
            *, tracker: Tracker | None = None, run_id: str | None = None, module=None,
            use_cache: bool = True, log=print) -> Result:
    """Run stage ``name`` of config ``cfg`` in ``out_dir`` with its inputs' completed folders,
    or return the cached result (``result.cached``). ``PromotionRefused`` is raised after the
    stage is recorded complete, and again on a cache hit of that refusal."""
    module, run, section, results, key, registry = stage_setup(name, cfg, inputs or {},
                                                                  module)
    workdir = Path(run.workdir)
    check_out_dir(name, Path(out_dir), inputs or {})
    tracker = tracker or Tracker(workdir, uri=cfg.tracking.uri, enabled=cfg.tracking.enabled,
                                 experiment=cfg.tracking.experiment or cfg.run.name)
    out = Path(out_dir).resolve()
    cacheable = use_cache and getattr(module, "CACHE", True)
    run_id = run_id or os.environ.get(RUN_ID_ENV) or new_run_id()

    done = read_result(out) if cacheable else None
    src = None
    if cacheable and (done is None or done.key != key):
        src = _cached_folder(workdir, name, key, out)
        if src is not None:
            _link_tree(src, out, name)
            _write_atomic(out / "cached_from", str(src))
            done = read_result(out)
    if done is not None and done.key == key:
        log(f"[{name}] cached ({src or out})")
        _remember(workdir, name, key, out)
        done.cached = True
        tracker.cached_stage(name, run_id, str(src or out), done.metrics, folder=str(out))
        if (out / REFUSED).exists():  # the same decision again: the run stops here again
            raise PromotionRefused((out / REFUSED).read_text(), done)
        return done

    try:
        resume = False
        started = out / STARTED
        if out.exists():
            same = started.exists() and started.read_text().strip() == key
            if getattr(module, "RESUMABLE", False) and same and not (out / MARKER).exists():
                resume = True
                log(f"[{name}] resuming an interrupted attempt in {out}")
            else:
                _clear(out)  # stale (other config or inputs) or a killed non-resumable attempt
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(out / OWNER, name)
        _write_atomic(started, key)
        ctx = Context(run_id=run_id, out=out, inputs=results, run=run, tracker=tracker,
                      tracking_uri=tracker.uri, registry_uri=registry, resume=resume)
        params = section.model_dump(mode="json") if hasattr(section, "model_dump") else {}
        log(f"[{name}] running -> {out}")
        start, refused = time.time(), None
        with tracker.stage_run(name, run_id, params, folder=str(out)):
            try:
                result = module.run(section, ctx)
            except PromotionRefused as e:
                if e.result is None:
                    raise
                result, refused = e.result, e
            result.metrics.setdefault("wall_seconds", round(time.time() - start, 2))
            tracker.log_metrics(result.metrics)
            write_result(out, result)
            if refused is not None:
                _write_atomic(out / REFUSED, str(refused))
            tracker.log_artifact(out / RESULT)
        _write_atomic(out / MARKER, key)  # last: the stage is complete only now
    except OSError as e:  # read-only, full disk, permissions: one line, and no half output
        if e.errno in (errno.ENOSPC, errno.EDQUOT) and not getattr(module, "RESUMABLE", False):
            with contextlib.suppress(OSError):
                _clear(out)
        raise os_failure(e, f"stage {name} in {out}") from None
    result = read_result(out)
    if cacheable:
        _remember(workdir, name, key, out)
    if refused is not None:
        refused.result = result
        raise refused
    return result


# --- the runner: stages in order under <workdir>/runs/<run_id>/<stage>/ ----------------------

def run_pipeline(cfg, run_id: str | None = None, only: list[str] | None = None,
                 start_from: str | None = None, stages: Mapping[str, Any] | None = None,
                 use_cache: bool = True, log=print) -> dict[str, Result]:
    """Run the stages of ``cfg`` in order. ``stages`` maps name -> module (default: every stage of ORDER).

    A refused promotion ends the run there (the stages after it need a promotion) and is
    raised once the results are recorded: the CLI exits 4."""
    modules = dict(stages) if stages is not None else {n: load_stage(n) for n in ORDER}
    names = list(modules)
    for n in (only or []) + ([start_from] if start_from else []):
        if n not in modules:
            raise PipelineError(f"unknown stage {n!r} (stages: {', '.join(names)})")
    selected = [n for n in names if (not only or n in only)]
    if start_from:
        selected = [n for n in selected if names.index(n) >= names.index(start_from)]

    workdir = Path(cfg.run.workdir).resolve()
    run_id = check_run_id(run_id) if run_id else new_run_id()
    run_dir = workdir / "runs" / run_id
    # Set-up is checked before anything is written: a run that cannot start leaves no trace.
    earlier = {n: r for n in names if n not in selected and (r := read_result(run_dir / n))}
    for n in selected:
        need = [d for d in needs(modules[n]) if d not in selected
                and d not in earlier]
        if need:
            raise PipelineError(f"stage {n!r} needs {', '.join(need)}, which has not completed "
                                f"in run {run_id} (under {run_dir}): run it first, or start "
                                f"earlier with --from")
    run_dir.mkdir(parents=True, exist_ok=True)
    config_json = cfg.model_dump(mode="json")
    _write_atomic(run_dir / "config.yaml", yaml.safe_dump(redact(config_json), sort_keys=False))
    tracker = Tracker(workdir, uri=cfg.tracking.uri, experiment=cfg.tracking.experiment or
                      cfg.run.name, enabled=cfg.tracking.enabled)
    results = dict(earlier)
    log(f"run {run_id}: {' -> '.join(selected)}  ({run_dir})")
    with tracker.pipeline_run(run_id, config_json), _report_card(run_dir, tracker):
        for name in selected:
            mod = modules[name]
            inputs = {n: run_dir / n for n in reads(mod, modules) if n in results}
            try:
                results[name] = execute(name, cfg, run_dir / name, inputs, tracker=tracker,
                                        run_id=run_id, module=mod, use_cache=use_cache, log=log)
            except PromotionRefused as e:
                results[name] = e.result
                log(f"[{name}] {e}; the stages after it are skipped")
                raise
            finally:
                if name in results:
                    tracker.log_metrics({f"{name}.{k}": v
                                         for k, v in results[name].metrics.items()})
    return results


@contextlib.contextmanager
def _report_card(run_dir: Path, tracker: Tracker):
    """Write the run's report card when the run ends, however it ends (a refused promotion
    and a failed stage are exactly when people read it)."""
    try:
        yield
    finally:
        from coaflow import report

        try:
            report.write(run_dir, tracker.uri if tracker.enabled else None,
                         tracker if tracker.enabled else None)
        except Exception as e:  # a report must never hide the run's own outcome
            print(f"(report card not written: {type(e).__name__}: {e})")


def _stage_dirs(run_dir: Path) -> list[Path]:
    order = list(ORDER)
    dirs = [p for p in run_dir.iterdir() if p.is_dir() and not p.name.endswith(".linking")]
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
    check_run_id(run_id)
    run_dir = Path(workdir) / "runs" / run_id
    if not run_dir.is_dir():
        raise PipelineError(f"no run {run_id!r} under {Path(workdir) / 'runs'}")
    out: dict[str, Any] = {"run_id": run_id, "path": str(run_dir), "stages": {}}
    for p in _stage_dirs(run_dir):
        r = read_result(p)
        status = "incomplete"
        if r is not None:
            status = "cached" if (p / "cached_from").exists() else "done"
        out["stages"][p.name] = {"status": status,
                                 **({"key": r.key, "metrics": r.metrics, "outputs": r.outputs}
                                    if r else {})}
    return out

