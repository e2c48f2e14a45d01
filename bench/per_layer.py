"""Per-layer-group weights against one weight per vector on the embedded world (issue 19).

    nice -n 10 .venv/bin/python bench/per_layer.py                      # ~15-25 min on 1 thread
    .venv/bin/python bench/per_layer.py --from-json bench/results/per_layer.json   # re-tabulate (updates its summary)

The quick demo pool (``bench/_common.quick_pool``: ja, zh, math, code vectors on the embedded 4-block base, tied
embeddings), α ∈ [0, 1] per weight. For each granularity (``vector``: 4 weights; ``layer-groups:2``: embed, two
block slices, head = 16 weights; ``layer-groups:4``: 24) and each sampler (``tpe``, ``grad``) and sampler seed
0, 1, 2: ``run_search`` with the same budget of ``--trials`` trials, objective ``balanced`` on the first
``--limit`` documents of every dev set, no re-scoring. The best weights of each run are then scored per document
on the first ``--limit`` dev documents (the search's own value, now per document) and on the first
``--test-limit`` documents (and math questions) of every *test* set.

Cut for time (the issue asks for no particular size; the budget was ~25 min on one shared core): 25 trials,
10 dev documents per set in the search, 80 test documents per set (of 400), 3 seeds.

Intervals: the dev and test objectives are paired bootstraps over documents widened by a Student-t interval over
seeds (``optimer_lib.experiments.stats.bootstrap_methods``; every set's first N documents, the same for every run; an
objective is a function of per-document component means, ``docscores.objective_of_means``). Differences between
granularities are paired the same way. Trial-equivalents: trials until the run's best-so-far comes within 0.1 % of
that run's own final best, plus, for ``grad``, its gradient evaluations times the cost of one gradient evaluation
in trials: measured per granularity (gradient seconds / mean trial seconds over that granularity's runs) and
charged at the largest of these for every granularity (one price, never understated; deterministic gradients are
computed once per granularity and reused by every seed, but each run is charged for all of its own). Their spread
is the range over seeds (``stats.seed_range``: no documents to resample).

R (the share of the data mixture's gain recovered) is omitted: no mixture has been trained for this pool (the
experiments' mixture, under runs/experiments, belongs to a different pool: 400k-token vectors).

The experiment set's ``granularity`` stage (:mod:`optimer_lib.experiments.granularity`, whose trial-equivalents and
interval helpers this script uses) measures per-vector against per-layer ``grad`` on the experiments' own pool at
OptiMer's budget, with R, for FINDINGS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from _common import quick_pool

from optimer_lib.experiments.docscores import objective_of_means
from optimer_lib.experiments.granularity import RATIO_LIMIT, difference_interval, equivalents, objective_interval
from optimer_lib.experiments.stats import Criterion, seed_range

GRANULARITIES = ("vector", "layer-groups:2", "layer-groups:4")
SAMPLERS = ("tpe", "grad")

BETTER = Criterion("per-layer-group weights give a lower test objective than per-vector (same sampler, trials)",
                   "below", 0.0)
AFFORDABLE = Criterion(f"per-layer 'grad' needs at most {RATIO_LIMIT:g}x the trial-equivalents of per-vector 'grad' "
                       "to reach its best", "below", RATIO_LIMIT)


# -- summary (tests/test_bench_per_layer.py); trial-equivalents and intervals: optimer_lib.experiments.granularity --
def summarise(saved: Mapping[str, Any], n_boot: int = 2000) -> dict[str, Any]:
    """Per (granularity, sampler): dev/test objective intervals and trial-equivalents; the criteria's verdicts."""
    terms, runs = saved["terms"], saved["runs"]
    charge = max(saved["charge"].values(), default=0.0)  # one price per gradient evaluation for every granularity

    def pick(g: str, s: str) -> list[dict[str, Any]]:
        return sorted((r for r in runs if r["granularity"] == g and r["sampler"] == s), key=lambda r: r["seed"])

    cells: dict[str, dict[str, Any]] = {}
    for g in dict.fromkeys(r["granularity"] for r in runs):
        for s in dict.fromkeys(r["sampler"] for r in runs):
            rs = pick(g, s)
            if not rs:
                continue
            eq = [equivalents(r["values"], r["grad_evals"], charge) for r in rs]
            cells[f"{g} {s}"] = {"granularity": g, "sampler": s, "seeds": [r["seed"] for r in rs],
                                 "weights": len(rs[0]["best_weights"]),
                                 "dev": objective_interval(terms, [r["dev"] for r in rs], n_boot).to_json(),
                                 "test": objective_interval(terms, [r["test"] for r in rs], n_boot).to_json(),
                                 "equivalents": eq, "equivalents_range": seed_range(eq).to_json()}
    verdicts: dict[str, Any] = {}
    for s in dict.fromkeys(r["sampler"] for r in runs):
        base = pick("vector", s)
        for g in dict.fromkeys(r["granularity"] for r in runs):
            if g == "vector" or not base or len(pick(g, s)) != len(base):
                continue
            d = difference_interval(terms, [r["test"] for r in pick(g, s)], [r["test"] for r in base], n_boot)
            verdicts[f"test {g} − vector, {s}"] = {"interval": d.to_json(), "verdict": BETTER.verdict(d)}
            if s == "grad":
                ratios = [a / b for a, b in zip(cells[f"{g} grad"]["equivalents"],
                                                cells["vector grad"]["equivalents"], strict=True)]
                r = seed_range(ratios)
                verdicts[f"equivalents {g} grad / vector grad"] = {"per_seed": ratios, "interval": r.to_json(),
                                                                   "verdict": AFFORDABLE.every_seed(r, inclusive=True)}
                if "vector tpe" in cells:
                    tpe = [a / b for a, b in zip(cells[f"{g} grad"]["equivalents"],
                                                 cells["vector tpe"]["equivalents"], strict=True)]
                    verdicts[f"equivalents {g} grad / vector tpe"] = {
                        "per_seed": tpe, "interval": seed_range(tpe).to_json(),
                        "verdict": AFFORDABLE.every_seed(seed_range(tpe), inclusive=True)}
    return {"charge": charge, "cells": cells, "verdicts": verdicts}


