"""Shared fixtures: a realistic chain-of-agents trajectory and an isolated workdir."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from coaflow.schema import (  # noqa: E402
    ApiAction,
    MessageAction,
    Outcome,
    Task,
    TextObservation,
    Trajectory,
)


def make_trajectory(i: int = 0, correct: bool = True) -> Trajectory:
    """A two-hop kbqa run by a planner, a searcher, a critic and an answerer."""
    q = f"In which country is the city where Mira Kolb{i} was born?"
    return Trajectory(
        id=f"traj-{i}",
        task=Task(suite="kbqa", task_id=f"kbqa-{i}", split="train", question=q, answer="Veloria",
                  difficulty=2, metadata={"hops": [{"subject": f"Mira Kolb{i}",
                                                    "relation": "birthplace"}]}),
        content=[
            TextObservation(source="user", content=q),
            MessageAction(agent="planner", content="1. find Mira's birthplace 2. find its country"),
            ApiAction(agent="searcher", function="search", kwargs={"query": f"Mira Kolb{i}"},
                      tool_call_id="c1", description="Look up Mira first."),
            TextObservation(content="1. Mira Kolb: born in Ostrava Nova", name="search",
                            tool_call_id="c1"),
            MessageAction(agent="critic", content="The hit names the birthplace: Ostrava Nova."),
            ApiAction(agent="searcher", function="open_page", kwargs={"title": "Ostrava Nova"},
                      tool_call_id="c2"),
            TextObservation(content="Ostrava Nova is a city in Veloria.", name="open_page",
                            tool_call_id="c2"),
            MessageAction(agent="verifier", content="Both hops are supported by the pages."),
            MessageAction(agent="answerer", content="Veloria" if correct else "Ostrava"),
        ],
        outcome=Outcome(final_answer="Veloria" if correct else "Ostrava", reward=float(correct),
                        correct=correct),
        provenance={"teacher": "scripted", "seed": i},
    )


@pytest.fixture
def traj() -> Trajectory:
    return make_trajectory()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "work"


@pytest.fixture(autouse=True)
def _no_leaked_tracking_uri():
    """A test that points MLflow somewhere (``mlflow.set_tracking_uri`` also writes
    ``$MLFLOW_TRACKING_URI``) must not send the next test's runs into its store."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if env is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = env

