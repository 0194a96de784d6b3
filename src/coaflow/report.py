"""The report card of a pipeline run: one self-contained HTML file, and the same in the terminal.

    coaflow runs show RUN              # the summary in the terminal
    coaflow runs report RUN            # (re)write <workdir>/runs/RUN/report.html

It reads only what the stages left behind: each stage folder's ``result.json`` (timings, the data
funnel, the eval table, the registry decision) and the stage runs' metric histories in MLflow
(training curves). A stage that did not run is shown as such; nothing is invented. Plots are inline
SVG, so the file opens anywhere, offline, with no JavaScript.

Below the card: the shape of evaluate's summary (``EvalSummary``) and its tables, ``table.md`` /
``table.html`` (``eval_markdown``, ``eval_html``), which evaluate writes and the card shows.
"""

from __future__ import annotations

import html
import json
import re
import time
from pathlib import Path
from typing import Any, TypedDict

from coaflow.contract import MARKER, ORDER, read_result

CURVE_PREFIXES = ("train/", "rl/", "reward", "success")


def collect(run_dir: Path) -> dict[str, Any]:
    """Per stage: status (done / cached / incomplete / not run), metrics, summary, outputs."""
    run_dir = Path(run_dir)
    stages: dict[str, Any] = {}
    names = list(ORDER) + sorted(p.name for p in run_dir.iterdir() if p.is_dir()
                                 and p.name not in ORDER and (p / MARKER).exists())
    for name in names:
        folder = run_dir / name
        r = read_result(folder) if folder.is_dir() else None
        if r is None:
            shards = sorted(run_dir.glob(f"{name}-[0-9]*"))  # an engine fanned it out
            stages[name] = {"status": "incomplete" if folder.is_dir() else
                            f"in {len(shards)} shards (below)" if shards else "not run"}
            continue
        cached_from = folder / "cached_from"
        stages[name] = {"status": "cached" if cached_from.exists() else "done",
                        "cached_from": cached_from.read_text() if cached_from.exists() else None,
                        "metrics": r.metrics, "summary": r.summary, "outputs": r.outputs}
    return {"run_id": run_dir.name, "path": str(run_dir), "stages": stages,
            "written_at": time.strftime("%Y-%m-%d %H:%M:%S")}


def mlflow_runs(tracking_uri: str | None, run_id: str) -> list:
    """The MLflow runs of pipeline run ``run_id`` (its parent run and one per stage), or []."""
    if not tracking_uri:
        return []
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri)
        exps = [e.experiment_id for e in client.search_experiments()]
        return client.search_runs(exps, filter_string=f"tags.`coaflow.run_id` = '{run_id}'")
    except Exception as e:  # noqa: BLE001 - the report never fails a run: no MLflow, no curves
        print(f"(report: no MLflow runs from {tracking_uri}: {type(e).__name__}: "
              f"{str(e).splitlines()[0] if str(e) else ''})")
        return []


def run_links(tracking_uri: str | None, runs: list) -> list[tuple[str, str, str | None]]:
    """``(name, mlflow run id, url or None)`` per MLflow run: a URL when the tracking server
    serves the UI (http/https); for a SQLite store, ``mlflow ui --backend-store-uri`` opens it.

    >>> class R:  # a stand-in for an MLflow Run
    ...     class info: run_id, experiment_id, run_name = "abc", "1", "sft"
    ...     class data: tags = {"coaflow.kind": "stage", "coaflow.stage": "sft"}
    >>> run_links("http://mlflow:5000/", [R])
    [('sft', 'abc', 'http://mlflow:5000/#/experiments/1/runs/abc')]
    >>> run_links("sqlite:///w/mlflow.db", [R])[0][2] is None
    True
    """
    out = []
    for r in runs:
        tags = r.data.tags
        name = ("pipeline" if tags.get("coaflow.kind") == "pipeline"
                else tags.get("coaflow.stage", r.info.run_name))
        url = (f"{tracking_uri.rstrip('/')}/#/experiments/{r.info.experiment_id}/runs/"
               f"{r.info.run_id}" if str(tracking_uri).startswith(("http://", "https://"))
               else None)
        out.append((name, r.info.run_id, url))
    order = {n: i for i, n in enumerate(["pipeline", *ORDER])}
    return sorted(out, key=lambda x: order.get(x[0], len(order)))


