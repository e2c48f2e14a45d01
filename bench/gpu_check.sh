#!/usr/bin/env bash
# GPU check of the OptiMer pipeline in bf16 (issue 8): CPT a few steps, streaming extract, resident merge
# throughput against the HBM bandwidth of a plain tensor copy, streaming merge export, a 3-trial search;
# then tests/test_gpu.py (issue 18): merges, dev losses and a seeded search on the GPU against the CPU.
#
#   bash bench/gpu_check.sh                 # on a machine with a CUDA GPU; <= 10 min on one H200
#   GPU_CHECK_TINY=1 bash bench/gpu_check.sh   # dry run on CPU with a tiny model (checks the script only)
#
# Needs a Python with torch (CUDA build), transformers, safetensors, optuna, pytest and this package importable:
# $PYTHON, else .venv/bin/python, else python3. Works offline. Writes gpu_check.json and gpu_check.log to
# $OUT (the device runner's output folder) or /tmp/optimer-gpu-check, and its checkpoints under $WORK
# (default /tmp/optimer-gpu-check/work, removed at the end unless KEEP=1).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${OUT:-/tmp/optimer-gpu-check}
WORK=${WORK:-/tmp/optimer-gpu-check/work}
mkdir -p "$OUT" "$WORK"
export OUT WORK HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# the embedded world from this checkout when the package is not installed (a bare GPU machine)
export OPTIMER_ASSETS=${OPTIMER_ASSETS:-$PWD/assets}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu_check.log"

"$PYTHON" - <<'EOF' 2>&1 | tee -a "$OUT/gpu_check.log"
import gc, json, os, shutil, subprocess, sys, time
from pathlib import Path

import torch

tiny = bool(os.environ.get("GPU_CHECK_TINY"))
if not tiny and not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch: run on a GPU machine, or GPU_CHECK_TINY=1 for a CPU dry run")
dev = "cpu" if tiny else "cuda"
work, out = Path(os.environ["WORK"]), Path(os.environ["OUT"])
res: dict = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu (tiny dry run)",
             "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}
cli = [sys.executable, "-m", "optimer_lib.cli"]


def sync() -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def step(name: str, argv: list) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    dt = time.perf_counter() - t0
    print(f"[{name}] {dt:.1f} s  {r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ''}", flush=True)
    if r.returncode:
        sys.exit(f"{name} failed:\n{r.stderr[-4000:]}")
    res[f"{name}_s"] = round(dt, 2)
    return dt


# 1. HBM bandwidth: a large device-to-device copy (read + write).
n = (1 << 20) if tiny else (1 << 30)  # 2 GiB of bf16
x, y = torch.randn(n, device=dev, dtype=torch.bfloat16), torch.empty(n, device=dev, dtype=torch.bfloat16)
for _ in range(3):
    y.copy_(x)
sync()
t0 = time.perf_counter()
for _ in range(10):
    y.copy_(x)
sync()
bw = 2 * x.numel() * 2 * 10 / (time.perf_counter() - t0) / 1e9
res["copy_bandwidth_GBps"] = round(bw, 1)
print(f"[hbm] tensor copy {bw:.0f} GB/s (read + write)", flush=True)
del x, y

# 2. A random Llama (~0.84B parameters; tiny: ~1M) saved in bf16 shards, with the repository's tokenizer.
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

cfg = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4) if tiny else \
    dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16)
torch.manual_seed(0)
with torch.device(dev):
    model = LlamaForCausalLM(LlamaConfig(vocab_size=8192, num_key_value_heads=cfg["num_attention_heads"],
                                         max_position_embeddings=1024, tie_word_embeddings=True,
                                         bos_token_id=1, eos_token_id=2, pad_token_id=0, **cfg))
