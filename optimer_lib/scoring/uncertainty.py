"""How sure a score is: bootstrap intervals over the scored documents, for every metric and an objective.

    from optimer_lib.scoring.evaluate import score_suite
    from optimer_lib.scoring.uncertainty import bootstrap, paired_bootstrap
    scores = score_suite(model, tokenizer, suite, limit=8)           # per-item scores of every dev set
    ci = bootstrap(scores, objective)                                # {"loss:en": Interval, ..., "objective": ...}
    print(ci["objective"])                                           # 3.6812 [3.6011, 3.7630]
    diff = paired_bootstrap(before, after, objective)                # after − before, same documents
    diff["objective"].excludes(0.0)                                  # False: not distinguishable

A dev set scored on 8 documents says little: the whole OptiMer gain on the embedded world is under 1%, far
inside that noise. Each resample draws, within every set independently, as many items as it has, with
replacement, and recomputes the metric as the score does (Σ summed NLL / Σ tokens for a text set, the
fraction right for a QA set; :class:`~optimer_lib.scoring.evaluate.SetScores`); the objective is recomputed
from the resampled metrics by the project's own :class:`~optimer_lib.scoring.objectives.Objective`. The
interval is the percentile interval of the resamples. Draws depend only on ``(seed, metric, item count)``, so a
set's interval does not move when another set is added, and two settings scored on the same documents are
compared on the very same draws (the paired interval; the noise of which documents were drawn cancels).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from optimer_lib.errors import ConfigError, DataError
from optimer_lib.scoring.evaluate import SetScores
from optimer_lib.scoring.objectives import Objective

OBJECTIVE = "objective"  # the key of the objective's interval
Scores = Mapping[str, SetScores] | Iterable[SetScores]


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap interval (``low <= high``; ``value`` is the full-sample score)."""

    value: float
    low: float
    high: float

    @property
    def width(self) -> float:
        return self.high - self.low

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high

    def excludes(self, x: float = 0.0) -> bool:
        """Whether ``x`` lies outside: for a paired difference, ``excludes(0)`` means "distinguishable"."""
        return not self.contains(x)

    def __str__(self) -> str:
        return f"{self.value:.5g} [{self.low:.5g}, {self.high:.5g}]"


def _by_key(scores: Scores) -> dict[str, SetScores]:
    items = scores.values() if isinstance(scores, Mapping) else scores
    out = {s.key: s for s in items}
    if not out:
        raise DataError("no scored dev sets to bootstrap: score at least one set first")
    return out


def _check(n_resamples: int, level: float) -> None:
    if not (isinstance(n_resamples, int) and n_resamples >= 1):
        raise ConfigError(f"n_resamples must be a positive integer, got {n_resamples!r}")
    if not 0.0 < level < 1.0:
        raise ConfigError(f"level must be in (0, 1), e.g. 0.95, got {level!r}")


def _draws(key: str, n_items: int, n_resamples: int, seed: int) -> np.ndarray:
    """Resampled item indices, shape (n_resamples, n_items), fixed by (seed, key, n_items) alone."""
    rng = np.random.default_rng([seed, zlib.crc32(key.encode()), n_items])
    return rng.integers(0, n_items, size=(n_resamples, n_items))


def _resampled(s: SetScores, idx: np.ndarray) -> np.ndarray:
    total, count = np.asarray(s.total), np.asarray(s.count)
    return total[idx].sum(axis=1) / count[idx].sum(axis=1)


