"""Warm-started re-optimisation: a new study for a new objective, seeded with the trials already stored.

    from optimer_lib.search.warmstart import warm_start_search, warm_start_study
    study = warm_start_study("optimer", "math", storage="sqlite:///runs/s/optuna.db", study_name="math")
    res = warm_start_search(merger, tok, suite, objective, SearchConfig(study_name="math", trials=60,
                            workdir=Path("runs/s")), source="optimer")            # seeds count toward the 60
    res = warm_start_search(..., extra_trials=20)                                 # or: 20 new evaluations
    # CLI: optimer search ... --objective math --study math --warm-start-from optimer

:func:`warm_start_study` evaluates nothing: each COMPLETE trial of the source study (or studies)
becomes a COMPLETE trial of the new one (``optuna.trial.create_trial`` + ``study.add_trials``) with
the same weights, the source's bounds (``FloatDistribution`` per vector) and its value recomputed for
the new objective from the stored metrics (see :mod:`optimer_lib.search.rerank`), at the source's *search*
fidelity by default so seeds and new trials are scored alike. The sampler then starts from a model of
the landscape instead of from random start-up points. Seeded trials are ordinary trials of the new
study, so they count toward ``SearchConfig.trials`` (the study's total, the same rule as a resume);
``extra_trials`` asks for N new evaluations on top instead. Re-running is safe: an already seeded
study is reused as is. A list of objectives seeds a multi-objective study for
:func:`optimer_lib.search.pareto.run_pareto_search`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from optimer_lib.errors import ConfigError
from optimer_lib.merging.merger import Merger
from optimer_lib.scoring.evaluate import EvalSuite
from optimer_lib.scoring.objectives import Objective
from optimer_lib.search import record
from optimer_lib.search.rerank import RankedTrial, resolve_objective, score_stored
from optimer_lib.search.storage import open_storage, open_study
from optimer_lib.search.study import SearchConfig, SearchResult, run_search

log = logging.getLogger(__name__)
Source = optuna.Study | str | Sequence[optuna.Study | str]


def _sources(source: Source, storage: str | None) -> list[optuna.Study]:
    items = [source] if isinstance(source, (optuna.Study, str)) else list(source)
    if not items:
        raise ConfigError("no source study given to warm-start from")
    out = []
    for s in items:
        if isinstance(s, optuna.Study):
            out.append(s)
        elif storage is None:
            raise ConfigError(f"source study {s!r} is a name: give the storage it lives in")
        else:
            out.append(open_study(storage, s))
    return out


def _search_tag(study: optuna.Study) -> str | None:
    limits = study.user_attrs.get(record.LIMITS)
    return record.tag(limits[0]) if isinstance(limits, list) and limits else None


def _seed_trials(sources: list[optuna.Study], objectives: list[Objective],
                 fidelity: str | int | None) -> tuple[list[FrozenTrial], list[str], int]:
    """The seeds (deduplicated by weights), the vector names, and how many source trials were skipped."""
    names: list[str] | None = None
    seeds: dict[tuple[float, ...], FrozenTrial] = {}
    skipped = 0
    for src in sources:
        tag = fidelity if fidelity is not None else _search_tag(src)
        per_obj: list[dict[int, RankedTrial]] = []
        for obj in objectives:
            scored, _ = score_stored(src, resolve_objective(src, obj), fidelity=tag)
            per_obj.append({r.number: r for r in scored})
        common = sorted(set.intersection(*(set(p) for p in per_obj)))
        skipped += len(src.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) - len(common)
        src_names = src.user_attrs.get(record.NAMES) or (list(per_obj[0][common[0]].weights) if common else [])
        if names is None:
            names = list(src_names)
        elif sorted(names) != sorted(src_names):
            raise ConfigError(f"source studies have different vectors ({names} vs {src_names}): warm-start from "
                              "studies of the same vector pool")
        for number in common:
            first = per_obj[0][number]
            if set(first.bounds) != set(names):
                raise ConfigError(f"trial {number} of {src.study_name!r} has no float range for every vector")
            values = [p[number].value for p in per_obj]
            seeds.setdefault(tuple(first.weights[n] for n in names), optuna.trial.create_trial(
                params={n: first.weights[n] for n in names},
                distributions={n: FloatDistribution(*first.bounds[n]) for n in names},
                values=values, user_attrs={record.WEIGHTS: {n: first.weights[n] for n in names},
                                           record.METRICS_PREFIX + first.fidelity: first.metrics,
                                           record.SEEDED_FROM: f"{src.study_name}#{number}"}))
    return list(seeds.values()), names or [], skipped


def warm_start_study(source_study: Source, new_objective: str | Objective | Sequence[str | Objective], *,
                     storage: str | None, study_name: str, fidelity: str | int | None = None) -> optuna.Study:
    """Create (or reuse) study ``study_name`` for ``new_objective`` seeded with the source's trials.

    ``source_study``: a Study, a study name in ``storage``, or a list of them. ``storage=None`` keeps
    the new study in memory (then only this process can continue it). ``fidelity`` (samples per
    set, or ``"all"``) defaults to each source's search fidelity.
    """
    multi = not isinstance(new_objective, (str, Objective))
    raw = list(new_objective) if multi else [new_objective]  # type: ignore[arg-type]
    sources = _sources(source_study, storage)
    if any(s.study_name == study_name and storage is not None for s in sources):
        raise ConfigError(f"the warm-started study needs a new name (not the source's {study_name!r}): use --study")
    objectives = [resolve_objective(sources[0], o) for o in raw]
    specs = [o.spec for o in objectives]
    store = open_storage(storage)  # journal:// URLs too
    if store is not None and study_name in optuna.get_all_study_names(store):
        study = optuna.load_study(study_name=study_name, storage=store)
        done = study.user_attrs.get(record.WARM_START)
        key = record.OBJECTIVES if multi else record.OBJECTIVE
        if done and study.user_attrs.get(key) == (specs if multi else specs[0]):
            return study
        if done or study.trials:
            raise ConfigError(f"study {study_name!r} already exists with other trials or another objective: "
                              "choose a new --study name for the warm start")
    seeds, names, skipped = _seed_trials(sources, objectives, fidelity)
    if not seeds:
        raise ConfigError(f"no stored trial of {[s.study_name for s in sources]} can be scored for {specs}")
    study = optuna.create_study(storage=store, study_name=study_name, load_if_exists=True,
                                directions=[o.direction for o in objectives])
    study.add_trials(seeds)
    attrs: dict[str, Any] = {record.NAMES: names,
                             (record.OBJECTIVES if multi else record.OBJECTIVE): specs if multi else specs[0]}
    if not multi:
        attrs[record.DIRECTION] = objectives[0].direction
    if record.SUITE in sources[0].user_attrs:
        attrs[record.SUITE] = sources[0].user_attrs[record.SUITE]
    record.write_study_attrs(study, {**attrs, record.WARM_START: {
        "sources": [s.study_name for s in sources], "seeded": len(seeds), "skipped": skipped}})
    log.info("seeded study %r with %d trials from %s", study_name, len(seeds), [s.study_name for s in sources])
    return study


def seeded_bounds(study: optuna.Study) -> dict[str, tuple[float, float]]:
    """The per-vector bounds of a warm-started study's seeds (empty if it has none)."""
    for t in study.get_trials(deepcopy=False):
        if record.SEEDED_FROM in t.user_attrs:
            return {n: (float(d.low), float(d.high)) for n, d in t.distributions.items()
                    if isinstance(d, FloatDistribution)}
    return {}


