"""Multi-fidelity pruning: does stopping poor trials early find good α for less evaluation? (issue 7)

    OMP_NUM_THREADS=1 python bench/pruning.py                       # none,median,asha x 3 seeds, limit 30
    OMP_NUM_THREADS=1 python bench/pruning.py --pruners none,asha --seeds 5 --budget 60 --limit 60 --threads 1
    python bench/pruning.py --from-json runs/bench/pruning.json     # re-tabulate, evaluate nothing

The embedded pool and objective of ``bench/sampler_efficiency.py`` (quick demo pool: ja, zh, math, code
vectors, α ∈ [0, 1]^4, ``balanced`` on the first ``--limit`` items of every dev set), TPE, exactly
``run_search`` as ``optimer search --pruner P --fidelities ...`` runs it, one in-memory study per (pruner, seed).

Every run gets the same *evaluation budget*: ``--budget`` full scorings, i.e. ``budget x`` the documents and
QA items one scoring at ``--limit`` reads. A trial's cost is what it actually scored (its ``docs_evaluated``:
a pruned trial stops at a lower rung; rungs nest, so a completed one costs one full scoring); each run stops
once its budget is spent. Every method is given the same ``trials`` setting (so TPE's random start-up and the
median pruner's warm-up are the same) and stopped by budget. Reported per pruner: the best *completed* value
(at ``--limit``, comparable across methods) after 25/50/100% of the budget, and the cost (in full scorings)
to come within 1%/0.5%/0.2% of the target, the best value any run found. Wall seconds are reported too:
small rungs score in smaller batches, so a document costs more time there.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import optuna
import torch
from _common import quantiles, quick_pool, within

from optimer_lib.experiments.costs import CostEntry, cost_to_reach, quality_curve

Run = list[list]  # per trial: [cumulative docs, completed value or None, state, cumulative seconds]


class _Spent(Exception):
    """Raised by the budget callback to end a run (the study object is kept by the callback)."""


def curve(run: Run) -> list[tuple[float, float]]:
    """``[(cumulative documents, best completed value so far)]`` at each completed trial of ``run``
    (``costs.quality_curve``: a pruned trial's documents count towards the next point)."""
    entries, spent = [], 0
    for docs, value, _, _ in run:
        entries.append(CostEntry("run", tokens_evaluated=int(docs) - spent, objective=value))
        spent = int(docs)
    return quality_curve(entries, "tokens_evaluated")


def best_at(run: Run, cost: float) -> float:
    """Best completed value among the trials finished within ``cost`` documents (inf if none)."""
    return min((best for spent, best in curve(run) if spent <= cost), default=float("inf"))


def cost_to(run: Run, target: float, tol: float, budget: float) -> float | None:
    """Cumulative documents when a completed value first comes within ``tol`` (relative) of ``target``
    (``costs.cost_to_reach``; None if not within ``budget``)."""
    reached = cost_to_reach(curve(run), within(target, tol), tol=0.0)
    return reached if reached is not None and reached <= budget else None


def _run(a: argparse.Namespace) -> tuple[dict[str, list[Run]], int]:
    """Every (pruner, seed) run; returns the runs and the documents of one full scoring."""
    from optimer_lib.search.pruning import default_fidelities, n_items, parse_fidelities
    from optimer_lib.search.study import SearchConfig, run_search

    pool, dev, objective = quick_pool(a.pool, a.threads)
    fidelities = parse_fidelities(a.fidelities) if a.fidelities else default_fidelities(a.limit)
    full = n_items(dev, a.limit)
    budget = a.budget * full
    pruners = [p for p in a.pruners.split(",") if p]
    print(f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"optuna {optuna.__version__}; {time.strftime('%Y-%m-%d')}; vectors {', '.join(pool.names)}; objective "
          f"balanced at {a.limit} items per dev set ({full} items per full scoring); fidelities "
          f"{','.join(map(str, fidelities))}; budget {a.budget} full scorings per run; TPE x {a.seeds} seeds",
          flush=True)
    runs: dict[str, list[Run]] = {p: [] for p in pruners}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for pruner in pruners:
            for seed in range(a.seeds):
                run: Run = []
                spent = [0, time.perf_counter()]

                def on_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial, run=run, spent=spent) -> None:
                    spent[0] += int(trial.user_attrs.get("docs_evaluated", full))
                    done = trial.state == optuna.trial.TrialState.COMPLETE
                    run.append([spent[0], float(trial.value) if done else None, trial.state.name,
                                time.perf_counter() - spent[1]])
                    if spent[0] >= budget:
                        raise _Spent

                cfg = SearchConfig(trials=a.max_trials, sampler="tpe", seed=seed, storage=":memory:",
                                   search_limit=a.limit, top_k=0, workdir=Path(tmp), study_name=f"{pruner}-{seed}",
                                   pruner=pruner, fidelities=None if pruner == "none" else fidelities)
                try:
                    run_search(pool.merger, pool.tokenizer, dev, objective, cfg, callbacks=[on_trial], progress=False)
                except _Spent:
                    pass
                runs[pruner].append(run)
                if a.out:  # after every run: a bench stopped by a time limit still leaves its finished runs
                    a.out.parent.mkdir(parents=True, exist_ok=True)
                    a.out.write_text(json.dumps({"limit": a.limit, "full": full, "budget": a.budget,
                                                 "fidelities": list(fidelities), "runs": runs}, indent=1))
                n_pruned = sum(r[2] == "PRUNED" for r in run)
                print(f"  {pruner} seed {seed}: {len(run)} trials ({n_pruned} pruned), {run[-1][0] / full:.1f} full "
                      f"scorings, best {best_at(run, budget):.4f}, {run[-1][3]:.0f} s "
                      f"({time.perf_counter() - t0:.0f} s elapsed)", flush=True)
    return runs, full


