"""``kbqa``: multi-hop questions over a seeded fictional world, answered with search + open_page.

The world (people, organizations, cities, countries) is invented from a seed, so no pretrained
model knows it: the only way to the answer is through the documents, like AFM's multi-hop QA
over a wiki retriever, but offline. Every entity has one prose page; every fact on a page is
written with one of several sentence templates (varied prose), and the same templates, compiled
to regular expressions, let ``read_relation`` parse a fact back out of a page: the scripted
teacher reads pages the way an agent would, with no back door into the world.

Questions: 1-hop ("Who founded Varn Labs?"), 2-hop and 3-hop chains ("In which country was the
founder of Varn Labs born?") and comparisons ("Which was founded earlier, A or B?"). Relations are
functions (one value per entity) and names are unique, so every answer is unique; the gold chain
is kept in ``task.metadata["hops"]``.

    world = build_world(seed=0, n_entities=300)
    print(world.docs["Varn Labs"])          # if that name exists in this world
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass, field

RELATIONS = {
    "founder": "person who founded an organization",
    "headquarters": "city where an organization has its head office",
    "founded": "year an organization or city was founded",
    "employees": "number of people an organization employs",
    "industry": "sector an organization works in",
    "birthplace": "city where a person was born",
    "born": "year a person was born",
    "employer": "organization a person works for",
    "occupation": "what a person does for a living",
    "country": "country a city is in",
    "mayor": "person who is mayor of a city",
    "population": "number of people living in a city or country",
    "capital": "capital city of a country",
    "currency": "currency used in a country",
}
# relation -> the entity type its value is (None: a literal attribute)
TARGET = {"founder": "person", "headquarters": "city", "birthplace": "city", "employer": "org",
          "country": "country", "mayor": "person", "capital": "city"}
BY_TYPE = {
    "org": ["founder", "headquarters", "founded", "employees", "industry"],
    "person": ["birthplace", "born", "employer", "occupation"],
    "city": ["country", "mayor", "founded", "population"],
    "country": ["capital", "population", "currency"],
}

# Sentence templates per entity type: each slot is {s} (subject) or a relation name. Every
# relation of the type appears in every alternative of one group, so a page states each fact once.
TEMPLATES = {
    "org": [
        ["{s} was founded in {founded} by {founder}.", "{founder} founded {s} in {founded}.",
         "{s} dates back to {founded}, when {founder} established it."],
        ["{s} is headquartered in {headquarters}.", "The head office of {s} is in {headquarters}.",
         "{s} has its headquarters in {headquarters}."],
        ["{s} employs {employees} people and works in {industry}.",
         "With {employees} employees, {s} is active in {industry}.",
         "{s} operates in the {industry} sector with a staff of {employees}."],
    ],
    "person": [
        ["{s} (born {born}) is a {occupation} from {birthplace}.",
         "{s} is a {occupation} who was born in {birthplace} in {born}.",
         "Born in {born} in {birthplace}, {s} works as a {occupation}."],
        ["{s} works for {employer}.", "{s} has been employed by {employer} for years.",
         "{s} is currently on the staff of {employer}."],
    ],
    "city": [
        ["{s} is a city in {country}, founded in {founded}.",
         "Founded in {founded}, {s} lies in {country}.",
         "{s}, a city of {country}, was founded in {founded}."],
        ["{s} has a population of {population}.", "About {population} people live in {s}.",
         "The population of {s} is {population}."],
        ["The mayor of {s} is {mayor}.", "{s} is governed by mayor {mayor}.",
         "{mayor} serves as mayor of {s}."],
    ],
    "country": [
        ["The capital of {s} is {capital}.", "{s} is governed from its capital, {capital}.",
         "{capital} is the capital city of {s}."],
        ["{s} has {population} inhabitants and its currency is the {currency}.",
         "The currency of {s} is the {currency}; its population is {population}.",
         "Some {population} people live in {s}, paying in the {currency}."],
    ],
}
NAME = r"[A-Z][\w'-]*(?: [A-Z][\w'-]*)*"
SLOT_PATTERNS = {"founded": r"\d{3,4}", "born": r"\d{3,4}", "employees": r"\d{1,3}(?:,\d{3})*",
                 "population": r"\d{1,3}(?:,\d{3})*", "industry": r"[a-z][a-z ]*?",
                 "occupation": r"[a-z][a-z ]*?", "currency": r"[a-z][a-z ]*?"}
SUBJECT = r"[^.]*?"  # the name, a pronoun or "The company": any text within the sentence


def _compile(template: str, relation: str) -> re.Pattern:
    parts = re.split(r"(\{\w+\})", template)
    out = []
    for p in parts:
        if p == "{s}":
            out.append(SUBJECT)
        elif p.startswith("{") and p.endswith("}"):
            slot = p[1:-1]
            pat = SLOT_PATTERNS.get(slot, NAME)
            out.append(f"({pat})" if slot == relation else f"(?:{pat})")
        else:
            out.append(re.escape(p))
    return re.compile(r"(?:^|(?<=[.\n] ))" + "".join(out), re.M)


PATTERNS: dict[str, list[re.Pattern]] = {}
for _groups in TEMPLATES.values():
    for _group in _groups:
        for _t in _group:
            for _rel in re.findall(r"\{(\w+)\}", _t):
                if _rel != "s":
                    PATTERNS.setdefault(_rel, []).append(_compile(_t, _rel))


def read_relation(page_text: str, relation: str) -> str | None:
    """The value of ``relation`` stated on one entity's page, or None if the page has none.

    >>> read_relation("Varn Labs was founded in 1921 by Ella Varn. It is headquartered in "
    ...               "Port Aldren.", "founder")
    'Ella Varn'
    >>> read_relation("Varn Labs was founded in 1921 by Ella Varn.", "founded")
    '1921'
    >>> read_relation("Some text.", "mayor") is None
    True
    """
    if relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}; known: {', '.join(RELATIONS)}")
    for pat in PATTERNS.get(relation, []):
        m = pat.search(page_text)
        if m:
            return m.group(1).strip()
    return None


# --- the world ------------------------------------------------------------------------------

GIVEN = ["Ada", "Bram", "Cela", "Doran", "Elin", "Faro", "Greta", "Hale", "Ines", "Jory", "Kesta",
         "Lorn", "Mira", "Niall", "Oona", "Pell", "Quill", "Rhea", "Soren", "Tamsin", "Ulric",
         "Vela", "Wren", "Yara", "Zev", "Anika", "Bastian", "Corin", "Delphine", "Emrys", "Fenna",
         "Gideon", "Hesper", "Idris", "Juna", "Kael", "Liesel", "Marek", "Nerys", "Osric"]
SYLL = ["var", "ne", "tho", "rim", "sa", "bel", "kor", "dan", "li", "mo", "ska", "ren", "tal",
        "quin", "oro", "fen", "gal", "dri", "os", "ula", "ber", "wyn", "hal", "mer", "zan", "vek"]
ORG_SUFFIX = ["Labs", "Institute", "Holdings", "Works", "Foundation", "Press", "Motors", "Systems",
              "Trading Company", "Bank", "Logistics", "Studios"]
CITY_FORMS = ["{r}", "Port {r}", "{r} Falls", "{r}ford", "New {r}", "{r}bury", "{r} Bay"]
COUNTRY_FORMS = ["{r}ia", "{r}land", "{r}ora", "Upper {r}", "{r}mark"]
OCCUPATIONS = ["chemist", "painter", "novelist", "surgeon", "historian", "pilot", "botanist",
               "banker", "journalist", "composer", "lawyer", "teacher", "physicist", "diplomat"]
INDUSTRIES = ["shipping", "software", "textiles", "banking", "publishing", "mining", "aerospace",
              "agriculture", "pharmaceuticals", "energy", "robotics", "insurance"]
CURRENCY_UNITS = ["crown", "mark", "florin", "thaler", "ducat", "shilling"]
FILLER = {  # flavour prose: makes pages read like an encyclopedia and gives BM25 noise words
    "org": ["Its logo shows a {animal}.", "Analysts often call the company {adj}.",
            "The firm is known for its {adj} annual reports.",
            "Its first office was above a {shop}."],
    "person": ["{P} is known for a lifelong interest in {hobby}.",
               "Friends describe {p} as {adj}.", "{P} collects {things} in {p2} spare time."],
    "city": ["The old town is known for its {old} {building}.",
             "Each spring the city holds a festival of {hobby}.",
             "A {old} river runs past the {building}."],
    "country": ["The country is known for its {landscape}.",
                "Its flag is {color} and {color2}.", "Most of the land is {landscape}."],
}
FLAVOUR = {"animal": ["heron", "fox", "lynx", "stag", "raven", "otter"],
           "adj": ["quiet", "ambitious", "careful", "restless", "generous", "stubborn", "famous"],
           "shop": ["bakery", "bookshop", "tailor's shop", "pharmacy"],
           "hobby": ["chess", "sailing", "astronomy", "beekeeping", "rowing", "folk music"],
           "things": ["old maps", "stamps", "clocks", "seashells"],
           "old": ["old", "famous", "crowded", "narrow", "wide"],
           "building": ["harbour", "cathedral", "market hall", "stone bridge", "clock tower"],
           "landscape": ["high plateaus", "pine forests", "salt marshes", "river valleys"],
           "color": ["green", "white", "blue", "red"], "color2": ["gold", "black", "grey"]}
PRONOUN = {"org": ["It", "The company"], "city": ["The city", "It"], "country": ["The country"]}


@dataclass
class World:
    seed: int
    entities: dict[str, dict] = field(default_factory=dict)  # name -> {"type", relation: value}
    docs: dict[str, str] = field(default_factory=dict)       # title (= name) -> page text

    def of_type(self, kind: str) -> list[str]:
        return [n for n, e in self.entities.items() if e["type"] == kind]


def _root(rng: random.Random, n: int = 2) -> str:
    return "".join(rng.choice(SYLL) for _ in range(n)).capitalize()


def _unique(rng: random.Random, used: set, make) -> str:
    for _ in range(1000):
        name = make()
        if name not in used:
            used.add(name)
            return name
    raise ValueError("ran out of fresh names; use fewer entities")


@functools.lru_cache(maxsize=8)
def build_world(seed: int = 0, n_entities: int = 400) -> World:
    """A fictional world of about ``n_entities`` entities (at least 20), fully determined by seed."""
    if n_entities < 20:
        raise ValueError(f"n_entities must be at least 20, got {n_entities}")
    rng = random.Random(f"kbqa-world-{seed}")
    n_country = max(3, n_entities // 20)
    n_city = max(6, n_entities // 5)
    n_org = max(5, (n_entities - n_country - n_city) * 2 // 5)
    n_person = max(6, n_entities - n_country - n_city - n_org)
    used: set[str] = set()
    world = World(seed)
    ents = world.entities
    surnames = [_root(rng) for _ in range(max(30, n_person // 3))]  # shared: realistic collisions
    countries = [_unique(rng, used, lambda: rng.choice(COUNTRY_FORMS).format(r=_root(rng)))
                 for _ in range(n_country)]
    cities = [_unique(rng, used, lambda: rng.choice(CITY_FORMS).format(
        r=rng.choice(surnames) if rng.random() < 0.3 else _root(rng))) for _ in range(n_city)]
    persons = [_unique(rng, used, lambda: f"{rng.choice(GIVEN)} {rng.choice(surnames)}")
               for _ in range(n_person)]
    orgs = [_unique(rng, used, lambda: f"{rng.choice(surnames)} {rng.choice(ORG_SUFFIX)}")
            for _ in range(n_org)]
    for c in countries:
        ents[c] = {"type": "country", "population": rng.randrange(800_000, 90_000_000),
                   "currency": f"{c.split()[-1].lower()} {rng.choice(CURRENCY_UNITS)}"}
    for i, c in enumerate(cities):
        ents[c] = {"type": "city", "country": countries[i % n_country],
                   "founded": rng.randrange(900, 1900), "population": rng.randrange(5_000, 3_000_000)}
    for c in countries:  # the first city of each country is its capital
        ents[c]["capital"] = next(x for x in cities if ents[x]["country"] == c)
    for p in persons:
        ents[p] = {"type": "person", "birthplace": rng.choice(cities),
                   "born": rng.randrange(1900, 1996), "occupation": rng.choice(OCCUPATIONS),
                   "gender": rng.choice("fm")}
    for o in orgs:
        founder = rng.choice(persons)
        ents[o] = {"type": "org", "founder": founder, "headquarters": rng.choice(cities),
                   "founded": ents[founder]["born"] + rng.randrange(22, 60),
                   "employees": rng.randrange(12, 250_000), "industry": rng.choice(INDUSTRIES)}
    for p in persons:
        ents[p]["employer"] = rng.choice(orgs)
    for c in cities:
        ents[c]["mayor"] = rng.choice(persons)
    for name in ents:
        world.docs[name] = _render(world, name, random.Random(f"{seed}-{name}"))
    return world


def _fmt(relation: str, value) -> str:
    return f"{value:,}" if relation in ("population", "employees") else str(value)


def _render(world: World, name: str, rng: random.Random) -> str:
    """One entity's page: its facts (template chosen per page), then mentions of its neighbours."""
    e = world.entities[name]
    kind = e["type"]
    pronouns = PRONOUN.get(kind) or (["She"] if e.get("gender") == "f" else ["He"])
    sentences = []
    for i, group in enumerate(TEMPLATES[kind]):
        template = rng.choice(group)
        subject = name if i == 0 or not template.startswith("{s}") else rng.choice(
            [name, *pronouns])
        values = {r: _fmt(r, e[r]) for r in re.findall(r"\{(\w+)\}", template) if r != "s"}
        sentences.append(template.format(s=subject, **values))
    he = e.get("gender") == "m"
    for template in rng.sample(FILLER[kind], 2):
        words = {k: rng.choice(v) for k, v in FLAVOUR.items()}
        sentences.append(template.format(P="He" if he else "She", p="him" if he else "her",
                                          p2="his" if he else "her", **words))
    sentences.extend(_mentions(world, name, rng))
    return " ".join(sentences)


