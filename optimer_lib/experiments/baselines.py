"""Baselines OptiMer is compared with: data-mixture CPT (one model, or a search over ratios) and merges.

    from optimer_lib.experiments.baselines import (BASELINES, MixtureSearchConfig, mixture_budget, run_mixture_search,
                                       search_baseline, train_mixture)
    train_mixture("assets/base", {"ja": 0.5, "math": 0.5}, "runs/mix", TrainConfig(tokens=800_000))
    per, budget = mixture_budget("equal_total", cpt_tokens=400_000, n_datasets=4, candidates=3)
    cfg = MixtureSearchConfig(tokens_per_candidate=per, budget_tokens=budget, workdir=Path("runs/m"))
    res = run_mixture_search("assets/base", ["ja", "zh", "math", "code"], dev_suite, objective, cfg)
    res.best_ratios, res.best_value, res.best_dir
    out = search_baseline(pool.merger, tokenizer, dev_suite, objective, "ties", SearchConfig(trials=30, ...))
    out["choice"]    # {"method": "ties", "weights": {...}, "params": {"density": ..., "lam": ...}}

Budget modes of the data-mixture search (:func:`mixture_budget`): ``equal_total`` (a) — each candidate
sees as many tokens as the pool's CPT runs together (K x T); ``per_run`` (b) — each candidate sees one
CPT run's tokens (T). Candidates are trained from the base until the next one would exceed the budget.
Merge baselines (:data:`BASELINES`): ``uniform`` (model averaging, α = 1/K), ``task_arithmetic``
(one shared λ, a 1-D search), ``ties`` (weights 1, density and λ searched), ``dare`` (α per vector and
density searched). All use the same objective and dev suite as OptiMer; cost entries come from trial
timestamps (:func:`optimer_lib.experiments.costs.ledger_from_study`).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from optimer_lib.data import load_corpus, pack_tokens
from optimer_lib.errors import ConfigError, OptimerError
from optimer_lib.experiments.costs import CostLedger, ledger_from_study, rescore_entry
from optimer_lib.merging.merger import Merger
from optimer_lib.scoring.evaluate import EvalSuite
from optimer_lib.scoring.objectives import Objective
from optimer_lib.scoring.scorer import TrialScorer, eval_tokens
from optimer_lib.search import record
from optimer_lib.search.samplers import make_sampler, resume_seed
from optimer_lib.search.storage import open_storage, workdir_storage
from optimer_lib.search.study import SearchConfig, run_search
from optimer_lib.search.trials import run_trials
from optimer_lib.training.train import TrainConfig, TrainResult, train_cpt, train_model

BUDGET_MODES = ("equal_total", "per_run")
BASELINES: dict[str, dict[str, Any]] = {
    "uniform": {"method": "optimer", "weights": "uniform"},
    "task_arithmetic": {"method": "optimer", "weights": "shared"},
    "ties": {"method": "ties", "weights": "ones", "search_params": {"density": (0.1, 1.0), "lam": (0.0, 1.0)}},
    "dare": {"method": "dare", "weights": "search", "params": {"seed": 0}, "search_params": {"density": (0.1, 1.0)}},
}


def train_mixture(base: str | os.PathLike, ratios: Mapping[str, float], out_dir: str | os.PathLike,
                  cfg: TrainConfig | None = None, *, data: Mapping[str, str] | None = None,
                  ledger: CostLedger | None = None, method: str = "mixture", progress: bool = True) -> TrainResult:
    """One data-mixture CPT model from ``base`` with the given ratios (normalised by train_cpt).

    ``data`` maps a ratio's name to a corpus name or file (default: the name itself).
    """
    spec = {str((data or {}).get(n, n)): float(r) for n, r in ratios.items()}
    res = train_cpt(base, spec, out_dir, cfg, progress=progress)
    if ledger is not None:
        ledger.add(method, kind="train", tokens_trained=res.tokens, seconds=res.seconds, label=str(out_dir),
                   info={"ratios": dict(ratios)})
    return res


def mixture_budget(mode: str, cpt_tokens: int, n_datasets: int, candidates: int) -> tuple[int, int]:
    """``(tokens per candidate, total token budget)`` for budget mode (a) ``equal_total`` or (b) ``per_run``."""
    if mode not in BUDGET_MODES:
        raise ConfigError(f"unknown budget mode {mode!r}: choose one of {', '.join(BUDGET_MODES)}")
    per = cpt_tokens * n_datasets if mode == "equal_total" else cpt_tokens
    return per, per * max(1, candidates)


def normalised_ratios(raw: Mapping[str, float]) -> dict[str, float]:
    """Suggested raw ratios -> shares summing to 1 (all ~0 -> uniform)."""
    total = sum(max(0.0, float(v)) for v in raw.values())
    if total <= 1e-12:
        return {n: 1.0 / len(raw) for n in raw}
    return {n: max(0.0, float(v)) / total for n, v in raw.items()}


@dataclass
class MixtureSearchConfig:
    """A data-mixture search: one model per candidate, trained from the base, under a token budget."""

    tokens_per_candidate: int
    budget_tokens: int
    train: TrainConfig = field(default_factory=TrainConfig)
    sampler: str = "tpe"
    seed: int = 0
    max_trials: int = 100
    search_limit: int | None = 100
    workdir: Path = field(default_factory=lambda: Path("runs/mixture-search"))
    study_name: str = "mixture"
    storage: str | None = None
    enqueue_uniform: bool = True   # first candidate: equal shares (the natural starting mixture)
    keep_models: bool = False      # keep every candidate checkpoint (default: the best and the first)
    batch_size: int = 16


@dataclass
class MixtureSearchResult:
    study: optuna.Study
    best_ratios: dict[str, float]
    best_value: float
    best_metrics: dict[str, float]
    best_dir: Path
    tokens_trained: int
    trials: int

    def cost_entries(self, method: str = "mixture") -> list:
        return ledger_from_study(self.study, method, attr_tokens_trained="tokens_trained")


def _counted_trials(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=record.FINISHED) if record.is_counted(t)]


def _trained(study: optuna.Study) -> int:
    """Tokens trained by every candidate holding a slot (finished or running in any worker)."""
    return sum(int(t.user_attrs.get(record.TOKENS_TRAINED, 0)) for t in study.get_trials(deepcopy=False)
               if not t.user_attrs.get(record.INTERRUPTED) and t.state in (*record.FINISHED, TrialState.RUNNING))


def run_mixture_search(base: str | os.PathLike, names: Sequence[str], suite: EvalSuite, objective: Objective,
                       cfg: MixtureSearchConfig, *, data: Mapping[str, str] | None = None,
                       ledger: CostLedger | None = None, method: str = "mixture",
                       progress: bool = False) -> MixtureSearchResult:
    """Search mixture ratios with an Optuna sampler; each trial trains and scores one mixture model.

    Resumable (the study lives in ``storage``, default SQLite in the workdir): re-running continues until the
    budget or ``max_trials`` is reached. Ratios are suggested in [0, 1] per dataset and normalised. Trials run
    through the one trial loop (:func:`optimer_lib.search.trials.run_trials`: slots, failures, Ctrl-C), so
    several workers may share the study. ``ledger`` (if given) receives one entry per trial.
    """
    from optimer_lib.checkpoints.models import load_model, load_tokenizer

    names = list(names)
    workdir = Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tcfg = replace(cfg.train, tokens=cfg.tokens_per_candidate, checkpoint_every=0, trajectory=0)
    tcfg.validate()
    planned = tcfg.steps * tcfg.batch_size * tcfg.seq_len
    if cfg.budget_tokens < planned:
        raise ConfigError(f"budget {cfg.budget_tokens} tokens is less than one candidate "
                          f"({cfg.tokens_per_candidate}): raise budget_tokens")
    tokenizer = load_tokenizer(base)
    blocks = {n: pack_tokens(load_corpus((data or {}).get(n, n), "train"), tokenizer, tcfg.seq_len) for n in names}
    bounds = {n: (0.0, 1.0) for n in names}
    sampler = make_sampler(cfg.sampler, cfg.seed, bounds, cfg.max_trials)
    study = optuna.create_study(storage=open_storage(workdir_storage(workdir, cfg.storage)),
                                study_name=cfg.study_name, direction=objective.direction, load_if_exists=True,
                                sampler=sampler)
    record.check_study(study, {record.NAMES: names, record.OBJECTIVE: objective.spec}, what="workdir")
    if study.trials:
        study.sampler = make_sampler(cfg.sampler, resume_seed(cfg.seed, len(study.trials)), bounds, cfg.max_trials)
    elif cfg.enqueue_uniform:
        study.enqueue_trial(dict.fromkeys(names, 1.0))
    record.write_study_attrs(study, {record.NAMES: names, record.OBJECTIVE: objective.spec,
                                     record.DIRECTION: objective.direction, record.SAMPLER: cfg.sampler,
                                     record.SEED: cfg.seed, record.LIMITS: [cfg.search_limit]})
    per_eval = eval_tokens(tokenizer, suite, objective, limit=cfg.search_limit, seq_len=tcfg.seq_len)

    def suggest(trial: optuna.Trial) -> dict[str, float]:
        raw = {n: trial.suggest_float(n, *bounds[n]) for n in names}
        ratios = {n: r for n, r in normalised_ratios(raw).items() if r > 0}
        trial.set_user_attr(record.RATIOS, ratios)
        trial.set_user_attr(record.TOKENS_TRAINED, planned)
        trial.set_user_attr(record.TOKENS_EVALUATED, per_eval)
        return raw

    def score(trial: optuna.Trial, raw: dict[str, float]) -> tuple[float, dict[str, float]]:
        ratios = trial.user_attrs[record.RATIOS]  # normalised once, by suggest
        model = load_model(base, dtype="float32", device="cpu")
        train_model(model, tokenizer, {n: blocks[n] for n in ratios}, ratios, workdir / f"cand-{trial.number:03d}",
                    tcfg, meta={"base": str(base), "data": ratios, "trial": trial.number}, progress=progress)
        return objective.evaluate(model, tokenizer, suite, limit=cfg.search_limit, seq_len=tcfg.seq_len,
                                  batch_size=cfg.batch_size)

    def over_budget(study: optuna.Study) -> bool:  # the next candidate would exceed the token budget
        return _trained(study) + planned > cfg.budget_tokens

    outcome = run_trials(study, total=cfg.max_trials, suggest=suggest, score=score,
                         metrics_key=record.metrics_key(cfg.search_limit), progress=progress, desc="mixture",
                         should_stop=over_budget, callbacks=[lambda st, _t: _prune_dirs(st, workdir, cfg.keep_models)])
    if outcome.interrupted:
        raise KeyboardInterrupt
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise OptimerError(f"no mixture candidate of {cfg.study_name!r} completed: check the data and the budget"
                           + (f" (first error: {record.first_error(study)})" if record.first_error(study) else ""))
    best = study.best_trial
    counted = _counted_trials(study)
    result = MixtureSearchResult(study=study, best_ratios=dict(best.user_attrs[record.RATIOS]),
                                 best_value=float(best.value),
                                 best_metrics=dict(best.user_attrs.get(record.metrics_key(cfg.search_limit), {})),
                                 best_dir=workdir / f"cand-{best.number:03d}",
                                 tokens_trained=sum(int(t.user_attrs.get(record.TOKENS_TRAINED, 0)) for t in counted),
                                 trials=len(counted))
    if ledger is not None:
        ledger.extend(result.cost_entries(method))
    return result


def _prune_dirs(study: optuna.Study, workdir: Path, keep: bool) -> None:
    if keep or not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return
    keep_names = {f"cand-{study.best_trial.number:03d}", "cand-000"}  # the best and the first (uniform) one
    for d in workdir.glob("cand-*"):
        if d.name not in keep_names and not d.name.endswith((".tmp", ".old")):
            shutil.rmtree(d, ignore_errors=True)


class MethodMerger:
    """Exposes a merge method's searched quantities to :func:`optimer_lib.search.study.run_search` as 'weights'.

    ``weights``: ``"search"`` (one α per vector), ``"shared"`` (one λ for all, named ``lambda``),
    ``"uniform"`` (1/K each, fixed), ``"ones"`` (1 each, fixed) or a mapping of fixed weights.
    ``params`` are fixed method options; ``search_params`` maps an option to its (lo, hi) range.
    Use as a context manager: on exit the wrapped merger's method and params are restored.
    """

    def __init__(self, merger: Merger, method: str = "optimer", *, weights: str | Mapping[str, float] = "search",
                 params: Mapping[str, object] | None = None,
                 search_params: Mapping[str, tuple[float, float]] | None = None) -> None:
        self.inner, self.method, self.weights_mode = merger, method, weights
        self.params, self.search_params = dict(params or {}), dict(search_params or {})
        self._saved = (merger.method, dict(merger.params))

    @property
    def model(self) -> Any:
        return self.inner.model

    @property
    def names(self) -> list[str]:
        alphas = list(self.inner.names) if self.weights_mode == "search" else \
            ["lambda"] if self.weights_mode == "shared" else []
        return alphas + list(self.search_params)

    def bounds(self) -> dict[str, tuple[float, float]]:
        return {n: self.search_params.get(n, (0.0, 1.0)) for n in self.names}

    def split(self, values: Mapping[str, float]) -> tuple[dict[str, float], dict[str, object]]:
        """Searched values -> (weights per vector, method params)."""
        vecs, mode = list(self.inner.names), self.weights_mode
        if mode == "search":
            weights = {n: float(values[n]) for n in vecs}
        elif mode == "shared":
            weights = dict.fromkeys(vecs, float(values["lambda"]))
        elif mode == "uniform":
            weights = dict.fromkeys(vecs, 1.0 / len(vecs))
        elif mode == "ones":
            weights = dict.fromkeys(vecs, 1.0)
        elif isinstance(mode, Mapping):
            weights = {n: float(mode[n]) for n in vecs}
        else:
            raise ConfigError(f"weights={mode!r}: use search, shared, uniform, ones or a mapping")
        return weights, {**self.params, **{k: float(values[k]) for k in self.search_params}}

    def set_weights(self, values: Mapping[str, float]) -> None:
        weights, params = self.split(values)
        self.inner.method, self.inner.params = self.method, params
        self.inner.set_weights(weights)

    def choice(self, values: Mapping[str, float]) -> dict[str, Any]:
        weights, params = self.split(values)
        return {"method": self.method, "weights": weights, "params": params}

    def __enter__(self) -> MethodMerger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.inner.method, self.inner.params = self._saved


def apply_choice(merger: Any, choice: Mapping[str, Any]) -> None:
    """Set a resident merger to a chosen merge ``{"method", "weights", "params"}``."""
    merger.method, merger.params = choice.get("method", "optimer"), dict(choice.get("params", {}))
    merger.set_weights(dict(choice["weights"]))


def search_baseline(merger: Merger, tokenizer: Any, suite: EvalSuite, objective: Objective, name: str,
                    config: SearchConfig, *,
                    ledger: CostLedger | None = None, progress: bool = False, **spec: Any) -> dict[str, Any]:
    """Run one baseline of :data:`BASELINES` (``spec`` overrides its entries) with the OptiMer objective.

    Returns ``{"choice", "objective" (dev, search fidelity), "metrics", "trials", "seconds"}``; a
    baseline with nothing to search (``uniform``) is scored once. The study is named ``name`` and its
    best.json goes to ``config.workdir / name``. The merger's method is restored afterwards.
    """
    if name not in BASELINES and "method" not in spec:
        raise ConfigError(f"unknown baseline {name!r}: choose one of {', '.join(BASELINES)}")
    full = {**BASELINES.get(name, {}), **spec}
    t0 = time.perf_counter()
    with MethodMerger(merger, full.get("method", "optimer"), weights=full.get("weights", "search"),
                      params=full.get("params"), search_params=full.get("search_params")) as mm:
        scorer = TrialScorer(mm, tokenizer, suite, [objective], seq_len=config.seq_len, batch_size=config.batch_size,
                             record_metrics=config.record_metrics)
        per_eval = scorer.eval_tokens(config.search_limit)
        if not mm.names:
            value, metrics = scorer.score({}, config.search_limit)
            seconds = time.perf_counter() - t0
            if ledger is not None:
                ledger.add(name, kind="trial", tokens_evaluated=per_eval, seconds=seconds, objective=value)
            return {"choice": mm.choice({}), "objective": value, "metrics": metrics, "trials": 1, "seconds": seconds}
        cfg = replace(config, bounds=mm.bounds(), study_name=name, workdir=Path(config.workdir) / name)
        res = run_search(mm, tokenizer, suite, objective, cfg, progress=progress)
        if ledger is not None:
            ledger.extend(ledger_from_study(res.study, name, tokens_evaluated=per_eval))
            if cfg.top_k > 0:  # the same two-fidelity re-scoring as OptiMer's, charged the same way
                ledger.extend([rescore_entry(res.study, name, cfg.top_k * scorer.eval_tokens(cfg.rescore_limit))])
        return {"choice": mm.choice(res.best_weights), "objective": res.value_search, "metrics": res.best_metrics,
                "objective_rescored": res.best_value, "trials": len(res.study.trials),
                "seconds": time.perf_counter() - t0}
