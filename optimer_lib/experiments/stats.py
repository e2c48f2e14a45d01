"""Intervals and verdicts for findings: paired bootstrap over seeds and test documents, criteria that can fail.

    from optimer_lib.experiments.stats import Criterion, paired_difference, recovery
    # per-document test losses, one row per seed: shape [seeds, documents], same documents in every row
    d = paired_difference(optimer, mixture)             # Interval(mean, low, high) of mean(optimer - mixture)
    Criterion("OptiMer beats the mixture", "below", 0.0).verdict(d)   # "holds" / "does not hold" / "inconclusive"
    r = recovery(base, optimer, mixture)                # share of the mixture's gain that merging recovers

Resampling is hierarchical and paired: each bootstrap draw picks seeds with replacement, then documents with
replacement, and uses the *same* picks for every method compared, so what differs between methods is the
method, not the sample. With one seed only the documents are resampled (the interval then says nothing about
seed-to-seed variation; :attr:`Interval.seeds` records how many there were). A criterion holds only when the
whole interval is on its side of the threshold, does not hold when the whole interval is on the other side,
and is inconclusive otherwise: a point estimate never decides a finding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Array = np.ndarray
HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval (``level``, e.g. 0.95) from ``seeds`` seeds."""

    mean: float
    low: float
    high: float
    level: float = 0.95
    seeds: int = 1

    def __str__(self) -> str:
        return f"{self.mean:.4g} [{self.low:.4g}, {self.high:.4g}]"

    def to_json(self) -> dict[str, float]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "level": self.level, "seeds": self.seeds}


@dataclass(frozen=True)
class Criterion:
    """A pre-stated test of a finding: the statistic must lie ``"below"`` or ``"above"`` ``threshold``."""

    claim: str
    side: str
    threshold: float

    def __post_init__(self) -> None:
        if self.side not in ("below", "above"):
            raise ValueError(f"side must be 'below' or 'above', got {self.side!r}")

    def verdict(self, interval: Interval) -> str:
        """``holds`` when the whole interval is on the claimed side, ``does not hold`` when the whole interval is
        on the other side (or on the threshold), else ``inconclusive``."""
        if any(math.isnan(x) for x in (interval.low, interval.high)):
            return INCONCLUSIVE
        if self.side == "below":
            return HOLDS if interval.high < self.threshold else FAILS if interval.low >= self.threshold else \
                INCONCLUSIVE
        return HOLDS if interval.low > self.threshold else FAILS if interval.high <= self.threshold else INCONCLUSIVE

    def describe(self) -> str:
        return f"{self.claim}: the {round(100 * 0.95)}% interval lies {self.side} {self.threshold:g}"


def _as_2d(x: Sequence[float] | Sequence[Sequence[float]] | Array) -> Array:
    a = np.asarray(x, dtype=float)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[1] == 0:
        raise ValueError(f"expected per-document values shaped [seeds, documents], got shape {a.shape}")
    return a


def bootstrap(stat: Callable[..., float], *samples: Array | Sequence, n_boot: int = 2000, level: float = 0.95,
              seed: int = 0) -> Interval:
    """Percentile interval of ``stat(*means)``, where each mean is a method's mean over the resampled
    seeds x documents; every sample must have the same shape (paired: same seeds, same documents)."""
    arrays = [_as_2d(s) for s in samples]
    shape = arrays[0].shape
    if any(a.shape != shape for a in arrays):
        raise ValueError(f"paired samples need one shape, got {[a.shape for a in arrays]}")
    seeds, docs = shape
    rng = np.random.default_rng(seed)
    point = stat(*(a.mean() for a in arrays))
    # Every draw's picks at once (the same seed gives the same picks whatever the number of arrays).
    rows = rng.integers(0, seeds, (n_boot, seeds)) if seeds > 1 else np.zeros((n_boot, 1), dtype=int)
    cols = rng.integers(0, docs, (n_boot, docs))
    # A draw's mean over its picked seeds x documents is (row counts)ᵀ · a · (column counts) / (seeds · docs):
    # two matrix products for all draws instead of gathering n_boot x seeds x docs values per array.
    row_counts = _counts(rows, seeds)
    col_counts = _counts(cols, docs)
    means = np.stack([((row_counts @ a) * col_counts).sum(axis=1) / (seeds * docs) for a in arrays])
    draws = _apply(stat, means)
    finite = draws[np.isfinite(draws)]
    if finite.size < 0.9 * n_boot:  # e.g. a ratio whose denominator crosses zero: no honest interval
        return Interval(float(point), math.nan, math.nan, level, seeds)
    lo, hi = np.quantile(finite, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(point), float(lo), float(hi), level, seeds)


