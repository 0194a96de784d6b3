"""Content filters: correct, sane, new and clean trajectories only.

- correctness: the taught answer matches the task's reference under the suite's verifier
  (``coaflow.envs.rewards``, the same rule as the RL reward and evaluation);
- tool-use sanity: no run of identical calls longer than N, no empty observations (a loop or a
  silent tool is not behaviour worth imitating);
- duplicates: an exact hash of the normalized text, then MinHash LSH (datasketch) for near
  duplicates, so one task solved the same way twenty times does not dominate SFT;
- decontamination: word n-gram overlap of the question with the test split's questions, so
  evaluation measures generalization and not memory.

The stateful filters (``Deduper``, ``Decontaminator``) are small classes because they hold an
index; everything else is a plain function returning ``[(code, detail), ...]``.
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from collections import Counter
from collections.abc import Iterable

from coaflow.schema.trajectory import (
    ApiAction,
    CodeAction,
    MessageAction,
    TextObservation,
    Trajectory,
)

Problem = tuple[str, str]
_WORD_RE = re.compile(r"\w+")


def check_correct(traj: Trajectory, answer: str | None, mode: str) -> list[Problem]:
    """``mode``: ``correct`` (the answer matches the reference), ``correct_or_recovered`` (also
    keep runs whose team made a mistake and caught it, ``outcome.recovered``), ``off``.

    Without a reference answer, ``outcome.correct`` (set by whoever scored the run) decides."""
    if mode == "off":
        return []
    if mode == "correct_or_recovered" and traj.outcome.recovered:
        return []
    ref = traj.task.answer
    if ref is None or ref == [] or ref == "":
        if traj.outcome.correct:
            return []
        return [("incorrect", "no reference answer and outcome.correct is not true")]
    from coaflow.envs.rewards import is_correct

    if is_correct(traj.task.suite, answer, ref):
        return []
    return [("incorrect", f"answer {_short(answer)!r} does not match reference {_short(ref)!r}")]


def _short(x, n: int = 80) -> str:
    s = x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)
    return s if len(s) <= n else s[: n - 3] + "..."


def check_tool_use(traj: Trajectory, max_identical_calls: int) -> list[Problem]:
    """No run of more than ``max_identical_calls`` identical consecutive calls (same tool, same
    arguments), no empty observation."""
    problems: list[Problem] = []
    last, run = None, 0
    for i, step in enumerate(traj.content):
        if isinstance(step, (ApiAction, CodeAction)):
            key = (step.function, step.kwargs) if isinstance(step, ApiAction) \
                else ("python", step.content)
            run = run + 1 if key == last else 1
            last = key
            if run == max_identical_calls + 1:
                problems.append(("repeated_calls", f"content[{i}]: {key[0]} called with the same "
                                 f"arguments {run} times in a row (max {max_identical_calls})"))
        elif isinstance(step, TextObservation) and step.tool_call_id is not None \
                and not step.content.strip():
            problems.append(("empty_observation", f"content[{i}]: empty output of tool call "
                             f"{step.tool_call_id!r}"))
    return problems


def words(text: str) -> list[str]:
    """Lower-cased word tokens: punctuation and spacing do not make text new.

    >>> words("What is 12*7?  The ANSWER.")
    ['what', 'is', '12', '7', 'the', 'answer']
    """
    return _WORD_RE.findall(text.lower())


def ngrams(tokens: list[str], n: int) -> set[str]:
    """Word n-grams; a text shorter than ``n`` words is one gram (so short questions still match).

    >>> sorted(ngrams(["a", "b", "c"], 2))
    ['a b', 'b c']
    >>> ngrams(["a", "b"], 5)
    {'a b'}
    """
    if len(tokens) < n:
        return {" ".join(tokens)} if tokens else set()
    return {" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def dedup_text(traj: Trajectory) -> str:
    """What two runs must share to be the same example: the question and every step's text."""
    parts = [traj.task.question]
    for step in traj.content:
        if isinstance(step, ApiAction):
            parts.append(step.function + " " + json.dumps(step.kwargs, sort_keys=True, default=str))
        elif isinstance(step, (MessageAction, CodeAction, TextObservation)):
            parts.append(step.content)
    return "\n".join(parts)


FMIX32 = (16, 0x85EBCA6B, 13, 0xC2B2AE35, 16)  # MurmurHash3 finalizer, as datasketch affine32


def permutations(num_perm: int, seed: int = 1):
    """datasketch's affine32 permutation parameters (``MinHash(num_perm, seed).permutations``)."""
    from datasketch import MinHash

    return MinHash(num_perm=num_perm, seed=seed).permutations


