"""Multi-objective search of merge weights: the whole trade-off (Pareto front) instead of one scalar.

    from optimer_lib.search.pareto import export_point, pareto_figure, pareto_front, run_pareto_search
    objs = [parse_objective(s, list(suite.texts), qa_names=list(suite.qa)) for s in ("ppl:ja", "acc:math", "loss:en")]
    res = run_pareto_search(pool.merger, pool.tokenizer, suite, objs, SearchConfig(trials=100, sampler="nsga2"))
    res.front[0].weights, res.front[0].values          # non-dominated trials; <workdir>/pareto.json
    export_point(pool, res.front[0], "runs/pick")      # merged HF checkpoint of that point
    pareto_figure(res.study).show()                    # plotly; customdata[0] of a point is its trial number
    pareto_front(single_objective_study, ["loss:ja", "acc:math"])   # a front from stored metrics, no evaluation
    # CLI: optimer search ... --objectives ppl:ja acc:math loss:en [--sampler nsga2]

Every objective is minimised (``acc`` enters negated, as in :mod:`optimer_lib.scoring.objectives`). Samplers:
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
from functools import partial
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from optimer_lib.errors import ConfigError, OptimerError
from optimer_lib.scoring.evaluate import EvalSuite, evaluate_suite
from optimer_lib.scoring.objectives import Objective
from optimer_lib.search.rerank import resolve_objective, score_stored
from optimer_lib.search.study import SearchConfig, _atomic_json, _counted, _tag, open_storage, tell_outcome

log = logging.getLogger(__name__)


def _startup(n: int) -> int:
    return max(2, min(10, n // 5))


PARETO_SAMPLERS: dict[str, Callable[[int, int], optuna.samplers.BaseSampler]] = {
    "tpe": lambda seed, n: optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=_startup(n)),
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
        specs = study.user_attrs.get("objectives") or [study.user_attrs.get("objective", "objective")]
        specs = specs if len(specs) == n_obj else [f"objective {i}" for i in range(n_obj)]
        sign = [1.0 if d == optuna.study.StudyDirection.MINIMIZE else -1.0 for d in study.directions]
        out = []
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            metrics = next((v for k, v in t.user_attrs.items() if k.startswith("metrics@")), {})
            out.append(ParetoPoint(t.number, {n: float(v) for n, v in t.params.items()},
                                   {s: g * v for s, g, v in zip(specs, sign, t.values, strict=True)}, dict(metrics)))
        return out
    objs = [resolve_objective(study, o) for o in objectives]
    scored = [{r.number: r for r in score_stored(study, o, fidelity=fidelity)[0]} for o in objs]
    common = sorted(set.intersection(*(set(s) for s in scored)))
    return [ParetoPoint(n, scored[0][n].weights, {o.spec: s[n].value for o, s in zip(objs, scored, strict=True)},
                        scored[0][n].metrics) for n in common]


def pareto_front(study: optuna.Study, objectives: Sequence[str | Objective] | None = None, *,
                 fidelity: str | int | None = None) -> list[ParetoPoint]:
    """Non-dominated COMPLETE trials (weights + values), sorted by the first objective.

    Without ``objectives`` the study's own values are used (a multi-objective study); with them, the
    values are recomputed from stored metrics, so any study run with ``record_metrics="all"`` works.
    """
    return sorted(non_dominated(all_points(study, objectives, fidelity=fidelity)),
                  key=lambda p: (list(p.values.values()), p.number))


def _check(study: optuna.Study, names: list[str], specs: list[str]) -> None:
    attrs = study.user_attrs
    if attrs.get("names") not in (None, names) or attrs.get("objectives") not in (None, specs):
        raise ConfigError(f"study {study.study_name!r} was run with vectors {attrs.get('names')} and objectives "
                          f"{attrs.get('objectives')} (now {names}, {specs}): pick a new --study name")


def run_pareto_search(merger: Any, tokenizer: Any, suite: EvalSuite, objectives: Sequence[Objective],
                      config: SearchConfig, *, callbacks: Iterable[Callable[[optuna.Study, FrozenTrial], None]] = (),
                      progress: bool = True) -> ParetoResult:
    """Run (or resume) a multi-objective study to ``config.trials``; write ``<workdir>/pareto.json``.

    ``config.sampler`` is one of :data:`PARETO_SAMPLERS`; ``direction``, ``top_k`` and
    ``rescore_limit`` are not used. Trial failures are handled as in ``run_search``.
    """
    objs, specs = list(objectives), [o.spec for o in objectives]
    problems = [] if len(objs) >= 2 else [f"give at least two objectives for a Pareto search (got {len(objs)})"]
    if len(set(specs)) != len(specs):
        problems.append(f"objectives repeat: {specs}")
    if getattr(config, "pruner", "none") != "none":
        raise ConfigError("pruning works with one objective: a Pareto search has no single value to prune on")
    if config.sampler not in PARETO_SAMPLERS:
        problems.append(f"unknown multi-objective sampler {config.sampler!r}; "
                        f"choose one of {', '.join(PARETO_SAMPLERS)}")
    if problems:
        raise ConfigError("bad Pareto search settings:\n  - " + "\n  - ".join(problems))
    names = list(merger.names)
    bounds = dataclasses.replace(config, sampler="tpe").resolved_bounds(names)
    workdir = Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(storage=open_storage(config.storage_url()), study_name=config.study_name,
                                load_if_exists=True, directions=["minimize"] * len(objs))
    _check(study, names, specs)
    study.sampler = PARETO_SAMPLERS[config.sampler](config.seed + len(study.trials), config.trials)
    for key, value in {"names": names, "objectives": specs, "sampler": config.sampler, "seed": config.seed,
                       "limits": [config.search_limit], "record_metrics": config.record_metrics,
                       "suite": {"texts": list(suite.texts), "qa": list(suite.qa)}}.items():
        if key not in study.user_attrs:
            study.set_user_attr(key, value)
    kw = {"limit": config.search_limit, "seq_len": config.seq_len, "batch_size": config.batch_size}
    terms = [o for o in objs if o.fn is None]
    sub = suite if config.record_metrics == "all" else suite.select(
        texts=set().union(*(o.needed_texts for o in terms)), qa=set().union(*(o.needed_qa for o in terms)))

    def score(weights: dict[str, float]) -> tuple[list[float], dict[str, float]]:
        merger.set_weights(weights)
        metrics = evaluate_suite(merger.model, tokenizer, sub, **kw) if terms else {}
        values = []
        for o in objs:
            if o.fn is None:
                values.append(o(metrics))
            else:
                v, m = o.evaluate(merger.model, tokenizer, suite, **kw)
                metrics.update({k: x for k, x in m.items() if k != "objective"})
                metrics[f"objective:{o.spec}"] = v
                values.append(v)
        return values, metrics

    done, interrupted = _loop(study, score, bounds, config, list(callbacks), progress)
    front = pareto_front(study)
    if not front:
        errors = [t.user_attrs["error"] for t in study.get_trials(deepcopy=False) if "error" in t.user_attrs]
        if interrupted:
            raise KeyboardInterrupt
        raise OptimerError(f"no trial of study {config.study_name!r} completed"
                           + (f"; first error: {errors[0]}" if errors else ""))
    payload = {"objectives": specs, "study": config.study_name, "storage": config.storage_url() or ":memory:",
               "sampler": config.sampler, "seed": config.seed, "search_limit": config.search_limit,
               "trials": _counted(study), "front": [{"trial": p.number, "weights": p.weights, "values": p.values,
                                                     "metrics": p.metrics} for p in front]}
    path = _atomic_json(workdir / "pareto.json", payload)
    return ParetoResult(study, specs, front, path, done, interrupted)


def _loop(study: optuna.Study, score: Callable[[dict[str, float]], tuple[list[float], dict[str, float]]],
          bounds: dict[str, tuple[float, float]], config: SearchConfig,
          callbacks: list[Callable[[optuna.Study, FrozenTrial], None]], progress: bool) -> tuple[int, bool]:
    remaining = max(0, config.trials - _counted(study))
    key = f"metrics@{_tag(config.search_limit)}"
    bar = None
    if progress and remaining:
        from tqdm.auto import tqdm

        bar = tqdm(total=remaining, desc=f"pareto {config.study_name}", unit="trial")
    done = 0
    try:
        for _ in range(remaining):
            trial = study.ask()
            weights = {n: trial.suggest_float(n, *b) for n, b in bounds.items()}
            trial.set_user_attr("weights", weights)
            frozen = tell_outcome(study, trial, partial(score, weights), key)
            if frozen is None:
                return done, True
            done += 1
            if bar is not None:
                bar.update(1)
            for cb in callbacks:
                cb(study, frozen)
    finally:
        if bar is not None:
            bar.close()
    return done, False


def export_point(pool: Any, point: ParetoPoint, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Merge ``point.weights`` into ``pool`` (an :class:`optimer_lib.merging.pool.Pool`) and export it."""
    from optimer_lib.merging.export import export_merged

    pool.merger.set_weights(point.weights)
    return export_merged(pool.model, pool.tokenizer, out_dir, base_path=str(pool.base_dir), vectors=pool.vectors,
                         weights=point.weights, instruction=pool.instruction,
                         instruction_weight=pool.merger.instruction_weight if pool.instruction else None,
                         scores={f"dev {k}": v for k, v in point.values.items()}, overwrite=overwrite)


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
        axes = {ax: [p.values[s] for p in sel] for ax, s in zip("xyz", specs, strict=False)}
        hover = [f"trial {p.number}<br>" + "<br>".join(f"{n}={w:.3f}" for n, w in p.weights.items()) for p in sel]
        common = {"name": name, "customdata": [[p.number] for p in sel], "hovertext": hover, "hoverinfo": "text",
                  "marker": {"color": color, "size": 7 if on_front else 5}}
        mode = "markers+lines" if on_front and len(specs) == 2 else "markers"
        fig.add_trace(go.Scatter3d(mode="markers", **axes, **common) if len(specs) == 3
                      else go.Scatter(mode=mode, **axes, **common))
    titles = {"xaxis_title": specs[0], "yaxis_title": specs[1]}
    if len(specs) == 3:
        fig.update_layout(scene={**titles, "zaxis_title": specs[2]})
    else:
        fig.update_layout(**titles)
    fig.update_layout(title=f"Pareto front of {study.study_name} ({len(front)} of {len(points)} trials; lower is "
                      "better)", legend={"orientation": "h"})
    return fig
