"""The one trial scorer: what a trial measures at each fidelity, and what that costs.

    from optimer_lib.scoring.scorer import TrialScorer
    scorer = TrialScorer(merger, tokenizer, suite, [objective], record_metrics="all")
    value, metrics = scorer.score({"ja": 0.3, "code": 0.1}, limit=100)   # merge, then score
    scorer.eval_tokens(100)                                              # tokens that scoring read
    plan = scorer.plan(fidelities=(11, 33, 100), search_limit=100)       # rungs of a multi-fidelity trial
    for limit, value, metrics in scorer.rungs(weights, plan): ...        # scored rung by rung

Every search (single-objective, Pareto, pruned, warm-started), the cost ledger and the workbench ask this object,
so "what a trial scores" is decided here only. With several objectives (a Pareto search) ``score`` returns a list
of values; callable objectives add their metrics (as ``objective:<spec>`` when there are several).
``record_metrics="all"`` scores every dev set of the suite in each trial, so the study can be re-ranked for any
other weighted objective later without evaluating anything; ``"needed"`` scores only what the objectives read.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from optimer_lib.errors import ConfigError
from optimer_lib.merging.merger import Merger
from optimer_lib.scoring.evaluate import EvalSuite, encode_text, evaluate_suite, max_positions
from optimer_lib.scoring.fidelity import FidelityPlan, Limit, default_fidelities, fmt_limits, n_items, nested_metrics
from optimer_lib.scoring.objectives import Objective

RECORD_MODES = ("all", "needed")


def eval_tokens(tokenizer: Any, suite: EvalSuite, objective: Objective | None = None, *, limit: Limit = None,
                seq_len: int = 128, max_new_tokens: int = 8, model: Any = None) -> int:
    """Tokens one scoring of ``suite`` processes: what :func:`optimer_lib.scoring.evaluate.evaluate_suite` reads.

    Text sets: every document among the first ``limit`` (as tokenised for scoring: bos first, truncated to
    ``seq_len`` and the model's position limit, documents under 2 tokens skipped). QA sets: prompt tokens plus
    ``max_new_tokens`` per item (batched greedy generation runs until every row is done, so the maximum is
    what is paid). Only the sets a weighted ``objective`` reads are counted (all of them for a callable
    objective or ``None``).
    """
    weighted = objective is not None and objective.fn is None
    texts = objective.needed_texts if weighted else None
    qa = objective.needed_qa if weighted else None
    max_pos = max_positions(model) if model is not None else None
    width = min(seq_len, max_pos) if max_pos else seq_len
    total = 0
    for name, docs in suite.texts.items():
        if texts is None or name in texts:
            lengths = (min(len(encode_text(tokenizer, d)), width) for d in docs[:limit])
            total += sum(n for n in lengths if n >= 2)
    for name, pairs in suite.qa.items():
        if qa is None or name in qa:
            total += sum(len(encode_text(tokenizer, p)) + max_new_tokens for p, _ in pairs[:limit])
    return total


@dataclass
class TrialScorer:
    """Scores merge weights on a dev suite for one or several objectives (see the module docstring)."""

    merger: Merger
    tokenizer: Any
    suite: EvalSuite
    objectives: Sequence[Objective]
    seq_len: int = 128
    batch_size: int = 16
    record_metrics: str = "all"
    _scored: EvalSuite | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.objectives, Objective):
            self.objectives = [self.objectives]
        self.objectives = list(self.objectives)
        if not self.objectives:
            raise ConfigError("a scorer needs at least one objective")
        if self.record_metrics not in RECORD_MODES:
            raise ConfigError(f"record_metrics must be one of {', '.join(RECORD_MODES)}, got {self.record_metrics!r}")

    @property
    def objective(self) -> Objective:
        """The first (for a single-objective search: the only) objective."""
        return self.objectives[0]

    @property
    def weighted(self) -> list[Objective]:
        """The objectives computed from dev-set metrics (not callables)."""
        return [o for o in self.objectives if o.fn is None]

    def scored_suite(self) -> EvalSuite:
        """The dev sets every trial scores for the weighted objectives (all with ``record_metrics="all"``)."""
        if self._scored is None:
            terms = self.weighted
            self._scored = self.suite if self.record_metrics == "all" or not terms else self.suite.select(
                texts=set().union(*(o.needed_texts for o in terms)), qa=set().union(*(o.needed_qa for o in terms)))
        return self._scored

    def _kw(self) -> dict[str, int]:
        return {"seq_len": self.seq_len, "batch_size": self.batch_size}

    def measure(self, limit: Limit) -> tuple[float | list[float], dict[str, float]]:
        """Score the merger's *current* model at ``limit`` documents per set: ``(value or values, metrics)``."""
        model, single = self.merger.model, len(self.objectives) == 1
        metrics = evaluate_suite(model, self.tokenizer, self.scored_suite(), limit=limit, **self._kw()) \
            if self.weighted else {}
        values = []
        for o in self.objectives:
            if o.fn is None:
                values.append(o(metrics))
                continue
            value, own = o.evaluate(model, self.tokenizer, self.suite, limit=limit, **self._kw())
            if single:
                metrics.update(own)
            else:
                metrics.update({k: x for k, x in own.items() if k != "objective"})
                metrics[f"objective:{o.spec}"] = value
            values.append(value)
        return (values[0] if single else values), metrics

    def score(self, weights: Mapping[str, float], limit: Limit) -> tuple[float | list[float], dict[str, float]]:
        """Merge ``weights``, then :meth:`measure` at ``limit``."""
        self.merger.set_weights(dict(weights))
        return self.measure(limit)

    def eval_tokens(self, limit: Limit) -> int:
        """Tokens one :meth:`score` at ``limit`` reads: the scored suite once, plus the whole suite per callable."""
        total = eval_tokens(self.tokenizer, self.scored_suite(), None, limit=limit, seq_len=self.seq_len) \
            if self.weighted else 0
        callables = len(self.objectives) - len(self.weighted)
        return total + callables * eval_tokens(self.tokenizer, self.suite, None, limit=limit, seq_len=self.seq_len)

    def plan(self, fidelities: Sequence[Limit] | None, search_limit: Limit) -> FidelityPlan:
        """The rungs of a multi-fidelity trial (``fidelities``, or about 1/9, 1/3, all of ``search_limit``).

        A weighted objective scores its sets nested (each item once, so a trial reaching the last rung costs one
        scoring at ``search_limit``); a callable objective is called once per rung (its docs count every call).
        """
        if len(self.objectives) != 1:
            raise ConfigError("pruning works with one objective: a Pareto search has no single value to prune on")
        suite = self.suite
        size = max((len(v) for v in (*suite.texts.values(), *suite.qa.values())), default=0)
        if fidelities is not None:
            limits = tuple(fidelities)
        elif search_limit is None:
            limits = (*default_fidelities(size)[:-1], None)
        else:
            limits = default_fidelities(search_limit)
        steps = tuple(size if r is None else r for r in limits)
        if len(limits) < 2 or any(b <= a for a, b in pairwise(steps)):
            raise ConfigError(f"fidelities {fmt_limits(limits)} do not give increasing rungs on dev sets of up to "
                              f"{size} items: give fewer, smaller fidelities")
        incremental = self.objective.fn is None
        scored = self.scored_suite() if incremental else suite
        per = [n_items(scored, r) for r in limits]
        docs = tuple(per) if incremental else tuple(sum(per[:k + 1]) for k in range(len(per)))
        tokens = tuple(self.eval_tokens(r) for r in limits) if incremental else None
        return FidelityPlan(limits, steps, docs, tokens, scored, incremental)

    def rungs(self, weights: Mapping[str, float],
              plan: FidelityPlan) -> Iterator[tuple[Limit, float, dict[str, float]]]:
        """Merge ``weights`` and yield ``(limit, value, metrics)`` per rung of ``plan``, lazily (stop any time)."""
        self.merger.set_weights(dict(weights))
        model, objective = self.merger.model, self.objective
        if plan.incremental:
            for limit, metrics in nested_metrics(model, self.tokenizer, plan.scored, plan.limits, **self._kw()):
                yield limit, objective(metrics), metrics
        else:
            for limit in plan.limits:
                yield (limit, *objective.evaluate(model, self.tokenizer, self.suite, limit=limit, **self._kw()))
