import gzip
import json

import pandas as pd
import pytest

from coaflow.envs.external import load_tasks
from coaflow.schema.io import DataError


def test_jsonl(tmp_path):
    p = tmp_path / "hotpot.jsonl"
    p.write_text(json.dumps({"question": "Q1?", "answer": "A1"}) + "\n\n"
                 + json.dumps({"question": "Q2?", "answer": ["A2", "a two"], "id": "x2",
                               "level": "hard"}) + "\n")
    tasks = load_tasks(p)
    assert [t.question for t in tasks] == ["Q1?", "Q2?"]
    assert tasks[0].suite == "hotpot" and tasks[1].answer == ["A2", "a two"]
    assert tasks[1].task_id == "x2" and tasks[1].metadata["level"] == "hard"
    gz = tmp_path / "g.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write(json.dumps({"question": "Q", "answer": 7}) + "\n")
    assert load_tasks(gz, suite="s")[0].answer == "7"


@pytest.mark.parametrize("line, field", [
    ({"question": "Q"}, "answer"), ({"answer": "A"}, "question"),
    ({"question": "", "answer": "A"}, "question"), ({"question": "Q", "answer": None}, "answer")])
def test_jsonl_errors_name_file_line_field(tmp_path, line, field):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"question": "ok", "answer": "ok"}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(DataError) as e:
        load_tasks(p)
    assert e.value.line == 2 and e.value.field == field and str(p) in str(e.value)


def test_jsonl_invalid_json(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text("{nope\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: invalid JSON"):
        load_tasks(p)


def _afm_row(q="Who wrote X?", target=("Ann",), source="afm_web"):
    return {"data_source": source,
            "prompt": [{"role": "system", "content": "sys"}, {"role": "user", "content": q}],
            "ability": "qa",
            "reward_model": {"style": "rule", "ground_truth": json.dumps({"target": list(target)})},
            "extra_info": {"index": 3, "split": "train"}}


def test_afm_parquet(tmp_path):
    p = tmp_path / "afm.parquet"
    pd.DataFrame([_afm_row(), _afm_row("Q2?", ("b", "B2"))]).to_parquet(p)
    tasks = load_tasks(p, split="rl")
    assert tasks[0].question == "Who wrote X?" and tasks[0].answer == ["Ann"]
    assert tasks[1].answer == ["b", "B2"] and tasks[0].suite == "afm_web"
    assert tasks[0].split == "rl" and tasks[0].metadata["extra_info"]["index"] == 3


@pytest.mark.parametrize("mutate, field", [
    (lambda r: r.update(reward_model={"style": "rule", "ground_truth": json.dumps({"x": 1})}),
     "reward_model.ground_truth.target"),
    (lambda r: r.update(reward_model={"style": "rule", "ground_truth": "{bad"}),
     "reward_model.ground_truth"),
    (lambda r: r.update(prompt=[{"role": "system", "content": "only system"}]), "prompt"),
])
def test_afm_parquet_errors(tmp_path, mutate, field):
    rows = [_afm_row(), _afm_row()]
    mutate(rows[1])
    p = tmp_path / "afm.parquet"
    pd.DataFrame(rows).to_parquet(p)
    with pytest.raises(DataError) as e:
        load_tasks(p)
    assert e.value.line == 1 and e.value.field == field and "afm.parquet" in str(e.value)


def test_afm_parquet_missing_column(tmp_path):
    p = tmp_path / "afm.parquet"
    pd.DataFrame([{"prompt": [{"role": "user", "content": "q"}]}]).to_parquet(p)
    with pytest.raises(DataError, match="reward_model: missing column"):
        load_tasks(p)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_tasks(tmp_path / "nope.jsonl")