def curves(tracking_uri: str | None, run_id: str, runs: list | None = None
           ) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Metric histories (step, value) of each stage run of pipeline run ``run_id`` in MLflow:
    the curves logged with a step (loss, token accuracy, reward, success on checkpoints)."""
    runs = mlflow_runs(tracking_uri, run_id) if runs is None else runs
    if not runs:
        return {}
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for run in runs:
        if run.data.tags.get("coaflow.kind") != "stage":
            continue
        stage = run.data.tags.get("coaflow.stage", run.info.run_name)
        for key in run.data.metrics:
            if not key.startswith(CURVE_PREFIXES):
                continue
            hist = client.get_metric_history(run.info.run_id, key)  # the runs were just read
            if len(hist) >= 2:
                out.setdefault(stage, {})[key] = sorted((m.step, m.value) for m in hist)
    return out


# --- text -----------------------------------------------------------------------------------

def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def funnel(stages: dict) -> list[tuple[str, Any]]:
    """Tasks -> trajectories -> accepted, and the rejections by reason."""
    parts = [s["metrics"] for n, s in stages.items() if "metrics" in s
             and (n == "synthesize" or re.fullmatch(r"synthesize-\d+", n))]  # or its shards
    gate = stages.get("gate", {}).get("metrics", {})
    rows: list[tuple[str, Any]] = []
    if parts:
        tried = [int(m.get("trajectories", 0) + m.get("failed_attempts", 0)) for m in parts]
        solved = sum(m.get("teacher_success_rate", 0) * t for m, t in zip(parts, tried, strict=True))
        rows += [("tasks attempted", sum(tried)),
                 ("trajectories written", sum(int(m.get("trajectories", 0)) for m in parts)),
                 ("teacher success rate", solved / sum(tried) if sum(tried) else None)]
    if gate:
        rows += [("accepted by the gate", int(gate.get("accepted", 0)))]
        rows += [(f"rejected: {k.removeprefix('rejected_')}", int(v)) for k, v in gate.items()
                 if k.startswith("rejected_")]
    return rows


def eval_rows(stages: dict) -> list[dict]:
    """One row per model and suite from the evaluate stage's summary ``table``."""
    summary: EvalSummary = stages.get("evaluate", {}).get("summary", {})
    table = summary.get("table", {})
    details = summary.get("details", {})

    def ceiling(model: str, suite: str) -> str:  # the row as a share of the teacher's
        share = details.get(model, {}).get(suite, {}).get("ceiling_share")
        return f"{share:.0%}" if share is not None else ""

    return [{"model": model, "suite": suite, "success": r["success"],
             "ci95": f"[{r['lo']:.2f}, {r['hi']:.2f}]" if "lo" in r else "", "n": r.get("n", ""),
             **({"of ceiling": ceiling(model, suite)} if "teacher" in details else {})}
            for model, suites in table.items() for suite, r in suites.items()]


def budget_rows(stages: dict) -> list[dict]:
    """The budget every evaluated episode ran within, per suite, and the share of the teacher
    runs the student trained on that it fits (a budget below 100 % caps every row)."""
    budget = stages.get("evaluate", {}).get("summary", {}).get("budget") or {}
    return [{"suite": suite, "turns": b["max_turns"], "tokens a turn": b["max_new_tokens"],
             "teacher runs it fits": (f"{b['fits']:.1%} of {b['teacher_runs']}"
                                      if b.get("fits") is not None else "not measured")}
            for suite, b in budget.items()]


