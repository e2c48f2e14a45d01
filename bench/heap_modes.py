"""Tune scoring time and process memory under three ways of handing freed memory back to the OS (glibc).

    python bench/heap_modes.py --workdir runs/bench-engine --moves 6 --out bench/results/heap_modes.json

A served workbench scores in many threads. glibc keeps what each thread freed in per-thread heaps unless told
otherwise, so the server's memory grew with every browser session. Modes, each in a fresh process:

- ``256k``: a fixed 256 KiB mmap threshold (``optimer workbench --heap lean``): every block of 256
  KiB or more is its own mapping, returned on free, so each activation of each forward pass is mapped and
  page-faulted anew;
- ``trim``: glibc's defaults, and ``malloc_trim`` when each engine lease ends (``MergeEngine(trim_memory=True)``);
- ``limit``: ``trim`` plus :func:`optimer_lib.engine.heap.limit_heap` (2 arenas, 32 MiB threshold): what
  ``optimer workbench --heap fast`` does, less its 5 s trimmer thread.

Each process opens the workbench pool of ``--workdir`` with one torch thread and scores ``--moves`` Tune moves
(the default scoring set), each from a new thread with a new session, as Gradio's workers would; it prints the
seconds per move and RssAnon after each. Compare the modes within one run: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from _common import emit_json

CHILD = """
import json, sys, threading, time, torch
from pathlib import Path
torch.set_num_threads(1)
mode, workdir, moves = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "256k":
    from optimer_lib.engine.heap import configure_heap
    assert configure_heap("lean")
if mode == "limit":
    from optimer_lib.engine.heap import limit_heap
    assert limit_heap()
def anon():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024 / 1024
from workbench.session import Session
from workbench.workspace import Workspace
ws = Workspace(workdir)
ws.pool().engine.trim_memory = mode != "256k"
out = {"mode": mode, "open_gb": round(anon(), 3), "seconds": [], "anon_gb": []}
for i in range(moves):
    s = Session(ws)
    t = threading.Thread(target=lambda: [u for u in s.score_stream({n: 0.1 * (i + 1) for n in s.names}, 0.0)])
    t0 = time.perf_counter()
    t.start()
    t.join()
    out["seconds"].append(round(time.perf_counter() - t0, 2))
    out["anon_gb"].append(round(anon(), 3))
print(json.dumps(out))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("runs/bench-engine"),
                   help="a workbench workdir with a pool (bench/engine_sessions.py --smollm2 writes runs/bench-engine)")
    p.add_argument("--moves", type=int, default=6, help="Tune moves per mode, each in a new thread and session")
    p.add_argument("--modes", default="256k,trim,limit", help="comma-separated modes, run in this order")
    p.add_argument("--out", type=Path, help="write the figures here as JSON")
    a = p.parse_args()
    if not (a.workdir / "workbench.json").is_file() and not (a.workdir / "vectors").is_dir():
        sys.exit(f"no pool in {a.workdir}: run `python bench/engine_sessions.py --smollm2 --sessions 1` first, or "
                 "give --workdir")
    rows = []
    for mode in a.modes.split(","):
        done = subprocess.run([sys.executable, "-c", CHILD, mode, str(a.workdir), str(a.moves)], check=True,
                              capture_output=True, text=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row["median_s_after_first"] = round(statistics.median(row["seconds"][1:]), 2)
        rows.append(row)
    print("| mode | seconds per Tune move (median of moves 2+) | RssAnon after pool open, after each move (GB) |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['median_s_after_first']} ({r['seconds']}) | {r['open_gb']}; {r['anon_gb']} |")
    base = next((r for r in rows if r["mode"] == "256k"), None)
    if base:
        for r in rows:
            print(f"{r['mode']}: {r['median_s_after_first'] / base['median_s_after_first']:.2f}x the 256k time")
    emit_json({"workdir": str(a.workdir), "moves": a.moves, "rows": rows}, a.out)


if __name__ == "__main__":
    main()
