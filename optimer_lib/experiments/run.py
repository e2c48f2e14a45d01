"""The complete experiment set on the embedded world: OptiMer, every baseline, the analyses, a report.

    optimer experiments [--workdir runs/experiments] [--seeds 0,1,2] [--results results/experiments] [--quick]
    optimer experiments --regime-map --seeds 0,1,2                  # the regime map only (regime.py; cached)
    optimer report runs/experiments/seed-0                          # re-render one seed's report.html / report.md
    optimer findings --results results/experiments --out FINDINGS.md   # the findings across seeds

    from optimer_lib.experiments.run import ExperimentConfig, run_experiments
    run_experiments(ExperimentConfig.quick(Path("runs/exp-quick")))

Each seed s (the CPT seed and every search's sampler seed) runs the whole set in ``<workdir>/seed-<s>/``.
Every stage writes ``<workdir>/seed-<s>/stages/<stage>.json`` and is skipped when that file exists, so an
interrupted run resumes (searches also resume inside their Optuna studies). Searches see dev splits
only; the ``final`` stage alone scores test splits, keeping every test document's loss and every QA item's
correctness (raw and through the chat template) for paired bootstraps. Every merge method (OptiMer, task
arithmetic, TIES, DARE) is searched by the same code path (:func:`optimer_lib.search.study.run_search`) with
the same sampler, seed and trial budget (``trials``); uniform averaging is one point. The ``instruction``
stage searches α again with the instruction vector (instruct − base) merged at weight 1, the paper's recipe. The
``granularity`` stage (:mod:`optimer_lib.experiments.granularity`) searches one α per vector against one per
(vector, layer group), both with the gradient sampler and OptiMer's budget, and scores both per test document.
Each seed's directory gets ``costs.json``, ``summary.json``, ``report.html``, ``report.md`` and a single-seed
``FINDINGS.md``; the workdir gets ``FINDINGS.md`` across seeds (:mod:`optimer_lib.experiments.findings`),
``results=`` (``--results``) receives a copy of the small JSONs, and ``findings=`` (``--findings``) a copy of
FINDINGS.md. The regime map (R against the CPT/base token ratio x two CPT learning rates, on bases pretrained
once beside the seed folders: :mod:`optimer_lib.experiments.regime`) lives in ``regime-*`` stages of each seed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import optuna

from optimer_lib.checkpoints.vectors import extract_vector, load_vector, save_vector
from optimer_lib.data import assets_dir, load_eval_suite
from optimer_lib.errors import ConfigError
from optimer_lib.experiments import analysis as an
from optimer_lib.experiments import baselines as bl
from optimer_lib.experiments import docscores as ds
from optimer_lib.experiments.costs import CostEntry, ledger_from_study, rescore_entry
from optimer_lib.experiments.regime import RegimeConfig
from optimer_lib.fileio import atomic_write_json, read_or_make_json
from optimer_lib.scoring.evaluate import evaluate_suite
from optimer_lib.scoring.objectives import parse_objective
from optimer_lib.scoring.scorer import TrialScorer
from optimer_lib.search.study import SearchConfig, run_search
from optimer_lib.training.train import TrainConfig, train_cpt

MERGE_BASELINES = ("uniform", "task_arithmetic", "ties", "dare")


@dataclass
class ExperimentConfig:
    """Sizes of the experiment set; ``quick()`` is a few-minute smoke version."""

    workdir: Path = Path("runs/experiments")
    corpora: tuple[str, ...] = ("ja", "zh", "math", "code")
    eval_corpora: tuple[str, ...] = ("en", "ja", "zh", "math", "code")
    objective: str = "balanced"
    reopt_objectives: tuple[str, ...] = ("ja", "math")   # re-optimised besides the main objective
    cpt_tokens: int = 400_000
    cpt_lr: float = 1e-3
    trajectory: int = 4           # checkpoints along the first corpus's CPT run (linearity)
    trials: int = 100             # every searched merge method (OptiMer, its baselines, the instruction recipe)
    reopt_trials: int = 40
    grid_trials: int = 81         # grid sampler: 3 points per axis over 4 vectors
    landscape_points: int = 7
    search_limit: int = 100
    rescore_limit: int = 300
    top_k: int = 3
    final_limit: int = 300
    mixture_candidates: dict[str, int] = field(default_factory=lambda: {"equal_total": 3, "per_run": 5})
    within: float = 0.01          # per-seed report only; findings use 10% of OptiMer's gain over the base
    instruction_weight: float = 1.0   # the instruction vector's weight in the paper's recipe (0: skip the stage)
    # Per-layer-group weights of the granularity stage (0: skip it): 4 on the 4-block embedded base is one weight per
    # block (+ embed, head: 6 per vector), the finest per-layer split, and bench/per_layer.py's better one (vs 2).
    granularity_groups: int = 4
    seeds: tuple[int, ...] = (0, 1, 2)
    seed: int = 0                 # the seed being run (set per seed by run_experiments)
    results: Path | None = None   # also copy config, stage JSONs and findings here (an explicit path)
    regime: RegimeConfig = field(default_factory=RegimeConfig)   # the regime map's sizes (regime.py)
    quick_mode: bool = False

    @classmethod
    def quick(cls, workdir: Path = Path("runs/experiments-quick")) -> ExperimentConfig:
        return cls(workdir=workdir, cpt_tokens=32_768, trajectory=2, trials=12, reopt_trials=5, seeds=(0,),
                   grid_trials=16, landscape_points=3, search_limit=20, rescore_limit=40, top_k=2, final_limit=40,
                   mixture_candidates={"equal_total": 2, "per_run": 3}, regime=RegimeConfig.quick(),
                   quick_mode=True)


def _write_json(path: Path, payload: Any) -> None:
    atomic_write_json(path, payload, indent=1)


def _values(study: Any) -> list[float | None]:
    return [t.value if t.state.name == "COMPLETE" else None for t in study.trials]


def _budget(study: Any, cfg: SearchConfig) -> dict[str, Any]:
    """What a search spent, for the report's fairness statement: trials run, budget, sampler, seed."""
    return {"trials": len(study.trials), "trial_budget": cfg.trials, "sampler": cfg.sampler, "seed": cfg.seed}


