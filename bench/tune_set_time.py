"""How long the Tune tab's scoring set takes on a bare model: the yardstick of issue 15's slider goal.

    python bench/tune_set_time.py --base runs/smollm2/base --threads 1 --reps 3 --out bench/results/tune_set_time.json

The issue asks a slider release to reach its full score within 1.25 × "the set's FLOP time on this machine".
This script measures that time directly: the workbench's default scoring set (:class:`TuneScoring`: 8 documents
of each embedded dev set at 128 tokens, 8 QA pairs, batch 16), scored on the base model loaded as the workbench
loads it, at the workbench's torch thread count (1 on a machine with at most 4 cores), no engine, no server, no
browser. It prints the tokens and FLOPs the set reads (2 × parameters × tokens), the median wall time of
``--reps`` scorings after one warm-up, the seconds of the first dev set alone (the "first partial result"), and
the FLOP/s that implies. ``bench/engine_sessions.py`` measures the same set through the workbench; the ratio of
the two is the workbench's overhead.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from _common import emit_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, default=Path("runs/smollm2/base"), help="HF checkpoint dir of the model")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the workbench's default here: 1)")
    p.add_argument("--reps", type=int, default=3, help="timed scorings after one warm-up")
    p.add_argument("--out", type=Path, help="write the figures here as JSON")
    a = p.parse_args()

    import torch

    from optimer_lib.checkpoints.models import load_model
    from optimer_lib.data import embedded_corpora, load_eval_suite
    from optimer_lib.scoring.tune_config import TuneScoring

    torch.set_num_threads(a.threads)
    model = load_model(a.base, dtype="float32")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.base)
    suite = load_eval_suite(embedded_corpora(), "dev")
    scoring = TuneScoring()
    n_params = sum(t.numel() for t in {id(t): t for t in model.parameters()}.values())
    cost = scoring.cost(tok, suite, n_params, model=model)
    full, first = [], []
    for rep in range(a.reps + 1):
        t0 = time.perf_counter()
        marks = [time.perf_counter() - t0 for _ in scoring.stream(model, tok, suite)]
        if rep:  # the first scoring warms caches and allocators
            full.append(time.perf_counter() - t0)
            first.append(marks[0])
    out = {"base": str(a.base), "threads": a.threads, "parameters": n_params, "tokens": cost.tokens,
           "tflop": round(cost.flops / 1e12, 3), "reps": a.reps, "full_s": [round(x, 2) for x in full],
           "first_set_s": [round(x, 2) for x in first], "full_median_s": round(statistics.median(full), 2),
           "first_set_median_s": round(statistics.median(first), 2),
           "gflop_per_s": round(cost.flops / statistics.median(full) / 1e9, 1)}
    print(f"{a.base}: {n_params:,} parameters; the default Tune scoring set {cost} "
          f"({len(suite.texts)} text sets, {len(suite.qa)} QA sets)")
    print(f"{a.threads} thread(s): full set {out['full_median_s']} s (median of {a.reps}: {out['full_s']}), "
          f"first dev set {out['first_set_median_s']} s, {out['gflop_per_s']} GFLOP/s")
    print(f"slider goal (issue 15): full score within 1.25 x {out['full_median_s']} = "
          f"{1.25 * out['full_median_s']:.1f} s")
    emit_json(out, a.out)


if __name__ == "__main__":
    main()
