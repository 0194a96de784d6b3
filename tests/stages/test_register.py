"""The register stage against a real MLflow sqlite registry, through the runner's entry point
(``execute``), with hand-made evaluate results in the agreed format: the first good version
becomes champion, a worse one is refused and moves nothing, a better one is promoted, rollback
and fetch work, and each refusal names its rule with its numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coaflow.config import load_config  # noqa: E402
from coaflow.errors import PromotionRefused, exit_code  # noqa: E402
from coaflow.registry import Registry, RegistryError  # noqa: E402
from coaflow.runner import execute  # noqa: E402
from coaflow.stages import register  # noqa: E402
from tests.models import sft_fixtures as fx
from tests.stages import registry_fixtures as rf

tiny_dir, trajectories = fx.tiny_dir, fx.trajectories

NAME = "t"
MODEL = "t-agent"


def _cfg(work: Path, *overrides):
    return load_config("tiny", [f"run.workdir={work}", f"run.name={NAME}", *overrides])


def _register(work, sft, evaluate, gate, out, *overrides):
    inputs = {"sft": sft, "evaluate": evaluate} | ({"gate": gate} if gate else {})
    return execute("register", _cfg(work, *overrides), work / "runs" / out / "register", inputs,
                   log=lambda *_: None)


def test_champion_lifecycle(tmp_path, monkeypatch, tiny_dir):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    work, data = tmp_path / "work", tmp_path / "stages"
    gate = rf.gate_folder(data)
    reg = Registry(f"sqlite:///{work.resolve() / 'mlflow.db'}")

    # 1. no champion yet: the absolute rules decide
    first = _register(work, rf.sft_folder(data, tiny_dir, "sft-a"),
                      rf.evaluate_folder(data, rf.evaluation({"kbqa": .4, "calc": .5}), "ev-a"),
                      gate, "r1")
    assert first.summary["promoted"] and first.summary["version"] == 1
    assert reg.champion(MODEL).version == 1 and reg.alias(MODEL, "challenger").version == 1
    v1 = reg.get(MODEL, 1)
    assert v1.tags["coaflow.candidate_key"] == "sft-a" and v1.tags["coaflow.gate_key"] == "gate-key"
    assert v1.tags["eval.candidate.kbqa"].startswith("0.4000 [0.2500, 0.5500] n=40")

    # 2. a worse candidate: refused (exit 4), recorded, nothing moved
    worse = rf.evaluation({"kbqa": .30, "calc": .5}, champion=1,
                          diff={"all": (-.05, -.12, .02), "kbqa": (-.10, -.2, 0), "calc": (0, 0, 0)})
    with pytest.raises(PromotionRefused) as e:
        _register(work, rf.sft_folder(data, tiny_dir, "sft-b"),
                  rf.evaluate_folder(data, worse, "ev-b"), gate, "r2")
    assert exit_code(e.value) == 4
    s = e.value.result.summary
    assert not s["promoted"] and s["version"] == 2
    assert s["failed_rules"] == ["beats_champion", "max_regression:kbqa"]
    assert "lower bound must be > +0.000" in s["reason"] and "-0.120" in s["reason"]
    assert reg.champion(MODEL).version == 1 and reg.alias(MODEL, "previous") is None
    assert reg.alias(MODEL, "challenger").version == 2
    saved = json.loads((work / "runs" / "r2" / "register" / "decision.json").read_text())
    assert {r["rule"]: r["passed"] for r in saved["rules"]}["beats_champion"] is False

    # 3. a better one: champion moves, the old one becomes previous
    better = rf.evaluation({"kbqa": .6, "calc": .6}, champion=1,
                           diff={"all": (.15, .05, .25), "kbqa": (.2, .1, .3), "calc": (.1, 0, .2)})
    key_before = register.cache_extras(_cfg(work).register, _cfg(work).run, {"sft": "other"},
                                       reg.uri)
    third = _register(work, rf.sft_folder(data, tiny_dir, "sft-c"),
                      rf.evaluate_folder(data, better, "ev-c"), gate, "r3")
    assert third.summary["promoted"] and third.summary["version"] == 3
    assert (reg.champion(MODEL).version, reg.alias(MODEL, "previous").version) == (3, 1)
    assert register.cache_extras(_cfg(work).register, _cfg(work).run,
                                 {"sft": "other"}, reg.uri) != key_before
    # the champion made from this very candidate counts as none: a rerun is a cache hit
    own = reg.champion(MODEL).tags["coaflow.candidate_key"]
    assert register.cache_extras(_cfg(work).register, _cfg(work).run,
                                 {"sft": own}, reg.uri) == {"champion": None}

    # 4. the same candidate again is not registered twice
    again = rf.evaluation({"kbqa": .6, "calc": .6}, champion=3,
                          diff={"all": (0, 0, 0), "kbqa": (0, 0, 0), "calc": (0, 0, 0)})
    same = _register(work, data / "sft-sft-c", rf.evaluate_folder(data, again, "ev-d"), gate, "r4")
    assert same.summary["version"] == 3 and "already the champion" in same.summary["reason"]
    assert [v.version for v in reg.versions(MODEL)] == [3, 2, 1]

    # 5. fetch the champion as a servable folder with its system prompt
    folder, v = reg.fetch(f"models:/{MODEL}@champion", tmp_path / "fetched")
    assert v.version == 3 and (folder / "config.json").is_file()
    assert "team of agents" in json.loads((folder / "coaflow_model.json").read_text())[
        "system_prompt"]

    # 6. rollback: champion back to previous (1), which replaced nobody
    now, back_from = reg.rollback(MODEL, "smoke test failed")
    assert (now.version, back_from.version) == (1, 3)
    assert reg.champion(MODEL).version == 1 and reg.alias(MODEL, "previous") is None
    assert reg.get(MODEL, 3).tags["coaflow.rolled_back_reason"] == "smoke test failed"
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        reg.rollback(MODEL, "again")


def test_refusals_name_their_rule(tmp_path, monkeypatch, tiny_dir):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    work, data = tmp_path / "work", tmp_path / "stages"
    sft = rf.sft_folder(data, tiny_dir, "sft-a")
    ev = rf.evaluate_folder(data, rf.evaluation({"kbqa": .2}), "ev-a")
    reg = Registry(f"sqlite:///{work.resolve() / 'mlflow.db'}")

    with pytest.raises(PromotionRefused) as e:  # no gate result, success under the minimum
        _register(work, sft, ev, None, "r1", "register.min_success_by_suite={kbqa: 0.3}")
    assert e.value.result.summary["failed_rules"] == ["data_gate", "min_success:kbqa"]
    assert "success 0.200" in e.value.result.summary["reason"]
    assert reg.champion(MODEL) is None and reg.alias(MODEL, "challenger").version == 1

    with pytest.raises(PromotionRefused, match="duplicate_fraction"):  # a failed expectation
        _register(work, sft, ev, rf.gate_folder(data, passed=False, key="g2"), "r2")

    ok = _register(work, sft, ev, rf.gate_folder(data), "r3", "register.promote=false")
    assert not ok.summary["promoted"] and "promote is false" in ok.summary["reason"]
    assert reg.champion(MODEL) is None
    assert len(reg.versions(MODEL)) == 1  # one candidate, registered once

    reg.promote(MODEL, 1, "by hand")
    stale = rf.evaluate_folder(data, rf.evaluation({"kbqa": .5}, champion=7, diff={
        "all": (.3, .2, .4)}), "ev-b")
    with pytest.raises(PromotionRefused, match="fresh_comparison: evaluated against version 7"):
        _register(work, rf.sft_folder(data, tiny_dir, "sft-b"), stale, rf.gate_folder(data), "r4")


def test_bad_models_and_uris(tmp_path, monkeypatch, tiny_dir):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    reg = Registry(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(RegistryError, match="no config.json"):
        reg.register(MODEL, tmp_path, tags={}, info={}, experiment="e")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    (broken / "model.safetensors").write_bytes(b"")
    with pytest.raises(RegistryError, match="missing or corrupt"):
        reg.register(MODEL, broken, tags={}, info={}, experiment="e")
    with pytest.raises(RegistryError, match="no registered model 'nope'"):
        reg.resolve("models:/nope@champion")
    reg.register(MODEL, tiny_dir, tags={}, info={}, experiment="e")
    with pytest.raises(RegistryError, match="has no alias 'champion' \\(aliases: challenger\\)"):
        reg.fetch(f"models:/{MODEL}@champion", tmp_path / "x")
    with pytest.raises(RegistryError, match="not a registry URI"):
        reg.resolve("models:/a/b/c")


def test_a_first_candidate_that_does_not_beat_its_base_is_never_champion(tmp_path, monkeypatch,
                                                                         tiny_dir):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    work, data = tmp_path / "work", tmp_path / "stages"
    same = rf.evaluation({"kbqa": 0.0, "calc": 0.0}, vs_base=(0.0, 0.0, 0.0))
    with pytest.raises(PromotionRefused, match=r"beats_base: all: diff \+0.000") as e:
        _register(work, rf.sft_folder(data, tiny_dir, "sft-a"),
                  rf.evaluate_folder(data, same, "ev-a"), rf.gate_folder(data), "r1")
    assert exit_code(e.value) == 4 and e.value.result.summary["failed_rules"] == ["beats_base"]
    assert Registry(f"sqlite:///{work.resolve() / 'mlflow.db'}").champion(MODEL) is None
    # the smoke profile's wiring switch: the same candidate goes through
    ok = _register(work, rf.sft_folder(data, tiny_dir, "sft-a"),
                   rf.evaluate_folder(data, same, "ev-a"), rf.gate_folder(data), "r2",
                   "register.beats_base=false")
    assert ok.summary["promoted"]


def _first_champion(tmp_path, tiny_dir, key: str):
    """A first version promoted into a second store that config ``key`` names:
    ``(workdir, stage folders, that store's URI)``."""
    work, data = tmp_path / "work", tmp_path / "stages"
    other = f"sqlite:///{(tmp_path / 'other.db').resolve()}"
    first = _register(work, rf.sft_folder(data, tiny_dir, "sft-a"),
                      rf.evaluate_folder(data, rf.evaluation({"kbqa": .4, "calc": .5}), "ev-a"),
                      rf.gate_folder(data), "r1", f"{key}={other}")
    assert first.summary["promoted"] and first.summary["registry_uri"] == other
    return work, data, other


def test_the_cache_key_looks_for_the_champion_where_run_moves_it(tmp_path, monkeypatch, tiny_dir):
    """With ``tracking.uri`` set, ``cache_extras`` reads the champion from that store, as ``run()``
    moves it there (it used to read the workdir's store: a stale key after a promotion)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    work, data, other = _first_champion(tmp_path, tiny_dir, "tracking.uri")
    cfg = _cfg(work, f"tracking.uri={other}")
    run = cfg.run.model_copy(update={"workdir": str(work.resolve())})
    assert register.cache_extras(cfg.register, run, {"sft": "sft-b"}, registry_uri=other) == \
        {"champion": 1}
    workdir_store = f"sqlite:///{work.resolve() / 'mlflow.db'}"
    assert register.cache_extras(cfg.register, run, {"sft": "sft-b"}, workdir_store) == \
        {"champion": None}


def test_a_separate_registry_is_the_one_evaluate_and_sft_read(tmp_path, monkeypatch, tiny_dir):
    """``register.registry_uri`` names a second store: register moves the champion there, and
    evaluate compares with that champion and ``sft.model=champion`` retrains it. (Before, both
    looked in the tracking store: evaluate never saw a champion, so ``fresh_comparison`` failed
    on every later run, and sft silently started from ``first_model``.)"""
    from coaflow.contract import Result
    from coaflow.runner import stage_setup
    from coaflow.stages import sft

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    work, data, other = _first_champion(tmp_path, tiny_dir, "register.registry_uri")
    cfg = _cfg(work, f"register.registry_uri={other}", "tracking.enabled=false",
               "evaluate.models=[candidate, champion]", "evaluate.suites={kbqa: 1, calc: 1}",
               "evaluate.max_turns=1", "evaluate.max_new_tokens=8", "evaluate.tight_budget=true",
               "sft.model=champion")
    ev = execute("evaluate", cfg, work / "runs" / "r2" / "evaluate",
                 {"sft": rf.sft_folder(data, tiny_dir, "sft-b")}, log=lambda *_: None)
    assert ev.summary["champion"] == {"version": 1}
    assert set(ev.summary["table"]) == {"candidate", "champion"}

    setup = stage_setup("sft", cfg, {"gate": rf.gate_folder(data)})
    assert setup.registry == other  # the key holds the champion's version from there
    assert sft.cache_extras(cfg.sft, setup.run, registry_uri=setup.registry) == {"base": "t-agent/1"}
    monkeypatch.setattr(sft, "run", lambda section, ctx: Result(summary={
        "base": sft.base_model(section, ctx)}))
    started = execute("sft", cfg, work / "runs" / "r2" / "sft", {"gate": rf.gate_folder(data)},
                      log=lambda *_: None)
    assert Path(started.summary["base"]).name == "t-agent-v1"  # the champion, fetched
