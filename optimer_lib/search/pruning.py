"""Multi-fidelity search: score each trial on growing subsets of the dev sets and prune poor ones early.

    from optimer_lib.search.study import SearchConfig, run_search
    cfg = SearchConfig(trials=100, search_limit=100, pruner="median", fidelities=(10, 30, 100))
    res = run_search(merger, tokenizer, suite, objective, cfg)    # PRUNED trials keep metrics@10 / metrics@30

    optimer search ... --pruner asha --fidelities 10,30,100

    from optimer_lib.search.pruning import nested_metrics
    for limit, metrics in nested_metrics(model, tokenizer, suite, (10, 30, 100)):
        ...   # metrics ≈ evaluate_suite(model, tokenizer, suite, limit=limit) (float rounding apart)

``evaluate_suite(limit=N)`` reads the *first* N items of every dev set, so the rungs nest: a rung scores only
the items the previous rung did not, and a trial that reaches the last rung has cost what one scoring at
``search_limit`` costs. After every rung the objective is reported to Optuna (``trial.report(value,
step=limit)``); after every rung but the last the pruner may stop the trial: it is told PRUNED, with that
rung's metrics in ``metrics@<limit>`` and its cost in ``docs_evaluated`` / ``tokens_evaluated`` (items and
tokens scored; a one-fidelity search sets neither: each trial costs one scoring, ``costs.search_eval_tokens``).
Only COMPLETE trials (scored at ``search_limit``) compete for best and for top-k re-scoring; pruned ones count
toward ``trials``.

Pruners (:data:`PRUNERS`): ``none`` (default: one scoring at ``search_limit``), ``median``
(``optuna.pruners.MedianPruner``: stop a trial whose best value so far is worse than the median of completed
trials at the same rung), ``successive-halving`` / ``asha`` (``SuccessiveHalvingPruner``: keep the best
1/η of the trials that reached a rung, η from the rung spacing) and ``hyperband`` (``HyperbandPruner``:
several successive-halving brackets). Whether pruning pays off is measured by ``bench/pruning.py``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import optuna

from optimer_lib.errors import ConfigError
from optimer_lib.scoring.evaluate import EvalSuite, _encoded_texts, exact_match, max_positions, mean_token_loss
from optimer_lib.scoring.objectives import Objective

PrunerFactory = Callable[[tuple[int, ...], int], optuna.pruners.BasePruner]
MIN_RUNG = 5  # default rungs score at least this many items per dev set (fewer is mostly noise)
Limit = int | None  # documents per dev set; None = all


def reduction_factor(steps: Sequence[int]) -> int:
    """η for successive halving: the largest integer ≥ 2 with ``steps[k] >= steps[0] * η**k`` for every rung.

    Then every rung is at or past its successive-halving promotion point, so each rung gets a decision
    (rungs closer than ×2 apart are the exception: some of them get none).
    """
    ratios = [(steps[k] / steps[0]) ** (1 / k) for k in range(1, len(steps))]
    return max(2, math.floor(min(ratios, default=2.0) + 1e-9))


def _none(steps: tuple[int, ...], n_trials: int) -> optuna.pruners.BasePruner:
    return optuna.pruners.NopPruner()


def _median(steps: tuple[int, ...], n_trials: int) -> optuna.pruners.BasePruner:
    # No pruning until a few trials have completed (Optuna's default is 5; fewer for short searches).
    return optuna.pruners.MedianPruner(n_startup_trials=max(2, min(5, n_trials // 5)), n_warmup_steps=0)


def _asha(steps: tuple[int, ...], n_trials: int) -> optuna.pruners.BasePruner:
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=steps[0], reduction_factor=reduction_factor(steps),
                                                  min_early_stopping_rate=0)


def _hyperband(steps: tuple[int, ...], n_trials: int) -> optuna.pruners.BasePruner:
    return optuna.pruners.HyperbandPruner(min_resource=steps[0], max_resource=steps[-1],
                                          reduction_factor=reduction_factor(steps))


PRUNERS: dict[str, PrunerFactory] = {"none": _none, "median": _median, "successive-halving": _asha,
                                     "asha": _asha, "hyperband": _hyperband}


def default_fidelities(search_limit: int) -> tuple[int, ...]:
    """Rungs at about 1/9, 1/3 and all of ``search_limit`` (those under :data:`MIN_RUNG` dropped).

    ``default_fidelities(100) == (11, 33, 100)``; a limit under 14 leaves a single rung (no pruning possible).
    """
    lower = [r for r in (round(search_limit / 9), round(search_limit / 3)) if MIN_RUNG <= r < search_limit]
    return (*dict.fromkeys(lower), search_limit)


def fidelity_problems(pruner: str, fidelities: Sequence[Limit] | None, search_limit: Limit) -> list[str]:
    """Every problem with ``pruner``/``fidelities`` for a search at ``search_limit`` (empty list: fine)."""
    if pruner not in PRUNERS:
        return [f"unknown pruner {pruner!r}; choose one of {', '.join(PRUNERS)}"]
    if fidelities is None:
        if pruner != "none" and search_limit is not None and len(default_fidelities(search_limit)) < 2:
            return [f"search_limit {search_limit} is too small for the default fidelities of pruner {pruner!r}: "
                    f"give fidelities explicitly (e.g. 3,{search_limit})"]
        return []
    if pruner == "none":
        return [f"fidelities {_fmt(fidelities)} need a pruner: choose one of "
                f"{', '.join(p for p in PRUNERS if p != 'none')}"]
    rungs = list(fidelities)
    head = rungs[:-1] if search_limit is None else rungs
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in head):
        return [f"fidelities must be whole numbers of documents >= 1, got {_fmt(fidelities)}"]
    problems = []
    if len(rungs) < 2:
        example = f"{max(1, search_limit // 3)},{search_limit}" if search_limit else "10,all"
        problems.append(f"fidelities need at least two rungs (e.g. {example}), got {_fmt(fidelities)}"
                        + (": raise --search-limit or give --fidelities" if search_limit and search_limit < 15 else ""))
    if any(b <= a for a, b in pairwise(head)):
        problems.append(f"fidelities must increase, got {_fmt(fidelities)}")
    if rungs[-1] != search_limit:
        problems.append(f"fidelities must end at the search limit {_fmt([search_limit])}, got {_fmt(fidelities)}")
    return problems


def _fmt(limits: Sequence[Any]) -> str:
    return ",".join("all" if r is None else str(r) for r in limits)


def parse_fidelities(spec: str) -> tuple[Limit, ...]:
    """``"10,30,100"`` -> ``(10, 30, 100)`` (``all`` -> None); anything else is a ConfigError."""
    out: list[Limit] = []
    for part in spec.split(","):
        part = part.strip()
        if part == "all":
            out.append(None)
        elif part.isdigit():
            out.append(int(part))
        else:
            raise ConfigError(f"bad --fidelities {spec!r}: use increasing document counts ending at --search-limit, "
                              "e.g. --fidelities 10,30,100")
    return tuple(out)


def nested_metrics(model: Any, tokenizer: Any, suite: EvalSuite, limits: Sequence[Limit], *, seq_len: int = 128,
                   batch_size: int = 16, max_new_tokens: int = 8) -> Iterator[tuple[Limit, dict[str, float]]]:
    """Yield ``(limit, metrics)`` for each of the increasing ``limits``, scoring each item only once.

    ``metrics`` are those of ``evaluate_suite(..., limit=limit)``: losses are token-weighted means of the
    rungs' parts, accuracies counts over all items so far (equal up to float rounding; the first rung is
    exactly evaluate_suite's). Raises DataError as evaluate_suite does when a set has nothing to score.
    """
    max_pos = max_positions(model)
    width = min(seq_len, max_pos) if max_pos else seq_len
    parts: dict[str, list[tuple[float, int]]] = {name: [] for name in suite.texts}
    right: dict[str, list[int]] = {name: [0, 0] for name in suite.qa}
    prev = 0
    for limit in limits:
        metrics: dict[str, float] = {}
        for name, docs in suite.texts.items():
            delta = docs[prev:limit]
            tokens = sum(len(e) - 1 for e in _encoded_texts(tokenizer, tuple(delta), width) if len(e) >= 2)
            if tokens:
                parts[name].append((mean_token_loss(model, tokenizer, delta, seq_len=seq_len,
                                                    batch_size=batch_size), tokens))
            if not parts[name]:  # nothing scorable yet: let evaluate's own check raise its DataError
                mean_token_loss(model, tokenizer, docs, seq_len=seq_len, batch_size=batch_size, limit=limit)
            got = parts[name]
            loss = got[0][0] if len(got) == 1 else sum(v * n for v, n in got) / sum(n for _, n in got)
            metrics[f"loss:{name}"] = loss
            metrics[f"ppl:{name}"] = math.exp(min(loss, 700.0))
        for name, pairs in suite.qa.items():
            delta_pairs = pairs[prev:limit]
            if delta_pairs:
                acc = exact_match(model, tokenizer, delta_pairs, max_new_tokens=max_new_tokens, batch_size=batch_size)
                right[name][0] += round(acc * len(delta_pairs))
                right[name][1] += len(delta_pairs)
            if not right[name][1]:
                exact_match(model, tokenizer, pairs, limit=limit, max_new_tokens=max_new_tokens, batch_size=batch_size)
            metrics[f"acc:{name}"] = right[name][0] / right[name][1]
        yield limit, metrics
        if limit is None:
            return
        prev = limit


def n_items(suite: EvalSuite, limit: Limit) -> int:
    """Documents plus QA items among the first ``limit`` of every set of ``suite``."""
    return sum(len(v[:limit]) for v in (*suite.texts.values(), *suite.qa.values()))


@dataclass
class FidelityPlan:
    """The rungs of a multi-fidelity search and what reaching each one has cost a trial.

    ``limits`` are documents per dev set (last: ``search_limit``; None = all), ``steps`` the Optuna report
    steps (the limits, "all" as the largest set's size), ``docs[k]``/``tokens[k]`` the items/tokens scored
    by a trial that stopped at rung k (tokens None when not countable: callable objectives).
    """

    limits: tuple[Limit, ...]
    steps: tuple[int, ...]
    docs: tuple[int, ...]
    tokens: tuple[int, ...] | None
    scored: EvalSuite
    incremental: bool


def fidelity_plan(config: Any, suite: EvalSuite, objective: Objective, tokenizer: Any) -> FidelityPlan:
    """Resolve ``config.fidelities`` (or the default rungs) against ``suite`` for :func:`score_rungs`.

    Weighted objectives score the suite (``record_metrics="all"``) or the sets they read, nested; a
    callable objective is called once per rung at that rung's limit (its docs count the whole suite per call).
    """
    from optimer_lib.experiments.costs import search_eval_tokens

    size = max((len(v) for v in (*suite.texts.values(), *suite.qa.values())), default=0)
    if config.fidelities is not None:
        limits = tuple(config.fidelities)
    elif config.search_limit is None:
        limits = (*default_fidelities(size)[:-1], None)
    else:
        limits = default_fidelities(config.search_limit)
    steps = tuple(size if r is None else r for r in limits)
    if len(limits) < 2 or any(b <= a for a, b in pairwise(steps)):
        raise ConfigError(f"fidelities {_fmt(limits)} do not give increasing rungs on dev sets of up to {size} "
                          "items: give fewer, smaller fidelities")
    incremental = objective.fn is None
    scored = suite if not incremental or config.record_metrics == "all" else \
        suite.select(texts=objective.needed_texts, qa=objective.needed_qa)
    per = [n_items(scored, r) for r in limits]
    docs = tuple(per) if incremental else tuple(sum(per[:k + 1]) for k in range(len(per)))
    tokens = None
    if incremental:
        tokens = tuple(search_eval_tokens(tokenizer, suite, objective, dataclasses.replace(config, search_limit=r))
                       for r in limits)
    return FidelityPlan(limits, steps, docs, tokens, scored, incremental)


def score_rungs(trial: optuna.Trial, weights: dict[str, float], *, merger: Any, tokenizer: Any, suite: EvalSuite,
                objective: Objective, plan: FidelityPlan, seq_len: int = 128,
                batch_size: int = 16) -> tuple[float, dict[str, float]]:
    """Score ``weights`` rung by rung; returns the last rung's ``(value, metrics)`` or raises optuna.TrialPruned.

    Each rung sets ``docs_evaluated`` (and ``tokens_evaluated``) to the trial's cost so far and reports the
    value at its ``step``; each rung but the last also stores ``metrics@<limit>`` (the caller stores the last
    one's) and asks the pruner. A non-finite value raises FloatingPointError (the trial fails, as in a
    one-fidelity search).
    """
    merger.set_weights(weights)
    kw = {"seq_len": seq_len, "batch_size": batch_size}
    if plan.incremental:
        stages = ((r, objective(m), m) for r, m in nested_metrics(merger.model, tokenizer, plan.scored,
                                                                  plan.limits, **kw))
    else:
        stages = ((r, *objective.evaluate(merger.model, tokenizer, suite, limit=r, **kw)) for r in plan.limits)
    last = len(plan.limits) - 1
    for k, (limit, value, metrics) in enumerate(stages):
        trial.set_user_attr("docs_evaluated", plan.docs[k])
        if plan.tokens is not None:
            trial.set_user_attr("tokens_evaluated", plan.tokens[k])
        if not math.isfinite(value):
            raise FloatingPointError(f"objective is {value} at {_fmt([limit])} documents per set")
        trial.report(value, step=plan.steps[k])
        if k == last:
            return value, metrics
        trial.set_user_attr(f"metrics@{_fmt([limit])}", metrics)  # search._tag
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at {_fmt([limit])} documents per set (objective {value:.6g})")
    raise AssertionError("unreachable: the last rung returns")


def make_pruner(name: str, steps: tuple[int, ...], n_trials: int) -> optuna.pruners.BasePruner:
    """Build a registered pruner for rungs at ``steps``; unknown names raise ConfigError listing the choices."""
    if name not in PRUNERS:
        raise ConfigError(f"unknown pruner {name!r}; choose one of {', '.join(PRUNERS)}")
    return PRUNERS[name](tuple(steps), n_trials)
