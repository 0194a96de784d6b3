"""Profiles: one YAML file per use, one section per stage, every key checked.

``load_config("tiny")`` reads ``src/coaflow/configs/tiny.yaml``; any other argument is a path to a
YAML file. A profile may start with ``base: <profile>`` to inherit one and change a few keys.
``--set section.key=value`` overrides apply last; values are parsed as YAML (``2`` is an int,
``[a, b]`` a list, ``null`` None).

A misspelled key is an error that names the key and the file (or the ``--set`` it came from):

    tiny.yaml: sft.epochz: unknown key (known: epochs, lr, ...)
"""

from __future__ import annotations

import copy
import functools
import warnings
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from coaflow.section import ConfigError, Section

PROFILE_DIR = Path(__file__).parent / "configs"
# Section and ConfigError live in coaflow.section, below the stages this module loads
__all__ = ["PROFILE_DIR", "ConfigError", "Section", "config_model", "load_config", "read_profile"]


class RunSection(Section):
    name: str = Field("coaflow", min_length=1, max_length=100, pattern=r"^[^/:%\s][^/:%\n]*$",
                      description="pipeline name: MLflow experiment and registered-model prefix "
                      "(no '/', ':' or '%': the registry refuses them)")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed for data generation, sampling "
                      "and training (0 to 2**32-1: numpy's range)")
    workdir: str = Field("work", min_length=1, description="where runs, caches and the MLflow "
                         "store live (resolved to an absolute path when a run starts)")


class TrackingSection(Section):
    enabled: bool = Field(True, description="log to MLflow; off only for unit tests")
    uri: str | None = Field(
        None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else "
        "sqlite:///<workdir>/mlflow.db")
    experiment: str | None = Field(None, description="experiment name; default run.name")


def _stage_sections() -> dict[str, type[Section]]:
    """Config class of every registered stage, by stage name (imports light modules only)."""
    from coaflow.contract import ORDER, load_stage

    return {name: load_stage(name).Config for name in ORDER}


@functools.cache
def config_model() -> type[BaseModel]:
    """The top-level model: run + tracking + one section per stage."""
    from pydantic import create_model

    fields: dict[str, Any] = {
        "run": (RunSection, Field(default_factory=RunSection)),
        "tracking": (TrackingSection, Field(default_factory=TrackingSection)),
        "profile": (str, Field("custom", description="profile the config came from")),
    }
    for name, cls in _stage_sections().items():
        fields[name] = (cls, Field(default_factory=cls))
    with warnings.catch_warnings():
        # the "register" section shadows ABCMeta.register, a class method no config calls
        warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)
        return create_model("Config", __config__=ConfigDict(extra="forbid"), **fields)


def explain() -> str:
    """Every knob with its default and what it does, from the ``Config`` classes themselves: the
    reference a profile is written against (docs/config.md holds it; a test compares). A profile
    sets only what differs from these."""
    import json

    lines = ["# Every knob", "",
             "Generated from the stages' `Config` classes by `coaflow config --explain`; "
             "a test fails when this page and the code differ. A profile (`src/coaflow/configs/`) "
             "sets only what differs from these defaults; `coaflow config --profile P` prints "
             "the values a profile runs with.", ""]

    def rows(model: type[BaseModel], prefix: str) -> list[str]:
        out = []
        for key, field in model.model_fields.items():
            kind = field.annotation
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                out += rows(kind, f"{prefix}{key}.")
                continue
            default = field.get_default(call_default_factory=True)
            text = (field.description or "").replace("|", "\\|")
            out.append(f"| `{prefix}{key}` | `{json.dumps(default)}` | {text} |")
        return out

    for name, field in config_model().model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            lines += [f"## {name}", "", "| key | default | what it does |", "|---|---|---|",
                      *rows(field.annotation, f"{name}."), ""]
    return "\n".join(lines)


def profile_path(profile: str | Path) -> Path:
    p = Path(profile)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ConfigError(f"{p}: no such config file")
        return p
    candidate = PROFILE_DIR / f"{profile}.yaml"
    if not candidate.exists():
        known = ", ".join(sorted(x.stem for x in PROFILE_DIR.glob("*.yaml")))
        raise ConfigError(f"unknown profile {profile!r} (known: {known}; or pass a .yaml path)")
    return candidate


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' chain loops back on itself")
    if path.is_dir():
        raise ConfigError(f"{path}: a folder, not a config file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a profile is a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is not None and (not isinstance(base, str) or not base.strip()):
        raise ConfigError(f"{path}: base: expected a profile name or a .yaml path, got {base!r}")
    if base:
        parent = _read_yaml(profile_path(base), seen + (path.resolve(),))
        data = deep_merge(parent, data)
    return data


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_override(data: dict, override: str) -> None:
    """Apply ``a.b.c=value`` to a nested dict in place."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {override!r}: expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {override!r}: {part} is not a section")
    node[parts[-1]] = value


def _explain(err: ValidationError, source: str, model: type[BaseModel]) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            known = _known_keys(model, e["loc"][:-1])
            lines.append(f"{source}: {loc}: unknown key" + (f" (known: {known})" if known else ""))
        else:
            lines.append(f"{source}: {loc}: {e['msg']}")
    return "\n".join(lines)


def _known_keys(model: type[BaseModel], loc: tuple) -> str:
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type):
            return ""
        model = field.annotation
    return ", ".join(model.model_fields) if hasattr(model, "model_fields") else ""


def read_profile(profile: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """A profile's YAML with ``overrides`` applied, not validated: no stage module is imported
    (a DAG file reads its graph's shape this way each time Airflow parses it)."""
    data = _read_yaml(profile_path(profile))
    for ov in overrides:
        apply_override(data, ov)
    return data


def load_config(profile: str | Path = "default", overrides: list[str] | tuple[str, ...] = ()):
    """Read a profile, apply overrides, validate. Raises ConfigError with a readable message."""
    path = profile_path(profile)
    data = _read_yaml(path)
    data.setdefault("profile", path.stem)
    model = config_model()
    try:
        model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_explain(e, str(path), model)) from None
    for ov in overrides:
        apply_override(data, ov)
        try:
            model.model_validate(data)
        except ValidationError as e:
            raise ConfigError(_explain(e, f"--set {ov}", model)) from None
    return model.model_validate(data)
