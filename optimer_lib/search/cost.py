"""What a search will cost before it starts: seconds per trial and for the whole search, on this pool and device.

    from optimer_lib.search.cost import estimate_search_cost, parse_duration
    cost = estimate_search_cost(merger, tokenizer, suite, [objective], config)   # times one small scoring
    cost.seconds_per_trial, cost.total_seconds, cost.tokens_per_trial
    print(cost.summary(budget=parse_duration("30m")))     # what optimer search prints before its first trial

A trial is one merge (every vector's weight changes) plus one scoring of the dev subset at ``search_limit``
documents per set. Both are measured on the merger and model the search will use: the merge by setting the
weights to the middle of the bounds (the first trial sets its own), the scoring by timing
:meth:`~optimer_lib.scoring.scorer.TrialScorer.measure` at a small ``calibration_limit`` and scaling by the tokens
scored (:meth:`~optimer_lib.scoring.scorer.TrialScorer.eval_tokens`, the one count of what a trial reads). Scoring
time is close to linear in tokens on a CPU; on a GPU a small calibration batch is less efficient than a full one,
so the estimate errs high. With a pruner it is the cost of a trial that reaches the last rung (pruned trials cost
less). With sample prompts (``SearchConfig.sample_prompts``) one trial's generations are timed too and added to
each trial. The Search tab of the workbench calls the same function.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from optimer_lib.errors import ConfigError
from optimer_lib.merging.merger import Merger
from optimer_lib.scoring.evaluate import EvalSuite
from optimer_lib.scoring.objectives import Objective
from optimer_lib.scoring.scorer import TrialScorer
from optimer_lib.search.defaults import BATCH

if TYPE_CHECKING:
    from optimer_lib.search.study import SearchConfig

_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str | float | int) -> float:
    """Seconds of ``"90"``, ``"90s"``, ``"30m"``, ``"2h"``, ``"1h30m"``, ``"1.5h"`` (a number is seconds)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        spec = str(text).strip().lower().replace(" ", "")
        parts = re.findall(r"(\d+(?:\.\d+)?)([smhd]?)", spec)
        if not spec or "".join(n + u for n, u in parts) != spec or (len(parts) > 1 and not all(u for _, u in parts)):
            raise ConfigError(f"bad duration {text!r}: use seconds or a number with s, m, h or d (e.g. 90s, 30m, 2h, "
                              "1h30m)")
        value = sum(float(n) * _UNITS[u] for n, u in parts)
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"bad duration {text!r}: it must be more than zero")
    return value


def fmt_seconds(s: float) -> str:
    """``0.41 s``, ``12 s``, ``3 min 20 s``, ``2 h 05 min``."""
    if s < 10:
        return f"{s:.2g} s" if s < 1 else f"{s:.1f} s"
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


