"""Resident-merge throughput against this machine's copy bandwidth (issue 7, items 1 and 2).

    python bench/merge_throughput.py            # ~5 min on 2 busy cores
    python bench/merge_throughput.py --quick    # ~1 min, smaller P (partly cache-resident: optimistic)

Item 1: an in-place merge of K vectors must at least read the base and K vectors and write the
parameters: (K + 2) · P · bytes. We time ``ResidentMerger.set_weights`` on a synthetic model of
P parameters and divide that byte count by the time, then by the copy bandwidth of the same
machine (a ``torch`` copy of a P-element fp32 tensor, 2 · P · 4 bytes moved). On a shared machine
the bandwidth drifts, so each repetition times the copy, the plain merge and the chunked merges
back to back and the ratios are taken per repetition; the table shows their medians.

Speed paths, compared in the same repetitions: ``chunk_elems`` (0 = plain, one whole-tensor op per
term; N = per N-element chunk, base copy + all K adds while the chunk is in cache) and incremental
re-merge (``rebuild_every``) when one weight moves, as a workbench slider does.

Item 2: on the embedded world (the quick demo pool under runs/quick, built and cached on first use),
the share of a search trial spent merging (set_weights) versus scoring (the `balanced` objective at
``--limit`` documents per distribution).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from optimer_lib.checkpoints.vectors import DistributionVector
from optimer_lib.merging.resident import ResidentMerger


class _Flat(torch.nn.Module):
    """A stand-in model: a few large parameters (merge cost depends on bytes, not architecture)."""

    def __init__(self, params: int, dtype: torch.dtype, pieces: int = 8) -> None:
        super().__init__()
        n = params // pieces
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(n).to(dtype)) for _ in range(pieces)])


def _time(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _merger(params: int, k: int, dtype: torch.dtype) -> ResidentMerger:
    model = _Flat(params, dtype)
    vecs = [DistributionVector(f"v{i}", {n: (torch.randn(p.shape) * 0.01).to(dtype)
                                         for n, p in model.named_parameters()}, {"name": f"v{i}"})
            for i in range(k)]
    return ResidentMerger(model, vecs)


def bandwidth_table(params: int, reps: int, chunks: list[int]) -> None:
    """Item 1: per (dtype, K, path), merge bytes/s ÷ copy bytes/s, paired per repetition."""
    src = torch.empty(params, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    copy_bytes = 2 * params * 4
    print("| dtype | K | path | merge GB/s | ÷ copy (median) | ÷ copy (best rep) | ÷ plain (median) |")
    print("|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for k in (1, 2, 4, 8):
            merger = _merger(params, k, dtype)
            merger.rebuild_every = 0  # every weight changes anyway; keep the fresh path
            nbytes = (k + 2) * params * (torch.finfo(dtype).bits // 8)
            copy_t: list[float] = []
            times: dict[int, list[float]] = {c: [] for c in [0, *chunks]}
            for rep in range(reps + 1):  # rep 0 is a warm-up
                ct = _time(lambda: dst.copy_(src))
                row = {}
                for c in [0, *chunks]:
                    merger.chunk_elems = c
                    w = {f"v{i}": 0.1 + 0.01 * (rep + i) + 0.001 * c / 1024 for i in range(k)}
                    row[c] = _time(lambda w=w, m=merger: m.set_weights(w))
                if rep:
                    copy_t.append(ct)
                    for c in row:
                        times[c].append(row[c])
            copy_bw = statistics.median(copy_bytes / t for t in copy_t)
            print(f"| {str(dtype).removeprefix('torch.')} | {k} | copy | {copy_bw / 1e9:.2f} | | | |")
            for c, ts in times.items():
                per_rep = statistics.median((nbytes / t) / (copy_bytes / ct) for t, ct in zip(ts, copy_t, strict=True))
                best = (nbytes / min(ts)) / (copy_bytes / min(copy_t))
                vs_plain = statistics.median(p / t for p, t in zip(times[0], ts, strict=True))
                name = "plain" if c == 0 else f"chunk {c // 1024}K"
                print(f"| | | {name} | {statistics.median(nbytes / t for t in ts) / 1e9:.2f} | {per_rep:.2f} | "
                      f"{best:.2f} | {vs_plain:.2f}× |", flush=True)


def incremental_table(params: int, reps: int) -> None:
    """One weight moves per update (a slider): fresh chunked merge vs incremental Δα·τ update, fp32."""
    print("\n| K | fresh ms | incremental ms | fresh ÷ incremental (median of paired reps) |\n|---|---|---|---|")
    for k in (2, 4, 8):
        merger = _merger(params, k, torch.float32)
        w = {f"v{i}": 0.2 for i in range(k)}
        merger.set_weights(w)
        fresh_t, inc_t = [], []
        for rep in range(reps + 1):
            for mode, out in (("fresh", fresh_t), ("inc", inc_t)):
                merger.rebuild_every = 0 if mode == "fresh" else 1_000_000
                w = {**w, "v0": 0.2 + 0.01 * (rep + 1) * (1 if mode == "fresh" else -1)}
                t = _time(lambda w=w, m=merger: m.set_weights(w))
                if rep:
                    out.append(t)
        ratio = statistics.median(f / i for f, i in zip(fresh_t, inc_t, strict=True))
        print(f"| {k} | {statistics.median(fresh_t) * 1e3:.1f} | {statistics.median(inc_t) * 1e3:.1f} | "
              f"{ratio:.2f}× (best reps: {min(fresh_t) / min(inc_t):.2f}×) |", flush=True)


def trial_share(reps: int, limit: int) -> None:
    """Item 2: merge time ÷ trial time on the embedded world, plain and chunked merges paired."""
    from optimer_lib.data import assets_dir, load_eval_suite
    from optimer_lib.demo import DemoConfig, build_pool
    from optimer_lib.merging.pool import open_pool
    from optimer_lib.scoring.objectives import parse_objective

    paths, _ = build_pool(DemoConfig.quick(Path("runs/quick")))
    pool = open_pool(assets_dir() / "base", paths)
    n_params = sum(t.param.numel() for t in pool.merger._targets)
    dev = load_eval_suite(None, "dev")
    objective = parse_objective("balanced", list(dev.texts), qa_names=list(dev.qa))
    objective.evaluate(pool.model, pool.tokenizer, dev, limit=limit)  # warm-up: tokenisation cache
    plain_t, chunk_t, eval_t = [], [], []
    for j in range(reps):
        w = {n: 0.1 + 0.05 * ((i + j) % 5) for i, n in enumerate(pool.names)}
        pool.merger.chunk_elems = 0
        plain_t.append(_time(lambda w=w: pool.merger.set_weights(w)))
        pool.merger.chunk_elems = 1 << 20
        w = {n: v + 0.01 for n, v in w.items()}
        chunk_t.append(_time(lambda w=w: pool.merger.set_weights(w)))
        eval_t.append(_time(lambda: objective.evaluate(pool.model, pool.tokenizer, dev, limit=limit)))
    m, mc, e = statistics.median(plain_t), statistics.median(chunk_t), statistics.median(eval_t)
    share = statistics.median(c / (c + x) for c, x in zip(chunk_t, eval_t, strict=True))
    print(f"\nembedded world: {len(pool.names)} vectors, {n_params:,} merged parameters (fp32); "
          f"merge plain {m * 1e3:.1f} ms, chunked {mc * 1e3:.1f} ms; score (balanced, {limit} docs/set) {e:.2f} s; "
          f"merge share of a trial {share:.2%} (medians of {reps})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=int, default=32_000_000, help="P of the synthetic model (default 32M)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--chunks", default="65536,262144,1048576,4194304", help="chunk sizes (elements) to compare")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    ap.add_argument("--limit", type=int, default=100, help="dev documents per set in the trial of item 2")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-trial", action="store_true")
    ap.add_argument("--skip-table", action="store_true", help="only item 2 (the trial share)")
    a = ap.parse_args()
    params, reps = (4_000_000, 3) if a.quick else (a.params, a.reps)
    if a.threads:
        torch.set_num_threads(a.threads)
    chunks = [int(c) for c in a.chunks.split(",") if c]
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; P = {params:,} parameters; medians of {reps} paired repetitions; "
          f"{time.strftime('%Y-%m-%d')}\n")
    if not a.skip_table:
        bandwidth_table(params, reps, chunks)
        incremental_table(params, reps)
    if not a.skip_trial:
        trial_share(3 if a.quick else 5, a.limit)


if __name__ == "__main__":
    main()
