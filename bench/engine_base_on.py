"""Process memory and merge times of the merge engine with its base on the device or memory-mapped on the host.

    nice -n 10 .venv/bin/python bench/engine_base_on.py --base /tmp/smollm2-base \
        --json bench/results/engine_base_on.json          # SmolLM2-135M (538 MB fp32), two random vectors

For each configuration (engine base_on device/host x 1 and 2 slots; and, for contrast, ``optimer search``'s pool,
``open_pool(base_on=device/host)``) a fresh process imports everything, loads a tiny model once (lazy imports,
first-load caches), then opens the pool and fills every slot with its own state. It reports RssAnon (process memory)
and RssFile (file pages: the memory-mapped base and vectors) grown since that baseline, read from /proc/self/status,
how many bytes of the base tensors merges read are file-backed, and times, with ``--repeat`` samples each: the first
merge of a slot (every tensor from base + vectors), a re-merge of one changed vector (incremental, fp32) and a full
re-merge (``lease(exact=True)``). The configurations run one after another, alternating ``--rounds`` times so that
load from other programs on shared cores falls on both sides; ratios host / device are of medians over all rounds.

Vectors: ``--vector FILE`` (repeat), else two random vectors (0.01 x each tensor's std) written once to
``--workdir`` (default /tmp/optimer-bench-base-on; memory and time depend on sizes, not on what vectors learnt).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import emit_json

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = [("engine", "device", 1), ("engine", "host", 1), ("engine", "device", 2), ("engine", "host", 2),
           ("pool", "device", 1), ("pool", "host", 1)]

PROBE = r"""
import json, statistics, sys, time, torch
from pathlib import Path
from optimer_lib.engine.heap import configure_heap
configure_heap("lean")  # freed blocks leave the process at once (--heap lean): a steady baseline
torch.set_num_threads(int(sys.argv[5]))
from optimer_lib.checkpoints.mapped import load_model_mapped
from optimer_lib.engine import MergeEngine
from optimer_lib.merging.pool import open_pool

