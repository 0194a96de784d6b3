"""Real ADP files, in the shape the Agent Data Protocol repository publishes them
(``datasets/<name>/sample_std.json``: a pretty-printed JSON array; null fields written out;
per-step ``reward`` and ``reasoning_content``; calls without ``tool_call_id``; a trajectory that
stops on a call; CamelCase classes, ``system`` observations and ``available_code_languages`` in
newer versions). ADP -> coaflow -> ADP gives back the same file, byte for byte.

The fixtures in ``tests/schema/adp/`` are written for these tests from the public ADP schema
(``schema/*.py``, ``schema/SCHEMA.md``); their content is made up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from coaflow.cli import main
from coaflow.gates.validators import check_links
from coaflow.schema import ApiAction, TextObservation, convert, io

FIXTURES = Path(__file__).with_name("adp")
FILES = sorted(FIXTURES.glob("*.json"))


def read(path: Path) -> list:
    return [t for _, _, t in io.iter_records(path, convert.from_adp)]


def cli(*args) -> str:
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_adp_file_round_trips_byte_for_byte_through_the_cli(path, tmp_path):
    assert path.read_text().startswith("[\n  {\n")  # the published shape, not JSONL
    cli("data", "convert", "--from", "adp", "--to", "coaflow", path, tmp_path / "c.jsonl")
    assert "0 invalid" in cli("data", "validate", tmp_path / "c.jsonl")
    cli("data", "convert", "--from", "coaflow", "--to", "adp", tmp_path / "c.jsonl",
        tmp_path / "back.json")
    assert (tmp_path / "back.json").read_bytes() == path.read_bytes()
    # and as JSON lines, the same documents
    cli("data", "convert", "--from", "coaflow", "--to", "adp", tmp_path / "c.jsonl",
        tmp_path / "back.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "back.jsonl").read_text().splitlines()]
    assert lines == json.loads(path.read_text())


def test_calls_without_ids_pair_with_the_observations_that_follow_in_order():
    first, second = read(FIXTURES / "api_calls_std.json")
    call, obs = first.content[1], first.content[2]
    assert isinstance(call, ApiAction) and call.tool_call_id == obs.tool_call_id
    # two calls in a row, then their two results: first result to the first call
    c1, c2, o1, o2 = second.content[1:5]
    assert (c1.kwargs["city"], c2.kwargs["city"]) == ("Oslo", "Bergen")
    assert o1.tool_call_id == c1.tool_call_id and o2.tool_call_id == c2.tool_call_id
    assert "Oslo" in o1.content and "Bergen" in o2.content
    # a user turn after an answered call is the user speaking, not a tool result
    assert first.content[4].source == "user" and first.content[4].tool_call_id is None


def test_a_trajectory_ending_on_an_unanswered_call_is_kept_and_the_gate_decides():
    first = read(FIXTURES / "api_calls_std.json")[0]
    last = first.content[-1]
    assert isinstance(last, ApiAction) and last.kwargs == {"city": "Bergen"}
    assert last.reasoning_content.startswith("<think>")
    [(code, detail)] = check_links(first)
    assert code == "tool_link" and "has no observation" in detail


def test_null_names_unknown_fields_and_newer_classes_are_kept():
    first = read(FIXTURES / "api_calls_std.json")[0]
    obs = first.content[0]
    assert isinstance(obs, TextObservation) and obs.name is None and obs.source == "user"
    adp = convert.to_adp(first)
    assert adp["content"][0] == {"reward": None, "class_": "text_observation",
                                 "content": "Is it raining in Oslo right now?", "name": None,
                                 "source": "user"}
    assert adp["content"][-1]["reward"] == 0.5 and "tool_call_id" not in adp["content"][-1]
    assert first.available_apis == ["get_weather", "get_forecast"]
    assert "adp_shape" not in adp["details"]  # bookkeeping never reaches the ADP details
    [code] = read(FIXTURES / "code_linked_std.json")
    assert code.content[2].source == "environment" and code.content[2].name == "python"
    adp = convert.to_adp(code)
    assert adp["available_code_languages"] == ["python"]
    assert adp["content"][2]["source"] == "system" and adp["content"][1]["class_"] == "CodeAction"
    assert adp["content"][3] == {"class_": "MessageAction", "content": "The sum is 5050.",
                                 "reward": 1.0}


def test_an_edited_trajectory_is_still_written_as_valid_adp():
    first = read(FIXTURES / "api_calls_std.json")[1]
    first.content = first.content[:5]  # the final message removed after import
    adp = convert.to_adp(first)
    back = convert.from_adp(json.loads(json.dumps(adp)))
    assert back.content == first.content and back.id == first.id


def test_a_coaflow_trajectory_written_as_adp_has_no_shape_bookkeeping(traj):
    adp = convert.to_adp(traj)
    back = convert.from_adp(json.loads(json.dumps(adp)))
    assert back == traj and "adp_shape" not in back.details
