"""Verifiable rewards: plain functions from (prediction, reference) to a float in [0, 1].

The same functions score the teacher's runs (synthesize), the gate's correctness check, the RL
reward (``get_reward`` of the TRL environments) and evaluation, so "correct" means one thing
everywhere. ``score(suite, ...)`` picks the suite's rule; ``is_correct`` is ``score == 1.0``.

References may be one string or a list of acceptable strings (AFM's ``target`` lists); a
prediction matches if it matches any of them. A ``None`` prediction (no ``<answer>`` at all)
scores 0.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from decimal import Decimal, InvalidOperation

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD-style normalization: lower case, no punctuation, no articles, single spaces.

    >>> normalize_answer("  The  Eiffel-Tower! ")
    'eiffeltower'
    >>> normalize_answer("An Apple a day")
    'apple day'
    """
    s = str(s).lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _refs(ref) -> list[str]:
    if ref is None:
        return []
    if isinstance(ref, (list, tuple)):
        return [str(r) for r in ref]
    return [str(ref)]


def exact_match(pred: str | None, ref) -> float:
    """1.0 if the normalized prediction equals a normalized reference.

    >>> exact_match("the Blue River", "Blue river")
    1.0
    >>> exact_match("Blue", ["Red", "blue."])
    1.0
    >>> exact_match("Blue Lake", "Blue River")
    0.0
    >>> exact_match(None, "x")
    0.0
    """
    if pred is None:
        return 0.0
    p = normalize_answer(pred)
    return 1.0 if any(p == normalize_answer(r) for r in _refs(ref)) else 0.0


def token_f1(pred: str | None, ref) -> float:
    """Best token-level F1 over the references (bag of normalized words).

    >>> token_f1("Blue River", "blue river")
    1.0
    >>> round(token_f1("the blue lake", "Blue River"), 2)
    0.5
    >>> token_f1("", "x")
    0.0
    """
    if pred is None:
        return 0.0
    p_toks = normalize_answer(pred).split()
    best = 0.0
    for r in _refs(ref):
        r_toks = normalize_answer(r).split()
        if not p_toks or not r_toks:
            best = max(best, float(p_toks == r_toks))
            continue
        common = sum((Counter(p_toks) & Counter(r_toks)).values())
        if common == 0:
            continue
        prec, rec = common / len(p_toks), common / len(r_toks)
        best = max(best, 2 * prec * rec / (prec + rec))
    return best


