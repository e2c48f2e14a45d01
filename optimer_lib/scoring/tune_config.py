"""The scoring set of an interactive Tune move: which dev sets, how much of them, and what one scoring costs.

    from optimer_lib.scoring.tune_config import TuneScoring
    cfg = TuneScoring(sets=("en", "ja"), docs=8, qa_items=8, seq_len=128, batch_size=8).check(suite)
    print(cfg.cost(tokenizer, suite, n_params=135e6))      # reads 2,048 tokens, ≈ 0.55 TFLOP
    for name, metrics, scores in cfg.stream(model, tokenizer, suite, should_stop=lambda: newer):
        ...                                                # each dev set as it finishes
    cfg.full()                                             # the same sets on every document ("confirm")
    cfg = TuneScoring(lmeval=("tasks/arith_mc.yaml:acc_norm",))  # + an lm-eval task on the merged model (slow)
    for key, value, seconds in cfg.score_lmeval(model, tokenizer): ...   # "lmeval:arith_mc:acc_norm", ...

The cost counts tokens as :func:`optimer_lib.scoring.scorer.eval_tokens` does (the one place that knows what
a scoring reads) and forward FLOPs as ≈ 2 × parameters × tokens, which is what exact scoring pays; a UI can
divide by a measured FLOP/s to say how long a slider release takes.

``lmeval`` terms (``SOURCE[:METRIC]`` as in :mod:`optimer_lib.scoring.lmeval`; the caller keeps task files
where it trusts them) are scored after the dev sets, on the first ``docs`` documents of each task (all of them
in :meth:`TuneScoring.full`), and reported as ``lmeval:TASK:METRIC``. lm-eval's requests are not counted in
:meth:`TuneScoring.cost`: a UI shows their measured time instead.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from optimer_lib.errors import ConfigError, DataError, MissingDependencyError
from optimer_lib.scoring.evaluate import EvalSuite, SetResult, StopCheck, stream_suite
from optimer_lib.scoring.scorer import eval_tokens

if TYPE_CHECKING:
    from optimer_lib.scoring.lmeval import LMEvalTerm

_scorer: Any = None  # one LMEvalScorer per process (it keeps the HFLM wrapper of the last model it scored)


@dataclass(frozen=True)
class ScoringCost:
    """Tokens one scoring reads and its forward FLOPs (≈ 2 × parameters × tokens)."""

    tokens: int
    flops: float

    def seconds(self, flops_per_second: float) -> float:
        """Expected time on a machine that sustains ``flops_per_second`` (measure it once per device)."""
        return self.flops / flops_per_second

    def __str__(self) -> str:
        return f"reads {self.tokens:,} tokens, ≈ {self.flops / 1e12:.2g} TFLOP"


@dataclass(frozen=True)
class TuneScoring:
    """What a Tune move scores: ``docs`` documents of each text set and ``qa_items`` items of each QA set in
    ``sets`` (None: every set of the suite; ``docs``/``qa_items`` None: all of them), ``seq_len`` tokens per
    document at most, ``batch_size`` sequences per forward, ``max_new_tokens`` generated per QA answer;
    ``lmeval``: lm-eval terms ``SOURCE[:METRIC]`` scored after the sets (see the module docstring)."""

    sets: tuple[str, ...] | None = None
    docs: int | None = 8
    qa_items: int | None = 8
    seq_len: int = 128
    batch_size: int = 16
    max_new_tokens: int = 8
    lmeval: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.sets is not None and not isinstance(self.sets, tuple):
            object.__setattr__(self, "sets", tuple([self.sets] if isinstance(self.sets, str) else self.sets))
        if not isinstance(self.lmeval, tuple):
            object.__setattr__(self, "lmeval", tuple([self.lmeval] if isinstance(self.lmeval, str) else self.lmeval))

    def check(self, suite: EvalSuite | None = None) -> TuneScoring:
        """Raise one ConfigError listing every problem (with ``suite``: also unknown or empty sets); else self."""
        problems = []
        for attr, low in (("docs", 1), ("qa_items", 1), ("seq_len", 2), ("batch_size", 1), ("max_new_tokens", 1)):
            value = getattr(self, attr)
            optional = attr in ("docs", "qa_items")
            if not ((optional and value is None) or (isinstance(value, int) and not isinstance(value, bool)
                                                     and value >= low)):
                allowed = f"an integer ≥ {low}" + (" or None (all)" if optional else "")
                problems.append(f"{attr} must be {allowed}, got {value!r}")
        if self.sets is not None and not self.sets:
            problems.append("sets is empty: pick at least one dev set (or None for all)")
        if suite is not None and self.sets:
            unknown = [n for n in self.sets if n not in suite.names()]
            if unknown:
                problems.append(f"unknown dev sets {unknown}; the suite has: {', '.join(suite.names()) or 'none'}")
        if suite is not None and not problems:
            sub = self.select(suite)
            empty = [f"text {n}" for n, d in sub.texts.items() if not d] + [f"QA {n}" for n, p in sub.qa.items()
                                                                            if not p]
            if not sub.texts and not sub.qa:
                problems.append("the suite has no dev sets to score")
            if empty:
                problems.append(f"dev sets with nothing to score: {', '.join(empty)}; leave them out of sets")
        if self.lmeval:
            try:
                keys = [t.key for t in self.lmeval_terms()]
            except (ConfigError, DataError, MissingDependencyError) as exc:
                problems.append(str(exc))
            else:
                if len(set(keys)) < len(keys):
                    problems.append(f"lm-eval terms name the same task metric twice: {', '.join(keys)}")
        if problems:
            raise ConfigError("bad Tune scoring set: " + "; ".join(problems))
        return self

    def lmeval_terms(self) -> list[LMEvalTerm]:
        """The lm-eval terms, tasks loaded (once per process), each ``key``-ed ``lmeval:TASK:METRIC``."""
        from optimer_lib.scoring.lmeval import PREFIX, parse_term

        terms = [parse_term(t.removeprefix(PREFIX + ":")) for t in self.lmeval]
        return [replace(t, key=f"{PREFIX}:{t.task.name}:{t.metric}") for t in terms]

    def score_lmeval(self, model: Any, tokenizer: Any, *,
                     should_stop: StopCheck | None = None) -> Iterator[tuple[str, float, float]]:
        """``(key, value, seconds)`` per lm-eval term on ``model``, on the first ``docs`` documents of each task."""
        global _scorer
        from optimer_lib.scoring.lmeval import LMEvalScorer, pick_metric

        if _scorer is None:
            _scorer = LMEvalScorer()
        for term in self.lmeval_terms():
            if should_stop is not None and should_stop():
                return
            t0 = time.perf_counter()
            got = _scorer.evaluate(term.task, model, tokenizer, limit=self.docs, batch_size=self.batch_size)
            yield term.key, pick_metric(got, term.metric, term.task.name), time.perf_counter() - t0

    def select(self, suite: EvalSuite) -> EvalSuite:
        """The part of ``suite`` this scoring reads (all of each chosen set; limits apply when scoring)."""
        return suite if self.sets is None else suite.select(texts=self.sets, qa=self.sets)

    def full(self) -> TuneScoring:
        """The same sets scored on every document and QA item (a "confirm" of the current weights)."""
        return replace(self, docs=None, qa_items=None)

    def tokens(self, tokenizer: Any, suite: EvalSuite, model: Any = None) -> int:
        """Tokens one scoring reads (``model`` only caps ``seq_len`` at its context length)."""
        sub = self.select(suite)
        kw = {"seq_len": self.seq_len, "max_new_tokens": self.max_new_tokens, "model": model}
        return (eval_tokens(tokenizer, sub.select(qa=()), limit=self.docs, **kw)
                + eval_tokens(tokenizer, sub.select(texts=()), limit=self.qa_items, **kw))

    def cost(self, tokenizer: Any, suite: EvalSuite, n_params: float, model: Any = None) -> ScoringCost:
        """Tokens read and forward FLOPs (2 × ``n_params`` × tokens) of one scoring."""
        if not n_params > 0:
            raise ConfigError(f"n_params must be the model's parameter count (> 0), got {n_params!r}")
        tokens = self.tokens(tokenizer, suite, model)
        return ScoringCost(tokens, 2.0 * float(n_params) * tokens)

    def units(self, suite: EvalSuite) -> list[EvalSuite]:
        """The sets this scoring reads, one suite each, in :meth:`stream`'s order (text sets, then QA sets): pieces
        that several workers can score apart (``replace(self, sets=None).stream(model, tokenizer, unit)``)."""
        sub = self.select(suite)
        return ([sub.select(texts=[n], qa=()) for n in sub.texts]
                + [sub.select(texts=(), qa=[n]) for n in sub.qa])

    def stream(self, model: Any, tokenizer: Any, suite: EvalSuite, *,
               should_stop: StopCheck | None = None) -> Iterator[SetResult]:
        """Score on ``model``, one dev set at a time (:func:`~optimer_lib.scoring.evaluate.stream_suite`)."""
        return stream_suite(model, tokenizer, self.select(suite), limit=self.docs, qa_limit=self.qa_items,
                            seq_len=self.seq_len, batch_size=self.batch_size, max_new_tokens=self.max_new_tokens,
                            should_stop=should_stop)
