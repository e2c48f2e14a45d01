"""OptiMer side by side with mergekit on the same base and vectors (issue 7, item 3).

    python -m venv /tmp/mk-venv && /tmp/mk-venv/bin/pip install /path/to/torch-2.13.0+cpu.whl mergekit==0.1.5
    python bench/vs_mergekit.py --mk-venv /tmp/mk-venv          # ~10 min on 2 busy cores
    python bench/vs_mergekit.py --mk-venv /tmp/mk-venv --reps 3 --limits 30 --threads 1

mergekit lives in its own virtual environment (its pins differ from ours; install the CPU torch
wheel first so pip does not pull a CUDA one). The pool is the quick demo pool under ``--pool``
(vectors/*.safetensors and the CPT checkpoints they came from, cpt/<name>), built and cached by
``optimer demo --quick`` or ``bench/merge_throughput.py``. Same weights for both tools.

1. File to file: wall time and peak RSS (``/usr/bin/time -v``) of ``mergekit-yaml`` with a
   ``task_arithmetic`` recipe over the CPT checkpoints vs ``optimer merge`` over the vectors, each
   writing an HF checkpoint; alternated, medians of ``--reps``. The two outputs are compared tensor
   by tensor.
2. Per search trial: "mergekit merge to disk + load the merged model + evaluate" vs "resident merge
   + evaluate" (evaluate = the ``balanced`` objective on the dev suite at ``--limits`` documents per
   set). mergekit is timed both as its CLI (a new process per trial, as a script looping over
   ``mergekit-yaml`` would) and in-process (``mergekit.merge.run_merge`` called repeatedly in one
   long-lived process: its best case).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = {"ja": 0.3, "zh": 0.2, "math": 0.4, "code": 0.1}

_INPROC = r"""
import json, sys, time, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
cfg_path, out, reps, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cfg = MergeConfiguration.model_validate(yaml.safe_load(open(cfg_path)))
opts = MergeOptions(copy_tokenizer=True, quiet=True, num_threads=threads or None)
times = []
for _ in range(reps + 1):
    t = time.perf_counter()
    run_merge(cfg, out, opts)
    times.append(time.perf_counter() - t)
