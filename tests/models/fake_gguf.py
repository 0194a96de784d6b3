"""A stand-in for reading the GGUF file: ``from_pretrained(..., gguf_file=...)`` gives the tiny
test model instead of dequantizing 135M parameters (~35 s), so ``sources.convert_gguf`` and
everything around it (the cache folder, its lock, the rename) run for real in a second.

    python -m tests.models.fake_gguf TINY_DIR START_AT SLOW_S   # prints resolve()'s folder

(the form two processes run at once: both wait until wall-clock ``START_AT``, and saving the
tokenizer takes ``SLOW_S`` more seconds, so that the two conversions overlap)."""

from __future__ import annotations

import sys
import time

NAME = "smollm2-135m-instruct"


def install(tiny_dir, slow_s: float = 0.0, monkeypatch=None) -> None:
    """Patch transformers' loaders; inside a test pass ``monkeypatch`` so that they are undone
    when it ends (left in place they made a later test convert the tiny model)."""
    import transformers

    real_tok = transformers.AutoTokenizer.from_pretrained
    real_model = transformers.AutoModelForCausalLM.from_pretrained

    def tokenizer(path, *a, gguf_file=None, **kw):
        if gguf_file is None:
            return real_tok(path, *a, **kw)
        tok = real_tok(str(tiny_dir))
        save = tok.save_pretrained

        def slow_save(*sa, **skw):
            out = save(*sa, **skw)
            time.sleep(slow_s)
            return out

        tok.save_pretrained = slow_save
        return tok

    def model(path, *a, gguf_file=None, **kw):
        return real_model(str(tiny_dir) if gguf_file is not None else path, *a, **kw)

    put = monkeypatch.setattr if monkeypatch is not None else setattr
    put(transformers.AutoTokenizer, "from_pretrained", tokenizer)
    put(transformers.AutoModelForCausalLM, "from_pretrained", model)


if __name__ == "__main__":
    tiny, start, slow = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    install(tiny, slow)
    from coaflow.models import sources

    time.sleep(max(0.0, start - time.time()))
    print("RESOLVED", sources.resolve(NAME))
