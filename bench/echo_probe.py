"""Can a student copy? Greedy echoes of the environments' own sentences, exact-match count.

The student study's direct test of copying (docs/student.md): ``Repeat the text exactly.`` with a
sentence or three of questions and tool results (``sft_data.copy_examples``, drawn from the last
trajectories of a gate folder), the reply compared with the text, and each number of the text
looked for in the reply (as a substring: a loose count). A model trained without echo examples
has never seen the prompt; use it on models trained with ``sft.copy_examples`` or
``sft.copy_warmup_steps``.

    python bench/echo_probe.py --model RUN/sft/model --gate RUN/gate --n 40 --show
"""

from __future__ import annotations

import argparse
import re


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
    from coaflow.stages import sft_data as D

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    trajs = D.load_trajectories(f"{args.gate}/accepted")[-200:]  # the end: sft's held-out side
    echoes = D.copy_examples([to_example(t) for t in trajs], args.n, seed=123)
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
