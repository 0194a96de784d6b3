"""Structural validators: each one rejects what it should and passes a well-formed run."""

from __future__ import annotations

import json

import pytest

from coaflow import envs
from coaflow.gates import validators as v
from coaflow.gates.core import _parse
from coaflow.schema import ApiAction, CodeAction, MessageAction, TextObservation
from tests.gates.factory import calc, dump, kbqa


def codes(problems):
    return [c for c, _ in problems]


def tools(suite):
    return v.tool_index(envs.tool_schemas(suite))


@pytest.mark.parametrize("make", [kbqa, calc])
def test_well_formed_runs_pass_every_structural_check(make):
    t = make(3)
    assert v.check_tags(t) == []
    assert v.check_answer(t) == []
    assert v.check_tools(t, tools(t.task.suite)) == []
    assert v.check_length(v.text_chars(t), None, 100_000, 10) == []


def test_schema_errors_name_the_field():
    raw = dump(kbqa(1))
    raw["task"]["question"] = 42
    traj, problems = _parse(raw)
    assert traj is None and problems[0][0] == "schema" and "task.question" in problems[0][1]
    del raw["task"]
    assert _parse(raw)[1][0][1].startswith("task:")
    assert _parse([1, 2])[1] == [("schema", "(record): expected a JSON object, got list")]


def test_unanswered_and_doubly_answered_tool_calls_are_tool_link_errors():
    raw = dump(kbqa(1))
    raw["content"] = [s for s in raw["content"] if s.get("tool_call_id") != "c1-2"
                      or s["class_"] != "text_observation"]
    traj, problems = _parse(raw)
    # no observation after it: the schema keeps the call (real data ends so), the gate refuses it
    assert traj is not None and problems == []
    problems = v.check_links(traj)
    assert problems and problems[0][0] == "tool_link"
    assert "'c1-2' (open_page) has no observation" in problems[0][1]
    raw["content"].append({"class_": "text_observation", "content": "late", "source": "user"})
    traj, problems = _parse(raw)  # an observation after it: a broken link, not a trailing call
    assert traj is None and problems[0][0] == "tool_link"
    raw = dump(kbqa(1))
    raw["content"].insert(4, dict(raw["content"][3]))  # a second observation for c1-1
    assert _parse(raw)[1][0][0] == "tool_link"


def test_tool_call_before_any_plan_or_thought():
    t = kbqa(1)
    t.content = [t.content[0]] + t.content[2:]  # drop the plan ...
    t.content[1] = t.content[1].model_copy(update={"description": None})  # ... and the thought
    problems = v.check_tags(t)
    assert codes(problems) == ["tag_order"] and "before any plan" in problems[0][1]
    # A call that carries its own thought is fine without a plan.
    assert v.check_tags(kbqa(1).model_copy(update={"content": [kbqa(1).content[0]] +
                                                   kbqa(1).content[2:]})) == []


def test_two_answers_and_steps_after_the_answer():
    t = kbqa(1)
    t.content.insert(-1, MessageAction(agent="answerer", content="Maybe"))
    problems = v.check_tags(t)
    assert "tag_order" in codes(problems)
    assert any("2 answers" in d for _, d in problems)
    assert any("step after the answer" in d for _, d in problems)
    t = kbqa(1)
    t.content += [ApiAction(agent="searcher", function="search", kwargs={"query": "x"},
                            tool_call_id="late", description="one more"),
                  TextObservation(content="hit", name="search", tool_call_id="late")]
    problems = v.check_tags(t)
    assert any("step after the answer" in d for _, d in problems)
    assert any("observation after the answer" in d for _, d in problems)


def test_unbalanced_and_nested_tags():
    t = kbqa(1)
    t.content[1] = MessageAction(agent="planner", content="<plan>1. search")
    t.content[4] = MessageAction(agent="critic", content="<think>ok</reflection>")
    problems = v.check_tags(t)
    assert codes(problems) == ["unbalanced_tags", "unbalanced_tags"]
    assert "<plan> inside <plan>" in problems[0][1] and "closes <think>" in problems[1][1]
    t = kbqa(1)
    t.content[-1] = MessageAction(agent="answerer", content="<answer>Veloria")
    assert codes(v.check_tags(t)) == ["unbalanced_tags"]