def _mentions(world: World, name: str, rng: random.Random) -> list[str]:
    """Sentences naming related entities (BM25 distractors), phrased unlike any fact template."""
    ents, kind = world.entities, world.entities[name]["type"]

    def some(names, k=3):
        names = sorted(set(names) - {name})
        return rng.sample(names, min(k, len(names)))

    def join(xs):
        return xs[0] if len(xs) == 1 else ", ".join(xs[:-1]) + " and " + xs[-1]

    out = []
    if kind == "city":
        natives = some(n for n, x in ents.items() if x.get("birthplace") == name)
        if natives:
            out.append(f"Notable natives include {join(natives)}.")
        based = some(n for n, x in ents.items() if x.get("headquarters") == name)
        if based:
            out.append(f"Organizations with offices there: {join(based)}.")
    elif kind == "country":
        out.append(f"Other towns there: {join(some(n for n, x in ents.items() if x.get('country') == name))}.")
    elif kind == "org":
        staff = some(n for n, x in ents.items() if x.get("employer") == name)
        if staff:
            out.append(f"Staff members have included {join(staff)}.")
        rivals = some(n for n, x in ents.items() if x["type"] == "org"
                      and x["industry"] == ents[name]["industry"])
        if rivals:
            out.append(f"Competitors: {join(rivals)}.")
    else:
        peers = some(n for n, x in ents.items() if x.get("employer") == ents[name]["employer"])
        if peers:
            out.append(f"Colleagues: {join(peers)}.")
    return out