def decision(stages: dict) -> str:
    reg = stages.get("register", {})
    if reg.get("status") in (None, "not run", "incomplete"):
        return "not registered (the register stage did not run)"
    s = reg.get("summary", {})
    verdict = "promoted to champion" if s.get("promoted") else "promotion refused"
    why = s.get("reason") or "; ".join(str(r) for r in s.get("failed_rules", []))
    version = s.get("version")
    return f"{verdict}" + (f" (version {version})" if version else "") + (f": {why}" if why else "")


def sample_episode(stages: dict, model: str = "candidate", width: int = 100) -> list[str]:
    """One evaluated episode of ``model`` (a solved one when there is one) as transcript lines:
    the question, each tool call and what the tool returned, the answer, the verdict."""
    from coaflow.schema import ApiAction, CodeAction, MessageAction, TextObservation
    from coaflow.schema.io import read_trajectories

    folder = stages.get("evaluate", {}).get("outputs", {}).get("transcripts")
    path = Path(folder) / f"{model}.jsonl" if folder else None
    if path is None or not path.exists():
        return []
    trajs = list(read_trajectories(path))
    if not trajs:
        return []
    t = next((t for t in trajs if t.outcome.correct), trajs[0])

    def cut(text: str) -> str:
        text = " ".join(str(text).split())
        return text if len(text) <= width else text[:width - 3] + "..."

    lines = [f"sample episode ({model}, {t.task.suite} {t.task.task_id}): {cut(t.task.question)}"]
    for step in t.content[1:]:
        if isinstance(step, ApiAction):
            lines.append(f"  call   {cut(f'{step.function}({json.dumps(step.kwargs)})')}")
        elif isinstance(step, CodeAction):
            lines.append(f"  call   {cut(f'python({json.dumps(step.content)})')}")
        elif isinstance(step, TextObservation):
            lines.append(f"  tool   {cut(step.content)}")
        elif isinstance(step, MessageAction):
            lines.append(f"  {step.agent or 'model':<6} {cut(step.content)}")
    verdict = "solved" if t.outcome.correct else "not solved"
    lines.append(f"  -> {verdict} (answer {t.outcome.final_answer!r}, reference {t.task.answer!r})")
    return lines


def render_text(card: dict) -> str:
    st = card["stages"]
    lines = [f"run {card['run_id']}  ({card['path']})", "", "stage        status      seconds"]
    for name, s in st.items():
        secs = s.get("metrics", {}).get("wall_seconds", "")
        lines.append(f"  {name:<11}{s['status']:<12}{_fmt(secs)}")
    if fun := funnel(st):
        lines += ["", "data funnel"] + [f"  {k:<28}{_fmt(v)}" for k, v in fun]
    if rows := eval_rows(st):
        cols = list(rows[0])
        lines += ["", "evaluation (test split)", "  " + "  ".join(f"{c:<12}" for c in cols)]
        lines += ["  " + "  ".join(f"{_fmt(r.get(c, '')):<12}" for c in cols) for r in rows]
    if budget := budget_rows(st):
        lines += ["  budget: " + "; ".join(f"{b['suite']} {b['turns']} turns x {b['tokens a turn']}"
                                           f" tokens (fits {b['teacher runs it fits']} teacher "
                                           "runs)" for b in budget)]
    if sample := sample_episode(st):
        lines += [""] + sample
    lines += ["", f"registry: {decision(st)}"]
    dep = st.get("deploy", {})
    if dep.get("outputs", {}).get("endpoint"):
        lines.append(f"served at: {dep['outputs']['endpoint']}")
    return "\n".join(lines)


# --- HTML -----------------------------------------------------------------------------------

