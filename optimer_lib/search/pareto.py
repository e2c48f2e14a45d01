"""Multi-objective search of merge weights: the whole trade-off (Pareto front) instead of one scalar.

    from optimer_lib.search.pareto import export_point, pareto_figure, pareto_front, run_pareto_search
    objs = [parse_objective(s, list(suite.texts), qa_names=list(suite.qa)) for s in ("ppl:ja", "acc:math", "loss:en")]
    res = run_pareto_search(pool.merger, pool.tokenizer, suite, objs, SearchConfig(trials=100, sampler="nsga2"))
    res.front[0].weights, res.front[0].values          # non-dominated trials; <workdir>/pareto.json
    export_point(pool, res.front[0], "runs/pick")      # merged HF checkpoint of that point
    pareto_figure(res.study).show()                    # plotly; customdata[0] of a point is its trial number
    pareto_front(single_objective_study, ["loss:ja", "acc:math"])   # a front from stored metrics, no evaluation
    # CLI: optimer search ... --objectives ppl:ja acc:math loss:en [--sampler nsga2]

Values are compared lower-is-better: a weighted objective is minimised (``acc`` enters negated, as in
:mod:`optimer_lib.scoring.objectives`); a callable that is to be maximised (``Objective.direction``) is stored as
it is, in a study direction of "maximize", and enters the front negated. Samplers:
``tpe`` (default, multi-objective TPE), ``nsga2`` (NSGA-II) and ``random``. Trials store weights and
metrics exactly like :func:`optimer_lib.search.study.run_search` (``metrics@<search_limit>``, every suite
metric with ``record_metrics="all"``), so a multi-objective study can be re-ranked for any scalar
objective too. ``trials`` is the study's total (resumes continue to it). There is no top-k
re-scoring: the front is at search fidelity; on return the merger holds the last trial's weights.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from optimer_lib.errors import ConfigError
from optimer_lib.fileio import atomic_write_json
from optimer_lib.merging.merger import Merger
from optimer_lib.scoring.evaluate import EvalSuite
from optimer_lib.scoring.objectives import HIGHER_IS_BETTER, Objective
from optimer_lib.scoring.scorer import TrialScorer
from optimer_lib.search import record
from optimer_lib.search.rerank import resolve_objective, score_stored
from optimer_lib.search.samplers import resume_seed, startup_trials
from optimer_lib.search.samples import trial_sampler
from optimer_lib.search.storage import open_storage
from optimer_lib.search.study import SearchConfig, no_trial_completed
from optimer_lib.search.trials import Deadline, counted, run_trials

log = logging.getLogger(__name__)


PARETO_SAMPLERS: dict[str, Callable[[int, int], optuna.samplers.BaseSampler]] = {
    "tpe": lambda seed, n: optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=startup_trials(n)),
    "nsga2": lambda seed, n: optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, n // 5))),
    "random": lambda seed, n: optuna.samplers.RandomSampler(seed=seed),
}


@dataclass
class ParetoPoint:
    """One trial: its weights and its value for each objective (keyed by objective spec, lower is better)."""

    number: int
    weights: dict[str, float]
    values: dict[str, float]
    metrics: dict[str, float] = dataclasses.field(repr=False, default_factory=dict)


@dataclass
class ParetoResult:
    """Outcome of :func:`run_pareto_search`; ``front`` is sorted by the first objective."""

    study: optuna.Study
    objectives: list[str]
    front: list[ParetoPoint]
    path: Path
    new_trials: int = 0
    interrupted: bool = False
    stopped: str | None = None   # "time_budget" when config.time_budget ended the search before config.trials


def higher_is_better(spec: str) -> bool:
    """Whether ``spec`` is a lone accuracy term (``acc:math``, weight 1): it enters an objective negated (every
    objective is minimised), so it is shown as the accuracy itself (:func:`measured`), higher is better."""
    kind, _, rest = spec.partition(":")
    name, _, weight = rest.partition("=")
    return kind in HIGHER_IS_BETTER and bool(name) and "," not in rest and weight.strip() in ("", "1")


def measured(spec: str, value: float) -> float:
    """An objective's value as a person reads it: the accuracy of a lone accuracy term, else the value itself."""
    return -value if higher_is_better(spec) else value


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether ``a`` dominates ``b`` when minimising: no worse everywhere, better somewhere."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


def non_dominated(points: Sequence[ParetoPoint]) -> list[ParetoPoint]:
    """The points no other point dominates (duplicates of a front point are all kept)."""
    vals = [list(p.values.values()) for p in points]
    return [p for i, p in enumerate(points)
            if not any(dominates(vals[j], vals[i]) for j in range(len(points)) if j != i)]


