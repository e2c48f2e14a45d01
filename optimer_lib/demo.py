"""The whole OptiMer pipeline on the embedded tiny world.

    optimer demo [--workdir runs/demo] [--quick]

1. CPT of the base (``assets/base``) on each of ja, zh, math and code;
2. distribution vectors τ_i = θ_i − θ_base and the instruction vector τ_IT = θ_instruct − θ_base
   (``assets/instruct``);
3. the paper's recipe: a TPE search of α on the dev splits (100 trials, top-3 re-scored on more samples) of
   θ_base + Σ α_i τ_i + w_IT τ_IT, the instruction vector merged at the fixed weight ``instruction_weight``
   (default 1; 0 searches the distribution vectors alone);
4. export of the best merge, τ_IT included (HF checkpoint + model card + mergekit YAML);
5. a results table — base, the instruct model, each CPT model alone, uniform average (+ τ_IT), OptiMer best
   (+ τ_IT) — on dev and test, written to ``results.json`` and ``results.md`` in the workdir.

Every stage is cached in the workdir: re-running skips finished CPT runs and vectors and
continues an interrupted search to its trial count.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from optimer_lib.checkpoints.vectors import extract_vector, save_vector
from optimer_lib.data import assets_dir, load_eval_suite
from optimer_lib.fileio import atomic_write_json, atomic_write_text
from optimer_lib.scoring.evaluate import evaluate_suite
from optimer_lib.scoring.objectives import parse_objective
from optimer_lib.search.study import SearchConfig, run_search
from optimer_lib.training.train import TrainConfig, train_cpt


@dataclass
class DemoConfig:
    """What the demo runs; ``DemoConfig.quick()`` is the few-minute version."""

    workdir: Path = Path("runs/demo")
    corpora: tuple[str, ...] = ("ja", "zh", "math", "code")
    eval_corpora: tuple[str, ...] = ("en", "ja", "zh", "math", "code")
    cpt_tokens: int = 400_000
    cpt_lr: float = 1e-3
    objective: str = "balanced"
    sampler: str = "tpe"
    trials: int = 100
    search_limit: int = 100
    rescore_limit: int = 300
    top_k: int = 3
    table_limit: int = 300
    seed: int = 0
    instruction_weight: float = 1.0   # w_IT of the paper's recipe (0: distribution vectors only)
    timings: dict = field(default_factory=dict)

    @classmethod
    def quick(cls, workdir: Path = Path("runs/quick")) -> DemoConfig:
        return cls(workdir=workdir, cpt_tokens=60_000, trials=20, search_limit=30, rescore_limit=80, top_k=2,
                   table_limit=80)


def _stage(cfg: DemoConfig, name: str, t0: float) -> None:
    cfg.timings[name] = round(time.perf_counter() - t0, 1)
    print(f"[demo] {name}: {cfg.timings[name]:.1f} s", flush=True)


def build_pool(cfg: DemoConfig) -> tuple[list[Path], Path]:
    """CPT runs and vector files (cached): returns (vector paths, instruction vector path)."""
    base = assets_dir() / "base"
    paths = []
    for name in cfg.corpora:
        out = cfg.workdir / "cpt" / name
        if not (out / "training.json").exists():
            train_cpt(base, name, out, TrainConfig(tokens=cfg.cpt_tokens, lr=cfg.cpt_lr, seed=cfg.seed))
        vec_path = cfg.workdir / "vectors" / f"{name}.safetensors"
        if not vec_path.exists():
            vec = extract_vector(base, out, name=name, source=str(out))
            save_vector(vec, vec_path)
        paths.append(vec_path)
    inst_path = cfg.workdir / "vectors" / "instruct.safetensors"
    if not inst_path.exists():
        save_vector(extract_vector(base, assets_dir() / "instruct", name="instruct",
                                   source=str(assets_dir() / "instruct")), inst_path)
    return paths, inst_path


def candidates(names: list[str], best: dict[str, float],
               instruction_weight: float = 0.0) -> dict[str, tuple[dict[str, float], float]]:
    """The rows of the results table as (weights over the pool, instruction weight): base and the CPT models
    as they are; the instruct model, uniform average and OptiMer best with τ_IT at ``instruction_weight``."""
    iw = float(instruction_weight)
    rows = {"base": (dict.fromkeys(names, 0.0), 0.0)}
    if iw:
        rows["instruct (base + τ_IT)"] = (dict.fromkeys(names, 0.0), iw)
    for n in names:
        rows[f"CPT {n} alone"] = ({m: float(m == n) for m in names}, 0.0)
    rows["uniform average"] = (dict.fromkeys(names, 1.0 / len(names)), iw)
    rows["OptiMer best"] = (dict(best), iw)
    return rows


def results_markdown(results: dict) -> str:
    metrics = results["metric_names"]
    iw = results.get("instruction_weight", 0.0)
    lines = [f"# OptiMer demo results\n\nObjective `{results['objective']}` (lower is better), "
             f"first {results['table_limit']} documents per distribution."
             + (f" Rows marked + τ_IT include the instruction vector at weight {iw:g} (the paper's recipe; the "
                "search ran with it)." if iw else "") + "\n"]
    for split in ("dev", "test"):
        lines += [f"## {split}\n", "| model | objective | " + " | ".join(metrics) + " |",
                  "|---|---|" + "---|" * len(metrics)]
        for row, r in results["rows"].items():
            m = r[split]
            label = row + (" + τ_IT" if r.get("instruction_weight") and "τ_IT" not in row else "")
            lines.append(f"| {label} | {r[split + '_objective']:.4f} | "
                         + " | ".join(f"{m[k]:.3f}" for k in metrics) + " |")
        lines.append("")
    w = results["rows"]["OptiMer best"]["weights"]
    lines.append("OptiMer weights: " + ", ".join(f"{k}={v:.3f}" for k, v in w.items()) + "\n")
    lines.append("Timings (s): " + ", ".join(f"{k} {v}" for k, v in results["timings"].items()) + "\n")
    return "\n".join(lines)


def run_demo(cfg: DemoConfig) -> dict:
    """Run (or resume) the demo; returns the results dict also written to ``results.json``."""
    from optimer_lib.merging.export import export_merged
    from optimer_lib.merging.pool import open_pool

    cfg.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    vec_paths, inst_path = build_pool(cfg)
    _stage(cfg, "cpt+vectors", t0)

    iw = float(cfg.instruction_weight)
    pool = open_pool(assets_dir() / "base", vec_paths, instruction=inst_path if iw else None)
    if iw:
        pool.merger.instruction_weight = iw  # every trial merges τ_IT at this fixed weight
    dev = load_eval_suite(cfg.eval_corpora, "dev")
    test = load_eval_suite(cfg.eval_corpora, "test")
    objective = parse_objective(cfg.objective, list(dev.texts), qa_names=list(dev.qa))
    t1 = time.perf_counter()
    result = run_search(pool.merger, pool.tokenizer, dev, objective, SearchConfig(
        trials=cfg.trials, sampler=cfg.sampler, seed=cfg.seed, workdir=cfg.workdir,
        study_name="demo" if not iw else f"demo-it{iw:g}",  # a study per recipe: never resume across them
        search_limit=cfg.search_limit, rescore_limit=cfg.rescore_limit, top_k=cfg.top_k))
    _stage(cfg, "search", t1)

    t2 = time.perf_counter()
    rows = {}
    for row, (weights, row_iw) in candidates(pool.names, result.best_weights, iw).items():
        pool.merger.set_weights(weights, **({"instruction_weight": row_iw} if iw else {}))
        r: dict = {"weights": weights, "instruction_weight": row_iw}
        for split, suite in (("dev", dev), ("test", test)):
            r[split] = evaluate_suite(pool.model, pool.tokenizer, suite, limit=cfg.table_limit)
            r[f"{split}_objective"] = objective(r[split])
        rows[row] = r
    _stage(cfg, "table", t2)

    pool.merger.set_weights(result.best_weights, **({"instruction_weight": iw} if iw else {}))
    export_merged(pool.model, pool.tokenizer, cfg.workdir / "best-model", base_path=str(assets_dir() / "base"),
                  vectors=pool.vectors, weights=result.best_weights, method="optimer",
                  instruction=pool.instruction, instruction_weight=iw if iw else None,
                  scores={f"dev {k}": v for k, v in rows["OptiMer best"]["dev"].items()}, overwrite=True)
    cfg.timings["total"] = round(time.perf_counter() - t0, 1)
    results = {"objective": objective.spec, "table_limit": cfg.table_limit, "rows": rows, "instruction_weight": iw,
               "metric_names": sorted(rows["base"]["dev"]), "best_json": str(result.path),
               "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
               "timings": cfg.timings}
    atomic_write_json(cfg.workdir / "results.json", results)
    md = results_markdown(results)
    atomic_write_text(cfg.workdir / "results.md", md)
    print(md)
    return results
