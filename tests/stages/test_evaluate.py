"""The evaluate stage on a tiny model: the table, the outcomes, the champion from the registry, the
paired comparison, bad input."""

import json
from pathlib import Path

import pytest

from coaflow.config import load_config  # noqa: E402
from coaflow.contract import Context, Result  # noqa: E402
from coaflow.errors import PipelineError, UserError  # noqa: E402
from coaflow.schema import read_trajectories  # noqa: E402
from coaflow.stages import evaluate  # noqa: E402
from coaflow.tracking import Tracker  # noqa: E402
from tests.models import sft_fixtures as fx

tiny_dir, trajectories = fx.tiny_dir, fx.trajectories  # shared fixtures

SMALL = ["evaluate.suites={kbqa: 3, calc: 3}", "evaluate.max_new_tokens=16",
         "evaluate.max_turns=2"]


def context(tmp_path, model, overrides=(), registry_uri="", budget=None):
    cfg = load_config("tiny", ["tracking.enabled=false", f"run.workdir={tmp_path}",
                               "evaluate.tight_budget=true", *SMALL, *overrides])
    sft = Result(outputs={"model": str(model), **({"budget": str(budget)} if budget else {})},
                 summary={"base_model": str(model)})
    ctx = Context(run_id="t", out=tmp_path / "evaluate", inputs={"sft": sft}, run=cfg.run,
                  tracker=Tracker(tmp_path, enabled=False),
                  registry_uri=registry_uri or f"sqlite:///{tmp_path / 'mlflow.db'}")
    ctx.out.mkdir(parents=True, exist_ok=True)
    return cfg, ctx


def test_table_outcomes_and_transcripts(tmp_path, tiny_dir):
    cfg, ctx = context(tmp_path, tiny_dir)
    r = evaluate.run(cfg.evaluate, ctx)
    table = r.summary["table"]
    assert list(table) == ["base", "candidate", "teacher"]  # no registry: no champion row
    assert r.summary["champion"] is None
    assert list(r.summary["comparison"]) == ["candidate_vs_base"]  # what promotion must beat
    assert r.summary["candidate"] == {"source": "sft", "model": str(tiny_dir)}
    from coaflow.report import EvalSummary  # the summary's one description: every key it has
    assert set(r.summary) == set(EvalSummary.__annotations__)
    # the teacher plays by the same rules: 2 turns of 16 tokens cut its first turn short
    assert table["teacher"]["calc"]["success"] == 0.0
    assert r.summary["details"]["teacher"]["calc"]["categories"] == {"turn_tokens": 3}
    assert r.summary["details"]["teacher"]["calc"]["cut_turns"] == {"1": 3}
    assert {k: r.summary["budget"]["calc"][k] for k in ("max_turns", "max_new_tokens", "fits",
                                                         "teacher_runs")} == {
        "max_turns": 2, "max_new_tokens": 16, "fits": None, "teacher_runs": 0}
    rows = [json.loads(x) for x in Path(r.outputs["outcomes"]).read_text().splitlines()]
    assert len(rows) == 18 and set(rows[0]) == {
        "model", "suite", "task_id", "difficulty", "hops", "success", "category", "turns",
        "tool_calls", "tokens", "format_errors", "cut_turn"}
    by = {m: [{k: v for k, v in x.items() if k != "model"} for x in rows if x["model"] == m]
          for m in table}
    assert by["base"] == by["candidate"]  # the same model, greedy: the same episodes
    assert {x["hops"] for x in by["teacher"] if x["suite"] == "kbqa"} <= {1, 2, 3}
    assert all(x["hops"] is None for x in by["teacher"] if x["suite"] == "calc")
    trajs = list(read_trajectories(Path(r.outputs["transcripts"]) / "candidate.jsonl"))
    assert len(trajs) == 6 and {t.task.split for t in trajs} == {"test"}
    assert "| teacher | 0.0% [" in (ctx.out / "table.md").read_text()
    assert "| calc | 2 turns x 16 tokens |" in (ctx.out / "table.md").read_text()
    assert "<table" in (ctx.out / "table.html").read_text()


