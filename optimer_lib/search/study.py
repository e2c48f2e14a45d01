"""Post-hoc search of merge weights α with Optuna, plus two-fidelity top-k re-scoring.

    from optimer_lib.search.study import SearchConfig, run_search
    result = run_search(merger, tokenizer, suite, objective, SearchConfig(trials=100, workdir=Path("runs/x")))
    result.best_weights, result.best_value, result.path   # <workdir>/best.json

``merger`` is a :class:`optimer_lib.merging.merger.Merger` (``.names``, ``.set_weights({name: α})``, ``.model``);
what a trial scores is decided by :class:`optimer_lib.scoring.scorer.TrialScorer`, the loop is
:func:`optimer_lib.search.trials.run_trials` and every stored key is named in :mod:`optimer_lib.search.record`.
The study lives in ``config.storage`` (SQLite under the
workdir by default); ``trials`` is the study's *total*, so re-running an interrupted command
continues to N and re-running a finished one only re-reads it. Each trial stores its weights and
metrics as user attrs (``weights``, ``metrics@<search_limit>``); with ``record_metrics="all"`` (the
default) those are every metric of the suite, not only the objective's, so the study can be re-ranked
for another objective later without evaluating anything (``optimer_lib.search.rerank``). The top-k trials
are then re-scored at ``rescore_limit`` and the best re-scored one is written to best.json (an interrupted
search writes its best finished trial, with ``"interrupted": true``). On return the merger holds the best weights
(unless it was stopped too). ``callbacks`` are called as ``cb(study, frozen_trial)`` after every trial (live UIs).
``pruner``/``fidelities`` score each trial on growing nested subsets first and stop poor ones early
(state PRUNED; see ``optimer_lib.search.pruning``). The objective says its direction (a callable may be
maximised: ``Objective.direction``); ``SearchConfig.direction=None`` follows it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from optimer_lib.errors import ConfigError, OptimerError
from optimer_lib.fileio import atomic_write_json
from optimer_lib.merging import groups
from optimer_lib.merging.merger import Merger
from optimer_lib.scoring.evaluate import EvalSuite
from optimer_lib.scoring.objectives import Objective
from optimer_lib.scoring.scorer import RECORD_MODES, TrialScorer
from optimer_lib.search import record
from optimer_lib.search.defaults import BATCH
from optimer_lib.search.pruning import fidelity_problems, make_pruner, score_rungs
from optimer_lib.search.samplers import SAMPLERS, grid_exhausted, make_sampler, resume_seed
from optimer_lib.search.samples import check_sample_settings, trial_sampler
from optimer_lib.search.storage import open_storage, workdir_storage
from optimer_lib.search.trials import Deadline, counted, run_trials

log = logging.getLogger(__name__)
DIRECTIONS = ("minimize", "maximize")


@dataclass
class SearchConfig:
    """Search settings (defaults: :data:`optimer_lib.search.defaults.BATCH`); ``storage=None`` means
    ``sqlite:///<workdir>/optuna.db`` (":memory:" for none).

    ``search_limit``/``rescore_limit`` are samples per dev set (None = all); ``top_k=0`` skips re-scoring.
    ``record_metrics``: ``"all"`` scores every distribution/task of the suite in each trial and stores
    them (the objective is computed from them); ``"needed"`` scores only what the objective reads
    (cheaper, but the study cannot be re-ranked for other metrics). A callable objective always
    records the dict it returns. ``pruner`` (``optimer_lib.search.pruning.PRUNERS``: none, median, asha,
    hyperband...) scores each trial at increasing ``fidelities`` (documents per dev set, ending at
    ``search_limit``; default about 1/9, 1/3, all of it) and may stop it after any rung but the last.
    ``direction=None`` takes the objective's own (``Objective.direction``; minimise unless it says otherwise).
    ``time_budget`` (seconds, or a duration such as ``"30m"``/``"2h"``; None = none) stops the search after the trial
    running when it is spent (at least one trial runs); the top-k re-scoring is then skipped, best.json and the
    study attr ``stopped`` say why, and re-running the command continues the study.
    """

    trials: int = BATCH.trials
    sampler: str = BATCH.sampler
    seed: int = BATCH.seed
    bounds: dict[str, tuple[float, float]] | tuple[float, float] | None = None
    storage: str | None = None
    study_name: str = "optimer"
    direction: str | None = None
    search_limit: int | None = BATCH.search_limit
    rescore_limit: int | None = BATCH.rescore_limit
    top_k: int = BATCH.top_k
    workdir: Path = field(default_factory=lambda: Path("optimer-run"))
    seq_len: int = BATCH.seq_len
    batch_size: int = BATCH.batch_size
    record_metrics: str = BATCH.record_metrics
    pruner: str = BATCH.pruner
    fidelities: tuple[int | None, ...] | None = None
    time_budget: float | str | None = None
    granularity: str = "vector"  # or "layer-groups:G": one α per (vector, layer group), see merging/groups.py
    sample_prompts: tuple[str, ...] = ()   # each trial stores greedy generations on these (search/samples.py)
    sample_tokens: int = 32

    def budget_seconds(self) -> float | None:
        """``time_budget`` in seconds (ConfigError for a malformed one)."""
        from optimer_lib.search.cost import parse_duration

        return None if self.time_budget is None else parse_duration(self.time_budget)

    def storage_url(self) -> str | None:
        return workdir_storage(self.workdir, self.storage)

    def bound_problems(self, names: list[str]) -> tuple[dict[str, tuple[float, float]], list[str]]:
        """``(bounds per name, problems)``: [0, 1] by default; ``bounds`` is per vector (``{name: (lo, hi)}``,
        missing names get [0, 1]) or one ``(lo, hi)`` for all."""
        given = dict(self.bounds or {}) if not isinstance(self.bounds, (tuple, list)) else \
            {n: tuple(self.bounds) for n in names}
        problems = [f"bounds for unknown vector {n!r} (vectors: {', '.join(names)})" for n in given if n not in names]
        out: dict[str, tuple[float, float]] = {}
        for n in names:
            try:
                lo, hi = (float(x) for x in given.get(n, (0.0, 1.0)))
            except (TypeError, ValueError):
                problems.append(f"bounds for {n!r} must be two numbers (lo, hi), got {given[n]!r}")
                continue
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                problems.append(f"bounds for {n!r} need finite lo < hi, got ({lo}, {hi})")
            out[n] = (lo, hi)
        return out, problems

    def setting_problems(self, samplers: Iterable[str] = SAMPLERS) -> list[str]:
        """Every problem with the settings other than bounds (``samplers``: the registry the sampler must be in)."""
        samplers = list(samplers)
        problems = []
        if self.trials < 1:
            problems.append(f"trials must be >= 1, got {self.trials}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0, got {self.top_k}")
        for name in ("search_limit", "rescore_limit"):  # documents per dev set: None is every document
            if getattr(self, name) is not None and getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 document per dev set, got {getattr(self, name)}")
        if self.direction not in (None, *DIRECTIONS):
            problems.append(f"direction must be 'minimize' or 'maximize', got {self.direction!r}")
        if self.sampler not in samplers:
            problems.append(f"unknown sampler {self.sampler!r}; choose one of {', '.join(samplers)}")
        if self.record_metrics not in RECORD_MODES:
            problems.append(f"record_metrics must be 'all' or 'needed', got {self.record_metrics!r}")
        try:
            self.budget_seconds()
        except ConfigError as exc:
            problems.append(f"time_budget: {exc}")
        try:
            groups.Granularity.parse(self.granularity)
        except ConfigError as exc:
            problems.append(str(exc))
        try:
            check_sample_settings(self.sample_prompts, self.sample_tokens)
        except ConfigError as exc:
            problems.append(str(exc))
        return problems + fidelity_problems(self.pruner, self.fidelities, self.search_limit)

    def resolved_bounds(self, names: list[str]) -> dict[str, tuple[float, float]]:
        """Bounds for every name, [0, 1] by default; every bounds problem is reported at once."""
        out, problems = self.bound_problems(names)
        _raise(problems)
        return out

    def check(self, names: list[str], samplers: Iterable[str] = SAMPLERS) -> dict[str, tuple[float, float]]:
        """Validate every setting and the bounds for ``names`` (every problem at once); returns the bounds."""
        out, problems = self.bound_problems(names)
        _raise(problems + self.setting_problems(samplers))
        return out

    def resolved_direction(self, objective: Objective) -> str:
        """The study direction: ``direction`` if set (it must agree with the objective's), else the objective's."""
        own = objective.direction
        if self.direction is not None and self.direction != own:
            raise ConfigError(f"objective {objective.spec!r} is to be {own}d but the search direction is "
                              f"{self.direction!r}: drop the direction (it follows the objective) or fix the objective")
        return own


def _raise(problems: list[str]) -> None:
    if problems:
        raise ConfigError(f"bad search settings: {problems[0]}" if len(problems) == 1 else
                          "bad search settings:\n  - " + "\n  - ".join(problems))


@dataclass
class SearchResult:
    """Outcome of :func:`run_search`; ``best_value`` is at rescore fidelity when re-scoring ran."""

    study: optuna.Study
    best_weights: dict[str, float]
    best_value: float
    best_metrics: dict[str, float]
    path: Path
    best_trial: int = -1
    value_search: float = math.nan
    new_trials: int = 0
    interrupted: bool = False
    stopped: str | None = None   # "time_budget" when the budget ended the search before config.trials


def no_trial_completed(study: optuna.Study) -> OptimerError:
    """The error of a search none of whose trials completed, with the first trial error."""
    error = record.first_error(study)
    return OptimerError(f"no trial of study {study.study_name!r} completed"
                        + (f"; first error: {error}" if error else "")
                        + ": check the objective and dev data (the error is in each trial's 'error' attr)")


def run_search(merger: Merger, tokenizer: Any, suite: EvalSuite, objective: Objective, config: SearchConfig, *,
               callbacks: Iterable[Callable[[optuna.Study, FrozenTrial], None]] = (),
               progress: bool = True, clock: Callable[[], float] = time.monotonic) -> SearchResult:
    """Run (or resume) the study to ``config.trials`` trials, re-score the top-k, write best.json.

    Non-OptiMer exceptions inside a trial mark it FAILED (message in its ``error`` user attr) and
    the search goes on; OptimerError stops it; Ctrl-C stops it keeping every finished trial (the
    result then has ``interrupted=True`` and no re-scoring is done). ``config.time_budget`` counts from this
    call (on ``clock``) and stops it after the trial running when spent (``stopped="time_budget"``, no re-scoring).
    """
    names = list(merger.names)
    per_vector = config.check(names)
    layout = groups.layout(merger, config.granularity)  # [] per vector
    params = groups.param_names(names, layout)  # "ja" per vector, else "ja@embed", "ja@blocks0-3", ...
    bounds = {p: per_vector[groups.split_key(p)[0]] for p in params}  # a vector's bounds hold for its groups
    budget = config.budget_seconds()
    deadline = Deadline(budget, clock) if budget is not None else None
    config = dataclasses.replace(config, direction=config.resolved_direction(objective))
    workdir = Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    scorer = TrialScorer(merger, tokenizer, suite, [objective], seq_len=config.seq_len, batch_size=config.batch_size,
                         record_metrics=config.record_metrics)
    sampler = make_sampler(config.sampler, config.seed, bounds, config.trials)  # fail fast on missing deps
    plan = scorer.plan(config.fidelities, config.search_limit) if config.pruner != "none" else None
    pruner = make_pruner(config.pruner, plan.steps if plan else (), config.trials)
    study = optuna.create_study(storage=open_storage(config.storage_url()), study_name=config.study_name,
                                direction=config.direction, load_if_exists=True, sampler=sampler, pruner=pruner)
    granularity = groups.Granularity.parse(config.granularity).spec
    record.check_study(study, {record.NAMES: names, record.OBJECTIVE: objective.spec, record.GRANULARITY: granularity})
    if study.trials:
        # A resumed seeded sampler would replay its first draws (random start-up points included);
        # a seed derived from (seed, trial count) keeps resumes deterministic yet fresh (samplers.resume_seed).
        study.sampler = make_sampler(config.sampler, resume_seed(config.seed, len(study.trials)), bounds,
                                     config.trials)
    if hasattr(study.sampler, "warm_start"):  # "grad": checks the objective, enqueues gradient points
        study.sampler.warm_start(study, merger, tokenizer, suite, objective, config, bounds)
    record.write_study_attrs(study, {
        record.NAMES: names, record.OBJECTIVE: objective.spec, record.DIRECTION: config.direction,
        record.GRANULARITY: granularity,
        record.SAMPLER: config.sampler, record.SEED: config.seed,
        record.LIMITS: [config.search_limit, config.rescore_limit], record.RECORD_METRICS: config.record_metrics,
        record.SUITE: {"texts": list(suite.texts), "qa": list(suite.qa)},
        **({record.PRUNER: config.pruner, record.FIDELITIES: list(plan.limits)} if plan else {})})

    def score(trial: optuna.Trial, weights: dict[str, float]) -> tuple[Any, dict[str, float]]:
        if plan is not None:
            return score_rungs(trial, weights, scorer=scorer, plan=plan)
        return scorer.score(weights, config.search_limit)

    outcome = run_trials(study, total=config.trials, suggest=lambda t: {n: t.suggest_float(n, *b) for n, b in
                                                                          bounds.items()},
                         score=score, metrics_key=record.metrics_key(config.search_limit), callbacks=callbacks,
                         progress=progress, should_stop=grid_exhausted if deadline is None else
                         lambda s: grid_exhausted(s) or deadline(s),
                         samples=trial_sampler(merger, tokenizer, config))
    stopped = "time_budget" if deadline is not None and deadline.spent else None
    if deadline is not None or record.STOPPED in study.user_attrs:  # a stale "time_budget" must not outlive a run
        reason = stopped or ("interrupted" if outcome.interrupted else "completed")
        study.set_user_attr(record.STOPPED, {"reason": reason, "budget_s": budget,
                                             "elapsed_s": round(deadline.elapsed, 3) if deadline else None,
                                             "new_trials": outcome.done, "trials": counted(study), "of": config.trials})
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        if outcome.interrupted:
            raise KeyboardInterrupt
        raise no_trial_completed(study)
    sign = 1.0 if config.direction == "minimize" else -1.0
    ranked = sorted(complete, key=lambda t: sign * t.value)
    rescore = (not outcome.interrupted and not stopped and config.top_k > 0
               and config.rescore_limit != config.search_limit)
    interrupted = outcome.interrupted
    if rescore:
        try:
            best, best_value, best_metrics = _rescore(study, ranked[:config.top_k], scorer.score, config, sign)
        except KeyboardInterrupt:  # Ctrl-C or Stop while re-scoring: keep the search-fidelity best
            interrupted, rescore = True, False
    if not rescore:
        best = ranked[0]
        best_value = float(best.value)
        best_metrics = dict(best.user_attrs.get(record.metrics_key(config.search_limit), {}))
    best_weights = {n: float(best.params[n]) for n in params}
    payload = {"weights": best_weights, "objective": best_value, "objective_search": float(best.value),
               "metrics": best_metrics, "trial": best.number, "study": config.study_name,
               "storage": config.storage_url() or ":memory:", "sampler": config.sampler, "seed": config.seed,
               "limits": [config.search_limit, config.rescore_limit], "rescored": rescore,
               "objective_spec": objective.spec, "direction": config.direction, "trials": counted(study),
               "granularity": granularity, **({"groups": layout, "group_weights": groups.nested(best_weights)}
                                              if layout else {}),
               **({"stopped": stopped} if stopped else {}), **({"interrupted": True} if interrupted else {})}
    path = atomic_write_json(workdir / "best.json", payload)  # before the merge below: a stopped merger raises
    try:
        merger.set_weights(best_weights)
    except KeyboardInterrupt:  # a workbench Stop cancels every lease of its merger, this one too
        if not interrupted:
            raise
    return SearchResult(study=study, best_weights=best_weights, best_value=best_value, best_metrics=best_metrics,
                        path=path, best_trial=best.number, value_search=float(best.value), new_trials=outcome.done,
                        interrupted=interrupted, stopped=stopped)


Scorer = Callable[[dict[str, float], "int | None"], tuple[float, dict[str, float]]]


def _rescore(study: optuna.Study, top: list[FrozenTrial], score: Scorer, config: SearchConfig,
             sign: float) -> tuple[FrozenTrial, float, dict[str, float]]:
    """Score ``top`` at ``rescore_limit``; returns (best trial, its re-scored value, its metrics).

    Finished trials are read-only in Optuna 5 (every storage refuses to update them), so re-scores
    live in the study user attr ``rescore@<limit>`` (trial number -> objective, metrics) and in
    ``<workdir>/rescore.json``; they are reused when the command is re-run.
    """
    key = record.rescore_key(config.rescore_limit)
    rescored: dict[str, dict[str, Any]] = dict(study.user_attrs.get(key, {}))
    for t in top:
        if str(t.number) in rescored and record.ERROR not in rescored[str(t.number)]:
            continue
        try:
            value, metrics = score({n: float(v) for n, v in t.params.items()}, config.rescore_limit)
            rescored[str(t.number)] = {"objective": value, "metrics": metrics}
        except OptimerError:
            raise
        except Exception as exc:  # keep the other candidates; this one just cannot win
            log.warning("re-scoring trial %d failed: %s: %s", t.number, type(exc).__name__, exc)
            rescored[str(t.number)] = {"objective": math.nan, "metrics": {},
                                       record.ERROR: f"{type(exc).__name__}: {exc}"}
    study.set_user_attr(key, rescored)
    atomic_write_json(Path(config.workdir) / "rescore.json", {"limit": config.rescore_limit, "trials": rescored})

    def rank(t: FrozenTrial) -> float:
        v = float(rescored[str(t.number)]["objective"])
        return sign * v if math.isfinite(v) else math.inf

    best = min(top, key=rank)
    if not math.isfinite(rank(best)):
        raise OptimerError(f"re-scoring failed for every top-{len(top)} trial at limit {config.rescore_limit} "
                           "(see rescore.json); fix the cause and re-run to retry")
    entry = rescored[str(best.number)]
    return best, float(entry["objective"]), dict(entry["metrics"])


def trial_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state (Optuna's, or INTERRUPTED), objective, each weight, each search metric,
    re-scored objective.

    Metrics are the highest fidelity's the trial has; in a multi-fidelity study ``fidelity`` is the report
    step (documents per set) of the last rung a trial reached (a PRUNED trial's objective is at that rung).
    """
    rows = []
    rescores = record.rescores(study)
    for t in study.get_trials(deepcopy=False):
        # an interrupted trial is stored FAIL (Optuna has no such state) with a mark: say what happened to it
        state = "INTERRUPTED" if t.user_attrs.get(record.INTERRUPTED) else t.state.name
        row: dict[str, Any] = {"number": t.number, "state": state, "objective": t.value}
        if t.intermediate_values:
            row["fidelity"] = max(t.intermediate_values)
        row.update({n: float(v) for n, v in t.params.items()})
        stored = record.trial_metrics(t)
        for ftag in sorted(stored, key=record.fidelity_key, reverse=True):
            row.update({m: v for m, v in stored[ftag].items() if m not in row})
        for ftag, table in rescores.items():
            if str(t.number) in table:
                row["objective@" + ftag] = table[str(t.number)]["objective"]
        if record.ERROR in t.user_attrs:
            row["error"] = t.user_attrs[record.ERROR]
        rows.append(row)
    return pd.DataFrame(rows)