_NUM_RE = re.compile(r"[-+]?(?:\d[\d,_]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def parse_number(text: str | None) -> Decimal | None:
    """The number a short answer states: ``"$1,234.50"`` -> 1234.50, ``"12%"`` -> 12.

    A fraction ``"3/4"`` is evaluated; when the text holds several numbers the last one counts
    (``"x = 7"``). None if there is no number.

    >>> parse_number("$1,234.50")
    Decimal('1234.50')
    >>> parse_number("3/4")
    Decimal('0.75')
    >>> parse_number("no") is None
    True
    """
    if text is None:
        return None
    t = str(text).strip().replace("\u2212", "-")
    frac = re.fullmatch(r"\s*([-+]?\d+)\s*/\s*(\d+)\s*", t)
    if frac and int(frac.group(2)) != 0:
        return Decimal(int(frac.group(1))) / Decimal(int(frac.group(2)))
    found = _NUM_RE.findall(t)
    if not found:
        return None
    raw = found[-1].replace(",", "").replace("_", "")
    try:
        return Decimal(raw)
    except InvalidOperation:
        return None


def numeric_match(pred: str | None, ref, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> float:
    """1.0 if the number in the prediction is within tolerance of a reference number.

    Two integers compare exactly whatever their size (Decimal, no float rounding), so a big
    multiplication off by one is wrong; tolerance applies when either side has a fraction.

    >>> numeric_match("1,234.50", "1234.5")
    1.0
    >>> numeric_match("The answer is 42", 42)
    1.0
    >>> numeric_match("123456789123456789", "123456789123456788")
    0.0
    >>> numeric_match("41.99", "42")
    0.0
    >>> numeric_match(None, "1")
    0.0
    """
    p = parse_number(pred)
    if p is None:
        return 0.0
    for r in _refs(ref):
        q = parse_number(r)
        if q is None:
            continue
        if p == q:
            return 1.0
        if p == p.to_integral_value() and q == q.to_integral_value():
            continue  # two integers: exact, whatever their size
        diff = abs(p - q)
        if diff <= Decimal(str(abs_tol)) or diff <= Decimal(str(rel_tol)) * max(abs(p), abs(q)):
            return 1.0
    return 0.0


def format_reward(text: str | None) -> float:
    """1.0 for a well-formed completion (``schema.markup.format_problems``: the gate's tag check,
    exactly one ``<answer>``, every ``<tool_call>`` a JSON object with a name and object
    arguments), else 0.0.

    >>> format_reward("<think>x</think><answer>Paris</answer>")
    1.0
    >>> format_reward('<tool_call>{"name": "search", "arguments": {"query": "a"}}</tool_call>'
    ...               '<answer>a</answer>')
    1.0
    >>> format_reward("<answer>a</answer><answer>b</answer>")
    0.0
    >>> format_reward("<think>x<answer>a</answer>")
    0.0
    >>> format_reward("<tool_call>not json</tool_call><answer>a</answer>")
    0.0
    >>> format_reward("Paris")
    0.0
    """
    from coaflow.schema.markup import format_problems

    return 0.0 if not text or format_problems(text) else 1.0


def evidence(suite: str, reference, messages: list[dict]) -> float:
    """1.0 if a tool result of the episode (``role: tool``, not an error) holds the gold answer,
    else 0.0: kbqa, the answer's normalized words in the page or search hits; calc, a number
    printed equal to the reference. A diagnostic of the episode (did the tools find it?), logged
    by rl and ``bench/bench_rl.py``; no stage rewards it.

    >>> evidence("calc", "42", [{"role": "tool", "content": "6 * 7 = 42.0"}])
    1.0
    >>> evidence("kbqa", "Varn Institute", [{"role": "assistant", "content": "Varn Institute"},
    ...                                     {"role": "tool", "content": "Error: no page"}])
    0.0
    """
    refs = [str(r) for r in _refs(reference) if r is not None and str(r).strip()]
    for m in messages:
        text = str(m.get("content") or "")
        if m.get("role") != "tool" or text.startswith("Error"):
            continue
        if suite == "calc":
            if any(score("calc", n, refs) == 1.0 for n in re.findall(r"-?\d[\d,]*\.?\d*", text)):
                return 1.0
        else:
            norm = f" {normalize_answer(text)} "
            if any(f" {normalize_answer(r)} " in norm for r in refs):
                return 1.0
    return 0.0


_PLAIN_NUMBER = re.compile(r"\s*[-+]?\$?[\d,_]*\.?\d+\s*%?\s*")


def _calc_match(pred: str, ref) -> float:
    """Numeric match for numeric references (to the last digit: 15698.81 is not 15698.80, only
    float noise is forgiven); exact match for anything else (e.g. a date)."""
    refs = _refs(ref)
    if refs and all(_PLAIN_NUMBER.fullmatch(r) for r in refs):
        return numeric_match(pred, refs, rel_tol=1e-12, abs_tol=1e-9)
    return exact_match(pred, refs)


SCORERS = {"kbqa": exact_match, "calc": _calc_match}


def score(suite: str, prediction: str | None, reference) -> float:
    """The suite's correctness score in [0, 1]: kbqa exact match, calc numeric match, any other
    (external) suite exact match.

    >>> score("kbqa", "the Varn Institute", "Varn Institute")
    1.0
    >>> score("calc", "$1,050.00", "1050")
    1.0
    >>> score("calc", "2024-03-01", "2024-03-01")
    1.0
    >>> score("other", None, "a")
    0.0
    """
    if prediction is None:
        return 0.0
    value = SCORERS.get(suite, exact_match)(prediction, reference)
    return 0.0 if math.isnan(value) else max(0.0, min(1.0, float(value)))


def is_correct(suite: str, prediction: str | None, reference) -> bool:
    """``score(...) == 1.0``.

    >>> is_correct("calc", "42", "42.0")
    True
    """
    return score(suite, prediction, reference) == 1.0
