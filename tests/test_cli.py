import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from coaflow.cli import main
from coaflow.schema import convert, write_jsonl
from tests.conftest import make_trajectory


@pytest.fixture
def cli():
    runner = CliRunner()
    return lambda *args: runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("args", [[], ["run"], ["data"], ["data", "convert"], ["data", "validate"],
                                  ["data", "stats"], ["runs"], ["runs", "list"], ["config"]])
def test_help_at_every_level(cli, args):
    res = cli(*args, "--help")
    assert res.exit_code == 0 and "Usage:" in res.output
    assert len(res.output.splitlines()) > 4


def test_run_help_explains_options(cli):
    out = cli("run", "--help").output
    for word in ("--profile", "--workdir", "--set", "--from", "--only", "--run-id"):
        assert word in out


def test_convert_validate_stats(cli, tmp_path):
    trajs = [make_trajectory(i, correct=i % 2 == 0) for i in range(4)]
    adp = tmp_path / "adp.jsonl"
    write_jsonl(adp, [convert.to_adp(t) for t in trajs])
    res = cli("data", "convert", "--from", "adp", "--to", "coaflow", adp, tmp_path / "c.jsonl.gz")
    assert res.exit_code == 0 and "wrote 4 records" in res.output
    assert cli("data", "validate", tmp_path / "c.jsonl.gz").output.strip() == "4 valid, 0 invalid"
    stats = json.loads(cli("data", "stats", tmp_path / "c.jsonl.gz").output)
    assert stats["trajectories"] == 4 and stats["correct"] == {"True": 2, "False": 2}
    assert stats["tools"] == {"search": 4, "open_page": 4}
    res = cli("data", "convert", "--from", "coaflow", "--to", "messages", tmp_path / "c.jsonl.gz",
              tmp_path / "m.jsonl")
    first = json.loads((tmp_path / "m.jsonl").read_text().splitlines()[0])
    assert first["messages"][0]["role"] == "system"


def test_validate_reports_bad_lines_and_fails(cli, tmp_path):
    p = tmp_path / "t.jsonl"
    good = make_trajectory().model_dump_json()
    p.write_text(good + "\n{\n")
    res = CliRunner().invoke(main, ["data", "validate", str(p)])
    assert res.exit_code == 2 and f"{p}:2: invalid JSON" in res.output  # bad input: 2


def test_convert_error_is_one_line_without_traceback(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text(json.dumps({"conversations": [{"value": "hi"}]}) + "\n")
    res = CliRunner().invoke(main, ["data", "convert", "--from", "sharegpt", "--to", "coaflow",
                                    str(p), str(tmp_path / "o.jsonl")])
    assert res.exit_code == 2
    assert f"Error: {p}:1: conversations.0.from: missing" in res.output
    assert "Traceback" not in res.output
    res = CliRunner().invoke(main, ["data", "convert", "--from", "sharegpt", "--to", "coaflow",
                                    "--skip-bad", str(p), str(tmp_path / "o.jsonl")])
    assert res.exit_code == 0 and "1 skipped" in res.output


def test_bad_config_is_a_clear_error(tmp_path):
    res = CliRunner().invoke(main, ["config", "--set", "run.sedd=1"])
    assert res.exit_code == 2 and "run.sedd: unknown key" in res.output


def test_runs_list_and_show_unknown(tmp_path):
    res = CliRunner().invoke(main, ["runs", "list", "--workdir", str(tmp_path)])
    assert "no runs" in res.output
    res = CliRunner().invoke(main, ["runs", "show", "nope", "--workdir", str(tmp_path)])
    assert res.exit_code == 2 and "no run 'nope'" in res.output


ROOT = Path(__file__).resolve().parents[1]


def test_help_names_every_stage_in_order(cli):
    from coaflow.contract import ORDER

    assert f"Stages, in order: {', '.join(ORDER)}." in cli("--help").output


def test_the_exit_codes_have_one_table():
    """errors.EXIT_CODES is the table; the docs and `coaflow --help` show it as it is."""
    from click.testing import CliRunner

    from coaflow.errors import EXIT_CODES, exit_codes_markdown

    assert exit_codes_markdown() in (ROOT / "docs" / "stages.md").read_text()
    shown = CliRunner().invoke(main, ["--help"], terminal_width=200).output
    for code, _, meaning in EXIT_CODES:
        assert f"  {code:<3} {meaning}" in shown


@pytest.mark.parametrize("doc", ["README.md", *sorted(p.name for p in (ROOT / "docs").glob("*.md"))])
def test_docs_link_only_files_inside_the_repository(doc):
    path = ROOT / doc if (ROOT / doc).exists() else ROOT / "docs" / doc
    for target in re.findall(r"\]\(([^)#\s]+)", path.read_text()):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        resolved = (path.parent / target).resolve()
        assert resolved.is_relative_to(ROOT) and resolved.exists(), f"{doc}: {target}"
