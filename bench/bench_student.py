"""Benchmark: does the student copy what decides a task? Two or more trained SFT models side by side.

    .venv/bin/python bench/bench_student.py --model before=RUN_A/sft/model --model after=RUN_B/sft/model
    .venv/bin/python bench/bench_student.py --model after=... --tasks 60 --episodes   # + agent loop

On held-out *test* tasks (``make_tasks(suite, "test", n)``, never trained on), the scripted team
solves each task without mistakes; its trajectory is the reference. Three measures per model:

- **decisive tokens, teacher-forced**: the model reads the reference chat and predicts every token
  of each tool call's arguments and of the final answer (``<answer>...</answer>``); reported as
  token accuracy and as the share of *spans* with every token right (a search query, a page title,
  a program, an answer), per suite and kind. Loss and overall token accuracy hide these tokens
  under predictable prose; this number does not.
- **first call, greedy**: the first assistant turn generated from the question alone. kbqa: its
  search query is the question's entity (hop 1's subject); calc: its program, run in the real
  sandbox, prints the reference answer (for calc this is nearly the whole task).
- **episodes** (``--episodes``): whole multi-turn episodes with the one agent loop,
  ``coaflow.agent.run_episodes`` (greedy), success = the final answer is correct.

Every share is printed with its Wilson 95 % interval. The before/after study of issue 11 (same
accepted data, same steps, run side by side so that a shared CPU slows both alike):

    coaflow run --workdir W --run-id base --only synthesize --only gate
    coaflow stage sft --out W/before --input gate=W/runs/base/gate --set sft.max_steps=120 \
        --set sft.tiny.copy_friendly=false --set sft.decisive_weight=1 --set sft.drop_recovered=false
    coaflow stage sft --out W/after --input gate=W/runs/base/gate --set sft.max_steps=120
    python bench/bench_student.py --model before=W/before/model --model after=W/after/model
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SUITES = ("kbqa", "calc")
ANSWER_SPAN = re.compile(r"<answer>(.*?)</answer>", re.S)
CALL_SPAN = re.compile(r'<tool_call>\n\{"name": "(\w+)", "arguments": (.*?)\}\n</tool_call>', re.S)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of ``k`` successes in ``n``.

    >>> [round(x, 3) for x in wilson(0, 60)]
    [0.0, 0.06]
    """
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def share(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{k}/{n} = {k / max(n, 1):.0%} [{lo:.0%}, {hi:.0%}]"


def reference_trajectories(suite: str, n: int, seed: int) -> list:
    """The scripted team's mistake-free runs on ``n`` test tasks of ``suite``."""
    from coaflow.envs import make_env, make_tasks, task_to_row
    from coaflow.envs.rewards import score
    from coaflow.schema import Outcome, Provenance
    from coaflow.teachers import scripted
    from coaflow.teachers.log import TeamLog, distill

    out = []
    for task in make_tasks(suite, "test", n, seed=seed):
        env = make_env(suite, seed=seed)
        env.reset(**task_to_row(task))
        log = TeamLog(task=task, env=env, suite=suite)
        answer = scripted.solve(task, log, random.Random(f"{seed}-{task.task_id}"),
                                scripted.Mistakes(0.0, 0.0))
        reward = score(suite, answer, task.answer)
        out.append(distill(log, f"{task.task_id}-ref", answer,
                           Provenance(teacher="scripted", seed=seed, model="scripted"),
                           Outcome(final_answer=answer, reward=reward, correct=reward == 1.0)))
    return out


def decisive_spans(text: str, start: int) -> list[tuple[str, int, int]]:
    """``(kind, start, end)`` character spans of the decisive text in a rendered chat from
    ``start`` (the first assistant turn; the system prompt mentions ``<answer>`` too): each tool
    call's arguments (kind = tool name) and each answer."""
    spans = [(m.group(1), m.start(2), m.end(2)) for m in CALL_SPAN.finditer(text, start)]
    spans += [("answer", m.start(1), m.end(1)) for m in ANSWER_SPAN.finditer(text, start)]
    return spans


def teacher_forced(model, tok, trajs: list, max_length: int = 4096) -> dict:
    """Per kind: decisive tokens right / total, spans entirely right / total."""
    import torch

    from coaflow.models.prompt import prompt_messages, to_example

    stats: dict[str, list[int]] = {}
    for t in trajs:
        example = to_example(t)
        text = tok.apply_chat_template(example["messages"], tokenize=False)
        prompt = tok.apply_chat_template(prompt_messages(example), tokenize=False,
                                         add_generation_prompt=True)
        enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
        ids = enc["input_ids"][:max_length]
        with torch.no_grad():
            pred = model(torch.tensor([ids])).logits[0].argmax(-1).tolist()
        right = [False] + [pred[i - 1] == ids[i] for i in range(1, len(ids))]
        offsets = enc["offset_mapping"][:len(ids)]
        for kind, a, b in decisive_spans(text, len(prompt)):
            toks = [i for i, (s, e) in enumerate(offsets) if s < b and e > a]
            if not toks:
                continue
            row = stats.setdefault(f"{t.task.suite}/{kind}", [0, 0, 0, 0])
            row[0] += sum(right[i] for i in toks)
            row[1] += len(toks)
            row[2] += all(right[i] for i in toks)
            row[3] += 1
    return stats


def first_calls(model, tok, trajs: list, max_new_tokens: int, batch_size: int = 16) -> dict:
    """Per suite: [first calls that are right, prompts]."""
    import torch

    from coaflow.envs import call_tool, make_env, task_to_row
    from coaflow.envs.rewards import score
    from coaflow.models.prompt import prompt_messages, to_example
    from coaflow.schema.markup import parse_tool_calls

    end = tok.convert_tokens_to_ids("<|im_end|>")
    tok.padding_side = "left"
    out: dict[str, list[int]] = {s: [0, 0] for s in SUITES}
    for i in range(0, len(trajs), batch_size):
        chunk = trajs[i:i + batch_size]
        prompts = [tok.apply_chat_template(prompt_messages(to_example(t)), tokenize=False,
                                           add_generation_prompt=True) for t in chunk]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=end, pad_token_id=tok.pad_token_id)
        for t, row in zip(chunk, gen[:, enc["input_ids"].shape[1]:].tolist(), strict=True):
            text = tok.decode(row[:row.index(end)] if end in row else row)
            calls = [c for c in parse_tool_calls(text) if "error" not in c]
            ok = False
            if calls and t.task.suite == "kbqa":
                subject = t.task.metadata["hops"][0]["subject"]
                ok = calls[0]["arguments"].get("query") == subject
            elif calls and t.task.suite == "calc" and "code" in calls[0]["arguments"]:
                env = make_env("calc")
                env.reset(**task_to_row(t.task))
                printed = call_tool("calc", "python", calls[0]["arguments"], env=env).strip()
                ok = score("calc", printed.splitlines()[0] if printed else None,
                           t.task.answer) == 1.0
            out[t.task.suite][0] += ok
            out[t.task.suite][1] += 1
    return out