# --- questions ------------------------------------------------------------------------------

NOUN_PHRASE = {"founder": "the founder of {x}", "headquarters": "the city where {x} is headquartered",
               "birthplace": "the birthplace of {x}", "employer": "the employer of {x}",
               "country": "the country where {x} lies", "capital": "the capital of {x}",
               "mayor": "the mayor of {x}"}
QUESTION = {"founder": "Who founded {x}?", "headquarters": "In which city is {x} headquartered?",
            "birthplace": "In which city was {x} born?",
            "employer": "Which organization does {x} work for?",
            "country": "In which country is {x}?", "capital": "What is the capital of {x}?",
            "mayor": "Who is the mayor of {x}?", "founded": "In what year was {x} founded?",
            "born": "In what year was {x} born?", "population": "What is the population of {x}?",
            "employees": "How many employees does {x} have?",
            "occupation": "What is the occupation of {x}?",
            "industry": "In which industry does {x} operate?",
            "currency": "What is the currency of {x}?"}
COMPARISONS = [  # (entity type, attribute, pick, question)
    ("org", "founded", "earlier", "Which was founded earlier, {a} or {b}?"),
    ("person", "born", "older", "Who was born earlier, {a} or {b}?"),
    ("city", "population", "larger", "Which city has the larger population, {a} or {b}?"),
    ("org", "employees", "smaller", "Which organization has fewer employees, {a} or {b}?"),
    ("city", "founded", "earlier", "Which city was founded earlier, {a} or {b}?"),
]


