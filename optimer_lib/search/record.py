"""The study record: every key a search writes to (or reads from) an Optuna study, in one place, versioned.

    from optimer_lib.search import record
    record.write_study_attrs(study, {record.NAMES: names, record.OBJECTIVE: objective.spec})
    trial.set_user_attr(record.metrics_key(100), metrics)         # "metrics@100"
    record.trial_metrics(frozen_trial)                            # {"100": {...}, "33": {...}}
    record.stored_metrics(study)                                  # {trial number: {fidelity tag: metrics}}

Study attrs (``study.user_attrs``) describe the search; trial attrs what one trial did. Every search loop
(single-objective, Pareto, data mixture, warm start, gradient warm start) and every reader (re-rank, Pareto
fronts, costs, the workbench) goes through these names, so a new key is added here or nowhere.

Versions: 1 is every study written before this module existed (it has no ``record_version`` attr); 2 adds
``record_version`` and ``direction``. The keys of version 1 are a subset of version 2's with the same
meaning, so :func:`read_version` is all a reader needs to tell them apart; a study from a newer version is
refused with a message instead of being misread.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from optimer_lib.errors import ConfigError

VERSION = 2

# ---- study attrs -------------------------------------------------------------------------------------------
RECORD_VERSION = "record_version"
NAMES = "names"                  # vector (or dataset) names, in order
OBJECTIVE = "objective"          # the objective spec of a single-objective study
OBJECTIVES = "objectives"        # the objective specs of a multi-objective study
DIRECTION = "direction"          # "minimize" or "maximize" (single objective; multi: Optuna's directions)
SAMPLER = "sampler"
SEED = "seed"
LIMITS = "limits"                # [search_limit, rescore_limit] (documents per dev set; None = all)
RECORD_METRICS = "record_metrics"  # "all" or "needed"
SUITE = "suite"                  # {"texts": [...], "qa": [...]}: the dev suite the metrics come from
PRUNER = "pruner"
FIDELITIES = "fidelities"
WARM_START = "warm_start"        # {"sources", "seeded", ...}: a warm-started study
GRAD_WARM_START = "grad_warm_start"  # the gradient sampler's start points
STOPPED = "stopped"              # why the last run with a time budget stopped: {"reason": "time_budget" | ...}
GRANULARITY = "granularity"      # "vector" or "layer-groups:G": the layout of the search parameters
RESCORE_PREFIX = "rescore@"      # rescore@<tag>: {trial number: {"objective", "metrics"[, "error"]}}

# ---- trial attrs -------------------------------------------------------------------------------------------
WEIGHTS = "weights"              # the merge weights (or method parameters) the trial scored
WORKER = "worker"                # "<host>:<pid>" of the process running it
INTERRUPTED = "interrupted"      # failed by Ctrl-C or a dead worker: does not use up one of the N trials
SURPLUS = "surplus"              # asked after another worker took the last slot
ERROR = "error"                  # "<ExceptionType>: message" of a failed trial
DOCS_EVALUATED = "docs_evaluated"      # items scored (multi-fidelity trials)
TOKENS_EVALUATED = "tokens_evaluated"  # tokens scored
TOKENS_TRAINED = "tokens_trained"      # tokens trained (data-mixture trials)
RATIOS = "ratios"                # the normalised mixture ratios of a data-mixture trial
METRICS_PREFIX = "metrics@"      # metrics@<tag>: every metric scored at that fidelity
SEEDED_FROM = "seeded_from"      # "<source study>#<trial>" of a warm-start seed
GRAD_STEP = "grad_step"          # the gradient-descent step a ``grad`` sampler start point came from
GRAD_VALUE = "grad_value"        # the objective the descent computed at that point
SAMPLES = "samples"              # [{"prompt", "text"}]: greedy generations on the search's sample prompts
TOKENS_GENERATED = "tokens_generated"  # tokens those generations produced (the cost ledger counts them)
SAMPLE_SECONDS = "sample_seconds"      # wall time of those generations (inside the trial's own time)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def tag(limit: int | None) -> str:
    """The fidelity tag of a document limit: ``100 -> "100"``, ``None -> "all"``."""
    return "all" if limit is None else str(limit)


def fidelity_key(tag_: str) -> float:
    """Sort key of a fidelity tag: samples per dev set, ``"all"`` highest."""
    return math.inf if tag_ == "all" else float(tag_) if tag_.isdigit() else -1.0


def metrics_key(limit: int | None) -> str:
    """The trial attr holding the metrics scored at ``limit`` documents per set."""
    return METRICS_PREFIX + tag(limit)


def rescore_key(limit: int | None) -> str:
    """The study attr holding the top-k re-scores at ``limit``."""
    return RESCORE_PREFIX + tag(limit)


def read_version(study: optuna.Study) -> int:
    """The record version of ``study`` (1 for studies written before versioning); newer ones are refused."""
    version = int(study.user_attrs.get(RECORD_VERSION, 1))
    if version > VERSION:
        raise ConfigError(f"study {study.study_name!r} was written by a newer OptiMer (record version {version}, "
                          f"this one reads up to {VERSION}): upgrade optimer-workbench to read it")
    return version


def write_study_attrs(study: optuna.Study, attrs: Mapping[str, Any]) -> None:
    """Set each attr the study does not hold yet (a resumed study keeps what it started with), plus the version."""
    have = study.user_attrs
    for key, value in {RECORD_VERSION: VERSION, **attrs}.items():
        if key not in have:
            study.set_user_attr(key, value)


def check_study(study: optuna.Study, expected: Mapping[str, Any], *, what: str = "--study name") -> None:
    """Refuse to mix trials of a different setting (vectors, objective...) into one study; every mismatch at once."""
    read_version(study)
    attrs = study.user_attrs
    problems = [f"{key} {attrs[key]!r} (now {value!r})" for key, value in expected.items()
                if attrs.get(key) not in (None, value)]
    if problems:
        raise ConfigError(f"study {study.study_name!r} was run with different " + " and ".join(problems)
                          + f": pick a new {what} or another --storage to start afresh")


def study_direction(study: optuna.Study) -> str:
    """``"minimize"`` or ``"maximize"`` of a single-objective study."""
    return "maximize" if study.direction == optuna.study.StudyDirection.MAXIMIZE else "minimize"


def is_counted(trial: FrozenTrial) -> bool:
    """Whether a trial uses up one of a search's N trials: finished and not interrupted (a pruned one counts)."""
    return trial.state in FINISHED and not trial.user_attrs.get(INTERRUPTED)


