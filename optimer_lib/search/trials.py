"""The one trial loop: ask, claim a slot, score, tell; shared by every search (scalar, Pareto, data mixture).

    from optimer_lib.search.trials import run_trials
    outcome = run_trials(study, total=100, suggest=lambda t: {n: t.suggest_float(n, 0, 1) for n in names},
                         score=lambda trial, weights: scorer.score(weights, 100), metrics_key="metrics@100")
    outcome.done, outcome.interrupted

``total`` is the study's total, not this call's: several workers (processes, hosts) sharing one storage each
stop once the study has ``total`` trials finished or running, so together they end with exactly that many (a
trial asked in the same instant as another worker's last one is dropped, marked ``interrupted`` and
``surplus``). A running trial whose worker died on this host (SIGKILL, out of memory) is failed as interrupted
when the next worker looks, which frees its slot; so is one killed before it was stamped with its worker, once
it has stayed unstamped for ``UNSTAMPED_GRACE_S``. Failure policy (:func:`tell_outcome`): a non-finite value or
any non-OptiMer exception fails that trial and the search goes on; an OptimerError stops the search; Ctrl-C
marks the trial interrupted (not counted) and returns with ``interrupted=True``, keeping every finished trial.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from optimer_lib.errors import OptimerError
from optimer_lib.search import record

log = logging.getLogger(__name__)

Weights = dict[str, float]
Suggest = Callable[[optuna.Trial], Weights]
Score = Callable[[optuna.Trial, Weights], tuple[Any, dict[str, float]]]
Callback = Callable[[optuna.Study, FrozenTrial], None]

WORKER = f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class LoopOutcome:
    """What one :func:`run_trials` call did: trials it finished, and whether Ctrl-C stopped it."""

    done: int
    interrupted: bool


class Deadline:
    """A ``should_stop`` for :func:`run_trials`: true once ``seconds`` have passed since it was made.

        deadline = Deadline(30 * 60)                    # a 30-minute budget, starting now
        run_trials(study, ..., should_stop=deadline)    # the trial running when it expires finishes
        deadline.spent, deadline.elapsed

    Never true when asked the first time, so a search always finishes one trial, however small the budget.
    ``clock`` (seconds, monotonic) is injectable for tests.
    """

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds, self.clock = float(seconds), clock
        self.start, self.asked, self.spent = clock(), 0, False

    @property
    def elapsed(self) -> float:
        return self.clock() - self.start

    def __call__(self, study: optuna.Study | None = None) -> bool:
        self.asked += 1
        self.spent = self.spent or (self.asked > 1 and self.elapsed >= self.seconds)
        return self.spent


def counted(study: optuna.Study) -> int:
    """Trials that used up one of the N: finished and not interrupted (a pruned one counts)."""
    return sum(1 for t in study.get_trials(deepcopy=False, states=record.FINISHED) if record.is_counted(t))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claimed(study: optuna.Study, before: int | None = None) -> int:
    """Trials holding one of the N: counted ones plus running ones (in any worker sharing the study),
    only those numbered below ``before`` if given.

    A running trial whose worker died on this host is first failed as interrupted, freeing its slot; one left
    by a dead worker on another host keeps its slot (it cannot be told from a slow one). A running trial with
    no worker stamp (its worker was killed in the instant between asking and stamping it) keeps its slot until
    this process has seen it unstamped for ``UNSTAMPED_GRACE_S``, then is failed as interrupted too.
    """
    return _claimed(study, before)[0]


UNSTAMPED_GRACE_S = 10.0  # a live worker stamps its trial milliseconds after asking it
_first_seen_unstamped: dict[tuple[int, int], float] = {}  # (study id, trial id) -> monotonic time first seen


def _claimed(study: optuna.Study, before: int | None = None) -> tuple[int, int]:
    """(trials holding a slot, how many of them are running without a worker stamp, still in their grace)."""
    host, n, young = socket.gethostname(), 0, 0
    for t in study.get_trials(deepcopy=False, states=(*record.FINISHED, TrialState.RUNNING)):
        if t.user_attrs.get(record.INTERRUPTED) or (before is not None and t.number >= before):
            continue
        stamp = t.user_attrs.get(record.WORKER)
        h, _, pid = str(stamp or "").rpartition(":")
        if t.state == TrialState.RUNNING and stamp is None:
            # Seen by this process's own clock: another host's clock may be skewed.
            first = _first_seen_unstamped.setdefault((study._study_id, t._trial_id), time.monotonic())
            if time.monotonic() - first >= UNSTAMPED_GRACE_S:
                _fail_interrupted(study, t)
                continue
            young += 1
        elif t.state == TrialState.RUNNING and h == host and pid.isdigit() and not _alive(int(pid)):
            _fail_interrupted(study, t)
            continue
        n += 1
    return n, young


def _fail_interrupted(study: optuna.Study, t: FrozenTrial) -> None:
    optuna.trial.Trial(study, t._trial_id).set_user_attr(record.INTERRUPTED, True)
    study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)


def _full(study: optuna.Study, total: int) -> bool:
    """Whether the study holds ``total`` claimed trials; waits while an unstamped running trial may be an
    orphan (a killed worker's) rather than another worker's newest, so that it cannot take the last slot."""
    while True:
        n, young = _claimed(study)
        if n < total or not young:
            return n >= total
        time.sleep(0.5)


def tell_outcome(study: optuna.Study, trial: optuna.Trial, score: Callable[[], tuple[Any, dict[str, float]]],
                 metrics_key: str) -> FrozenTrial | None:
    """Score one asked trial and tell the study; the policy every search loop shares.

    ``score()`` returns ``(value or list of values, metrics)``; the metrics go into the trial's ``metrics_key``
    attr. A non-finite value or any non-OptiMer exception marks the trial FAILED (the message in its ``error``
    attr); OptimerError is re-raised; Ctrl-C marks the trial ``interrupted`` (not counted) and returns None.
    ``optuna.TrialPruned`` (raised by a multi-fidelity ``score()`` after ``trial.report``) marks it PRUNED,
    keeping what it stored; a pruned trial counts.
    """
    try:
        value, metrics = score()
        trial.set_user_attr(metrics_key, metrics)
        values = value if isinstance(value, (list, tuple)) else [value]
        if not all(math.isfinite(v) for v in values):
            raise FloatingPointError(f"objective is {value}")
    except KeyboardInterrupt:
        trial.set_user_attr(record.INTERRUPTED, True)
        study.tell(trial, state=TrialState.FAIL)
        return None
    except optuna.TrialPruned:
        return study.tell(trial, state=TrialState.PRUNED)
    except OptimerError:
        study.tell(trial, state=TrialState.FAIL)
        raise
    except Exception as exc:  # a bad corner of weight space must not end a long search
        log.warning("trial %d failed: %s: %s", trial.number, type(exc).__name__, exc)
        trial.set_user_attr(record.ERROR, f"{type(exc).__name__}: {exc}")
        return study.tell(trial, state=TrialState.FAIL)
    return study.tell(trial, value)


def _scored(trial: optuna.Trial, weights: Weights, score: Score,
            samples: Callable[[optuna.Trial], None] | None) -> tuple[Any, dict[str, float]]:
    result = score(trial, weights)
    if samples is not None:
        samples(trial)
    return result


def run_trials(study: optuna.Study, *, total: int, suggest: Suggest, score: Score, metrics_key: str,
               callbacks: Iterable[Callback] = (), progress: bool = True, desc: str = "search",
               should_stop: Callable[[optuna.Study], bool] | None = None,
               samples: Callable[[optuna.Trial], None] | None = None) -> LoopOutcome:
    """Run trials until the study holds ``total`` (see the module docstring); returns what this call did.

    ``suggest(trial)`` draws the trial's parameters (stored as its ``weights`` attr); ``score(trial, weights)``
    returns ``(value or values, metrics)`` and may report/prune through ``trial``. ``should_stop(study)`` is
    asked before each trial (an exhausted grid, a spent token budget). ``callbacks`` run after every trial.
    ``samples(trial)`` (:class:`optimer_lib.search.samples.TrialSampler`) runs after a trial scored without being
    pruned, before the study is told, while the merger still holds that trial's weights; it stores generations.
    """
    remaining = max(0, total - claimed(study))
    single = len(study.directions) == 1
    bar = None
    if progress and remaining:
        from tqdm.auto import tqdm

        bar = tqdm(total=remaining, desc=f"{desc} {study.study_name}", unit="trial")
    done = pruned = 0
    try:
        while not _full(study, total):
            if should_stop is not None and should_stop(study):
                break
            trial = study.ask()
            trial.set_user_attr(record.WORKER, WORKER)
            if claimed(study, before=trial.number) >= total:  # another worker took the last slot
                trial.set_user_attr(record.INTERRUPTED, True)
                trial.set_user_attr(record.SURPLUS, True)
                study.tell(trial, state=TrialState.FAIL)
                break
            try:
                weights = suggest(trial)
            except BaseException:
                trial.set_user_attr(record.INTERRUPTED, True)  # no slot used by a trial that never started
                study.tell(trial, state=TrialState.FAIL)
                raise
            trial.set_user_attr(record.WEIGHTS, weights)
            frozen = tell_outcome(study, trial, lambda t=trial, w=weights: _scored(t, w, score, samples), metrics_key)
            if frozen is None:
                return LoopOutcome(done, True)
            done += 1
            pruned += frozen.state == TrialState.PRUNED
            if bar is not None:
                bar.update(1)
                if single and (frozen.state == TrialState.COMPLETE or bar.postfix):
                    bar.set_postfix(best=f"{study.best_value:.4g}", **({"pruned": pruned} if pruned else {}))
            for cb in callbacks:
                cb(study, frozen)
    finally:
        if bar is not None:
            bar.close()
    return LoopOutcome(done, False)
