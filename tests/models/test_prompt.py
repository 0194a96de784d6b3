"""One prompt layer: training, the agent loop, rl's re-encoding and the server see the same bytes."""

from __future__ import annotations

from pathlib import Path

from coaflow.models.prompt import prompt_messages, render, stop_token_ids, to_example, tools_for


def _kbqa(trajectories):
    return next(t for t in trajectories if t.task.suite == "kbqa" and len(t.tool_calls()) >= 2)


def test_an_example_carries_the_suites_tool_schemas(trajectories):
    ex = to_example(_kbqa(trajectories))
    assert [t["function"]["name"] for t in ex["tools"]] == ["search", "open_page"]
    assert tools_for("no-such-suite") is None  # imported data: no schemas to show
    call = next(m for m in ex["messages"] if m.get("tool_calls"))["tool_calls"][0]
    assert isinstance(call["function"]["arguments"], str)  # JSON text: Arrow-safe


def test_every_model_user_renders_the_same_prompt(tiny_dir, trajectories, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from coaflow.agent.hf import TransformersBackend
    from coaflow.agent.loop import Episode
    from coaflow.agent.openai import to_openai
    from coaflow.config import load_config
    from coaflow.serving.app import ChatRequest, request_tools
    from coaflow.serving.app import to_messages as served_messages
    from coaflow.stages import sft
    from coaflow.stages.rl_rollout import encode_episode

    traj = _kbqa(trajectories)
    ex = to_example(traj)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    # the prompt of the second turn: system + tools, question, first call, its result
    second = [i for i, m in enumerate(ex["messages"]) if m["role"] == "assistant"][1]
    history = ex["messages"][:second]
    expected = render({"messages": history, "tools": ex["tools"]}, tok.chat_template,
                      generation_prompt=True)
    assert '"name": "open_page"' in expected and "<tool_response>" in expected

    # sft: the tokens TRL trains on are those of the rendered example
    cfg = load_config("tiny").sft
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    trainer, _ = sft.build_trainer(cfg, model, tok, [ex], Path(tmp_path))
    trained = trainer.train_dataset[0]["input_ids"]
    assert trained == tok(render(ex, tok.chat_template), add_special_tokens=False)["input_ids"]

    # the agent loop (evaluate, sft's held-out check, rl rollouts, deploy's smoke test)
    episode = Episode(traj.task, max_turns=8, model="m")
    cut = next(i for i, s in enumerate(traj.content) if s.class_ == "text_observation"
               and i > 0 and s.tool_call_id)  # up to the first tool result
    episode.content = traj.content[:cut + 1]
    messages, tools = episode.prompt()
    backend = TransformersBackend.__new__(TransformersBackend)
    backend.tok = tok
    assert backend.render(messages, tools) == expected

    # rl re-encodes a finished episode: its prompt ids are the first turn's rendered prompt
    enc = encode_episode(tok, ex["messages"], None, 4096, ex["tools"])
    first = render({"messages": prompt_messages(ex), "tools": ex["tools"]}, tok.chat_template,
                   generation_prompt=True)
    assert enc.prompt_ids == tok(first, add_special_tokens=False)["input_ids"]

    # the server: an OpenAI request with the same messages and tools
    request = ChatRequest(model="m", messages=to_openai(history[1:]), tools=ex["tools"])
    system = history[0]["content"]
    served = tok.apply_chat_template(served_messages(request, system), tools=request_tools(request),
                                     tokenize=False, add_generation_prompt=True)
    assert served == expected
    assert stop_token_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]