def fmt(iv: Mapping[str, float]) -> str:
    return f"{iv['mean']:.4f} [{iv['low']:.4f}, {iv['high']:.4f}]"


def table(summary: Mapping[str, Any], base_test: float | None = None) -> str:
    """Markdown: one row per (granularity, sampler), then the criteria's verdicts."""
    lines = ["| granularity | sampler | weights | dev objective (95 % CI) | test objective (95 % CI) | "
             "trial-equivalents to reach its best: mean (range over seeds) |", "|---|---|---|---|---|---|"]
    for c in summary["cells"].values():
        eq = c["equivalents_range"]
        lines.append(f"| {c['granularity']} | {c['sampler']} | {c['weights']} | {fmt(c['dev'])} | {fmt(c['test'])} | "
                     f"{eq['mean']:.1f} ({eq['low']:.1f}–{eq['high']:.1f}) |")
    if base_test is not None:
        lines.append(f"\nBase model (α = 0) test objective: {base_test:.4f}.")
    lines.append("")
    for name, v in summary["verdicts"].items():
        iv = v["interval"]
        what = (f"{iv['mean']:.3g} (range {iv['low']:.3g}–{iv['high']:.3g})" if name.startswith("equivalents")
                else fmt(iv))
        lines.append(f"- {name}: {what} → **{v['verdict']}**")
    return "\n".join(lines)


# -- the runs --------------------------------------------------------------------------------------------------
def _doc_components(pool: Any, suite: Any, limit: int) -> dict[str, list[float]]:
    from optimer_lib.experiments.docscores import components, score_documents

    return components(score_documents(pool.model, pool.tokenizer, suite, limit=limit))


