"""register: the candidate becomes a registry version; it becomes the champion only when it wins.

\b
    coaflow register --run-id RUN                     # after evaluate, in the same run
    coaflow stage register --out DIR --input evaluate=E --input sft=S [--input gate=G --input rl=R]
    coaflow models list                                # versions, aliases, metrics, lineage

The candidate (rl's model if rl ran, else sft's) is logged as an MLflow model (the HF folder plus
``coaflow_model.json``: its system prompt and lineage) and registered as a version of
``<run.name>-agent`` with tags for the pipeline run, the stage keys (config + data lineage), the
git commit and every evaluation figure; it gets the alias ``challenger``. A candidate registered
before (same lineage key) is reused, not registered twice.

Then the promotion rules, each named in the result when it fails:

- ``data_gate``: the gate ran on this candidate's data and every expectation passed;
- ``min_success``: the candidate's success on each suite is at least ``min_success``
  (``min_success_by_suite`` overrides per suite);
- ``beats_base``: the paired 95 % lower bound of candidate - base (the model sft started from,
  on the same tasks) on ``compare_on`` is above ``base_margin``: training must have taught it
  something, even when there is no champion yet;
- ``beats_champion``: the paired 95 % lower bound of candidate - champion success on ``compare_on``
  is above ``margin``;
- ``max_regression``: no suite's paired difference is below ``-max_regression``;
- ``fresh_comparison``: evaluate compared against the version that is champion now.

With no champion yet, the absolute rules (``data_gate``, ``min_success``, ``beats_base``) decide. When they pass,
``champion`` moves to the new version and the old champion gets ``previous``; when one fails,
nothing moves and the stage raises ``PromotionRefused`` (exit 4) after recording its result.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from pydantic import Field

from coaflow.contract import Context, PipelineError, Result
from coaflow.errors import PromotionRefused
from coaflow.report import EvalSummary
from coaflow.section import Section

NAME = "register"
NEEDS = ("evaluate", "sft")
OPTIONAL = ("rl", "gate")
RESUMABLE = False
CACHE = True  # the key holds the champion's version (cache_extras): a moved champion reruns


class Config(Section):
    promote: bool = Field(True, description="move the champion alias when the rules pass "
                          "(false: register and judge only)")
    min_success: float = Field(0.0, ge=0, le=1, description="least candidate success on every "
                               "evaluated suite")
    min_success_by_suite: dict[str, float] = Field(
        default_factory=dict, description="per-suite overrides of min_success, e.g. {kbqa: 0.3}")
    compare_on: str = Field("all", description="comparison row whose paired lower bound must "
                            "clear the margin: 'all' (every task) or a suite name")
    margin: float = Field(0.0, ge=-1, le=1, description="the paired 95 % lower bound of "
                          "candidate - champion success must be above this")
    beats_base: bool = Field(True, description="require the candidate to beat the base model "
                             "it was trained from (evaluate's candidate_vs_base row)")
    base_margin: float = Field(0.0, ge=-1, le=1, description="the paired 95 % lower bound of "
                               "candidate - base success must be above this")
    max_regression: float = Field(0.05, ge=0, le=1, description="largest drop in success allowed "
                                  "on any one suite (paired difference, in absolute points)")
    require_gate: bool = Field(True, description="refuse a candidate whose data did not pass "
                               "the gate (or whose run has no gate result)")
    registry_uri: str | None = Field(None, description="MLflow registry URI of the run (register "
                                     "moves the champion there, evaluate compares with it, sft "
                                     "retrains it, deploy serves it); null: the tracking URI")


def cache_extras(cfg: Config, run, inputs: dict[str, str], registry_uri: str) -> dict:
    """The champion now: a decision taken against another champion is not this one. A champion
    made from this very candidate counts as none, so a rerun with nothing changed is a hit."""
    from coaflow.registry import Registry, model_name

    champ = Registry(registry_uri).champion(model_name(run.name))
    if champ is None or champ.tags.get("coaflow.candidate_key") == (inputs.get("rl")
                                                                    or inputs.get("sft")):
        return {"champion": None}
    return {"champion": champ.version}


# --- the rules ------------------------------------------------------------------------------

def _rule(name: str, ok: bool, detail: str, **numbers) -> dict:
    return {"rule": name, "passed": bool(ok), "detail": detail, **numbers}


def judge(cfg: Config, evaluation: EvalSummary, gate: dict | None,
          champion: int | None) -> list[dict]:
    """Every promotion rule applied to evaluate's summary (``table``, ``comparison``, ``champion``)
    and the gate's summary; ``champion`` is the version that holds the alias now.

    >>> ev = {"table": {"candidate": {"kbqa": {"success": 0.6, "lo": 0.5, "hi": 0.7, "n": 50}}},
    ...       "comparison": {}, "champion": None}
    >>> [r["rule"] for r in judge(Config(), ev, {"expectations": {"rows": True}}, None)]
    ['data_gate', 'min_success:kbqa', 'beats_base']
    """
    rules = []
    if cfg.require_gate:
        if gate is None:
            rules.append(_rule("data_gate", False, "no gate result among the inputs"))
        else:
            failed = [k for k, ok in gate.get("expectations", {}).items() if not ok]
            rules.append(_rule("data_gate", not failed, "failed expectations: " + ", ".join(failed)
                               if failed else "every expectation passed"))
    table = evaluation.get("table", {}).get("candidate", {})
    if not table:
        rules.append(_rule("min_success", False, "evaluate has no candidate results"))
    for suite, row in sorted(table.items()):
        if suite == "all":
            continue
        need = cfg.min_success_by_suite.get(suite, cfg.min_success)
        rules.append(_rule(f"min_success:{suite}", row["success"] >= need,
                           f"success {row['success']:.3f} (95% CI {row['lo']:.3f}-{row['hi']:.3f},"
                           f" n={row['n']}) vs minimum {need:.3f}", value=row["success"],
                           threshold=need))
    if cfg.beats_base:
        rules.append(_paired_rule("beats_base", evaluation, "base", cfg.compare_on,
                                  cfg.base_margin))
    if champion is None:
        return rules
    compared = (evaluation.get("champion") or {}).get("version")
    rules.append(_rule("fresh_comparison", compared == champion,
                       f"evaluated against version {compared}, champion is version {champion}"))
    rules.append(_paired_rule("beats_champion", evaluation, "champion", cfg.compare_on,
                              cfg.margin))
    comp = evaluation.get("comparison", {}).get("candidate_vs_champion", {})
    for suite, r in sorted(comp.items()):
        if suite != "all":
            rules.append(_rule(f"max_regression:{suite}", r["diff"] >= -cfg.max_regression,
                               f"diff {r['diff']:+.3f} vs allowed -{cfg.max_regression:.3f}",
                               value=r["diff"], threshold=-cfg.max_regression))
    return rules


def _paired_rule(name: str, evaluation: EvalSummary, other: str, on: str, margin: float) -> dict:
    """The candidate beats ``other``: the paired 95 % lower bound of the difference on ``on``
    (a suite, or 'all') is above ``margin``."""
    comp = evaluation.get("comparison", {}).get(f"candidate_vs_{other}", {})
    row = comp.get(on)
    if row is None:
        return _rule(name, False, f"no paired comparison with the {other} on {on!r} (rows: "
                     f"{', '.join(comp) or 'none'}; is '{other}' in evaluate.models?)")
    return _rule(name, row["lo"] > margin,
                 f"{on}: diff {row['diff']:+.3f}, 95% CI [{row['lo']:+.3f}, {row['hi']:+.3f}], "
                 f"p={row.get('p_value', 1):.3g}, n={row['n']}; lower bound must be > "
                 f"{margin:+.3f}", value=row["lo"], threshold=margin)


# --- the stage ------------------------------------------------------------------------------

def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _eval_tags(evaluation: EvalSummary) -> dict[str, str]:
    tags = {}
    for model, suites in evaluation.get("table", {}).items():
        for suite, r in suites.items():
            tags[f"eval.{model}.{suite}"] = (f"{r['success']:.4f} [{r['lo']:.4f}, {r['hi']:.4f}]"
                                             f" n={r['n']}")
    for name, comp in evaluation.get("comparison", {}).items():
        for suite, r in comp.items():
            tags[f"eval.vs_{name.removeprefix('candidate_vs_')}.{suite}"] = (
                f"{r['diff']:+.4f} [{r['lo']:+.4f}, {r['hi']:+.4f}]"
                f" p={r.get('p_value', float('nan')):.3g}")
    if evaluation.get("budget"):  # the budget it was judged within: deploy's smoke test uses it
        from coaflow.registry import BUDGET_TAG

        tags[BUDGET_TAG] = json.dumps({s: [b["max_turns"], b["max_new_tokens"]]
                                       for s, b in evaluation["budget"].items()})
    return tags


def run(cfg: Config, ctx: Context) -> Result:
    from coaflow.registry import CHALLENGER, Registry, model_name
    from coaflow.schema.markup import DEFAULT_SYSTEM_PROMPT

    ev = ctx.input("evaluate")
    rl, gate = ctx.optional("rl"), ctx.optional("gate")
    source = "rl" if rl is not None else "sft"
    trained = rl or ctx.input("sft")
    model_dir = trained.path("model")
    if not model_dir.is_dir():
        raise PipelineError(f"register: the {source} model folder {model_dir} does not exist")
    name = model_name(ctx.run.name)
    registry = Registry(ctx.registry_uri)

    lineage = {"coaflow.run_id": ctx.run_id, "coaflow.candidate_source": source,
               "coaflow.candidate_key": trained.key or "", "coaflow.sft_key": ctx.input("sft").key,
               "coaflow.evaluate_key": ev.key, "coaflow.gate_key": gate.key if gate else "",
               "coaflow.git_commit": _git_commit()}
    version = registry.find(name, "coaflow.candidate_key", trained.key) if trained.key else None
    if version is None:
        same_store = ctx.tracker.enabled and registry.uri == ctx.tracker.uri
        active = ctx.tracker.mlflow.active_run() if same_store else None
        version = registry.register(
            name, model_dir, tags={**lineage, **_eval_tags(ev.summary)},
            info={"system_prompt": DEFAULT_SYSTEM_PROMPT, "lineage": lineage,
                  "evaluation": ev.summary.get("table", {})},
            experiment=ctx.tracker.experiment, run_id=active.info.run_id if active else None,
            description=f"{source} model of pipeline run {ctx.run_id}")
    else:
        registry.set_alias(name, CHALLENGER, version.version)

    champ = registry.champion(name)
    rules = judge(cfg, ev.summary, gate.summary if gate else None,
                  champ.version if champ else None)
    failed = [r for r in rules if not r["passed"]]
    already = champ is not None and champ.version == version.version
    if already:
        failed = []  # compared with itself: nothing to decide, nothing refused
        promoted, reason = False, f"version {version.version} is already the champion"
    elif failed:
        promoted = False
        reason = "; ".join(f"{r['rule']}: {r['detail']}" for r in failed)
    elif not cfg.promote:
        promoted, reason = False, "every rule passed; register.promote is false, nothing moved"
    else:
        why = (f"beats champion version {champ.version}" if champ else "first version to pass "
               "the absolute rules") + f" (pipeline run {ctx.run_id})"
        registry.promote(name, version.version, why)
        promoted, reason = True, why
    registry.tag(name, version.version, "coaflow.decision",
                 json.dumps({"promoted": promoted, "failed_rules": [r["rule"] for r in failed]}))
    (ctx.out / "decision.json").write_text(json.dumps({"rules": rules, "reason": reason}, indent=2))
    ctx.tracker.set_tags({"coaflow.model": name, "coaflow.model_version": version.version,
                          "coaflow.promoted": promoted})
    ctx.tracker.log_artifact(ctx.out / "decision.json")

    summary: dict[str, Any] = {
        "model": name, "version": version.version, "uri": version.uri, "promoted": promoted,
        "reason": reason, "failed_rules": [r["rule"] for r in failed], "rules": rules,
        "champion_before": champ.version if champ else None,
        "champion": version.version if promoted else (champ.version if champ else None),
        "registry_uri": registry.uri, "candidate": {"source": source, "model": str(model_dir)}}
    result = Result(outputs={"decision": str(ctx.out / "decision.json")},
                    metrics={"promoted": float(promoted), "version": float(version.version),
                             "rules_failed": float(len(failed))}, summary=summary)
    if failed:
        raise PromotionRefused(f"{name} version {version.version} not promoted: {reason}", result)
    return result
