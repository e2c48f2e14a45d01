"""Cost accounting in common units for every method, and quality-vs-cost curves.

    from optimer_lib.experiments.costs import CostLedger, ledger_from_study
    from optimer_lib.scoring.scorer import TrialScorer
    ledger = CostLedger()
    per_trial = TrialScorer(merger, tokenizer, suite, [objective]).eval_tokens(100)   # tokens one trial scores
    ledger.add("mixture", kind="trial", tokens_trained=1_600_000, tokens_evaluated=per_trial,
               seconds=163.0, objective=3.63)
    ledger.extend(ledger_from_study(study, "optimer", tokens_evaluated=per_trial))   # from timestamps
    curve = ledger.curve("optimer", unit="seconds")      # [(cumulative cost, best-so-far objective), ...]
    cost_to_reach(curve, target=3.63)                    # first cumulative cost whose best is <= target

Units (:data:`UNITS`): ``tokens_trained`` (tokens through forward+backward), ``tokens_evaluated``
(tokens scored: document tokens at the trial's limit plus generated tokens; counted by
:meth:`optimer_lib.scoring.scorer.TrialScorer.eval_tokens`, the one place that knows what a trial scores, plus
the tokens of a trial's sample generations, ``record.TOKENS_GENERATED``, whose time is inside its seconds),
``tokens`` (their sum),
``compute`` (forward-token equivalents: ``3 * tokens_trained + tokens_evaluated``, a backward pass
costing about two forwards) and ``seconds`` (wall time on this machine). A search's curve starts at
zero at the start of that search; one-off costs (the per-dataset CPT runs of an OptiMer pool) are
separate entries of their own method and can be added as an ``offset``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from optimer_lib.fileio import atomic_write_json
from optimer_lib.search import record

UNITS = ("seconds", "tokens_trained", "tokens_evaluated", "tokens", "compute")
BACKWARD_FACTOR = 3  # a training token costs ~3 forward tokens (forward + backward ~ 2 forwards)


@dataclass
class CostEntry:
    """One unit of work: a CPT run, a search trial, a re-scoring, a final evaluation...

    ``objective`` is the (dev, search-fidelity) value the work produced, if it produced a candidate;
    lower is better.
    """

    method: str
    kind: str = "trial"
    tokens_trained: int = 0
    tokens_evaluated: int = 0
    seconds: float = 0.0
    objective: float | None = None
    label: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def amount(self, unit: str) -> float:
        """This entry's cost in ``unit`` (one of :data:`UNITS`)."""
        if unit == "seconds":
            return float(self.seconds)
        if unit == "tokens_trained":
            return float(self.tokens_trained)
        if unit == "tokens_evaluated":
            return float(self.tokens_evaluated)
        if unit == "tokens":
            return float(self.tokens_trained + self.tokens_evaluated)
        if unit == "compute":
            return float(BACKWARD_FACTOR * self.tokens_trained + self.tokens_evaluated)
        raise ValueError(f"unknown cost unit {unit!r}: choose one of {', '.join(UNITS)}")


@dataclass
class CostLedger:
    """An append-only list of :class:`CostEntry`, with totals, curves and JSON round-trip."""

    entries: list[CostEntry] = field(default_factory=list)

    def add(self, method: str, **kw: Any) -> CostEntry:
        entry = CostEntry(method=method, **kw)
        self.entries.append(entry)
        return entry

    def extend(self, entries: Iterable[CostEntry]) -> None:
        self.entries.extend(entries)

    def methods(self) -> list[str]:
        return list(dict.fromkeys(e.method for e in self.entries))

    def of(self, method: str, kinds: Sequence[str] | None = None) -> list[CostEntry]:
        return [e for e in self.entries if e.method == method and (kinds is None or e.kind in kinds)]

    def totals(self, method: str | None = None) -> dict[str, float]:
        """Every unit summed over one method's entries (all entries when ``method`` is None)."""
        chosen = self.entries if method is None else self.of(method)
        out = {u: sum(e.amount(u) for e in chosen) for u in UNITS}
        out["entries"] = float(len(chosen))
        return out

    def curve(self, method: str, unit: str = "seconds", *, offset: float = 0.0,
              kinds: Sequence[str] | None = None) -> list[tuple[float, float]]:
        """Best-so-far objective vs cumulative cost of ``method`` (see :func:`quality_curve`)."""
        return quality_curve(self.of(method, kinds), unit, offset=offset)

    def recorder(self, method: str, *, tokens_evaluated: int = 0, tokens_trained: int = 0,
                 kind: str = "trial") -> Callable[[Any, Any], None]:
        """A ``run_search`` callback appending one entry per finished trial (wall time since the last).

        Create it right before the search starts: the first trial's seconds count from then, so
        sampler time and overheads are included and the curve starts at the start of the search.
        ``tokens_evaluated`` is the per-trial default; a trial that recorded its own count (a pruned
        search's ``tokens_evaluated`` user attr, which stops early on a subset) is charged that instead.
        """
        last = [time.perf_counter()]

        def callback(study: Any, trial: Any) -> None:
            now = time.perf_counter()
            value = trial.value if getattr(trial.state, "name", "") == "COMPLETE" else None
            attrs = getattr(trial, "user_attrs", {})
            own = attrs.get(record.TOKENS_EVALUATED)
            self.add(method, kind=kind, tokens_trained=tokens_trained,
                     tokens_evaluated=(int(own) if own is not None else tokens_evaluated) + _generated(attrs),
                     seconds=now - last[0], objective=None if value is None else float(value),
                     label=f"trial {trial.number}", info=_trial_info(trial))
            last[0] = now

        return callback

    def to_json(self) -> list[dict[str, Any]]:
        return [asdict(e) for e in self.entries]

    @classmethod
    def from_json(cls, rows: Iterable[dict[str, Any]]) -> CostLedger:
        return cls([CostEntry(**r) for r in rows])

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, self.to_json(), indent=1)
        return path

    @classmethod
    def load(cls, path: str | Path) -> CostLedger:
        return cls.from_json(json.loads(Path(path).read_text()))


