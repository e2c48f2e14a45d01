"""Workbench chat under load: N concurrent gradio_client chat clients for T seconds (issue 9).

    python bench/load_chat.py --quick                          # 5 clients x 10 s
    python bench/load_chat.py                                  # 20 clients x 60 s
    python bench/load_chat.py --url http://127.0.0.1:7860      # against a workbench that is already running
    python bench/load_chat.py --procs 4                        # the 20 clients spread over 4 processes

Unless ``--url`` is given it starts ``optimer workbench`` on ``--workdir`` (default: the first of
runs/wb-demo, runs/quick, runs/demo holding a pool; else the quick demo pool is built in runs/wb-demo,
~3-6 min of CPT on 2 cores) on a free port, and stops it at the end.

Each client is its own browser-like session. Once every client has connected (gradio_client's handshake, which
reads /config and the API description, timed as *connect*; a browser does not do it), all of them load the page
at the same moment as a browser tab does: GET the page (HTML with the config and API description inline), then
the page-load event (``refresh_all``, which fills the session's model menus); the two together are timed as
*page load*. Then, closed loop until the time is up, sends one prompt to the Chat tab with the UI's defaults (2 panes:
base + instruction and the Tune merge, 48 new tokens sampled at temperature 0.8) and waits for both
streamed replies. A request counts as an error if the call fails or a pane ends empty or with an error
message. Latency: from submit to the last streamed reply. Requests started before the deadline finish.
By default every client is a thread of this process; ``--procs N`` spreads them over N processes, as browsers are
(in one process their Python work per page, ~80 ms, waits for one GIL; they still share the server's cores).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import emit_json, free_port, process_cpu_s

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["Hello! What can you do?", "Write a short poem about the sea.", "What is 12 + 35?",
           "Translate 'good morning' into Japanese.", "def fibonacci(n):", "Tell me about Tokyo.",
           "日本の首都はどこですか？", "Explain what a merge of models is.", "Give me three colours.",
           "中文：你好，今天天气怎么样？"]


@dataclass
class Stats:
    latencies: list[float] = field(default_factory=list)
    page_loads: list[float] = field(default_factory=list)
    connects: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    replies_chars: int = 0
    updates: int = 0  # streamed updates the finished requests received
    empty_replies: int = 0  # a tiny model may sample end-of-text first: an empty reply, not a failure
    lock: threading.Lock = field(default_factory=threading.Lock)


def _has_pool(wd: Path) -> bool:
    return (wd / "workbench.json").is_file() or any((wd / "vectors").glob("*.safetensors"))


def ensure_pool(workdir: Path | None) -> Path:
    """A workdir with a pool: the one given, an existing demo pool, or the quick demo pool built now."""
    if workdir is not None and _has_pool(workdir):
        return workdir
    for cand in ([workdir] if workdir else [ROOT / "runs/wb-demo", ROOT / "runs/quick", ROOT / "runs/demo"]):
        if _has_pool(cand):
            return cand
    wd = workdir or ROOT / "runs/wb-demo"
    print(f"building the quick demo pool in {wd} (one CPT run per distribution; minutes)", flush=True)
    from workbench.workspace import Workspace

    Workspace(wd).build_demo_pool(quick=True)  # optimer_lib.demo.build_pool(DemoConfig.quick(wd)) + workbench.json
    return wd


def start_server(workdir: Path, port: int, threads: int | None, root: Path = ROOT) -> subprocess.Popen:
    """``optimer workbench`` of the checkout ``root`` on ``workdir``, once it answers on ``port``."""
    cmd = [sys.executable, "-m", "optimer_lib.cli", "workbench", "--workdir", str(workdir), "--port", str(port)]
    if threads:
        cmd += ["--threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("OPTIMER_AUTH", None)
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url, deadline = f"http://127.0.0.1:{port}/", time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the workbench exited ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit("the workbench did not answer within 300 s")


def cpu_seconds(pid: int | None) -> float | None:
    """:func:`process_cpu_s`, or None where it cannot be read (no pid, not Linux)."""
    try:
        return process_cpu_s(pid) if pid is not None else None
    except (OSError, ValueError, IndexError):
        return None


def chat_endpoint(client) -> tuple[str, list[str]]:
    """The Chat tab's send endpoint (found by its inputs, not its generated name) and its parameter labels."""
    api = client.view_api(return_format="dict", print_info=False)
    for name, ep in sorted(api["named_endpoints"].items()):
        labels = [p["label"] for p in ep["parameters"]]
        if "max new tokens" in labels and "model 1" in labels:
            return name, labels
    raise SystemExit("no chat endpoint found in the workbench API")


