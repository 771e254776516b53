"""The statistics of the claims check: per-technique repeats -> pairwise one-sided tests, equivalence tests, Holm's
correction and effect sizes with confidence intervals.

Values are compared on the log scale (a difference of logs is a ratio; every metric a claim compares is positive), so
effects read as ratios ("a is 0.82x b, 95% CI 0.74-0.91") and relative margins are symmetric. Two techniques'
repeats are compared with Welch's t (unequal variances; scipy's t distribution). A metric that does not vary between
repeats (a parameter count, weight bytes) is compared exactly: its "test" is the comparison of the two values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Diff:
    """log(a) - log(b) from repeats: its estimate, standard error and Welch degrees of freedom (se 0: exact)."""

    d: float
    se: float
    df: float
    n_a: int
    n_b: int

    @property
    def exact(self) -> bool:
        return self.se == 0.0

    def p_below(self, bound: float) -> float:
        """One-sided p-value of H0: d >= bound against H1: d < bound."""
        if self.exact:
            return 0.0 if self.d < bound else 1.0
        from scipy import stats

        return float(stats.t.cdf((self.d - bound) / self.se, self.df))

    def p_above(self, bound: float) -> float:
        """One-sided p-value of H0: d <= bound against H1: d > bound."""
        if self.exact:
            return 0.0 if self.d > bound else 1.0
        from scipy import stats

        return float(stats.t.sf((self.d - bound) / self.se, self.df))

    def ratio_ci(self, level: float = 0.95) -> tuple[float, float, float]:
        """(ratio a/b, lower, upper): the effect as a ratio with its two-sided confidence interval."""
        if self.exact:
            r = math.exp(self.d)
            return r, r, r
        from scipy import stats

        half = float(stats.t.ppf(0.5 + level / 2, self.df)) * self.se
        return math.exp(self.d), math.exp(self.d - half), math.exp(self.d + half)


def log_diff(a: list[float], b: list[float]) -> Diff:
    """Welch's comparison of log(a) and log(b) (each a list of repeats, all > 0)."""
    la, lb = np.log(np.asarray(a, float)), np.log(np.asarray(b, float))
    na, nb = len(la), len(lb)
    va = float(la.var(ddof=1)) if na > 1 else 0.0
    vb = float(lb.var(ddof=1)) if nb > 1 else 0.0
    d = float(la.mean() - lb.mean())
    se2 = va / na + vb / nb
    if se2 <= 0.0:
        return Diff(d, 0.0, math.inf, na, nb)
    terms = [(v / n) ** 2 / (n - 1) for v, n in ((va, na), (vb, nb)) if n > 1 and v > 0]
    df = se2 ** 2 / sum(terms) if terms else math.inf
    return Diff(d, math.sqrt(se2), df, na, nb)


def holm(pvalues: list[float], alpha: float) -> list[bool]:
    """Holm's step-down procedure: which hypotheses are rejected with the family-wise error rate held at `alpha`."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    rejected = [False] * len(pvalues)
    for rank, i in enumerate(order):
        if pvalues[i] > alpha / (len(pvalues) - rank):
            break
        rejected[i] = True
    return rejected

