"""The regime map: where does merging start to win? R against the CPT/base token ratio, per CPT learning rate.

    optimer experiments --workdir runs/experiments --regime-map --seeds 0,1,2 --results results/experiments

    from optimer_lib.experiments.regime import RegimeConfig, run_regime_map
    RegimeConfig().plan()                                   # token counts of every base, checked before any work
    run_regime_map(Experiments(seed_config(cfg, 0)))        # cells cached as regime-r<ratio>-lr<lr> stages

The paper continues bases pretrained on trillions of tokens with ~1B tokens per dataset (a ratio near 1e-4); our
main set uses 13% per run. Here the ratio (tokens of one CPT run / tokens the base was pretrained on) is swept
over two orders of magnitude by pretraining the base longer while every CPT run keeps the same tokens. The bases
are checkpoints of ONE pretraining run per size at a constant learning rate after warm-up (the stable phase of a
warmup-stable-decay schedule, so a checkpoint at T tokens is the run a shorter budget would have been), each
followed by its own short decay branch (``decay`` of its tokens, cosine to 10% of the lr) so every base is annealed
as a released model is; ``decay=0`` uses the stable checkpoints themselves. One size only: 2 cores cannot pretrain a
second size at the same tokens per parameter. The bases are trained once (pretraining seed ``base_seed``) in
``<workdir>/regime-bases/`` beside the seed folders and shared by every seed; a seed is the CPT data order and
initialisation of the CPT runs and the search sampler's seed.

One cell (ratio, lr) per seed: K CPT runs from that base → distribution vectors; a TPE search on dev with the main
set's objective, trial scorer and two-fidelity re-scoring; a data mixture of the same corpora at equal total tokens
(uniform ratios); the share of the mixture's shift θ_mix − θ_base outside span{τ_i} (:func:`span_residual`); and
base, OptiMer and mixture scored per test document, so the findings can bootstrap
R = (base − OptiMer) / (base − mixture) over documents and seeds (:mod:`optimer_lib.experiments.regime_report`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimer_lib.checkpoints.vectors import extract_vector, save_vector
from optimer_lib.data import load_eval_suite
from optimer_lib.errors import ConfigError
from optimer_lib.experiments import analysis as an
from optimer_lib.experiments import baselines as bl
from optimer_lib.experiments import docscores as ds
from optimer_lib.experiments import regime_report as rr
from optimer_lib.fileio import atomic_write_json
from optimer_lib.search.study import run_search
from optimer_lib.training.train import TrainConfig, train_cpt

if TYPE_CHECKING:
    from optimer_lib.experiments.run import Experiments

SEQ_LEN = 128


@dataclass
class RegimeConfig:
    """The regime map's sizes (``ExperimentConfig.regime``); :meth:`plan` turns them into token counts."""

    size: dict[str, int] = field(default_factory=lambda: {"hidden": 64, "layers": 2, "heads": 2, "intermediate": 176})
    recipe: dict[str, float] = field(default_factory=lambda: {"en": 0.7, "ja": 0.075, "zh": 0.075, "math": 0.075,
                                                              "code": 0.075})  # the embedded base's mix
    ratios: tuple[float, ...] = (0.3, 0.03, 0.003)   # CPT tokens per run / base pretraining tokens
    lrs: tuple[float, ...] = (3e-4, 1e-3)            # CPT learning rates
    cpt_tokens: int = 51_200                         # per CPT run (>= 50k); the mixture trains K times this
    cpt_batch: int = 8                               # sequences per CPT step (50 steps per run)
    base_lr: float = 3e-3
    base_batch: int = 16
    base_seed: int = 0
    warmup_tokens: int = 65_536                      # must end before the first base's stable checkpoint
    decay: float = 0.1                               # share of each base's tokens in its decay branch (0: none)
    trials: int = 30
    real_cells: tuple[str, ...] = ("results/smollm2-64k", "results/smollm2")  # real-base cells for the plot

    @classmethod
    def quick(cls) -> RegimeConfig:
        """A smoke version (a few minutes): a 0.27M-parameter model, two ratios a decade apart (bases of 8k and 82k
        tokens), one lr, 4-trial searches, no real cells."""
        return cls(size={"hidden": 32, "layers": 1, "heads": 2, "intermediate": 64}, ratios=(0.5, 0.05),
                   lrs=(1e-3,), cpt_tokens=4096, cpt_batch=4, warmup_tokens=4096, trials=4, real_cells=())

    def plan(self) -> dict[str, Any]:
        """Token counts, whole steps: ``cpt_tokens`` per run, per ratio (largest first) the base's ``tokens`` =
        ``stable_tokens`` + ``decay_tokens`` and its ``actual_ratio``; the pretraining run's ``stable_tokens``.
        Every problem is reported at once (ConfigError)."""
        cpt_step, base_step = self.cpt_batch * SEQ_LEN, self.base_batch * SEQ_LEN
        cpt = self.cpt_tokens // cpt_step * cpt_step
        problems = []
        if cpt < 1:
            problems.append(f"regime cpt_tokens {self.cpt_tokens} is less than one CPT batch ({cpt_step} tokens)")
        if not self.ratios or len(set(self.ratios)) != len(self.ratios) or not all(0 < r <= 1 for r in self.ratios):
            problems.append(f"regime ratios {list(self.ratios)}: give distinct ratios in (0, 1]")
        if not 0 <= self.decay < 1:
            problems.append(f"regime decay {self.decay}: give a share in [0, 1)")
        if not self.lrs:
            problems.append("regime lrs: give at least one CPT learning rate")
        bases = []
        for r in sorted(set(self.ratios), reverse=True):
            steps = max(1, round(max(cpt, 1) / r / base_step)) if r > 0 else 1
            decay = max(1, round(self.decay * steps)) if self.decay > 0 else 0
            if steps - decay < 1 or (steps - decay) * base_step <= self.warmup_tokens:
                problems.append(f"regime ratio {r:g}: its base ({steps * base_step:,} tokens) ends its stable phase "
                                f"before the warm-up ({self.warmup_tokens:,} tokens) does: lower warmup_tokens")
            bases.append({"ratio": r, "tokens": steps * base_step, "stable_tokens": (steps - decay) * base_step,
                          "decay_tokens": decay * base_step, "actual_ratio": cpt / (steps * base_step)})
        if problems:
            raise ConfigError("; ".join(problems))
        return {"cpt_tokens": cpt, "bases": bases, "stable_tokens": max(b["stable_tokens"] for b in bases),
                "warmup_tokens": self.warmup_tokens}


