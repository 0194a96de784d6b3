"""Small, exact statistics for evaluation tables and the promotion gate (stdlib only).

- ``wilson``: the 95 % Wilson score interval of a success rate (sound at 0/n and n/n, where the
  normal interval collapses to a point);
- ``mcnemar_exact``: the exact two-sided McNemar p-value of two models on the same tasks (only the
  discordant tasks count: solved by one and not the other);
- ``paired_bootstrap``: the mean paired difference with a percentile bootstrap interval,
  resampling tasks (seeded: the same numbers on every rerun);
- ``pass_at_k``: the unbiased pass@k estimator of Chen et al. (2021) from n samples, c correct.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

Z95 = 1.959963984540054


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """``(lo, hi)`` of the Wilson score interval; ``(0, 1)`` when ``n`` is 0.

    >>> [round(x, 3) for x in wilson(0, 60)]
    [0.0, 0.06]
    >>> [round(x, 3) for x in wilson(30, 60)]
    [0.377, 0.623]
    """
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (binomial, p = 1/2).

    >>> mcnemar_exact(0, 0), round(mcnemar_exact(10, 2), 4), round(mcnemar_exact(2, 10), 4)
    (1.0, 0.0386, 0.0386)
    """
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, resamples: int = 2000,
                     seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """``(diff, lo, hi)``: mean of ``a - b`` over paired tasks and its bootstrap interval.

    >>> paired_bootstrap([1, 1, 0, 1], [1, 1, 0, 1])
    (0.0, 0.0, 0.0)
    >>> d, lo, hi = paired_bootstrap([1] * 30 + [0] * 30, [0] * 60)
    >>> d, lo > 0.3, hi < 0.7
    (0.5, True, True)
    """
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    if not a:
        return 0.0, 0.0, 0.0
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    rng = random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    tail = (1 - level) / 2
    lo = means[int(math.floor(tail * (resamples - 1)))]
    hi = means[int(math.ceil((1 - tail) * (resamples - 1)))]
    return sum(diffs) / n, lo, hi


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of ``k`` samples drawn from ``n`` (``c`` correct) is correct.

    >>> pass_at_k(4, 0, 2), pass_at_k(4, 4, 2), round(pass_at_k(4, 1, 2), 3)
    (0.0, 1.0, 0.5)
    """
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))
