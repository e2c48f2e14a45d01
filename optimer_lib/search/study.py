"""Post-hoc search of merge weights α with Optuna, plus two-fidelity top-k re-scoring.

    from optimer_lib.search.study import SearchConfig, run_search
    result = run_search(merger, tokenizer, suite, objective, SearchConfig(trials=100, workdir=Path("runs/x")))
    result.best_weights, result.best_value, result.path   # <workdir>/best.json

``merger`` is duck-typed: ``.names`` (vector names), ``.set_weights({name: α})`` (rewrites the
resident model in place) and ``.model``. The study lives in ``config.storage`` (SQLite under the
workdir by default); ``trials`` is the study's *total*, so re-running an interrupted command
continues to N and re-running a finished one only re-reads it. Each trial stores its weights and
metrics as user attrs (``weights``, ``metrics@<search_limit>``); with ``record_metrics="all"`` (the
default) those are every metric of the suite, not only the objective's, so the study can be re-ranked
for another objective later without evaluating anything (``optimer_lib.search.rerank``). The top-k trials
are then re-scored at ``rescore_limit`` and the best re-scored one is written to best.json. On return
the merger holds the best weights. ``callbacks`` are called as ``cb(study, frozen_trial)`` after every trial (live UIs).
``pruner``/``fidelities`` score each trial on growing nested subsets first and stop poor ones early
(state PRUNED; see ``optimer_lib.search.pruning``).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from optimer_lib.errors import ConfigError, MissingDependencyError, OptimerError
from optimer_lib.fileio import atomic_write_json
from optimer_lib.scoring.evaluate import EvalSuite, evaluate_suite
from optimer_lib.scoring.objectives import Objective
from optimer_lib.search.gradient import grad_tpe
from optimer_lib.search.pruning import fidelity_plan, fidelity_problems, make_pruner, score_rungs

log = logging.getLogger(__name__)
SamplerFactory = Callable[[int, dict[str, tuple[float, float]], int], optuna.samplers.BaseSampler]


def _tpe(seed: int, bounds: dict[str, tuple[float, float]], n_trials: int) -> optuna.samplers.BaseSampler:
    # Random start-up of ~n/5 (at most 10, the paper-scale default) before the Parzen models kick in.
    startup = max(2, min(10, n_trials // 5))
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=startup)


def _gp(seed: int, bounds: dict[str, tuple[float, float]], n_trials: int) -> optuna.samplers.BaseSampler:
    # GPSampler imports scipy/torch lazily, i.e. mid-search; fail up front instead.
    for module in ("scipy", "torch"):
        try:
            __import__(module)
        except ImportError as exc:
            raise MissingDependencyError(f"sampler 'gp' needs {module}: pip install scipy torch "
                                         "(or choose --sampler tpe)") from exc
    return optuna.samplers.GPSampler(seed=seed, n_startup_trials=max(2, min(10, n_trials // 5)))


def _cmaes(seed: int, bounds: dict[str, tuple[float, float]], n_trials: int) -> optuna.samplers.BaseSampler:
    try:
        import cmaes  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError("sampler 'cmaes' needs the cmaes package: pip install cmaes "
                                     "(or choose --sampler tpe)") from exc
    return optuna.samplers.CmaEsSampler(seed=seed)


def _random(seed: int, bounds: dict[str, tuple[float, float]], n_trials: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)


class _Grid(optuna.samplers.GridSampler):
    """GridSampler whose exhaustion is checked by :func:`run_search` (its own ``study.stop()`` only
    works inside ``study.optimize``, and raises in the ask/tell loop used here)."""

    def after_trial(self, study, trial, state, values) -> None:
        return None


def _grid(seed: int, bounds: dict[str, tuple[float, float]], n_trials: int) -> optuna.samplers.BaseSampler:
    # k points per axis with k^d ≈ n_trials (at least the two end points).
    k = max(2, round(n_trials ** (1 / max(1, len(bounds)))))
    space = {n: [lo + (hi - lo) * i / (k - 1) for i in range(k)] for n, (lo, hi) in bounds.items()}
    return _Grid(space, seed=seed)


SAMPLERS: dict[str, SamplerFactory] = {"tpe": _tpe, "gp": _gp, "cmaes": _cmaes, "random": _random, "grid": _grid,
                                      "grad": grad_tpe}  # TPE warm-started by gradient steps (gradient.py)


def make_sampler(name: str, seed: int, bounds: dict[str, tuple[float, float]],
                 n_trials: int) -> optuna.samplers.BaseSampler:
    """Build a registered sampler; unknown names raise ConfigError listing the choices."""
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name](seed, bounds, n_trials)


@dataclass
class SearchConfig:
    """Search settings; ``storage=None`` means ``sqlite:///<workdir>/optuna.db`` (":memory:" for none).

    ``search_limit``/``rescore_limit`` are samples per dev set (None = all); ``top_k=0`` skips re-scoring.
    ``record_metrics``: ``"all"`` scores every distribution/task of the suite in each trial and stores
    them (the objective is computed from them); ``"needed"`` scores only what the objective reads
    (cheaper, but the study cannot be re-ranked for other metrics). A callable objective always
    records the dict it returns. ``pruner`` (``optimer_lib.search.pruning.PRUNERS``: none, median, asha,
    hyperband...) scores each trial at increasing ``fidelities`` (documents per dev set, ending at
    ``search_limit``; default about 1/9, 1/3, all of it) and may stop it after any rung but the last.
    """

    trials: int = 100
    sampler: str = "tpe"
    seed: int = 0
    bounds: dict[str, tuple[float, float]] | tuple[float, float] | None = None
    storage: str | None = None
    study_name: str = "optimer"
    direction: str = "minimize"
    search_limit: int | None = 100
    rescore_limit: int | None = 300
    top_k: int = 3
    workdir: Path = field(default_factory=lambda: Path("optimer-run"))
    seq_len: int = 128
    batch_size: int = 16
    record_metrics: str = "all"
    pruner: str = "none"
    fidelities: tuple[int | None, ...] | None = None

    def storage_url(self) -> str | None:
        if self.storage == ":memory:":
            return None
        return self.storage or f"sqlite:///{Path(self.workdir).resolve() / 'optuna.db'}"

    def resolved_bounds(self, names: list[str]) -> dict[str, tuple[float, float]]:
        """Bounds for every name, [0, 1] by default; every problem is reported at once.

        ``bounds`` is per vector (``{name: (lo, hi)}``, missing names get [0, 1]) or one ``(lo, hi)`` for all.
        """
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
        if self.trials < 1:
            problems.append(f"trials must be >= 1, got {self.trials}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0, got {self.top_k}")
        if self.direction not in ("minimize", "maximize"):
            problems.append(f"direction must be 'minimize' or 'maximize', got {self.direction!r}")
        if self.sampler not in SAMPLERS:
            problems.append(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.record_metrics not in ("all", "needed"):
            problems.append(f"record_metrics must be 'all' or 'needed', got {self.record_metrics!r}")
        problems += fidelity_problems(self.pruner, self.fidelities, self.search_limit)
        if problems:
            raise ConfigError(f"bad search settings: {problems[0]}" if len(problems) == 1 else
                              "bad search settings:\n  - " + "\n  - ".join(problems))
        return out


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


def _tag(limit: int | None) -> str:
    return "all" if limit is None else str(limit)


_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def _counted(study: optuna.Study) -> int:
    # An interrupted trial is marked FAIL by us but should not use up one of the N trials; a pruned one does.
    return sum(1 for t in study.get_trials(deepcopy=False, states=_FINISHED) if not t.user_attrs.get("interrupted"))


_WORKER = f"{socket.gethostname()}:{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _claimed(study: optuna.Study, before: int | None = None) -> int:
    """Trials holding one of the N: counted ones plus running ones (in any worker sharing the study),
    only those numbered below ``before`` if given.

    A running trial whose worker died on this host (SIGKILL, out of memory) is first failed as
    interrupted, freeing its slot; one left by a dead worker on another host keeps its slot.
    """
    host, n = socket.gethostname(), 0
    for t in study.get_trials(deepcopy=False, states=(*_FINISHED, TrialState.RUNNING)):
        if t.user_attrs.get("interrupted") or (before is not None and t.number >= before):
            continue
        h, _, pid = str(t.user_attrs.get("worker", "")).rpartition(":")
        if t.state == TrialState.RUNNING and h == host and pid.isdigit() and not _alive(int(pid)):
            optuna.trial.Trial(study, t._trial_id).set_user_attr("interrupted", True)
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            continue
        n += 1
    return n


def open_storage(url: str | None) -> optuna.storages.BaseStorage | str | None:
    """The Optuna storage for ``--storage``: ``journal:///abs/file.log`` (or ``journal://rel/file.log``) is a
    JournalStorage on that file (several hosts on a shared file system); SQLite URLs get a 60 s lock
    timeout so several workers can share one file; other URLs (postgresql://, mysql://) are RDB storages.
    Workers starting together on a fresh database race to create its tables: the loser retries."""
    if not url:
        return None
    if url.startswith("journal://"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url[len("journal://"):]))
    from sqlalchemy.exc import IntegrityError, OperationalError

    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite:") else None
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except (IntegrityError, OperationalError):
            if attempt == 4:
                raise
            time.sleep(0.5 * (attempt + 1))
    return url


def _check_study(study: optuna.Study, names: list[str], objective: Objective) -> None:
    """Refuse to mix trials of a different vector set or objective into one study."""
    attrs = study.user_attrs
    problems = []
    if attrs.get("names") not in (None, names):
        problems.append(f"vectors {attrs['names']} (now {names})")
    if attrs.get("objective") not in (None, objective.spec):
        problems.append(f"objective {attrs['objective']!r} (now {objective.spec!r})")
    if problems:
        raise ConfigError(f"study {study.study_name!r} was run with different " + " and ".join(problems)
                          + ": pick a new --study name or another --storage to start afresh")


def run_search(merger: Any, tokenizer: Any, suite: EvalSuite, objective: Objective, config: SearchConfig, *,
               callbacks: Iterable[Callable[[optuna.Study, FrozenTrial], None]] = (),
               progress: bool = True) -> SearchResult:
    """Run (or resume) the study to ``config.trials`` trials, re-score the top-k, write best.json.

    Non-OptiMer exceptions inside a trial mark it FAILED (message in its ``error`` user attr) and
    the search goes on; OptimerError stops it; Ctrl-C stops it keeping every finished trial (the
    result then has ``interrupted=True`` and no re-scoring is done).
    """
    names = list(merger.names)
    bounds = config.resolved_bounds(names)
    workdir = Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    sampler = make_sampler(config.sampler, config.seed, bounds, config.trials)  # fail fast on missing deps
    plan = fidelity_plan(config, suite, objective, tokenizer) if config.pruner != "none" else None
    pruner = make_pruner(config.pruner, plan.steps if plan else (), config.trials)
    study = optuna.create_study(storage=open_storage(config.storage_url()), study_name=config.study_name,
                                direction=config.direction, load_if_exists=True, sampler=sampler, pruner=pruner)
    _check_study(study, names, objective)
    if study.trials:
        # A resumed seeded sampler would replay its first draws (random start-up points included);
        # offsetting the seed by the trial count keeps resumes deterministic yet fresh.
        study.sampler = make_sampler(config.sampler, config.seed + len(study.trials), bounds, config.trials)
    if hasattr(study.sampler, "warm_start"):  # "grad": checks the objective, enqueues gradient points
        study.sampler.warm_start(study, merger, tokenizer, suite, objective, config, bounds)
    for key, value in {"names": names, "objective": objective.spec, "sampler": config.sampler,
                       "seed": config.seed, "limits": [config.search_limit, config.rescore_limit],
                       "record_metrics": config.record_metrics,
                       "suite": {"texts": list(suite.texts), "qa": list(suite.qa)},
                       **({"pruner": config.pruner, "fidelities": list(plan.limits)} if plan else {})}.items():
        if key not in study.user_attrs:
            study.set_user_attr(key, value)

    def score(weights: dict[str, float], limit: int | None) -> tuple[float, dict[str, float]]:
        merger.set_weights(weights)
        if config.record_metrics == "all" and objective.fn is None:
            metrics = evaluate_suite(merger.model, tokenizer, suite, limit=limit, seq_len=config.seq_len,
                                     batch_size=config.batch_size)
            return objective(metrics), metrics
        return objective.evaluate(merger.model, tokenizer, suite, limit=limit, seq_len=config.seq_len,
                                  batch_size=config.batch_size)

    staged = partial(score_rungs, merger=merger, tokenizer=tokenizer, suite=suite, objective=objective, plan=plan,
                     seq_len=config.seq_len, batch_size=config.batch_size) if plan else None
    done, interrupted = _run_trials(study, score, bounds, config, list(callbacks), progress, staged)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        if interrupted:
            raise KeyboardInterrupt
        errors = [t.user_attrs["error"] for t in study.get_trials(deepcopy=False) if "error" in t.user_attrs]
        raise OptimerError(f"no trial of study {config.study_name!r} completed"
                           + (f"; first error: {errors[0]}" if errors else "")
                           + ": check the objective and dev data (the error is in each trial's 'error' attr)")
    sign = 1.0 if config.direction == "minimize" else -1.0
    ranked = sorted(complete, key=lambda t: sign * t.value)
    rescore = not interrupted and config.top_k > 0 and config.rescore_limit != config.search_limit
    if rescore:
        best, best_value, best_metrics = _rescore(study, ranked[:config.top_k], score, config, sign)
    else:
        best = ranked[0]
        best_value = float(best.value)
        best_metrics = dict(best.user_attrs.get(f"metrics@{_tag(config.search_limit)}", {}))
    best_weights = {n: float(best.params[n]) for n in names}
    merger.set_weights(best_weights)
    payload = {"weights": best_weights, "objective": best_value, "objective_search": float(best.value),
               "metrics": best_metrics, "trial": best.number, "study": config.study_name,
               "storage": config.storage_url() or ":memory:", "sampler": config.sampler, "seed": config.seed,
               "limits": [config.search_limit, config.rescore_limit], "rescored": rescore,
               "objective_spec": objective.spec, "trials": _counted(study)}
    path = _atomic_json(workdir / "best.json", payload)
    return SearchResult(study=study, best_weights=best_weights, best_value=best_value, best_metrics=best_metrics,
                        path=path, best_trial=best.number, value_search=float(best.value), new_trials=done,
                        interrupted=interrupted)


def tell_outcome(study: optuna.Study, trial: optuna.Trial, score: Callable[[], tuple[Any, dict[str, float]]],
                 metrics_key: str) -> FrozenTrial | None:
    """Score one asked trial and tell the study; the policy every search loop shares.

    ``score()`` returns ``(value or list of values, metrics)``; the metrics go into the trial's
    ``metrics_key`` attr. A non-finite value or any non-OptiMer exception marks the trial FAILED (the
    message in its ``error`` attr) and the search goes on; OptimerError is re-raised; Ctrl-C marks the
    trial ``interrupted`` (not counted) and returns None. ``optuna.TrialPruned`` (raised by a multi-fidelity
    ``score()`` after ``trial.report``) marks it PRUNED, keeping what it stored; a pruned trial counts.
    """
    try:
        value, metrics = score()
        trial.set_user_attr(metrics_key, metrics)
        values = value if isinstance(value, (list, tuple)) else [value]
        if not all(math.isfinite(v) for v in values):
            raise FloatingPointError(f"objective is {value}")
    except KeyboardInterrupt:
        trial.set_user_attr("interrupted", True)
        study.tell(trial, state=TrialState.FAIL)
        return None
    except optuna.TrialPruned:
        return study.tell(trial, state=TrialState.PRUNED)
    except OptimerError:
        study.tell(trial, state=TrialState.FAIL)
        raise
    except Exception as exc:  # a bad corner of weight space must not end a long search
        log.warning("trial %d failed: %s: %s", trial.number, type(exc).__name__, exc)
        trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")
        return study.tell(trial, state=TrialState.FAIL)
    return study.tell(trial, value)


Scorer = Callable[[dict[str, float], "int | None"], tuple[float, dict[str, float]]]
StagedScorer = Callable[[optuna.Trial, dict[str, float]], tuple[float, dict[str, float]]]


def _run_trials(study: optuna.Study, score: Scorer, bounds: dict[str, tuple[float, float]],
                config: SearchConfig, callbacks: list[Callable[[optuna.Study, FrozenTrial], None]],
                progress: bool, staged: StagedScorer | None = None) -> tuple[int, bool]:
    """The ask/tell loop up to the study's total; returns (trials run now, interrupted).

    Each trial is ``score(weights, search_limit)``, or ``staged(trial, weights)`` (rung by rung, may prune).

    Several workers may share the study: each stops once the study has ``config.trials`` trials
    finished or running, so together they end with exactly that many (a trial asked in the same
    instant as another worker's last one is dropped, marked ``interrupted`` and ``surplus``).
    """
    remaining = max(0, config.trials - _claimed(study))
    metrics_key = f"metrics@{_tag(config.search_limit)}"
    bar = None
    if progress and remaining:
        from tqdm.auto import tqdm

        bar = tqdm(total=remaining, desc=f"search {config.study_name}", unit="trial")
    done = pruned = 0
    try:
        while _claimed(study) < config.trials:
            if isinstance(study.sampler, optuna.samplers.GridSampler) and study.sampler.is_exhausted(study):
                log.info("grid exhausted after %d trials; stopping early", len(study.trials))
                break
            trial = study.ask()
            trial.set_user_attr("worker", _WORKER)
            if _claimed(study, before=trial.number) >= config.trials:  # another worker took the last slot
                trial.set_user_attr("interrupted", True)
                trial.set_user_attr("surplus", True)
                study.tell(trial, state=TrialState.FAIL)
                break
            weights = {n: trial.suggest_float(n, *b) for n, b in bounds.items()}
            trial.set_user_attr("weights", weights)
            run = partial(staged, trial, weights) if staged else partial(score, weights, config.search_limit)
            frozen = tell_outcome(study, trial, run, metrics_key)
            if frozen is None:
                return done, True
            done += 1
            pruned += frozen.state == TrialState.PRUNED
            if bar is not None:
                bar.update(1)
                if frozen.state == TrialState.COMPLETE or bar.postfix:
                    bar.set_postfix(best=f"{study.best_value:.4g}", **({"pruned": pruned} if staged else {}))
            for cb in callbacks:
                cb(study, frozen)
    finally:
        if bar is not None:
            bar.close()
    return done, False


def _rescore(study: optuna.Study, top: list[FrozenTrial], score: Scorer, config: SearchConfig,
             sign: float) -> tuple[FrozenTrial, float, dict[str, float]]:
    """Score ``top`` at ``rescore_limit``; returns (best trial, its re-scored value, its metrics).

    Finished trials are read-only in Optuna 5 (every storage refuses to update them), so re-scores
    live in the study user attr ``rescore@<limit>`` (trial number -> objective, metrics) and in
    ``<workdir>/rescore.json``; they are reused when the command is re-run.
    """
    key = f"rescore@{_tag(config.rescore_limit)}"
    rescored: dict[str, dict[str, Any]] = dict(study.user_attrs.get(key, {}))
    for t in top:
        if str(t.number) in rescored and "error" not in rescored[str(t.number)]:
            continue
        try:
            value, metrics = score({n: float(v) for n, v in t.params.items()}, config.rescore_limit)
            rescored[str(t.number)] = {"objective": value, "metrics": metrics}
        except OptimerError:
            raise
        except Exception as exc:  # keep the other candidates; this one just cannot win
            log.warning("re-scoring trial %d failed: %s: %s", t.number, type(exc).__name__, exc)
            rescored[str(t.number)] = {"objective": math.nan, "metrics": {}, "error": f"{type(exc).__name__}: {exc}"}
    study.set_user_attr(key, rescored)
    _atomic_json(Path(config.workdir) / "rescore.json", {"limit": config.rescore_limit, "trials": rescored})

    def rank(t: FrozenTrial) -> float:
        v = float(rescored[str(t.number)]["objective"])
        return sign * v if math.isfinite(v) else math.inf

    best = min(top, key=rank)
    if not math.isfinite(rank(best)):
        raise OptimerError(f"re-scoring failed for every top-{len(top)} trial at limit {config.rescore_limit} "
                           "(see rescore.json); fix the cause and re-run to retry")
    entry = rescored[str(best.number)]
    return best, float(entry["objective"]), dict(entry["metrics"])


def _atomic_json(path: Path, payload: dict[str, Any]) -> Path:
    """Write JSON so readers never see a half-written file (temp file + rename in the same folder)."""
    return atomic_write_json(path, payload)


def trial_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, objective, each weight, each search metric, re-scored objective.

    Metrics are the highest fidelity's the trial has; in a multi-fidelity study ``fidelity`` is the report
    step (documents per set) of the last rung a trial reached (a PRUNED trial's objective is at that rung).
    """
    from optimer_lib.search.rerank import fidelity_key

    rows = []
    rescores = {k: v for k, v in study.user_attrs.items() if k.startswith("rescore@")}
    for t in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {"number": t.number, "state": t.state.name, "objective": t.value}
        if t.intermediate_values:
            row["fidelity"] = max(t.intermediate_values)
        row.update({n: float(v) for n, v in t.params.items()})
        stored = sorted((k for k, v in t.user_attrs.items() if k.startswith("metrics@") and isinstance(v, dict)),
                        key=lambda k: fidelity_key(k.split("@", 1)[1]), reverse=True)
        for key in stored:
            row.update({m: v for m, v in t.user_attrs[key].items() if m not in row})
        for key, table in rescores.items():
            if str(t.number) in table:
                row["objective@" + key.split("@", 1)[1]] = table[str(t.number)]["objective"]
        if "error" in t.user_attrs:
            row["error"] = t.user_attrs["error"]
        rows.append(row)
    return pd.DataFrame(rows)