def estimate_seconds(rc: RegimeConfig, corpora: int, seeds: int, *, train_tokens_per_s: float, trial_s: float,
                     rescore_s: float, test_s: float, top_k: int = 3) -> dict[str, float]:
    """Wall time of the whole map from measured rates: pretraining (stable run + decay branches, once) and per
    cell and seed K CPT runs + the mixture (2K runs' tokens), ``trials`` search trials, ``top_k`` re-scores and three
    test-scored models (base, OptiMer, mixture)."""
    p = rc.plan()
    pretrain = (p["stable_tokens"] + sum(b["decay_tokens"] for b in p["bases"])) / train_tokens_per_s
    cell = 2 * corpora * p["cpt_tokens"] / train_tokens_per_s + rc.trials * trial_s + top_k * rescore_s + 3 * test_s
    cells = len(p["bases"]) * len(rc.lrs) * seeds
    return {"pretrain": pretrain, "cell": cell, "cells": cells, "total": pretrain + cells * cell}


def cell_name(ratio: float, lr: float) -> str:
    return f"regime-r{ratio:g}-lr{lr:g}"


def _bases_root(exp: Experiments) -> Path:
    """Beside the seed folders (``<workdir>/seed-<s>``): one set of bases for every seed."""
    rc = exp.cfg.regime
    return exp.wd.parent / "regime-bases" / "h{hidden}-l{layers}-i{intermediate}".format(**rc.size)


