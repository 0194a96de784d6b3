"""Content filters: correctness modes, tool-use sanity, exact and near duplicates,
decontamination."""

from __future__ import annotations

import json

import numpy as np
import pytest

from coaflow import envs
from coaflow.gates import filters as f
from coaflow.gates.validators import answer_text
from coaflow.schema import ApiAction, TextObservation
from tests.gates.factory import calc, kbqa


def codes(problems):
    return [c for c, _ in problems]


def test_correctness_uses_the_suite_verifier():
    good, bad = kbqa(1), kbqa(1, correct=False)
    assert f.check_correct(good, answer_text(good), "correct") == []
    problems = f.check_correct(bad, answer_text(bad), "correct")
    assert codes(problems) == ["incorrect"] and "does not match reference" in problems[0][1]
    c = calc(2)
    # calc compares numbers: "1,234" style formatting is still correct.
    assert f.check_correct(c, f"{int(c.task.answer):,}", "correct") == []
    assert f.check_correct(c, str(int(c.task.answer) + 1), "correct") != []


def test_correct_or_recovered_also_keeps_recovered_runs():
    t = kbqa(1, correct=False, recovered=True)
    assert codes(f.check_correct(t, answer_text(t), "correct")) == ["incorrect"]
    assert f.check_correct(t, answer_text(t), "correct_or_recovered") == []
    plain_wrong = kbqa(1, correct=False)
    assert codes(f.check_correct(plain_wrong, answer_text(plain_wrong),
                                 "correct_or_recovered")) == ["incorrect"]
    assert f.check_correct(plain_wrong, answer_text(plain_wrong), "off") == []


def test_without_a_reference_outcome_correct_decides():
    t = kbqa(1)
    t.task.answer = None
    assert f.check_correct(t, "x", "correct") == []  # outcome.correct is True
    t.outcome.correct = None
    assert codes(f.check_correct(t, "x", "correct")) == ["incorrect"]


def test_runs_of_identical_calls():
    t = kbqa(1)
    call, obs = t.content[2], t.content[3]
    extra = []
    for k in range(2):
        extra += [call.model_copy(update={"tool_call_id": f"r{k}"}),
                  obs.model_copy(update={"tool_call_id": f"r{k}"})]
    t.content[4:4] = extra  # the same search three times in a row
    assert codes(f.check_tool_use(t, 2)) == ["repeated_calls"]
    assert f.check_tool_use(t, 3) == []


def test_different_arguments_are_not_a_repeat():
    t = kbqa(1)
    for k in range(4):
        t.content[4:4] = [ApiAction(agent="searcher", function="search",
                                    kwargs={"query": f"q{k}"}, tool_call_id=f"d{k}"),
                          TextObservation(content="hit", tool_call_id=f"d{k}")]
    assert f.check_tool_use(t, 1) == []


def test_empty_observation():
    t = calc(1)
    t.content[3] = t.content[3].model_copy(update={"content": "  \n"})
    problems = f.check_tool_use(t, 2)
    assert codes(problems) == ["empty_observation"] and "'p1'" in problems[0][1]


def test_signatures_match_datasketch_minhash():
    """The batched numpy MinHash is datasketch's affine32 MinHash of the same shingle hashes."""
    import zlib

    from datasketch import MinHash

    perms = f.permutations(64)
    texts = [f.dedup_text(kbqa(i)) for i in range(5)] + ["two words", ""]
    _, sigs = f.signatures(texts, 5, perms)
    for text, sig in zip(texts, sigs, strict=True):
        toks = f.words(text) or [""]
        wh = [zlib.crc32(t.encode()) for t in toks]
        k = min(5, len(wh))
        hashes = []
        for i in range(len(wh) - k + 1):
            h = wh[i]
            for j in range(1, k):
                h = (h * 0x01000193 + wh[i + j]) & 0xFFFFFFFF
            hashes.append(h)
        m = MinHash(num_perm=64, seed=1, hashfunc=lambda x: x)
        m.update_batch(hashes)
        assert np.array_equal(m.hashvalues, sig)


def _dedup(texts, **kw):
    d = f.Deduper(**kw)
    digests, sigs = f.signatures(texts, 5, f.permutations(64))
    return [d.check(f"t{i}", dg, s) for i, (dg, s) in enumerate(zip(digests, sigs, strict=True))]


def test_exact_duplicates_ignore_case_spacing_and_punctuation():
    text = f.dedup_text(kbqa(1))
    out = _dedup([text, text.upper().replace(" ", "  ") + " !"])
    assert out[0] == [] and out[1] == [("duplicate", "same text as t0")]


def test_near_duplicates_are_caught_and_distinct_runs_are_kept():
    base = f.dedup_text(kbqa(1))
    words = base.split(" ")
    near = " ".join(words[:-1] + ["Velorian"])  # one word changed at the end
    others = [f.dedup_text(kbqa(i)) for i in range(2, 40)] + [f.dedup_text(calc(i))
                                                             for i in range(2, 40)]
    out = _dedup([base, near] + others)
    assert out[0] == []
    assert codes(out[1]) == ["near_duplicate"] and "t0" in out[1][0][1]
    assert all(o == [] for o in out[2:])
    # Without the near-duplicate index, only exact copies go.
    assert _dedup([base, near], near=False) == [[], []]


def test_decontamination_catches_copies_of_test_questions():
    test = envs.make_tasks("kbqa", "test", 50, 0)
    d = f.Decontaminator([t.question for t in test], n=8, threshold=0.8)
    for t in test[:20]:  # verbatim, re-cased, or inside a longer prompt
        q = t.question
        assert codes(d.check(q)) == ["contaminated"]
        assert codes(d.check(q.upper().replace("?", " ?"))) == ["contaminated"]
        assert codes(d.check(f"Question: {q} Answer in one word.")) == ["contaminated"], q
    assert d.check("Who founded the Varn Institute in the year of the great flood?") == []


def test_decontamination_keeps_other_questions_of_the_same_template():
    """Train and test are disjoint in the envs; templated questions that differ only in the
    entity or number are not contamination (at most a handful of false positives)."""
    for suite in ("kbqa", "calc"):
        d = f.Decontaminator([t.question for t in envs.make_tasks(suite, "test", 200, 0)])
        train = envs.make_tasks(suite, "train", 300, 0)
        flagged = sum(bool(d.check(t.question)) for t in train)
        assert flagged <= 3, (suite, flagged)


def test_short_questions_match_whole():
    d = f.Decontaminator(["What is 2+2?"], n=8)
    assert codes(d.check("what is 2 + 2")) == ["contaminated"]
    assert codes(d.check("Quick one: what is 2+2, please?")) == ["contaminated"]
    assert d.check("What is 2+3?") == [] and d.check("So what is 22?") == []


def test_test_questions_from_a_file(tmp_path):
    p = tmp_path / "test.jsonl"
    p.write_text("\n".join(json.dumps({"question": q}) for q in ["Q one here", "Q two"]) + "\n")
    assert f.load_test_questions(str(p)) == ["Q one here", "Q two"]
    p.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="test.jsonl:1: question: missing"):
        f.load_test_questions(str(p))
