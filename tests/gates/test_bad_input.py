"""Bad input never crashes the gate: every bad line lands in quarantine with its file, line and
reason; an empty input fails with a clear message."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from coaflow.gates.core import GateError, gate
from coaflow.schema.io import write_jsonl
from coaflow.stages.gate import Config
from tests.gates.factory import batch, dump, kbqa

# mostly bad batches on purpose: the accepted-fraction rule (which holds with expectations off)
# would refuse them before the quarantine is looked at
FAST = {"expectations": False, "decontam_test_tasks": 0, "min_accepted_fraction": 0}


def quarantine(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]


def by_line(records, source_suffix):
    return {r["line"]: r for r in records if r["source"].endswith(source_suffix)}


def good_lines(n: int, start: int = 0) -> list[str]:
    return [t.model_dump_json() for t in batch(n + start)[start:]]


def test_each_kind_of_bad_line_is_quarantined_with_its_line_and_reason(tmp_path):
    wrong_type = dump(kbqa(100))
    wrong_type["content"][2]["kwargs"] = "not a dict"
    missing = dump(kbqa(101))
    del missing["task"]["question"]
    lines = [
        good_lines(1)[0].encode(),                                   # 1 good
        good_lines(1, 1)[0][:150].encode(),                          # 2 truncated
        json.dumps(wrong_type).encode(),                             # 3 wrong type
        json.dumps(missing).encode(),                                # 4 missing field
        b'{"id": "bad-utf8", "x": "\xff\xfe"}',                      # 5 invalid UTF-8
        b"[1, 2, 3]",                                                # 6 not an object
        b"",                                                         # 7 blank: skipped
        good_lines(1, 2)[0].encode(),                                # 8 good
    ]
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    report = gate(src, tmp_path / "out", Config(**FAST))
    q = by_line(quarantine(tmp_path / "out"), "in.jsonl")
    assert sorted(q) == [2, 3, 4, 5, 6]
    assert q[2]["reasons"] == ["invalid_json"] and "column" in q[2]["details"][0]
    assert q[3]["reasons"] == ["schema"] and "content.2.kwargs" in q[3]["details"][0]
    assert q[3]["id"] == "kbqa-0-100"  # the id is known even when the record is not valid
    assert q[4]["reasons"] == ["schema"] and "task.question" in q[4]["details"][0]
    assert q[5]["reasons"] == ["invalid_utf8"]
    assert q[6]["reasons"] == ["schema"]
    assert report["in"] == 7 and report["accepted"] == 2
    assert report["reasons"] == {"invalid_json": 1, "schema": 3, "invalid_utf8": 1}


def test_a_50_mb_line_is_quarantined_as_too_long(tmp_path):
    huge = dump(kbqa(7))
    huge["content"][3]["content"] = "x" * (50 * 1024 * 1024)
    src = tmp_path / "huge.jsonl"
    src.write_text(json.dumps(huge) + "\n" + good_lines(1)[0] + "\n")
    report = gate(src, tmp_path / "out", Config(**FAST))
    q = quarantine(tmp_path / "out")
    assert [(r["line"], r["reasons"]) for r in q] == [(1, ["too_long"])]
    assert report["accepted"] == 1
    assert (tmp_path / "out" / "quarantine.jsonl").stat().st_size < 10_000  # no copy of the text


def test_a_50_mb_garbage_line_is_invalid_json(tmp_path):
    src = tmp_path / "junk.jsonl"
    src.write_bytes(b'{"id": "' + b"y" * (50 * 1024 * 1024) + b"\n" + good_lines(1)[0].encode())
    gate(src, tmp_path / "out", Config(**FAST))
    assert [(r["line"], r["reasons"]) for r in quarantine(tmp_path / "out")] == \
        [(1, ["invalid_json"])]


def _corrupt_gzip(path: Path, lines: list[str]) -> None:
    """A .jsonl.gz whose deflate stream is broken (zlib.error, not just a bad CRC)."""
    data = bytearray(gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0))
    data[12] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_folder_of_mixed_files(tmp_path):
    src = tmp_path / "mixed"
    (src / "nested").mkdir(parents=True)
    write_jsonl(src / "a.jsonl", batch(6))
    write_jsonl(src / "b.jsonl.gz", batch(8)[6:])
    (src / "nested" / "c.ndjson").write_text(good_lines(2, 8)[0] + "\n" + "{oops\n")
    (src / "empty.jsonl").write_text("")
    _corrupt_gzip(src / "corrupt.jsonl.gz", good_lines(3, 20))
    truncated = gzip.compress(("\n".join(good_lines(3, 30)) + "\n").encode())
    (src / "truncated.jsonl.gz").write_bytes(truncated[: len(truncated) // 2])
    (src / "notes.txt").write_text("not a shard")
    (src / "table.parquet").write_bytes(b"PAR1\x00")
    (src / "model.bin.gz").write_bytes(gzip.compress(b"\x00\x01"))
    report = gate(src, tmp_path / "out", Config(**{**FAST, "min_accepted_fraction": 0.1}))
    q = quarantine(tmp_path / "out")
    assert {Path(r["source"]).name for r in q} == {"c.ndjson", "corrupt.jsonl.gz",
                                                     "truncated.jsonl.gz"}
    assert by_line(q, "c.ndjson")[2]["reasons"] == ["invalid_json"]
    assert all(r["reasons"] == ["unreadable"] for r in q if ".gz" in r["source"])
    assert "while decompressing data" in by_line(q, "corrupt.jsonl.gz")[1]["details"][0]
    assert report["accepted"] == 9  # 6 + 2 + 1; the gz files lost whatever could not be read
    assert sorted(Path(p).name for p in report["skipped_files"]) == ["model.bin.gz",
                                                                    "notes.txt", "table.parquet"]
    accepted = list((tmp_path / "out" / "accepted").glob("*.jsonl"))
    assert sum(len(p.read_text().splitlines()) for p in accepted) == 9


def test_empty_input_fails_with_a_clear_message(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(GateError, match=r"no trajectories in .*empty.jsonl.*empty input"):
        gate(tmp_path / "empty.jsonl", tmp_path / "out", Config(**FAST))
    assert not (tmp_path / "out" / "accepted").exists()
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "readme.md").write_text("# no shards here")
    with pytest.raises(GateError, match=r"0 shard file\(s\); ignored 1 other file\(s\)"):
        gate(folder, tmp_path / "out2", Config(**FAST))


def test_a_missing_input_is_a_clear_error(tmp_path):
    from coaflow.schema.io import DataError

    with pytest.raises(DataError, match="no such file or folder"):
        gate(tmp_path / "nope.jsonl", tmp_path / "out", Config(**FAST))


def test_parallel_workers_give_the_same_result(tmp_path):
    """Shards checked in two processes: same counts, same quarantine, same accepted order."""
    src = tmp_path / "in"
    runs = batch(30, wrong_every=5)
    for k in range(3):
        write_jsonl(src / f"part-{k}.jsonl", runs[k * 10:(k + 1) * 10] + runs[:2])  # + copies
    one = gate(src, tmp_path / "one", Config(**FAST, workers=1))
    two = gate(src, tmp_path / "two", Config(**FAST, workers=2))
    assert (one["in"], one["accepted"], one["reasons"]) == (two["in"], two["accepted"],
                                                            two["reasons"])
    assert one["reasons"]["duplicate"] == 6  # runs 0 and 1, again at the end of each file
    for name in ("quarantine.jsonl", "accepted/accepted-00000.jsonl"):
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "two" / name).read_text()


def test_token_length_gate_with_a_real_tokenizer(tmp_path):
    from tests.gates.test_validators import _chat_tokenizer

    src = tmp_path / "in.jsonl"
    write_jsonl(src, batch(4))
    tok = _chat_tokenizer(tmp_path / "tok")
    report = gate(src, tmp_path / "a", Config(**FAST, tokenizer=tok, max_tokens=10_000))
    assert report["accepted"] == 4
    report = gate(src, tmp_path / "b", Config(**FAST, tokenizer=tok, max_tokens=30))
    assert report["accepted"] == 0 and report["reasons"] == {"too_long": 4}
    assert "tokens > max_tokens 30" in (tmp_path / "b" / "quarantine.jsonl").read_text()


def test_decontamination_against_a_file_of_test_questions(tmp_path):
    runs = batch(6)
    write_jsonl(tmp_path / "in.jsonl", runs)
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": runs[2].task.question}) + "\n")
    report = gate(tmp_path / "in.jsonl", tmp_path / "out",
                  Config(**{**FAST, "decontam_file": str(tmp_path / "test.jsonl")}))
    assert report["reasons"] == {"contaminated": 1}
    assert quarantine(tmp_path / "out")[0]["id"] == runs[2].id
    (tmp_path / "bad.jsonl").write_text('{"prompt": 1}\n')
    with pytest.raises(GateError, match=r"gate.decontam_file: .*bad.jsonl:1: question"):
        gate(tmp_path / "in.jsonl", tmp_path / "out2",
             Config(**{**FAST, "decontam_file": str(tmp_path / "bad.jsonl")}))
