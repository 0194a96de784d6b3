"""The agent: one multi-turn loop that runs a chat model in a suite's environment.

    from coaflow.agent import TransformersBackend, run_episodes
    from coaflow.envs import make_tasks
    trajs = run_episodes(TransformersBackend("runs/r/sft/model", batch_size=16),
                         make_tasks("calc", "test", 20), max_turns=6, max_new_tokens=256)
    [t.outcome.correct for t in trajs]

Backends: ``TransformersBackend`` (in process, batched across episodes) and ``OpenAIBackend``
(any OpenAI-compatible endpoint, async with a concurrency limit); ``models.make_backend(spec)``
picks one for a folder, hub id, ``models:/NAME@ALIAS`` or URL. Evaluation, the SFT held-out check
and RL rollouts all generate through ``run_episodes``; the loop is in ``loop.py``.
"""

from coaflow.agent.loop import Completion, Episode, category, run_episodes


def __getattr__(name: str):
    # The backends import torch / httpx: loaded when asked for, so `import coaflow.agent` is light.
    if name == "TransformersBackend":
        from coaflow.agent.hf import TransformersBackend
        return TransformersBackend
    if name == "OpenAIBackend":
        from coaflow.agent.openai import OpenAIBackend
        return OpenAIBackend
    raise AttributeError(name)


__all__ = ["Completion", "Episode", "OpenAIBackend", "TransformersBackend", "category",
           "run_episodes"]