def regime_bases(exp: Experiments) -> dict[float, Path]:
    """Pretrain (cached) the stable run and every decay branch; ``{ratio: base dir}``."""
    from optimer_lib.assets.build import BuildConfig, new_base_model
    from optimer_lib.checkpoints.models import load_model, load_tokenizer
    from optimer_lib.data import load_corpus, pack_tokens
    from optimer_lib.training.train import train_model

    rc, plan = exp.cfg.regime, exp.cfg.regime.plan()
    root, step = _bases_root(exp), rc.base_batch * SEQ_LEN
    stable, total = root / f"stable-{plan['stable_tokens']}", plan["stable_tokens"]
    tok = load_tokenizer(exp.base)
    packed: dict[str, Any] = {}

    def blocks() -> dict[str, Any]:  # tokenised only when something is trained (every cell calls this function)
        if not packed:
            packed.update({n: pack_tokens(load_corpus(n, "base"), tok, SEQ_LEN) for n in rc.recipe})
        return packed

    if (stable / "training.json").exists():
        old = json.loads((stable / "training.json").read_text())
        if (old["ratios"], old["config"]["lr"], old["config"]["seed"]) != (rc.recipe, rc.base_lr, rc.base_seed):
            raise ConfigError(f"{stable} was pretrained with another recipe, lr or seed: delete it or use another "
                              "--workdir")
    else:
        model = new_base_model(tok, BuildConfig(seed=rc.base_seed, **rc.size))
        cfg = TrainConfig(tokens=total, lr=rc.base_lr, batch_size=rc.base_batch, seq_len=SEQ_LEN,
                          warmup=(rc.warmup_tokens / step + 0.5) / (total // step), schedule="constant",
                          seed=rc.base_seed, device="cpu", checkpoint_every=500,
                          save_at=tuple(b["stable_tokens"] for b in plan["bases"] if b["stable_tokens"] < total))
        train_model(model, tok, blocks(), rc.recipe, stable, cfg, meta={"stage": "regime stable run", **rc.size},
                    progress=False)
    out = {}
    for b in plan["bases"]:
        ck = stable if b["stable_tokens"] == total else stable / "trajectory" / f"step-{b['stable_tokens'] // step:06d}"
        if not b["decay_tokens"]:
            out[b["ratio"]] = ck
            continue
        d = root / f"base-{b['tokens']}"
        if not (d / "training.json").exists():
            cfg = TrainConfig(tokens=b["decay_tokens"], lr=rc.base_lr, batch_size=rc.base_batch, seq_len=SEQ_LEN,
                              warmup=0.1, schedule="cosine", seed=rc.base_seed + 1, device="cpu", checkpoint_every=0)
            train_model(load_model(ck, dtype="float32", device="cpu"), tok, blocks(), rc.recipe, d, cfg,
                        meta={"stage": "regime decay branch", "from": str(ck), **b}, progress=False)
        out[b["ratio"]] = d
    return out


def bases_stage(exp: Experiments) -> dict[str, Any]:
    """What the shared bases are: plan, parameters, epochs over the base split, loss, time and tokens/s."""
    from optimer_lib.checkpoints.models import load_model, load_tokenizer
    from optimer_lib.data import load_corpus, pack_tokens

    rc, plan = exp.cfg.regime, exp.cfg.regime.plan()
    dirs = regime_bases(exp)
    stable = json.loads((_bases_root(exp) / f"stable-{plan['stable_tokens']}" / "training.json").read_text())
    tok = load_tokenizer(exp.base)
    sizes = {n: pack_tokens(load_corpus(n, "base"), tok, SEQ_LEN).numel() for n in rc.recipe}
    rows = []
    for b in plan["bases"]:
        info = json.loads((dirs[b["ratio"]] / "training.json").read_text()) if b["decay_tokens"] else {}
        rows.append({**b, "dir": str(dirs[b["ratio"]]), "decay_seconds": info.get("seconds", 0.0),
                     "final_loss": info.get("final_loss", stable["final_loss"]),
                     "epochs": {n: round(b["tokens"] * w / sizes[n], 2) for n, w in rc.recipe.items()}})
    params = sum(p.numel() for p in load_model(dirs[plan["bases"][0]["ratio"]]).parameters())
    return {"kind": "regime bases", "shared_across_seeds": True, "base_seed": rc.base_seed, "size": rc.size,
            "parameters": params, "recipe": rc.recipe, "plan": plan, "bases": rows,
            "stable": {"tokens": stable["tokens_trained"], "seconds": stable["seconds"],
                       "tokens_per_second": round(stable["tokens_trained"] / max(stable["seconds"], 1e-9), 1),
                       "final_loss": stable["final_loss"]}}


def regime_cell(exp: Experiments, ratio: float, lr: float) -> dict[str, Any]:
    """One cell for this seed: vectors, OptiMer on dev, the equal-token mixture, the span residual, test docs."""
    from optimer_lib.checkpoints.models import load_model
    from optimer_lib.merging.pool import open_pool

    c, rc = exp.cfg, exp.cfg.regime
    plan = rc.plan()
    b = next(x for x in plan["bases"] if x["ratio"] == ratio)
    base, wd, k = regime_bases(exp)[ratio], exp.wd / "regime" / f"r{ratio:g}-lr{lr:g}", len(c.corpora)

    def tcfg(tokens: int) -> TrainConfig:
        return TrainConfig(tokens=tokens, lr=lr, batch_size=rc.cpt_batch, seq_len=SEQ_LEN, seed=c.seed, device="cpu")

    paths = []
    for n in c.corpora:
        out, vp = wd / "cpt" / n, wd / "vectors" / f"{n}.safetensors"
        if not (out / "training.json").exists():
            train_cpt(base, n, out, tcfg(plan["cpt_tokens"]), progress=False)
        if not vp.exists():
            save_vector(extract_vector(base, out, name=n, source=str(out)), vp)
        paths.append(vp)
    pool = open_pool(base, paths)
    res = run_search(pool.merger, pool.tokenizer, exp.dev, exp.objective,
                     exp.search_config("regime", rc.trials, workdir=wd / "search"), progress=False)
    mix = wd / "mixture"
    if not (mix / "training.json").exists():
        bl.train_mixture(base, dict.fromkeys(c.corpora, 1.0), mix, tcfg(plan["cpt_tokens"] * k), progress=False)
    residual = an.span_residual(base, mix, pool.vectors)
    test, tokens, rows = load_eval_suite(c.eval_corpora, "test"), {}, {}

    def score(row: str, model: Any) -> None:
        docs = ds.score_documents(model, pool.tokenizer, test, limit=c.final_limit)
        tokens.update(docs.pop("tokens"))  # the same for every model: stored once
        m = ds.metrics_of(docs, tokens)
        rows[row] = {"test": m, "test_objective": exp.objective(m), "test_docs": docs}

    for row, w in {rr.BASE: dict.fromkeys(c.corpora, 0.0), rr.OPTIMER: res.best_weights}.items():
        pool.merger.set_weights(w)
        score(row, pool.model)
    score(rr.MIXTURE, load_model(mix))
    t = {r: v["test_objective"] for r, v in rows.items()}
    gain = t[rr.BASE] - t[rr.MIXTURE]
    return {"kind": "regime cell", "ratio": ratio, "actual_ratio": b["actual_ratio"], "base_tokens": b["tokens"],
            "cpt_tokens": plan["cpt_tokens"], "lr": lr, "seed": c.seed, "corpora": list(c.corpora),
            "parameters": sum(p.numel() for p in pool.model.parameters()), "objective": c.objective,
            "terms": {c.objective: exp.objective.terms}, "limit": c.final_limit, "doc_tokens": tokens, "rows": rows,
            "weights": res.best_weights, "dev_objective": res.best_value, "trials": len(res.study.trials),
            "cosine": an.pairwise_cosine(pool.vectors)["off_diagonal"], "residual": residual,
            "gap": t[rr.OPTIMER] - t[rr.MIXTURE], "mixture_gain": gain,
            "recovery": (t[rr.BASE] - t[rr.OPTIMER]) / gain if gain else None}


def run_regime_map(exp: Experiments) -> None:
    """The shared bases (stage ``regime-bases``), the real-base cells' points (``regime-real-<name>``, re-read every
    run from their results folders), then every (ratio, lr) cell as its own cached stage ``regime-r<ratio>-lr<lr>``."""
    rc = exp.cfg.regime
    rc.plan()  # every sizing problem before any training
    exp.stage("regime-bases", lambda: bases_stage(exp))
    for d in rc.real_cells:
        point = rr.real_cell_point(Path(d))
        if point is not None:
            atomic_write_json(exp.wd / "stages" / f"regime-real-{Path(d).name}.json", point, indent=1)
    for ratio in sorted(rc.ratios, reverse=True):
        for lr in rc.lrs:
            exp.stage(cell_name(ratio, lr), lambda r=ratio, x=lr: regime_cell(exp, r, x))
