"""How often the Tune tab's instant estimate lies inside the exact score's interval (issue 15's check).

    python bench/estimate_hits.py                                   # quick demo pool, 3 seeds x 30 moves
    python bench/estimate_hits.py --moves 40 --seeds 0,1,2 --out bench/results/estimate_hits.json
    python bench/estimate_hits.py --workdir runs/wb                 # any workbench workdir that has a pool

A :class:`workbench.session.Session` (the library behind one browser tab) makes ``--moves`` slider moves, as
a user dragging one slider at a time: each move changes one vector's weight by ±U(0.05, 0.25), clipped to
[0, 1], and its scoring stream (:mod:`workbench.tuning`, the Tune default set: 8 documents per dev set + 8 QA
pairs) runs to the exact score. Before each exact score the estimator (a quadratic/separable/linear fit in α to
the moves scored so far) predicted the objective; it is a hit when the prediction lies inside the exact
objective's 95% bootstrap interval over the scored documents. Each seed starts a fresh workspace (no fitted
points, nothing cached). Printed per seed and over all seeds: hits / checked per fit kind, mean |estimate −
exact|, mean interval half-width, and how long the estimate and the exact score took.

"Inside the interval" alone is a weak criterion when the interval is wide next to how much the objective moves,
so the same counts are given for a guess with no model at all, the previous move's exact score: the estimate is
only worth showing where it beats that (smaller mean error, and at least as many hits).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench.session import Session  # noqa: E402
from workbench.tuning import tracker_summary  # noqa: E402
from workbench.workspace import Workspace  # noqa: E402


def move(weights: dict[str, float], rng: random.Random) -> dict[str, float]:
    """One slider drag: one vector's weight by ±U(0.05, 0.25), clipped to [0, 1]."""
    out = dict(weights)
    name = rng.choice(sorted(out))
    out[name] = round(min(1.0, max(0.0, out[name] + rng.choice((-1, 1)) * rng.uniform(0.05, 0.25))), 3)
    return out


def run_seed(workdir: Path, seed: int, moves: int) -> dict:
    """``moves`` slider moves on a fresh workspace; the tracker's counts and the timings."""
    ws = Workspace(workdir)
    if not ws.has_pool():
        ws.build_demo_pool(quick=True)
    session = Session(ws)
    rng = random.Random(seed)
    weights = {n: round(rng.uniform(0.0, 1.0), 3) for n in session.shared.names}
    est_s, exact_s, half, errors, naive_errors, naive_hits = [], [], [], [], [], 0
    previous: float | None = None
    for _ in range(moves):
        weights = move(weights, rng)
        t0, guess = time.perf_counter(), None
        for update in session.score_stream(weights):
            if update.phase == "estimate":
                est_s.append(time.perf_counter() - t0)
                guess = update.objective
            final = update
        exact_s.append(time.perf_counter() - t0)
        iv = final.objective_interval
        if iv is not None:
            half.append((iv.high - iv.low) / 2)
            if guess is not None:
                errors.append(abs(guess - iv.value))
                if previous is not None:  # the no-model guess, on the same moves as the estimate
                    naive_errors.append(abs(previous - iv.value))
                    naive_hits += iv.low <= previous <= iv.high
            previous = iv.value
    rows = tracker_summary(session.shared)
    tracked = max(rows, key=lambda r: r["checked"]) if rows else {"checked": 0, "inside": 0, "summary": "none"}
    by_kind = {}
    for est in session.shared.estimators.values():
        for kind, (h, n) in est.tracker.by_kind.items():
            by_kind[kind] = [by_kind.get(kind, [0, 0])[0] + h, by_kind.get(kind, [0, 0])[1] + n]
    return {"seed": seed, "moves": moves, "checked": tracked["checked"], "inside": tracked["inside"],
            "by_kind": by_kind, "summary": tracked["summary"],
            "mean_abs_error": statistics.fmean(errors) if errors else None,
            "previous_score": {"inside": naive_hits, "checked": len(naive_errors),
                               "mean_abs_error": statistics.fmean(naive_errors) if naive_errors else None},
            "mean_half_width": statistics.fmean(half) if half else None,
            "estimate_s_median": statistics.median(est_s) if est_s else None,
            "exact_s_median": statistics.median(exact_s)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("runs/quick"),
                   help="a workbench workdir; without a pool the quick demo pool is built there (cached)")
    p.add_argument("--seeds", default="0,1,2", help="comma list: each a fresh workspace and move sequence")
    p.add_argument("--moves", type=int, default=30, help="slider moves per seed")
    p.add_argument("--out", type=Path, help="write the JSON here (e.g. bench/results/estimate_hits.json)")
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    per = []
    for seed in seeds:
        per.append(run_seed(a.workdir, seed, a.moves))
        r = per[-1]
        n = r["previous_score"]
        print(f"seed {seed}: {r['summary']}; previous move's score as the guess: inside {n['inside']} of "
              f"{n['checked']}, mean error {n['mean_abs_error']:.4g}; mean interval half-width "
              f"{r['mean_half_width']:.4g}; estimate "
              f"{r['estimate_s_median']:.3f} s, exact {r['exact_s_median']:.2f} s (medians)", flush=True)
    hits, checked = sum(r["inside"] for r in per), sum(r["checked"] for r in per)
    kinds: dict[str, list[int]] = {}
    for r in per:
        for k, (h, n) in r["by_kind"].items():
            kinds[k] = [kinds.get(k, [0, 0])[0] + h, kinds.get(k, [0, 0])[1] + n]
    err = [r["mean_abs_error"] for r in per if r["mean_abs_error"] is not None]
    naive = [r["previous_score"]["mean_abs_error"] for r in per if r["previous_score"]["mean_abs_error"] is not None]
    total = {"seeds": seeds, "moves": a.moves, "inside": hits, "checked": checked,
             "mean_abs_error": statistics.fmean(err) if err else None,
             "previous_score_mean_abs_error": statistics.fmean(naive) if naive else None,
             "rate": hits / checked if checked else None, "by_kind": kinds, "per_seed": per}
    kinds_s = ", ".join(f"{k} {h}/{n}" for k, (h, n) in kinds.items())
    print(f"all seeds: estimate inside the exact 95% interval {hits} of {checked} moves"
          + (f" ({hits / checked:.0%}; {kinds_s})" if checked else ""))
    if err and naive:
        print(f"mean |guess − exact| over seeds: estimate {total['mean_abs_error']:.4g}, previous move's score "
              f"{total['previous_score_mean_abs_error']:.4g}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(total, indent=1) + "\n")
        print(f"wrote {a.out}")
    return total


if __name__ == "__main__":
    main()
