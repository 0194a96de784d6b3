"""Load the student: a hub id or a local folder as is, or ``tiny`` built from a config.

Every way this can fail because of the user (a path that does not exist, a folder that is not a
model, a hub id that cannot be fetched, a tokenizer without a chat template) becomes one
``PipelineError`` naming the path, before any training starts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from coaflow.pipeline import PipelineError

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
        raise PipelineError(f"{field}: cannot load a tokenizer from {name_or_path!r}: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not getattr(tok, "chat_template", None):
        raise PipelineError(f"{field}: the tokenizer of {name_or_path!r} has no chat template; "
                            "agentic SFT renders trajectories with it (use an instruct/chat model, "
                            "or add chat_template.jinja to the folder)")
    return tok


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
        raise PipelineError(f"{field}: cannot load a causal LM from {path!r}: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return model, tokenizer, path
