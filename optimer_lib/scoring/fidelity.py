"""Fidelities: scoring a model on growing, nested subsets of the dev sets, each item scored only once.

    from optimer_lib.scoring.fidelity import default_fidelities, nested_metrics
    default_fidelities(100)                                   # (11, 33, 100)
    for limit, metrics in nested_metrics(model, tokenizer, suite, (10, 30, 100)):
        ...   # metrics ≈ evaluate_suite(model, tokenizer, suite, limit=limit) (float rounding apart)

``evaluate_suite(limit=N)`` reads the *first* N items of every dev set, so the rungs nest: a rung scores only
the items the previous rung did not, and a model scored up to the last rung has cost what one scoring at that
limit costs. What a trial pays per rung is planned by :meth:`optimer_lib.scoring.scorer.TrialScorer.plan`;
whether to stop at a rung is the search layer's business (:mod:`optimer_lib.search.pruning`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from optimer_lib.scoring.evaluate import EvalSuite, encoded_texts, exact_match, max_positions, mean_token_loss

MIN_RUNG = 5  # default rungs score at least this many items per dev set (fewer is mostly noise)
Limit = int | None  # documents per dev set; None = all


def fmt_limits(limits: Sequence[Any]) -> str:
    """``(10, 30, None) -> "10,30,all"``: limits as the CLI spells them."""
    return ",".join("all" if r is None else str(r) for r in limits)


def default_fidelities(search_limit: int) -> tuple[int, ...]:
    """Rungs at about 1/9, 1/3 and all of ``search_limit`` (those under :data:`MIN_RUNG` dropped).

    ``default_fidelities(100) == (11, 33, 100)``; a limit under 14 leaves a single rung (no pruning possible).
    """
    lower = [r for r in (round(search_limit / 9), round(search_limit / 3)) if MIN_RUNG <= r < search_limit]
    return (*dict.fromkeys(lower), search_limit)


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
            tokens = sum(len(e) - 1 for e in encoded_texts(tokenizer, tuple(delta), width) if len(e) >= 2)
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