def run(a: argparse.Namespace) -> dict[str, Any]:
    import optuna

    import optimer_lib.search.gradient as gradient_mod
    from optimer_lib.data import load_eval_suite
    from optimer_lib.search.study import SearchConfig, run_search

    pool, dev, objective = quick_pool(a.pool, a.threads)
    test = load_eval_suite(None, "test")
    print(f"{platform.machine()}, 1 torch thread; {time.strftime('%Y-%m-%d')}; vectors {', '.join(pool.names)}; "
          f"balanced at {a.limit} dev documents per set; {a.trials} trials x seeds {a.seeds}; "
          f"test at {a.test_limit} documents per set", flush=True)
    real_gradient, gcache = gradient_mod.objective_gradient, {}
    gtime: dict[str, list[float]] = {}
    current = {"g": ""}

    def cached_gradient(merger, tokenizer, suite, objective, weights=None, *, limit=None, **kw):
        key = (current["g"], tuple(sorted((k, round(w, 12)) for k, w in (weights or merger.weights).items())), limit)
        if key not in gcache:
            t = time.perf_counter()
            gcache[key] = real_gradient(merger, tokenizer, suite, objective, weights, limit=limit, **kw)
            gtime.setdefault(current["g"], []).append(time.perf_counter() - t)
        else:
            merger.set_weights(weights or merger.weights)  # as the real call leaves it
        return gcache[key]

    pool.merger.set_weights(dict.fromkeys(pool.names, 0.0))
    base_test = objective_of_means(objective.terms, {k: statistics.fmean(v) for k, v in
                                                     _doc_components(pool, test, a.test_limit).items()})
    runs, ttime = [], {}
    t0 = time.perf_counter()
    gradient_mod.objective_gradient = cached_gradient
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for g in a.granularities:
                current["g"] = g
                for s in a.samplers:
                    for seed in a.seeds:
                        cfg = SearchConfig(trials=a.trials, sampler=s, seed=seed, storage=":memory:",
                                           search_limit=a.limit, top_k=0, workdir=Path(tmp) / f"{g}-{s}-{seed}",
                                           study_name=f"{g}-{s}-{seed}", granularity=g)
                        res = run_search(pool.merger, pool.tokenizer, dev, objective, cfg, progress=False)
                        done = sorted(res.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)),
                                      key=lambda t: t.number)
                        ttime.setdefault(g, []).extend(t.duration.total_seconds() for t in done if t.duration)
                        evals = int(res.study.user_attrs.get(gradient_mod.WARM_START_ATTR, {}).get("evaluations", 0))
                        pool.merger.set_weights(res.best_weights)
                        rec = {"granularity": g, "sampler": s, "seed": seed, "values": [float(t.value) for t in done],
                               "grad_evals": evals, "best_weights": res.best_weights, "best_dev": res.best_value,
                               "dev": _doc_components(pool, dev, a.limit),
                               "test": _doc_components(pool, test, a.test_limit)}
                        runs.append(rec)
                        print(f"  {g} {s} seed {seed}: best dev {res.best_value:.4f} (trial {res.best_trial}), "
                              f"{evals} gradient evaluations; {time.perf_counter() - t0:.0f} s elapsed", flush=True)
    finally:
        gradient_mod.objective_gradient = real_gradient
    charge = {g: statistics.fmean(gtime[g]) / statistics.fmean(ttime[g]) for g in gtime if ttime.get(g)}
    return {"terms": dict(objective.terms), "trials": a.trials, "limit": a.limit, "test_limit": a.test_limit,
            "seeds": list(a.seeds), "charge": charge, "gradient_s": {g: statistics.fmean(v) for g, v in gtime.items()},
            "trial_s": {g: statistics.fmean(v) for g, v in ttime.items()}, "base_test": base_test,
            "wall_s": round(time.perf_counter() - t0, 1), "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--granularities", default=",".join(GRANULARITIES))
    ap.add_argument("--samplers", default=",".join(SAMPLERS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--trials", type=int, default=25)
    ap.add_argument("--limit", type=int, default=10, help="dev documents (and math questions) per set in the search")
    ap.add_argument("--test-limit", type=int, default=80, help="test documents (and math questions) per set")
    ap.add_argument("--pool", type=Path, default=Path("runs/quick"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bench/results/per_layer.json"))
    ap.add_argument("--from-json", type=Path, default=None, help="re-tabulate a previous --out file")
    a = ap.parse_args()
    a.granularities = [g for g in a.granularities.split(",") if g]
    a.samplers = [s for s in a.samplers.split(",") if s]
    a.seeds = [int(s) for s in a.seeds.split(",") if s]
    if a.from_json:
        saved = json.loads(a.from_json.read_text())
    else:
        saved = run(a)
    summary = summarise(saved)
    if not a.from_json or a.out.resolve() == a.from_json.resolve():  # re-tabulating the default file updates it
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({**saved, "summary": summary}, indent=1))
        print(f"wrote {a.out}")
    charge = ", ".join(f"{g} {c:.2f}" for g, c in saved["charge"].items())
    print(f"\none gradient evaluation measured at {charge} trials, charged {summary['charge']:.2f} "
          f"trial-equivalents; wall {saved['wall_s']:.0f} s\n")
    print(table(summary, saved["base_test"]))


if __name__ == "__main__":
    main()