def warm_start_search(merger: Merger, tokenizer: Any, suite: EvalSuite, objective: Objective, config: SearchConfig,
                      source: Source, *, extra_trials: int | None = None, fidelity: str | int | None = None,
                      callbacks: Iterable[Callable[[optuna.Study, FrozenTrial], None]] = (),
                      progress: bool = True) -> SearchResult:
    """Seed ``config.study_name`` from ``source`` (once), then :func:`run_search` it.

    ``config.trials`` is the total including the seeds unless ``extra_trials`` is given (seeds + N).
    ``config.bounds=None`` adopts the source's bounds; explicit bounds must equal them.
    """
    url = config.storage_url()
    if url is None:
        raise ConfigError("warm start needs a persistent storage (an sqlite:/// or RDB URL), not ':memory:'")
    study = warm_start_study(source, objective, storage=url, study_name=config.study_name, fidelity=fidelity)
    bounds = seeded_bounds(study)
    names = list(merger.names)
    if config.bounds is None:
        config = dataclasses.replace(config, bounds=bounds)
    elif config.resolved_bounds(names) != {n: bounds[n] for n in names if n in bounds}:
        raise ConfigError(f"bounds {config.resolved_bounds(names)} differ from the source study's {bounds}: "
                          "drop --bounds (the source's are used) or warm-start from a study with these bounds")
    if extra_trials is not None:
        config = dataclasses.replace(config, trials=study.user_attrs[record.WARM_START]["seeded"] + extra_trials)
    return run_search(merger, tokenizer, suite, objective, config, callbacks=callbacks, progress=progress)
