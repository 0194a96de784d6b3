"""The transformers engine in process, on the tiny model: continuous batching over kept keys and
values gives every row exactly what it would get alone (``model.generate``), whoever joins,
leaves or is set aside meanwhile; a prompt is encoded once (a row never re-encodes its context
when the batch changes); a prompt that extends an earlier context reuses its keys and values;
places are shared by request, so ``n`` rows cannot keep a short request out."""

from __future__ import annotations

import asyncio

import pytest

from coaflow.serving.engine import TransformersEngine, fair_shares


@pytest.fixture(scope="module")
def engine(tiny_dir):
    eng = TransformersEngine(tiny_dir, max_batch=3, threads=1, prefill_chunk=16, batch_wait_ms=0)
    yield eng
    eng.shutdown()


def _prompt(engine, text: str) -> list[int]:
    return engine.prompt_ids([{"role": "user", "content": text}], None)


def _alone(engine, ids: list[int], max_tokens: int) -> str:
    """What ``generate`` gives this prompt on its own (greedy, the engine's end of turn)."""
    import torch

    with torch.no_grad():
        out = engine.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                    dtype=torch.long), max_new_tokens=max_tokens, do_sample=False,
                                    eos_token_id=sorted(engine.eos_ids),
                                    pad_token_id=sorted(engine.eos_ids)[0])
    return engine.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


async def _run(engine, ids, max_tokens, n=1, delay=0.0, **kw):
    await asyncio.sleep(delay)
    seqs = engine.submit(ids, n, max_tokens, engine.sampling(0, None), [],
                         asyncio.get_running_loop(), **kw)
    for s in seqs:
        while (await s.events.get())[0] not in ("done", "error"):
            pass
    return seqs


def test_rows_joining_leaving_and_set_aside_decode_as_alone(engine):
    texts = ["Who founded Varn Labs?", "What is the capital of the country where Oona Rimtho "
             "was born, and who is its mayor?", "hi", "Compute 12 * 34 and then add 5."]
    prompts = [_prompt(engine, t) for t in texts]
    lengths = [48, 30, 12, 40]
    before = dict(engine.stats)

    async def main():  # 4 requests, one of them n=2, 3 places, arriving while others decode
        return await asyncio.gather(*(_run(engine, p, m, n=2 if i == 1 else 1, delay=0.05 * i)
                                      for i, (p, m) in enumerate(zip(prompts, lengths, strict=True))))

    results = asyncio.run(main())
    for ids, m, seqs in zip(prompts, lengths, results, strict=True):
        want = _alone(engine, ids, m)
        assert [s.text for s in seqs] == [want] * len(seqs)
    # every prompt encoded once: no row re-encoded its context when the batch changed
    encoded = engine.stats["prefill_tokens"] - before["prefill_tokens"]
    reused = engine.stats["prefix_cache_tokens"] - before["prefix_cache_tokens"]
    assert encoded + reused == sum(len(p) for p in prompts)
    assert engine.stats["max_batch_seen"] <= 3


def test_a_prompt_that_extends_an_earlier_context_reuses_it(engine):
    first = _prompt(engine, "Tell me about Zantal Labs and the people who work there.")
    done = asyncio.run(_run(engine, first, 24))[0]
    follow = engine.prompt_ids([{"role": "user", "content": "Tell me about Zantal Labs and the "
                                 "people who work there."},
                                {"role": "assistant", "content": done.text},
                                {"role": "user", "content": "And who founded it?"}], None)
    assert follow[:len(first)] == first
    before = dict(engine.stats)
    again = asyncio.run(_run(engine, follow, 24))[0]
    reused = engine.stats["prefix_cache_tokens"] - before["prefix_cache_tokens"]
    assert reused >= len(first)
    assert engine.stats["prefill_tokens"] - before["prefill_tokens"] == len(follow) - reused
    assert again.text == _alone(engine, follow, 24)


def test_places_are_shared_by_request_not_by_row(engine):
    """n=3 rows fill the 3 places; a short request arriving later gets one (a row of the big
    request is set aside with its keys and values, and resumes to the same text)."""
    big, short = _prompt(engine, "Count slowly: one, two, three"), _prompt(engine, "hi")
    before = engine.stats["preemptions"]
    order = []

    async def main():
        async def one(ids, m, n, delay):
            seqs = await _run(engine, ids, m, n=n, delay=delay, ignore_eos=True)
            order.append(n)
            return seqs

        return await asyncio.gather(one(big, 200, 3, 0), one(short, 4, 1, 0.3))

    rows, _ = asyncio.run(main())
    assert order == [1, 3], "the short request waited for the n=3 request"
    assert engine.stats["preemptions"] > before
    assert len({s.text for s in rows}) == 1 and all(len(s.ids) == 200 for s in rows)


def test_fair_shares():
    assert fair_shares([16, 1], 16) == [15, 1]
    assert fair_shares([2, 9, 1], 8) == [2, 5, 1]
    assert fair_shares([], 4) == []


def test_logprobs_are_the_models_own(engine):
    import torch

    ids = _prompt(engine, "Who founded Varn Labs?")
    s = asyncio.run(_run(engine, ids, 3, logprobs=2))[0]
    assert len(s.token_logprobs) == len(s.ids)
    with torch.no_grad():
        logits = engine.model(torch.tensor([ids])).logits[0, -1].float()
    first = torch.log_softmax(logits, -1)
    tok, lp, top = s.token_logprobs[0]
    assert tok == int(first.argmax()) == top[0][0] and len(top) == 2
    assert lp == pytest.approx(float(first[tok]), abs=1e-4)