def _with_ppl(draws: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = dict(draws)
    for key, value in draws.items():
        kind, name = key.split(":", 1)
        if kind == "loss":
            out[f"ppl:{name}"] = np.exp(np.minimum(value, 700.0))  # as SetScores.metrics
    return out


def _objective_fits(objective: Objective, keys: Iterable[str]) -> None:
    if objective.fn is not None:
        raise ConfigError(f"objective {objective.spec} is computed by a callable; its interval cannot be "
                          "bootstrapped from dev documents (use a weighted metric list or preset)")
    missing = sorted(set(objective.terms) - set(keys))
    if missing:
        raise ConfigError(f"objective {objective.spec} reads {missing}, which were not scored; "
                          f"score those dev sets too (scored: {sorted(keys)})")


def _intervals(point: Mapping[str, float], draws: Mapping[str, np.ndarray], level: float) -> dict[str, Interval]:
    tail = (1.0 - level) / 2.0
    out = {}
    for key, value in point.items():
        low, high = np.quantile(draws[key], [tail, 1.0 - tail])
        out[key] = Interval(float(value), float(low), float(high))
    return out


def bootstrap(scores: Scores, objective: Objective | None = None, *, n_resamples: int = 1000, seed: int = 0,
              level: float = 0.95) -> dict[str, Interval]:
    """Intervals of every metric of ``scores`` (loss, ppl, acc) and, given one, of ``objective`` (key "objective").

    ``scores``: :func:`~optimer_lib.scoring.evaluate.score_suite`'s dict or any iterable of SetScores.
    A weighted objective (preset or metric list) only; a callable one raises ConfigError.
    """
    _check(n_resamples, level)
    sets = _by_key(scores)
    point = _with_ppl({k: np.asarray(s.value) for k, s in sets.items()})
    draws = _with_ppl({k: _resampled(s, _draws(k, len(s.index), n_resamples, seed)) for k, s in sets.items()})
    if objective is not None:
        _objective_fits(objective, draws)
        # Objective.__call__ is plain arithmetic on the metric values: given arrays it computes every resample
        # at once, with the project's own weights and signs (no second definition of the objective here).
        point[OBJECTIVE] = np.asarray(objective(point))
        draws[OBJECTIVE] = np.asarray(objective(draws))
    return _intervals({k: float(v) for k, v in point.items()}, draws, level)


def paired_bootstrap(before: Scores, after: Scores, objective: Objective | None = None, *, n_resamples: int = 1000,
                     seed: int = 0, level: float = 0.95) -> dict[str, Interval]:
    """Intervals of ``after − before`` for every metric both scored (and ``objective``), on shared draws.

    Both must be scores of the same documents (same sets, same items), e.g. two weight settings scored with the
    same limits. A difference whose interval excludes 0 is distinguishable from the noise of which documents
    were drawn; identical settings give exactly [0, 0].
    """
    _check(n_resamples, level)
    a, b = _by_key(before), _by_key(after)
    keys = [k for k in b if k in a]
    if not keys:
        raise DataError(f"the two scorings share no dev set ({sorted(a)} vs {sorted(b)}): score the same sets")
    for k in keys:
        if a[k].index != b[k].index or (a[k].kind == "loss" and a[k].count != b[k].count):
            raise DataError(f"{k}: the two scorings read different documents; a paired interval needs the same "
                            "documents (same limit, seq_len and dev set)")
    idx = {k: _draws(k, len(a[k].index), n_resamples, seed) for k in keys}
    pa = _with_ppl({k: np.asarray(a[k].value) for k in keys})
    pb = _with_ppl({k: np.asarray(b[k].value) for k in keys})
    da = _with_ppl({k: _resampled(a[k], idx[k]) for k in keys})
    db = _with_ppl({k: _resampled(b[k], idx[k]) for k in keys})
    if objective is not None:
        _objective_fits(objective, da)
        pa[OBJECTIVE], pb[OBJECTIVE] = np.asarray(objective(pa)), np.asarray(objective(pb))
        da[OBJECTIVE], db[OBJECTIVE] = np.asarray(objective(da)), np.asarray(objective(db))
    point = {k: float(pb[k] - pa[k]) for k in pa}
    return _intervals(point, {k: db[k] - da[k] for k in da}, level)


def objective_interval(scores: Scores, objective: Objective, **kw: Any) -> Interval:
    """Just the objective's interval (``kw`` as :func:`bootstrap`)."""
    return bootstrap(scores, objective, **kw)[OBJECTIVE]


__all__ = ["OBJECTIVE", "Interval", "bootstrap", "objective_interval", "paired_bootstrap"]