def svg_chart(series: dict[str, list[tuple[float, float]]], title: str, w: int = 420,
              h: int = 220) -> str:
    """A line chart as inline SVG: one polyline per series, axes with min/max labels.

    >>> "<polyline" in svg_chart({"loss": [(0, 2.0), (10, 1.0)]}, "loss")
    True
    """
    pts = [p for s in series.values() for p in s]
    if not pts:
        return ""
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    pad = 36
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"]

    def xy(x, y):
        return (pad + (x - x0) / (x1 - x0) * (w - 2 * pad),
                h - pad - (y - y0) / (y1 - y0) * (h - 2 * pad))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
             f'role="img" aria-label="{html.escape(title)}">',
             f'<text x="{w / 2}" y="16" text-anchor="middle" font-size="13">{html.escape(title)}'
             '</text>',
             f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#888"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="#888"/>',
             f'<text x="{pad - 4}" y="{h - pad}" text-anchor="end" font-size="10">{y0:.3g}</text>',
             f'<text x="{pad - 4}" y="{pad + 4}" text-anchor="end" font-size="10">{y1:.3g}</text>',
             f'<text x="{pad}" y="{h - pad + 14}" font-size="10">{x0:g}</text>',
             f'<text x="{w - pad}" y="{h - pad + 14}" text-anchor="end" font-size="10">{x1:g}'
             '</text>']
    for i, (name, s) in enumerate(series.items()):
        c = colors[i % len(colors)]
        path = " ".join(f"{a:.1f},{b:.1f}" for a, b in (xy(x, y) for x, y in s))
        parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.8" points="{path}"/>')
        parts.append(f'<text x="{w - pad}" y="{pad + 12 * i}" text-anchor="end" font-size="10" '
                     f'fill="{c}">{html.escape(name)}</text>')
    return "".join(parts) + "</svg>"


def _table(rows: list[dict] | list[tuple], header: list[str] | None = None) -> str:
    if not rows:
        return "<p><em>none</em></p>"
    if isinstance(rows[0], dict):
        header = header or list(rows[0])
        body = [[r.get(c, "") for c in header] for r in rows]
    else:
        body = [list(r) for r in rows]
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in header or [])
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>"
                  for r in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>"


STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1000px;color:#222}
h1{font-size:22px}h2{font-size:17px;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:left}th{background:#f4f4f4}.ok{color:#176a2c}.bad{color:#a11}.charts svg{margin:4px;
border:1px solid #eee}pre{background:#f7f7f7;padding:8px;overflow:auto;font-size:12px}"""


def render_html(card: dict, plots: dict | None = None, mlflow: dict | None = None) -> str:
    """The report card as one HTML page. Everything that comes from disk, config or MLflow (the
    run's and its stage folders' names, paths, metric names, messages) is escaped."""
    st = card["stages"]
    timing = [(n, s["status"], _fmt(s.get("metrics", {}).get("wall_seconds", "")))
              for n, s in st.items()]
    dec = decision(st)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>coaflow run "
             f"{html.escape(card['run_id'])}</title><style>{STYLE}</style></head><body>",
             f"<h1>coaflow run {html.escape(card['run_id'])}</h1>",
             f"<p>{html.escape(card['path'])} &middot; written {html.escape(card['written_at'])}"
             "</p>",
             "<h2>Registry decision</h2>",
             f"<p class='{'ok' if 'promoted to' in dec else 'bad'}'>{html.escape(dec)}</p>",
             "<h2>Stages</h2>", _table(timing, ["stage", "status", "seconds"]),
             "<h2>Data funnel</h2>", _table(funnel(st), ["", "count"])]
    rows = eval_rows(st)
    parts += ["<h2>Evaluation on the held-out test split</h2>", _table(rows),
              "<p>Every row ran within the same budget (turns per episode, tokens per turn), "
              "the teacher's included:</p>", _table(budget_rows(st))]
    ev = st.get("evaluate", {}).get("summary", {})
    for key in ("paired", "comparison", "failures"):
        if ev.get(key):
            parts += [f"<h3>{html.escape(key)}</h3><pre>{html.escape(json.dumps(ev[key], indent=2))}"
                      "</pre>"]
    plots = plots or {}
    if plots:
        parts.append("<h2>Training curves</h2><div class='charts'>")
        for stage, metrics in plots.items():
            for key, series in metrics.items():
                parts.append(svg_chart({key: series}, f"{stage}: {key}"))
        parts.append("</div>")
    links = []
    gate_docs = st.get("gate", {}).get("outputs", {}).get("data_docs")
    if gate_docs:
        index = Path(gate_docs) / "index.html"
        href = html.escape(index.as_uri() if index.is_absolute() else str(index))
        links.append(f"<li><a href='{href}'>Great Expectations Data Docs</a></li>")
    dep = st.get("deploy", {}).get("outputs", {})
    if dep.get("endpoint"):
        links.append(f"<li>served at <code>{html.escape(dep['endpoint'])}</code></li>")
    mlflow = mlflow or {}
    for name, rid, url in mlflow.get("runs", []):
        target = (f"<a href='{html.escape(url)}'>{html.escape(rid)}</a>" if url
                  else f"<code>{html.escape(rid)}</code>")
        links.append(f"<li>MLflow run of {html.escape(name)}: {target}</li>")
    if mlflow.get("runs") and not any(url for _, _, url in mlflow["runs"]):
        links.append("<li>open the MLflow UI with <code>mlflow ui --backend-store-uri "
                     f"{html.escape(mlflow['uri'])}</code></li>")
    if links:
        parts += ["<h2>Links</h2><ul>", *links, "</ul>"]
    parts += ["<h2>Stage metrics</h2>"]
    for name, s in st.items():
        if s.get("metrics"):
            parts += [f"<h3>{html.escape(name)}</h3>",  # a folder's name: anything but '/'
                      _table(sorted(s["metrics"].items()), ["metric", "value"])]
    parts.append("</body></html>")
    return "\n".join(parts)