def episodes(model_dir: str, trajs: list, max_turns: int, max_new_tokens: int) -> dict:
    """Per suite and hops: [solved, episodes], with the one agent loop (``coaflow.agent``)."""
    from coaflow.agent import TransformersBackend, run_episodes

    tasks = [t.task for t in trajs]
    done = run_episodes(TransformersBackend(model_dir, batch_size=16), tasks,
                        max_turns=max_turns, max_new_tokens=max_new_tokens)
    out: dict[str, list[int]] = {}
    for task, traj in zip(tasks, done, strict=True):
        for key in (task.suite, f"{task.suite}/{task.difficulty}-hop" if task.suite == "kbqa"
                    else None):
            if key:
                row = out.setdefault(key, [0, 0])
                row[0] += bool(traj.outcome.correct)
                row[1] += 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, metavar="NAME=DIR",
                    help="a trained model folder (repeatable: compared side by side)")
    ap.add_argument("--tasks", type=int, default=60, help="test tasks per suite")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=256, help="greedy tokens per turn")
    ap.add_argument("--episodes", action="store_true", help="also whole agent-loop episodes")
    ap.add_argument("--max-turns", type=int, default=10, help="turns per episode")
    ap.add_argument("--json", help="write the numbers here too")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    refs = [t for s in SUITES for t in reference_trajectories(s, args.tasks, args.seed)]
    results = {}
    for spec in args.model:
        name, _, path = spec.partition("=")
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        t0 = time.time()
        res = {"teacher_forced": teacher_forced(model, tok, refs),
               "first_call": first_calls(model, tok, refs, args.max_new_tokens)}
        if args.episodes:
            res["episodes"] = episodes(path, refs, args.max_turns, args.max_new_tokens)
        res["seconds"] = round(time.time() - t0, 1)
        results[name] = res
    print(f"test tasks: {args.tasks} per suite, seed {args.seed}; models: "
          + ", ".join(args.model))
    for section, cols in (("teacher_forced", ("tokens", "whole spans")),
                          ("first_call", ("right",)), ("episodes", ("solved",))):
        keys = sorted({k for r in results.values() for k in r.get(section, {})})
        if not keys:
            continue
        print(f"\n== {section} ({', '.join(cols)})")
        for k in keys:
            cells = []
            for name, r in results.items():
                row = r.get(section, {}).get(k)
                if row is None:
                    cells.append(f"{name}: -")
                elif section == "teacher_forced":
                    cells.append(f"{name}: {row[0] / row[1]:.0%} tok, {share(row[2], row[3])}")
                else:
                    cells.append(f"{name}: {share(*row)}")
            print(f"  {k:22s} " + " | ".join(cells))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
