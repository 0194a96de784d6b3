"""Realistic chain-of-agents trajectories for the gate's tests and benchmark.

kbqa: planner -> searcher search(query) -> critic -> searcher open_page(title) -> verifier ->
answerer. calc: planner -> coder python(code) -> critic -> answerer. Names and numbers come from a
seeded generator so that distinct trajectories are not near duplicates of each other.
"""

from __future__ import annotations

import random
from pathlib import Path

from coaflow.schema import (
    ApiAction,
    CodeAction,
    MessageAction,
    Outcome,
    Task,
    TextObservation,
    Trajectory,
    write_jsonl,
)

SYLLABLES = ["ka", "lo", "mir", "ven", "tor", "sa", "bel", "dri", "on", "quo", "rua", "zen", "fa",
             "gil", "hos", "ith", "jun", "kel", "mun", "pra", "sel", "tav", "ul", "vor", "wyn"]


def name(rng: random.Random, parts: int = 3) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def kbqa(i: int, correct: bool = True, seed: int = 0, recovered: bool = False) -> Trajectory:
    rng = random.Random(f"kbqa-{seed}-{i}")
    person, city, country, field = name(rng), name(rng), name(rng, 2), name(rng, 2)
    wrong = name(rng, 2)
    q = f"In which country was the {field.lower()} scholar {person} {name(rng, 2)} born?"
    answer = country if correct else wrong
    content = [
        TextObservation(source="user", content=q),
        MessageAction(agent="planner", content=f"1. find where {person} was born. "
                      "2. find the country of that city. 3. answer with the country."),
        ApiAction(agent="searcher", function="search", kwargs={"query": f"{person} birthplace"},
                  tool_call_id=f"c{i}-1", description=f"Search for {person} first."),
        TextObservation(content=f"1. {person} ({field} scholar), born {rng.randint(1800, 1990)} "
                        f"in {city}.\n2. {city} - a city on the {name(rng)} river.",
                        name="search", tool_call_id=f"c{i}-1"),
        MessageAction(agent="critic", content=f"The first hit says {person} was born in {city}; "
                      "the country is still missing."),
        ApiAction(agent="searcher", function="open_page", kwargs={"title": city},
                  tool_call_id=f"c{i}-2"),
        TextObservation(content=f"{city} is the {rng.randint(2, 40)}th largest city of {country}, "
                        f"founded in {rng.randint(900, 1700)}.", name="open_page",
                        tool_call_id=f"c{i}-2"),
        MessageAction(agent="verifier", content=f"Both hops are supported: {person} -> {city} -> "
                      f"{country}."),
        MessageAction(agent="answerer", content=answer),
    ]
    return Trajectory(
        id=f"kbqa-{seed}-{i}",
        task=Task(suite="kbqa", task_id=f"kbqa-{i}", question=q, answer=country, difficulty=2,
                  metadata={"hops": [person, city, country]}),
        content=content,
        outcome=Outcome(final_answer=answer, reward=float(correct), correct=correct,
                        recovered=recovered),
        provenance={"teacher": "scripted", "seed": seed},
        available_apis=["search", "open_page"],
    )


def calc(i: int, correct: bool = True, seed: int = 0) -> Trajectory:
    rng = random.Random(f"calc-{seed}-{i}")
    a, b, c = rng.randint(10, 999), rng.randint(10, 999), rng.randint(1, 99)
    item = name(rng, 2).lower()
    q = f"A crate holds {a} {item}s and there are {b} crates; {c} {item}s break. How many are left?"
    value = a * b - c
    answer = str(value if correct else value + rng.randint(1, 9))
    content = [
        TextObservation(source="user", content=q),
        MessageAction(agent="planner", content=f"Multiply {a} by {b}, then subtract {c}."),
        CodeAction(agent="coder", content=f"print({a} * {b} - {c})", tool_call_id=f"p{i}",
                   description="Compute it exactly with Python."),
        TextObservation(content=f"{value}\n", name="python", tool_call_id=f"p{i}"),
        MessageAction(agent="critic", content=f"{a} x {b} = {a * b}; minus {c} gives {value}."),
        MessageAction(agent="answerer", content=answer),
    ]
    return Trajectory(
        id=f"calc-{seed}-{i}",
        task=Task(suite="calc", task_id=f"calc-{i}", question=q, answer=str(value), difficulty=1),
        content=content,
        outcome=Outcome(final_answer=answer, reward=float(correct), correct=correct),
        provenance={"teacher": "scripted", "seed": seed},
        available_apis=["python"],
    )


def batch(n: int, seed: int = 0, wrong_every: int = 0) -> list[Trajectory]:
    """``n`` trajectories alternating kbqa and calc; every ``wrong_every``-th one answers wrong."""
    out = []
    for i in range(n):
        correct = not (wrong_every and i % wrong_every == wrong_every - 1)
        out.append(kbqa(i, correct, seed) if i % 2 == 0 else calc(i, correct, seed))
    return out


def write(path: Path, trajs) -> Path:
    write_jsonl(path, trajs)
    return path


def dump(traj: Trajectory) -> dict:
    return traj.model_dump(mode="json")