def rss():
    f = dict(l.split(":", 1) for l in Path("/proc/self/status").read_text().splitlines() if ":" in l)
    return {k: int(f[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile")}

kind, mode, slots, repeat, _, base, tiny, *vecs = sys.argv[1:]
slots, repeat = int(slots), int(repeat)
load_model_mapped(tiny)
before = rss()
t0 = time.perf_counter()
first, step, full = [], [], []
names = [Path(v).stem for v in vecs]
if kind == "engine":
    engine = MergeEngine.open(base, vecs, base_on=mode, max_slots=slots)
    opened = time.perf_counter() - t0
    for i in range(slots):  # a state per slot: each slot's first merge builds it from base + vectors
        with engine.lease({names[0]: 0.1 * (i + 1)}) as lease:
            first.append(lease.merge_s)
    assert engine.stats().slots == slots
    for r in range(repeat):  # one slider move: one changed vector, incremental in fp32
        with engine.lease({names[0]: 0.1 * slots, names[1]: 0.01 * (r + 1)}) as lease:
            step.append(lease.merge_s)
            assert lease.changed == 1
        with engine.lease({names[0]: 0.1 * slots, names[1]: 0.01 * (r + 1)}, exact=True) as lease:
            full.append(lease.merge_s)
    mapped = engine.stats().bytes_base_mapped
else:
    pool = open_pool(base, vecs, base_on=mode)
    opened = time.perf_counter() - t0
    t = time.perf_counter(); pool.merger.set_weights({names[0]: 0.1, names[1]: 0.0})
    first.append(time.perf_counter() - t)
    for r in range(repeat):
        t = time.perf_counter(); pool.merger.set_weights({names[0]: 0.1, names[1]: 0.01 * (r + 1)})
        step.append(time.perf_counter() - t)
        t = time.perf_counter(); pool.merger.rebuild(); full.append(time.perf_counter() - t)
    from optimer_lib.checkpoints.mapped import file_backed_bytes
    mapped = file_backed_bytes(t.base for t in pool.merger._targets)[0]  # the base tensors every merge reads
after = rss()
print(json.dumps({"anon": after["RssAnon"] - before["RssAnon"], "file": after["RssFile"] - before["RssFile"],
                  "open_s": opened, "first_s": first, "step_s": step, "full_s": full, "base_mapped": mapped}))
"""


def random_vectors(base: Path, workdir: Path) -> list[Path]:
    """Two random vectors of ``base`` under ``workdir`` (kept: made once, about 10 s each for 135M)."""
    import torch
    from safetensors import safe_open

    from optimer_lib.checkpoints.streaming import checkpoint_files
    from optimer_lib.checkpoints.vectors import extract_vector, save_vector

    out = [workdir / f"{n}.safetensors" for n in ("ja", "code")]
    if all(p.is_file() for p in out):
        return out
    state = {}
    for k, f in checkpoint_files(base).items():
        with safe_open(str(f), framework="pt") as fh:
            state[k] = fh.get_tensor(k)
    for i, path in enumerate(out):
        g = torch.Generator().manual_seed(100 + i)
        tuned = {k: v + 0.01 * v.float().std() * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                 for k, v in state.items()}
        save_vector(extract_vector(state, tuned, name=path.stem, source=f"random/{path.stem}"), path, overwrite=True)
    return out


def run(config: tuple[str, str, int], base: Path, tiny: Path, vectors: list[Path], repeat: int,
        threads: int) -> dict:
    kind, mode, slots = config
    argv = [sys.executable, "-c", PROBE, kind, mode, str(slots), str(repeat), str(threads), str(base), str(tiny),
            *map(str, vectors)]
    res = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    if res.returncode:
        raise SystemExit(f"{kind} base_on={mode} slots={slots} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=Path, required=True, help="base checkpoint folder (safetensors)")
    ap.add_argument("--vector", type=Path, action="append", help="vector files (default: two random ones)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/optimer-bench-base-on"))
    ap.add_argument("--repeat", type=int, default=5, help="timed re-merges per kind and process (default 5)")
    ap.add_argument("--rounds", type=int, default=2, help="times every configuration runs, alternating")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the workbench's on <= 4 cores: 1)")
    ap.add_argument("--json", type=Path, help="also write the result here")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    a.workdir.mkdir(parents=True, exist_ok=True)
    vectors = a.vector or random_vectors(a.base, a.workdir)
    from optimer_lib.data import assets_dir
    from optimer_lib.engine.plan import pool_size

    tiny = assets_dir() / "base"  # loaded once before each baseline: imports and first-load caches
    size = pool_size(a.base, vectors)
    params = size.parameters
    samples: dict[tuple, list[dict]] = {c: [] for c in CONFIGS}
    t0 = time.time()
    for r in range(a.rounds):
        for c in CONFIGS if r % 2 == 0 else CONFIGS[::-1]:
            samples[c].append(run(c, a.base, tiny, vectors, a.repeat, a.threads))
            print(f"round {r + 1}: {c[0]} base_on={c[1]} slots={c[2]} done ({time.time() - t0:.0f} s)", file=sys.stderr)
    rows = []
    for (kind, mode, slots), runs in samples.items():
        med = {k: statistics.median(x for s in runs for x in s[k]) for k in ("first_s", "step_s", "full_s")}
        rows.append({"kind": kind, "base_on": mode, "slots": slots,
                     "anon_mb": statistics.median(s["anon"] for s in runs) / 1e6,
                     "file_mb": statistics.median(s["file"] for s in runs) / 1e6,
                     "base_mapped_mb": runs[0]["base_mapped"] / 1e6,
                     "open_s": statistics.median(s["open_s"] for s in runs), **med})
    by = {(r["kind"], r["base_on"], r["slots"]): r for r in rows}
    ratios = {f"{k}_slots{s}": {m: by[(k, "host", s)][m] / by[(k, "device", s)][m]
                                for m in ("anon_mb", "first_s", "step_s", "full_s")}
              for k, _, s in CONFIGS if _ == "host"}
    model_mb = size.base_stored_bytes / 1e6
    print(f"\n{a.base}: {params / 1e6:.1f}M parameters, {model_mb:.0f} MB stored; vectors "
          f"{', '.join(p.name for p in vectors)}; {a.threads} torch thread(s), {a.rounds} rounds x {a.repeat}\n")
    print("| what | base on | slots | RssAnon (MB) | RssFile (MB) | base mapped (MB) | first merge (s) "
          "| one changed vector (s) | full re-merge (s) |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        what = "engine" if r["kind"] == "engine" else "search pool"
        print(f"| {what} | {r['base_on']} | {r['slots']} | {r['anon_mb']:.0f} | {r['file_mb']:.0f} "
              f"| {r['base_mapped_mb']:.0f} | {r['first_s']:.3f} | {r['step_s']:.3f} | {r['full_s']:.3f} |")
    print("\nhost / device: " + "; ".join(f"{k}: anon {v['anon_mb']:.2f}, step {v['step_s']:.2f}, "
                                         f"full {v['full_s']:.2f}" for k, v in ratios.items()))
    emit_json({"base": str(a.base), "parameters": params, "model_mb": model_mb, "threads": a.threads,
               "rounds": a.rounds, "repeat": a.repeat, "rows": rows, "ratios": ratios}, a.json)


if __name__ == "__main__":
    main()
