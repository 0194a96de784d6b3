"""The MLflow model registry: candidate versions, the ``champion`` alias that is served, and the
``previous`` alias a rollback returns to.

    reg = Registry("sqlite:///work/mlflow.db")
    v = reg.register("coaflow-agent", "work/runs/R/sft/model", tags={...}, experiment="coaflow")
    reg.promote("coaflow-agent", v.version, reason="beats champion on all suites")
    reg.fetch("models:/coaflow-agent@champion", "/tmp/serving")     # -> a local HF folder

Every call goes through one ``MlflowClient`` built with explicit tracking and registry URIs, so
nothing here changes MLflow's process-wide URI (stages of several runs may share one process).
A version's artifacts are the HF model folder plus ``coaflow_model.json`` (the system prompt the
model was trained with and its lineage), so ``coaflow serve`` needs nothing but the folder.
Aliases, never the deprecated stages: ``challenger`` (the latest candidate), ``champion`` (served),
``previous`` (the champion before it). Promotion moves ``previous`` first and ``champion`` last,
so a crash in between leaves the champion where it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coaflow.errors import ServiceUnavailable, UserError
from coaflow.tracking import bounded_http, safe_url, store_uri

CHAMPION, PREVIOUS, CHALLENGER = "champion", "previous", "challenger"  # the aliases coaflow moves
MODEL_INFO = "coaflow_model.json"
MODEL_URI_RE = re.compile(r"^models:/(?P<name>[^@/]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")


class RegistryError(UserError):
    """Unknown model, version or alias, or a model folder that cannot be registered."""


class PromotionConflict(ServiceUnavailable):
    """Another promotion moved the champion at the same time (exit 75: look, then retry)."""


BUDGET_TAG = "coaflow.budget"  # a version's tag: {suite: [turns, tokens a turn]} it was judged in

@dataclass
class Version:
    """One registered model version, as ``coaflow models list`` shows it."""

    name: str
    version: int
    source: str
    run_id: str | None
    aliases: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    created: float = 0.0

    @property
    def uri(self) -> str:
        return version_uri(self.name, self.version)


def model_name(run_name: str) -> str:
    """The registered model of a pipeline: ``<run.name>-agent``.

    >>> model_name("coaflow")
    'coaflow-agent'
    """
    return f"{run_name}-agent"


def registry_uri(workdir: str | Path, tracking_uri: str | None = None,
                 registry: str | None = None) -> str:
    """Where a run's model registry is: ``register.registry_uri`` (``registry``), else its
    tracking store (``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else
    ``sqlite:///<workdir>/mlflow.db``). The one answer for every stage's ``run()`` and
    ``cache_extras`` (register moves the champion there; evaluate compares with it; sft retrains
    it; deploy serves it) and for the CLI's ``models`` and ``serve``: a champion looked for
    elsewhere than where it is moved is never found.

    >>> registry_uri("/w", None, "http://mlflow:5000")
    'http://mlflow:5000'
    >>> registry_uri("/w", "sqlite:////t/m.db")
    'sqlite:////t/m.db'
    """
    return registry or store_uri(workdir, tracking_uri)


def run_registry(cfg, workdir: str | Path | None = None) -> str:
    """``registry_uri`` of a run of config ``cfg`` (its ``register.registry_uri``,
    ``tracking.uri`` and ``run.workdir``, or ``workdir`` when given)."""
    register = getattr(cfg, "register", None)
    return registry_uri(workdir or cfg.run.workdir, cfg.tracking.uri,
                        getattr(register, "registry_uri", None))


def alias_uri(name: str, alias: str) -> str:
    """``models:/NAME@ALIAS``, as ``parse_model_uri`` reads it.

    >>> alias_uri("coaflow-agent", CHAMPION)
    'models:/coaflow-agent@champion'
    """
    return f"models:/{name}@{alias}"


def version_uri(name: str, version: int) -> str:
    """``models:/NAME/VERSION``."""
    return f"models:/{name}/{version}"


def parse_model_uri(uri: str) -> tuple[str, str | None, int | None]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> (name, alias, version).

    >>> parse_model_uri("models:/coaflow-agent@champion")
    ('coaflow-agent', 'champion', None)
    >>> parse_model_uri("models:/coaflow-agent/3")
    ('coaflow-agent', None, 3)
    """
    m = MODEL_URI_RE.match(uri)
    if not m:
        raise RegistryError(f"{uri!r}: not a registry URI (models:/NAME@ALIAS or models:/NAME/N)")
    version = m.group("version")
    return m.group("name"), m.group("alias"), int(version) if version else None


def _unreachable(uri: str, e: Exception) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return not uri.startswith("sqlite") and any(
        w in text for w in ("connection", "timed out", "timeout", "max retries", "refused",
                            "name or service", "unreachable"))


class Registry:
    """The registry behind ``uri`` (a tracking URI: sqlite, http(s), databricks...)."""

    def __init__(self, uri: str, artifact_root: str | Path | None = None):
        if not uri:  # MLflow would take its process-wide default: some other store
            raise RegistryError("no registry URI (registry.registry_uri gives a run's)")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        bounded_http()
        from mlflow import MlflowClient

        self.uri = uri
        self.artifact_root = Path(artifact_root) if artifact_root else None
        if uri.startswith("sqlite:///") and self.artifact_root is None:
            self.artifact_root = Path(uri[len("sqlite:///"):]).parent / "mlartifacts"
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    def _call(self, what: str, fn, *args, **kw):
        """Run a client call; an unreachable server becomes ``ServiceUnavailable`` (retry) and
        an unknown name or alias one ``RegistryError`` line."""
        from mlflow.exceptions import MlflowException

        try:
            return fn(*args, **kw)
        except MlflowException as e:
            code = getattr(e, "error_code", "")
            if code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise RegistryError(f"{what}: {e.message}") from None
            if _unreachable(self.uri, e):
                raise ServiceUnavailable(f"MLflow registry {safe_url(self.uri)} did not answer ({what}): "
                                         f"{str(e).splitlines()[0][:200]}") from None
            raise
        except OSError as e:
            if _unreachable(self.uri, e):
                raise ServiceUnavailable(f"MLflow registry {safe_url(self.uri)} did not answer ({what}): "
                                         f"{e}") from None
            raise
        except Exception as e:  # SQLAlchemy's, when two writers meet on one SQLite store
            if "IntegrityError" in type(e).__name__ or "database is locked" in str(e):
                raise PromotionConflict(f"MLflow registry {safe_url(self.uri)}: another process changed "
                                        f"{what} at the same time; retry") from None
            raise

    # --- reading -----------------------------------------------------------------------------

    def _version(self, mv) -> Version:
        return Version(name=mv.name, version=int(mv.version), source=mv.source, run_id=mv.run_id,
                       aliases=list(mv.aliases or []), tags=dict(mv.tags or {}),
                       created=(mv.creation_timestamp or 0) / 1000)

    def exists(self, name: str) -> bool:
        try:
            self._call(f"model {name!r}", self.client.get_registered_model, name)
            return True
        except RegistryError:
            return False

    def alias(self, name: str, alias: str) -> Version | None:
        """The version holding ``alias``, or None (no such model or alias yet)."""
        from mlflow.exceptions import MlflowException

        try:
            return self._version(self.client.get_model_version_by_alias(name, alias))
        except MlflowException as e:
            if getattr(e, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST",
                                                "INVALID_PARAMETER_VALUE"):
                return None
            if _unreachable(self.uri, e):
                raise ServiceUnavailable(f"MLflow registry {safe_url(self.uri)} did not answer: "
                                         f"{str(e).splitlines()[0][:200]}") from None
            raise

    def champion(self, name: str) -> Version | None:
        return self.alias(name, CHAMPION)

    def get(self, name: str, version: int) -> Version:
        return self._version(self._call(f"{name} version {version}",
                                        self.client.get_model_version, name, str(version)))

    def versions(self, name: str) -> list[Version]:
        """Every version of ``name``, newest first ([] when the model does not exist)."""
        if not self.exists(name):
            return []
        found = self._call(name, self.client.search_model_versions, f"name='{name}'")
        # searches leave aliases out (sqlite store): the registered model holds them
        held = self._call(name, self.client.get_registered_model, name).aliases or {}
        out = []
        for mv in found:
            v = self._version(mv)
            v.aliases = sorted(a for a, n in held.items() if int(n) == v.version)
            out.append(v)
        return sorted(out, key=lambda v: -v.version)

    def models(self) -> list[str]:
        return sorted(m.name for m in self._call("registered models",
                                                 self.client.search_registered_models))

    def find(self, name: str, tag: str, value: str) -> Version | None:
        """The newest version of ``name`` whose tag ``tag`` equals ``value``."""
        return next((v for v in self.versions(name) if v.tags.get(tag) == value), None)

    def resolve(self, uri: str) -> Version:
        """``models:/NAME@ALIAS`` or ``models:/NAME/N`` -> its version; unknown ones fail clearly."""
        name, alias, version = parse_model_uri(uri)
        if not self.exists(name):
            known = ", ".join(self.models()) or "none"
            raise RegistryError(f"{uri}: no registered model {name!r} in {self.uri} "
                                f"(models: {known})")
        if alias is not None:
            v = self.alias(name, alias)
            if v is None:
                held = sorted({a for x in self.versions(name) for a in x.aliases})
                raise RegistryError(f"{uri}: model {name!r} has no alias {alias!r} "
                                    f"(aliases: {', '.join(held) or 'none'})")
            return v
        return self.get(name, version)

    # --- writing -----------------------------------------------------------------------------

    def register(self, name: str, model_dir: str | Path, *, tags: dict[str, Any],
                 info: dict[str, Any], experiment: str, run_id: str | None = None,
                 description: str = "") -> Version:
        """Log the HF folder ``model_dir`` (plus ``coaflow_model.json`` = ``info``) as the
        artifacts ``model/`` of MLflow run ``run_id`` (a new run in ``experiment`` if None) and
        register it as a new version of ``name`` with ``tags``; it gets the ``challenger``
        alias."""
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise RegistryError(f"{model_dir}: not a Hugging Face model folder (no config.json); "
                                "nothing to register")
        weights = list(model_dir.glob("*.safetensors")) + list(model_dir.glob("*.bin"))
        if not weights or any(w.stat().st_size == 0 for w in weights):
            raise RegistryError(f"{model_dir}: no (or an empty) weights file; the checkpoint is "
                                "missing or corrupt")
        if run_id is None:
            run_id = self._call("create run", self.client.create_run,
                                self._experiment(experiment), run_name=f"register {name}",
                                tags={"coaflow.kind": "register"}).info.run_id
        self._call("log model", self.client.log_artifacts, run_id, str(model_dir), "model")
        self._call("log model info", self.client.log_text, run_id,
                   json.dumps(info, indent=2, default=str), f"model/{MODEL_INFO}")
        if not self.exists(name):
            self._call(name, self.client.create_registered_model, name,
                       description="coaflow agent model: the champion alias is served")
        source = f"{self._call('run', self.client.get_run, run_id).info.artifact_uri}/model"
        mv = self._call(name, self.client.create_model_version, name, source=source,
                        run_id=run_id, tags={k: str(v)[:5000] for k, v in tags.items()},
                        description=description)
        self._wait_ready(name, mv.version)
        self.set_alias(name, CHALLENGER, int(mv.version))
        return self.get(name, int(mv.version))

    def _experiment(self, experiment: str) -> str:
        exp = self._call(experiment, self.client.get_experiment_by_name, experiment)
        if exp is not None:
            return exp.experiment_id
        location = self.artifact_root.resolve().as_uri() if self.artifact_root else None
        return self._call(experiment, self.client.create_experiment, experiment,
                          artifact_location=location)

    def _wait_ready(self, name: str, version, timeout_s: float = 120.0) -> None:
        """Remote registries copy artifacts asynchronously: wait until the version is READY."""
        deadline = time.time() + timeout_s
        while True:
            mv = self.client.get_model_version(name, str(version))
            if mv.status == "READY":
                return
            if mv.status == "FAILED_REGISTRATION" or time.time() > deadline:
                raise RegistryError(f"{name} version {version}: registration {mv.status}: "
                                    f"{mv.status_message or 'timed out'}")
            time.sleep(0.5)

    def set_alias(self, name: str, alias: str, version: int) -> None:
        self._call(f"{name}@{alias}", self.client.set_registered_model_alias, name, alias,
                   str(version))

    def tag(self, name: str, version: int, key: str, value: Any) -> None:
        self._call(f"{name} version {version}", self.client.set_model_version_tag, name,
                   str(version), key, str(value)[:5000])

    @contextlib.contextmanager
    def _moving(self, name: str):
        """Hold the registry's alias lock while aliases of ``name`` are read, checked and moved.
        A SQLite store is a local file: an exclusive ``flock`` on ``<db>.aliases.lock`` beside
        it serializes ``coaflow models promote``/``rollback`` of every process on the machine.
        A server store has no lock to take; ``promote`` checks the alias afterwards instead."""
        if not self.uri.startswith("sqlite:///"):
            yield
            return
        import fcntl

        lock = Path(self.uri[len("sqlite:///"):]).with_suffix(".aliases.lock")
        with open(lock, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def promote(self, name: str, version: int, reason: str) -> Version | None:
        """Make ``version`` the champion; the old champion (if another) becomes ``previous``.
        Returns the old champion. The reason and time are recorded as tags on ``version``.

        The read-check-move runs under ``_moving``'s lock, and the champion is read again
        afterwards: a concurrent promotion that moved it in between is a ``PromotionConflict``
        (exit 75), never a success message that is no longer true."""
        with self._moving(name):
            self.get(name, version)  # an unknown version fails here, before anything moves
            old = self.champion(name)
            if old is not None and old.version == version:
                return old
            if old is not None:
                self.set_alias(name, PREVIOUS, old.version)
                self.tag(name, version, "coaflow.replaced", old.version)
            self.tag(name, version, "coaflow.promoted_reason", reason)
            self.tag(name, version, "coaflow.promoted_at", time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                         time.gmtime()))
            self.set_alias(name, CHAMPION, version)
            now = self.champion(name)
        if now is None or now.version != version:
            raise PromotionConflict(f"{name}: another promotion ran at the same time: champion "
                                    f"is version {now.version if now else 'none'}, not "
                                    f"{version}; check `coaflow models list {name}` and retry")
        return old

    def rollback(self, name: str, reason: str) -> tuple[Version, Version]:
        """Champion back to ``previous``; the version rolled back from keeps a tag saying why.
        Returns (now champion, rolled back from). ``previous`` then points at the version before
        it, if the registry recorded one, so a second rollback goes further back."""
        with self._moving(name):
            return self._rollback(name, reason)

    def _rollback(self, name: str, reason: str) -> tuple[Version, Version]:
        current = self.champion(name)
        prev = self.alias(name, PREVIOUS)
        if current is None or prev is None:
            raise RegistryError(f"{name}: nothing to roll back to (champion: "
                                f"{current.version if current else 'none'}, previous: none)")
        self.tag(name, current.version, "coaflow.rolled_back_reason", reason)
        self.tag(name, prev.version, "coaflow.restored_reason", reason)
        self.set_alias(name, CHAMPION, prev.version)
        before = self._before(name, prev.version)
        if before is not None:
            self.set_alias(name, PREVIOUS, before)
        else:
            self._call(f"{name}@{PREVIOUS}", self.client.delete_registered_model_alias, name,
                       PREVIOUS)
        return self.get(name, prev.version), current

    def _before(self, name: str, version: int) -> int | None:
        """The champion that ``version`` replaced, from its promotion history (tags)."""
        v = self.get(name, version)
        replaced = v.tags.get("coaflow.replaced")
        return int(replaced) if replaced and replaced.isdigit() else None

    # --- fetching ----------------------------------------------------------------------------

    def fetch(self, uri: str, dst: str | Path) -> tuple[Path, Version]:
        """Download the model of ``uri`` (``models:/NAME@ALIAS`` or ``/N``) into ``dst``
        (a folder per version; reused when already complete). Returns (folder, version)."""
        from mlflow.artifacts import download_artifacts

        v = self.resolve(uri)
        out = Path(dst) / f"{v.name}-v{v.version}"
        if (out / ".complete").exists():
            return out, v
        tmp = out.with_name(out.name + ".tmp")
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        got = Path(self._call(f"download {uri}", download_artifacts, artifact_uri=v.source,
                              dst_path=str(tmp), tracking_uri=self.uri))
        if not (got / "config.json").is_file():
            raise RegistryError(f"{uri} (version {v.version}, {v.source}): the artifacts hold "
                                "no model folder (no config.json)")
        shutil.rmtree(out, ignore_errors=True)
        got.rename(out)
        shutil.rmtree(tmp, ignore_errors=True)
        (out / ".complete").write_text(v.source)
        return out, v
