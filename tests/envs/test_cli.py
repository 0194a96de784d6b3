import json

from click.testing import CliRunner

from coaflow.cli import main


def run(*args):
    return CliRunner().invoke(main, ["env", *args])


def test_list():
    r = run("list")
    assert r.exit_code == 0 and "kbqa" in r.output and "python" in r.output


def test_sample_prints_json_lines():
    r = run("sample", "kbqa", "-n", "3", "--split", "test", "--n-entities", "80")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.output.splitlines()]
    assert len(rows) == 3 and all(row["split"] == "test" and row["metadata"]["hops"] for row in rows)
    again = run("sample", "kbqa", "-n", "3", "--split", "test", "--n-entities", "80")
    assert again.output == r.output


def test_call_prints_observation_json():
    r = run("call", "calc", "python", "--args", '{"code":"print(6*7)"}')
    assert r.exit_code == 0 and json.loads(r.output) == {"observation": "42"}
    r = run("call", "kbqa", "search", "--args", '{"query": "Port"}')
    assert r.exit_code == 0 and json.loads(r.output)["observation"].startswith("1. ")


def test_call_errors_are_one_line():
    r = run("call", "calc", "pyton", "--args", "{}")
    assert r.exit_code == 2 and "known tools: python" in r.output and "Traceback" not in r.output
    r = run("call", "calc", "python", "--args", "{not json")
    assert r.exit_code == 2 and "--args: not valid JSON" in r.output
    r = run("sample", "web")
    assert r.exit_code == 2 and "known suites: kbqa, calc" in r.output


def test_help_explains_each_command():
    for cmd in ([], ["list"], ["sample"], ["call"]):
        r = run(*cmd, "--help")
        assert r.exit_code == 0 and "Usage" in r.output
    assert "JSON" in run("call", "--help").output
