"""``calc``: seeded word problems whose answers need exact computation (the ``python`` tool).

AFM's code agents learn to hand arithmetic to an interpreter instead of guessing digits. These
problems are easy to state and easy to get wrong by hand: big products, chained percentages,
compound interest to the cent, days between dates, ceiling division and remainders, modular
powers, sums of series. Difficulty 1 is one operation on moderate numbers, 2 a short chain, 3 long
chains or huge numbers.

Each problem carries ``metadata["expression"]``: a self-contained Python expression (built from
the problem's numbers, not from the answer) whose printed value is the answer, and
``metadata["answer_format"]`` when rounding applies (``"2 decimals"``). The reference answer is
the expression evaluated here, so a coder that runs the expression gets it exactly.
"""

from __future__ import annotations

import datetime as _dt
import random

NAME = "calc"
ITEMS = ["crates", "boxes", "pallets", "cartons", "bags", "shelves"]
THINGS = ["bolts", "apples", "screws", "books", "tiles", "bottles"]
NAMES = ["Aldo", "Brisa", "Cato", "Dalia", "Emeric", "Fionn", "Galen", "Hedda"]


def evaluate(expression: str) -> str:
    """The printed value of one of our own expressions (trusted: built here, no user input).

    >>> evaluate("12345 * 6789")
    '83810205'
    >>> evaluate("f'{round(19.99 * 3, 2):.2f}'")
    '59.97'
    """
    return str(eval(expression, {"__builtins__": __builtins__}, {}))  # noqa: S307


def _money(expr: str) -> str:
    return f"f'{{round({expr}, 2):.2f}}'"


def _product(rng: random.Random, d: int) -> tuple[str, str]:
    digits = {1: (3, 4), 2: (5, 7), 3: (8, 12)}[d]
    a, b = (rng.randrange(10 ** (k - 1), 10 ** k) for k in digits)
    if d == 3:
        c = rng.randrange(100, 1000)
        thing = rng.choice(THINGS)
        return (f"A warehouse has {a:,} {rng.choice(ITEMS)}, each holding {b:,} boxes of {c} "
                f"{thing}. How many {thing} is that in total?", f"{a} * {b} * {c}")
    item, thing = rng.choice(ITEMS), rng.choice(THINGS)
    return (f"A warehouse holds {a:,} {item} with {b:,} {thing} in each. How many {thing} are "
            "there in total?", f"{a} * {b}")


def _discount(rng: random.Random, d: int) -> tuple[str, str]:
    price = rng.randrange(1000, 100000) / 100
    off = rng.choice([5, 10, 12.5, 15, 20, 25, 30, 35])
    tax = rng.choice([4, 6, 7.25, 8, 8.875, 10, 19, 21])
    if d == 1:
        return (f"A coat costs ${price:.2f}. It is discounted by {off}%. What is the sale price "
                "in dollars, to the cent?", _money(f"{price} * (1 - {off} / 100)"))
    qty = rng.randrange(2, 40)
    return (f"A shop sells {qty} lamps at ${price:.2f} each, gives a {off}% discount on the "
            f"total and then adds {tax}% sales tax. What is the final bill in dollars, to the "
            "cent?", _money(f"{qty} * {price} * (1 - {off} / 100) * (1 + {tax} / 100)"))


def _interest(rng: random.Random, d: int) -> tuple[str, str]:
    principal = rng.randrange(500, 50000)
    rate = rng.choice([1.5, 2.25, 3, 3.75, 4.1, 5, 6.5])
    years = rng.randrange(2, 31)
    if d <= 2:
        return (f"{rng.choice(NAMES)} deposits ${principal:,} at {rate}% annual interest, "
                f"compounded yearly, for {years} years. What is the balance in dollars, to the "
                "cent?", _money(f"{principal} * (1 + {rate} / 100) ** {years}"))
    return (f"{rng.choice(NAMES)} deposits ${principal:,} at {rate}% annual interest, compounded "
            f"monthly, for {years} years. What is the balance in dollars, to the cent?",
            _money(f"{principal} * (1 + {rate} / 100 / 12) ** (12 * {years})"))