def write(run_dir: Path, tracking_uri: str | None = None, tracker=None) -> Path:
    """Write ``report.html`` into the run folder (and log it to the run's MLflow parent run
    when ``tracker`` is active). Returns its path."""
    card = collect(run_dir)
    path = Path(run_dir) / "report.html"
    runs = mlflow_runs(tracking_uri, card["run_id"])
    mlflow = {"uri": tracking_uri, "runs": run_links(tracking_uri, runs)} if runs else None
    path.write_text(render_html(card, curves(tracking_uri, card["run_id"], runs), mlflow),
                    encoding="utf-8")
    if tracker is not None:
        tracker.log_artifact(path)
    return path


# --- evaluate's summary: its shape, and its tables ------------------------------------------------

class Rate(TypedDict):
    """Success over ``n`` episodes, with its 95 % Wilson interval."""

    success: float
    lo: float
    hi: float
    n: int


class Paired(TypedDict):
    """Candidate - other on the same tasks: the success difference with its paired bootstrap
    interval, the exact McNemar p-value and the discordant counts."""

    diff: float
    lo: float
    hi: float
    p_value: float
    n: int
    only_candidate: int
    only_other: int


class EvalSummary(TypedDict, total=False):
    """What evaluate hands on (its ``result.json`` summary), read by register's rules and tags,
    this report, ``coaflow runs show`` and the bench scripts. Rows are ``base``, ``sft``,
    ``candidate``, ``champion``, ``teacher`` (or any name a caller gives its specs)."""

    table: dict[str, dict[str, Rate]]  # row -> suite -> success
    details: dict[str, dict[str, dict[str, Any]]]  # row -> suite -> Rate + format errors, turns,
    # tool calls, tokens, categories, cut turns, ceiling_share, pass@k
    slices: dict[str, dict[str, dict[str, dict[str, Rate]]]]  # row -> suite -> key -> group
    tasks: dict[str, int]  # suite -> test tasks
    comparison: dict[str, dict[str, Paired]]  # "candidate_vs_<row>" -> suite or "all"
    seconds: dict[str, float]  # row -> wall seconds
    cached_rows: list[str]  # rows read from the row cache
    budget: dict[str, dict[str, Any]]  # suite -> agent.budget.fit_table's row
    candidate: dict[str, str]  # {"source": "rl" | "sft", "model": folder}
    champion: dict[str, int] | None  # {"version": N}: the champion compared with, or None

