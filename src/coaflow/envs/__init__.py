"""Verifiable task suites, their tools and rewards: what the whole pipeline trains and tests on.

    from coaflow import envs
    tasks = envs.make_tasks("kbqa", "train", 100, seed=0)        # list[coaflow.schema.Task]
    envs.call_tool("kbqa", "search", {"query": "Varn Labs"})      # the observation text
    env = envs.make_env("calc")                                   # a TRL environment
    envs.rewards.score("calc", "1,050.00", "1050")                # 1.0

Suites: ``kbqa`` (multi-hop questions over a seeded fictional world; tools ``search`` and
``open_page``) and ``calc`` (exact-arithmetic word problems; tool ``python`` in the sandbox).
Files of other tasks load with ``envs.external.load_tasks``.

Splits ``train`` / ``rl`` / ``validation`` / ``test`` come from different random streams *and* from disjoint
slices of question space (a question belongs to the split its hash falls into), so the same
question can never appear in two splits whatever the seeds and sizes; ``check_disjoint`` verifies
it on any set of task lists.
"""

from __future__ import annotations

import hashlib
import random

from coaflow.envs import calc, kbqa, rewards
from coaflow.schema import Task

SUITES = {"kbqa": kbqa, "calc": calc}
# hash buckets of 10; validation (rl's checkpoint choice) was carved out of rl's two buckets, so
# train and test hold exactly the questions they held before
SPLITS = {"train": range(0, 6), "rl": range(6, 7), "validation": range(7, 8), "test": range(8, 10)}
DEFAULT_MIX = {1: 0.3, 2: 0.4, 3: 0.3}
KBQA_DEFAULTS = {"world_seed": 0, "n_entities": 400}

__all__ = ["SUITES", "SPLITS", "call_tool", "check_disjoint", "check_suite_counts", "get_suite", "make_env",
           "make_tasks", "rewards", "task_to_row", "tool_schemas"]


# The most tasks of one suite a config may ask for. The task list is made whole before any is
# solved (~2 KB a task, and the shards must agree on it), and a suite draws each question once:
# kbqa's default world holds fewer than 10,000 distinct train questions. Past this a count is a
# typo (``-n 2000000000`` ran out of memory after validation passed).
MAX_TASKS = 100_000


def check_suite_counts(counts: dict[str, int], least: int = 0) -> dict[str, int]:
    """A config's ``{suite: task count}``: known suites, each count at least ``least`` and at
    most ``MAX_TASKS`` (the one check behind ``synthesize.suites`` and ``evaluate.suites``)."""
    if not counts and least > 0:
        raise ValueError("name at least one suite")
    for name, n in counts.items():
        if name not in SUITES:
            raise ValueError(f"unknown suite {name!r} (suites: {', '.join(SUITES)})")
        if n < least:
            raise ValueError(f"{name}: a task count is {least} or more, got {n}")
        if n > MAX_TASKS:
            raise ValueError(f"{name}: at most {MAX_TASKS:,} tasks per suite, got {n:,}")
    return counts


