"""Objectives on demand: re-rank a finished study for a new objective with no model evaluation.

    from optimer_lib.search.rerank import rerank
    res = rerank("sqlite:///runs/search/optuna.db", "loss:ja=1,acc:math=2")   # or an optuna.Study
    res.best_weights, res.best_value, print(res.table(10)), res.confidence.summary()
    # CLI: optimer rerank --workdir runs/search --objective 'loss:ja=1,acc:math=2'

Every trial of a search run with ``SearchConfig.record_metrics="all"`` (the default) stores all
metrics of its dev suite (``metrics@<limit>`` user attrs; top-k re-scores in the study attr
``rescore@<limit>``), so any weighted-metric objective over that suite can be computed from storage.
:func:`rerank` does that for every COMPLETE trial, using per trial the highest fidelity stored (or the
one asked: then trials without it are skipped), and reports how trustworthy the winner is: trials
near it, the fidelity it was scored at, and whether it sits on the edge of the search box. Mixing
fidelities is deliberate (re-scored trials are the better measured ones); ``res.confidence.fidelities``
shows the mix, and ``fidelity=<search limit>`` ranks everything on equal terms.
Warm-started re-optimisation lives in :mod:`optimer_lib.search.warmstart`, Pareto fronts in
:mod:`optimer_lib.search.pareto`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from optimer_lib.errors import ConfigError
from optimer_lib.scoring.objectives import Objective, is_callable_spec, parse_objective
from optimer_lib.search import record
from optimer_lib.search.record import fidelity_key, stored_metrics
from optimer_lib.search.storage import open_study

Metrics = dict[str, float]


def resolve_objective(study: optuna.Study, objective: str | Objective) -> Objective:
    """Parse a spec against the study's dev suite (as recorded by the search, else as stored)."""
    if isinstance(objective, Objective):
        return objective
    suite = study.user_attrs.get(record.SUITE) or {}
    keys = {k for per in stored_metrics(study).values() for m in per.values() for k in m}
    texts = suite.get("texts") or sorted({k.split(":", 1)[1] for k in keys if k.startswith("loss:")})
    qa = suite.get("qa") or sorted({k.split(":", 1)[1] for k in keys if k.startswith("acc:")})
    own = study.user_attrs.get(record.OBJECTIVE) == objective and is_callable_spec(objective)
    maximize = True if own and study.user_attrs.get(record.DIRECTION) == "maximize" else None
    return parse_objective(objective, texts, qa_names=qa, maximize=maximize)


def value_from_metrics(objective: Objective, metrics: Metrics, study: optuna.Study) -> float | None:
    """The objective computed from stored metrics, or None when a needed metric is missing."""
    if objective.fn is not None:  # a callable needs the model; only its own stored value can be reused
        if f"objective:{objective.spec}" in metrics:
            return float(metrics[f"objective:{objective.spec}"])
        same = study.user_attrs.get(record.OBJECTIVE) == objective.spec
        return float(metrics["objective"]) if same and "objective" in metrics else None
    if any(k not in metrics for k in objective.needed_metrics):
        return None
    return float(objective(metrics))


def _missing_error(study: optuna.Study, objective: Objective, fidelity: str | None,
                   per_trial: dict[int, dict[str, Metrics]]) -> ConfigError:
    name = study.study_name
    stored = sorted({k for per in per_trial.values() for tag, m in per.items()
                     if fidelity in (None, tag) for k in m})
    if objective.fn is not None:
        return ConfigError(f"objective {objective.spec!r} is a callable: it needs the model, and study {name!r} "
                           "stored no value of it; re-rank with a weighted metric list (e.g. 'loss:ja=1,acc:math=2'"
                           ") or run a search with it")
    tags = sorted({tag for per in per_trial.values() for tag in per}, key=fidelity_key)
    if fidelity is not None and fidelity not in tags:
        return ConfigError(f"no trial of study {name!r} stored metrics at fidelity {fidelity!r} "
                           f"(stored fidelities: {', '.join(tags) or 'none'})")
    missing = [k for k in objective.needed_metrics if k not in stored] or list(objective.needed_metrics)
    mode = study.user_attrs.get(record.RECORD_METRICS, "unknown")
    return ConfigError(f"metric(s) {', '.join(missing)} needed by objective {objective.spec!r} were never stored "
                       f"together in study {name!r} (record_metrics={mode}; stored: {', '.join(stored) or 'none'}): "
                       "re-run the search with record_metrics='all' (the default; `optimer search` records all) "
                       "so every trial stores every metric of its dev suite")


@dataclass
class RankedTrial:
    """One stored trial scored for the new objective."""

    number: int
    value: float
    weights: dict[str, float]
    fidelity: str
    metrics: Metrics = field(repr=False, default_factory=dict)
    bounds: dict[str, tuple[float, float]] = field(repr=False, default_factory=dict)