def _generated(attrs: dict[str, Any]) -> int:
    """Tokens a trial generated for its sample generations (``optimer_lib.search.samples``; 0 without)."""
    return int(attrs.get(record.TOKENS_GENERATED, 0) or 0)


def _trial_info(trial: Any) -> dict[str, Any]:
    """A trial entry's ``info``: its weights, and the seconds of its sample generations when it made any (those
    seconds are inside the entry's own, which span the whole trial)."""
    info: dict[str, Any] = {"params": dict(trial.params)}
    attrs = getattr(trial, "user_attrs", {})
    if record.SAMPLE_SECONDS in attrs:
        info.update(sample_seconds=float(attrs[record.SAMPLE_SECONDS]), tokens_generated=_generated(attrs))
    return info


def quality_curve(entries: Sequence[CostEntry], unit: str = "seconds", *,
                  offset: float = 0.0) -> list[tuple[float, float]]:
    """``[(cumulative cost, best objective so far)]``, one point per entry that has an objective.

    Entries without an objective (training, re-scoring) add their cost to what follows. Cost starts
    at ``offset`` (0: the start of the search).
    """
    total, best, points = float(offset), math.inf, []
    for e in entries:
        total += e.amount(unit)
        if e.objective is not None and math.isfinite(e.objective):
            best = min(best, float(e.objective))
            points.append((total, best))
    return points


def cost_to_reach(curve: Sequence[tuple[float, float]], target: float, *, tol: float = 1e-12) -> float | None:
    """The first cumulative cost at which the best-so-far objective is <= ``target``; None if never."""
    for cost, best in curve:
        if best <= target + tol:
            return cost
    return None


def rescore_entry(study: Any, method: str, tokens_evaluated: int) -> CostEntry:
    """The two-fidelity re-scoring ``run_search`` did after ``study``'s trials (call it right after the search):
    ``tokens_evaluated`` (top-k × the re-score set), seconds from the last trial's completion to now."""
    import datetime as dt

    done = [t.datetime_complete for t in study.get_trials(deepcopy=False) if t.datetime_complete is not None]
    seconds = max(0.0, (dt.datetime.now() - max(done)).total_seconds()) if done else 0.0
    return CostEntry(method=method, kind="rescore", tokens_evaluated=int(tokens_evaluated), seconds=seconds)


def ledger_from_study(study: Any, method: str, *, tokens_evaluated: int = 0, tokens_trained: int = 0,
                      attr_tokens_trained: str | None = None) -> list[CostEntry]:
    """Entries for a finished (or resumed) Optuna study, from trial timestamps.

    Seconds per trial are ``datetime_complete - datetime_start`` (sampling, merging, scoring; pauses
    between resumed sessions are not counted). ``attr_tokens_trained`` names a trial user attr holding
    the tokens that trial trained (a data-mixture search), else ``tokens_trained`` per trial.
    """
    out = []
    for t in study.get_trials(deepcopy=False):
        if t.datetime_start is None or t.datetime_complete is None:
            continue
        value = t.value if t.state.name == "COMPLETE" else None
        trained = int(t.user_attrs.get(attr_tokens_trained, 0)) if attr_tokens_trained else tokens_trained
        out.append(CostEntry(method=method, kind="trial", tokens_trained=trained,
                             tokens_evaluated=int(t.user_attrs.get(record.TOKENS_EVALUATED, tokens_evaluated))
                             + _generated(t.user_attrs),
                             seconds=(t.datetime_complete - t.datetime_start).total_seconds(),
                             objective=None if value is None else float(value), label=f"trial {t.number}",
                             info=_trial_info(t)))
    return out