@dataclass(frozen=True)
class SearchCost:
    """An estimate of a search's time; every duration in seconds, measured on this machine."""

    trials: int
    tokens_per_trial: int
    seconds_per_token: float
    merge_seconds: float
    rescore_trials: int = 0
    tokens_per_rescore: int = 0
    calibration_seconds: float = 0.0   # what measuring took (not part of the search)
    pruned: bool = False               # a pruner may stop trials before their last rung
    sample_seconds: float = 0.0        # a trial's sample generations (SearchConfig.sample_prompts), measured once
    sample_tokens: int = 0             # tokens those generations may produce (prompts x sample_tokens)

    @property
    def tokens_per_second(self) -> float:
        return 1.0 / self.seconds_per_token if self.seconds_per_token > 0 else math.inf

    @property
    def score_seconds(self) -> float:
        return self.tokens_per_trial * self.seconds_per_token

    @property
    def seconds_per_trial(self) -> float:
        return self.merge_seconds + self.score_seconds + self.sample_seconds

    @property
    def rescore_seconds(self) -> float:
        return self.rescore_trials * (self.merge_seconds + self.tokens_per_rescore * self.seconds_per_token)

    @property
    def total_seconds(self) -> float:
        return self.trials * self.seconds_per_trial + self.rescore_seconds

    def trials_within(self, budget: float) -> int:
        """Trials that fit ``budget`` seconds (at least 1: a search always finishes its first trial)."""
        return max(1, min(self.trials, int(budget // self.seconds_per_trial))) if self.seconds_per_trial > 0 else \
            self.trials

    def summary(self, budget: float | None = None) -> str:
        """One paragraph: per trial (merge + scoring), whole search, and what a time budget allows."""
        most = "at most " if self.pruned else ""
        out = (f"estimated cost: {most}{fmt_seconds(self.seconds_per_trial)} per trial (merge "
               f"{fmt_seconds(self.merge_seconds)} + scoring {self.tokens_per_trial:,} tokens at "
               f"{self.tokens_per_second:,.0f} tokens/s"
               + (f" + samples {fmt_seconds(self.sample_seconds)} for up to {self.sample_tokens:,} generated tokens"
                  if self.sample_tokens else "") + f"); {self.trials} trials ≈ "
               f"{fmt_seconds(self.trials * self.seconds_per_trial)}")
        if self.rescore_trials:
            out += f", re-scoring the top {self.rescore_trials} ≈ {fmt_seconds(self.rescore_seconds)}"
        out += f"; total ≈ {fmt_seconds(self.total_seconds)}"
        if budget is not None:
            n = self.trials_within(budget)
            out += (f"; the time budget of {fmt_seconds(budget)} covers about {n} of {self.trials} trials" +
                    (" (the search stops after the trial running when it is spent; re-run to continue)"
                     if n < self.trials else ""))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "seconds_per_trial": self.seconds_per_trial, "total_seconds": self.total_seconds,
                "tokens_per_second": self.tokens_per_second}


def _midpoint(names: Sequence[str], config: SearchConfig | None) -> dict[str, float]:
    try:
        bounds = config.resolved_bounds(list(names)) if config is not None else {}
    except ConfigError:  # reported by the search itself, with every other settings problem
        bounds = {}
    return {n: sum(bounds.get(n, (0.0, 1.0))) / 2 for n in names}


def estimate_search_cost(merger: Merger, tokenizer: Any, suite: EvalSuite, objectives: Objective |
                         Sequence[Objective], config: SearchConfig | None = None, *, trials: int | None = None,
                         calibration_limit: int = 2, seconds_per_token: float | None = None,
                         merge_seconds: float | None = None, weights: Mapping[str, float] | None = None,
                         min_seconds: float = 0.3) -> SearchCost:
    """Estimate ``config``'s search on ``merger`` (see the module docstring); ``trials`` overrides ``config.trials``.

    ``seconds_per_token``/``merge_seconds`` skip the matching measurement (given numbers, tests). The scoring is
    timed at ``calibration_limit`` documents per set, repeated until ``min_seconds`` have passed, the fastest kept
    after a warm-up at one document per set; the merge is timed after a warm-up merge (first merges allocate). On
    return the merger holds ``weights`` (default: the middle of the bounds), which the first trial replaces.
    """
    objs = [objectives] if isinstance(objectives, Objective) else list(objectives)
    search_limit = config.search_limit if config is not None else BATCH.search_limit
    scorer = TrialScorer(merger, tokenizer, suite, objs,
                         seq_len=config.seq_len if config is not None else BATCH.seq_len,
                         batch_size=config.batch_size if config is not None else BATCH.batch_size,
                         record_metrics=config.record_metrics if config is not None else BATCH.record_metrics)
    started = time.perf_counter()
    target = dict(weights) if weights is not None else _midpoint(merger.names, config)
    if merge_seconds is None:
        # The first merge also allocates (a merger's base copies, scratch buffers): warm up, then time a second
        # merge that changes every weight, as a trial does.
        merger.set_weights({n: w / 2 for n, w in target.items()})
        t0 = time.perf_counter()
        merger.set_weights(target)
        merge_seconds = time.perf_counter() - t0
    else:
        merger.set_weights(target)
    if seconds_per_token is None:
        limit = calibration_limit if search_limit is None else min(calibration_limit, search_limit)
        scorer.measure(1)  # warm-up (tokenising, first-call allocations) on one document per set
        tokens, best, t_start = max(1, scorer.eval_tokens(limit)), math.inf, time.perf_counter()
        while best == math.inf or time.perf_counter() - t_start < min_seconds:
            t0 = time.perf_counter()
            scorer.measure(limit)
            best = min(best, time.perf_counter() - t0)
        seconds_per_token = best / tokens
    n = (config.trials if config is not None else BATCH.trials) if trials is None else int(trials)
    prompts = tuple(getattr(config, "sample_prompts", ()) or ())
    sample_seconds, sample_tokens = 0.0, len(prompts) * int(getattr(config, "sample_tokens", 0))
    if prompts:  # greedy generation costs per token far more than scoring: time it on the merged model
        from optimer_lib.search.samples import generate_samples

        t0 = time.perf_counter()
        generate_samples(merger.model, tokenizer, prompts, int(config.sample_tokens))
        sample_seconds = time.perf_counter() - t0
    rescore = config is not None and config.top_k > 0 and config.rescore_limit != config.search_limit
    return SearchCost(trials=n, tokens_per_trial=scorer.eval_tokens(search_limit),
                      seconds_per_token=float(seconds_per_token), merge_seconds=float(merge_seconds),
                      rescore_trials=min(config.top_k, n) if rescore else 0,
                      tokens_per_rescore=scorer.eval_tokens(config.rescore_limit) if rescore else 0,
                      calibration_seconds=time.perf_counter() - started,
                      pruned=config is not None and config.pruner != "none", sample_seconds=sample_seconds,
                      sample_tokens=sample_tokens)


def trials_done(config: SearchConfig) -> int:
    """Trials of ``config``'s study already counted (0 when there is no study yet): a resumed search runs only the
    rest, so that is what its estimate should price."""
    from pathlib import Path

    import optuna

    from optimer_lib.search.storage import open_storage
    from optimer_lib.search.trials import counted

    url = config.storage_url()
    if url is None or (url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file()):
        return 0
    store = open_storage(url)
    if config.study_name not in optuna.get_all_study_names(store):
        return 0
    return counted(optuna.load_study(study_name=config.study_name, storage=store))