def get_suite(name: str):
    """The suite module called ``name``; ValueError listing the known suites otherwise."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; known suites: {', '.join(SUITES)}")
    return SUITES[name]


def _bucket(question: str) -> int:
    return int(hashlib.sha256(rewards.normalize_answer(question).encode()).hexdigest(), 16) % 10


def _levels(n: int, mix: dict, rng: random.Random) -> list[int]:
    """``n`` difficulty levels in the proportions of ``mix`` (largest remainder), shuffled."""
    mix = {int(k): float(v) for k, v in mix.items() if float(v) > 0}
    bad = [k for k in mix if k not in (1, 2, 3)]
    if bad or not mix:
        raise ValueError(f"difficulty_mix: levels must be 1, 2 or 3 with positive weights, got {mix}")
    total = sum(mix.values())
    exact = {k: n * v / total for k, v in mix.items()}
    counts = {k: int(x) for k, x in exact.items()}
    for k in sorted(exact, key=lambda k: exact[k] - counts[k], reverse=True)[: n - sum(counts.values())]:
        counts[k] += 1
    levels = [k for k, c in sorted(counts.items()) for _ in range(c)]
    rng.shuffle(levels)
    return levels


def make_tasks(suite: str, split: str, n: int, seed: int = 0, difficulty_mix: dict | None = None,
               **kw) -> list[Task]:
    """``n`` tasks of ``suite`` for ``split``, the same for the same arguments.

    ``difficulty_mix`` maps difficulty 1/2/3 to a weight (default 0.3/0.4/0.3). kbqa also takes
    ``world_seed`` (default 0) and ``n_entities`` (default 400): every split of a world shares
    the same pages, only the questions differ.
    """
    module = get_suite(suite)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known splits: {', '.join(SPLITS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"{suite}-{split}-{seed}")
    if suite == "kbqa":
        unknown = set(kw) - set(KBQA_DEFAULTS)
        opts = {**KBQA_DEFAULTS, **kw}
        world = kbqa.build_world(int(opts["world_seed"]), int(opts["n_entities"]))
        extra = {"world": {"seed": int(opts["world_seed"]), "n_entities": int(opts["n_entities"])}}
    else:
        unknown, world, extra = set(kw), None, {}
    if unknown:
        raise ValueError(f"make_tasks({suite!r}): unknown options {sorted(unknown)}")
    tasks, seen = [], set()
    for level in _levels(n, difficulty_mix or DEFAULT_MIX, rng):
        for _ in range(500):
            item = module.draw(world, rng, level) if world is not None else module.draw(rng, level)
            if item is None:
                continue
            key = rewards.normalize_answer(item["question"])
            if key in seen or _bucket(item["question"]) not in SPLITS[split]:
                continue
            seen.add(key)
            digest = hashlib.sha1(key.encode()).hexdigest()[:12]
            tasks.append(Task(suite=suite, task_id=f"{suite}-{split}-{digest}", split=split,
                              question=item["question"], answer=item["answer"],
                              difficulty=item["difficulty"], metadata={**item["metadata"], **extra}))
            break
        else:
            raise ValueError(f"could not draw {n} distinct {suite} questions of difficulty {level} "
                             f"for split {split!r}; ask for fewer or use a bigger world")
    return tasks


def check_disjoint(*task_lists: list[Task]) -> None:
    """Raise ValueError naming the first question that appears in two different splits."""
    where: dict[str, str] = {}
    for tasks in task_lists:
        for t in tasks:
            key = f"{t.suite}\x00{rewards.normalize_answer(t.question)}"
            if key in where and where[key] != t.split:
                raise ValueError(f"question in splits {where[key]!r} and {t.split!r}: {t.question!r}")
            where[key] = t.split


def task_to_row(task: Task) -> dict:
    """A flat dataset row for TRL (``reset(**row)``): question, answer, suite, task_id, world."""
    row = {"question": task.question, "answer": task.answer if isinstance(task.answer, str)
           else (task.answer or [""])[0], "suite": task.suite, "task_id": task.task_id}
    world = task.metadata.get("world")
    if world:
        row.update(world_seed=world["seed"], n_entities=world["n_entities"])
    return row


def tool_schemas(suite: str) -> list[dict]:
    """OpenAI function-tool schemas of the suite's tools (identical to what TRL derives)."""
    import copy

    from coaflow.envs.environments import TOOL_SCHEMAS

    get_suite(suite)
    return copy.deepcopy(TOOL_SCHEMAS[suite])


def make_env(suite: str, seed: int = 0, **kw):
    """A fresh TRL environment for ``suite`` (``functools.partial(make_env, "kbqa")`` is a valid
    ``environment_factory``). ``kw`` go to the class (kbqa: world_seed, n_entities, top_k,
    max_page_chars - the world defaults match ``make_tasks``'; calc: timeout_s, memory_mb,
    max_output). Call ``env.reset(**task_to_row(task))`` before each task: a kbqa env then
    switches to the task's world."""
    from coaflow.envs.environments import ENV_CLASSES

    get_suite(suite)
    return ENV_CLASSES[suite](seed=seed, **kw)


def call_tool(suite: str, tool: str, args: dict, env=None, seed: int = 0, **env_kw) -> str:
    """Run one tool call and return the observation; a bad call becomes an ``Error:`` text.

    Without ``env`` a fresh one is made with ``make_env(suite, seed, **env_kw)``. Unknown suites
    or tools raise ValueError naming the known ones.
    """
    names = [s["function"]["name"] for s in tool_schemas(suite)]
    if tool not in names:
        raise ValueError(f"unknown tool {tool!r} for suite {suite!r}; known tools: {', '.join(names)}")
    env = env if env is not None else make_env(suite, seed=seed, **env_kw)
    if not isinstance(args, dict):
        return f"Error: arguments must be a JSON object, got {type(args).__name__}."
    try:
        return str(getattr(env, tool)(**args))
    except TypeError as e:
        return f"Error: bad arguments for {tool}: {e}. Expected: {', '.join(_params(suite, tool))}."
    except Exception as e:  # a tool failure is an observation the agent can react to
        return f"Error: {tool} failed: {type(e).__name__}: {e}"


def _params(suite: str, tool: str) -> list[str]:
    schema = next(s for s in tool_schemas(suite) if s["function"]["name"] == tool)
    return list(schema["function"]["parameters"]["properties"])
