"""Realistic chain-of-agents trajectories for the SFT tests and the SFT benchmark.

Two kinds, shaped like the teacher's output on the built-in suites: multi-hop KBQA with ``search``
and ``open_page`` tool calls (long observations: result lists and pages), and arithmetic word
problems solved with a ``python`` call. Every one has a question, a planner message, tool calls
with observations, a critic/verifier reflection and an answer; some recover from a bad first
search. Deterministic for a seed.
"""

from __future__ import annotations

import random

from coaflow.schema import (
    ApiAction,
    CodeAction,
    MessageAction,
    Outcome,
    Provenance,
    Task,
    TextObservation,
    Trajectory,
)

SYL = ["ka", "lo", "mi", "ren", "tor", "va", "sel", "dun", "bri", "os", "ma", "fen", "quil", "ar",
       "thi", "no", "gard", "pel", "zu", "ion"]
FILLER = ("The archive notes that the record was compiled from several regional sources and "
          "checked against the annual registry. Later editions corrected minor spelling errors "
          "and added cross references to related entries in the catalogue.")
TOOLS = ("search", "open_page", "python")


def name(rng: random.Random, parts: int = 2) -> str:
    return "".join(rng.choice(SYL) for _ in range(parts)).capitalize()


def kbqa(rng: random.Random, i: int) -> Trajectory:
    film, director, city, year = f"The {name(rng)} {rng.choice(['Road', 'Tide', 'Crown', 'Hour'])}", \
        f"{name(rng)} {name(rng, 3)}", name(rng), rng.randint(1950, 2020)
    festival = f"{city} Film Festival"
    q = f"Who directed the film that won the top prize at the {year} {festival}?"
    slug = f"{city.lower()}-{year}"
    steps: list = [
        MessageAction(agent="planner", content=f"1. Find which film won the top prize at the {year} "
                      f"{festival}. 2. Open its page and find the director. 3. Check and answer."),
    ]
    n = 0

    def call(agent, fn, kwargs, thought, obs):
        nonlocal n
        n += 1
        cid = f"call_{i}_{n}"
        steps.append(ApiAction(agent=agent, function=fn, kwargs=kwargs, tool_call_id=cid,
                               description=thought))
        steps.append(TextObservation(content=obs, name=fn, tool_call_id=cid))

    recovered = rng.random() < 0.3
    if recovered:
        call("searcher", "search", {"query": f"{festival} winners"}, "Search the festival first.",
             "\n".join(f"{k + 1}. [{city.lower()}-{rng.randint(1950, 2020)}] {festival} "
                       f"{rng.randint(1950, 2020)} edition. {FILLER[:90]}" for k in range(4)))
        steps.append(MessageAction(agent="critic", content=f"These results do not cover {year}; "
                                   "the query needs the year."))
    others = "\n".join(f"{k + 2}. [{name(rng).lower()}-{k}] {name(rng)} {name(rng)}: "
                       f"{FILLER[: rng.randint(60, 150)]}" for k in range(rng.randint(2, 4)))
    call("searcher", "search", {"query": f"{year} {festival} top prize"},
         f"Search for the {year} winner.",
         f"1. [{slug}] {festival} {year}: the top prize went to {film}. {FILLER}\n{others}")
    call("searcher", "open_page", {"url": f"wiki/{slug}"}, "Open the edition page to confirm.",
         f"{festival} {year}\n\nTop prize: {film}, directed by {director}. "
         f"{FILLER} {FILLER[: rng.randint(50, 200)]}")
    steps.append(MessageAction(agent="critic", content=f"The page names {film} as the winner and "
                               f"{director} as its director; the evidence is consistent."))
    steps.append(MessageAction(agent="answerer", content=director))
    return Trajectory(
        id=f"kbqa-{i:05d}", content=steps,
        task=Task(suite="kbqa", task_id=f"kbqa-{i:05d}", question=q, answer=director,
                  difficulty=2),
        outcome=Outcome(final_answer=director, reward=1.0, correct=True, recovered=recovered),
        provenance=Provenance(teacher="scripted", seed=i), available_apis=["search", "open_page"])


def calc(rng: random.Random, i: int) -> Trajectory:
    a, b, c = rng.randint(3, 60), rng.randint(2, 40), rng.randint(1, 99)
    item = rng.choice(["pens", "apples", "bolts", "tickets", "books"])
    q = (f"A shop packs {item} in boxes of {a}. It sells {b} boxes and then gets {c} {item} "
         f"back as returns. How many {item} did it sell in the end?")
    ans = str(a * b - c)
    cid = f"call_{i}_1"
    steps = [
        MessageAction(agent="planner", content=f"Compute boxes times box size, minus the returns: "
                      f"{b} * {a} - {c}."),
        CodeAction(agent="coder", content=f"sold = {b} * {a}\nreturned = {c}\nprint(sold - returned)",
                   tool_call_id=cid, description="Let the interpreter do the arithmetic."),
        TextObservation(content=ans + "\n", name="python", tool_call_id=cid),
        MessageAction(agent="verifier", content=f"{b} * {a} = {a * b}; minus {c} gives {ans}. "
                      "Correct."),
        MessageAction(agent="answerer", content=ans),
    ]
    return Trajectory(
        id=f"calc-{i:05d}", content=steps,
        task=Task(suite="calc", task_id=f"calc-{i:05d}", question=q, answer=ans, difficulty=1),
        outcome=Outcome(final_answer=ans, reward=1.0, correct=True),
        provenance=Provenance(teacher="scripted", seed=i), available_apis=["python"])


def make_trajectories(n: int, seed: int = 0, kbqa_share: float = 0.6) -> list[Trajectory]:
    rng = random.Random(seed)
    return [kbqa(rng, i) if rng.random() < kbqa_share else calc(rng, i) for i in range(n)]
