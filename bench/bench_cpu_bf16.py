"""bf16 autocast vs float32 for training steps of Qwen3-shaped students on this CPU.

oneDNN runs bfloat16 matrix products natively on CPUs with AVX-512 BF16 / AMX (``sft.bf16`` uses
them when ``models.loading.cpu_bf16()`` says so). The gain grows with the width: the 0.66M default is too
narrow to profit (1.19x), a 4M model trains ~1.5x faster.

    python bench/bench_cpu_bf16.py            # prints tokens/s and the ratio per shape
"""

from __future__ import annotations

import argparse
import time


def tokens_per_second(hidden, layers, bf16, seq=768, batch=8, steps=4, vocab=3200):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=hidden // 4, max_position_embeddings=4096, tie_word_embeddings=True)
    model = Qwen3ForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.randint(0, vocab, (batch, seq))
    times = []
    for _ in range(steps + 1):  # the first step warms up
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    return batch * seq * steps / sum(times[1:]), sum(p.numel() for p in model.parameters())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="128x2,256x4", help="WIDTHxLAYERS,...")
    args = ap.parse_args(argv)
    from coaflow.models.loading import cpu_bf16

    print(f"native bf16 kernels on this CPU: {cpu_bf16()}")
    for shape in args.shapes.split(","):
        h, n = (int(v) for v in shape.split("x"))
        fp32, params = tokens_per_second(h, n, False)
        bf16, _ = tokens_per_second(h, n, True)
        print(f"width {h} layers {n} ({params / 1e6:.2f}M params): float32 {fp32:,.0f} tok/s, "
              f"bf16 {bf16:,.0f} tok/s -> {bf16 / fp32:.2f}x")


if __name__ == "__main__":
    main()