def test_raw_assistant_text_with_its_own_tags_is_accepted():
    t = kbqa(1)
    t.content[-1] = MessageAction(agent="assistant", content="<think>done</think>"
                                  f"<answer>{t.task.answer}</answer>")
    assert v.check_tags(t) == [] and v.answer_text(t) == t.task.answer


def test_missing_answer():
    t = kbqa(1)
    t.content = t.content[:-1]
    t.outcome.final_answer = None
    assert codes(v.check_answer(t)) == ["no_answer"]
    t.outcome.final_answer = "Veloria"  # an outcome alone still names the answer
    assert v.check_answer(t) == []


def test_unknown_tool_and_bad_arguments_against_the_suite_schemas():
    t = kbqa(1)
    t.content[2] = t.content[2].model_copy(update={"function": "browse"})
    problems = v.check_tools(t, tools("kbqa"))
    assert codes(problems) == ["unknown_tool"] and "'browse'" in problems[0][1]
    t = kbqa(1)
    t.content[2] = t.content[2].model_copy(update={"kwargs": {"q": "x"}})
    t.content[5] = t.content[5].model_copy(update={"kwargs": {"title": 7}})
    details = [d for _, d in v.check_tools(t, tools("kbqa"))]
    assert details == ["content[2] search: unknown argument 'q'",
                       "content[2] search: missing required argument 'query'",
                       "content[5] open_page: argument 'title' should be string, got int"]
    t.content[5] = t.content[5].model_copy(update={"kwargs": {"title": float("nan")}})
    assert "not a finite number" in v.check_tools(t, tools("kbqa"))[-1][1]
    # A python call is valid in calc and not in kbqa.
    c = calc(1)
    assert v.check_tools(c, tools("calc")) == []
    assert codes(v.check_tools(c, tools("kbqa"))) == ["unknown_tool"]


def test_unknown_suite_falls_back_to_available_apis():
    t = kbqa(1)
    t.available_apis = ["search"]
    assert codes(v.check_tools(t, None)) == ["unknown_tool"]
    t.available_apis = None
    assert v.check_tools(t, None) == []


def test_code_action_arguments_are_checked_as_python_code():
    c = calc(1)
    c.content[2] = CodeAction(agent="coder", content="   ", tool_call_id="p1",
                              description="compute")
    assert "required argument 'code' is empty" in v.check_tools(c, tools("calc"))[0][1]


def test_length_in_characters():
    t = kbqa(1)
    n = v.text_chars(t)
    assert n > len(t.task.question)
    assert codes(v.check_length(n, None, n - 1, 10)) == ["too_long"]


def _chat_tokenizer(folder):
    """A real word-level tokenizer with a chat template that renders tool calls, built here."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = [json.dumps(dump(kbqa(i))) for i in range(20)]
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    fast.chat_template = (
        "{% if tools %}tools: {{ tools | tojson }}\n{% endif %}"
        "{% for m in messages %}<|{{ m.role }}|> {{ m.content }}"
        "{% for c in m.tool_calls or [] %} call {{ c.function.name }} "
        "{{ c.function.arguments | tojson }}{% endfor %}\n{% endfor %}")
    fast.save_pretrained(folder)
    return str(folder)


def test_length_in_tokens_of_the_rendered_chat(tmp_path):
    count = v.token_counter(_chat_tokenizer(tmp_path / "tok"), envs.tool_schemas)
    t = kbqa(1)
    n = count(t)
    assert 50 < n < 2000  # the whole chat, tools included
    assert count(calc(1)) != n
    assert codes(v.check_length(v.text_chars(t), n, 100_000, n - 1)) == ["too_long"]
    assert v.check_length(v.text_chars(t), n, 100_000, n) == []


def test_a_folder_without_a_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="gate.tokenizer: cannot load"):
        v.token_counter(str(tmp_path), envs.tool_schemas)
