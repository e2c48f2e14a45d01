"""Warm-started re-optimisation vs a cold start, switching among objectives on the embedded pool.

    .venv/bin/python bench/warm_start.py --quick     # 3 objectives, 12 trials, 1 seed: ~3 min on 2 cores
    .venv/bin/python bench/warm_start.py             # 5 objectives, 40 trials, 3 seeds (long)

The pool is the demo's (``optimer_lib.demo.build_pool``: CPT runs and vectors cached under
``--pool-dir``). A user first searches objective 0 (study ``cold-0``), then switches to objective j =
1, 2, ...; for each switch the script runs
  * cold: a fresh TPE study of N trials for objective j;
  * warm: a study seeded with every trial stored so far (``warm_start_search``: the previous warm
    study, which already holds all earlier trials, values recomputed from stored metrics, no
    evaluation) plus N new evaluations.
It reports, per switch, the evaluations each needed to come within 1% of the best value known for
objective j (the better of both runs' finals), to match the cold run's final best, and the best value
after 0 (seeds only, i.e. ``rerank``), N/4 and N new evaluations. Figures are at search fidelity
(no top-k re-scoring). Results also go to ``<out>/results.json``. This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import optuna
import torch

from optimer_lib.data import assets_dir, load_eval_suite
from optimer_lib.demo import DemoConfig, build_pool
from optimer_lib.experiments.analysis import trials_to_reach
from optimer_lib.merging.pool import open_pool
from optimer_lib.scoring.objectives import parse_objective
from optimer_lib.search.study import SearchConfig, run_search
from optimer_lib.search.warmstart import warm_start_search


def trace(values: list[float], start: float = float("inf")) -> list[float]:
    """Best-so-far after each evaluation (``start``: best before the first one)."""
    out, best = [], start
    for v in values:
        best = min(best, v)
        out.append(best)
    return out


def evals_to(values: list[float], start: float, threshold: float) -> int | None:
    """New evaluations until the best so far is <= threshold (0 if the seeds' ``start`` already is; None if never)."""
    return 0 if start <= threshold else trials_to_reach(values, threshold)


def new_values(study: optuna.Study) -> list[float]:
    done = optuna.trial.TrialState.COMPLETE
    return [t.value for t in study.trials if t.state == done and "seeded_from" not in t.user_attrs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 objectives, 12 trials, 1 seed, 30 samples per set")
    p.add_argument("--objectives", nargs="+", help="presets/specs in switching order")
    p.add_argument("--trials", type=int, help="new evaluations per study")
    p.add_argument("--seeds", type=int, help="repetitions with different sampler seeds")
    p.add_argument("--pool-dir", type=Path, help="where the demo pool is cached (default runs/quick or runs/demo)")
    p.add_argument("--out", type=Path, help="studies and results.json (default runs/bench-warm-start[-quick])")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: shared machines)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    demo = DemoConfig.quick(a.pool_dir or Path("runs/quick")) if a.quick else DemoConfig(
        workdir=a.pool_dir or Path("runs/demo"))
    specs = a.objectives or (["balanced", "ja", "math"] if a.quick else ["balanced", "ja", "zh", "math", "code"])
    n = a.trials or (12 if a.quick else 40)
    seeds = a.seeds or (1 if a.quick else 3)
    out = a.out or Path("runs/bench-warm-start" + ("-quick" if a.quick else ""))
    t0 = time.perf_counter()
    vec_paths, _ = build_pool(demo)
    pool = open_pool(assets_dir() / "base", vec_paths)
    suite = load_eval_suite(demo.eval_corpora, "dev")
    objs = [parse_objective(s, list(suite.texts), qa_names=list(suite.qa)) for s in specs]
    print(f"pool ready in {time.perf_counter() - t0:.0f} s: vectors {pool.names}; objectives {specs}; "
          f"{n} trials per study; {seeds} seed(s); {demo.search_limit} samples per dev set", flush=True)
    rows = []
    for seed in range(seeds):
        wd = out / f"seed{seed}"
        shutil.rmtree(wd, ignore_errors=True)
        base_cfg = SearchConfig(trials=n, workdir=wd, top_k=0, search_limit=demo.search_limit,
                                storage=f"sqlite:///{(wd / 'optuna.db').resolve()}")
        wd.mkdir(parents=True)

        def cfg(study: str, base: SearchConfig = base_cfg, rep: int = seed) -> SearchConfig:
            # One sampler seed per objective (shared by its cold and warm runs): equal seeds across
            # objectives would make every cold study start from the same random points as cold-0.
            return SearchConfig(**{**base.__dict__, "study_name": study, "seed": 1000 * rep + int(study[-1])})

        ts = time.perf_counter()
        run_search(pool.merger, pool.tokenizer, suite, objs[0], cfg("cold-0"), progress=False)
        source = "cold-0"
        print(f"[seed {seed}] cold-0 ({specs[0]}): {time.perf_counter() - ts:.0f} s", flush=True)
        for j in range(1, len(objs)):
            ts = time.perf_counter()
            cold = run_search(pool.merger, pool.tokenizer, suite, objs[j], cfg(f"cold-{j}"), progress=False).study
            t_cold = time.perf_counter() - ts
            ts = time.perf_counter()
            warm = warm_start_search(pool.merger, pool.tokenizer, suite, objs[j], cfg(f"warm-{j}"), source,
                                     extra_trials=n, progress=False).study
            t_warm = time.perf_counter() - ts
            source = f"warm-{j}"
            seeded = [t.value for t in warm.trials if "seeded_from" in t.user_attrs]
            seed_best = min(seeded)
            cold_new, warm_new = new_values(cold), new_values(warm)
            cold_tr, warm_tr = trace(cold_new), trace(warm_new, seed_best)
            best_known = min(cold_tr[-1], warm_tr[-1])
            threshold = best_known + 0.01 * abs(best_known)
            q = max(1, n // 4)
            row = {"seed": seed, "objective": specs[j], "seeded": len(seeded), "best_known": best_known,
                   "cold_to_1pct": evals_to(cold_new, float("inf"), threshold),
                   "warm_to_1pct": evals_to(warm_new, seed_best, threshold),
                   "cold_to_cold_best": evals_to(cold_new, float("inf"), cold_tr[-1]),
                   "warm_to_cold_best": evals_to(warm_new, seed_best, cold_tr[-1]),
                   "warm_after_0": seed_best, f"cold_after_{q}": cold_tr[q - 1], f"warm_after_{q}": warm_tr[q - 1],
                   f"cold_after_{n}": cold_tr[-1], f"warm_after_{n}": warm_tr[-1],
                   "seconds_cold": round(t_cold, 1), "seconds_warm": round(t_warm, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    summarise(rows, n, specs, time.perf_counter() - t0)
    (out / "results.json").write_text(json.dumps({"objectives": specs, "trials": n, "seeds": seeds,
                                                  "search_limit": demo.search_limit, "rows": rows}, indent=2))
    print(f"wrote {out / 'results.json'}")


def summarise(rows: list[dict], n: int, specs: list[str], seconds: float) -> None:
    def fmt(v: int | None) -> str:
        return f">{n}" if v is None else str(v)

    q = max(1, n // 4)
    print(f"\n| switch to | seeded | evals to 1% of best, cold | warm | evals to cold's final best, cold | warm "
          f"| best after 0 warm | after {q}: cold | warm | after {n}: cold | warm |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['objective']} (seed {r['seed']}) | {r['seeded']} | {fmt(r['cold_to_1pct'])} | "
              f"{fmt(r['warm_to_1pct'])} | {fmt(r['cold_to_cold_best'])} | {fmt(r['warm_to_cold_best'])} | "
              f"{r['warm_after_0']:.4f} | {r[f'cold_after_{q}']:.4f} | {r[f'warm_after_{q}']:.4f} | "
              f"{r[f'cold_after_{n}']:.4f} | {r[f'warm_after_{n}']:.4f} |")
    capped = [tuple(n + 1 if r[k] is None else r[k] for k in ("cold_to_1pct", "warm_to_1pct")) for r in rows]
    saved = [c - w for c, w in capped]
    print(f"\nevaluations to reach 1% of the best known value, mean over {len(rows)} switches "
          f"(never = {n + 1}): cold {statistics.mean(c for c, _ in capped):.1f}, "
          f"warm {statistics.mean(w for _, w in capped):.1f}; saved per switch: mean {statistics.mean(saved):.1f}, "
          f"total {sum(saved)}; warm reached it with 0 evaluations in "
          f"{sum(r['warm_to_1pct'] == 0 for r in rows)} of {len(rows)} switches")
    print(f"total wall time {seconds:.0f} s")


if __name__ == "__main__":
    main()