@dataclass
class Confidence:
    """How much to trust the re-ranked winner (counts exclude the winner itself)."""

    trials: int
    skipped: int
    near_1pct: int
    near_5pct: int
    fidelity: str
    samples: int | None
    fidelities: dict[str, int]
    on_boundary: dict[str, str]

    def summary(self) -> str:
        edge = ", ".join(f"{n} at {side}" for n, side in self.on_boundary.items()) or "none"
        return (f"{self.trials} trials ranked ({self.skipped} lacked metrics); {self.near_1pct} within 1% and "
                f"{self.near_5pct} within 5% of the best; best scored on {self.samples or 'all'} samples per set "
                f"(fidelity {self.fidelity}); weights on the search-box boundary: {edge}")


@dataclass
class RerankResult:
    """Outcome of :func:`rerank`: ``ranking`` is best first."""

    study: optuna.Study
    objective: str
    ranking: list[RankedTrial]
    confidence: Confidence

    @property
    def best(self) -> RankedTrial:
        return self.ranking[0]

    @property
    def best_weights(self) -> dict[str, float]:
        return dict(self.best.weights)

    @property
    def best_value(self) -> float:
        return self.best.value

    def table(self, top: int = 10) -> str:
        names = list(self.best.weights)
        lines = [" rank  trial  fidelity  objective  " + "  ".join(f"{n:>7}" for n in names)]
        for i, r in enumerate(self.ranking[:top], 1):
            lines.append(f"{i:5d}  {r.number:5d}  {r.fidelity:>8}  {r.value:9.4f}  "
                         + "  ".join(f"{r.weights[n]:7.3f}" for n in names))
        return "\n".join(lines)

    def to_dict(self, top: int | None = None) -> dict[str, Any]:
        rows = [{"trial": r.number, "objective": r.value, "fidelity": r.fidelity, "weights": r.weights}
                for r in self.ranking[:top]]
        return {"study": self.study.study_name, "objective_spec": self.objective, "best_weights": self.best_weights,
                "objective": self.best_value, "best_trial": self.best.number, "best_metrics": self.best.metrics,
                "confidence": dataclasses.asdict(self.confidence), "ranking": rows}


def score_stored(study: optuna.Study, objective: Objective, *, fidelity: str | int | None = None
                 ) -> tuple[list[RankedTrial], int]:
    """Every COMPLETE trial's value for ``objective`` from storage (unsorted) and how many were skipped.

    Per trial the highest fidelity holding every needed metric is used, or exactly ``fidelity``
    (samples per set, or ``"all"``). Raises ConfigError if no trial can be scored.
    """
    tag = None if fidelity is None else str(fidelity)
    per_trial = stored_metrics(study)
    trials = {t.number: t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    scored: list[RankedTrial] = []
    for number, per in per_trial.items():
        for ftag in sorted(per, key=fidelity_key, reverse=True):
            if tag not in (None, ftag):
                continue
            value = value_from_metrics(objective, per[ftag], study)
            if value is not None:
                t = trials[number]
                bounds = {n: (float(d.low), float(d.high)) for n, d in t.distributions.items()
                          if isinstance(d, FloatDistribution)}
                weights = {n: float(v) for n, v in t.params.items()}
                scored.append(RankedTrial(number, value, weights, ftag, per[ftag], bounds))
                break
    if not scored:
        raise _missing_error(study, objective, tag, per_trial)
    return scored, len(per_trial) - len(scored)


def _boundary(r: RankedTrial, tol: float = 0.01) -> dict[str, str]:
    """Weights within ``tol`` of the range of their search box edge (the optimum may lie outside)."""
    out = {}
    for n, (lo, hi) in r.bounds.items():
        w, span = r.weights[n], hi - lo
        if w - lo <= tol * span:
            out[n] = "low"
        elif hi - w <= tol * span:
            out[n] = "high"
    return out


def rerank(study_or_storage: optuna.Study | str, objective: str | Objective, *, fidelity: str | int | None = None,
           study_name: str | None = None) -> RerankResult:
    """Rank every stored COMPLETE trial for ``objective`` (best first, in its direction) without evaluating a model."""
    study = study_or_storage if isinstance(study_or_storage, optuna.Study) else \
        open_study(study_or_storage, study_name)
    obj = resolve_objective(study, objective)
    scored, skipped = score_stored(study, obj, fidelity=fidelity)
    sign = -1.0 if obj.direction == "maximize" else 1.0
    scored.sort(key=lambda r: (not math.isfinite(r.value), sign * r.value, r.number))
    best = scored[0]
    scale = max(abs(best.value), 1e-12)
    near = [abs(r.value - best.value) / scale for r in scored[1:] if math.isfinite(r.value)]
    counts: dict[str, int] = {}
    for r in scored:
        counts[r.fidelity] = counts.get(r.fidelity, 0) + 1
    conf = Confidence(trials=len(scored), skipped=skipped, near_1pct=sum(d <= 0.01 for d in near),
                      near_5pct=sum(d <= 0.05 for d in near), fidelity=best.fidelity,
                      samples=int(best.fidelity) if best.fidelity.isdigit() else None, fidelities=counts,
                      on_boundary=_boundary(best))
    return RerankResult(study=study, objective=obj.spec, ranking=scored, confidence=conf)
