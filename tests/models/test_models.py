"""The tiny model builder, loading of real folders and its errors, tool-call parsing."""

from __future__ import annotations

import json
import shutil

import pytest

from coaflow.contract import PipelineError
from coaflow.models import load_model_and_tokenizer
from coaflow.models.prompt import to_example
from coaflow.models.tiny import SPECIAL_TOKENS
from coaflow.schema.markup import parse_tool_calls, well_formed_tool_call


def test_tiny_folder_loads_with_auto_classes(tiny_dir, trajectories):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert model.config.model_type == "qwen3"
    assert model.config.vocab_size == len(tok)
    from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

    assert has_generation_markers(tok.chat_template)
    assert is_chat_template_stop_token_trained(tok)  # TRL's own check: <|im_end|> is trained
    for t in SPECIAL_TOKENS:  # each control/tag token is one id, not spelled out in bytes
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, t
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    # The rendered trajectory survives tokenize -> decode byte for byte (byte-level BPE).
    text = tok.apply_chat_template(to_example(trajectories[0])["messages"], tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert '<tool_call>\n{"name": "' in text and "<tool_response>" in text


def test_generation_prompt_and_tool_calls_render_like_qwen3(tiny_dir, trajectories):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ex = to_example(trajectories[0])
    prompt = tok.apply_chat_template(ex["messages"][:2], tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    full = tok.apply_chat_template(ex["messages"], tokenize=False)
    first_turn = full[len(prompt):].split("<|im_end|>")[0]
    calls = parse_tool_calls(first_turn)
    assert calls and all("error" not in c for c in calls)
    assert calls[0]["name"] in {"search", "open_page", "python"}


def test_tiny_is_reused_not_rebuilt(tmp_path, trajectories):
    from coaflow.models import CHAT_TEMPLATE, TinyModel
    from coaflow.models.prompt import render
    from tests.models.sft_fixtures import TINY_TEST_SIZES

    corpus = [render(to_example(t), CHAT_TEMPLATE) for t in trajectories[:10]]
    _, _, path = load_model_and_tokenizer("tiny", corpus=corpus, out_dir=tmp_path / "b",
                                          tiny=TinyModel(**TINY_TEST_SIZES))
    stamp = (tmp_path / "b" / "model.safetensors").stat().st_mtime_ns
    # same sizes: reused (other sizes rebuild: tests/test_contract.py)
    load_model_and_tokenizer("tiny", corpus=[], out_dir=tmp_path / "b",
                             tiny=TinyModel(**TINY_TEST_SIZES))
    assert (tmp_path / "b" / "model.safetensors").stat().st_mtime_ns == stamp


def test_missing_model_folder_is_one_clear_error(tmp_path):
    with pytest.raises(PipelineError, match=r"sft.model: no such model folder: .*nope"):
        load_model_and_tokenizer(str(tmp_path / "nope"))


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(PipelineError, match="not a Hugging Face model folder"):
        load_model_and_tokenizer(str(tmp_path / "m"))


def test_unreadable_weights(tmp_path, tiny_dir):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    (bad / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(PipelineError, match=r"cannot load a causal LM from .*bad"):
        load_model_and_tokenizer(str(bad))


def test_tokenizer_without_chat_template(tmp_path, tiny_dir):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_dir, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    conf = json.loads((bare / "tokenizer_config.json").read_text())
    conf.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(conf))
    with pytest.raises(PipelineError, match=r"tokenizer of .*bare.* has no chat template"):
        load_model_and_tokenizer(str(bare))


@pytest.mark.parametrize("text,tools,ok", [
    ('<think>x</think>\n<tool_call>\n{"name": "search", "arguments": {"query": "a b"}}\n'
     '</tool_call>', ["search"], True),
    ('<tool_call>{"name": "search", "arguments": {"query": "a"}}</tool_call>\n'
     '<tool_call>{"name": "open_page", "arguments": {"url": "wiki/x"}}</tool_call>',
     ["search", "open_page"], True),
    ('<tool_call>{"name": "search", "arguments": "query"}</tool_call>', ["search"], False),
    ('<tool_call>{"arguments": {}}</tool_call>', ["search"], False),
    ('<tool_call>{"name": "search", "arguments": {}}', ["search"], False),
    ("<answer>Paris</answer>", ["search"], False),
])
def test_well_formed_tool_call(text, tools, ok):
    assert well_formed_tool_call(text, tools) is ok


def test_an_unreachable_hub_is_retryable_and_a_bad_id_is_not():
    from coaflow.errors import EXIT_RETRY, EXIT_USER, exit_code
    from coaflow.models.loading import _load_error

    offline = OSError("We couldn't connect to 'https://huggingface.co' to load the files")
    missing = OSError("Qwen/Nope is not a local folder and is not a valid model identifier")
    assert exit_code(_load_error("sft.model", "a tokenizer", "Qwen/X", offline)) == EXIT_RETRY
    err = _load_error("sft.model", "a tokenizer", "Qwen/Nope", missing)
    assert exit_code(err) == EXIT_USER and str(err).startswith("sft.model: cannot load")
