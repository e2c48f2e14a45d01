"""What a Tune move shows, as it comes: an instant estimate, each dev set as it is scored, then the whole score.

    from workbench.tuning import score_stream
    for update in score_stream(shared, state, scoring, should_stop=lambda: newer_move_arrived):
        update.phase            # "estimate" (≈, no forward pass) or "scoring" (no estimate yet), "partial"
                                # (sets done so far), "final"; "cancelled" when a newer move took over
        update.metrics          # {"loss:ja": ..., "acc:math": ...}
        update.intervals        # 95% bootstrap intervals over the scored documents (partial/final)

Exact scoring is compute-bound (≈ 2 × parameters × tokens scored), so a Tune move first draws an estimate
fitted to the merges scored so far (a quadratic in α, :mod:`optimer_lib.scoring.estimate`), then replaces it
set by set. The first update of a move comes at once, before any forward pass: the cached score, the estimate, or
"scoring" (nothing to estimate from yet), so a front end can answer the move and then draw anything else it owes.
Every exact score carries its uncertainty (bootstrap over the scored documents): a difference
inside it is noise. Scores are cached by the pool's engine under (merge, scoring set), so any session moving
to a merge scored before gets it at once; the estimators (one per scoring set and merge method) are shared by
the sessions of a pool too, and track how often their estimate fell inside the exact interval.

lm-eval terms of the scoring set (``TuneScoring.lmeval``) run after the dev sets, on the same lease of the merged
model, one "partial" step each; their metric ``lmeval:TASK:METRIC`` has no interval, and ``lmeval_s`` says what
each cost (lm-eval cannot be cancelled mid-task: a newer move waits for the task running).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from optimer_lib.engine import INTERACTIVE, MergeState
from optimer_lib.engine.shared_work import leased_map
from optimer_lib.scoring.estimate import Estimate, ScoreEstimator
from optimer_lib.scoring.evaluate import SetResult, SetScores
from optimer_lib.scoring.objectives import Objective, parse_objective
from optimer_lib.scoring.tune_config import TuneScoring
from optimer_lib.scoring.uncertainty import Interval, bootstrap

if TYPE_CHECKING:
    from workbench.workspace import SharedPool

INSTRUCTION = "instruction"  # the estimator's coordinate for the instruction weight
PHASES = ("estimate", "scoring", "partial", "final", "cancelled")


@dataclass
class TuneUpdate:
    """One step of a Tune move (see the module docstring); ``sets_done`` of ``sets_total`` are exact."""

    phase: str
    state: MergeState
    metrics: dict[str, float]
    intervals: dict[str, Interval]
    objective: float | None
    sets_done: list[str]
    sets_total: int
    estimate: Estimate | None = None
    merge_s: float = 0.0
    score_s: float = 0.0
    waited_s: float = 0.0
    cached: bool = False
    lmeval_s: dict[str, float] = field(default_factory=dict)  # seconds per lm-eval metric scored in this move

    @property
    def objective_interval(self) -> Interval | None:
        return self.intervals.get("objective")


def estimator(shared: SharedPool, scoring: TuneScoring, state: MergeState) -> ScoreEstimator:
    """The pool's shared estimator for merges like ``state`` (same method and params) scored with ``scoring``."""
    weights = tuple(n for n, _ in state.weights)  # per-layer-group merges get estimators over their own keys
    key = (scoring, state.method, state.params) + ((weights,) if state.grouped else ())
    with shared.lock:
        if key not in shared.estimators:
            names = [*weights, *([INSTRUCTION] if shared.instruction is not None else [])]
            shared.estimators[key] = ScoreEstimator(names, objective=objective_for(shared, scoring))
        return shared.estimators[key]


def coordinates(shared: SharedPool, state: MergeState) -> dict[str, float]:
    """The estimator's coordinates of a merge: α per vector, and the instruction weight if the pool has one."""
    extra = {INSTRUCTION: state.instruction_weight} if shared.instruction is not None else {}
    return {**state.weight_map, **extra}


def objective_for(shared: SharedPool, scoring: TuneScoring) -> Objective | None:
    """The balanced objective over the dev sets ``scoring`` reads (None if it cannot be formed)."""
    sub = scoring.select(shared.suite)
    try:
        return parse_objective("balanced", list(sub.texts), qa_names=list(sub.qa))
    except Exception:
        return None


def _shown(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if not k.startswith("ppl:")}


def _objective(objective: Objective | None, metrics: dict[str, float]) -> float | None:
    try:
        return None if objective is None else float(objective(metrics))
    except Exception:
        return None  # some set the objective reads is not scored yet


def _intervals(scores: dict[str, SetScores], objective: Objective | None, complete: bool) -> dict[str, Interval]:
    out = bootstrap(scores, objective if complete and objective is not None else None)
    return {k: v for k, v in out.items() if not k.startswith("ppl:")}


