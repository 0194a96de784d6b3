"""Fixtures shared by tests/models and tests/stages/test_sft*.py: synthetic trajectories, a folder
of accepted shards, a hand-built stage context and one tiny model (small sizes: fast tests)."""

from __future__ import annotations

import pytest

from coaflow.schema import write_jsonl
from tests.models.coa_trajectories import make_trajectories

TINY_TEST_SIZES = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16)


@pytest.fixture(scope="session")
def trajectories():
    return make_trajectories(40, seed=3)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, trajectories):
    from coaflow.models import CHAT_TEMPLATE, TinyModel, build_tiny
    from coaflow.models.prompt import render, to_example

    out = tmp_path_factory.mktemp("tiny") / "base"
    corpus = [render(to_example(t), CHAT_TEMPLATE) for t in trajectories]
    return build_tiny(out, corpus, TinyModel(**TINY_TEST_SIZES))


def accepted_dir(path, trajs):
    path.mkdir(parents=True, exist_ok=True)
    write_jsonl(path / "part-00000.jsonl", trajs)
    return path


def make_ctx(root, accepted, overrides=(), resume=False, tracking=False):
    """``(cfg, ctx)`` for calling the sft stage by hand, as the runner would."""
    from coaflow.config import load_config
    from coaflow.contract import Context, Result
    from coaflow.tracking import Tracker

    cfg = load_config("tiny", [f"tracking.enabled={str(tracking).lower()}", f"run.workdir={root}",
                               *overrides])
    out = root / "sft"
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(run_id="test", out=out, run=cfg.run, resume=resume,
                  inputs={"gate": Result(outputs={"accepted": str(accepted)})},
                  tracker=Tracker(root, enabled=tracking))
    return cfg, ctx
