"""Arena benchmark: votes a simulated voter needs to steer the preference search near the best merge (issue 19).

    python bench/arena.py                                  # 10 runs x 30 votes, gp vs random challengers
    python bench/arena.py --runs 3 --votes 15 --limit 8    # a quick look
    python bench/arena.py --runs 5 --temperature 0.001 --out bench/results/arena_t0001.json   # a near-perfect voter

The embedded pool (the quick demo pool under ``--pool``: ja, zh, math, code vectors; built and cached on first
use), α ∈ [0, 1]^4. A merge's quality is its mean dev loss over every text set of the embedded world (en, ja,
zh, math, code) on the first ``--limit`` documents each. The simulated voter sees two merges (a pair of
:class:`optimer_lib.search.arena.Arena`) and prefers the one with the lower loss with probability
σ(Δloss / 0.01); it never ties. After each vote the arena's best estimate (the unbeaten merge with the most
wins) is scored; a run needs *k votes* when the estimate first comes within 10% of the best weights' gain
over the base, i.e. loss <= base − 0.9·(base − best). "Best" is the lowest loss seen by a dense search
(``--dense`` TPE trials, seed 0) or by any arena run. ``gp`` asks challengers from optuna-dashboard's
PreferentialGPSampler after the arena's uniform startup merges (2 per vector); ``random`` draws them
uniformly (the same champion/challenger protocol): the "random pairs" baseline. Losses are deterministic in α
and memoised; the voter's coin is seeded per run.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import time
from pathlib import Path

import optuna
from _common import quantiles, quick_pool

from optimer_lib.experiments.analysis import trials_to_reach
from optimer_lib.scoring.evaluate import mean_token_loss
from optimer_lib.search.arena import Arena

TOL = 0.10
TEMPERATURE = 0.01


def prefer_left(loss_left: float, loss_right: float, rng: random.Random, temperature: float = TEMPERATURE) -> bool:
    """The simulated voter: left wins with probability σ((loss_right − loss_left) / temperature)."""
    z = (loss_right - loss_left) / temperature
    p = 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0
    return rng.random() < p


def run_arena(loss, names: list[str], kind: str, seed: int, votes: int,
              temperature: float = TEMPERATURE) -> list[float]:
    """Loss of the best estimate after each of ``votes`` simulated votes (one in-memory arena)."""
    arena = Arena.open(names, sampler=kind, seed=seed)
    rng = random.Random(1000 + seed)
    pair, out = arena.pair(), []
    for _ in range(votes):
        left = prefer_left(loss(pair.left.weights), loss(pair.right.weights), rng, temperature)
        pair = arena.vote(pair, "left" if left else "right", voter="simulated")
        out.append(loss(arena.best().weights))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--votes", type=int, default=30)
    ap.add_argument("--limit", type=int, default=10, help="dev documents per text set")
    ap.add_argument("--dense", type=int, default=150, help="TPE trials of the dense search for the best weights")
    ap.add_argument("--samplers", default="gp,random")
    ap.add_argument("--temperature", type=float, default=TEMPERATURE, help="the voter's sigmoid scale (loss units)")
    ap.add_argument("--pool", type=Path, default=Path("runs/quick"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bench/results/arena.json"))
    a = ap.parse_args()
    t0 = time.perf_counter()
    pool, dev, _ = quick_pool(a.pool, a.threads)
    names, sets = list(pool.names), list(dev.texts)
    cache: dict[tuple[float, ...], float] = {}

    def loss(w: dict[str, float]) -> float:
        key = tuple(round(float(w[n]), 12) for n in names)
        if key not in cache:
            pool.merger.set_weights(dict(zip(names, key, strict=True)))
            cache[key] = statistics.fmean(mean_token_loss(pool.model, pool.tokenizer, dev.texts[s], limit=a.limit)
                                          for s in sets)
        return cache[key]

    base = loss(dict.fromkeys(names, 0.0))
    dense = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    dense.optimize(lambda t: loss({n: t.suggest_float(n, 0.0, 1.0) for n in names}), n_trials=a.dense)
    print(f"base {base:.4f}, dense best {dense.best_value:.4f} ({a.dense} TPE trials, "
          f"{time.perf_counter() - t0:.0f} s)", flush=True)
    curves: dict[str, list[list[float]]] = {}
    seconds: dict[str, float] = {}
    for kind in a.samplers.split(","):
        t1 = time.perf_counter()
        curves[kind] = [run_arena(loss, names, kind, seed, a.votes, a.temperature) for seed in range(a.runs)]
        seconds[kind] = round(time.perf_counter() - t1, 1)
        print(f"{kind}: {a.runs} runs x {a.votes} votes in {seconds[kind]:.0f} s", flush=True)
    best = min([dense.best_value, *(v for runs in curves.values() for c in runs for v in c)])
    target = base - (1 - TOL) * (base - best)
    table = {}
    for kind, runs in curves.items():
        needed = [trials_to_reach(c, target) for c in runs]
        hit = [n for n in needed if n is not None]
        gains = [(base - c[-1]) / (base - best) for c in runs]
        table[kind] = {"votes_needed": needed, "median": statistics.median(hit) if hit else None,
                       "reached": len(hit), "runs": len(runs),
                       "final_gain_share_mean": round(statistics.fmean(gains), 3), "seconds": seconds[kind]}
    print(f"\nbase {base:.4f}, best {best:.4f} (gain {base - best:.4f}); target {target:.4f} = within {TOL:.0%} "
          "of the gain")
    print("| challengers | runs reaching the target | votes needed (median, q1–q3 of those) "
          "| share of gain at the last vote |")
    print("|---|---|---|---|")
    for kind, row in table.items():
        hit = [n for n in row["votes_needed"] if n is not None]
        print(f"| {kind} | {row['reached']}/{row['runs']} | {row['median']} ({quantiles(sorted(hit))}) "
              f"| {row['final_gain_share_mean']:.2f} |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"base": base, "best": best, "target": target, "tol": TOL, "temperature": a.temperature,
                                 "limit": a.limit, "votes": a.votes, "dense_trials": a.dense, "table": table,
                                 "curves": {k: [[round(v, 5) for v in c] for c in runs] for k, runs in curves.items()},
                                 "evaluations": len(cache), "seconds": round(time.perf_counter() - t0, 1),
                                 "machine": platform.processor() or platform.machine()}, indent=1))
    print(f"wrote {a.out} ({len(cache)} evaluations, {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