def trial_metrics(trial: FrozenTrial) -> dict[str, dict[str, float]]:
    """``{fidelity tag: metrics}`` stored on one trial (empty dicts skipped)."""
    return {k[len(METRICS_PREFIX):]: dict(v) for k, v in trial.user_attrs.items()
            if k.startswith(METRICS_PREFIX) and isinstance(v, dict) and v}


def trial_samples(trial: FrozenTrial) -> list[dict[str, str]]:
    """The sample generations a trial stored (``[{"prompt", "text"}]``; empty when the search asked for none)."""
    value = trial.user_attrs.get(SAMPLES)
    return [{"prompt": str(s.get("prompt", "")), "text": str(s.get("text", ""))} for s in value
            if isinstance(s, dict)] if isinstance(value, list) else []


def best_stored_metrics(trial: FrozenTrial) -> dict[str, float]:
    """The metrics of the highest fidelity a trial stored (empty when none)."""
    per = trial_metrics(trial)
    return per[max(per, key=fidelity_key)] if per else {}


def rescores(study: optuna.Study) -> dict[str, dict[str, dict[str, Any]]]:
    """``{fidelity tag: {trial number (str): {"objective", "metrics"[, "error"]}}}`` of the study's re-scores."""
    return {k[len(RESCORE_PREFIX):]: v for k, v in study.user_attrs.items()
            if k.startswith(RESCORE_PREFIX) and isinstance(v, dict)}


def stored_metrics(study: optuna.Study) -> dict[int, dict[str, dict[str, float]]]:
    """``{trial number: {fidelity tag: metrics}}`` for every COMPLETE trial (search + re-score metrics)."""
    out = {t.number: trial_metrics(t) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    for ftag, table in rescores(study).items():
        for number, entry in table.items():
            if int(number) in out and entry.get("metrics") and ERROR not in entry:
                out[int(number)].setdefault(ftag, dict(entry["metrics"]))
    return out


def first_error(study: optuna.Study) -> str | None:
    """The error message of the first failed trial, if any (for "no trial completed" messages)."""
    return next((t.user_attrs[ERROR] for t in study.get_trials(deepcopy=False) if ERROR in t.user_attrs), None)