def test_the_ceiling_in_the_derived_budget_and_rows_as_its_share(tmp_path, tiny_dir):
    """Budgets derived from the teacher runs sft trained on let the teacher's own solutions
    through (the ceiling is 100 %, in the same loop and tokens); every row is shown as a share
    of it; an explicit budget that fits fewer than 95 % of those runs is refused, naming the
    share and the budget that would fit, unless tight_budget says it is meant."""
    from transformers import AutoTokenizer

    from coaflow.agent import budget
    from coaflow.envs import make_tasks
    from coaflow.teachers.replay import scripted_trajectory

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    train = make_tasks("kbqa", "train", 40, seed=0) + make_tasks("calc", "train", 20, seed=0)
    runs = budget.teacher_runs([scripted_trajectory(t, 0) for t in train], tok)
    derived = {s: budget.derive(r) for s, r in runs.items()}
    budget.write_record(tmp_path / "budget.json", runs, derived)
    cfg, ctx = context(tmp_path, tiny_dir, ["evaluate.max_turns=null",
                                            "evaluate.max_new_tokens=null",
                                            "evaluate.models=[base, teacher]"],
                       budget=tmp_path / "budget.json")
    r = evaluate.run(cfg.evaluate, ctx)
    assert r.summary["table"]["teacher"]["kbqa"]["success"] == 1.0
    assert r.summary["table"]["teacher"]["calc"]["success"] == 1.0
    assert r.summary["budget"]["kbqa"]["fits"] == 1.0
    assert r.summary["budget"]["kbqa"]["max_turns"] == derived["kbqa"].max_turns
    details = r.summary["details"]
    assert details["teacher"]["calc"]["ceiling_share"] == 1.0
    assert details["base"]["calc"]["ceiling_share"] == details["base"]["calc"]["success"]
    assert "of ceiling)" in (ctx.out / "table.md").read_text()
    cfg, ctx = context(tmp_path, tiny_dir, ["evaluate.tight_budget=false",
                                            "evaluate.models=[teacher]"],
                       budget=tmp_path / "budget.json")
    with pytest.raises(PipelineError, match=r"2 turns x 16 tokens fits 0% of the \d+ kbqa "
                       r"teacher runs .*tight_budget=true"):
        evaluate.run(cfg.evaluate, ctx)


def test_an_unchanged_row_comes_from_the_row_cache(tmp_path, tiny_dir):
    cfg, ctx = context(tmp_path, tiny_dir, ["evaluate.models=[base, candidate]"])
    first = evaluate.run(cfg.evaluate, ctx)
    assert first.summary["cached_rows"] == ["candidate"]  # the base's episodes: the same model
    again = evaluate.run(cfg.evaluate, ctx)  # the same model twice, and the same row again
    assert again.summary["cached_rows"] == ["base", "candidate"]
    assert again.summary["details"] == first.summary["details"]
    cfg, ctx = context(tmp_path, tiny_dir, ["evaluate.models=[base]", "evaluate.max_turns=1"])
    assert evaluate.run(cfg.evaluate, ctx).summary["cached_rows"] == []  # another budget


