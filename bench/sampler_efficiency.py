"""Sampler efficiency: trials to come within 1% of the best objective found (issue 7, item 5).

    python bench/sampler_efficiency.py                       # 5 samplers x 5 seeds x 40 trials, limit 20
    python bench/sampler_efficiency.py --quick               # 5 seeds x 25 trials, limit 10
    python bench/sampler_efficiency.py --samplers tpe,random --seeds 3 --trials 30 --limit 20 --threads 1
    python bench/sampler_efficiency.py --samplers tpe,grad --seeds 3 --trials 25 --limit 10 --threads 1 \
        --tol 0.01,0.005,0.002                               # gradient warm start vs TPE

The embedded pool (the quick demo pool under ``--pool``: ja, zh, math, code vectors; built and
cached on first use), α ∈ [0, 1]^4, objective ``balanced`` (mean dev loss over en/ja/zh/math/code
minus math accuracy) on the first ``--limit`` documents of every dev set, no re-scoring: exactly
``run_search`` as ``optimer search`` runs it, one in-memory study per (sampler, seed).

The target is the best value seen in *any* run of this benchmark (all samplers and seeds), and each
run's count is the first trial whose best-so-far is within 1% of it (``analysis.trials_to_reach``; a run that
never gets there is censored at ``--trials`` and counted separately). Evaluations are deterministic functions of α, so
repeated α (grid points recur across seeds) are scored once and reused; trial counts are unaffected.

``grad`` (TPE warm-started with projected-gradient iterates, ``optimer_lib.search.gradient``) spends G gradient
evaluations before its first trial (``--grad-steps``, default ``default_steps(trials)``); each iterate is
then scored as an ordinary trial. ``balanced`` has an ``acc:math`` term, which has no gradient: the descent
follows the loss terms, the trials score the whole objective. The cost of one gradient evaluation is
measured at the start point as ``r = time(forward + backward) / time(forward)`` on the dev sets the gradient
reads, and as gradient time / trial time (a trial also scores math answers by generation) both there
(``--cost-repeats`` interleaved timings, median) and over the whole run; each gradient evaluation is charged
the largest of these ratios. The tables give trials and *trial-equivalents* = trials + G·(charged ratio),
which is just the trial count for the other samplers. Gradient evaluations are
deterministic in α too: repeats across seeds are computed once, but every run is charged for all of its own.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path

import optuna
import torch
from _common import quantiles, quick_pool, within

from optimer_lib.experiments.analysis import trials_to_reach


def _gradient_cost(pool, dev, objective, limit: int, repeats: int) -> dict[str, float]:
    """Median seconds of a forward-only loss pass over the sets the gradient reads, a gradient evaluation and
    a full trial's scoring, at the descent's start point; timed interleaved (busy shared cores drift)."""
    from optimer_lib.scoring.evaluate import evaluate_suite, mean_token_loss
    from optimer_lib.search.gradient import default_start, differentiable_terms, objective_gradient

    terms, _ = differentiable_terms(objective)
    sets = list(dict.fromkeys(k.split(":", 1)[1] for k in terms))
    start = default_start(dict.fromkeys(pool.names, (0.0, 1.0)))
    pool.merger.set_weights(start)
    jobs = {"forward_s": lambda: [mean_token_loss(pool.model, pool.tokenizer, dev.texts[s], limit=limit) for s in sets],
            "gradient_s": lambda: objective_gradient(pool.merger, pool.tokenizer, dev, objective, start, limit=limit),
            "trial_s": lambda: evaluate_suite(pool.model, pool.tokenizer, dev, limit=limit)}
    for job in jobs.values():  # warm-up: tokenisation caches, allocator
        job()
    times: dict[str, list[float]] = {k: [] for k in jobs}
    for _ in range(max(1, repeats)):
        for key, job in jobs.items():
            t = time.perf_counter()
            job()
            times[key].append(time.perf_counter() - t)
    out = {k: statistics.median(v) for k, v in times.items()}
    return {**out, "ratio": out["gradient_s"] / out["forward_s"], "ratio_to_trial": out["gradient_s"] / out["trial_s"]}


def _run(a: argparse.Namespace) -> tuple[dict[str, list[list[float]]], dict[str, list[int]], dict[str, float]]:
    """Every (sampler, seed) study; returns each run's completed trial values in trial order, each run's
    gradient evaluations (0 for samplers without) and the measured gradient cost (empty if no ``grad``)."""
    if a.quick:
        a.trials, a.limit = 25, 10
    import optimer_lib.search.gradient as gradient_mod
    import optimer_lib.search.study as search_mod
    from optimer_lib.search.study import SearchConfig, run_search

    pool, dev, objective = quick_pool(a.pool, a.threads)
    samplers = [s for s in a.samplers.split(",") if s]
    print(f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"optuna {optuna.__version__}; {time.strftime('%Y-%m-%d')}; vectors {', '.join(pool.names)}; "
          f"objective balanced at {a.limit} documents per dev set; {a.trials} trials x {a.seeds} seeds per sampler",
          flush=True)

    # Memoise evaluations by α (deterministic): the search module's evaluate_suite, keyed on the merged weights.
    real_eval, cache, stats = search_mod.evaluate_suite, {}, {"evals": 0, "hits": 0, "seconds": 0.0}

    def cached_eval(model, tokenizer, suite, *, limit=None, **kw):
        key = (tuple(round(w, 12) for w in pool.merger.weights.values()), limit)
        if key in cache:
            stats["hits"] += 1
        else:
            t = time.perf_counter()
            cache[key] = real_eval(model, tokenizer, suite, limit=limit, **kw)
            stats["evals"] += 1
            stats["seconds"] += time.perf_counter() - t
        return dict(cache[key])

    cost: dict[str, float] = {}
    if "grad" in samplers:
        cost = _gradient_cost(pool, dev, objective, a.limit, a.cost_repeats)
        print(f"gradient cost at the start point: forward {cost['forward_s']:.3f} s, forward+backward "
              f"{cost['gradient_s']:.3f} s (r = {cost['ratio']:.2f}), full trial {cost['trial_s']:.3f} s "
              f"(gradient = {cost['ratio_to_trial']:.2f} trials)", flush=True)
        # --grad-steps/--grad-lr: the registry entry with other defaults, restored on exit
        real_grad = search_mod.SAMPLERS["grad"]
        search_mod.SAMPLERS["grad"] = lambda seed, bounds, n: real_grad(seed, bounds, n, steps=a.grad_steps or None,
                                                                        lr=a.grad_lr)
    real_gradient, gcache, gstats = gradient_mod.objective_gradient, {}, {"evals": 0, "hits": 0, "seconds": 0.0}

    def cached_gradient(merger, tokenizer, suite, objective, weights=None, *, limit=None, **kw):
        key = (tuple(round(w, 12) for w in (weights or merger.weights).values()), limit)
        if key in gcache:
            gstats["hits"] += 1
            merger.set_weights(weights or merger.weights)  # as the real call leaves it
        else:
            t = time.perf_counter()
            gcache[key] = real_gradient(merger, tokenizer, suite, objective, weights, limit=limit, **kw)
            gstats["evals"] += 1
            gstats["seconds"] += time.perf_counter() - t
        return gcache[key]

    search_mod.evaluate_suite = cached_eval
    gradient_mod.objective_gradient = cached_gradient
    runs: dict[str, list[list[float]]] = {s: [] for s in samplers}
    grad_evals: dict[str, list[int]] = {s: [] for s in samplers}
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for sampler in samplers:
                for seed in range(a.seeds):
                    cfg = SearchConfig(trials=a.trials, sampler=sampler, seed=seed, storage=":memory:",
                                       search_limit=a.limit, top_k=0, workdir=Path(tmp),
                                       study_name=f"{sampler}-{seed}")
                    res = run_search(pool.merger, pool.tokenizer, dev, objective, cfg, progress=False)
                    done = res.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                    runs[sampler].append([float(t.value) for t in sorted(done, key=lambda t: t.number)])
                    g = int(res.study.user_attrs.get(gradient_mod.WARM_START_ATTR, {}).get("evaluations", 0))
                    grad_evals[sampler].append(g)
                    if g:
                        path = [(t.user_attrs["grad_step"], t.value) for t in done if "grad_step" in t.user_attrs]
                        print(f"  {sampler} seed {seed}: gradient iterates (step, trial value): "
                              + ", ".join(f"({k}, {v:.4f})" for k, v in sorted(path)), flush=True)
                    print(f"  {sampler} seed {seed}: {len(done)} trials, best {min(runs[sampler][-1]):.4f}"
                          + (f", {g} gradient evaluations first" if g else "")
                          + f" ({time.perf_counter() - t0:.0f} s elapsed)", flush=True)
    finally:
        search_mod.evaluate_suite = real_eval
        gradient_mod.objective_gradient = real_gradient
        if "grad" in samplers:
            search_mod.SAMPLERS["grad"] = real_grad
    if gstats["evals"] and stats["evals"]:  # the same ratio over the whole run (same load as the trials)
        cost["ratio_run"] = (gstats["seconds"] / gstats["evals"]) / (stats["seconds"] / stats["evals"])
        # charge a gradient evaluation the largest measured ratio: never understate its cost
        cost["charged"] = max(cost["ratio"], cost["ratio_to_trial"], cost["ratio_run"])
    print(f"{stats['evals']} evaluations ({stats['seconds'] / max(1, stats['evals']):.2f} s each), "
          f"{stats['hits']} reused"
          + (f"; {gstats['evals']} gradient evaluations ({gstats['seconds'] / max(1, gstats['evals']):.2f} s "
             f"each), {gstats['hits']} reused" if gstats["evals"] else "")
          + f"; wall {time.perf_counter() - t0:.0f} s"
          + (f"\ngradient evaluation / trial over the run: {cost['ratio_run']:.2f}; charged per gradient "
             f"evaluation: {cost['charged']:.2f} trial-equivalents" if "charged" in cost else ""))
    return runs, grad_evals, cost


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samplers", default="tpe,gp,cmaes,random,grid")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--limit", type=int, default=20, help="dev documents (and math questions) per set")
    ap.add_argument("--tol", default="0.01,0.001", help="relative distances to the best (default 1%% and 0.1%%)")
    ap.add_argument("--pool", type=Path, default=Path("runs/quick"))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    ap.add_argument("--out", type=Path, default=None, help="write every run's trial values here (JSON)")
    ap.add_argument("--quick", action="store_true", help="25 trials, limit 10")
    ap.add_argument("--from-json", type=Path, default=None, help="re-tabulate a previous --out file, evaluate nothing")
    ap.add_argument("--grad-steps", type=int, default=0, help="gradient evaluations of 'grad' (default: by --trials)")
    ap.add_argument("--grad-lr", type=float, default=0.1, help="Adam step of 'grad' as a fraction of the bounds")
    ap.add_argument("--cost-repeats", type=int, default=3, help="timings of the gradient cost measurement (median)")
    a = ap.parse_args()
    tols = [float(t) for t in a.tol.split(",") if t]
    if a.from_json:
        saved = json.loads(a.from_json.read_text())
        runs, a.trials = saved["runs"], saved["trials"]
        grad_evals = saved.get("grad_evals", {s: [0] * len(rs) for s, rs in runs.items()})
        cost = saved.get("gradient_cost", {})
        print(f"re-tabulated from {a.from_json} (limit {saved['limit']}, {a.trials} trials)")
    else:
        runs, grad_evals, cost = _run(a)
    ratio = cost.get("charged", cost.get("ratio", 0.0))
    target = min(min(v) for rs in runs.values() for v in rs)
    for tol in tols:
        print(f"\nbest objective found (all runs): {target:.4f}; within {tol * 100:g}% means <= "
              f"{target + tol * abs(target):.4f}" + (f"; one gradient evaluation = {ratio:.2f} trial-equivalents"
                                                      if ratio else "") + "\n")
        print(f"| sampler | trials to within {tol * 100:g}%: median | IQR | min–max | trial-equivalents: median | "
              f"runs that got there | median best after {a.trials} trials |")
        print("|---|---|---|---|---|---|---|")
        for sampler, rs in runs.items():
            hits = [trials_to_reach(v, within(target, tol)) for v in rs]
            got = sorted(h for h in hits if h is not None)
            # censored runs count as "more than the budget" for the median
            med_all = statistics.median([h if h is not None else a.trials + 1 for h in hits])
            med = f"{med_all:g}" if med_all <= a.trials else f"> {a.trials}"
            extra = [g * ratio for g in grad_evals.get(sampler, [0] * len(rs))]
            equiv = statistics.median([(math.inf if h is None else h) + e for h, e in zip(hits, extra, strict=True)])
            med_eq = f"{equiv:.1f}" if math.isfinite(equiv) else f"> {a.trials + statistics.median(extra):.1f}"
            print(f"| {sampler} | {med} | {quantiles(got)} | {f'{got[0]}–{got[-1]}' if got else '–'} | {med_eq} | "
                  f"{len(got)}/{len(rs)} | {statistics.median(min(v) for v in rs):.4f} |")
    if a.out and not a.from_json:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"target": target, "limit": a.limit, "trials": a.trials, "runs": runs,
                                     "grad_evals": grad_evals, "gradient_cost": cost}, indent=1))

if __name__ == "__main__":
    main()
