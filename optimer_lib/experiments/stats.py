"""Intervals and verdicts for findings: paired intervals over test documents and seeds, criteria that can fail.

    from optimer_lib.experiments.stats import Criterion, paired_difference, recovery
    # per-document test losses, one row per seed: shape [seeds, documents], same documents in every row
    d = paired_difference(optimer, mixture)             # Interval(mean, low, high) of mean(optimer - mixture)
    Criterion("OptiMer beats the mixture", "below", 0.0).verdict(d)   # "holds" / "does not hold" / "inconclusive"
    r = recovery(base, optimer, mixture)                # share of the mixture's gain that merging recovers

An interval has two parts, both paired (the same picks for every method compared, so what differs between
methods is the method, not the sample), added in quadrature on each side of the point:

- **documents**: a percentile bootstrap over the test documents of the seed-averaged values;
- **seeds**: a Student-t half-width over the statistic's per-seed values, t(level, seeds − 1) · sd / √seeds.

Why not resample seeds in the bootstrap: with 3 seeds a draw of one seed three times has probability 1/27 (3.7%,
more than the 2.5% a tail may hold), so a percentile interval collapses to the range of the seed values, which
covers the seeds' median only 75% of the time; the t part has its stated level for normal seed effects. Adding
the two parts in quadrature errs, if at all, on the wide side (tests/test_stats.py simulates 3 seeds: 95% of 400
data sets covered, against 78% when the seeds are resampled), and with two
seeds t(0.975, 1) = 12.7 makes almost any difference inconclusive: three seeds are the least that can decide. With
one seed only the documents count (the interval says nothing about seed-to-seed variation;
:attr:`Interval.seeds` records how many there were). A criterion holds only when the whole interval is on its
side of the threshold, does not hold when the whole interval is on the other side, and is inconclusive
otherwise: a point estimate never decides a finding. A statistic without documents (a cosine, a trial count) is
judged per seed (:meth:`Criterion.every_seed`): it holds only if every seed passes, and fails if any does not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as _scipy_stats

# How the reports name an interval of :func:`bootstrap` (one phrase, so FINDINGS.md and REGIME.md agree).
INTERVAL_METHOD = ("paired bootstrap over test documents, widened by a Student-t interval over seeds "
                   "(df = seeds − 1, added in quadrature)")
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

    def every_seed(self, values: Interval, inclusive: bool = False) -> str:
        """Verdict of "on the claimed side in every seed" for a :func:`seed_range` (min, max over seeds):
        ``holds`` when every seed passes, ``does not hold`` when any seed does not (the claim names every seed).
        ``inclusive``: a seed exactly at the threshold passes ("at most", "at least")."""
        if any(math.isnan(x) for x in (values.low, values.high)):
            return INCONCLUSIVE
        if self.side == "below":
            ok = values.high <= self.threshold if inclusive else values.high < self.threshold
        else:
            ok = values.low >= self.threshold if inclusive else values.low > self.threshold
        return HOLDS if ok else FAILS

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
    """Interval of ``stat(*means)``, where each mean is a method's mean over seeds x documents; every sample must
    have the same shape (paired: same seeds, same documents). See the module docstring: a percentile bootstrap
    over documents of the seed-averaged values, each side widened in quadrature by a Student-t half-width over
    ``stat``'s per-seed values (with more than one seed)."""
    arrays = [_as_2d(s) for s in samples]
    shape = arrays[0].shape
    if any(a.shape != shape for a in arrays):
        raise ValueError(f"paired samples need one shape, got {[a.shape for a in arrays]}")
    seeds, docs = shape
    rng = np.random.default_rng(seed)
    point = stat(*(a.mean() for a in arrays))
    # Every draw's document picks at once (the same seed gives the same picks whatever the number of arrays); a
    # draw's mean is (pick counts) · (seed-averaged values) / docs: one product for all draws, no gathering.
    col_counts = _counts(rng.integers(0, docs, (n_boot, docs)), docs)
    means = np.stack([(col_counts @ a.mean(axis=0)) / docs for a in arrays])
    draws = _apply(stat, means)
    finite = draws[np.isfinite(draws)]
    if finite.size < 0.9 * n_boot:  # e.g. a ratio whose denominator crosses zero: no honest interval
        return Interval(float(point), math.nan, math.nan, level, seeds)
    lo, hi = (float(q) for q in np.quantile(finite, [(1 - level) / 2, (1 + level) / 2]))
    if seeds > 1:
        lo, hi = widen_by_seeds(point, lo, hi, [stat(*(a[i].mean() for a in arrays)) for i in range(seeds)], level)
    return Interval(float(point), float(lo), float(hi), level, seeds)


def widen_by_seeds(point: float, low: float, high: float, per_seed: Sequence[float],
                   level: float = 0.95) -> tuple[float, float]:
    """A documents-only interval ``[low, high]`` around ``point`` widened by the seeds: each side becomes
    √(t(level, n − 1) · sd / √n)² + (that side's distance)² from the point, for the statistic's ``per_seed``
    values (n of them; fewer than 2: unchanged; any not finite: NaN, no honest interval)."""
    vals = np.asarray(per_seed, dtype=float)
    if vals.size < 2:
        return low, high
    if not np.isfinite(vals).all():
        return math.nan, math.nan
    half = float(_scipy_stats.t.ppf((1 + level) / 2, vals.size - 1) * vals.std(ddof=1) / math.sqrt(vals.size))
    return point - math.hypot(half, max(0.0, point - low)), point + math.hypot(half, max(0.0, high - point))


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