def all_points(study: optuna.Study, objectives: Sequence[str | Objective] | None = None, *,
               fidelity: str | int | None = None) -> list[ParetoPoint]:
    """Every COMPLETE trial as a point: its stored values, or ``objectives`` recomputed from stored metrics."""
    if objectives is None:
        n_obj = len(study.directions)
        specs = study.user_attrs.get(record.OBJECTIVES) or [study.user_attrs.get(record.OBJECTIVE, "objective")]
        specs = specs if len(specs) == n_obj else [f"objective {i}" for i in range(n_obj)]
        sign = [1.0 if d == optuna.study.StudyDirection.MINIMIZE else -1.0 for d in study.directions]
        out = []
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            metrics = record.best_stored_metrics(t)
            out.append(ParetoPoint(t.number, {n: float(v) for n, v in t.params.items()},
                                   {s: g * v for s, g, v in zip(specs, sign, t.values, strict=True)}, dict(metrics)))
        return out
    objs = [resolve_objective(study, o) for o in objectives]
    scored = [{r.number: r for r in score_stored(study, o, fidelity=fidelity)[0]} for o in objs]
    common = sorted(set.intersection(*(set(s) for s in scored)))
    sign = {o.spec: -1.0 if o.direction == "maximize" else 1.0 for o in objs}  # the front compares lower-is-better
    return [ParetoPoint(n, scored[0][n].weights,
                        {o.spec: sign[o.spec] * s[n].value for o, s in zip(objs, scored, strict=True)},
                        scored[0][n].metrics) for n in common]


def pareto_front(study: optuna.Study, objectives: Sequence[str | Objective] | None = None, *,
                 fidelity: str | int | None = None) -> list[ParetoPoint]:
    """Non-dominated COMPLETE trials (weights + values), sorted by the first objective.

    Without ``objectives`` the study's own values are used (a multi-objective study); with them, the
    values are recomputed from stored metrics, so any study run with ``record_metrics="all"`` works.
    """
    return sorted(non_dominated(all_points(study, objectives, fidelity=fidelity)),
                  key=lambda p: (list(p.values.values()), p.number))


def run_pareto_search(merger: Merger, tokenizer: Any, suite: EvalSuite, objectives: Sequence[Objective],
                      config: SearchConfig, *, callbacks: Iterable[Callable[[optuna.Study, FrozenTrial], None]] = (),
                      progress: bool = True) -> ParetoResult:
    """Run (or resume) a multi-objective study to ``config.trials``; write ``<workdir>/pareto.json``.

    ``config.sampler`` is one of :data:`PARETO_SAMPLERS`; ``top_k`` and ``rescore_limit`` are not used, each
    objective keeps its own direction (``Objective.direction``). Trials run through the one trial loop
    (:func:`optimer_lib.search.trials.run_trials`): several workers on one study finish exactly ``trials``,
    failures are handled as in ``run_search``. ``config.time_budget`` stops it after the trial running when the
    budget is spent, as in ``run_search`` (``stopped="time_budget"`` in the result and in pareto.json).
    """
    objs, specs = list(objectives), [o.spec for o in objectives]
    problems = [] if len(objs) >= 2 else [f"give at least two objectives for a Pareto search (got {len(objs)})"]
    if len(set(specs)) != len(specs):
        problems.append(f"objectives repeat: {specs}")
    if getattr(config, "pruner", "none") != "none":
        raise ConfigError("pruning works with one objective: a Pareto search has no single value to prune on")
    names = list(merger.names)
    bounds, bound_problems = config.bound_problems(names)
    problems += bound_problems + config.setting_problems(PARETO_SAMPLERS)
    try:
        budget = config.budget_seconds()
    except ConfigError as exc:
        problems.append(f"time_budget: {exc}")
    if problems:
        raise ConfigError("bad Pareto search settings:\n  - " + "\n  - ".join(problems))
    deadline = Deadline(budget) if budget is not None else None
    workdir = Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    directions = [o.direction for o in objs]
    study = optuna.create_study(storage=open_storage(config.storage_url()), study_name=config.study_name,
                                load_if_exists=True, directions=directions)
    record.check_study(study, {record.NAMES: names, record.OBJECTIVES: specs})
    study.sampler = PARETO_SAMPLERS[config.sampler](resume_seed(config.seed, len(study.trials)), config.trials)
    record.write_study_attrs(study, {
        record.NAMES: names, record.OBJECTIVES: specs, record.SAMPLER: config.sampler, record.SEED: config.seed,
        record.LIMITS: [config.search_limit], record.RECORD_METRICS: config.record_metrics,
        record.SUITE: {"texts": list(suite.texts), "qa": list(suite.qa)}})
    scorer = TrialScorer(merger, tokenizer, suite, objs, seq_len=config.seq_len, batch_size=config.batch_size,
                         record_metrics=config.record_metrics)
    outcome = run_trials(study, total=config.trials,
                         suggest=lambda t: {n: t.suggest_float(n, *b) for n, b in bounds.items()},
                         score=lambda trial, weights: scorer.score(weights, config.search_limit),
                         metrics_key=record.metrics_key(config.search_limit), callbacks=callbacks, progress=progress,
                         desc="pareto", samples=trial_sampler(merger, tokenizer, config), should_stop=deadline)
    stopped = "time_budget" if deadline is not None and deadline.spent else None
    front = pareto_front(study)
    if not front:
        if outcome.interrupted:
            raise KeyboardInterrupt
        raise no_trial_completed(study)
    payload = {"objectives": specs, "directions": directions, "study": config.study_name,
               "storage": config.storage_url() or ":memory:", "sampler": config.sampler, "seed": config.seed,
               "search_limit": config.search_limit, "trials": counted(study),
               "front": [{"trial": p.number, "weights": p.weights, "values": p.values, "metrics": p.metrics}
                         for p in front], **({"stopped": stopped} if stopped else {})}
    path = atomic_write_json(workdir / "pareto.json", payload)
    return ParetoResult(study, specs, front, path, outcome.done, outcome.interrupted, stopped)


