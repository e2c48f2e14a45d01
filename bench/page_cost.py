"""Server CPU per workbench page load, and the latency of N page loads at once.

    python bench/page_cost.py                                  # 20 pages on the quick demo pool (runs/quick)
    python bench/page_cost.py --root /tmp/old-checkout         # the server of another checkout (a git worktree)

A page load is what bench/load_chat.py times (GET the page, then the page-load event ``refresh_all``), but here
the loads run one at a time and the figure is the CPU seconds the server process spent per load (Linux
``/proc/<pid>/stat``: user + system, every thread). Under concurrent load the page-load latency is roughly the
number of waiting pages times this cost over the cores left, and CPU time varies far less than wall time on a
shared machine, so two servers compare well through it: run both in one session and read the ratio. The first
``--warm`` loads (default 3) are not counted: Gradio and the app fill their caches on them.

Then ``--together`` pages (default 20, 0 to skip) connect and load the page at the same moment, as the 20 clients
of bench/load_chat.py do before chatting; their page-load latencies (median, max) say how the server orders the
work of pages that arrive together. Both servers of a comparison should run one after the other in one session:
the wall times vary from run to run on a shared machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import threading
import time
import urllib.request
from pathlib import Path

from _common import emit_json, free_port, process_cpu_s
from load_chat import ROOT, ensure_pool, start_server


def load_page(url: str, client) -> None:
    """What a browser does to show the page: GET it, then run the page-load event."""
    import httpx

    httpx.get(url, cookies=getattr(client, "cookies", None), timeout=120).raise_for_status()
    client.predict(api_name="/refresh_all")


def together(url: str, n: int) -> list[float]:
    """Seconds each of ``n`` page loads took when all started at the same moment (clients connected first)."""
    from gradio_client import Client

    clients = [Client(url, verbose=False, httpx_kwargs={"timeout": 120}) for _ in range(n)]
    start, took = threading.Barrier(n), []

    def one(client) -> None:
        start.wait()
        t0 = time.perf_counter()
        load_page(url, client)
        took.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=one, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in clients:
        c.close()
    return sorted(took)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pages", type=int, default=20, help="page loads counted (default 20)")
    p.add_argument("--warm", type=int, default=3, help="page loads first, not counted (default 3)")
    p.add_argument("--together", type=int, default=20, help="pages loaded at once afterwards (default 20; 0: none)")
    p.add_argument("--workdir", type=Path, help="a workdir with a pool (default: as bench/load_chat.py)")
    p.add_argument("--root", type=Path, default=ROOT, help="the checkout whose server runs (default: this one)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    if not Path("/proc/self/stat").is_file():
        raise SystemExit("page_cost.py reads a process's CPU time from /proc: it runs on Linux only")
    from gradio_client import Client

    workdir = ensure_pool(args.workdir).resolve()  # the server of --root runs in that checkout
    port = free_port()
    server = start_server(workdir, port, None, root=args.root.resolve())
    url = f"http://127.0.0.1:{port}/"
    time.sleep(5)  # a served app warms its first chart at launch (Session.warm): not a page's cost
    cpu, wall = [], []
    try:
        for i in range(args.warm + args.pages):
            client = Client(url, verbose=False, httpx_kwargs={"timeout": 120})  # connecting: not a page's cost
            c0, t0 = process_cpu_s(server.pid), time.perf_counter()
            load_page(url, client)
            if i >= args.warm:
                cpu.append(process_cpu_s(server.pid) - c0)
                wall.append(time.perf_counter() - t0)
            client.close()
        size = len(urllib.request.urlopen(url, timeout=120).read())
        at_once = together(url, args.together) if args.together > 0 else []
    finally:
        server.terminate()
        server.wait(timeout=30)
    result = {"date": dt.date.today().isoformat(), "pages": args.pages, "root": str(args.root),
              "workdir": str(workdir), "server_cpu_per_page_s": round(statistics.fmean(cpu), 4),
              "server_cpu_per_page_median_s": round(statistics.median(cpu), 4),
              "wall_per_page_s": round(statistics.fmean(wall), 4), "page_bytes": size, "together": len(at_once),
              "together_p50_s": round(statistics.median(at_once), 2) if at_once else None,
              "together_max_s": round(at_once[-1], 2) if at_once else None, "cpus": os.cpu_count()}
    ms = {k: result[k] * 1000 for k in ("server_cpu_per_page_s", "server_cpu_per_page_median_s", "wall_per_page_s")}
    line = (f"{args.pages} page loads: server CPU {ms['server_cpu_per_page_s']:.0f} ms per page (median "
            f"{ms['server_cpu_per_page_median_s']:.0f} ms), wall {ms['wall_per_page_s']:.0f} ms, "
            f"page {size / 1e3:.0f} kB")
    if at_once:
        line += (f"; {len(at_once)} at once: page load median {result['together_p50_s']:.2f} s, "
                 f"max {result['together_max_s']:.2f} s")
    print(line, flush=True)
    emit_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
