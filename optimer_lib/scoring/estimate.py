"""An instant estimate of the scores at new merge weights, from the weights scored so far (costs no forward).

    from optimer_lib.scoring.estimate import ScoreEstimator
    est = ScoreEstimator(["ja", "code"], objective=objective)
    est.add({"ja": 0.3, "code": 0.1}, metrics)                   # each exact score as it arrives
    shown = est.predict({"ja": 0.35, "code": 0.1})              # the moment a slider moves: < 0.1 ms
    shown.values["objective"], shown.kind                        # 3.71, "quadratic" (mark it as an estimate)
    est.add(weights, exact_metrics, intervals=ci, shown=shown)   # exact score in: was the estimate inside ci?
    est.tracker.summary()                                        # "estimate inside the exact interval 7 of 9 ..."

Exact scoring is compute-bound (seconds to minutes on real models); an estimate drawn at once and replaced by
the exact score keeps a slider responsive. Each metric (and the objective, when one is given) is fitted on the
points that have it by ridge-regularised least squares, with the richest model the points support:

- ``quadratic``: constant + linear + squares + pairwise products of α (1 + 2K + K(K−1)/2 terms), once there are
  as many distinct points as terms; ``separable`` (no products, 1 + 2K) and ``linear`` (1 + K) before that;
- ``nearest``: the scores of the nearest point scored (fewer than K + 1 distinct points);
- ``none``: nothing scored yet (empty values).

The ridge term (relative to the design's scale, never on the constant) keeps directions the points never
explored (one slider moved only) at zero instead of wild. Weights absent from a mapping count as 0; the
coordinates are whatever ``names`` says (add ``"instruction"`` to estimate over the instruction weight too).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from optimer_lib.errors import ConfigError
from optimer_lib.scoring.objectives import Objective
from optimer_lib.scoring.uncertainty import OBJECTIVE, Interval

KINDS = ("quadratic", "separable", "linear", "nearest", "none")  # richest first


@dataclass(frozen=True)
class Estimate:
    """Estimated metrics at some weights; ``kind`` says how (see the module docstring), per metric in ``kinds``.

    Always an estimate: a UI draws it as one (hatched, "≈") until the exact score replaces it.
    """

    values: dict[str, float]
    kind: str
    kinds: dict[str, str]
    n_points: int

    @property
    def available(self) -> bool:
        return self.kind != "none"


def n_terms(kind: str, k: int) -> int:
    """Coefficients of a model of ``kind`` in ``k`` weights."""
    return {"quadratic": 1 + 2 * k + k * (k - 1) // 2, "separable": 1 + 2 * k, "linear": 1 + k}[kind]


class _Fit:
    """One model for the metrics that share the same scored points."""

    def __init__(self, kind: str, keys: list[str], alphas: np.ndarray, y: np.ndarray, ridge: float) -> None:
        self.kind, self.keys = kind, keys
        self.alphas, self.y = alphas, y  # kept for ``nearest``
        k = alphas.shape[1]
        self._pairs = np.triu_indices(k, 1)
        if kind == "nearest":
            return
        x = self.features(alphas)
        gram = x.T @ x
        # Relative ridge: the same shrinkage whatever the scale of α; the constant is never penalised.
        penalty = ridge * max(float(np.trace(gram)) / gram.shape[0], 1e-12) * np.ones(gram.shape[0])
        penalty[0] = 0.0
        self.coef = np.linalg.solve(gram + np.diag(penalty), x.T @ y) if ridge > 0 else \
            np.linalg.lstsq(x, y, rcond=None)[0]

    def features(self, a: np.ndarray) -> np.ndarray:
        """Design rows of ``a`` (n × K): [1, α, α², α_i·α_j (i < j)] cut to this fit's kind."""
        parts = [np.ones((a.shape[0], 1)), a]
        if self.kind in ("separable", "quadratic"):
            parts.append(a * a)
        if self.kind == "quadratic":
            parts.append(a[:, self._pairs[0]] * a[:, self._pairs[1]])
        return np.concatenate(parts, axis=1)

    def predict(self, a: np.ndarray) -> np.ndarray:
        if self.kind == "nearest":  # the latest of equally near points: the most recent score of the same α
            dist = ((self.alphas - a) ** 2).sum(axis=1)
            return self.y[len(dist) - 1 - int(np.argmin(dist[::-1]))]
        return (self.features(a[None, :]) @ self.coef)[0]