def export_point(pool: Any, point: ParetoPoint, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Merge ``point.weights`` into ``pool`` (an :class:`optimer_lib.merging.pool.Pool`) and export it."""
    from optimer_lib.merging.export import export_merged

    pool.merger.set_weights(point.weights)
    return export_merged(pool.model, pool.tokenizer, out_dir, base_path=str(pool.base_dir), vectors=pool.vectors,
                         weights=point.weights, instruction=pool.instruction,
                         instruction_weight=pool.merger.instruction_weight if pool.instruction else None,
                         scores={f"dev {k}": measured(k, v) for k, v in point.values.items()},
                         overwrite=overwrite)


def pareto_figure(study: optuna.Study, objectives: Sequence[str | Objective] | None = None, *,
                  fidelity: str | int | None = None) -> Any:
    """A plotly figure of all trials (grey) and the front (colour), for 2 or 3 objectives.

    Each marker's ``customdata[0]`` is the trial number (for click-to-load); hover shows the weights.
    """
    import plotly.graph_objects as go

    points = all_points(study, objectives, fidelity=fidelity)
    front = {p.number for p in non_dominated(points)}
    specs = list(points[0].values) if points else []
    if len(specs) not in (2, 3):
        raise ConfigError(f"a Pareto plot needs 2 or 3 objectives, got {len(specs)}: pass objectives=[...]")
    fig = go.Figure()
    for on_front, name, color in ((False, "dominated", "lightgrey"), (True, "Pareto front", "crimson")):
        sel = sorted((p for p in points if (p.number in front) == on_front), key=lambda p: list(p.values.values()))
        axes = {ax: [measured(s, p.values[s]) for p in sel] for ax, s in zip("xyz", specs, strict=False)}
        hover = [f"trial {p.number}<br>" + "<br>".join(f"{n}={w:.3f}" for n, w in p.weights.items()) for p in sel]
        common = {"name": name, "customdata": [[p.number] for p in sel], "hovertext": hover, "hoverinfo": "text",
                  "marker": {"color": color, "size": 7 if on_front else 5}}
        mode = "markers+lines" if on_front and len(specs) == 2 else "markers"
        fig.add_trace(go.Scatter3d(mode="markers", **axes, **common) if len(specs) == 3
                      else go.Scatter(mode=mode, **axes, **common))
    up = [higher_is_better(s) for s in specs]
    title = f"Pareto front of {study.study_name} ({len(front)} of {len(points)} trials)"
    if len(specs) == 3:  # a 3-D scene clips long axis titles: arrows there, their meaning in the title
        fig.update_layout(scene={f"{ax}axis_title": f"{s} {'↑' if u else '↓'}"
                                 for ax, s, u in zip("xyz", specs, up, strict=True)})
        title += "; ↓ lower is better, ↑ higher is better"
    else:
        labels = [f"{s} ({'higher' if u else 'lower'} is better)" for s, u in zip(specs, up, strict=True)]
        fig.update_layout(xaxis_title=labels[0], yaxis_title=labels[1])
    fig.update_layout(title=title, legend={"orientation": "h"})
    return fig