def tuning_key(shared: SharedPool, scoring: TuneScoring) -> tuple:
    """The engine cache key of a Tune score: the scoring set and the pool version (each suite of one engine has its
    own: a dev corpus added or removed makes a new version). Not ``id(suite)``: a freed suite's id can be reused by
    the next one, and a score of the old suite would then be shown for the new."""
    return ("tune", scoring, shared.version)


def set_names(sub: Any) -> list[str]:
    """One entry per scored set of the suite ``sub``: a text set and a QA set may share a name (math: loss and
    accuracy), the QA one is then called "<name> (QA)"."""
    return [*sub.texts, *(f"{n} (QA)" if n in sub.texts else n for n in sub.qa)]


def step_names(shared: SharedPool, scoring: TuneScoring) -> list[str]:
    """What a Tune scoring reports, in order: :func:`set_names`, then each lm-eval term (``lmeval:TASK:METRIC``)."""
    return [*set_names(scoring.select(shared.suite)), *(t.key for t in scoring.lmeval_terms())]


def cached_update(shared: SharedPool, state: MergeState, scoring: TuneScoring) -> TuneUpdate | None:
    """The "final" update of a merge some session scored with ``scoring`` already (no forward pass), or None."""
    hit = shared.engine.cached(state, tuning_key(shared, scoring))
    if hit is None:
        return None
    metrics, scores = hit
    names = step_names(shared, scoring)
    objective = objective_for(shared, scoring)
    return TuneUpdate("final", state, dict(metrics), _intervals(scores, objective, True),
                      _objective(objective, metrics), names, len(names), cached=True)


def score_stream(shared: SharedPool, state: MergeState, scoring: TuneScoring, *,
                 should_stop: Callable[[], bool] | None = None, priority: int = INTERACTIVE) -> Iterator[TuneUpdate]:
    """The estimate (or "scoring": nothing to estimate from yet), then partial and final exact scores of ``state``
    (see the module docstring).

    ``should_stop()`` is asked between batches: once true the scoring ends with a "cancelled" update (nothing
    cached, the engine's slots handed back at once) so a newer move can take the model. ``priority`` is the
    engine's (``BACKGROUND`` for scores nobody waits for yet: reference bars, prefetching). An interactive score
    shares its dev sets between up to ``shared.tune_slots`` leases of the merge (at most ``engine.concurrency``,
    one per core on a CPU: :func:`~optimer_lib.engine.shared_work.leased_map`); partial results come in finishing
    order.
    """
    stop = should_stop or (lambda: False)
    engine, key = shared.engine, tuning_key(shared, scoring)
    objective = objective_for(shared, scoring)
    est = estimator(shared, scoring, state)
    names = step_names(shared, scoring)
    hit = cached_update(shared, state, scoring)
    if hit is not None:
        yield hit
        return
    guess = est.predict(coordinates(shared, state))
    if guess.available:
        values = dict(guess.values)
        obj = values.pop("objective", None)
        yield TuneUpdate("estimate", state, _shown(values), {}, obj, [], len(names), estimate=guess)
    else:
        yield TuneUpdate("scoring", state, {}, {}, None, [], len(names))
    units = scoring.units(shared.suite)
    jobs = _jobs(shared, state, scoring, units)
    # lm-eval keeps one scorer per process (not thread-safe): a scoring with lm-eval terms runs on one lease
    workers = min(engine.concurrency, shared.tune_slots) if priority == INTERACTIVE and not scoring.lmeval else 1

    def remember(values: list[Any]) -> None:  # in the last job's lease: its slot's next holder finds the score
        if all(v is not None and v is not _CACHED for v in values):
            metrics, scores, _ = _collect(values)
            engine.remember(state, key, (_shown(metrics), scores))

    order = scoring_order(shared, scoring, units)  # job indices, in the order they are handed out
    at = {k: pos for pos, k in enumerate(order)}

    def remember_in_order(values: list[Any]) -> None:  # leased_map's values come in the order handed out
        remember([values[at[k]] for k in range(len(order))])

    results: dict[int, Any] = {}
    first: Any = None
    t0 = time.perf_counter()
    for pos, value, lease in leased_map(engine, state, [jobs[k] for k in order], priority=priority, workers=workers,
                                        should_stop=stop, on_complete=remember_in_order):
        i = order[pos]
        first = first or lease
        if value is _CACHED:  # another session scored this merge while this one waited for a slot
            hit = cached_update(shared, state, scoring)
            break
        if value is None:
            break
        results[i] = value
        if len(results) == len(names) or stop():  # complete (and cached by ``remember``) wins over a late stop
            break
        metrics, scores, lmeval_s = _collect([results[k] for k in sorted(results)])
        yield TuneUpdate("partial", state, _shown(metrics), _intervals(scores, objective, False),
                         None, [names[k] for k in results], len(names), estimate=guess if guess.available else None,
                         merge_s=first.merge_s, score_s=time.perf_counter() - t0, waited_s=first.waited_s,
                         lmeval_s=lmeval_s)
    score_s = time.perf_counter() - t0
    merge_s, waited_s = (first.merge_s, first.waited_s) if first is not None else (0.0, 0.0)
    if hit is not None:
        yield hit
        return
    if len(results) < len(names):
        metrics, _, _ = _collect([results[k] for k in sorted(results)])
        yield TuneUpdate("cancelled", state, _shown(metrics), {}, None, [names[k] for k in results], len(names),
                         merge_s=merge_s, score_s=score_s, waited_s=waited_s)
        return
    metrics, scores, lmeval_s = _collect([results[k] for k in range(len(names))])
    shown = _shown(metrics)
    intervals = _intervals(scores, objective, True)
    est.add(coordinates(shared, state), shown, intervals=intervals, shown=guess if guess.available else None)
    yield TuneUpdate("final", state, shown, intervals, _objective(objective, shown), list(names), len(names),
                     estimate=guess if guess.available else None, merge_s=merge_s, score_s=score_s,
                     waited_s=waited_s, lmeval_s=lmeval_s)


