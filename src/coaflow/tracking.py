"""MLflow tracking: one parent run per pipeline run, one nested run per stage.

The store defaults to ``sqlite:///<workdir>/mlflow.db`` with artifacts in ``<workdir>/mlartifacts``;
``MLFLOW_TRACKING_URI`` (or ``tracking.uri`` in the profile) points it anywhere else. The fluent
API is used on purpose: TRL's MLflow callback logs into the active run, which is the stage's.

Nothing secret is ever logged: every param, tag and dict artifact passes through ``redact``, which
drops values under secret-looking keys, values equal to a secret environment variable, and strings
shaped like API tokens.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from coaflow.errors import CoaflowError, ServiceUnavailable, UserError

# "token" and "auth" only as the last segment of a key: hf_token, auth, access_token are secret;
# max_tokens, mean_token_accuracy, tokenizer, author are not.
SECRET_KEY_RE = re.compile(r"(api[_-]?key|secret|password|passwd|credential|authorization|bearer"
                           r"|(?:^|[_.\-])(?:token|auth)$)", re.I)
TOKEN_SHAPES = re.compile(r"\b(sk-[A-Za-z0-9_\-]{16,}|hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}"
                          r"|AKIA[0-9A-Z]{16}|xox[baprs]-[A-Za-z0-9\-]{10,})\b")
REDACTED = "***"
# Names of config fields that *name* an environment variable (api_key_env: OPENAI_API_KEY) are
# safe to log: they hold no secret.
SAFE_SUFFIXES = ("_env", "_env_var")


# the user:password@ of a URL (https://user:pass@host/v1): kept out of every file and log line
URL_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.\-]*://)[^/\s@]+@")


def secret_values(*env_names: str | None) -> list[str]:
    """Values to redact wherever they turn up: every environment variable with a secret-looking
    name, and the variables named (``api_key_env: MY_KEY``) by the config."""
    named = [os.environ.get(n or "", "") for n in env_names]
    found = [v for k, v in os.environ.items() if SECRET_KEY_RE.search(k)] + named
    return sorted({v for v in found if len(v) >= 6}, key=len, reverse=True)


def _env_names(obj: Any) -> list[str]:
    """The environment variables a config names in its ``*_env`` keys."""
    if isinstance(obj, Mapping):
        return [v for k, v in obj.items() if str(k).endswith(SAFE_SUFFIXES) and isinstance(v, str)
                ] + [n for v in obj.values() for n in _env_names(v)]
    if isinstance(obj, (list, tuple)):
        return [n for v in obj for n in _env_names(v)]
    return []


def safe_url(url: str) -> str:
    """``url`` without a password or user in it, for messages.

    >>> safe_url("https://user:pass@host/v1")
    'https://***@host/v1'
    """
    return URL_USERINFO.sub(rf"\g<1>{REDACTED}@", url)


def redact(obj: Any, _secrets: list[str] | None = None) -> Any:
    """A copy of ``obj`` with secrets replaced by ``***``: values under secret-looking keys,
    values of secret environment variables (and of those the config names in ``*_env`` keys),
    token-shaped strings and the user:password of URLs.

    >>> redact({"api_key": "abc", "lr": 0.1, "api_key_env": "OPENAI_API_KEY"})
    {'api_key': '***', 'lr': 0.1, 'api_key_env': 'OPENAI_API_KEY'}
    >>> redact({"hf_token": "x", "max_tokens": 512, "mean_token_accuracy": 0.8, "tokenizer": "t"})
    {'hf_token': '***', 'max_tokens': 512, 'mean_token_accuracy': 0.8, 'tokenizer': 't'}
    >>> redact("Bearer sk-abcdefghijklmnop1234 at https://me:pw@host/v1")
    'Bearer *** at https://***@host/v1'
    """
    secrets = secret_values(*_env_names(obj)) if _secrets is None else _secrets
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            secret_key = SECRET_KEY_RE.search(str(k)) and not str(k).endswith(SAFE_SUFFIXES)
            out[k] = REDACTED if secret_key and v not in (None, "", False) else redact(v, secrets)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v, secrets) for v in obj)
    if isinstance(obj, str):
        for s in secrets:
            if s in obj:
                obj = obj.replace(s, REDACTED)
        return safe_url(TOKEN_SHAPES.sub(REDACTED, obj))
    return obj


def flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``; lists become JSON strings."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v, default=str)[:500]
        else:
            out[key] = v
    return out


def _looks_unreachable(e: Exception) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return any(w in text for w in ("connection", "timed out", "timeout", "max retries",
                                   "unreachable", "refused", "name or service"))


@contextlib.contextmanager
def scoped_uri(uri: str | None) -> Iterator[None]:
    """Point MLflow's process-wide tracking and registry URIs at ``uri`` for the block only, and
    put back both the URIs and ``$MLFLOW_TRACKING_URI`` (which ``set_tracking_uri`` writes)."""
    if not uri:
        yield
        return
    import mlflow

    env = os.environ.get("MLFLOW_TRACKING_URI")
    before, registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        mlflow.set_registry_uri(registry)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


# MLflow's own defaults: 7 retries with backoff factor 2 and 120 s per request: 253 s before a
# dead registry is reported. coaflow's: about 30 s in all; a variable the user set wins.
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def bounded_http() -> None:
    """Bound MLflow's HTTP retries and timeouts (``HTTP_LIMITS``) unless the user set them: an
    unreachable tracking server or registry is a 75 within ~30 s, not after four minutes. Large
    artifact uploads over a slow link may need ``MLFLOW_HTTP_REQUEST_TIMEOUT`` raised."""
    for name, value in HTTP_LIMITS.items():
        os.environ.setdefault(name, value)


class Terminated(KeyboardInterrupt):
    """SIGTERM (Airflow, Kubernetes and KFP stop a task with it), raised like Ctrl-C so that
    every ``finally`` runs: the MLflow runs end KILLED and no half output looks complete."""


def terminate_as_interrupt() -> None:
    """Turn SIGTERM into ``Terminated`` in this process (main thread only, and only where
    nobody else installed a handler: an Airflow worker keeps its own)."""
    import signal
    import threading

    def raise_terminated(signum, frame):
        raise Terminated(f"terminated by signal {signum}")

    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, raise_terminated)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` store URI, else None (a server, a plain path).

    >>> str(sqlite_path("sqlite:////w/mlflow.db")), sqlite_path("http://mlflow:5000")
    ('/w/mlflow.db', None)
    """
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def store_lock(uri: str, purpose: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``<db>.<purpose>.lock`` beside a SQLite store, held for the
    block (nothing for a server store: the server serializes its own writes)."""
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    import fcntl

    from coaflow.errors import os_failure

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path.with_name(f"{path.name}.{purpose}.lock"), "a")  # noqa: SIM115
    except OSError as e:
        raise os_failure(e, f"MLflow store {path}") from None
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def store_failure(e: BaseException, uri: str):
    """The one-line error for a failure of the MLflow store itself, or None when ``e`` is
    something else: a read-only SQLite file is bad input (2, naming the file); a store locked
    by another process is worth a retry (75)."""
    if not any(c.__module__.split(".")[0] in ("mlflow", "sqlalchemy", "sqlite3")
               for c in type(e).__mro__):
        return None
    text = str(e)
    where = str(sqlite_path(uri) or safe_url(uri))
    if "readonly database" in text or "read-only file system" in text.lower():
        return UserError(f"MLflow store {where}: read-only (attempt to write a readonly "
                         "database): make it writable or set tracking.uri to another store")
    if "database is locked" in text:
        return ServiceUnavailable(f"MLflow store {where}: locked by another process (database "
                                  "is locked): retry")
    if "unable to open database file" in text:
        return UserError(f"MLflow store {where}: cannot open it (unable to open database file): "
                         "check the folder exists and is writable")
    return None


@contextlib.contextmanager
def store_errors(uri: str) -> Iterator[None]:
    """Turn a failure of the store (``store_failure``) into its one-line error."""
    try:
        yield
    except Exception as e:
        mapped = store_failure(e, uri)
        if mapped is None:
            raise
        raise mapped from None


def default_uri(workdir: str | Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or \
        f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def store_uri(workdir: str | Path, tracking_uri: str | None = None) -> str:
    """The MLflow tracking store of a run: its ``tracking.uri``, else ``default_uri``. (Where its
    model registry is: ``coaflow.registry.registry_uri``.)"""
    return tracking_uri or default_uri(workdir)


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_tag(pid: int | None = None) -> str:
    """``host:pid:start time`` of a process: names it uniquely on its machine (a pid alone is
    reused)."""
    import socket

    pid = pid or os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_time(pid) or ''}"


def process_alive(tag: str) -> bool:
    """Whether the process ``process_tag`` named still runs. One on another machine counts as
    gone: the stage folder it worked in is this process's now."""
    import socket

    parts = tag.rsplit(":", 2)
    if len(parts) != 3 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    return pid != os.getpid() and _start_time(pid) == parts[2]


class Tracker:
    """Thin wrapper over the MLflow fluent API; ``enabled=False`` makes every call a no-op."""

    def __init__(self, workdir: str | Path, uri: str | None = None, experiment: str = "coaflow",
                 enabled: bool = True):
        self.enabled = enabled
        self.workdir = Path(workdir)
        self.uri = store_uri(workdir, uri)
        self.experiment = redact(experiment)
        self._mlflow = None
        self._experiment_id: str | None = None

    @property
    def mlflow(self):
        """The mlflow module pointed at this tracker's store. The URI is set again on every use:
        MLflow keeps it process-wide, and several trackers (stages run by Airflow's local mode or
        KFP's local runner in one process) must not write into each other's stores. Runs are
        started with an explicit experiment id, never the process-wide "active experiment"."""
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        bounded_http()
        import mlflow

        user_uri = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(self.uri)
        # set_tracking_uri also writes $MLFLOW_TRACKING_URI, which the next stage's tracker
        # would take for the user's choice: put back what the user had
        if user_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = user_uri
        if self._mlflow is None:
            self.workdir.mkdir(parents=True, exist_ok=True)
            # MLflow logs every database error with its traceback and then raises it anyway:
            # the raised one is reported (``store_errors``), once, as one line
            logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
            try:
                with store_lock(self.uri, "init"), store_errors(self.uri):
                    self._experiment_id = self._get_or_create_experiment(mlflow)
            except CoaflowError:
                raise
            except Exception as e:  # an unreachable server: worth a retry, not a traceback
                if "sqlite" in self.uri or not _looks_unreachable(e):
                    raise
                raise ServiceUnavailable(f"MLflow tracking server {safe_url(self.uri)} did not answer: "
                                         f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                                         ) from None
            self._mlflow = mlflow
        return self._mlflow

    def _get_or_create_experiment(self, mlflow) -> str:
        """The experiment's id, creating it if needed. A SQLite store is opened (its tables
        made) and the experiment created under ``store_lock``. Why: MLflow creates a new SQLite
        store's tables (and runs its migrations) in whichever process opens it first, with no
        lock; two shards starting at once on a new workdir (KFP's ParallelFor, Airflow's
        ``.expand()``) both migrated it, and one died of "duplicate column name" or "table ...
        already exists" (3 of 3 tries). Against a server, a concurrent creation by another shard
        is an "already exists" answer, after which the experiment is read."""
        exp = mlflow.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.uri.startswith("sqlite:"):
            location = (self.workdir / "mlartifacts").resolve().as_uri()
        try:
            return mlflow.create_experiment(self.experiment, artifact_location=location)
        except Exception as e:
            exp = mlflow.get_experiment_by_name(self.experiment)
            if exp is None or "already exists" not in str(e).lower():
                raise
            return exp.experiment_id

    @property
    def experiment_id(self) -> str:
        self.mlflow  # noqa: B018 (creates the experiment on first use)
        return self._experiment_id

    @contextlib.contextmanager
    def _killable(self, **start_run) -> Iterator[Any]:
        """``mlflow.start_run`` whose run ends KILLED, not RUNNING or FAILED, when the process
        is interrupted or terminated (``Terminated``, from ``terminate_as_interrupt``)."""
        run_id = None
        try:
            with store_errors(self.uri), self.mlflow.start_run(**start_run) as run:
                run_id = run.info.run_id
                yield run
        except KeyboardInterrupt:
            if run_id is not None:
                with contextlib.suppress(Exception):
                    from mlflow import MlflowClient

                    MlflowClient(self.uri).set_terminated(run_id, "KILLED")
            raise

    @contextlib.contextmanager
    def pipeline_run(self, run_id: str, config: Mapping | None = None) -> Iterator[str | None]:
        """The parent run for pipeline run ``run_id``; reused when the run is resumed."""
        if not self.enabled:
            yield None
            return
        mlflow = self.mlflow
        found = mlflow.search_runs(experiment_ids=[self.experiment_id], filter_string=f"tags.`coaflow.run_id` = '{run_id}' and "
                                   "tags.`coaflow.kind` = 'pipeline'", output_format="list")
        kw = {"run_id": found[0].info.run_id} if found else {"run_name": run_id}
        kw["experiment_id"] = self.experiment_id
        with self._killable(**kw) as run:
            mlflow.set_tags({"coaflow.run_id": run_id, "coaflow.kind": "pipeline"})
            if config is not None and not found:
                self.log_params(config)
                self.log_dict(config, "config.json")
            yield run.info.run_id

    @contextlib.contextmanager
    def stage_run(self, stage: str, run_id: str, params: Mapping | None = None,
                  folder: str | None = None):
        """The stage's MLflow run. With ``folder`` (the stage folder), a run of the same folder
        left RUNNING by a process that no longer exists (SIGKILL, a lost node) is ended KILLED
        first: it can never end by itself."""
        if not self.enabled:
            yield None
            return
        mlflow = self.mlflow
        if folder is not None:
            self._close_stale(stage, folder)
        with self._killable(run_name=stage, nested=mlflow.active_run() is not None,
                            experiment_id=self.experiment_id) as run:
            mlflow.set_tags({"coaflow.run_id": run_id, "coaflow.kind": "stage",
                             "coaflow.stage": stage,
                             **({"coaflow.folder": folder, "coaflow.process": process_tag()}
                                if folder is not None else {})})
            if params:
                self.log_params(params)
            yield run.info.run_id

    def _close_stale(self, stage: str, folder: str) -> None:
        from mlflow import MlflowClient

        with store_errors(self.uri):
            runs = self.mlflow.search_runs(
                experiment_ids=[self.experiment_id], output_format="list",
                filter_string=f"tags.`coaflow.kind` = 'stage' and tags.`coaflow.stage` = "
                f"'{stage}' and attributes.status = 'RUNNING'")
            for r in runs:
                if r.data.tags.get("coaflow.folder") == folder and \
                        not process_alive(r.data.tags.get("coaflow.process", "")):
                    MlflowClient(self.uri).set_terminated(r.info.run_id, "KILLED")

    def cached_stage(self, stage: str, run_id: str, source: str, metrics: Mapping,
                     folder: str | None = None) -> None:
        """Record a cache hit: a stage run tagged ``coaflow.cached`` with the folder it came from
        and the cached metrics, so the run's page in MLflow lists every stage."""
        if not self.enabled:
            return
        with self.stage_run(stage, run_id, folder=folder):
            self.mlflow.set_tags({"coaflow.cached": "true", "coaflow.cached_from": source})
            self.log_metrics(metrics)

    def log_params(self, params: Mapping) -> None:
        if self.enabled:
            flat = flatten(redact(dict(params)))
            self.mlflow.log_params({k: str(v)[:6000] for k, v in flat.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.enabled:
            clean = {k: float(v) for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if clean:
                self.mlflow.log_metrics(clean, step=step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.enabled:
            self.mlflow.set_tags({k: str(v) for k, v in redact(dict(tags)).items()})

    def log_dict(self, data: Mapping, name: str) -> None:
        if self.enabled:
            self.mlflow.log_dict(redact(dict(data)), name)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled and Path(path).exists():
            if Path(path).is_dir():
                self.mlflow.log_artifacts(str(path), artifact_path)
            else:
                self.mlflow.log_artifact(str(path), artifact_path)

    def log_dataset(self, records: list[Mapping], name: str, source: str, context: str) -> None:
        """Log a dataset input (lineage): a small pandas frame of the records' summary columns,
        named and sourced so that the same data gets the same digest across runs."""
        if not self.enabled or not records:
            return
        import pandas as pd

        mlflow = self.mlflow
        frame = pd.DataFrame([{k: (json.dumps(v, default=str) if isinstance(v, (dict, list))
                                   else v) for k, v in r.items()} for r in records])
        with warnings.catch_warnings():  # source-type guessing and int-column hints: noise here
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(frame, source=source, name=name)
            mlflow.log_input(dataset, context=context)

    def log_text(self, text: str, name: str) -> None:
        if self.enabled:
            with tempfile.TemporaryDirectory() as d:
                p = Path(d) / name
                p.write_text(redact(text))
                self.mlflow.log_artifact(str(p))