def signatures(texts: list[str], shingle: int, perms) -> tuple[list[bytes], object]:
    """For each text: the exact digest of its normalized words, and the MinHash signature of its
    word ``shingle``-grams (a row of a ``len(texts) x num_perm`` uint32 matrix).

    The signature is datasketch's affine32 MinHash (``MinHash.update_batch``) of each shingle's
    32-bit hash, a polynomial of its words' CRC32s; it is computed for a whole batch of texts in a
    few numpy passes instead of one Python call per shingle, which is the gate's hot loop."""
    import numpy as np

    digests, word_hashes, starts, lens = [], [], [], []
    for text in texts:
        toks = words(text) or [""]
        digests.append(hashlib.blake2b(" ".join(toks).encode(), digest_size=16).digest())
        starts.append(len(word_hashes))
        lens.append(len(toks))
        word_hashes.extend(zlib.crc32(t.encode()) for t in toks)
    wh = np.array(word_hashes, dtype=np.uint32)
    starts_a, lens_a = np.array(starts), np.array(lens)
    k = np.minimum(shingle, lens_a)  # a text shorter than a shingle is one shingle
    n_sh = lens_a - k + 1
    # Shingle j of text d starts at word starts[d] + j and spans k[d] words.
    doc = np.repeat(np.arange(len(texts)), n_sh)
    first = np.repeat(starts_a, n_sh) + (np.arange(n_sh.sum()) - np.repeat(np.cumsum(n_sh) - n_sh,
                                                                             n_sh))
    width = k[doc]
    h = wh[first].copy()
    for j in range(1, int(k.max())):
        more = width > j
        h[more] = h[more] * np.uint32(0x01000193) + wh[first[more] + j]
    s1, m1, s2, m2, s3 = FMIX32
    h = h ^ (h >> np.uint32(s1))
    h = h * np.uint32(m1)
    h = h ^ (h >> np.uint32(s2))
    h = h * np.uint32(m2)
    h = h ^ (h >> np.uint32(s3))
    a, b = perms
    phv = h[:, None] * a[None, :] + b[None, :]
    offsets = np.concatenate(([0], np.cumsum(n_sh)[:-1]))
    return digests, np.minimum.reduceat(phv, offsets, axis=0)


class Deduper:
    """First come, first kept: exact duplicates by the digest, near duplicates by datasketch
    ``MinHashLSH`` at Jaccard ``threshold`` over the signatures from ``signature``."""

    def __init__(self, threshold: float = 0.9, num_perm: int = 64, near: bool = True,
                 seed: int = 1):
        from datasketch import LeanMinHash, MinHashLSH

        self.seed, self.near = seed, near
        self._exact: dict[bytes, str] = {}
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm) if near else None
        self._lean = LeanMinHash
        self._n = 0

    def check(self, key: str, digest: bytes, sig) -> list[Problem]:
        """Index a run under ``key``; [] if it is new, else the duplicate reason."""
        if digest in self._exact:
            return [("duplicate", f"same text as {self._exact[digest]}")]
        if self.near and sig is not None:
            m = self._lean(seed=self.seed, hashvalues=sig, scheme="affine32")
            hits = self._lsh.query(m)
            if hits:
                return [("near_duplicate", f"near copy of {min(hits).rsplit('#', 1)[0]}")]
            self._n += 1
            self._lsh.insert(f"{key}#{self._n}", m, check_duplication=False)
        self._exact[digest] = key
        return []


class Decontaminator:
    """Flags a training question that contains a test question, verbatim or lightly edited.

    A question is contaminated when it equals a test question (normalized words), or when it
    contains at least ``threshold`` of one test question's *informative* word ``n``-grams. An
    n-gram that occurs in two or more test questions is template text ("what is the sum of the
    cubes of the whole numbers from 1 to"): templated suites share it between questions that
    differ only in the entity or number that matters, so it proves nothing and is left out.
    Measuring how much of the *test* question is covered (not how much of the training one)
    keeps a copy with a prefix or suffix added ("Question: ... Answer briefly.") a copy."""

    def __init__(self, test_questions: Iterable[str], n: int = 8, threshold: float = 0.8):
        self.n, self.threshold = n, threshold
        self.index: dict[str, list[int]] = {}
        self.exact: dict[str, int] = {}
        self.questions: list[str] = []
        for q in test_questions:
            i = len(self.questions)
            self.questions.append(q)
            toks = words(q)
            self.exact.setdefault(" ".join(toks), i)
            for g in ngrams(toks, n):
                self.index.setdefault(g, []).append(i)
        self.informative = Counter(ids[0] for ids in self.index.values() if len(ids) == 1)
        # Test questions shorter than n words, or all template, have no n-gram to match: those
        # are matched by containment of their whole normalized text.
        self.whole = [(f" {t} ", i) for t, i in self.exact.items()
                      if not self.informative[i] or t.count(" ") + 1 < n]

    def __len__(self) -> int:
        return len(self.questions)

    def check(self, question: str) -> list[Problem]:
        toks = words(question)
        same = self.exact.get(" ".join(toks))
        if same is not None:
            return [("contaminated", f"same as test question {_short(self.questions[same])!r}")]
        padded = f" {' '.join(toks)} "
        for text, i in self.whole:
            if text in padded:
                return [("contaminated", f"contains test question {_short(self.questions[i])!r}")]
        hits = Counter(ids[0] for g in ngrams(toks, self.n)
                       if len(ids := self.index.get(g, ())) == 1)
        if not hits:
            return []
        best = max(hits, key=lambda i: (hits[i] / self.informative[i], -i))
        covered = hits[best] / self.informative[best]
        if covered >= self.threshold:
            return [("contaminated", f"contains {covered:.0%} of the informative {self.n}-grams "
                     f"of test question {_short(self.questions[best])!r}")]
        return []


def load_test_questions(path: str) -> list[str]:
    """Questions from a JSONL file with a ``question`` field (a task file, a benchmark dump)."""
    from coaflow.schema.io import iter_records

    out = []
    for file, line, rec in iter_records(path, None):
        if not isinstance(rec, dict) or not isinstance(rec.get("question"), str):
            raise ValueError(f"{file}:{line}: question: missing (gate.decontam_file needs one "
                             "'question' string per line)")
        out.append(rec["question"])
    return out
