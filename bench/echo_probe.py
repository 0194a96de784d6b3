"""Can a student copy? Greedy echoes of the environments' own sentences, exact-match count.

The student study's direct test of copying (docs/student.md): ``Repeat the text exactly.`` with a
sentence or three of questions and tool results (``copy_examples`` below, drawn from the last
trajectories of a gate folder), the reply compared with the text, and each number of the text
looked for in the reply (as a substring: a loose count). A model trained without echo examples
has never seen the prompt. (The study mixed such echoes into sft, and trained on them first; it
solved no more tasks, so sft no longer has those knobs: docs/student.md, E2 and E5.)

    python bench/echo_probe.py --model RUN/sft/model --gate RUN/gate --n 40 --show
"""

from __future__ import annotations

import argparse
import re

COPY_PROMPT = "Repeat the text exactly."


def copy_examples(examples: list[dict], n: int, seed: int, max_chars: int = 240) -> list[dict]:
    r"""``n`` echo examples made of the environments' own text: one to three consecutive sentences
    of a question or a tool result in the user turn, the same text as the assistant's reply.

    Copying token for token (a name into a search, a page's value into the answer, a number into
    a program) needs induction heads; a two-layer model trained minutes on the trajectories alone
    copies single-token names but never a digit string. Echoes are short (cheap) and make every
    reply token a copy. Their system prompt differs from the agent's, so they never look like an
    agent turn.

    >>> ex = [{"messages": [{"role": "user", "content": "What is 12 + 30?"},
    ...                     {"role": "tool", "content": "1. Ada: Ada was born in 1852. She lives in "
    ...                      "Ul.\n2. Ul: a city."}]}]
    >>> out = copy_examples(ex, 3, seed=0)
    >>> all(e["messages"][1]["content"] == e["messages"][2]["content"] for e in out), len(out)
    (True, 3)
    """
    import random
    import re

    texts = [m["content"] for e in examples for m in e["messages"]
             if m["role"] in ("user", "tool") and isinstance(m.get("content"), str)]
    # sentences (a period after a word, not a list number "4."), and lines (search results)
    split = re.compile(r"(?<=[a-z0-9)][.?!])\s+(?=[A-Z#0-9])|\n+")
    units = [u for t in texts if (u := [x for x in split.split(t) if len(x.strip()) >= 8])]
    if n <= 0 or not units:
        return []
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        sents = rng.choice(units)
        i = rng.randrange(len(sents))
        span = " ".join(sents[i:i + rng.randint(1, 3)])[:max_chars].strip()
        out.append({"messages": [{"role": "system", "content": COPY_PROMPT},
                                 {"role": "user", "content": span},
                                 {"role": "assistant", "content": span}]})
    return out



def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model folder")
    ap.add_argument("--gate", required=True, help="a completed gate stage folder (its texts)")
    ap.add_argument("--n", type=int, default=40, help="echoes to try")
    ap.add_argument("--show", action="store_true", help="print each text and the reply")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from coaflow.models.prompt import to_example
    from coaflow.stages.sft_data import load_trajectories

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    trajs = load_trajectories(f"{args.gate}/accepted")[-200:]  # the end: sft's held-out side
    echoes = copy_examples([to_example(t) for t in trajs], args.n, seed=123)
    exact = numbers = numbers_copied = 0
    for e in echoes:
        ids = tok.apply_chat_template(e["messages"][:2], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        out = model.generate(ids, max_new_tokens=120, do_sample=False)
        reply = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        target = e["messages"][2]["content"]
        exact += reply == target
        for number in re.findall(r"\d[\d,._]*\d|\d", target):  # each number of the text
            numbers += 1
            numbers_copied += number in reply
        if args.show:
            print(f"{target!r}\n -> {reply!r}")
    print(f"echo exact {exact} / {len(echoes)}; numbers copied {numbers_copied} / {numbers}")


if __name__ == "__main__":
    main()
