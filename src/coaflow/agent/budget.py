"""The budget an agent episode runs within, measured against the teacher's own solutions.

An episode ends without an answer when it runs out of turns (``max_turns``) or a turn runs out of
tokens (``max_new_tokens``). A budget below what the task takes caps success for every model,
silently, and rl inside it rewards only shortcuts. So the budget is derived from the data the
student was trained on: each accepted teacher run, rendered as the student sees it
(``models.prompt.to_example`` with the student's chat template and tokenizer), is a list of
assistant turns of so many tokens each (``<|im_end|>`` included: the budget counts it too).

    runs = teacher_runs(trajectories, tokenizer)   # {suite: [(turns, longest turn), ...]}
    fits(runs["kbqa"], Budget(8, 256))              # the share of runs the budget lets through
    derive(runs["kbqa"])                            # the smallest that fits 99 %, plus a margin

kbqa takes 3 assistant turns for 1 hop (search, open, answer), 5 for 2 hops, 7 for 3; calc takes
3-4 turns of up to ~230 tokens (digits are one token each). ``DEFAULTS`` fit today's scripted
teacher and serve a standalone ``coaflow evaluate`` that has no training data to measure.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Budget:
    max_turns: int
    max_new_tokens: int

    def __str__(self) -> str:
        return f"{self.max_turns} turns x {self.max_new_tokens} tokens"


# What ``derive`` picks on the teacher runs the default profile's sft trains on (SmolLM2's
# tokenizer, one token per digit; `bench/budget_fit.py --gate RUN/gate/accepted`): kbqa runs take
# 3/5/7 turns (1/2/3 hops) of at most 132 tokens, calc 3 turns of at most 230. Used where there
# are no teacher runs to measure (a standalone `coaflow evaluate`, deploy without a tag).
DEFAULTS = {"kbqa": Budget(8, 144), "calc": Budget(4, 256)}
FALLBACK = Budget(8, 256)  # a suite with no default (imported tasks)

COVERAGE = 0.99     # the derived budget lets this share of the teacher's runs through ...
MARGIN_TURNS = 1    # ... plus one turn (a malformed call the student recovers from) ...
MARGIN_TOKENS = 0.1  # ... and a tenth more tokens a turn (a student writes a little more)
LEAST_FIT = 0.95    # an explicit budget that lets fewer through is refused unless asked for


def default_budget(suite: str) -> Budget:
    return DEFAULTS.get(suite, FALLBACK)


def turn_token_ids(example: dict, tokenizer, chat_template: str | None = None
                   ) -> list[list[int]]:
    """The token ids of each assistant turn of ``example`` (``to_example``'s messages + tools)
    as the model generates it: a ``{% generation %}`` span of the chat template, up to and with
    its end-of-turn token (the newline the template writes after it is not generated)."""
    from coaflow.models.prompt import stop_token_ids

    out = tokenizer.apply_chat_template(example["messages"], tools=example.get("tools") or None,
                                        tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True,
                                        chat_template=chat_template)
    stops = set(stop_token_ids(tokenizer))
    turns: list[list[int]] = []
    current: list[int] | None = None
    for token, trained in zip(out["input_ids"], out["assistant_masks"], strict=True):
        if not trained:
            current = None
            continue
        if current is None:
            current = []
            turns.append(current)
        if not current or current[-1] not in stops:
            current.append(token)
    return turns


Run = tuple[int, int]  # a teacher run's shape: (assistant turns, tokens of its longest turn)


def teacher_runs(trajectories, tokenizer, chat_template: str | None = None
                 ) -> dict[str, list[Run]]:
    """``{suite: [(turns, longest turn), ...]}`` of ``trajectories`` (teacher runs) rendered as
    the student sees them."""
    from coaflow.models.prompt import to_example

    by_suite: dict[str, list[Run]] = defaultdict(list)
    for t in trajectories:
        turns = turn_token_ids(to_example(t), tokenizer, chat_template)
        if turns:
            by_suite[t.task.suite].append((len(turns), max(len(x) for x in turns)))
    return dict(by_suite)


def fits(runs: list[Run], budget: Budget) -> float:
    """The share of ``runs`` that ``budget`` lets through whole (1.0 when there are none).

    >>> fits([(2, 20), (3, 10), (1, 300)], Budget(2, 64))
    0.3333333333333333
    """
    if not runs:
        return 1.0
    ok = sum(t <= budget.max_turns and k <= budget.max_new_tokens for t, k in runs)
    return ok / len(runs)


def _quantile(values: list[int], q: float) -> int:
    """The smallest value that at least a share ``q`` of ``values`` do not exceed."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def derive(runs: list[Run], coverage: float = COVERAGE, margin_turns: int = MARGIN_TURNS,
           margin_tokens: float = MARGIN_TOKENS) -> Budget:
    """The smallest budget that fits ``coverage`` of ``runs``, plus the margin; tokens rounded
    up to a multiple of 16.

    >>> derive([(3, 90)] * 50 + [(5, 100)] * 50)
    Budget(max_turns=6, max_new_tokens=112)
    """
    if not runs:
        raise ValueError("no teacher runs to derive a budget from")
    turns = _quantile([t for t, _ in runs], coverage)
    within = [k for t, k in runs if t <= turns]
    tokens = _quantile(within, coverage)
    while fits(runs, Budget(turns, tokens)) < coverage:  # joint coverage: widen the tokens
        tokens = min(k for k in within if k > tokens)
    return Budget(turns + margin_turns, 16 * math.ceil(tokens * (1 + margin_tokens) / 16))


