"""The Great Expectations batch gate: thresholds from the config, Data Docs on disk, and a failed
expectation that stops the batch and names itself."""

from __future__ import annotations

import json

import pytest

from coaflow.gates.core import GateError, gate
from coaflow.schema.io import write_jsonl
from coaflow.stages.gate import Config
from tests.gates.factory import batch, calc, kbqa


@pytest.fixture(scope="module")
def good_batch(tmp_path_factory):
    src = tmp_path_factory.mktemp("gx") / "in.jsonl"
    write_jsonl(src, batch(40, wrong_every=4))
    return src


def test_a_good_batch_passes_and_writes_data_docs(good_batch, tmp_path):
    report = gate(good_batch, tmp_path, Config(decontam_test_tasks=20))
    assert report["in"] == 40 and report["accepted"] == 30
    assert report["reasons"] == {"incorrect": 10}
    names = {r["name"]: r["success"] for r in report["expectations"]}
    assert all(names.values()) and {"min_accepted_fraction", "max_duplicate_fraction",
                                    "min_rows_per_suite", "turns", "tool_calls",
                                    "unique_ids"} <= set(names)
    docs = tmp_path / "data_docs"
    assert report["data_docs"] == str(docs / "index.html")
    pages = {p.relative_to(docs).parts[0] for p in docs.rglob("*.html")}
    assert pages == {"index.html", "expectations", "validations"}
    runs = list((docs / "validations").rglob("*.html"))
    assert {p.parts[len(docs.parts) + 1] for p in runs} == {"gate_trajectories", "gate_suites"}
    assert "accepted" in runs[0].read_text(errors="ignore")
    saved = json.loads((tmp_path / "gate_report.json").read_text())
    assert saved["accepted_dir"] == str(tmp_path / "accepted")


def _fails(src, tmp_path, **cfg) -> str:
    with pytest.raises(GateError) as err:
        gate(src, tmp_path, Config(**cfg))
    assert not (tmp_path / "accepted").exists()  # a failed batch never looks accepted
    assert (tmp_path / "accepted.partial").exists()
    assert (tmp_path / "quarantine.jsonl").exists() and (tmp_path / "data_docs").exists()
    return str(err.value)


def test_too_few_accepted_fails_naming_the_threshold(good_batch, tmp_path):
    msg = _fails(good_batch, tmp_path, min_accepted_fraction=0.9)
    assert "1 expectation(s) failed" in msg
    assert "min_accepted_fraction (expect_column_mean_to_be_between on trajectories.accepted, " \
           "min 0.9): observed 0.75" in msg


def test_too_many_duplicates_fails(tmp_path):
    src = tmp_path / "dups.jsonl"
    runs = batch(10)
    write_jsonl(src, runs + runs[:5] + runs[:5])
    msg = _fails(src, tmp_path / "out", max_duplicate_fraction=0.2, min_accepted_fraction=0.1)
    assert "max_duplicate_fraction" in msg and "observed 0.5" in msg


def test_a_suite_with_too_few_rows_fails_naming_the_suite(tmp_path):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, [kbqa(i) for i in range(6)] + [calc(i, correct=False) for i in range(3)])
    msg = _fails(src, tmp_path / "out", min_rows_per_suite=2, min_accepted_fraction=0.1)
    assert "min_rows_per_suite" in msg and "'suites': ['calc']" in msg


def test_required_suites(good_batch, tmp_path):
    msg = _fails(good_batch, tmp_path, required_suites=["kbqa", "web"])
    assert "required_suites" in msg and "web" in msg


def test_turn_and_tool_call_bounds(good_batch, tmp_path):
    msg = _fails(good_batch, tmp_path, max_turns=2, max_tool_calls=1)  # kbqa: 3 turns, 2 calls
    assert "turns (expect_column_values_to_be_between on trajectories.turns" in msg
    assert "tool_calls (expect_column_values_to_be_between" in msg
    # ``bounds_mostly`` lets some runs out of bounds through: 10 of the 30 are calc (1 call).
    report = gate(good_batch, tmp_path / "ok", Config(max_tool_calls=1, bounds_mostly=0.3))
    assert report["accepted"] == 30


def test_a_teacher_that_stopped_using_tools(tmp_path):
    runs = []
    for i in range(6):
        t = kbqa(i)
        t.content = [s for s in t.content if s.class_ in ("message_action",)
                     or getattr(s, "source", "") == "user"]
        runs.append(t)
    write_jsonl(tmp_path / "in.jsonl", runs)
    msg = _fails(tmp_path / "in.jsonl", tmp_path / "out", min_mean_tool_calls=0.5)
    assert "min_mean_tool_calls" in msg and "observed 0.0" in msg
