import gzip
import json

import pytest
from pydantic import ValidationError

from coaflow.schema import (
    ApiAction,
    DataError,
    ShardWriter,
    TextObservation,
    Trajectory,
    convert,
    iter_records,
    read_trajectories,
    to_messages,
    write_jsonl,
)
from tests.conftest import make_trajectory


def test_tool_call_without_observation_is_rejected(traj):
    data = traj.model_dump()
    del data["content"][3]  # the observation of c1
    with pytest.raises(ValidationError, match="'c1' \\(search\\) has no observation"):
        Trajectory.model_validate(data)


def test_second_observation_for_one_call_is_rejected(traj):
    data = traj.model_dump()
    data["content"].insert(4, dict(data["content"][3]))
    with pytest.raises(ValidationError, match="second observation"):
        Trajectory.model_validate(data)


def test_render_merges_roles_into_qwen_turns(traj):
    msgs = to_messages(traj)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "assistant",
                                         "tool", "assistant"]
    first = msgs[2]
    assert first["content"].startswith("<plan>1. find") and "<think>Look up Mira first.</think>" \
        in first["content"]
    assert first["tool_calls"] == [{"id": "c1", "type": "function", "function": {
        "name": "search", "arguments": {"query": "Mira Kolb0"}}}]
    assert msgs[3] == {"role": "tool", "tool_call_id": "c1", "name": "search",
                       "content": "1. Mira Kolb: born in Ostrava Nova"}
    assert msgs[4]["content"].startswith("<reflection>The hit")
    assert msgs[-1]["content"] == ("<reflection>Both hops are supported by the pages."
                                   "</reflection>\n<answer>Veloria</answer>")


def test_adp_round_trip_plain_adp_is_unchanged():
    adp = {"schema_version": "1.2.0", "id": "t1", "content": [
        {"class_": "text_observation", "content": "What is 6*7?", "source": "user"},
        {"class_": "message_action", "content": "I will compute it."},
        {"class_": "code_action", "language": "python", "content": "print(6*7)",
         "tool_call_id": "call_1", "description": "multiply"},
        {"class_": "text_observation", "content": "42", "source": "environment",
         "tool_call_id": "call_1"},
        {"class_": "api_action", "function": "finish", "kwargs": {"answer": "42"},
         "tool_call_id": "call_2"},
        {"class_": "text_observation", "content": "ok", "source": "environment",
         "tool_call_id": "call_2"},
        {"class_": "message_action", "content": "<answer>42</answer>"},
    ], "details": {"dataset": "toy"}}
    traj = convert.from_adp(adp)
    assert traj.task.question == "What is 6*7?" and traj.task.suite == "toy"
    assert convert.to_adp(traj) == adp


def test_adp_round_trip_keeps_coaflow_extensions(traj):
    adp = convert.to_adp(traj)
    assert "agent" not in adp["content"][1]  # plain ADP steps
    assert adp["details"]["coaflow"]["agents"][1] == "planner"
    assert convert.from_adp(json.loads(json.dumps(adp))) == traj


def test_adp_missing_tool_call_ids_are_linked_like_adp_does():
    traj = convert.from_adp({"id": "x", "content": [
        {"class_": "text_observation", "content": "q", "source": "user"},
        {"class_": "ApiAction", "function": "search", "kwargs": {"query": "q"}},
        {"class_": "TextObservation", "content": "hits", "source": "user"},
    ], "details": {}})
    call, obs = traj.content[1], traj.content[2]
    assert call.tool_call_id == obs.tool_call_id == "call_000001"
    assert obs.source == "environment"


def test_openai_messages_in():
    rec = {"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "a", "type": "function",
             "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "a", "content": "rain"},
        {"role": "assistant", "content": "<answer>rain</answer>"}], "answer": "rain"}
    traj = convert.from_messages(rec)
    assert traj.task.question == "weather in Oslo?" and traj.task.answer == "rain"
    assert traj.content[1].kwargs == {"city": "Oslo"} and traj.details["system"] == "be brief"
    msgs = to_messages(traj, system_prompt=None)
    assert msgs[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert msgs[-1]["content"] == "<answer>rain</answer>"


def test_openai_bad_arguments_names_the_field():
    rec = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "a", "function": {"name": "f", "arguments": "{oops"}}]}]}
    with pytest.raises(ValueError, match=r"messages.1.tool_calls.0.function.arguments"):
        convert.from_messages(rec)