FAILED_PANE = re.compile(r"^\[[A-Za-z]*(Error|Exception|Interrupt)\b")  # how Session.chat reports a failed pane


def _text(message: dict) -> str:
    """A chat message's text: a string, or Gradio 6's list of {"type": "text", "text": ...} parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(c.get("text", "")) for c in content if isinstance(c, dict))
    return str(content or "")


def _panes(outputs: list) -> list[list[dict]] | None:
    """The last streamed chat histories (outputs whose first item is a list of messages)."""
    for out in reversed(outputs):
        if isinstance(out, (list, tuple)) and out and isinstance(out[0], list):
            return [h for h in out if isinstance(h, list)]
    return None


def client_loop(url: str, auth: tuple[str, str] | None, idx: int, barriers: tuple[Any, ...],
                deadline_box: Any, stats: Stats, args: argparse.Namespace) -> None:
    """One client: connect, load the page with all the others, then chat until ``deadline_box[0]`` (set by the main
    process once every client is ready). ``barriers`` are threading's or, with ``--procs``, multiprocessing's."""
    import httpx
    from gradio_client import Client

    connected, start = barriers
    try:
        t0 = time.perf_counter()
        # connecting reads the config and API with httpx's 5 s default: too short for a server under load
        client = Client(url, auth=auth, verbose=False, httpx_kwargs={"timeout": 120})
        endpoint, _ = chat_endpoint(client)
        with stats.lock:
            stats.connects.append(time.perf_counter() - t0)
        connected.wait(timeout=900)  # every page loads at once
        t0 = time.perf_counter()
        page = httpx.get(url, cookies=getattr(client, "cookies", None), timeout=120)  # the page, as a browser gets it
        page.raise_for_status()
        client.predict(api_name="/refresh_all")  # the page-load event: fills this session's model menus
        with stats.lock:
            stats.page_loads.append(time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - every failure is a result here
        with stats.lock:
            stats.errors.append(f"client {idx} setup: {type(exc).__name__}: {exc}")
        connected.abort()
        start.abort()
        return
    try:
        start.wait()
    except threading.BrokenBarrierError:
        return
    while not deadline_box[0]:  # the main thread sets the deadline once every client is ready
        time.sleep(0.01)
    n = 0
    while time.monotonic() < deadline_box[0]:
        prompt = PROMPTS[(idx + n) % len(PROMPTS)]
        models = [args.model1, args.model2, None, None]
        t0 = time.perf_counter()
        try:
            job = client.submit(prompt, args.panes, args.max_new_tokens, 256, 0.8, 0.95, False, idx * 1000 + n,
                                *models, [], [], [], [], api_name=endpoint)
            job.result(timeout=args.timeout)
            outputs = job.outputs()
            panes = _panes(outputs)
            panes = panes[:args.panes] if panes else panes  # the hidden panes come back too, unchanged
            latency = time.perf_counter() - t0
            replies = [_text(h[-1]) if h and h[-1].get("role") == "assistant" else None for h in (panes or [])]
            bad = [r for r in replies if r is None or FAILED_PANE.match(r)]
            if panes is None or len(replies) != args.panes or bad:
                raise RuntimeError(f"bad replies: {replies!r}")
            with stats.lock:
                stats.latencies.append(latency)
                stats.replies_chars += sum(len(r) for r in replies)
                stats.updates += len(outputs)
                stats.empty_replies += sum(not r for r in replies)
        except Exception as exc:  # noqa: BLE001
            with stats.lock:
                stats.errors.append(f"client {idx} request {n}: {type(exc).__name__}: {str(exc)[:300]}")
        n += 1


STAT_LISTS = ("latencies", "page_loads", "connects", "errors")


def client_process(url: str, auth: tuple[str, str] | None, indices: list[int], barriers: tuple[Any, ...],
                   deadline_box: Any, args: argparse.Namespace, out: Any) -> None:
    """``--procs``: the clients ``indices`` as threads of this process; their figures go to the queue ``out``."""
    stats = Stats()
    threads = [threading.Thread(target=client_loop, args=(url, auth, i, barriers, deadline_box, stats, args),
                                daemon=True) for i in indices]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put({**{k: getattr(stats, k) for k in STAT_LISTS},
             "replies_chars": stats.replies_chars, "empty_replies": stats.empty_replies, "updates": stats.updates})


def run_clients(url: str, auth: tuple[str, str] | None, clients: int, procs: int, seconds: float,
                args: argparse.Namespace, server_pid: int | None = None) -> tuple[Stats, float, float | None]:
    """Every client connected and loaded the page, then chatting for ``seconds``: the figures, the wall time and
    the CPU seconds the server process (``server_pid``, if given) spent in the timed ``seconds``.

    ``procs`` > 1 spreads the clients over that many processes (browsers do not share one interpreter: 20 clients
    in one process serialise their ~80 ms of Python per page load on its GIL, which a page load then waits for).
    """
    import multiprocessing as mp

    stats = Stats()
    ctx = mp.get_context("fork")
    if procs > 1:
        barriers = ctx.Barrier(clients), ctx.Barrier(clients + 1)
        deadline_box, out = ctx.Array("d", 1), ctx.Queue()
        workers = [ctx.Process(target=client_process, daemon=True,
                               args=(url, auth, list(range(k, clients, procs)), barriers, deadline_box, args, out))
                   for k in range(procs)]
    else:
        barriers = threading.Barrier(clients), threading.Barrier(clients + 1)  # all connected; all loaded the page
        deadline_box, out = [0.0], None
        workers = [threading.Thread(target=client_loop, args=(url, auth, i, barriers, deadline_box, stats, args),
                                    daemon=True) for i in range(clients)]
    t_setup = time.perf_counter()
    for w in workers:
        w.start()
    try:
        _wait_ready(barriers[1], workers, timeout=900)
    except threading.BrokenBarrierError:
        if out is not None:
            _gather(out, workers, stats, timeout=150)  # a client may still be inside a 120 s request
        raise SystemExit("clients could not connect: " + "; ".join(stats.errors[:3])) from None
    print(f"{clients} clients ({procs} process(es)) connected and loaded the page in "
          f"{time.perf_counter() - t_setup:.1f} s; chatting for {seconds:g} s", flush=True)
    t0 = time.monotonic()  # CLOCK_MONOTONIC: the same clock in every process
    cpu0 = cpu_seconds(server_pid)
    deadline_box[0] = t0 + seconds
    cpu_box: list[float | None] = [None]
    timer = threading.Timer(seconds, lambda: cpu_box.__setitem__(0, cpu_seconds(server_pid)))
    timer.start()  # the server's CPU over the timed seconds (requests still running at the deadline end after it)
    if out is not None:
        _gather(out, workers, stats, timeout=seconds + args.timeout + 120)
    for w in workers:
        w.join(timeout=seconds + args.timeout + 60)
    timer.join()
    server_cpu = cpu_box[0] - cpu0 if cpu0 is not None and cpu_box[0] is not None else None
    return stats, time.monotonic() - t0, server_cpu


def _wait_ready(barrier: Any, workers: list[Any], timeout: float) -> None:
    """Wait at ``barrier`` with the clients; a client process that died breaks it (its clients never arrive)."""
    done, broken = threading.Event(), []

    def wait() -> None:
        try:
            barrier.wait(timeout=timeout)
        except threading.BrokenBarrierError as exc:
            broken.append(exc)
        finally:
            done.set()

    threading.Thread(target=wait, daemon=True).start()
    while not done.wait(0.5):
        if any(getattr(w, "exitcode", None) is not None for w in workers):
            barrier.abort()
    if broken:
        raise broken[0]


def _gather(out: Any, workers: list[Any], stats: Stats, timeout: float) -> None:
    """Add every client process's figures to ``stats``; a process that died without sending them is an error."""
    import queue

    got, deadline = 0, time.monotonic() + timeout
    while got < len(workers) and time.monotonic() < deadline:
        try:
            part = out.get(timeout=1.0)
        except queue.Empty:
            if all(w.exitcode is not None for w in workers) and out.empty():
                break  # every process ended: what has not come never will
            continue
        got += 1
        for k in STAT_LISTS:
            getattr(stats, k).extend(part[k])
        stats.replies_chars += part["replies_chars"]
        stats.empty_replies += part["empty_replies"]
        stats.updates += part["updates"]
    if got < len(workers):
        stats.errors.append(f"{len(workers) - got} client process(es) lost (died or timed out); their figures are "
                            "missing")
        for w in workers:
            if w.exitcode is None:
                w.terminate()


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="5 clients for 10 s")
    p.add_argument("--clients", type=int)
    p.add_argument("--seconds", type=float)
    p.add_argument("--url", help="a running workbench (default: start one)")
    p.add_argument("--workdir", type=Path)
    p.add_argument("--threads", type=int, help="--threads of the started workbench (default: its own choice)")
    p.add_argument("--auth", help="USER:PASSWORD of the workbench (default: $OPTIMER_AUTH)")
    p.add_argument("--panes", type=int, default=2)
    p.add_argument("--model1", default="base + instruction")
    p.add_argument("--model2", default="Tune merge")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--timeout", type=float, default=600, help="seconds one request may take")
    p.add_argument("--root", type=Path, default=ROOT, help="the checkout whose workbench is started (default: this)")
    p.add_argument("--procs", type=int, default=1,
                   help="client processes the clients are spread over (default 1: all threads of this process)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    clients = args.clients or (5 if args.quick else 20)
    seconds = args.seconds or (10.0 if args.quick else 60.0)
    auth_spec = args.auth or os.environ.get("OPTIMER_AUTH")
    auth = tuple(auth_spec.split(":", 1)) if auth_spec else None

    server, workdir = None, None
    if args.url:
        url = args.url.rstrip("/") + "/"
    else:
        workdir = ensure_pool(args.workdir.resolve() if args.workdir else None)  # the server's cwd is --root
        port = free_port()
        t0 = time.perf_counter()
        server = start_server(workdir, port, args.threads, args.root.resolve())
        url = f"http://127.0.0.1:{port}/"
        print(f"workbench on {url} (workdir {workdir}) up in {time.perf_counter() - t0:.1f} s", flush=True)
    try:
        stats, wall, server_cpu = run_clients(url, auth, clients, max(1, args.procs), seconds, args,
                                              server.pid if server is not None else None)
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
    lat = stats.latencies
    result = {
        "date": dt.date.today().isoformat(), "clients": clients, "seconds": seconds, "wall_s": round(wall, 1),
        "requests_ok": len(lat), "errors": len(stats.errors), "error_samples": stats.errors[:5],
        "p50_s": round(percentile(lat, 0.5), 2), "p95_s": round(percentile(lat, 0.95), 2),
        "max_s": round(max(lat), 2) if lat else None, "mean_s": round(statistics.fmean(lat), 2) if lat else None,
        "requests_per_s": round(len(lat) / wall, 3) if wall else None,
        "reply_chars_mean": round(stats.replies_chars / (len(lat) * args.panes), 1) if lat else None,
        "empty_replies": stats.empty_replies,
        "updates_per_request": round(stats.updates / len(lat), 1) if lat else None,
        "page_load_p50_s": round(percentile(stats.page_loads, 0.5), 2),
        "page_load_max_s": round(max(stats.page_loads), 2) if stats.page_loads else None,
        "connect_p50_s": round(percentile(stats.connects, 0.5), 2),
        # the server's CPU in the timed seconds, per request finished (a started server only): less noisy than latency
        "server_cpu_cores": round(server_cpu / seconds, 2) if server_cpu is not None else None,
        "server_cpu_ms_per_request": round(1000 * server_cpu / len(lat), 1) if server_cpu is not None and lat else None,
        "panes": args.panes, "max_new_tokens": args.max_new_tokens, "workdir": str(workdir or "-"),
        "client_procs": max(1, args.procs),
        "url": url if args.url else "started", "cpus": os.cpu_count(), "machine": platform.machine(),
        "command": "python bench/load_chat.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    emit_json(result, args.json)
    return result


if __name__ == "__main__":
    res = main()
    sys.exit(1 if res["errors"] else 0)