def _counts(picks: Array, n: int) -> Array:
    """How often each of ``n`` indices was picked in each draw: shape [draws, n]."""
    draws = picks.shape[0]
    flat = (np.arange(draws)[:, None] * n + picks).ravel()
    return np.bincount(flat, minlength=draws * n).reshape(draws, n).astype(float)


def _apply(stat: Callable[..., float], means: Array) -> Array:
    """``stat`` on every draw: once on whole arrays of resampled means when it is plain arithmetic (fast), else
    once per draw (a stat with an ``if`` on its values cannot take arrays)."""
    try:
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.asarray(stat(*means), dtype=float)
        if out.shape == (means.shape[1],):
            return out
    except (TypeError, ValueError):
        pass
    return np.array([stat(*means[:, b]) for b in range(means.shape[1])], dtype=float)


def mean_interval(values: Array | Sequence, **kw: float) -> Interval:
    """The mean of one method's per-document values, with its interval."""
    return bootstrap(lambda m: m, values, **kw)


def paired_difference(a: Array | Sequence, b: Array | Sequence, **kw: float) -> Interval:
    """``mean(a) - mean(b)`` with a paired interval (for losses: negative means ``a`` is better)."""
    return bootstrap(lambda x, y: x - y, a, b, **kw)


def recovery(base: Array | Sequence, merged: Array | Sequence, mixture: Array | Sequence,
             **kw: float) -> tuple[Interval, Interval]:
    """``R = (base - merged) / (base - mixture)``, the share of the mixture's gain merging recovers, and the
    mixture's own gain ``base - mixture``; R is meaningful only when that gain's interval excludes 0."""
    gain = paired_difference(base, mixture, **kw)
    ratio = bootstrap(lambda b, m, x: (b - m) / (b - x) if b != x else math.nan, base, merged, mixture, **kw)
    return ratio, gain


def bootstrap_methods(stat: Callable[[dict[str, dict[str, float]]], float],
                      samples: dict[str, dict[str, Array | Sequence]], **kw: float) -> Interval:
    """:func:`bootstrap` over named per-document components of several methods, paired across all of them.

    ``samples[method][component]`` is shaped [seeds, documents] (every one the same shape); ``stat`` receives
    ``{method: {component: mean over the resampled seeds x documents}}``. E.g. a token-weighted loss is
    ``means["nll:ja"] / means["tok:ja"]``, a ratio of means that a plain mean of per-document losses is not.
    """
    keys = [(m, c) for m, comps in samples.items() for c in comps]

    def flat(*means: float) -> float:
        out: dict[str, dict[str, float]] = {}
        for (m, c), v in zip(keys, means, strict=True):
            out.setdefault(m, {})[c] = v  # a number, or every draw's means at once (see _apply)
        return stat(out)

    return bootstrap(flat, *(samples[m][c] for m, c in keys), **kw)


def seed_range(values: Sequence[float]) -> Interval:
    """Mean and [min, max] over seeds (``level`` 1.0: the range, not a confidence interval) of a statistic with
    no per-document resampling (a cosine, a trial count); a criterion on it holds only if every seed passes."""
    vals = [float(v) for v in values]
    if not vals or any(math.isnan(v) for v in vals):
        return Interval(math.nan, math.nan, math.nan, 1.0, len(vals))
    return Interval(sum(vals) / len(vals), min(vals), max(vals), 1.0, len(vals))


def combine(verdicts: Sequence[str]) -> str:
    """Verdict of a finding with several criteria: holds when all hold, does not hold when any fails, else
    inconclusive (an empty list is inconclusive)."""
    if verdicts and all(v == HOLDS for v in verdicts):
        return HOLDS
    return FAILS if FAILS in verdicts else INCONCLUSIVE


def fmt_interval(iv: Interval | None, nd: int = 4) -> str:
    """``mean [low, high]`` with ``nd`` decimals (``n/a``; ``[no interval]`` when the bootstrap gave none)."""
    if iv is None or math.isnan(iv.mean):
        return "n/a"
    if math.isnan(iv.low):
        return f"{iv.mean:.{nd}f} [no interval]"
    return f"{iv.mean:.{nd}f} [{iv.low:.{nd}f}, {iv.high:.{nd}f}]"
