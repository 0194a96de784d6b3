"""A tiny model that has learned one tool call, and a real ``coaflow serve`` process around it.

The model is the tiny Qwen3 of tests/models, trained for a few seconds to answer the kbqa prompt
(the trained system prompt + the question + the tool schemas) with one ``<tool_call>``, so the
server's tool-call, streaming and system-prompt paths are tested against real generation."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).parents[2]
QUESTION = "Who founded Varn Labs?"
CALL = '<tool_call>\n{"name": "search", "arguments": {"query": "Varn Labs"}}\n</tool_call>'
SYSTEM = "You are a team of agents in one model."


def kbqa_tools() -> list[dict]:
    from coaflow.envs import tool_schemas

    return tool_schemas("kbqa")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_turns(n: int = 2) -> list[tuple[list[dict], list[dict]]]:
    """(messages, tools) of the first turn of the deploy smoke test's episodes (kbqa test tasks,
    deploy.smoke_tasks=2, seed 0), as coaflow.agent renders them."""
    from coaflow.agent.loop import Episode
    from coaflow.envs import make_tasks

    return [Episode(t, max_turns=1, model="m").prompt()
            for t in make_tasks("kbqa", "test", n, seed=0)]


def teach_tool_call(src: Path, out: Path, steps: int = 200) -> Path:
    """Copy the model in ``src`` to ``out`` and train it to answer QUESTION (and the first turn of
    the deploy smoke test's episodes) with CALL, until greedy decoding reproduces it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src)
    c = tok(CALL + "<|im_end|>", add_special_tokens=False)["input_ids"]
    rows = []
    chats = [([{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
              kbqa_tools()), *first_turns()]
    for messages, tools in chats:
        prompt = tok.apply_chat_template(messages, tools=tools, tokenize=False,
                                         add_generation_prompt=True)
        rows.append(tok(prompt, add_special_tokens=False)["input_ids"])
    width = max(len(p) for p in rows) + len(c)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, p in enumerate(rows):  # right padding: positions start at 0 for every row
        ids[i, :len(p) + len(c)] = torch.tensor(p + c)
        labels[i, len(p):len(p) + len(c)] = torch.tensor(c)
        mask[i, :len(p) + len(c)] = 1
    target = labels[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        res = model(input_ids=ids, attention_mask=mask, labels=labels)
        # stop once teacher forcing predicts every completion token: greedy decoding then
        # reproduces the call exactly
        hit = res.logits[:, :-1].argmax(-1) == target
        if hit[target != -100].all():
            break
        res.loss.backward()
        opt.step()
        opt.zero_grad()
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "coaflow_model.json").write_text(json.dumps({"system_prompt": SYSTEM}))
    return out


@pytest.fixture(scope="session")
def tool_model(tmp_path_factory, tiny_dir):
    return teach_tool_call(tiny_dir, tmp_path_factory.mktemp("served") / "tool-model")


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), e.get("PYTHONPATH", "")])
    e.pop("MLFLOW_TRACKING_URI", None)
    return e


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout}s")


@pytest.fixture(scope="module")
def server(tool_model, tmp_path_factory):
    """``coaflow serve`` on a free port; always stopped."""
    port = free_port()
    work = tmp_path_factory.mktemp("serve-work")
    proc = subprocess.Popen([sys.executable, "-m", "coaflow.cli", "serve", str(tool_model),
                             "--port", str(port), "--engine", "transformers", "--name", "tiny",
                             "--batch-wait-ms", "50", "--workdir", str(work), "--threads", "1"],
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
