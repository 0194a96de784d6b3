"""The batch-level gate: a Great Expectations suite over the per-trajectory table.

The per-record checks decide which trajectories are kept; this suite decides whether the *batch*
is fit to train on at all: enough of it survived, not too much of it is duplicated, every suite
kept enough rows, the kept rows look like agent runs (turns, tool calls within bounds, an answer
each, unique ids). It runs as two GX checkpoints (the trajectory table and the per-suite table)
in an ephemeral context, and the checkpoints' ``UpdateDataDocsAction`` writes the Data Docs HTML
into the stage folder. A failed expectation fails the stage; the message names it.

GX is imported inside the functions: the import alone takes seconds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

SITE = "coaflow_gate"


def expectations(cfg: Any) -> dict[str, list[tuple[str, str, dict]]]:
    """The suite, as ``{table: [(name, ExpectationClass, kwargs), ...]}``; ``name`` is the config
    key the threshold comes from (what the failure message names)."""
    accepted = {"row_condition": "accepted==1", "condition_parser": "pandas"}
    rows = [
        ("rows", "ExpectTableRowCountToBeBetween", {"min_value": 1}),
        ("min_accepted_fraction", "ExpectColumnMeanToBeBetween",
         {"column": "accepted", "min_value": cfg.min_accepted_fraction}),
        ("max_duplicate_fraction", "ExpectColumnMeanToBeBetween",
         {"column": "duplicate", "max_value": cfg.max_duplicate_fraction}),
        ("answer_present", "ExpectColumnValuesToBeInSet",
         {"column": "answer_present", "value_set": [1], **accepted}),
        ("unique_ids", "ExpectColumnValuesToBeUnique", {"column": "id", **accepted}),
        ("turns", "ExpectColumnValuesToBeBetween",
         {"column": "turns", "min_value": cfg.min_turns, "max_value": cfg.max_turns,
          "mostly": cfg.bounds_mostly, **accepted}),
        ("tool_calls", "ExpectColumnValuesToBeBetween",
         {"column": "tool_calls", "min_value": cfg.min_tool_calls,
          "max_value": cfg.max_tool_calls, "mostly": cfg.bounds_mostly, **accepted}),
        ("chars", "ExpectColumnValuesToBeBetween",
         {"column": "chars", "min_value": cfg.min_chars, "max_value": cfg.max_chars,
          "mostly": cfg.bounds_mostly, **accepted}),
        ("min_mean_tool_calls", "ExpectColumnMeanToBeBetween",
         {"column": "tool_calls", "min_value": cfg.min_mean_tool_calls, **accepted}),
    ]
    suites = [
        ("min_rows_per_suite", "ExpectColumnValuesToBeBetween",
         {"column": "accepted", "min_value": cfg.min_rows_per_suite}),
        ("min_suite_accepted_fraction", "ExpectColumnValuesToBeBetween",
         {"column": "accepted_fraction", "min_value": cfg.min_suite_accepted_fraction}),
    ]
    if cfg.required_suites:
        suites.append(("required_suites", "ExpectColumnDistinctValuesToContainSet",
                       {"column": "suite", "value_set": list(cfg.required_suites)}))
    return {"trajectories": rows, "suites": suites}


def suite_table(frame):
    """One row per suite: rows in, accepted, accepted fraction (unreadable lines have no suite)."""
    import pandas as pd

    known = frame[frame["suite"].notna()]
    if known.empty:
        return pd.DataFrame({"suite": pd.Series([], dtype=str), "rows": [], "accepted": [],
                             "accepted_fraction": []})
    g = known.groupby("suite")["accepted"].agg(["count", "sum"]).reset_index()
    g.columns = ["suite", "rows", "accepted"]
    g["accepted_fraction"] = g["accepted"] / g["rows"]
    return g


def quiet_gx() -> None:
    """Great Expectations sends usage analytics unless told not to; set before it is imported
    (every process that imports it calls this first: the gate, its worker processes)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