def _table(runs: dict[str, list[Run]], full: int, budget: float, tols: list[float]) -> None:
    target = min(best_at(r, budget) for rs in runs.values() for r in rs)
    print(f"\ntarget = best completed value of any run: {target:.4f}; costs in full scorings ({full} items each)\n")
    fracs = (0.25, 0.5, 1.0)
    head = " | ".join(f"best @ {f:.0%} budget (median)" for f in fracs)
    print(f"| pruner | {head} | trials (median) | pruned | wall s per run (median) |")
    print("|---|" + "---|" * (len(fracs) + 3))
    for name, rs in runs.items():
        cells = " | ".join(f"{statistics.median(best_at(r, f * budget) for r in rs):.4f}" for f in fracs)
        trials = statistics.median(len(r) for r in rs)
        pruned = sum(x[2] == "PRUNED" for r in rs for x in r) / max(1, sum(len(r) for r in rs))
        print(f"| {name} | {cells} | {trials:g} | {pruned:.0%} | {statistics.median(r[-1][3] for r in rs):.0f} |")
    print()
    print("| pruner | " + " | ".join(f"cost to within {t:.1%}: median (IQR) [runs]" for t in tols) + " |")
    print("|---|" + "---|" * len(tols))
    for name, rs in runs.items():
        cells = []
        for tol in tols:
            hits = [cost_to(r, target, tol, budget) for r in rs]
            got = sorted(h / full for h in hits if h is not None)
            # runs that never got there count as "more than the budget" for the median
            med = statistics.median([h / full if h is not None else budget / full + 1 for h in hits])
            shown = f"{med:.1f}" if med <= budget / full else f"> {budget / full:g}"
            cells.append(f"{shown} ({quantiles([round(g, 1) for g in got])}) [{len(got)}/{len(rs)}]")
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pruners", default="none,median,asha")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--budget", type=float, default=40, help="full scorings per run (evaluation budget)")
    ap.add_argument("--max-trials", type=int, default=400, help="the study's trials setting for every method")
    ap.add_argument("--limit", type=int, default=30, help="dev documents (and math questions) per set")
    ap.add_argument("--fidelities", default=None, help="rungs (default: about 1/9, 1/3, all of --limit)")
    ap.add_argument("--tol", default="0.01,0.005,0.002", help="relative distances to the target")
    ap.add_argument("--pool", type=Path, default=Path("runs/quick"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--out", type=Path, default=None, help="write every run here (JSON, after each run)")
    ap.add_argument("--from-json", type=Path, default=None, help="re-tabulate a previous --out file, evaluate nothing")
    a = ap.parse_args()
    tols = [float(t) for t in a.tol.split(",") if t]
    if a.from_json:
        saved = json.loads(a.from_json.read_text())
        runs, full, a.budget = saved["runs"], saved["full"], saved["budget"]
        print(f"re-tabulated from {a.from_json} (limit {saved['limit']}, budget {a.budget} full scorings)")
    else:
        runs, full = _run(a)
    _table({k: v for k, v in runs.items() if v}, full, a.budget * full, tols)


if __name__ == "__main__":
    main()
