"""The regime map: where does merging start to win? Small bases pretrained per (size, recipe), CPT per lr.

    optimer experiments --workdir runs/experiments --regime-map      # every cell, cached as regime-* stages

    from optimer_lib.experiments.regime import regime_setting, run_regime_map
    run_regime_map(Experiments(seed_config(cfg, 0)))

One cell: a base of ``size`` pretrained on ``recipe`` (cached under ``<workdir>/regime/bases``), one CPT run per
corpus at learning rate ``lr``, an OptiMer search on dev and an equal-token data mixture, all scored on test.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimer_lib.checkpoints.vectors import extract_vector, save_vector
from optimer_lib.data import load_eval_suite
from optimer_lib.experiments import analysis as an
from optimer_lib.experiments import baselines as bl
from optimer_lib.scoring.evaluate import evaluate_suite
from optimer_lib.search.study import run_search
from optimer_lib.training.train import TrainConfig, train_cpt

if TYPE_CHECKING:
    from optimer_lib.experiments.run import Experiments


def _regime_base(exp: Experiments, size: str, recipe: str) -> Path:
    """Pretrain (cached) a small base of ``size`` on ``recipe`` with the embedded tokenizer."""
    from optimer_lib.assets.build import BuildConfig, new_base_model
    from optimer_lib.checkpoints.models import load_tokenizer
    from optimer_lib.data import load_corpus, pack_tokens
    from optimer_lib.training.train import train_model

    c, out = exp.cfg, exp.wd / "regime" / "bases" / f"{size}-{recipe}"
    if not (out / "training.json").exists():
        tok = load_tokenizer(exp.base)
        model = new_base_model(tok, BuildConfig(seed=c.seed, **c.regime_sizes[size]))
        mix = c.regime_recipes[recipe]
        blocks = {n: pack_tokens(load_corpus(n, "base"), tok, 128) for n in mix}
        train_model(model, tok, blocks, mix, out, TrainConfig(tokens=c.regime_base_tokens, lr=3e-3, warmup=0.02,
                                                              seed=c.seed, device="cpu", checkpoint_every=500),
                    meta={"stage": "regime base", "size": size, "recipe": recipe})
    return out


def regime_setting(exp: Experiments, size: str, recipe: str, lr: float) -> dict[str, Any]:
    """One cell of the regime map: base, uniform average, OptiMer and the equal-token mixture, on test."""
    from optimer_lib.checkpoints.models import load_model
    from optimer_lib.merging.pool import open_pool

    c = exp.cfg
    base = _regime_base(exp, size, recipe)
    wd = exp.wd / "regime" / f"{size}-{recipe}-lr{lr:g}"
    paths = []
    for n in c.corpora:
        out, vp = wd / "cpt" / n, wd / "vectors" / f"{n}.safetensors"
        if not (out / "training.json").exists():
            train_cpt(base, n, out, TrainConfig(tokens=c.regime_cpt_tokens, lr=lr, seed=c.seed))
        if not vp.exists():
            save_vector(extract_vector(base, out, name=n, source=str(out)), vp)
        paths.append(vp)
    pool = open_pool(base, paths)
    scfg = exp.search_config("regime", c.regime_trials, workdir=wd / "search")
    res = run_search(pool.merger, pool.tokenizer, exp.dev, exp.objective, scfg, progress=False)
    mix = wd / "mixture"
    if not (mix / "training.json").exists():
        bl.train_mixture(base, dict.fromkeys(c.corpora, 1.0), mix,
                         TrainConfig(tokens=c.regime_cpt_tokens * len(c.corpora), lr=lr, seed=c.seed))
    test, k = load_eval_suite(c.eval_corpora, "test"), len(c.corpora)
    rows: dict[str, Any] = {}
    for row, w in {"base": dict.fromkeys(c.corpora, 0.0), "uniform average": dict.fromkeys(c.corpora, 1 / k),
                   "OptiMer": res.best_weights}.items():
        pool.merger.set_weights(w)
        m = evaluate_suite(pool.model, pool.tokenizer, test, limit=c.final_limit)
        rows[row] = {"test": m, "test_objective": exp.objective(m)}
    m = evaluate_suite(load_model(mix), pool.tokenizer, test, limit=c.final_limit)
    rows["data mixture (equal total tokens)"] = {"test": m, "test_objective": exp.objective(m)}
    return {"size": size, "recipe": recipe, "lr": lr, "parameters": sum(p.numel() for p in pool.model.parameters()),
            "rows": rows, "weights": res.best_weights, "cosine": an.pairwise_cosine(pool.vectors)["off_diagonal"],
            "gap": rows["OptiMer"]["test_objective"] - rows["data mixture (equal total tokens)"]["test_objective"]}


def run_regime_map(exp: Experiments) -> None:
    """Every (size, recipe, lr) cell as its own cached stage ``regime-<size>-<recipe>-lr<lr>``."""
    for size in exp.cfg.regime_sizes:
        for recipe in exp.cfg.regime_recipes:
            for lr in exp.cfg.regime_lrs:
                name = f"regime-{size}-{recipe}-lr{lr:g}"
                exp.stage(name, lambda s=size, r=recipe, x=lr: regime_setting(exp, s, r, x))