def test_champion_from_the_registry_and_the_paired_comparison(tmp_path, tiny_dir):
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(tiny_dir), "model")
    client = MlflowClient(uri, uri)
    client.create_registered_model("coaflow-agent")
    mv = client.create_model_version("coaflow-agent", f"{run.info.artifact_uri}/model",
                                     run.info.run_id)
    client.set_registered_model_alias("coaflow-agent", "champion", mv.version)

    cfg, ctx = context(tmp_path, tiny_dir, ["evaluate.models=[candidate, champion]"], uri)
    assert evaluate.cache_extras(cfg.evaluate, cfg.run, {"sft": "k1"}, uri) == {
        "champion": int(mv.version)}
    # a champion registered from this very candidate is no champion to compare against
    client.set_model_version_tag("coaflow-agent", mv.version, "coaflow.candidate_key", "k1")
    assert evaluate.cache_extras(cfg.evaluate, cfg.run, {"sft": "k1"}, uri) == {"champion": None}
    client.set_model_version_tag("coaflow-agent", mv.version, "coaflow.candidate_key", "k0")
    r = evaluate.run(cfg.evaluate, ctx)
    assert r.summary["champion"] == {"version": int(mv.version)}
    comp = r.summary["comparison"]["candidate_vs_champion"]
    assert set(comp) == {"kbqa", "calc", "all"}
    assert comp["all"]["n"] == 6 and comp["all"]["diff"] == 0.0 and comp["all"]["p_value"] == 1.0
    assert r.metrics["eval/candidate_vs_champion/all/p_value"] == 1.0


def test_paired_comparison_counts_discordant_tasks():
    def rows(model, wins):
        return [{"model": model, "suite": "calc", "task_id": str(i), "success": int(w)}
                for i, w in enumerate(wins)]

    a = rows("candidate", [1] * 12 + [0] * 2 + [1] * 6)
    b = rows("champion", [0] * 10 + [1] * 2 + [1] * 2 + [1] * 6)
    c = evaluate.compare(a, b, resamples=500, seed=0)["calc"]
    assert (c["only_candidate"], c["only_other"], c["n"]) == (10, 2, 20)
    assert c["diff"] == pytest.approx(0.4) and round(c["p_value"], 4) == 0.0386
    assert 0 < c["lo"] < 0.4 < c["hi"]


def test_bad_models_fail_with_one_clear_error(tmp_path, tiny_dir):
    cfg, ctx = context(tmp_path, tmp_path / "no-model", ["evaluate.models=[candidate]"])
    with pytest.raises(PipelineError, match="no such model folder"):
        evaluate.run(cfg.evaluate, ctx)
    assert not (ctx.out / "outcomes.jsonl").exists()  # no partial table
    with pytest.raises(UserError, match="no registered model 'nope'"):
        evaluate.run_model("models:/nope@champion", [], cfg.evaluate, budgets={}, field="x",
                           registry_uri=f"sqlite:///{tmp_path / 'm.db'}", seed=0)
    with pytest.raises(Exception, match="unknown suite 'math'"):
        load_config("tiny", ["evaluate.suites={math: 3}"])


def test_standalone_cli(tmp_path):
    from click.testing import CliRunner

    from coaflow.cli import main

    def cli(*args):
        return CliRunner().invoke(main, ["evaluate", "--workdir", str(tmp_path), *args])

    res = cli("--model", "scripted", "--suite", "calc", "-n", "3", "--output", tmp_path / "o")
    assert res.exit_code == 0, res.output
    assert "| model | 100.0% [" in res.output
    assert len((tmp_path / "o" / "outcomes.jsonl").read_text().splitlines()) == 3
    res = cli("--model", "http://127.0.0.1:9/v1", "-n", "1", "--output", tmp_path / "p")
    assert res.exit_code == 75 and "cannot reach the model endpoint" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "p" / "outcomes.jsonl").exists()


def test_an_sft_row_only_when_rl_made_the_candidate(tmp_path, tiny_dir):
    """With rl's model as the candidate, the table also shows the sft model it started from (what
    rl changed, on the same tasks); without rl, the candidate is the sft model: no second row."""
    cfg, ctx = context(tmp_path, tiny_dir)
    specs, candidate, _ = evaluate.model_specs(cfg.evaluate, ctx)
    assert "sft" not in specs and candidate["source"] == "sft"
    ctx.inputs["rl"] = Result(outputs={"model": str(tmp_path / "rl-model")})
    specs, candidate, _ = evaluate.model_specs(cfg.evaluate, ctx)
    assert list(specs) == ["base", "sft", "candidate", "teacher"]
    assert specs["sft"] == str(tiny_dir) and specs["candidate"] == str(tmp_path / "rl-model")
    assert candidate["source"] == "rl"
