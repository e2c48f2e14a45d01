"""Multi-fidelity search: score each trial on growing subsets of the dev sets and prune poor ones early.

    from optimer_lib.search.study import SearchConfig, run_search
    cfg = SearchConfig(trials=100, search_limit=100, pruner="median", fidelities=(10, 30, 100))
    res = run_search(merger, tokenizer, suite, objective, cfg)    # PRUNED trials keep metrics@10 / metrics@30

    optimer search ... --pruner asha --fidelities 10,30,100

What each rung scores and costs is planned by :meth:`optimer_lib.scoring.scorer.TrialScorer.plan` (nested
subsets, :mod:`optimer_lib.scoring.fidelity`: a trial that reaches the last rung has cost what one scoring at
``search_limit`` costs); this module decides when to stop. After every rung the objective is reported to
Optuna (``trial.report(value,
step=limit)``); after every rung but the last the pruner may stop the trial: it is told PRUNED, with that
rung's metrics in ``metrics@<limit>`` and its cost in ``docs_evaluated`` / ``tokens_evaluated`` (items and
tokens scored; a one-fidelity search sets neither: each trial costs one scoring, ``TrialScorer.eval_tokens``).
Only COMPLETE trials (scored at ``search_limit``) compete for best and for top-k re-scoring; pruned ones count
toward ``trials``.

Pruners (:data:`PRUNERS`): ``none`` (default: one scoring at ``search_limit``), ``median``
(``optuna.pruners.MedianPruner``: stop a trial whose best value so far is worse than the median of completed
trials at the same rung), ``successive-halving`` / ``asha`` (``SuccessiveHalvingPruner``: keep the best
1/η of the trials that reached a rung, η from the rung spacing) and ``hyperband`` (``HyperbandPruner``:
several successive-halving brackets). Whether pruning pays off is measured by ``bench/pruning.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import pairwise

import optuna

from optimer_lib.errors import ConfigError
from optimer_lib.scoring.fidelity import FidelityPlan, Limit, default_fidelities, fmt_limits
from optimer_lib.scoring.scorer import TrialScorer
from optimer_lib.search import record

PrunerFactory = Callable[[tuple[int, ...], int], optuna.pruners.BasePruner]


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
        return [f"fidelities {fmt_limits(fidelities)} need a pruner: choose one of "
                f"{', '.join(p for p in PRUNERS if p != 'none')}"]
    rungs = list(fidelities)
    head = rungs[:-1] if search_limit is None else rungs
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in head):
        return [f"fidelities must be whole numbers of documents >= 1, got {fmt_limits(fidelities)}"]
    problems = []
    if len(rungs) < 2:
        example = f"{max(1, search_limit // 3)},{search_limit}" if search_limit else "10,all"
        problems.append(f"fidelities need at least two rungs (e.g. {example}), got {fmt_limits(fidelities)}"
                        + (": raise --search-limit or give --fidelities" if search_limit and search_limit < 15 else ""))
    if any(b <= a for a, b in pairwise(head)):
        problems.append(f"fidelities must increase, got {fmt_limits(fidelities)}")
    if rungs[-1] != search_limit:
        problems.append(f"fidelities must end at the search limit {fmt_limits([search_limit])}, "
                        f"got {fmt_limits(fidelities)}")
    return problems


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


def score_rungs(trial: optuna.Trial, weights: dict[str, float], *, scorer: TrialScorer,
                plan: FidelityPlan) -> tuple[float, dict[str, float]]:
    """Score ``weights`` rung by rung; returns the last rung's ``(value, metrics)`` or raises optuna.TrialPruned.

    Each rung sets ``docs_evaluated`` (and ``tokens_evaluated``) to the trial's cost so far and reports the
    value at its ``step``; each rung but the last also stores ``metrics@<limit>`` (the caller stores the last
    one's) and asks the pruner. A non-finite value raises FloatingPointError (the trial fails, as in a
    one-fidelity search).
    """
    last = len(plan.limits) - 1
    for k, (limit, value, metrics) in enumerate(scorer.rungs(weights, plan)):
        trial.set_user_attr(record.DOCS_EVALUATED, plan.docs[k])
        if plan.tokens is not None:
            trial.set_user_attr(record.TOKENS_EVALUATED, plan.tokens[k])
        if not math.isfinite(value):
            raise FloatingPointError(f"objective is {value} at {fmt_limits([limit])} documents per set")
        trial.report(value, step=plan.steps[k])
        if k == last:
            return value, metrics
        trial.set_user_attr(record.metrics_key(limit), metrics)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at {fmt_limits([limit])} documents per set (objective {value:.6g})")
    raise AssertionError("unreachable: the last rung returns")


def make_pruner(name: str, steps: tuple[int, ...], n_trials: int) -> optuna.pruners.BasePruner:
    """Build a registered pruner for rungs at ``steps``; unknown names raise ConfigError listing the choices."""
    if name not in PRUNERS:
        raise ConfigError(f"unknown pruner {name!r}; choose one of {', '.join(PRUNERS)}")
    return PRUNERS[name](tuple(steps), n_trials)
