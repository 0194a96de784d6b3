import pytest

from coaflow.envs import rewards


def test_exact_match_normalizes_and_accepts_lists():
    assert rewards.exact_match("The Varn  Institute.", "varn institute") == 1.0
    assert rewards.exact_match("Varn", ["Kor", "varn"]) == 1.0
    assert rewards.exact_match("Varn Labs", "Varn Institute") == 0.0
    assert rewards.exact_match(None, "x") == 0.0


def test_token_f1_partial_credit():
    assert rewards.token_f1("Varn Labs", "Varn Institute") == 0.5
    assert rewards.token_f1("x", ["y", "x"]) == 1.0


def test_numeric_match_tolerance_and_big_integers():
    assert rewards.numeric_match("$2,419.64", "2419.64") == 1.0
    assert rewards.numeric_match("2419.6400001", "2419.64") == 1.0
    assert rewards.numeric_match("2419.65", "2419.64") == 0.0
    big = str(63529189 * 837811162064 * 740)
    assert rewards.numeric_match(big, big) == 1.0
    assert rewards.numeric_match(str(int(big) + 1), big) == 0.0
    assert rewards.numeric_match("about 5", "5", rel_tol=0.1) == 1.0
    assert rewards.numeric_match("none", "5") == 0.0


def test_format_reward():
    ok = ('<think>look it up</think><tool_call>{"name": "search", "arguments": {"query": "x"}}'
          '</tool_call><answer>x</answer>')
    assert rewards.format_reward(ok) == 1.0
    assert rewards.format_reward("<answer>x") == 0.0
    assert rewards.format_reward("<answer>a</answer> and <answer>b</answer>") == 0.0
    assert rewards.format_reward('<tool_call>{"arguments": {}}</tool_call><answer>a</answer>') == 0.0
    assert rewards.format_reward("<plan>p</think><answer>a</answer>") == 0.0


def test_score_per_suite():
    assert rewards.score("kbqa", "varn labs", "Varn Labs") == 1.0
    assert rewards.score("calc", "15698.8", "15698.80") == 1.0
    assert rewards.score("calc", "15698.81", "15698.80") == 0.0
    assert rewards.score("somefile", "Paris", ["paris", "Paris, France"]) == 1.0
    assert rewards.score("kbqa", None, "x") == 0.0
    assert rewards.is_correct("calc", "42", "42") and not rewards.is_correct("kbqa", "4", "42")


@pytest.mark.parametrize("text", [
    "<think>x<answer>Veloria</answer></think>",  # an answer inside a thought
    "<plan><plan>x</plan></plan><answer>Veloria</answer>",  # a tag inside itself
    "<think>x</think><answer>Veloria</answer>",
])
def test_the_gate_and_the_format_reward_read_tags_alike(text):
    """One check of the markup (``schema.markup``): what the gate quarantines as unbalanced tags
    in a turn, the format reward scores 0, and the other way round. (They were two checks that
    disagreed: the gate let an answer inside a thought through, the reward a tag inside itself.)"""
    from coaflow.gates.validators import check_tags
    from coaflow.schema import MessageAction
    from tests.conftest import make_trajectory

    traj = make_trajectory(1)
    traj.content[-1] = MessageAction(agent="assistant", content=text)
    gate_ok = not [p for p in check_tags(traj) if p[0] == "unbalanced_tags"]
    assert gate_ok == (rewards.format_reward(text) == 1.0)