def _days(rng: random.Random, d: int) -> tuple[str, str]:
    a = _dt.date(1950, 1, 1) + _dt.timedelta(days=rng.randrange(0, 25000))
    b = a + _dt.timedelta(days=rng.randrange(30, 400 if d == 1 else 20000))
    q = (f"How many days are there from {a:%B} {a.day}, {a.year} to {b:%B} {b.day}, {b.year} "
         "(counting the first day but not the last)?")
    expr = (f"(__import__('datetime').date({b.year}, {b.month}, {b.day}) - "
            f"__import__('datetime').date({a.year}, {a.month}, {a.day})).days")
    if d == 3:
        q = q.replace("How many days", "How many full weeks").replace("?", "? Give whole weeks.")
        expr = f"({expr}) // 7"
    return q, expr


def _division(rng: random.Random, d: int) -> tuple[str, str]:
    n = rng.randrange(10 ** (d + 1), 10 ** (d + 3))
    k = rng.randrange(7, 60 * d)
    if rng.random() < 0.5:
        return (f"{n:,} passengers must travel in buses with {k} seats each. How many buses are "
                "needed?", f"({n} + {k} - 1) // {k}")
    return (f"{n:,} eggs are packed into cartons of {k}. How many eggs are left over?",
            f"{n} % {k}")


def _series(rng: random.Random, d: int) -> tuple[str, str]:
    if d == 3:
        base, exp, mod = rng.randrange(2, 30), rng.randrange(10 ** 5, 10 ** 9), rng.randrange(
            10 ** 3, 10 ** 6)
        return (f"What is the remainder when {base} to the power {exp:,} is divided by {mod:,}?",
                f"pow({base}, {exp}, {mod})")
    n = rng.randrange(50, 2000 * d)
    power = d + 1
    return (f"What is the sum of the {'squares' if power == 2 else 'cubes'} of the whole numbers "
            f"from 1 to {n:,}?", f"sum(i ** {power} for i in range(1, {n} + 1))")


def _cycles(rng: random.Random, d: int) -> tuple[str, str]:
    periods = [rng.randrange(6, 40 * d) for _ in range(d + 1)]
    listed = ", ".join(str(p) for p in periods[:-1]) + f" and {periods[-1]}"
    return (f"{len(periods)} lighthouses flash every {listed} seconds. They all flash together "
            "now. After how many seconds do they next all flash together?",
            f"__import__('math').lcm({', '.join(map(str, periods))})")


def _growth(rng: random.Random, d: int) -> tuple[str, str]:
    start = rng.randrange(1000, 90000)
    changes = [rng.choice([-15, -8, -4.5, 3, 6.25, 12, 20]) for _ in range(d + 1)]
    told = ", then ".join(f"{'rises' if c > 0 else 'falls'} by {abs(c)}%" for c in changes)
    factors = " * ".join(f"(1 + {c} / 100)" for c in changes)
    return (f"A town has {start:,} people. Its population {told}. What is the population then, "
            "to two decimal places (not rounded to whole people)?",
            _money(f"{start} * {factors}"))


GENERATORS = {level: [_product, _discount, _interest, _days, _division, _series, _cycles, _growth]
              for level in (1, 2, 3)}


def draw(rng: random.Random, difficulty: int) -> dict:
    """One problem: question, reference answer, difficulty and the expression that computes it."""
    question, expression = rng.choice(GENERATORS[difficulty])(rng, difficulty)
    meta = {"expression": expression}
    if "round(" in expression:
        meta["answer_format"] = "2 decimals"
    return {"question": question, "answer": evaluate(expression), "difficulty": difficulty,
            "metadata": meta}
