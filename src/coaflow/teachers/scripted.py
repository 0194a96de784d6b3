"""The scripted teacher: an offline multi-agent team that solves tasks with the real tools.

Five agents work on every task:

- **planner** decomposes the task: for kbqa from its hop structure (the relations to follow, never
  the entities in between), for calc into the computation to run and a check;
- **searcher** (kbqa) calls ``search`` and ``open_page`` and finds each next entity by parsing the
  documents it retrieved with ``kbqa.read_relation``;
- **coder** (calc) writes Python and reads what the sandbox printed;
- **critic** reflects on every observation: is this the page we wanted, did the search find the
  entity, does the page state the relation;
- **verifier** checks before answering: the answer is on the page it came from (kbqa), or an
  independent recomputation agrees (calc);
- **answerer** states the final answer.

``terse`` (``synthesize.terse``) keeps the roles and drops the restatements: no thought before a
tool call, the plan without the relations' glosses, a critic's note of the value read and no
verifier's summary (kbqa), the coder's program straight away and no second computation (calc);
the same calls and answers in about half the assistant tokens (a small student has fewer tokens
to get right, and trains on more runs a minute).

Nobody sees the reference answer: every value comes out of a tool observation. To make the data
diverse and give the gates real work, the team makes realistic mistakes at ``mistake_rate`` (a
vague search query, the wrong page, an arithmetic slip in the code), which the critic or verifier
catches and the team recovers from, except at ``unrecovered_rate``, where the mistake slips through
and the answer is wrong.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from coaflow.schema import Task
from coaflow.teachers.log import TeamLog


def team_name(terse: bool) -> str:
    """The team's name in a trajectory's provenance: the style it wrote in travels with the
    data, so the ceiling of an evaluation replays the teacher its student learned from."""
    return "coaflow-scripted-team" + ("-terse" if terse else "")


@dataclass
class Mistakes:
    rate: float = 0.3  # chance of one deliberate, realistic mistake per task
    unrecovered: float = 0.1  # chance that a mistake is not caught

    def pick(self, rng: random.Random, kinds: list[str]) -> tuple[str | None, bool]:
        if rng.random() >= self.rate:
            return None, False
        return rng.choice(kinds), rng.random() < self.unrecovered / max(self.rate, 1e-9)


# --- kbqa ----------------------------------------------------------------------------------------

SEARCH_HIT = re.compile(r"^\s*\d+\.\s+(.+?):\s", re.M)


def _titles(observation: str) -> list[str]:
    r"""Titles listed in a ``search`` observation, one ``N. Title: snippet`` line per hit.

    >>> _titles("1. Varn Labs: Varn Labs was founded...\n2. Port Sel: The city...")
    ['Varn Labs', 'Port Sel']
    """
    return SEARCH_HIT.findall(observation)


def _compare(values: dict[str, str], pick: str) -> str:
    """The entity whose number is the smaller (earlier, older, smaller) or the larger.

    >>> _compare({"A": "1,200", "B": "950"}, "larger")
    'A'
    """
    number = {k: float(re.sub(r"[^\d.]", "", v) or "nan") for k, v in values.items()}
    choose = min if pick in ("earlier", "older", "smaller") else max
    return choose(number, key=number.get)


def _find_entity(log: TeamLog, name: str, rng: random.Random, mistake: str | None,
                 caught: bool, terse: bool = False) -> tuple[str | None, str]:
    """Search for ``name`` and open its page. Returns (page text, title actually opened)."""
    query = name
    if mistake == "vague_query":
        words = name.split()
        query = words[-1] if len(words) > 1 else name[: max(3, len(name) // 2)]
    obs = log.call("searcher", "search", {"query": query},
                   thought=None if terse else f"I need the page of {name}; search for it.")
    titles = _titles(obs)
    log.note("searcher", titles=titles)
    if name not in titles:
        log.say("critic", f"The results for '{query}' do not list {name}; the query was too "
                "vague. Search again with the full name.")
        log.note("critic", caught="vague_query")
        obs = log.call("searcher", "search", {"query": f'"{name}"' if query == name else name},
                       thought=f"Search with the full name {name}.")
        titles = _titles(obs)
        if name not in titles:
            log.say("critic", f"{name} is still not among the results; open the closest title.")
    target = name if name in titles else (titles[0] if titles else name)
    if mistake == "wrong_page":
        others = [t for t in titles if t != name]
        if others:
            target = rng.choice(others)
    page = log.call("searcher", "open_page", {"title": target},
                    thought=None if terse else f"Open the page of {target}.")
    if target != name:
        if caught or mistake != "wrong_page":
            log.say("critic", f"This page is about {target}, not {name}: wrong page. Open "
                    f"{name} instead.")
            log.note("critic", caught="wrong_page")
            page = log.call("searcher", "open_page", {"title": name},
                            thought=f"Open the page of {name}.")
            target = name
        else:
            log.say("critic", f"The page of {target} should tell us what we need.")
    return page, target


def solve_kbqa(task: Task, log: TeamLog, rng: random.Random, mistakes: Mistakes,
               terse: bool = False) -> str | None:
    from coaflow.envs import kbqa

    meta = task.metadata
    hops = meta["hops"]
    mistake, slips = mistakes.pick(rng, ["vague_query", "wrong_page"])
    bad_step = rng.randrange(len(hops)) if mistake else -1

    def read_fact(i: int, entity: str, relation: str) -> tuple[str | None, str, str]:
        """Hand-off to the searcher, find the page, parse the fact; the critic reports."""
        if not terse:
            log.say("planner", f"Find the {relation} of {entity}.", to="searcher")
        page, opened = _find_entity(log, entity, rng, mistake if i == bad_step else None,
                                    not slips, terse)
        value = kbqa.read_relation(page, relation)
        log.note("searcher", entity=entity, page=opened, relation=relation, value=value)
        if value is None:
            log.say("critic", f"The page of {opened} does not state the {relation}; we cannot "
                    "go on from here.")
        elif terse:
            log.say("critic", f"{relation} of {opened}: {value}.")
        else:
            log.say("critic", f"The page of {opened} gives the {relation}: {value}.")
        return value, page, opened

    if meta.get("type") == "comparison":
        a, b = meta["entities"]
        attr, pick = meta["attribute"], meta["pick"]
        log.say("planner", f"1. Find the {attr} of {a}. 2. Find the {attr} of {b}. "
                f"3. Compare them and pick the {pick}.")
        values = {}
        for i, name in enumerate((a, b)):
            values[name] = read_fact(i, name, attr)[0]
            if values[name] is None:
                return None
        answer = _compare(values, pick)
        log.say("verifier", f"{a}: {values[a]}; {b}: {values[b]}. The {pick} is {answer}" + (
            "." if terse else "; both values were read from their own pages."))
        return answer

    relations = [h["relation"] for h in hops]
    desc = [kbqa.RELATIONS.get(r, r) for r in relations]
    plan = " ".join(f"{i + 1}. Find the {r}" + ("" if terse else f" ({d})")
                    + (f" of {hops[0]['subject']}." if i == 0 else " of that.")
                    for i, (r, d) in enumerate(zip(relations, desc, strict=True)))
    log.say("planner", plan)
    entity, page, opened = hops[0]["subject"], "", ""
    for i, relation in enumerate(relations):
        value, page, opened = read_fact(i, entity, relation)
        if value is None:
            return None
        entity = value
    if terse:
        pass  # the critic's note of the last value is the check
    elif entity in page:
        log.say("verifier", f"Checked: the page of {opened} states {entity} as the "
                f"{relations[-1]}, and each hop followed the page of the previous answer.")
    else:  # pragma: no cover - read_relation only returns text from the page
        log.say("verifier", f"{entity} does not appear on the page of {opened}; unsure.")
    return entity


# --- calc ----------------------------------------------------------------------------------------

_OPS = {"+": "-", "-": "+", "*": "+", "/": "*"}


def _slip(expression: str, rng: random.Random) -> str:
    """An arithmetic slip: one operator swapped or one number off by one."""
    numbers = list(re.finditer(r"(?<![\w.])\d+(?![\w.])", expression))
    if numbers and rng.random() < 0.5:
        m = rng.choice(numbers)
        return expression[: m.start()] + str(int(m.group()) + rng.choice((-1, 1))) + \
            expression[m.end():]
    ops = [m for m in re.finditer(r"(?<=[\w)\s])[+\-*/](?=[\s\w(])", expression)]
    if not ops:
        return expression + " + 1"
    m = rng.choice(ops)
    return expression[: m.start()] + _OPS[m.group()] + expression[m.end():]


MONEY = re.compile(r"f'\{round\((.*), (\d+)\):\.\d+f\}'")


def _program(expression: str, name: str = "result") -> str:
    """The code a coder writes for a computation: plain statements, rounding where asked.

    >>> print(_program("f'{round(100 * 1.05 ** 2, 2):.2f}'"))
    result = 100 * 1.05 ** 2
    print(f'{round(result, 2):.2f}')
    """
    imports = ""
    if "__import__('datetime')" in expression:
        expression = expression.replace("__import__('datetime').", "datetime.")
        imports = "import datetime\n"
    money = MONEY.fullmatch(expression)
    if money:
        digits = money.group(2)
        return (f"{imports}{name} = {money.group(1)}\n"
                f"print(f'{{round({name}, {digits}):.{digits}f}}')")
    return f"{imports}{name} = {expression}\nprint({name})"


def _first_line(observation: str) -> str | None:
    if observation.startswith("Error"):
        return None
    lines = [ln.strip() for ln in observation.splitlines() if ln.strip()]
    return lines[0] if lines else None


def as_written(expression: str, question: str) -> str:
    """The expression with each number spelled as the question spells it: ``1,078`` in the
    question becomes Python's ``1_078`` (same value), so a student copies it token for token
    instead of learning to drop separators while copying.

    >>> as_written("sum(i ** 2 for i in range(1, 1078 + 1))", "from 1 to 1,078?")
    'sum(i ** 2 for i in range(1, 1_078 + 1))'
    >>> as_written("31801 * 12", "31801 crates")  # not grouped in the question: unchanged
    '31801 * 12'
    """
    def spell(m: re.Match) -> str:
        n = int(m.group())
        return f"{n:_}" if f"{n:,}" in question else m.group()

    return re.sub(r"(?<![\w.])\d{4,}(?![\w.])", spell, expression)


def solve_calc(task: Task, log: TeamLog, rng: random.Random, mistakes: Mistakes,
               terse: bool = False) -> str | None:
    expression = as_written(task.metadata["expression"], task.question)
    money = MONEY.fullmatch(expression)
    shown = money.group(1) if money else expression.replace("__import__('datetime').", "datetime.")
    mistake, slips = mistakes.pick(rng, ["arithmetic_slip"])
    if terse and not mistake:  # the program is the computation; what it prints, the answer
        log.say("planner", "1. Compute it in Python. 2. Answer with what it prints.")
        value = _first_line(log.call("coder", "python", {"code": _program(expression)}))
        if value is not None:
            log.say("critic", f"The program printed {value}.")
        return value
    log.say("planner", "1. Turn the problem into one exact computation. 2. Run it in Python. "
            "3. Check the result with an independent computation before answering.")
    log.say("planner", f"Compute {shown}" + (f", rounded to {money.group(2)} decimals." if money
                                              else "."), to="coder")
    code = _program(_slip(expression, rng) if mistake else expression)
    obs = log.call("coder", "python", {"code": code}, thought="Write the computation as code.")
    value = _first_line(obs)
    log.say("critic", f"The program printed {value}." if value is not None else
            f"The program failed: {obs.splitlines()[-1]}")
    if mistake and slips:  # the slip goes unnoticed: nobody rechecks
        log.say("verifier", "The computation looks right.")
        return value
    check = log.call("verifier", "python", {"code": _program(expression, "expected")},
                     thought="Recompute from the plan, independently of the coder's program.")
    checked = _first_line(check)
    if checked is None:
        log.say("verifier", f"The check failed too: {check.splitlines()[-1]}")
        return None
    if checked != value:
        log.say("verifier", f"The check gives {checked}, not {value}: the first program has a "
                "mistake. Fix the code and run it again.")
        log.note("verifier", caught="arithmetic_slip")
        obs = log.call("coder", "python", {"code": _program(expression)},
                       thought="Correct the slip in the computation.")
        value = _first_line(obs)
        log.say("critic", f"The corrected program printed {value}, which matches the check.")
    else:
        log.say("verifier", f"The independent check also gives {checked}.")
    return value


SOLVERS = {"kbqa": solve_kbqa, "calc": solve_calc}


def solve(task: Task, log: TeamLog, rng: random.Random, mistakes: Mistakes,
          terse: bool = False) -> str | None:
    """Run the team on one task; the returned answer is None when the team gives up."""
    if task.suite not in SOLVERS:
        raise ValueError(f"the scripted teacher knows suites {sorted(SOLVERS)}, not "
                         f"{task.suite!r}; use --teacher llm for other tasks")
    return SOLVERS[task.suite](task, log, rng, mistakes, terse)
