"""Batched chat replies against one reply per lease, in process, on the embedded model (issue 15).

    python bench/chat_batching.py                 # 20 concurrent requests, each mode 3 times, ~1 min on 2 busy cores
    python bench/chat_batching.py --requests 8 --repeats 1 --json out.json

The engine holds the embedded base (3.3M-parameter Llama) with its instruction vector; every request asks the
same merge (*base + instruction*, the Chat tab's first default pane) for a reply with the Chat tab's defaults
(chat template, 48 new tokens sampled at temperature 0.8, top-p 0.95; seed = request number). All requests are
sent at once from their own threads through ``workbench.chatting.stream_reply``, as concurrent browser sessions
do, and the wall time runs until the last reply is complete. Two modes, alternated within one run so machine
load hits both alike: ``one per lease`` (``ReplyBatcher(max_batch=1)``: every reply its own lease and
``generate``, the workbench before batching) and ``batched`` (``ReplyBatcher(max_batch=--batch)``, the
default). Both run on the engine's default concurrency (2 leases at once on 2 cores at 1 torch thread).
Per-row seeded sampling makes the replies of both modes equal; the script counts how many are.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from _common import emit_json

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PROMPTS = ["Hello! What can you do?", "Write a short poem about the sea.", "What is 12 + 35?",
           "Translate 'good morning' into Japanese.", "def fibonacci(n):", "Tell me about Tokyo.",
           "日本の首都はどこですか？", "Explain what a merge of models is.", "Give me three colours.",
           "中文：你好，今天天气怎么样？"]  # bench/load_chat.py's prompts


def open_engine(threads: int):
    """The embedded base with its instruction vector (also the pool's one distribution vector)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimer_lib.checkpoints.vectors import extract_vector
    from optimer_lib.data import assets_dir
    from optimer_lib.engine import MergeEngine

    torch.set_num_threads(threads)
    a = assets_dir()
    model = AutoModelForCausalLM.from_pretrained(a / "base")
    tok = AutoTokenizer.from_pretrained(a / "base")
    it = extract_vector(a / "base", a / "instruct", name="instruct")
    return MergeEngine(model, tok, [it], instruction=it)


def one_round(engine, replies, n: int, max_new: int) -> tuple[float, list[float], list[str]]:
    """``n`` requests at once through ``replies``: (wall seconds, latencies, final texts)."""
    from workbench.chatting import GenSettings, stream_reply

    state = engine.state({}, 1.0)
    texts, lat = [""] * n, [0.0] * n
    go = threading.Barrier(n + 1)

    def client(i: int) -> None:
        go.wait()
        t0 = time.perf_counter()
        for text in stream_reply(engine, state, [], PROMPTS[i % len(PROMPTS)],
                                 GenSettings(max_new_tokens=max_new, seed=i), replies=replies):
            texts[i] = text
        lat[i] = time.perf_counter() - t0

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    go.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, lat, texts


def main(argv: list[str] | None = None) -> dict:
    from optimer_lib.engine.batching import ReplyBatcher

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3, help="rounds per mode, alternated")
    p.add_argument("--batch", type=int, default=16, help="max rows per batch in the batched mode")
    p.add_argument("--window-ms", type=float, default=25)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the workbench's default on <= 4 cores)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    engine = open_engine(args.threads)
    modes = {"one per lease": ReplyBatcher(engine, max_batch=1),
             "batched": ReplyBatcher(engine, max_batch=args.batch, window_s=args.window_ms / 1000)}
    one_round(engine, modes["batched"], 2, 4)  # warm-up: slot merged, kernels loaded
    runs: dict[str, list] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for name, replies in modes.items():
            runs[name].append(one_round(engine, replies, args.requests, args.max_new_tokens))
    out: dict = {}
    for name, rs in runs.items():
        wall = statistics.median(r[0] for r in rs)
        lat = [x for r in rs for x in r[1]]
        out[name] = {"wall_s": round(wall, 2), "req_per_s": round(args.requests / wall, 2),
                     "p50_s": round(statistics.median(lat), 2), "max_s": round(max(lat), 2),
                     "walls": [round(r[0], 2) for r in rs]}
    st = modes["batched"].stats()
    same = sum(a == b for a, b in zip(runs["one per lease"][0][2], runs["batched"][0][2], strict=True))
    result = {
        "date": dt.date.today().isoformat(), "requests": args.requests, "repeats": args.repeats,
        "max_new_tokens": args.max_new_tokens, "batch": args.batch, "window_ms": args.window_ms,
        "threads": args.threads, "concurrency": engine.concurrency, **out,
        "speedup": round(out["one per lease"]["wall_s"] / out["batched"]["wall_s"], 2),
        "batches_per_round": round((st.batches - 1) / args.repeats, 1), "largest_batch": st.largest,
        "replies_equal": f"{same}/{args.requests}", "cpus": os.cpu_count(), "machine": platform.machine(),
        "load_avg": [round(x, 1) for x in os.getloadavg()],
        "command": "python bench/chat_batching.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    emit_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
