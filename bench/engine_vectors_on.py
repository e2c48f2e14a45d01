"""Where the merge engine keeps the vectors on a GPU: on the device, in pinned host memory, or as they are on the host.

    python3 bench/engine_vectors_on.py --json $OUT/engine_vectors_on.json       # on a CUDA machine (~1 minute)
    python3 bench/engine_vectors_on.py --tiny                                   # CPU dry run of the script

A random Llama (default 0.84B parameters, bf16, on the GPU) and two random vectors (bf16, in ordinary pageable host
memory, as a loaded vector file is). For ``vectors_on`` = device, pinned and host, one engine each (one slot):
the device memory it adds, and the median time of ``--reps`` slider moves (one changed α, a full bf16 re-merge
that reads both vectors). The pinned and host engines must produce exactly the device engine's slot (checked on
every configuration's last move). On ``--tiny`` everything runs on the CPU with ``host`` only.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import emit_json  # noqa: E402

from optimer_lib.checkpoints.vectors import DistributionVector  # noqa: E402
from optimer_lib.engine import MergeEngine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU dry run with a ~1M-parameter model")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    dev = "cpu" if args.tiny else "cuda"
    size = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4) if args.tiny \
        else dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16)
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=8192, num_key_value_heads=size["num_attention_heads"],
                                             tie_word_embeddings=True, **size)).to(torch.bfloat16).eval()
    names = {id(p): n for n, p in model.named_parameters()}
    vecs = [DistributionVector(name, {names[id(p)]: (torch.randn_like(p) * 1e-3).cpu()
                                      for p in model.parameters()}) for name in ("ja", "code")]
    params = sum(p.numel() for p in model.parameters())

    def sync() -> None:
        if dev == "cuda":
            torch.cuda.synchronize()

    def allocated() -> float:
        return torch.cuda.memory_allocated() / 1e9 if dev == "cuda" else 0.0

    res: dict = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu (tiny dry run)",
                 "torch": torch.__version__, "params_M": round(params / 1e6, 1), "dtype": "bfloat16", "rows": []}
    last = {"ja": 0.1 + 0.01 * args.reps, "code": 0.1}
    ref = None
    for where in (("host",) if args.tiny else ("device", "pinned", "host")):
        gc.collect()
        before = allocated()
        t0 = time.perf_counter()
        eng = MergeEngine(model, None, vecs, max_slots=1, vectors_on=where)
        with eng.lease({"ja": 0.1, "code": 0.1}):
            pass
        sync()
        first = time.perf_counter() - t0
        times = []
        for i in range(args.reps):
            t0 = time.perf_counter()
            with eng.lease({"ja": 0.1 + 0.01 * (i + 1), "code": 0.1}) as lease:
                sync()
            times.append(time.perf_counter() - t0)
        with eng.lease(last) as lease:
            state = {k: v.detach().to("cpu") for k, v in lease.model.state_dict().items()}
        ref = ref or state
        same = all(torch.equal(state[k], ref[k]) for k in ref)
        row = {"vectors_on": eng.vectors_on, "added_GB": round(allocated() - before, 2),
               "open_and_first_merge_s": round(first, 3), "move_median_s": round(statistics.median(times), 4),
               "move_min_s": round(min(times), 4), "same_as_device": same}
        res["rows"].append(row)
        print(f"[{where}] one slider move {row['move_median_s'] * 1e3:.1f} ms (median of {args.reps}); added "
              f"{row['added_GB']} GB on the device; slot equal to the device engine's: {same}", flush=True)
        del eng, lease
    by = {r["vectors_on"]: r["move_median_s"] for r in res["rows"]}
    if "pinned" in by:
        res["host_over_pinned"] = round(by["host"] / by["pinned"], 2)
        res["pinned_over_device"] = round(by["pinned"] / by["device"], 2)
    emit_json(res, args.json)
    if not all(r["same_as_device"] for r in res["rows"]):
        sys.exit("a placement changed the merge")


if __name__ == "__main__":
    main()
