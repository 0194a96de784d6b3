import functools
import inspect

import pytest

from coaflow import envs
from coaflow.envs.environments import CalcEnv, KBQAEnv, answer_reward
from tests import requires


def _trl_tools(env):
    """Exactly how TRL 1.16's GRPOTrainer lists an environment's tools."""
    return [getattr(env, name) for name, _ in inspect.getmembers(type(env), inspect.isfunction)
            if name not in ("reset", "get_reward") and not name.startswith("_")]


@pytest.mark.parametrize("suite", ["kbqa", "calc"])
def test_trl_schema_extraction_matches_tool_schemas(suite):
    from transformers.utils import get_json_schema

    env = envs.make_env(suite, n_entities=60) if suite == "kbqa" else envs.make_env(suite)
    tools = _trl_tools(env)
    derived = sorted((get_json_schema(t) for t in tools), key=lambda s: s["function"]["name"])
    ours = sorted(envs.tool_schemas(suite), key=lambda s: s["function"]["name"])
    assert derived == ours
    assert all(s["type"] == "function" and s["function"]["parameters"]["required"] for s in ours)


def test_grpo_trainer_accepts_the_environment_factory():
    """TRL 1.16 probes one instance with getmembers(type(env), isfunction): it needs `reset`,
    takes `get_reward` as a reward source and every other public function as a tool. Check the
    installed trainer still probes that way and that our classes expose nothing else."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("trl")  # read the source: importing trl takes ~10 s
    if spec is None:
        requires.module("trl")
    src = (Path(spec.origin).parent / "trainer" / "grpo_trainer.py").read_text()
    assert "inspect.getmembers(type(instance), predicate=inspect.isfunction)" in src
    factory = functools.partial(envs.make_env, "kbqa", n_entities=60)
    env = factory()
    names = {n for n, _ in inspect.getmembers(type(env), inspect.isfunction)}
    assert {"reset", "get_reward", "search", "open_page"} <= names
    assert {n for n in names if not n.startswith("_")} == {"reset", "get_reward", "search",
                                                          "open_page"}


def test_kbqa_episode_reset_tools_reward():
    task = envs.make_tasks("kbqa", "rl", 1, n_entities=60, difficulty_mix={1: 1})[0]
    env = KBQAEnv(seed=5, world_seed=99, n_entities=60)
    assert env.reset(**envs.task_to_row(task), prompt=[{"role": "user", "content": "q"}]) is None
    assert env._world == (0, 60)  # the row's world wins over the constructor's
    subject = task.metadata["hops"][0]["subject"]
    assert subject in env.search(subject)
    assert env.open_page(subject).startswith(f"# {subject}")
    assert env.get_reward() == 0.0
    rewards = answer_reward([[{"role": "assistant", "content": f"<answer>{task.answer}</answer>"}]],
                            environments=[env])
    assert rewards == [1.0] and env.get_reward() == 1.0 and env.n_calls == 2
    env.reset(**envs.task_to_row(task))
    assert env.final_answer is None and env.get_reward() == 0.0


def test_calc_episode():
    task = envs.make_tasks("calc", "rl", 1)[0]
    env = CalcEnv()
    env.reset(**envs.task_to_row(task))
    out = env.python(f"print({task.metadata['expression']})")
    assert out == task.answer
    answer_reward([f"<answer>{out}</answer>"], environments=[env])
    assert env.get_reward() == 1.0


def test_call_tool_errors_are_observations():
    assert envs.call_tool("calc", "python", {"code": "print(1)"}) == "1"
    assert envs.call_tool("calc", "python", {"cod": "x"}).startswith("Error: bad arguments")
    assert envs.call_tool("calc", "python", {"code": ""}).startswith("Error:")
    assert envs.call_tool("calc", "python", {"code": "import sys; sys.exit(3)"})
    assert envs.call_tool("kbqa", "open_page", {"title": "No Such Page"}).startswith("Error:")
    with pytest.raises(ValueError, match="known tools: search, open_page"):
        envs.call_tool("kbqa", "browse", {})
    with pytest.raises(ValueError, match="known suites"):
        envs.call_tool("web", "search", {})


@pytest.mark.slow
def test_grpo_trainer_trains_one_step_with_our_environment(tmp_path, monkeypatch):
    """The real thing: TRL 1.16's GRPOTrainer takes ``partial(make_env, "kbqa")`` as its
    environment_factory, resets one env per rollout from the dataset rows, and logs both
    ``answer_reward`` and the env's ``get_reward`` (column ``KBQAEnv``). ~30 s on 2 cores."""
    requires.module("trl")
    from coaflow.models import tiny
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer
    from trl.chat_template_utils import qwen3_template

    from coaflow.envs import kbqa

    tasks = envs.make_tasks("kbqa", "rl", 4, n_entities=60)
    corpus = [t.question for t in tasks] + list(kbqa.build_world(0, 60).docs.values())
    path = tiny.build_tiny(tmp_path / "m", corpus, tiny.TinyModel(
        vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    tok = AutoTokenizer.from_pretrained(path)
    tok.response_template = qwen3_template  # the tiny Qwen3-style template is not in TRL's list
    rows = [{**envs.task_to_row(t), "prompt": [{"role": "user", "content": t.question}]}
            for t in tasks]
    made = []

    def factory():
        made.append(envs.make_env("kbqa", n_entities=60))
        return made[-1]

    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(path), processing_class=tok,
        args=GRPOConfig(output_dir=str(tmp_path / "o"), per_device_train_batch_size=4,
                        num_generations=2, max_completion_length=16, max_steps=1, report_to=[],
                        logging_steps=1, use_cpu=True, max_tool_calling_iterations=2),
        train_dataset=Dataset.from_list(rows), reward_funcs=[answer_reward],
        environment_factory=factory)
    assert sorted(t.__name__ for t in trainer.tools) == ["open_page", "search"]
    assert trainer.reward_func_names == ["answer_reward", "KBQAEnv"]
    trainer.train()
    logged = trainer.state.log_history[0]
    assert "rewards/KBQAEnv/mean" in logged and "rewards/answer_reward/mean" in logged
    assert any(env.question in {t.question for t in tasks} for env in made)
