"""The tiny tokenizer keeps what the student copies whole and identical, and the SFT loss can weigh
the decisive tokens (tool-call arguments, the answer) above the prose around them."""

from __future__ import annotations

import pytest

from coaflow.models.prompt import render, to_example
from coaflow.models.tiny import ROLE_TAGS, train_tokenizer
from coaflow.stages.sft_data import decisive_mask, decisive_pairs

CORPUS = [
    'The capital of Renkorora is Vekmer. <answer>Vekmer</answer>\n{"query": "Renkorora"}'
    ' Some 71,929,706 people live in Renkorora. result = 19 * 641.65 * (1 - 30 / 100)',
    "Bram Vekmer was born in Dandri Falls in 1900. Who founded Varn Labs? Renkorora 1646",
] * 20


@pytest.fixture(scope="module")
def tokenizers():
    return {cf: train_tokenizer(CORPUS, 400, copy_friendly=cf) for cf in (False, True)}


def name_ids(tok, text: str, name: str) -> list[int]:
    """The ids of ``name`` where it occurs in ``text`` (located by character offsets)."""
    start = text.index(name)
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    return [i for i, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
            if s < start + len(name) and e > start]


def test_a_name_is_the_same_tokens_in_prose_and_in_a_json_argument(tokenizers):
    tok = tokenizers[True]
    in_prose = name_ids(tok, "The capital of Renkorora is Vekmer.", "Renkorora")
    in_json = name_ids(tok, '{"query": "Renkorora"}', "Renkorora")
    assert in_prose == in_json and len(in_prose) == 1
    # plain byte-level BPE: " Renkorora" and "Renkorora" are different tokens
    old = tokenizers[False]
    assert name_ids(old, "The capital of Renkorora is", "Renkorora") != \
        name_ids(old, '{"query": "Renkorora"}', "Renkorora")


def test_numbers_are_groups_of_three_digits_and_text_round_trips(tokenizers):
    """A number is cut into groups of three from the right, each group one token, whatever BPE
    learned: the same digits are the same tokens with or without separators."""
    import random

    tok = tokenizers[True]

    def pieces(text):
        return [tok.decode([i]) for i in tok(text, add_special_tokens=False)["input_ids"]]

    assert [p for p in pieces("Some 71,929,706 people; x = 641.65") if p.isdigit()] == \
        ["71", "929", "706", "641", "65"]
    assert pieces("71929706") == ["71", "929", "706"]
    assert pieces("1_078")[::2] == pieces("1,078")[::2] == ["1", "078"]
    rng = random.Random(0)
    for _ in range(500):  # groups never seen in the corpus too
        n = str(rng.randrange(10 ** rng.randint(1, 13)))
        k = len(n) % 3 or 3
        assert pieces(n) == [n[:k]] + [n[i:i + 3] for i in range(k, len(n), 3)], n
    for text in CORPUS[:2]:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    for tag in ROLE_TAGS:
        assert len(tok(tag, add_special_tokens=False)["input_ids"]) == 1, tag


def test_decisive_mask_covers_calls_and_answers_only(tiny_dir, trajectories):
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert len(decisive_pairs(tok)) == 2  # <tool_call> and <answer> are single tokens
    text = render(to_example(trajectories[0]), tok.chat_template)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    mask = decisive_mask(torch.tensor([ids]), decisive_pairs(tok))[0].tolist()
    kept = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert kept.count("<tool_call>") == text.count("<tool_call>") > 0
    # (the system prompt's "<answer>...</answer>" is covered too; it carries no label anyway)
    assert kept.count("<answer>") == text.count("<answer>") == 2
    assert "<tool_response>" not in kept
    assert "<plan>" not in kept and "<|im_start|>" not in kept


def test_decisive_weight_trains_and_logs_decisive_accuracy(tmp_path, tiny_dir, trajectories):
    from coaflow.stages import sft
    from tests.models.sft_fixtures import accepted_dir, make_ctx

    acc = accepted_dir(tmp_path / "accepted", trajectories)
    cfg, ctx = make_ctx(tmp_path, acc, [f"sft.model={tiny_dir}", "sft.batch_size=4",
                                        "sft.holdout=0", "sft.max_steps=3", "sft.logging_steps=1",
                                        "sft.decisive_weight=5", "sft.drop_recovered=true"])
    m = sft.run(cfg.sft, ctx).metrics
    assert 0.0 <= m["decisive_token_accuracy"] <= 1.0
    assert m["examples_dropped_recovered"] == sum(t.outcome.recovered for t in trajectories) > 0
    assert m["examples"] == len(trajectories) - m["examples_dropped_recovered"]
    assert m["train_loss_final"] < m["train_loss_initial"]