def run_suite(frame, cfg: Any, docs_dir: Path | None) -> dict:
    """Validate the table; returns ``{"success", "results": [...], "failed": [...], "docs"}``.

    Each result is ``{"name", "expectation", "table", "success", "observed"}``."""
    quiet_gx()
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    actions = []
    if docs_dir is not None:
        context.add_data_docs_site(site_name=SITE, site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                              "base_directory": str(Path(docs_dir).resolve())},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
        actions = [gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=[SITE])]
    source = context.data_sources.add_pandas("coaflow_gate")
    tables = {"trajectories": frame, "suites": suite_table(frame)}
    results, names = [], {}
    for table, specs in expectations(cfg).items():
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe(table)
        suite = context.suites.add(gx.ExpectationSuite(name=f"gate_{table}"))
        for name, cls, kwargs in specs:
            exp = suite.add_expectation(getattr(gxe, cls)(**kwargs, meta={"config_key": name}))
            names[exp.id] = name
        vd = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"gate_{table}", data=batch, suite=suite))
        checkpoint = context.checkpoints.add(gx.Checkpoint(
            name=f"gate_{table}", validation_definitions=[vd], actions=actions,
            result_format="SUMMARY"))
        outcome = checkpoint.run(batch_parameters={"dataframe": tables[table]})
        for vr in outcome.run_results.values():
            for er in vr.results:
                conf = er.expectation_config
                observed = _observed(er.result, er.exception_info)
                rows_at = er.result.get("partial_unexpected_index_list") or []
                if table == "suites" and isinstance(observed, dict) and rows_at:
                    observed["suites"] = [str(tables["suites"]["suite"].iloc[i]) for i in rows_at]
                results.append({
                    "name": (conf.meta or {}).get("config_key") or names.get(conf.id, conf.type),
                    "expectation": conf.type, "table": table, "success": bool(er.success),
                    "observed": observed,
                    "kwargs": {k: v for k, v in conf.kwargs.items() if k != "batch_id"},
                })
    failed = [r for r in results if not r["success"]]
    docs = None
    if docs_dir is not None and (Path(docs_dir) / "index.html").exists():
        docs = str(Path(docs_dir) / "index.html")
    return {"success": not failed, "results": results, "failed": failed, "docs": docs}


def _observed(result: dict, exception_info: Any) -> Any:
    if isinstance(exception_info, dict) and exception_info.get("raised_exception"):
        return f"error: {exception_info.get('exception_message')}"
    if "observed_value" in result:
        v = result["observed_value"]
        return float(v) if hasattr(v, "__float__") and not isinstance(v, (list, dict)) else v
    if "unexpected_count" in result:
        return {"unexpected": int(result["unexpected_count"]),
                "of": int(result.get("element_count", 0)),
                "examples": [_plain(x) for x in (result.get("partial_unexpected_list") or [])[:5]]}
    return None


def _plain(x):
    return x.item() if hasattr(x, "item") else x


def describe_failure(r: dict) -> str:
    """``min_accepted_fraction (expect_column_mean_to_be_between on accepted, min 0.5): observed
    0.31`` — one line a user can act on."""
    kw = r["kwargs"]
    bounds = ", ".join(f"{k.replace('_value', '')} {kw[k]}" for k in ("min_value", "max_value")
                       if kw.get(k) is not None)
    extra = ", ".join(x for x in (bounds, f"mostly {kw['mostly']}" if kw.get("mostly") not in
                                  (None, 1, 1.0) else "",
                                  f"set {kw['value_set']}" if "value_set" in kw else "") if x)
    col = f" on {r['table']}.{kw['column']}" if kw.get("column") else f" on {r['table']}"
    return f"{r['name']} ({r['expectation']}{col}{', ' + extra if extra else ''}): " \
           f"observed {r['observed']}"