def test_sharegpt_in():
    rec = {"conversations": [
        {"from": "human", "value": "2+2?"},
        {"from": "function_call", "value": '{"name": "python", "arguments": {"code": "print(4)"}}'},
        {"from": "observation", "value": "4"},
        {"from": "gpt", "value": "<answer>4</answer>"}]}
    traj = convert.from_sharegpt(rec, suite="calc")
    assert traj.task.suite == "calc"
    assert [type(s).__name__ for s in traj.content] == ["TextObservation", "ApiAction",
                                                         "TextObservation", "MessageAction"]
    assert traj.content[2].tool_call_id == traj.content[1].tool_call_id


def test_jsonl_gz_round_trip_and_sharding(tmp_path):
    trajs = [make_trajectory(i) for i in range(5)]
    with ShardWriter(tmp_path / "shards", shard_size=2, compress=True) as w:
        for t in trajs:
            w.write(t)
    assert [p.name for p in w.paths] == ["part-00000.jsonl.gz", "part-00001.jsonl.gz",
                                         "part-00002.jsonl.gz"]
    assert list(read_trajectories(tmp_path / "shards")) == trajs


def test_killed_writer_leaves_no_shard(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "s") as w:
            w.write(make_trajectory())
            raise RuntimeError("killed")
    assert list((tmp_path / "s").iterdir()) == []


def test_bad_line_error_names_file_line_and_field(tmp_path):
    good = make_trajectory().model_dump(mode="json")
    bad = dict(good, task={**good["task"], "question": 7})
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(good) + "\n" + "{not json\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError) as e:
        list(iter_records(path))
    assert str(e.value).startswith(f"{path}:2: invalid JSON")
    problems = []
    ok = list(iter_records(path, errors="skip", on_error=problems.append))
    assert len(ok) == 1 and [p.line for p in problems] == [2, 3]
    assert problems[1].field == "task.question"


def test_invalid_utf8_and_truncated_gzip_are_reported(tmp_path):
    p = tmp_path / "u.jsonl"
    p.write_bytes(b'{"a": "\xff"}\n')
    with pytest.raises(DataError, match="u.jsonl:1: invalid UTF-8"):
        list(iter_records(p, None))
    g = tmp_path / "t.jsonl.gz"
    blob = gzip.compress((json.dumps({"a": 1}) + "\n").encode() * 2000)
    g.write_bytes(blob[: len(blob) // 2])
    problems = []
    rows = list(iter_records(g, None, errors="skip", on_error=problems.append))
    assert rows and problems and "unreadable" in problems[0].reason


def test_write_jsonl_is_atomic(tmp_path):
    out = tmp_path / "o.jsonl"
    assert write_jsonl(out, [{"a": 1}, {"a": 2}]) == 2
    assert not (tmp_path / "o.jsonl.tmp").exists() and out.read_text().count("\n") == 2


def test_tool_calls_and_observation_helpers(traj):
    assert [c.function for c in traj.tool_calls()] == ["search", "open_page"]
    assert isinstance(traj.content[3], TextObservation)
    assert isinstance(traj.content[2], ApiAction)


def test_corrupt_gzip_stream_is_reported_not_raised(tmp_path):
    g = tmp_path / "c.jsonl.gz"
    blob = bytearray(gzip.compress(("x" * 5000 + "\n").encode() * 50))
    blob[10:13] = b"\xff\xff\xff"  # damage the deflate stream itself: zlib.error
    g.write_bytes(bytes(blob))
    problems = []
    list(iter_records(g, None, errors="skip", on_error=problems.append))
    assert problems and "unreadable" in problems[0].reason


def test_a_folder_names_its_trajectories_in_result_json(tmp_path):
    """The data layer reads where a stage says its trajectories are (``Result.data`` in its
    ``result.json``); it knows no stage's folder names (it used to guess synthesize's
    ``trajectories/`` beside ``raw/`` and the gate's ``accepted/`` beside ``gate_report.json``)."""
    import json

    from coaflow.contract import Result
    from coaflow.schema.io import trajectory_source

    (tmp_path / "kept").mkdir()
    (tmp_path / "trajectories").mkdir()
    (tmp_path / "raw").mkdir()
    assert trajectory_source(tmp_path) == tmp_path  # no result.json: the folder itself
    result = Result(outputs={"kept": str(tmp_path / "kept")}, data="kept")
    (tmp_path / "result.json").write_text(json.dumps(result.to_json(base=tmp_path)))
    assert trajectory_source(tmp_path) == tmp_path / "kept"