def fit_table(runs_by_suite: dict[str, list[Run]], budgets: dict[str, Budget]) -> dict:
    """Per suite: the budget, the share of teacher runs it fits, and what the runs look like."""
    table = {}
    for suite, budget in budgets.items():
        runs = runs_by_suite.get(suite) or []
        longest = sorted(k for _, k in runs)
        table[suite] = {**asdict(budget), "fits": fits(runs, budget) if runs else None,
                        "teacher_runs": len(runs),
                        "teacher_turns_max": max((t for t, _ in runs), default=None),
                        "teacher_longest_turn_median": longest[len(longest) // 2] if runs else None,
                        "teacher_longest_turn_max": longest[-1] if runs else None}
    return table


def resolve(suites: list[str], runs_by_suite: dict[str, list[Run]], *,
            max_turns: int | dict[str, int] | None = None,
            max_new_tokens: int | dict[str, int] | None = None, allow_tight: bool = False,
            field: str = "evaluate") -> tuple[dict[str, Budget], dict]:
    """``(budgets, fit table)`` for ``suites``. ``max_turns`` / ``max_new_tokens`` (one number,
    one per suite, or None) set a budget explicitly; what they leave open is derived from the
    teacher's runs (``derive``; ``DEFAULTS`` when there are none). An explicit budget that fits
    fewer than ``LEAST_FIT`` of the runs raises ``ValueError`` naming the share and the budget
    that would fit, unless ``allow_tight``."""
    budgets: dict[str, Budget] = {}
    for suite in suites:
        runs = runs_by_suite.get(suite) or []
        derived = derive(runs) if runs else default_budget(suite)
        turns, tokens = _setting(max_turns, suite), _setting(max_new_tokens, suite)
        budget = Budget(turns or derived.max_turns, tokens or derived.max_new_tokens)
        share = fits(runs, budget)
        if (turns or tokens) and runs and share < LEAST_FIT and not allow_tight:
            raise ValueError(
                f"{field}: the budget {budget} fits {share:.0%} of the {len(runs)} {suite} "
                f"teacher runs the student trained on (at least {LEAST_FIT:.0%} needed); "
                f"{derived} fits {fits(runs, derived):.0%}. Leave {field}.max_turns / "
                f"max_new_tokens unset to use it, or set {field}.tight_budget=true to judge "
                "within a tight budget on purpose")
        budgets[suite] = budget
    return budgets, fit_table(runs_by_suite, budgets)


def _setting(value: int | dict[str, int] | None, suite: str) -> int | None:
    return value.get(suite) if isinstance(value, dict) else value


RECORD = "budget.json"  # in the sft stage's folder: the teacher runs it trained on, measured


def write_record(path, runs_by_suite: dict[str, list[Run]], budgets: dict[str, Budget],
                 teacher: str | None = None) -> None:
    """The measured teacher runs, the budgets derived from them and the teacher that made most
    of them (its provenance name: the ceiling row replays that teacher) as ``RECORD``."""
    import json

    path.write_text(json.dumps({"teacher": teacher,
                                "budgets": {s: asdict(b) for s, b in budgets.items()},
                                "fit": fit_table(runs_by_suite, budgets),
                                "runs": {s: [list(r) for r in runs]
                                         for s, runs in runs_by_suite.items()}}, indent=1))


def read_record(path) -> dict[str, list[Run]]:
    """``{suite: runs}`` of a ``RECORD`` (empty when there is none)."""
    import json
    from pathlib import Path

    if not path or not Path(path).is_file():
        return {}
    return {s: [tuple(r) for r in runs]
            for s, runs in json.loads(Path(path).read_text())["runs"].items()}


def recorded_teacher(path) -> str | None:
    """The teacher a ``RECORD`` names (None when there is no record)."""
    import json
    from pathlib import Path

    if not path or not Path(path).is_file():
        return None
    return json.loads(Path(path).read_text()).get("teacher")