def chain_question(world: World, rng: random.Random, hops: int) -> dict | None:
    """A ``hops``-hop chain question by a random walk, or None if the walk hit a dead end."""
    ents = world.entities
    start = rng.choice(list(ents))
    node, seen, rels, chain = start, {start}, [], []
    for i in range(hops):
        options = BY_TYPE[ents[node]["type"]]
        if i < hops - 1:
            options = [r for r in options if r in TARGET]
        rel = rng.choice(options)
        value = ents[node][rel]
        if rel in TARGET and value in seen:  # e.g. the country of the capital of X is X
            return None
        chain.append({"subject": node if i == 0 else None, "relation": rel,
                      "object": _fmt(rel, value)})
        rels.append(rel)
        seen.add(value) if rel in TARGET else None
        node = value
    x = start
    for rel in rels[:-1]:
        x = NOUN_PHRASE[rel].format(x=x)
    question = QUESTION[rels[-1]].format(x=x)
    if chain[-1]["object"] in question:  # e.g. city "Varn" inside person "Ella Varn": a giveaway
        return None
    return {"question": question, "answer": chain[-1]["object"], "difficulty": hops,
            "metadata": {"type": "chain", "hops": chain}}


def comparison_question(world: World, rng: random.Random) -> dict | None:
    kind, attr, pick, template = rng.choice(COMPARISONS)
    a, b = rng.sample(world.of_type(kind), 2)
    va, vb = world.entities[a][attr], world.entities[b][attr]
    if va == vb:
        return None
    want_small = pick in ("earlier", "older", "smaller")
    answer = a if (va < vb) == want_small else b
    hops = [{"subject": a, "relation": attr, "object": _fmt(attr, va)},
            {"subject": b, "relation": attr, "object": _fmt(attr, vb)}]
    return {"question": template.format(a=a, b=b), "answer": answer, "difficulty": 2,
            "metadata": {"type": "comparison", "hops": hops, "entities": [a, b],
                         "attribute": attr, "pick": pick}}


def draw(world: World, rng: random.Random, difficulty: int) -> dict | None:
    """One question of the given difficulty: 1-hop, 2-hop or comparison, 3-hop."""
    if difficulty == 2 and rng.random() < 0.4:
        return comparison_question(world, rng)
    return chain_question(world, rng, difficulty)
