"""Uncertainty for the course's scores: standard errors, bootstrap 95% intervals, paired comparisons.

Every score a reader compares (accuracy, exact match, agreement, KL...) is a mean over
items. ``estimate`` turns per-item values into an :class:`Estimate` (mean, n, standard
error and a percentile-bootstrap 95% interval); ``paired`` compares two systems scored on
the *same* items by bootstrapping the per-item differences, which is much tighter than
comparing two separate intervals. ``table`` lays estimates out as a small results table.

We compute the bootstrap with NumPy rather than ``scipy.stats.bootstrap`` because SciPy is
not otherwise a dependency of the course and the percentile bootstrap is five lines; the
resamples are seeded, so a re-run prints the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_SAMPLES = 2000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` items with its standard error and a 95% interval ``[low, high]``."""

    mean: float
    low: float
    high: float
    n: int
    se: float

    @property
    def half_width(self) -> float:
        """Half the interval's width: the ``±`` a reader can quote."""
        return (self.high - self.low) / 2

    def format(self, digits: int = 2, percent: bool = False) -> str:
        """``0.31 [0.25, 0.37]``, or with ``percent=True`` ``31% [25%, 37%]`` (``digits`` after the point)."""
        if percent:
            low, mean, high = (f"{100 * v:.{digits}f}%" for v in (self.low, self.mean, self.high))
        else:
            low, mean, high = (f"{v:.{digits}f}" for v in (self.low, self.mean, self.high))
        return f"{mean} [{low}, {high}]"

    def __str__(self) -> str:
        return f"{self.format()} (n={self.n})"

    def as_dict(self, prefix: str = "") -> dict:
        return {f"{prefix}mean": self.mean, f"{prefix}low": self.low, f"{prefix}high": self.high,
                f"{prefix}n": self.n, f"{prefix}se": self.se}


@dataclass(frozen=True)
class PairedComparison:
    """System A minus system B on the same items: the mean difference and its 95% interval."""

    difference: Estimate
    a: Estimate
    b: Estimate
    wins: int  # items where A scored higher than B
    losses: int  # items where B scored higher than A

    @property
    def significant(self) -> bool:
        """True when the 95% interval of the difference excludes 0."""
        return self.difference.low > 0 or self.difference.high < 0

    def __str__(self) -> str:
        d = self.difference
        return (f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}] (n={d.n}, "
                f"{self.wins} items better, {self.losses} worse)")


def _values(values: Sequence[float] | np.ndarray, name: str = "values") -> np.ndarray:
    array = np.asarray(values, dtype=float).reshape(-1)
    if array.size == 0:
        raise ValueError(f"{name} is empty: an estimate needs at least one item")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values; score every item before estimating")
    return array


def standard_error(values: Sequence[float] | np.ndarray) -> float:
    """Standard error of the mean (sample standard deviation / sqrt(n); 0 for one item)."""
    array = _values(values)
    if array.size < 2:
        return 0.0
    return float(array.std(ddof=1) / math.sqrt(array.size))


def bootstrap_interval(values: Sequence[float] | np.ndarray, *, samples: int = BOOTSTRAP_SAMPLES,
                       confidence: float = CONFIDENCE, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean: resample items with replacement."""
    array = _values(values)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    if array.size == 1 or np.all(array == array[0]):
        return float(array[0]), float(array[0])
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, array.size, size=(samples, array.size))
    means = array[picks].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def estimate(values: Sequence[float] | np.ndarray, *, seed: int = 0) -> Estimate:
    """Mean, n, standard error and bootstrap 95% interval of per-item scores (0/1 or real)."""
    array = _values(values)
    low, high = bootstrap_interval(array, seed=seed)
    return Estimate(float(array.mean()), low, high, int(array.size), standard_error(array))


def proportion(successes: int, n: int, *, seed: int = 0) -> Estimate:
    """An accuracy given as a count: ``proportion(31, 100)`` is ``estimate`` of 31 ones and 69 zeros."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got {successes} of {n}")
    return estimate(np.r_[np.ones(successes), np.zeros(n - successes)], seed=seed)


def paired(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *, seed: int = 0) -> PairedComparison:
    """Compare two systems scored on the same items (item i of ``a`` and of ``b`` is the same item)."""
    first, second = _values(a, "a"), _values(b, "b")
    if first.shape != second.shape:
        raise ValueError(
            f"a paired comparison needs the same items for both systems; got {first.size} and {second.size} scores"
        )
    difference = first - second
    return PairedComparison(
        difference=estimate(difference, seed=seed), a=estimate(first, seed=seed), b=estimate(second, seed=seed),
        wins=int((difference > 0).sum()), losses=int((difference < 0).sum()),
    )


def table(estimates: Mapping[str, Estimate], *, name: str = "system", score: str = "score",
          digits: int = 3) -> list[dict]:
    """Rows ``{name, score, 95% CI, n}`` ready for ``pandas.DataFrame`` or ``markdown_table``."""
    return [{name: key, score: round(value.mean, digits),
             "95% CI": f"[{value.low:.{digits}f}, {value.high:.{digits}f}]", "n": value.n}
            for key, value in estimates.items()]


def markdown_table(rows: Sequence[Mapping]) -> str:
    """A list of dicts as a Markdown table (the notebooks display it with ``Markdown``)."""
    if not rows:
        return ""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(column, "")) for column in columns) + " |")
    return "\n".join(lines)


def error_bars(estimates: Sequence[Estimate]) -> np.ndarray:
    """The ``yerr`` array matplotlib wants (distances below and above each mean)."""
    return np.array([[e.mean - e.low for e in estimates], [e.high - e.mean for e in estimates]])