class Experiments:
    """The stages; each returns a JSON-able dict cached in ``stages/<name>.json``."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg, self.wd = cfg, Path(cfg.workdir)
        self.base = assets_dir() / "base"

    def stage(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """``stages/<name>.json``, or ``fn()`` with its ``stage_seconds`` written there (one process at a time)."""
        return read_or_make_json(self.wd / "stages" / f"{name}.json", lambda: self._run_stage(name, fn),
                                 waiting=lambda who: print(f"[experiments] {name}: run by {who}; waiting", flush=True))

    @staticmethod
    def _run_stage(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        print(f"[experiments] {name} ...", flush=True)
        t0 = time.perf_counter()
        out = fn()
        out["stage_seconds"] = round(time.perf_counter() - t0, 2)
        print(f"[experiments] {name}: {out['stage_seconds']:.1f} s", flush=True)
        return out

    def search_config(self, name: str, trials: int, **kw: Any) -> SearchConfig:
        c = self.cfg
        return SearchConfig(**{"trials": trials, "seed": c.seed, "workdir": self.wd / "search" / name,
                               "study_name": name, "search_limit": c.search_limit,
                               "rescore_limit": c.rescore_limit, "top_k": c.top_k, **kw})

    @cached_property
    def dev(self) -> Any:
        return load_eval_suite(self.cfg.eval_corpora, "dev")

    @cached_property
    def objective(self) -> Any:
        return parse_objective(self.cfg.objective, list(self.dev.texts), qa_names=list(self.dev.qa))

    @cached_property
    def pool(self) -> Any:
        from optimer_lib.merging.pool import open_pool

        return open_pool(self.base, [self.wd / "vectors" / f"{n}.safetensors" for n in self.cfg.corpora])

    def per_eval(self, config: SearchConfig, rescore: bool = False) -> int:
        scorer = TrialScorer(self.pool.merger, self.pool.tokenizer, self.dev, [self.objective], seq_len=config.seq_len,
                             record_metrics=config.record_metrics)
        return scorer.eval_tokens(config.rescore_limit if rescore else config.search_limit)

    # -- stages ---------------------------------------------------------------------------------------------
    def pool_stage(self) -> dict[str, Any]:
        c, runs, costs = self.cfg, {}, []
        for i, name in enumerate(c.corpora):
            out = self.wd / "cpt" / name
            if not (out / "training.json").exists():
                train_cpt(self.base, name, out, TrainConfig(tokens=c.cpt_tokens, lr=c.cpt_lr, seed=c.seed,
                                                            trajectory=c.trajectory if i == 0 else 0))
            info = json.loads((out / "training.json").read_text())
            vec = extract_vector(self.base, out, name=name, source=str(out), tokens_trained=info["tokens_trained"])
            save_vector(vec, self.wd / "vectors" / f"{name}.safetensors", overwrite=True)
            runs[name] = {"dir": str(out), "tokens_trained": info["tokens_trained"], "seconds": info["seconds"],
                          "final_loss": info["final_loss"]}
            costs.append(asdict(CostEntry("pool", kind="train", tokens_trained=info["tokens_trained"],
                                          seconds=info["seconds"], label=f"CPT {name}")))
        return {"runs": runs, "costs": costs}

    def optimer_stage(self) -> dict[str, Any]:
        pool, c = self.pool, self.cfg
        cfg = self.search_config("optimer", c.trials)
        res = run_search(pool.merger, pool.tokenizer, self.dev, self.objective, replace(cfg, top_k=0), progress=False)
        t0 = time.perf_counter()  # the two-fidelity re-scoring, run (and timed) on its own
        res = run_search(pool.merger, pool.tokenizer, self.dev, self.objective, cfg, progress=False)
        costs = ledger_from_study(res.study, "optimer", tokens_evaluated=self.per_eval(cfg))
        costs.append(CostEntry("optimer", kind="rescore", seconds=time.perf_counter() - t0,
                               tokens_evaluated=c.top_k * self.per_eval(cfg, rescore=True)))
        # The base (α = 0) at search fidelity: OptiMer's gain over it sets finding 4's tolerance.
        scorer = TrialScorer(pool.merger, pool.tokenizer, self.dev, [self.objective], seq_len=cfg.seq_len)
        base_value, _ = scorer.score(dict.fromkeys(pool.names, 0.0), cfg.search_limit)
        pool.merger.set_weights(res.best_weights)
        return {"weights": res.best_weights, "objective": res.value_search, "objective_rescored": res.best_value,
                "base_objective": base_value, "values": _values(res.study),
                "choice": {"method": "optimer", "weights": res.best_weights},
                **_budget(res.study, cfg), "costs": [asdict(e) for e in costs]}

    def baseline_stage(self, name: str) -> dict[str, Any]:
        from optimer_lib.experiments.costs import CostLedger

        ledger = CostLedger()
        cfg = self.search_config("baselines", self.cfg.trials, workdir=self.wd / "search")  # OptiMer's budget
        out = bl.search_baseline(self.pool.merger, self.pool.tokenizer, self.dev, self.objective, name, cfg,
                                 ledger=ledger)
        searched = out["trials"] > 1 or bool(bl.BASELINES[name].get("search_params")) or \
            bl.BASELINES[name]["weights"] in ("search", "shared")
        return {**out, "sampler": cfg.sampler if searched else None, "seed": cfg.seed if searched else None,
                "trial_budget": cfg.trials if searched else 1, "costs": ledger.to_json()}

    @cached_property
    def pool_it(self) -> Any:
        """The pool with the instruction vector (instruct − base) at ``instruction_weight``: the paper's recipe."""
        from optimer_lib.merging.pool import open_pool

        path = self.wd / "vectors" / "instruct.safetensors"
        if not path.exists():
            src = assets_dir() / "instruct"
            save_vector(extract_vector(self.base, src, name="instruct", source=str(src)), path, overwrite=True)
        pool = open_pool(self.base, [self.wd / "vectors" / f"{n}.safetensors" for n in self.cfg.corpora],
                         instruction=path)
        pool.merger.instruction_weight = self.cfg.instruction_weight
        return pool

    def instruction_stage(self) -> dict[str, Any]:
        """α searched with the instruction vector merged at a fixed weight (same sampler, seed, budget, objective)."""
        c, pool = self.cfg, self.pool_it
        cfg = self.search_config("optimer-it", c.trials)
        res = run_search(pool.merger, pool.tokenizer, self.dev, self.objective, cfg, progress=False)
        costs = ledger_from_study(res.study, "optimer-it", tokens_evaluated=self.per_eval(cfg))
        if cfg.top_k > 0:
            costs.append(rescore_entry(res.study, "optimer-it", cfg.top_k * self.per_eval(cfg, rescore=True)))
        return {"weights": res.best_weights, "instruction_weight": c.instruction_weight,
                "objective": res.value_search, "objective_rescored": res.best_value, "values": _values(res.study),
                **_budget(res.study, cfg), "costs": [asdict(e) for e in costs]}

    def granularity_stage(self) -> dict[str, Any]:
        """One α per vector against one per (vector, layer group), both with the ``grad`` sampler at OptiMer's trial
        budget, seed and re-scoring; the dev-chosen bests scored per document on dev and test (granularity.py)."""
        from optimer_lib.experiments.granularity import run_granularity

        c = self.cfg
        cfgs = {g: self.search_config(f"granularity-{g.replace(':', '-')}", c.trials, sampler="grad", granularity=g)
                for g in ("vector", f"layer-groups:{c.granularity_groups}")}
        return run_granularity(self.pool.merger, self.pool.tokenizer, self.dev, load_eval_suite(c.eval_corpora, "test"),
                               self.objective, cfgs, limit=c.final_limit)

    def mixture_stage(self, mode: str) -> dict[str, Any]:
        c = self.cfg
        per, budget = bl.mixture_budget(mode, c.cpt_tokens, len(c.corpora), c.mixture_candidates[mode])
        mcfg = bl.MixtureSearchConfig(tokens_per_candidate=per, budget_tokens=budget, seed=c.seed,
                                      train=TrainConfig(lr=c.cpt_lr, seed=c.seed),
                                      max_trials=c.mixture_candidates[mode], search_limit=c.search_limit,
                                      workdir=self.wd / f"mixture-{mode}")
        res = bl.run_mixture_search(self.base, list(c.corpora), self.dev, self.objective, mcfg)
        return {"mode": mode, "tokens_per_candidate": per, "budget_tokens": budget, "best_ratios": res.best_ratios,
                "objective": res.best_value, "best_dir": str(res.best_dir), "values": _values(res.study),
                "ratios": [t.user_attrs.get("ratios") for t in res.study.trials], "tokens_trained": res.tokens_trained,
                "uniform": self.uniform_mixture(res.study, mcfg),
                "costs": [asdict(e) for e in res.cost_entries(f"mixture-{mode}")]}

    def uniform_mixture(self, study: optuna.Study, mcfg: bl.MixtureSearchConfig) -> dict[str, Any]:
        """The uniform-ratio mixture of a mixture search (finding 5's yardstick, a row of the final table): its first
        candidate. When that candidate did not complete (a run killed while training it, then resumed: the study goes
        on with searched candidates within its budget), the same uniform mixture is trained apart, outside the
        search (it cannot become the search's best), and scored on dev like a candidate."""
        first = study.trials[0]
        if first.state == optuna.trial.TrialState.COMPLETE:
            return {"dir": str(mcfg.workdir / "cand-000"), "objective": first.value}
        from optimer_lib.checkpoints.models import load_model, load_tokenizer

        out = mcfg.workdir / "uniform"
        if not (out / "training.json").exists():
            bl.train_mixture(self.base, dict.fromkeys(self.cfg.corpora, 1.0 / len(self.cfg.corpora)), out,
                             replace(mcfg.train, tokens=mcfg.tokens_per_candidate))
        value, _ = self.objective.evaluate(load_model(out, dtype="float32", device="cpu"), load_tokenizer(out),
                                           self.dev, limit=mcfg.search_limit, seq_len=mcfg.train.seq_len)
        return {"dir": str(out), "objective": value, "trained_apart": True}

    def ratio_stage(self, optimer: dict[str, Any], pool: dict[str, Any]) -> dict[str, Any]:
        c = self.cfg
        tokens = {n: pool["runs"][n]["tokens_trained"] for n in c.corpora}
        conv = an.ratio_conversions(optimer["weights"], tokens)
        total = sum(tokens.values())  # equal total tokens: comparable with the uniform candidate of mode (a)
        retrained: dict[str, Any] = {}
        for kind in ("normalised", "token_weighted"):
            ratios = conv[kind]
            same = [k for k, v in retrained.items() if all(abs(v["ratios"][n] - ratios[n]) < 1e-9 for n in ratios)]
            if same:
                retrained[kind] = {**retrained[same[0]], "same_as": same[0]}
                continue
            out = self.wd / "ratios" / kind
            if not (out / "training.json").exists():
                bl.train_mixture(self.base, ratios, out, TrainConfig(tokens=total, lr=c.cpt_lr, seed=c.seed))
            info = json.loads((out / "training.json").read_text())
            retrained[kind] = {"dir": str(out), "ratios": ratios, "tokens_trained": info["tokens_trained"],
                               "seconds": info["seconds"]}
        return {"conversions": conv, "retrained": retrained}

    def landscape_stage(self, optimer: dict[str, Any]) -> dict[str, Any]:
        w = optimer["weights"]
        x, y = sorted(w, key=lambda n: -w[n])[:2]
        return an.landscape_grid(self.pool.merger, self.pool.tokenizer, self.dev, self.objective, x, y, fixed=w,
                                 points=self.cfg.landscape_points, limit=self.cfg.search_limit,
                                 within=self.cfg.within)

    def grid_stage(self, optimer: dict[str, Any]) -> dict[str, Any]:
        res = run_search(self.pool.merger, self.pool.tokenizer, self.dev, self.objective,
                         self.search_config("grid", self.cfg.grid_trials, sampler="grid", top_k=0), progress=False)
        grid = _values(res.study)
        n = len(grid)
        return {"values": {"grid": grid, "tpe": optimer["values"][:n]},
                **an.compare_searches({"grid": grid, "tpe": optimer["values"][:n]}, within=self.cfg.within)}

    def reopt_stage(self) -> dict[str, Any]:
        objs = {k: parse_objective(k, list(self.dev.texts), qa_names=list(self.dev.qa))
                for k in self.cfg.reopt_objectives}
        cfg = self.search_config("reopt", self.cfg.reopt_trials)
        return {"results": an.reoptimise(self.pool.merger, self.pool.tokenizer, self.dev, objs, cfg,
                                         limit=self.cfg.search_limit)}

    def final_stage(self, s: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Dev and test metrics (first ``final_limit`` items) of every method's final candidate."""
        from optimer_lib.checkpoints.models import load_model

        c, pool = self.cfg, self.pool
        test = load_eval_suite(c.eval_corpora, "test")
        names = list(c.corpora)
        objs = {k: parse_objective(k, list(self.dev.texts), qa_names=list(self.dev.qa))
                for k in dict.fromkeys((c.objective, *c.reopt_objectives))}
        merges: dict[str, Any] = {"base": {"weights": dict.fromkeys(names, 0.0)}}
        merges.update({f"CPT {n} alone": {"weights": {m: float(m == n) for m in names}} for n in names})
        merges.update({f"baseline: {b}": s[f"baseline-{b}"]["choice"] for b in MERGE_BASELINES})
        merges["OptiMer"] = s["optimer"]["choice"]
        merges.update({f"OptiMer re-optimised for {k}": {"weights": v["weights"]}
                       for k, v in s["reopt"]["results"].items()})
        models = {f"data mixture ({m}) best": s[f"mixture-{m}"]["best_dir"] for m in c.mixture_candidates}
        models.update({f"data mixture ({m}) uniform ratios": s[f"mixture-{m}"]["uniform"]["dir"]
                       for m in c.mixture_candidates})
        models.update({f"α-ratio mixture ({k})": v["dir"] for k, v in s["ratios"]["retrained"].items()
                       if "same_as" not in v})
        rows: dict[str, Any] = {}
        tokens: dict[str, list[int]] = {}

        def score(row: str, model: Any, extra: dict[str, Any], chat: bool = False) -> None:
            r = dict(extra)
            m = evaluate_suite(model, pool.tokenizer, self.dev, limit=c.final_limit)  # dev: what selection reads
            r["dev"], r["dev_objectives"] = m, {k: o(m) for k, o in objs.items()}
            docs = ds.score_documents(model, pool.tokenizer, test, limit=c.final_limit, chat_qa=chat)
            tokens.update(docs.pop("tokens"))  # the same for every model: stored once
            m = ds.metrics_of(docs, tokens)
            r["test"], r["test_objectives"], r["test_docs"] = m, {k: o(m) for k, o in objs.items()}, docs
            rows[row] = r

        chat_rows = {"base", "OptiMer"}
        for row, choice in merges.items():
            bl.apply_choice(pool.merger, {"method": "optimer", **choice})
            score(row, pool.model, {"kind": "merge", "choice": choice}, chat=row in chat_rows)
        bl.apply_choice(pool.merger, {"method": "optimer", "weights": dict.fromkeys(names, 0.0)})
        if "instruction" in s:  # the paper's recipe: + w_IT τ_IT, scored like the rest plus chat-template QA
            it = self.pool_it
            w_it = s["instruction"]["instruction_weight"]
            for row, w in {"instruct (base + τ_IT)": dict.fromkeys(names, 0.0),
                           "OptiMer α + τ_IT (α searched without it)": s["optimer"]["weights"],
                           "OptiMer + τ_IT (α searched with it)": s["instruction"]["weights"]}.items():
                it.merger.set_weights(w, instruction_weight=w_it)
                score(row, it.model, {"kind": "merge", "choice": {"weights": w}, "instruction_weight": w_it},
                      chat=True)
        for row, d in models.items():
            if Path(d).exists():
                score(row, load_model(d), {"kind": "mixture", "dir": d})
        return {"objective": c.objective, "terms": {k: o.terms for k, o in objs.items()}, "limit": c.final_limit,
                "doc_tokens": tokens, "rows": rows}

    # -- driver ---------------------------------------------------------------------------------------------
    def run_main(self) -> dict[str, dict[str, Any]]:
        s: dict[str, dict[str, Any]] = {}
        s["pool"] = self.stage("pool", self.pool_stage)
        s["optimer"] = self.stage("optimer", self.optimer_stage)
        for b in MERGE_BASELINES:
            s[f"baseline-{b}"] = self.stage(f"baseline-{b}", lambda b=b: self.baseline_stage(b))
        for m in self.cfg.mixture_candidates:
            s[f"mixture-{m}"] = self.stage(f"mixture-{m}", lambda m=m: self.mixture_stage(m))
        s["cosine"] = self.stage("cosine", lambda: an.pairwise_cosine(self.pool.vectors))
        s["linearity"] = self.stage("linearity", self.linearity_stage)
        s["landscape"] = self.stage("landscape", lambda: self.landscape_stage(s["optimer"]))
        s["grid"] = self.stage("grid", lambda: self.grid_stage(s["optimer"]))
        s["ratios"] = self.stage("ratios", lambda: self.ratio_stage(s["optimer"], s["pool"]))
        s["reopt"] = self.stage("reopt", self.reopt_stage)
        if self.cfg.instruction_weight:
            s["instruction"] = self.stage("instruction", self.instruction_stage)
        s["final"] = self.stage("final", lambda: self.final_stage(s))
        if self.cfg.granularity_groups:  # beyond the paper (issue 19); after final: a rerun adds it to older seeds
            s["granularity"] = self.stage("granularity", self.granularity_stage)
        return s

    def linearity_stage(self) -> dict[str, Any]:
        first = self.cfg.corpora[0]
        steps = an.trajectory_checkpoints(self.wd / "cpt" / first)
        vec = load_vector(self.wd / "vectors" / f"{first}.safetensors")
        rows = an.linearity(self.base, [p for _, p in steps], vec, fractions=[f for f, _ in steps])
        return {"run": first, "rows": rows}


def seed_config(cfg: ExperimentConfig, seed: int) -> ExperimentConfig:
    """The config of one seed: its own directory ``<workdir>/seed-<seed>``, CPT and sampler seed ``seed``."""
    return replace(cfg, workdir=Path(cfg.workdir) / f"seed-{seed}", seed=seed, seeds=(seed,))


def _config_json(cfg: ExperimentConfig) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
            for k, v in asdict(cfg).items()}


