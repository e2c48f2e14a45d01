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

It also reports the scoring's peak RssAnon above the loaded model (sampled every 5 ms). ``--head full`` scores with
one full forward per batch (the batch's logits alive at once, as before ``optimer_lib.scoring.row_logits``),
``--head split`` (the default) with the LM head run per sequence; ``--heap`` sets glibc's heap as ``optimer
workbench --heap`` does (default: glibc's own, as the yardstick was first measured):

    python bench/tune_set_time.py --head full --heap lean --reps 3 --out bench/results/tune_set_peak_full.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from pathlib import Path

from _common import emit_json, proc_tree_memory

MB = 1e6


class PeakAnon(threading.Thread):
    """The largest RssAnon of this process, sampled every ``every_s`` until :meth:`stop`."""

    def __init__(self, every_s: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.every_s, self.peak, self._done = every_s, 0, threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, proc_tree_memory(os.getpid())["anon"])
            self._done.wait(self.every_s)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, default=Path("runs/smollm2/base"), help="HF checkpoint dir of the model")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the workbench's default here: 1)")
    p.add_argument("--reps", type=int, default=3, help="timed scorings after one warm-up")
    p.add_argument("--head", choices=("split", "full"), default="split",
                   help="LM head per sequence (split, today's scorer) or one full forward per batch (full, before)")
    p.add_argument("--heap", choices=("glibc", "lean", "fast"), default="glibc",
                   help="glibc's heap as is, or as `optimer workbench --heap` sets it")
    p.add_argument("--out", type=Path, help="write the figures here as JSON")
    a = p.parse_args()

    import torch

    from optimer_lib.engine.heap import configure_heap
    from optimer_lib.scoring import row_logits

    if a.heap != "glibc":
        configure_heap(a.heap)
    if a.head == "full":
        row_logits.splits = lambda _model: False  # the scorer then runs one full forward per batch

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
    full, first, peaks = [], [], []
    for rep in range(a.reps + 1):
        before, sampler = proc_tree_memory(os.getpid())["anon"], PeakAnon()
        sampler.start()
        t0 = time.perf_counter()
        marks = [time.perf_counter() - t0 for _ in scoring.stream(model, tok, suite)]
        seconds, peak = time.perf_counter() - t0, sampler.stop()
        if rep:  # the first scoring warms caches and allocators
            full.append(seconds)
            first.append(marks[0])
            peaks.append((peak - before) / MB)
    out = {"base": str(a.base), "threads": a.threads, "head": a.head, "heap": a.heap, "parameters": n_params,
           "tokens": cost.tokens,
           "tflop": round(cost.flops / 1e12, 3), "reps": a.reps, "full_s": [round(x, 2) for x in full],
           "first_set_s": [round(x, 2) for x in first], "full_median_s": round(statistics.median(full), 2),
           "first_set_median_s": round(statistics.median(first), 2),
           "gflop_per_s": round(cost.flops / statistics.median(full) / 1e9, 1),
           "peak_anon_above_model_mb": [round(x) for x in peaks], "peak_anon_above_model_mb_max": round(max(peaks))}
    print(f"{a.base}: {n_params:,} parameters; the default Tune scoring set {cost} "
          f"({len(suite.texts)} text sets, {len(suite.qa)} QA sets)")
    print(f"{a.threads} thread(s): full set {out['full_median_s']} s (median of {a.reps}: {out['full_s']}), "
          f"first dev set {out['first_set_median_s']} s, {out['gflop_per_s']} GFLOP/s")
    print(f"head {a.head}, heap {a.heap}: peak RssAnon above the loaded model {out['peak_anon_above_model_mb_max']} MB "
          f"(per scoring: {out['peak_anon_above_model_mb']})")
    print(f"slider goal (issue 15): full score within 1.25 x {out['full_median_s']} = "
          f"{1.25 * out['full_median_s']:.1f} s")
    emit_json(out, a.out)


if __name__ == "__main__":
    main()