print(json.dumps(times[1:]))
"""


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of ``cmd`` under /usr/bin/time -v; raises with its output on failure."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    if not wall or not rss:
        raise RuntimeError(f"no /usr/bin/time -v figures in:\n{proc.stderr[-2000:]}")
    h, m, s = wall.groups()
    return int(h or 0) * 3600 + int(m) * 60 + float(s), int(rss.group(1)) / 1024


def _max_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    def state(d: Path) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    sa, sb = state(a), state(b)
    common = set(sa) & set(sb)
    if not common:
        raise RuntimeError(f"no tensor names in common between {a} and {b}")
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in common)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mk-venv", type=Path, default=Path("/tmp/mk-venv"))
    ap.add_argument("--pool", type=Path, default=Path("runs/quick"))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--limits", default="30,100", help="dev documents per set for the per-trial comparison")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in every process (0: torch's choice)")
    a = ap.parse_args()
    mk_yaml, mk_py = a.mk_venv / "bin" / "mergekit-yaml", a.mk_venv / "bin" / "python"
    if not mk_yaml.exists():
        sys.exit(f"error: {mk_yaml} not found: install mergekit in its own venv (see this script's docstring)")
    if a.threads:
        torch.set_num_threads(a.threads)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if a.threads:
        env.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))

    import yaml

    from optimer_lib.checkpoints.models import load_model
    from optimer_lib.data import assets_dir, load_eval_suite
    from optimer_lib.merging.export import mergekit_config
    from optimer_lib.merging.pool import open_pool
    from optimer_lib.scoring.objectives import parse_objective

    base = assets_dir() / "base"
    pool_dir = (ROOT / a.pool).resolve()
    vec_files = [pool_dir / "vectors" / f"{n}.safetensors" for n in WEIGHTS]
    missing = [str(f) for f in vec_files if not f.exists()] + \
        [str(pool_dir / "cpt" / n) for n in WEIGHTS if not (pool_dir / "cpt" / n / "config.json").exists()]
    if missing:
        sys.exit(f"error: pool files missing ({', '.join(missing)}): run `optimer demo --quick --workdir {a.pool}`")
    pool = open_pool(base, vec_files)
    mk_version = subprocess.run([str(mk_py), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                                capture_output=True, text=True).stdout.strip()
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}, mergekit {mk_version}; {time.strftime('%Y-%m-%d')}; base {base} "
          f"({sum(p.numel() for p in pool.model.parameters()):,} params), vectors {', '.join(WEIGHTS)}; "
          f"weights {WEIGHTS}; medians of {a.reps}")

    tmp = Path(tempfile.mkdtemp(prefix="vs-mergekit-"))
    cfg = mergekit_config(base_path=str(base), vectors=pool.vectors, weights=WEIGHTS, dtype="float32")
    for entry, v in zip(cfg["models"], pool.vectors, strict=True):  # the CPT checkpoints, by absolute path
        entry["model"] = str(pool_dir / "cpt" / v.name)
    cfg_path = tmp / "mergekit.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    mk_cmd = [str(mk_yaml), str(cfg_path), str(tmp / "mk-out"), "--copy-tokenizer", "--quiet"]
    if a.threads:
        mk_cmd += ["--num-threads", str(a.threads)]
    vec_args = [x for n, w in WEIGHTS.items() for x in ("--vector", f"{pool_dir}/vectors/{n}.safetensors={w}")]
    ours_cmd = [str(Path(sys.executable).parent / "optimer"), "merge", "--base", str(base),
                "--out", str(tmp / "om-out"), "--force", *vec_args]

    # 1. File to file.
    runs: dict[str, list[tuple[float, float]]] = {"mergekit-yaml": [], "optimer merge": []}
    for rep in range(a.reps + 1):  # rep 0 warms the page cache for both
        for name, cmd in (("mergekit-yaml", mk_cmd), ("optimer merge", ours_cmd))[:: 1 if rep % 2 else -1]:
            shutil.rmtree(tmp / ("mk-out" if name == "mergekit-yaml" else "om-out"), ignore_errors=True)
            r = _timed(cmd, env)
            if rep:
                runs[name].append(r)
    diff = _max_diff(tmp / "mk-out", tmp / "om-out")
    print("\n| tool | wall s (median) | wall s (min–max) | peak RSS MiB (median) |\n|---|---|---|---|")
    for name, rs in runs.items():
        walls = [w for w, _ in rs]
        print(f"| {name} | {statistics.median(walls):.2f} | {min(walls):.2f}–{max(walls):.2f} | "
              f"{statistics.median(r for _, r in rs):.0f} |")
    ratio = statistics.median(m[0] / o[0] for m, o in zip(runs["mergekit-yaml"], runs["optimer merge"], strict=True))
    print(f"mergekit ÷ optimer wall time: {ratio:.2f}× (median of paired reps); "
          f"max |difference| of the two merged checkpoints: {diff:.2e}")

    # 2. Per trial.
    inproc = subprocess.run([str(mk_py), "-c", _INPROC, str(cfg_path), str(tmp / "mk-inproc"), str(a.reps),
                             str(a.threads)], capture_output=True, text=True, env=env, cwd=ROOT)
    if inproc.returncode != 0:
        raise RuntimeError(f"in-process mergekit failed:\n{inproc.stderr[-3000:]}")
    mk_inproc = statistics.median(json.loads(inproc.stdout.strip().splitlines()[-1]))
    dev = load_eval_suite(None, "dev")
    objective = parse_objective("balanced", list(dev.texts), qa_names=list(dev.qa))
    for limit in [int(x) for x in a.limits.split(",") if x]:
        objective.evaluate(pool.model, pool.tokenizer, dev, limit=limit)  # warm the tokenisation cache
        parts: dict[str, list[float]] = {"mk_cli": [], "load": [], "eval_mk": [], "merge": [], "eval_ours": []}
        for rep in range(a.reps):
            w = {n: v + 0.01 * (rep + 1) for n, v in WEIGHTS.items()}
            shutil.rmtree(tmp / "mk-out", ignore_errors=True)
            parts["mk_cli"].append(_timed(mk_cmd, env)[0])
            t = time.perf_counter()
            model = load_model(tmp / "mk-out")
            parts["load"].append(time.perf_counter() - t)
            t = time.perf_counter()
            objective.evaluate(model, pool.tokenizer, dev, limit=limit)
            parts["eval_mk"].append(time.perf_counter() - t)
            del model
            t = time.perf_counter()
            pool.merger.set_weights(w)
            parts["merge"].append(time.perf_counter() - t)
            t = time.perf_counter()
            objective.evaluate(pool.model, pool.tokenizer, dev, limit=limit)
            parts["eval_ours"].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in parts.items()}
        cli = [c + ld + e for c, ld, e in zip(parts["mk_cli"], parts["load"], parts["eval_mk"], strict=True)]
        inp = [mk_inproc + ld + e for ld, e in zip(parts["load"], parts["eval_mk"], strict=True)]
        ours = [m + e for m, e in zip(parts["merge"], parts["eval_ours"], strict=True)]
        print(f"\nper trial at {limit} documents per dev set (balanced objective):\n"
              "| trial | merge s | load s | evaluate s | total s (median) | ÷ resident (median of paired reps) |\n"
              "|---|---|---|---|---|---|")
        print(f"| mergekit-yaml (new process) + load + evaluate | {med['mk_cli']:.2f} | {med['load']:.2f} | "
              f"{med['eval_mk']:.2f} | {statistics.median(cli):.2f} | "
              f"{statistics.median(c / o for c, o in zip(cli, ours, strict=True)):.2f}× |")
        print(f"| mergekit run_merge (in process) + load + evaluate | {mk_inproc:.2f} | {med['load']:.2f} | "
              f"{med['eval_mk']:.2f} | {statistics.median(inp):.2f} | "
              f"{statistics.median(c / o for c, o in zip(inp, ours, strict=True)):.2f}× |")
        print(f"| resident merge + evaluate | {med['merge']:.3f} | 0 | {med['eval_ours']:.2f} | "
              f"{statistics.median(ours):.2f} | 1.00× |")
        print(f"merge-only cost per trial: mergekit CLI ÷ resident {med['mk_cli'] / med['merge']:.0f}×, "
              f"mergekit in-process + load ÷ resident {(mk_inproc + med['load']) / med['merge']:.0f}×", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