def run_experiments(cfg: ExperimentConfig, *, regime_map: bool = False,
                    findings: Path | None = None) -> dict[str, Any]:
    """Run (or resume) the main set, or with ``regime_map`` the regime map, for every seed; then write each
    seed's report, the findings across seeds (``<workdir>/FINDINGS.md``) and, where asked, copies to
    ``cfg.results`` (the small JSONs) and ``findings`` (FINDINGS.md). Returns the last seed's report summary
    with ``findings_summary`` (across seeds) added."""
    from optimer_lib.experiments.findings_data import copy_results
    from optimer_lib.experiments.findings_report import write_findings
    from optimer_lib.experiments.regime import run_regime_map
    from optimer_lib.experiments.report import write_all

    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"seeds {list(cfg.seeds)}: give at least one seed, none repeated (e.g. --seeds 0,1,2)")
    wd = Path(cfg.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    old = json.loads((wd / "config.json").read_text()) if (wd / "config.json").is_file() else {}
    seeds = list(dict.fromkeys([*old.get("seeds", []), *cfg.seeds]))  # seeds may grow across runs
    _write_json(wd / "config.json", {**_config_json(cfg), "seeds": seeds})
    t0 = time.perf_counter()
    summary: dict[str, Any] = {}
    for seed in cfg.seeds:
        scfg = seed_config(cfg, seed)
        Path(scfg.workdir).mkdir(parents=True, exist_ok=True)
        _write_json(Path(scfg.workdir) / "config.json", _config_json(scfg))
        exp = Experiments(scfg)
        if regime_map:
            run_regime_map(exp)
        else:
            exp.run_main()
        summary = write_all(scfg.workdir)
    print(f"[experiments] done in {time.perf_counter() - t0:.0f} s", flush=True)
    if cfg.results is not None:
        copy_results(wd, Path(cfg.results))
    summary["findings_summary"] = write_findings(wd, wd / "FINDINGS.md",
                                                 *([Path(findings)] if findings else []))
    _write_json(wd / "findings.json", summary["findings_summary"])  # every interval, verdict and cost, as JSON
    if summary["findings_summary"].get("regime"):  # R against the token ratio: the workdir and the results copy
        from optimer_lib.experiments.regime_report import write_plot

        write_plot(summary["findings_summary"]["regime"], wd / "regime-map.svg",
                   *([Path(cfg.results) / "regime-map.svg"] if cfg.results is not None else []))
    return summary