res["params_M"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
shutil.rmtree(work, ignore_errors=True)
model.to(torch.bfloat16).save_pretrained(work / "base", max_shard_size="200KB" if tiny else "500MB")
del model
for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    if (Path("assets/base") / f).exists():
        shutil.copy(Path("assets/base") / f, work / "base" / f)
print(f"[model] {res['params_M']}M parameters, bf16, {len(list((work / 'base').glob('*.safetensors')))} shards",
      flush=True)

# 3. CPT a few steps on two embedded corpora (fp32 master weights, bf16 autocast on CUDA).
steps, bs, seq = (3, 2, 32) if tiny else (20, 8, 512)
for data in ("ja", "math"):
    step(f"train_{data}", [*cli, "train", "--base", work / "base", "--data", data, "--out", work / f"cpt-{data}",
                           "--tokens", steps * bs * seq, "--batch-size", bs, "--seq-len", seq, "--lr", "1e-4",
                           "--device", dev])

# 4. Streaming extract on the device, vectors stored in bf16.
for data in ("ja", "math"):
    step(f"extract_{data}", [*cli, "vector", "extract", "--base", work / "base", "--tuned", work / f"cpt-{data}",
                             "--out", work / f"{data}.safetensors", "--name", data, "--streaming", "--device", dev,
                             "--dtype", "bfloat16", "--shard-size", "200KB" if tiny else "1GB"])

# 5. Resident merge throughput (what every search trial does) vs the copy bandwidth.
from optimer_lib.merging.pool import open_pool  # noqa: E402

vecs = [work / "ja.safetensors", work / "math.safetensors"]
t0 = time.perf_counter()
pool = open_pool(work / "base", vecs, device=dev, dtype="bfloat16")
res["open_pool_s"] = round(time.perf_counter() - t0, 2)
touched = sum(t.param.numel() for t in pool.merger._targets)
pool.merger.set_weights({"ja": 0.1, "math": 0.1})
sync()
reps = 20
t0 = time.perf_counter()
for i in range(reps):
    pool.merger.set_weights({"ja": 0.05 * (i % 7), "math": 0.3 - 0.01 * i})
sync()
per = (time.perf_counter() - t0) / reps
# bf16 path of ResidentMerger._write_linear, bytes per parameter: scratch = base (2 read + 4 written), per
# vector scratch += delta (4 + 2 read, 4 written), param = scratch (4 read + 2 written): 12 + 10 K.
moved = touched * (12 + 10 * len(vecs))
res.update(merge_s=round(per, 4), merge_GBps=round(moved / per / 1e9, 1),
           merge_fraction_of_copy=round(moved / per / 1e9 / bw, 3), merge_params_M=round(touched / 1e6, 1))
print(f"[merge] set_weights {per * 1e3:.1f} ms for {touched / 1e6:.0f}M params: {moved / per / 1e9:.0f} GB/s "
      f"effective = {moved / per / 1e9 / bw:.0%} of the copy bandwidth", flush=True)

# 5b. The merge engine on the device: one slider move (one changed α) with the vectors on the device and
# streamed from the host (timing only: pool.model holds a merge by now, which does not change the cost;
# tests/test_gpu.py checks the engine's numbers against the CPU).
from optimer_lib.engine import MergeEngine  # noqa: E402

def allocated_gb() -> float:
    return torch.cuda.memory_allocated() / 1e9 if dev == "cuda" else 0.0


res["cuda_allocated_pool_GB"] = round(allocated_gb(), 2)  # base + vectors (on the device) + the old merger
for where in ("device", "pinned", "host"):
    gc.collect()  # the previous engine is gone on its last reference (no cycles); this makes sure of it
    before = allocated_gb()
    eng = MergeEngine(pool.model, pool.tokenizer, pool.vectors, max_slots=1, vectors_on=where)
    with eng.lease({"ja": 0.1, "math": 0.1}):
        pass
    sync()
    # what the engine added on the device: one slot (a model's worth), plus the vectors when they live there
    res[f"engine_{where}_added_GB"] = round(allocated_gb() - before, 2)
    t0 = time.perf_counter()
    for i in range(reps):
        with eng.lease({"ja": 0.1 + 0.01 * (i + 1), "math": 0.1}):
            sync()
    per_move = (time.perf_counter() - t0) / reps
    res[f"engine_move_{where}_s"] = round(per_move, 4)
    print(f"[engine] one slider move, vectors on the {where}: {per_move * 1e3:.1f} ms; the engine added "
          f"{res[f'engine_{where}_added_GB']} GB on the device", flush=True)
    del eng

# 6. A 3-trial search on the device (dev sets, tiny limits), then the streaming merge export on the device.
from optimer_lib.data import load_eval_suite  # noqa: E402
from optimer_lib.scoring.objectives import parse_objective  # noqa: E402
from optimer_lib.search.study import SearchConfig, run_search  # noqa: E402

suite = load_eval_suite(["en", "ja", "math"], "dev")
obj = parse_objective("balanced", list(suite.texts), qa_names=list(suite.qa))
t0 = time.perf_counter()
sr = run_search(pool.merger, pool.tokenizer, suite, obj, SearchConfig(trials=3, workdir=work / "search",
                storage=":memory:", search_limit=8, rescore_limit=16, top_k=1, seq_len=seq), progress=False)
res["search_3_trials_s"] = round(time.perf_counter() - t0, 2)
print(f"[search] 3 trials {res['search_3_trials_s']} s, best {sr.best_weights}", flush=True)
del pool
w = sr.best_weights
step("merge_export", [*cli, "merge", "--base", work / "base", "--vector", f"{vecs[0]}={w['ja']}", "--vector",
                      f"{vecs[1]}={w['math']}", "--out", work / "merged", "--streaming", "--device", dev,
                      "--shard-size", "200KB" if tiny else "1GB"])
cfg_out = json.loads((work / "merged" / "config.json").read_text())
assert cfg_out.get("dtype") == "bfloat16", cfg_out.get("dtype")
from transformers import AutoModelForCausalLM  # noqa: E402

m = AutoModelForCausalLM.from_pretrained(work / "merged", dtype="auto")
res["merged_loads_dtype"] = str(next(m.parameters()).dtype)
# 7. The real-model cell (issue 16) as one command on the device, on the embedded tiny base: CPT, mixture,
# vectors, search and test stages all on the GPU (SmolLM2 itself does not travel to a device machine).
step("real_cell", [*cli, "real-cell", "--workdir", work / "real-cell", "--base", "assets/base", "--device", dev,
                   "--tokens-per-run", 2048, "--seeds", "0", "--trials", 3, "--dev-docs", 2, "--test-docs", 4])
rc = json.loads((work / "real-cell" / "summary.json").read_text())
assert rc["seeds_done"] == [0], rc["seeds_done"]
res["real_cell_test"] = {k: round(v, 4) for k, v in rc["per_seed"]["0"]["test"].items()}
print(f"[real-cell] test objective per model: {res['real_cell_test']}", flush=True)
# 8. CPU-vs-GPU parity tests: on a GPU every cpu-vs-cuda case must run (a skip there is a failure).
r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", "tests/test_gpu.py"],
                   capture_output=True, text=True)
print(r.stdout[-6000:], r.stderr[-2000:], flush=True)
summary = (r.stdout.strip().splitlines() or [""])[-1]
res["test_gpu"] = summary
if r.returncode or (not tiny and "skipped" in summary):
    (out / "gpu_check.json").write_text(json.dumps(res, indent=2))
    sys.exit(f"tests/test_gpu.py failed on {dev} (exit {r.returncode}): {summary}")
(out / "gpu_check.json").write_text(json.dumps(res, indent=2))
print(json.dumps(res, indent=2))
EOF
[ -n "${KEEP:-}" ] || rm -rf "$WORK"