@dataclass
class EstimateTracker:
    """How often an estimate fell inside the exact score's bootstrap interval (the check the issue asks for)."""

    key: str = OBJECTIVE
    hits: int = 0
    total: int = 0
    by_kind: dict[str, list[int]] = field(default_factory=dict)  # kind -> [hits, total]
    abs_errors: list[float] = field(default_factory=list)

    def record(self, estimate: Estimate, intervals: Mapping[str, Interval]) -> bool | None:
        """Whether ``estimate`` of ``key`` lies in its exact interval; None (not counted) without an estimate."""
        if not estimate.available or self.key not in estimate.values or self.key not in intervals:
            return None
        exact, guess = intervals[self.key], estimate.values[self.key]
        hit = exact.contains(guess)
        self.hits, self.total = self.hits + hit, self.total + 1
        counts = self.by_kind.setdefault(estimate.kinds.get(self.key, estimate.kind), [0, 0])
        counts[0], counts[1] = counts[0] + hit, counts[1] + 1
        self.abs_errors.append(abs(guess - exact.value))
        return hit

    @property
    def rate(self) -> float | None:
        return self.hits / self.total if self.total else None

    def summary(self) -> str:
        if not self.total:
            return f"no estimate of {self.key} checked against an exact score yet"
        kinds = ", ".join(f"{k} {h}/{n}" for k, (h, n) in self.by_kind.items())
        return (f"estimate of {self.key} inside the exact interval {self.hits} of {self.total} times "
                f"({self.rate:.0%}; {kinds}); mean |estimate − exact| {np.mean(self.abs_errors):.4g}")


class ScoreEstimator:
    """Fits every metric seen to the weights scored so far; :meth:`predict` is instant (see the module docstring).

    ``objective``: also estimate it (stored as ``"objective"`` from each point's metrics). ``max_kind`` caps
    the model (e.g. ``"linear"``); ``ridge`` is the relative ridge strength.
    """

    def __init__(self, names: Sequence[str], *, objective: Objective | None = None, ridge: float = 1e-8,
                 max_kind: str = "quadratic") -> None:
        names = list(names)
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"an estimator needs distinct weight names, got {names}")
        if max_kind not in KINDS[:4]:
            raise ConfigError(f"max_kind must be one of {', '.join(KINDS[:4])}, got {max_kind!r}")
        if not ridge >= 0:
            raise ConfigError(f"ridge must be ≥ 0, got {ridge!r}")
        self.names, self.objective, self.ridge, self.max_kind = names, objective, ridge, max_kind
        self.tracker = EstimateTracker()
        self._alphas: list[np.ndarray] = []
        self._metrics: list[dict[str, float]] = []
        self._fits: list[_Fit] = []

    def __len__(self) -> int:
        return len(self._alphas)

    def vector(self, weights: Mapping[str, float]) -> np.ndarray:
        unknown = sorted(set(weights) - set(self.names))
        if unknown:
            raise ConfigError(f"weights {unknown} are not estimator coordinates; known: {', '.join(self.names)}")
        return np.array([float(weights.get(n, 0.0)) for n in self.names])

    def kind_for(self, n_distinct: int) -> str:
        """The richest model ``n_distinct`` distinct points support (capped at ``max_kind``)."""
        if n_distinct == 0:
            return "none"
        for kind in KINDS[KINDS.index(self.max_kind):3]:
            if n_distinct >= n_terms(kind, len(self.names)):
                return kind
        return "nearest"

    def add(self, weights: Mapping[str, float], metrics: Mapping[str, float], *,
            intervals: Mapping[str, Interval] | None = None, shown: Estimate | None = None) -> bool | None:
        """Record an exact score. With its ``intervals``, first check the estimate (``shown``, or the one this
        estimator gives now) against them in :attr:`tracker`; returns that hit (None when not checked)."""
        alpha = self.vector(weights)
        hit = None
        if intervals is not None:
            hit = self.tracker.record(shown if shown is not None else self.predict(weights), intervals)
        values = {k: float(v) for k, v in metrics.items()}
        if self.objective is not None and OBJECTIVE not in values:
            values[OBJECTIVE] = float(self.objective(values))
        self._alphas.append(alpha)
        self._metrics.append(values)
        self._refit()
        return hit

    def _refit(self) -> None:
        # Metrics scored on the same points share one design (one solve for all of them).
        groups: dict[tuple[int, ...], list[str]] = {}
        for key in dict.fromkeys(k for m in self._metrics for k in m):
            rows = tuple(i for i, m in enumerate(self._metrics) if key in m)
            groups.setdefault(rows, []).append(key)
        fits = []
        for rows, keys in groups.items():
            alphas = np.stack([self._alphas[i] for i in rows])
            y = np.array([[self._metrics[i][k] for k in keys] for i in rows])
            kind = self.kind_for(len(np.unique(alphas, axis=0)))
            fits.append(_Fit(kind, keys, alphas, y, self.ridge))
        self._fits = fits

    def predict(self, weights: Mapping[str, float]) -> Estimate:
        """Estimated metrics at ``weights`` (``kind`` "none" and no values before the first exact score)."""
        alpha = self.vector(weights)
        values: dict[str, float] = {}
        kinds: dict[str, str] = {}
        for fit in self._fits:
            for key, value in zip(fit.keys, fit.predict(alpha).tolist(), strict=True):
                values[key], kinds[key] = value, fit.kind
        if not kinds:
            kind = "none"
        elif OBJECTIVE in kinds:
            kind = kinds[OBJECTIVE]
        else:
            kind = max(kinds.values(), key=KINDS.index)  # the crudest model among the metrics
        return Estimate(values, kind, kinds, len(self))