def _cell(d: dict) -> str:
    share = d.get("ceiling_share")
    return (f"{d['success']:.1%} [{d['lo']:.1%}, {d['hi']:.1%}]"
            + (f" ({share:.0%} of ceiling)" if share is not None and d.get("n") else ""))


def eval_markdown(summary: EvalSummary) -> str:
    """evaluate's ``table.md``: the budget, then one line per model (per suite success [95 % CI],
    format errors, turns), the difficulty / hop slices, how episodes ended and the paired
    comparisons."""
    details = summary["details"]
    suites = list(summary["tasks"])
    lines = []
    if summary.get("budget"):
        lines += ["| suite | budget | teacher runs it fits |", "|---|---|---|"]
        for s, b in summary["budget"].items():
            fit = (f"{b['fits']:.1%} of {b['teacher_runs']}" if b.get("fits") is not None
                   else "no teacher runs measured (the documented default)")
            lines.append(f"| {s} | {b['max_turns']} turns x {b['max_new_tokens']} tokens | "
                         f"{fit} |")
        lines.append("")
    lines += ["| model | " + " | ".join(f"{s} (n={summary['tasks'][s]})" for s in suites)
              + " | format errors | mean turns | mean tool calls |",
              "|---|" + "---|" * (len(suites) + 3)]
    for model, per in details.items():
        cells = [_cell(per[s]) for s in suites]
        n = sum(per[s]["n"] for s in suites)
        avg = {k: sum(per[s][k] * per[s]["n"] for s in suites) / n
               for k in ("format_error_rate", "mean_turns", "mean_tool_calls")}
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {avg['format_error_rate']:.1%} | "
                     f"{avg['mean_turns']:.2f} | {avg['mean_tool_calls']:.2f} |")
    lines += ["", "| model | suite | slice | success [95 % CI] (n) |", "|---|---|---|---|"]
    for model, per in summary["slices"].items():
        for suite, sl in per.items():
            for key, groups in sl.items():
                for g, r in groups.items():
                    lines.append(f"| {model} | {suite} | {key} {g} | {r['success']:.1%} "
                                 f"[{r['lo']:.1%}, {r['hi']:.1%}] ({r['n']}) |")
    lines += ["", "| model | suite | how episodes ended |", "|---|---|---|"]
    for model, per in details.items():
        for suite in suites:
            cats = ", ".join(f"{k} {v}" for k, v in sorted(per[suite]["categories"].items()))
            cuts = ", ".join(f"turn {k}: {v}" for k, v in per[suite]["cut_turns"].items())
            lines.append(f"| {model} | {suite} | {cats}" + (f" (cut at {cuts})" if cuts else "")
                         + " |")
    for name, comp in summary.get("comparison", {}).items():
        other = name.removeprefix("candidate_vs_")
        lines += ["", f"| candidate - {other} | diff [95 % CI] | McNemar p | n |",
                  "|---|---|---|---|"]
        lines += [f"| {s} | {c['diff']:+.1%} [{c['lo']:+.1%}, {c['hi']:+.1%}] | "
                  f"{c['p_value']:.3g} | {c['n']} |" for s, c in comp.items()]
    return "\n".join(lines) + "\n"


def eval_html(md: str) -> str:
    """``eval_markdown``'s tables as a standalone HTML page (evaluate's ``table.html``)."""
    import html

    parts, in_table = ["<html><body><h1>coaflow evaluation (test split)</h1>"], False
    for line in md.splitlines():
        if not line.startswith("|"):
            parts.append("</table>" if in_table else "")
            in_table = False
            continue
        cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
        if set("".join(cells)) <= {"-"}:
            continue
        tag = "th" if not in_table else "td"
        parts.append(("<table border=1 cellpadding=3>" if not in_table else "")
                     + "<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>")
        in_table = True
    parts.append("</table></body></html>" if in_table else "</body></html>")
    return "\n".join(parts)