_CACHED = object()  # a job's value when the engine had the whole score cached by the time the job ran


def scoring_order(shared: SharedPool, scoring: TuneScoring, units: list[Any] | None = None) -> list[int]:
    """The order the jobs of :func:`_jobs` are handed out: the dev set that reads the fewest tokens first, so a move's
    first partial result comes as soon as it can (on SmolLM2 the math set, 0.6 s, where the others take ~2.5 s),
    then the others in their order, lm-eval terms last. Counted once per scoring set and suite (~20 ms of
    tokenising for the default set). A scoring of every document (a "confirm") keeps the order: counting its tokens
    would cost more than it saves. ``units``: ``scoring.units(shared.suite)`` when the caller has them."""
    units = scoring.units(shared.suite) if units is None else units
    order = list(range(len(units) + len(scoring.lmeval)))
    if scoring.docs is None or len(units) < 2:
        return order

    def cheapest_first() -> list[int]:
        tokens = [scoring.tokens(shared.tokenizer, u) for u in units]
        cheapest = min(range(len(units)), key=tokens.__getitem__)
        return [cheapest, *(k for k in order if k != cheapest)]

    return shared.per_suite("order", scoring, cheapest_first)


def _jobs(shared: SharedPool, state: MergeState, scoring: TuneScoring,
          units: list[Any]) -> list[Callable[[Any, Callable[[], bool]], Any]]:
    """One job per step of :func:`step_names`: a dev set (its ``SetResult``) or an lm-eval term (``(key, value,
    seconds)``); None when stopped first, ``_CACHED`` when the score was cached meanwhile."""
    engine, key, plain = shared.engine, tuning_key(shared, scoring), replace(scoring, sets=None)

    def dev_set(unit: Any) -> Callable[[Any, Callable[[], bool]], Any]:
        def job(model: Any, stopped: Callable[[], bool]) -> Any:
            if engine.cached(state, key) is not None:
                return _CACHED
            return next(iter(plain.stream(model, shared.tokenizer, unit, should_stop=stopped)), None)
        return job

    def lmeval(term: str) -> Callable[[Any, Callable[[], bool]], Any]:
        def job(model: Any, stopped: Callable[[], bool]) -> Any:
            one = replace(scoring, lmeval=(term,))
            return next(iter(one.score_lmeval(model, shared.tokenizer, should_stop=stopped)), None)
        return job

    return [*(dev_set(u) for u in units), *(lmeval(t) for t in scoring.lmeval)]


def _collect(values: list[Any]) -> tuple[dict[str, float], dict[str, SetScores], dict[str, float]]:
    """Metrics, per-item scores and lm-eval seconds of finished jobs' values (see :func:`_jobs`)."""
    metrics: dict[str, float] = {}
    scores: dict[str, SetScores] = {}
    lmeval_s: dict[str, float] = {}
    for value in values:
        if isinstance(value, SetResult):
            metrics.update(value.metrics)
            scores[value.scores.key] = value.scores
        else:  # an lm-eval term
            metrics[value[0]] = value[1]
            lmeval_s[value[0]] = value[2]
    return metrics, scores, lmeval_s


def last_update(updates: Iterator[TuneUpdate]) -> TuneUpdate | None:
    """The last update of a stream (consumed whole), or None if it yielded nothing."""
    last = None
    for last in updates:  # noqa: B007 - only the last one is wanted
        pass
    return last


def tracker_summary(shared: SharedPool) -> list[dict[str, Any]]:
    """Per estimator: how often its estimate fell inside the exact interval (for the UI and benchmarks)."""
    with shared.lock:
        return [{"method": k[1], "docs": k[0].docs, "checked": e.tracker.total, "inside": e.tracker.hits,
                 "rate": e.tracker.rate, "summary": e.tracker.summary()} for k, e in shared.estimators.items()]
