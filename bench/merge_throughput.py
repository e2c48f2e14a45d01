"""Resident-merge throughput against this machine's copy bandwidth (issue 7, items 1 and 2).

    python bench/merge_throughput.py            # ~1-2 min on 2 cores
    python bench/merge_throughput.py --quick

Item 1: an in-place merge of K vectors must at least read the base and K vectors and write the
parameters: (K + 2) · P · bytes. We time ``ResidentMerger.set_weights`` on a synthetic model of
P parameters and divide that byte count by the time, then by the copy bandwidth of the same
machine measured in the same run (a large ``torch`` tensor copy, 2 · N · bytes moved). Ratios
within one run are robust to the noise of a shared machine; medians of several repetitions.

Item 2: on the embedded world, the share of a search trial spent merging (set_weights) versus
scoring (the `balanced` objective at 100 documents per distribution).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from optimer_lib.merge import ResidentMerger
from optimer_lib.vectors import DistributionVector


class _Flat(torch.nn.Module):
    """A stand-in model: a few large parameters (merge cost depends on bytes, not architecture)."""

    def __init__(self, params: int, dtype: torch.dtype, pieces: int = 8) -> None:
        super().__init__()
        n = params // pieces
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(n, dtype=dtype)) for _ in range(pieces)])


def _median_time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def copy_bandwidth(nbytes: int, reps: int) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    return 2 * nbytes / _median_time(lambda: dst.copy_(src), reps)


def merge_bandwidth(params: int, k: int, dtype: torch.dtype, reps: int) -> float:
    model = _Flat(params, dtype)
    names = [n for n, _ in model.named_parameters()]
    vecs = [DistributionVector(f"v{i}", {n: torch.randn_like(p) * 0.01 for n, p in model.named_parameters()},
                               {"name": f"v{i}"}) for i in range(k)]
    merger = ResidentMerger(model, vecs)
    weights = [{f"v{i}": 0.1 + 0.01 * j for i in range(k)} for j in range(reps + 1)]
    it = iter(weights * 2)
    seconds = _median_time(lambda: merger.set_weights(next(it)), reps)
    del names
    elem = torch.finfo(dtype).bits // 8
    return (k + 2) * params * elem / seconds


def trial_share(reps: int) -> None:
    from optimer_lib.data import assets_dir, load_eval_suite
    from optimer_lib.demo import DemoConfig, build_pool
    from optimer_lib.objectives import parse_objective
    from optimer_lib.pool import open_pool

    paths, _ = build_pool(DemoConfig.quick())
    pool = open_pool(assets_dir() / "base", paths)
    dev = load_eval_suite(None, "dev")
    objective = parse_objective("balanced", list(dev.texts), qa_names=list(dev.qa))
    merge_t, eval_t = [], []
    for j in range(reps):
        w = {n: 0.1 + 0.05 * ((i + j) % 5) for i, n in enumerate(pool.names)}
        t = time.perf_counter()
        pool.merger.set_weights(w)
        t1 = time.perf_counter()
        objective.evaluate(pool.model, pool.tokenizer, dev, limit=100)
        t2 = time.perf_counter()
        merge_t.append(t1 - t)
        eval_t.append(t2 - t1)
    m, e = statistics.median(merge_t), statistics.median(eval_t)
    print(f"trial on the embedded world: merge {m * 1e3:.1f} ms, score {e:.2f} s, merge share {m / (m + e):.2%} "
          f"(median of {reps})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=int, default=32_000_000)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-trial", action="store_true")
    a = ap.parse_args()
    params, reps = (4_000_000, 3) if a.quick else (a.params, a.reps)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, P = {params:,} parameters")
    bw = copy_bandwidth(params * 4, reps)
    print(f"copy bandwidth: {bw / 1e9:.2f} GB/s (fp32 copy of {params * 4 / 2**20:.0f} MiB)")
    print("| dtype | K | merge GB/s | ÷ copy bandwidth |\n|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for k in (1, 2, 4, 8):
            mb = merge_bandwidth(params, k, dtype, reps)
            print(f"| {str(dtype).removeprefix('torch.')} | {k} | {mb / 1e9:.2f} | {mb / bw:.2f} |", flush=True)
    if not a.skip_trial:
        trial_share(3 if a.quick else 5)


if __name__ == "__main__":
    main()
