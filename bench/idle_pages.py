"""CPU an idle workbench page costs: the server's and the browser's, while N pages sit on one tab.

    python bench/idle_pages.py                                    # 5 pages: Search, then Tune; 60 s idle
    python bench/idle_pages.py --root /tmp/old --root .           # two checkouts, alternated (--rounds 2)

Each page is a real chromium page (Debian's, as the browser tests use) that loads the workbench, waits for its
first paint (the Pool tab's vector table), opens the ``--visit`` tabs in turn (default: Search, as a researcher
glances at a running search), then ``--tab``, and does nothing for ``--seconds``. The figures are
CPU seconds per second of that window (1.0 = one core), summed over the server process (every thread) and over
every chromium process: what open, idle pages keep costing. Timers that poll the server show up in both. Checkouts
alternate round by round, so a shared machine's drift falls on both; compare them as ratios within one run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path

from _common import emit_json, free_port, process_cpu_s
from load_chat import ROOT, ensure_pool, start_server

sys.path.insert(0, str(ROOT / "tests"))
from helpers import chromium_path  # noqa: E402  (tests/helpers.py: the one place that finds Debian's chromium)


def tree_cpu_s(root_pid: int, skip: int | None = None) -> float:
    """CPU seconds so far of every process below ``root_pid`` (not itself), leaving out ``skip`` and its tree: from
    this script, Playwright's driver and the chromium it launched (browser, renderers, GPU process)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    total, todo = 0.0, [c for c in children.get(root_pid, []) if c != skip]
    while todo:
        pid = todo.pop()
        if pid == skip:
            continue
        try:
            total += process_cpu_s(pid)
        except OSError:  # gone meanwhile
            continue
        todo += children.get(pid, [])
    return total


def one_round(root: Path, workdir: Path, pages: int, visit: list[str], tab: str, seconds: float) -> dict[str, float]:
    """Server and browser CPU per second while ``pages`` pages of checkout ``root`` sit idle on ``tab`` (after
    opening the ``visit`` tabs)."""
    from playwright.sync_api import sync_playwright

    port = free_port()
    server = start_server(workdir, port, None, root=root)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(chromium_path()), headless=True,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            opened = []
            for _ in range(pages):
                pg = browser.new_page(viewport={"width": 1400, "height": 1000})
                pg.goto(f"http://127.0.0.1:{port}/", timeout=300_000)
                pg.wait_for_selector("#pool-table [role=row][data-index]", timeout=300_000)
                for name in [*visit, tab]:
                    pg.get_by_role("tab", name=name).click()
                    time.sleep(1.0)
                opened.append(pg)
            time.sleep(5)  # the first chart and any page-load work settle before the window
            me = os.getpid()
            s0, b0, t0 = process_cpu_s(server.pid), tree_cpu_s(me, skip=server.pid), time.monotonic()
            time.sleep(seconds)
            s1, b1, t1 = process_cpu_s(server.pid), tree_cpu_s(me, skip=server.pid), time.monotonic()
            browser.close()
    finally:
        server.terminate()
        server.wait(30)
    return {"server_cpu_per_s": (s1 - s0) / (t1 - t0), "browser_cpu_per_s": (b1 - b0) / (t1 - t0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, action="append", help="a checkout to serve (repeat to compare; default: this)")
    ap.add_argument("--workdir", type=Path, default=None, help="a workdir with a pool (default: the quick demo pool)")
    ap.add_argument("--pages", type=int, default=5)
    ap.add_argument("--visit", default="Search", help="tabs each page opens first, comma-separated ('' for none)")
    ap.add_argument("--tab", default="Tune", help="the tab every page then sits on (Pool, Tune, Search, Chat, Export)")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--rounds", type=int, default=2, help="rounds per checkout, alternated")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    roots = [r.resolve() for r in (a.root or [ROOT])]
    workdir = ensure_pool(a.workdir)
    runs: dict[str, list[dict[str, float]]] = {str(r): [] for r in roots}
    for k in range(a.rounds):
        for r in roots:
            res = one_round(r, workdir, a.pages, [v for v in a.visit.split(",") if v], a.tab, a.seconds)
            runs[str(r)].append(res)
            print(f"round {k + 1}, {r}: server {res['server_cpu_per_s']:.3f}, browser {res['browser_cpu_per_s']:.3f} "
                  "CPU s per s", flush=True)
    summary = {str(r): {key: statistics.median(x[key] for x in runs[str(r)])
                        for key in ("server_cpu_per_s", "browser_cpu_per_s")} for r in roots}
    emit_json({"date": dt.date.today().isoformat(), "pages": a.pages, "visit": a.visit, "tab": a.tab,
               "seconds": a.seconds,
               "rounds": a.rounds, "workdir": str(workdir), "runs": runs, "median": summary}, a.json)


if __name__ == "__main__":
    main()
