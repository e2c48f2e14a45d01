"""Peak memory of streaming extract/merge on a sharded ~100M-parameter Llama (issue 8).

    .venv/bin/python bench/streaming_rss.py [--workdir /tmp/optimer-rss] [--keep] [--in-memory]

Builds a random Llama (~103M parameters, fp32, ~410 MB) saved in ~4 shards plus two perturbed "CPT"
copies under --workdir (never the repository), then runs ``optimer vector extract`` (twice) and
``optimer merge`` (two vectors) with ``--streaming`` under ``/usr/bin/time -v`` (Debian package ``time``)
and compares each peak RSS with the bound 1.3 x model size + one shard + interpreter overhead, the
overhead being the peak RSS of a process that only imports what the command imports. ``--in-memory``
also measures the non-streaming paths for contrast. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHARD = 110_000_000  # bytes: the 98 MB embedding fits, ~4 shards for the whole model
IMPORTS = ("import optimer_lib.cli, optimer_lib.checkpoints.streaming, optimer_lib.merging.methods, "
           "optimer_lib.merging.export, "
           "optimer_lib.checkpoints.vectors, optimer_lib.checkpoints.models, transformers, safetensors.torch, yaml; "
           "from transformers import AutoModelForCausalLM, AutoConfig, LlamaForCausalLM")


def build(workdir: Path) -> int:
    """Base + two tuned copies as sharded HF dirs; returns the base's size on disk in bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from optimer_lib.data import assets_dir

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=11,
                      num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=512,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    n = sum(p.numel() for p in model.parameters())
    print(f"model: {n / 1e6:.1f}M parameters (fp32), tied embeddings", flush=True)
    model.save_pretrained(workdir / "base", max_shard_size=SHARD)
    for i in range(2):
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 1e-3)
        model.save_pretrained(workdir / f"tuned{i}", max_shard_size=SHARD)
    del model
    for f in ("tokenizer.json", "tokenizer_config.json"):  # the in-memory merge exports a tokenizer too
        shutil.copy(assets_dir() / "base" / f, workdir / "base" / f)
    return sum(f.stat().st_size for f in (workdir / "base").glob("*.safetensors"))


def peak_rss(argv: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of ``argv`` run under /usr/bin/time -v."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", *argv], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(argv)}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    return kb / 1024, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/optimer-rss"))
    ap.add_argument("--keep", action="store_true", help="keep the built checkpoints")
    ap.add_argument("--in-memory", action="store_true", help="also measure the non-streaming paths")
    a = ap.parse_args()
    if not Path("/usr/bin/time").exists():
        sys.exit("/usr/bin/time is missing: apt-get install time")
    shutil.rmtree(a.workdir, ignore_errors=True)
    a.workdir.mkdir(parents=True)
    w = a.workdir
    size_mb = build(w) / 2**20
    shard_mb = SHARD / 2**20
    shards = len(list((w / "base").glob("*.safetensors")))
    py, cli = sys.executable, [sys.executable, "-m", "optimer_lib.cli"]
    base_rss, _ = peak_rss([py, "-c", IMPORTS])
    bound = 1.3 * size_mb + shard_mb + base_rss
    runs = {
        "extract (streaming)": [*cli, "vector", "extract", "--base", w / "base", "--tuned", w / "tuned0",
                                "--out", w / "v0.safetensors", "--name", "v0", "--streaming", "--shard-size", SHARD],
        "extract #2 (streaming)": [*cli, "vector", "extract", "--base", w / "base", "--tuned", w / "tuned1",
                                   "--out", w / "v1.safetensors", "--name", "v1", "--streaming",
                                   "--shard-size", SHARD],
        "merge 2 vectors (streaming)": [*cli, "merge", "--base", w / "base", "--vector", f"{w / 'v0.safetensors'}=0.3",
                                        "--vector", f"{w / 'v1.safetensors'}=0.2", "--out", w / "merged",
                                        "--streaming", "--shard-size", SHARD],
    }
    if a.in_memory:
        runs["extract (in memory)"] = [*cli, "vector", "extract", "--base", w / "base", "--tuned", w / "tuned0",
                                       "--out", w / "m0.safetensors", "--name", "v0", "--no-streaming"]
        runs["merge 2 vectors (in memory)"] = [*cli, "merge", "--base", w / "base", "--vector",
                                               f"{w / 'v0.safetensors'}=0.3", "--vector",
                                               f"{w / 'v1.safetensors'}=0.2", "--out", w / "merged-mem",
                                               "--no-streaming"]
    print(f"\n{datetime.date.today()}, {os.cpu_count()} CPUs, python {sys.version.split()[0]}; model {size_mb:.0f} MiB "
          f"in {shards} shards (max {shard_mb:.0f} MiB); interpreter + imports peak RSS {base_rss:.0f} MiB; "
          f"bound 1.3 x {size_mb:.0f} + {shard_mb:.0f} + {base_rss:.0f} = {bound:.0f} MiB\n")
    print("| operation | peak RSS (MiB) | bound (MiB) | within | wall (s) |\n|---|---|---|---|---|")
    for name, argv in runs.items():
        rss, wall = peak_rss([str(x) for x in argv])
        ok = "yes" if rss <= bound else ("n/a" if "memory" in name else "NO")
        print(f"| {name} | {rss:.0f} | {bound:.0f} | {ok} | {wall:.1f} |", flush=True)
    merged = sorted(p.name for p in (w / "merged").iterdir())
    print(f"\nmerged checkpoint: {', '.join(merged)}")
    if not a.keep:
        shutil.rmtree(w, ignore_errors=True)


if __name__ == "__main__":
    main()
