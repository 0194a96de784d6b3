import random

import pytest

from coaflow.envs import environments, kbqa, make_tasks


@pytest.fixture(scope="module")
def world():
    return kbqa.build_world(3, 120)


def test_world_is_deterministic_and_sized(world):
    assert kbqa.build_world.__wrapped__(3, 120).docs == world.docs
    assert 100 <= len(world.entities) <= 140
    assert {e["type"] for e in world.entities.values()} == {"person", "org", "city", "country"}
    assert kbqa.build_world.__wrapped__(4, 120).docs != world.docs


def test_every_fact_parses_back_from_its_page(world):
    """read_relation is how the scripted teacher reads pages: it must recover every fact and
    invent none (mentions of other entities must not look like facts)."""
    for name, ent in world.entities.items():
        for rel in kbqa.RELATIONS:
            want = kbqa._fmt(rel, ent[rel]) if rel in ent else None
            assert kbqa.read_relation(world.docs[name], rel) == want, (name, rel, world.docs[name])


def test_read_relation_rejects_unknown_relation():
    with pytest.raises(ValueError, match="known: founder"):
        kbqa.read_relation("x", "nope")


def test_pages_mention_other_entities(world):
    mentions = sum(sum(other in doc for other in world.docs if other != name)
                   for name, doc in world.docs.items())
    assert mentions > len(world.docs)


def test_chains_are_correct_and_answerable_from_pages(world):
    tasks = make_tasks("kbqa", "train", 60, seed=1, world_seed=3, n_entities=120)
    kinds = {(t.metadata["type"], t.difficulty) for t in tasks}
    assert {("chain", 1), ("chain", 2), ("chain", 3), ("comparison", 2)} <= kinds
    for t in tasks:
        hops = t.metadata["hops"]
        if t.metadata["type"] == "chain":
            assert hops[0]["subject"] in t.question and len(hops) == t.difficulty
            node = hops[0]["subject"]
            for hop in hops:  # follow the chain the way an agent would: page by page
                got = kbqa.read_relation(world.docs[node], hop["relation"])
                assert got == hop["object"]
                node = got
            assert node == t.answer
            assert t.answer not in t.question
        else:
            a, b = t.metadata["entities"]
            va, vb = (int(kbqa.read_relation(world.docs[x], t.metadata["attribute"])
                          .replace(",", "")) for x in (a, b))
            small = t.metadata["pick"] in ("earlier", "older", "smaller")
            assert t.answer == (a if (va < vb) == small else b)


def test_search_finds_the_entity_and_open_page_reads_it(world):
    name = world.of_type("org")[0]
    out = environments.search(3, 120, name, top_k=5)
    assert out.splitlines()[0].startswith(f"1. {name}:")
    assert len(out.splitlines()) == 5
    page = environments.open_page(3, 120, name.lower(), max_chars=50)
    assert page.startswith(f"# {name}\n") and "truncated" in page
    miss = environments.open_page(3, 120, name[:-1])
    assert miss.startswith("Error: no page titled") and name in miss
    assert environments.search(3, 120, "qqqzzzx").startswith("No results")
    assert environments.search(3, 120, "  ").startswith("Error:")


def test_draw_rejects_circular_chains(world):
    rng = random.Random(0)
    for _ in range(300):
        q = kbqa.chain_question(world, rng, 3)
        if q:
            objs = [h["object"] for h in q["metadata"]["hops"]]
            assert len(set(objs)) == len(objs)
