"""The agent loop with scripted "models": real tools, real rendering, every way an episode ends."""

import json

import pytest

from coaflow.agent import Completion, category, run_episodes
from coaflow.envs import make_tasks
from coaflow.models.prompt import to_example


def call(name, **args):
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": args})}\n</tool_call>'


class Scripted:
    """A backend whose "model" is a function of the chat so far (same protocol as the real ones)."""

    asynchronous = False
    name = "scripted"

    def __init__(self, policy):
        self.policy, self.batches, self.prompts = policy, [], []

    def generate(self, prompts, tools, *, max_new_tokens, temperature, seed):
        self.batches.append(len(prompts))
        self.prompts.extend(prompts)
        return [self.policy(m) for m in prompts]


def question(messages):
    return next(m["content"] for m in messages if m["role"] == "user")


def observations(messages):
    return [m["content"] for m in messages if m["role"] == "tool"]


@pytest.fixture(scope="module")
def calc_tasks():
    return make_tasks("calc", "test", 3, seed=0)


def test_solves_calc_with_the_real_sandbox_and_renders_as_training_does(calc_tasks):
    exprs = {t.question: t.metadata["expression"] for t in calc_tasks}

    def policy(messages):
        obs = observations(messages)
        if not obs:
            return Completion("<plan>compute it</plan>\n" + call(
                "python", code=f"print({exprs[question(messages)]})"), 12)
        return Completion(f"<answer>{obs[-1].strip()}</answer>", 5)

    backend = Scripted(policy)
    trajs = run_episodes(backend, calc_tasks, max_turns=4, max_new_tokens=64)
    assert [t.outcome.correct for t in trajs] == [True] * 3
    assert backend.batches == [3, 3]  # every live episode in one call per turn
    t = trajs[0]
    assert t.details == {"stop": "answer", "turns": 2, "tool_calls": 1, "tokens": 17,
                         "format_errors": 0, "repeated_calls": 0, "cut_turn": None,
                         "budget": [4, 64]}
    assert category(t) == "solved" and t.provenance.teacher == "policy"
    # the second prompt is exactly the training rendering of the finished episode's first turn
    second = backend.prompts[3]
    assert second == to_example(t)["messages"][:len(second)]
    assert second[-1]["role"] == "tool" and second[-1]["content"].strip() == t.task.answer
    assert second[-2]["content"] == "<plan>compute it</plan>"
    assert json.loads(second[-2]["tool_calls"][0]["function"]["arguments"])["code"].startswith(
        "print(")


def test_bad_calls_get_error_observations_and_the_episode_goes_on(calc_tasks):
    script = [call("python", code="print(6*7)"), call("python", code="print(6*7)"),
              "<tool_call>{not json}</tool_call>", call("calculator", x=1), "<answer>42</answer>"]

    def policy(messages):
        return Completion(script[len(observations(messages))], 8)

    [t] = run_episodes(Scripted(policy), calc_tasks[:1], max_turns=8, max_new_tokens=64)
    obs = [m["content"] for m in to_example(t)["messages"] if m["role"] == "tool"]
    assert obs[0].strip() == "42"
    assert obs[1].startswith("Error: this exact call was already made")
    assert obs[2].startswith("Error: malformed tool call (not JSON")
    assert obs[3].startswith("Error: there is no tool 'calculator'; tools: python")
    assert t.details["repeated_calls"] == 1 and t.details["format_errors"] == 2
    assert t.details["stop"] == "answer" and t.outcome.final_answer == "42"
    assert category(t) == "wrong_answer"


LOOP = "<plan>1. Find the product. " + "2. Find the product of the numbers. " * 3


@pytest.mark.parametrize("completion, max_turns, stop, cat", [
    (Completion(call("python", code="print(1)"), 5), 1, "max_turns", "max_turns"),
    (Completion('<tool_call>{"name": "py', 64, "length"), 5, "turn_tokens", "turn_tokens"),
    (Completion(LOOP, 64, "length"), 5, "repetition", "repetition"),  # seen after the cut
    (Completion(LOOP[:60], 40, "repetition"), 5, "repetition", "repetition"),  # by the backend
    (Completion("", 0, "context"), 5, "context", "context"),
    (Completion("I think it is large.", 6), 5, "no_action", "no_answer"),
    (Completion("<tool_call>[1]</tool_call>", 6), 1, "max_turns", "max_turns"),
    (Completion(call("python", code="print(1)"), 5), 8, "repetition", "repetition"),  # 3rd call
])
def test_every_way_an_episode_ends(calc_tasks, completion, max_turns, stop, cat):
    [t] = run_episodes(Scripted(lambda m: completion), calc_tasks[:1], max_turns=max_turns,
                       max_new_tokens=64)
    assert t.details["stop"] == stop and category(t) == cat
    assert t.outcome.final_answer is None and t.outcome.reward == 0.0
    cut = completion.finish in ("length", "repetition")
    assert t.details["cut_turn"] == (1 if cut else None)
    if stop == "repetition" and not cut:  # the identical call ran once; its repeats did not
        assert t.details["turns"] == 3 and t.details["repeated_calls"] == 2


def test_each_suite_runs_within_its_own_budget():
    from coaflow.agent.budget import Budget

    tasks = make_tasks("calc", "test", 2, seed=0) + make_tasks("kbqa", "test", 2, seed=0)
    seen = []

    class Recording(Scripted):
        def generate(self, prompts, tools, *, max_new_tokens, temperature, seed):
            seen.append(max_new_tokens)
            return super().generate(prompts, tools, max_new_tokens=max_new_tokens,
                                    temperature=temperature, seed=seed)

    trajs = run_episodes(Recording(lambda m: Completion(call("search", query=question(m)), 9)),
                         tasks, budgets={"calc": Budget(2, 32), "kbqa": Budget(3, 48)},
                         max_turns=1, max_new_tokens=8)
    assert [t.details["turns"] for t in trajs] == [2, 2, 3, 3]  # calc has no search: errors
    assert [t.details["budget"] for t in trajs] == [[2, 32]] * 2 + [[3, 48]] * 2
    assert seen == [[32, 32, 48, 48], [32, 32, 48, 48], 48]  # one number once they agree


def test_malformed_without_answer_is_its_own_category(calc_tasks):
    def policy(messages):
        return Completion("<tool_call>{oops}</tool_call>" if not observations(messages)
                          else "no idea", 4)

    [t] = run_episodes(Scripted(policy), calc_tasks[:1], max_turns=5, max_new_tokens=64)
    assert category(t) == "malformed_call" and t.details["turns"] == 2


def test_kbqa_tools_and_finished_episodes_leave_the_batch():
    tasks = make_tasks("kbqa", "test", 4, seed=0)
    first = tasks[0].question

    def policy(messages):
        if question(messages) != first:
            return Completion("<answer>nobody</answer>", 3)
        obs = observations(messages)
        return Completion(call("search", query=first) if not obs else "<answer>x</answer>", 9)

    backend = Scripted(policy)
    trajs = run_episodes(backend, tasks, max_turns=3, max_new_tokens=32, samples=2)
    assert backend.batches == [8, 2]  # the six that answered at once are gone in turn two
    assert [t.id for t in trajs[:2]] == [f"{tasks[0].task_id}-policy-{i}" for i in (0, 1)]
    hit = trajs[0].content[2]
    assert hit.name == "search" and hit.content.startswith("1. ")  # the real BM25 index
