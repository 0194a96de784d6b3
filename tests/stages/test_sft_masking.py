"""Observation masking on the exact training data path: the SFTTrainer the stage builds, its
prepared dataset and its collator. Every tool-observation, system and user token has label -100;
every assistant token, each turn's <|im_end|> included, is trained."""

from __future__ import annotations

import re

import pytest

from coaflow.models.prompt import to_example  # noqa: E402
from coaflow.stages import sft  # noqa: E402
from tests.models import sft_fixtures as fx

tiny_dir, trajectories = fx.tiny_dir, fx.trajectories  # shared fixtures

ASSISTANT_RE = re.compile(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>\n)", re.S)
OBSERVATION_RE = re.compile(r"<tool_response>.*?</tool_response>", re.S)


def regions(text: str):
    """Character spans of assistant output (trained) and tool observations (never trained),
    found from the rendered text alone, independent of the template's generation markers."""
    return ([m.span(1) for m in ASSISTANT_RE.finditer(text)],
            [m.span() for m in OBSERVATION_RE.finditer(text)])


def inside(span, spans):
    return any(a <= span[0] and span[1] <= b for a, b in spans)


def build(tmp_path, tiny_dir, trajs, **overrides):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = sft.Config(model=str(tiny_dir), max_length=2048, batch_size=2, **overrides)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    examples = [to_example(t) for t in trajs]
    trainer, _ = sft.build_trainer(cfg, model, tok, examples, tmp_path / "ckpt")
    return trainer, tok, examples


def test_observations_masked_assistant_turns_trained(tmp_path, tiny_dir, trajectories):
    # kbqa (search/open_page, a recovery), calc (python): every observation kind is in the batch
    trajs = [t for t in trajectories if t.task.suite == "kbqa"][:2] + \
        [t for t in trajectories if t.task.suite == "calc"][:1]
    assert any(t.outcome.recovered for t in trajectories)
    trainer, tok, examples = build(tmp_path, tiny_dir, trajs, packing=False)
    # The batch exactly as training sees it: the trainer's dataloader (its collator, padding).
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 2
    by_first_ids = {tuple(r["input_ids"][:400]): r for r in trainer.train_dataset}
    checked_obs = checked_asst = 0
    for ids, labels, attn in zip(batch["input_ids"].tolist(), batch["labels"].tolist(),
                                 batch["attention_mask"].tolist(), strict=True):
        n = sum(attn)  # right padding: pad positions carry no label
        assert all(lab == -100 for lab in labels[n:])
        ids, labels = ids[:n], labels[:n]
        assert tuple(ids[:400]) in by_first_ids  # it is one of the prepared examples
        text = tok.decode(ids, skip_special_tokens=False)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        assert enc["input_ids"] == ids  # offsets align with the trained ids
        asst, obs = regions(text)
        assert asst and obs
        end_id = tok.convert_tokens_to_ids("<|im_end|>")
        for tid, lab, span in zip(ids, labels, enc["offset_mapping"], strict=True):
            if inside(span, obs):
                assert lab == -100, f"observation token {tok.decode([tid])!r} is trained"
                checked_obs += 1
            elif inside(span, asst):
                assert lab == tid, f"assistant token {tok.decode([tid])!r} is masked"
                checked_asst += 1
            else:  # system, user question, role headers
                assert lab == -100, f"prompt token {tok.decode([tid])!r} is trained"
        # one trained <|im_end|> per assistant turn: the model learns to stop every turn
        trained_ends = sum(1 for tid, lab in zip(ids, labels, strict=True) if tid == end_id and lab == tid)
        assert trained_ends == len(asst)
    assert checked_obs > 50 and checked_asst > 50


def test_every_prepared_example_masks_tool_messages(tmp_path, tiny_dir, trajectories):
    trainer, tok, examples = build(tmp_path, tiny_dir, trajectories[:12], packing=False)
    assert len(trainer.train_dataset) == 12
    for row in trainer.train_dataset:
        text = tok.decode(row["input_ids"], skip_special_tokens=False)
        asst, obs = regions(text)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        for tid, lab, span in zip(row["input_ids"], row["labels"], enc["offset_mapping"], strict=True):
            assert (lab == tid) == inside(span, asst)
            if inside(span, obs):
                assert lab == -100


@pytest.mark.parametrize("packing", [True])
def test_packing_keeps_the_same_trained_tokens(tmp_path, tiny_dir, trajectories, packing):
    plain, _, _ = build(tmp_path / "a", tiny_dir, trajectories[:10], packing=False)
    packed, _, _ = build(tmp_path / "b", tiny_dir, trajectories[:10], packing=packing)
    assert len(packed.train_dataset) < len(plain.train_dataset)

    def trained(ds):
        return sorted(lab for row in ds for lab in row["labels"] if lab != -100)

    assert trained(packed.train_dataset) == trained(plain.train_dataset)
