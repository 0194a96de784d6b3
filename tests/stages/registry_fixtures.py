"""Completed stage folders made by hand (real result.json + marker, as the runner writes them) and
evaluate summaries in the agreed format, for the register and deploy tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from coaflow.contract import MARKER, RESULT, Result


def stage_folder(path: Path, result: Result, key: str) -> Path:
    """A completed stage folder holding ``result`` with cache key ``key``."""
    path.mkdir(parents=True, exist_ok=True)
    (path / RESULT).write_text(json.dumps(result.to_json(base=path)))
    (path / MARKER).write_text(key)
    return path


def sft_folder(root: Path, model_dir: Path, key: str) -> Path:
    """An sft stage folder whose ``model`` is a copy of ``model_dir`` (its own checkpoint)."""
    out = root / f"sft-{key}"
    shutil.copytree(model_dir, out / "model", dirs_exist_ok=True)
    return stage_folder(out, Result(outputs={"model": str(out / "model")}), key)


def gate_folder(root: Path, passed: bool = True, key: str = "gate-key") -> Path:
    summary = {"expectations": {"accepted_rows": True, "duplicate_fraction": passed}}
    return stage_folder(root / f"gate-{key}", Result(summary=summary), key)


def evaluation(success: dict[str, float], champion: int | None = None,
               diff: dict[str, tuple[float, float, float]] | None = None, n: int = 40,
               vs_base: tuple[float, float, float] = (0.3, 0.2, 0.4)) -> dict:
    """An evaluate summary: candidate success per suite; the paired candidate - base (diff, lo,
    hi) over all tasks; with a champion, the paired candidate - champion per suite and for
    "all"."""
    table = {"candidate": {s: {"success": v, "lo": max(0.0, v - 0.15), "hi": min(1.0, v + 0.15),
                               "n": n} for s, v in success.items()}}
    summary = {"table": table, "candidate": {"source": "sft", "model": "x"},
               "champion": {"version": champion} if champion else None}

    def paired(rows):
        return {s: {"diff": d, "lo": lo, "hi": hi, "p_value": 0.01, "n": n}
                for s, (d, lo, hi) in rows.items()}

    summary["comparison"] = {"candidate_vs_base": paired({"all": vs_base})}
    if diff is not None:
        summary["comparison"]["candidate_vs_champion"] = paired(diff)
    return summary


def evaluate_folder(root: Path, summary: dict, key: str) -> Path:
    metrics = {f"eval/candidate/{s}/success": r["success"]
               for s, r in summary["table"]["candidate"].items()}
    return stage_folder(root / f"evaluate-{key}", Result(metrics=metrics, summary=summary), key)
