"""Workbench memory and latency with N real browser sessions (issue 15's "Must show" benchmark).

    python bench/engine_sessions.py --sessions 1,2                    # embedded tiny pool (seconds to prepare)
    python bench/engine_sessions.py --smollm2 --sessions 1,3,10 --out bench/results/engine_sessions.json
    python bench/engine_sessions.py --smollm2 --sessions 3 --search   # also: slider latency while a search runs
    python bench/engine_sessions.py --code /tmp/before --sessions 1   # the workbench of another checkout

For each N in ``--sessions`` it starts ``optimer workbench`` on the workdir as a subprocess (headless, free
port, its own process group), samples RssAnon/RssFile of the server and its children from /proc every
``--sample-s`` in a background thread, and drives N browser tabs (Playwright + Debian chromium, one browser
context each = one workbench session). Sessions run one after another (``--concurrent``: all at once) and
stay open, so the memory after the last one is N sessions' worth. Each session:

1. page load → Tune tab ready: sliders shown and the chart holding a figure, its bars (the pre-engine workbench
   scores on page load) or a placeholder (the engine's workbench scores in the background) ("page ready");
2. drags one slider with the mouse and releases it → instant estimate (when the UI marks one, see
   ``SELECTORS``), first partial result (the chart's "current" bars change), full result (the status line
   says the scoring is done);
3. sends one prompt to the Chat tab's two panes (its defaults: base (+ instruction) and the Tune merge) →
   first token of each pane, end of both replies.

``--search`` then starts a search in session 1 and moves a slider in another session while it runs. The
server is restarted for every N and always killed at the end (Ctrl-C included). A step that waits longer than
``--timeout``, or a status line starting with "error:", stops that N with one line naming the session and the
step, plus a screenshot next to the server log. "Idle" memory is taken once the server answers, before any
page opens (the pre-engine workbench opens its pool with the first session).

Pools: by default the embedded tiny pool: an existing demo workdir (runs/wb-demo, runs/quick, runs/demo),
else ``runs/bench-engine-tiny``, made here in seconds from the embedded base with small random vectors (ja,
code, instruct: memory and latency depend on the model's size, not on what the vectors learnt).
``--smollm2`` writes ``runs/bench-engine/workbench.json`` over ``runs/smollm2/base`` and the ja and code
vectors of ``runs/smollm2/seed-0`` (imported from GGUF and trained by ``optimer real-cell``).

The memory bound printed is 1.25 × (base + slots × model), model = parameters × bytes of the workbench's
dtype (read from the base's safetensors headers); it is the engine's target, not today's workbench's.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from _common import safetensors_size
from _workbench_driver import (
    BROWSER_ARGS,
    GB,
    ROOT,
    SELECTORS,
    BenchError,
    MemSampler,
    Server,
    SessionResult,
    log,
    p50,
    rounded,
    secs,
)
from _workbench_scenarios import one_session, search_phase

DEMO_WORKDIRS = ("runs/wb-demo", "runs/quick", "runs/demo")
SMOLLM2 = {"base": "runs/smollm2/base", "vectors": ["runs/smollm2/seed-0/vectors/ja.safetensors",
                                                    "runs/smollm2/seed-0/vectors/code.safetensors"]}


# -- pools -------------------------------------------------------------------------------------------------
def tiny_pool(workdir: Path | None) -> Path:
    """A workdir with a pool on the embedded base: the one given or an existing demo one, else made here."""
    def has_pool(wd: Path) -> bool:
        return (wd / "workbench.json").is_file() or any((wd / "vectors").glob("*.safetensors"))

    for cand in [workdir] if workdir else [ROOT / d for d in DEMO_WORKDIRS] + [ROOT / "runs/bench-engine-tiny"]:
        if has_pool(cand):
            return cand
    wd = workdir or ROOT / "runs/bench-engine-tiny"
    log(f"making a tiny pool in {wd}: embedded base + random vectors ja, code, instruct")
    import torch
    from transformers import AutoModelForCausalLM

    from optimer_lib.checkpoints.vectors import extract_vector, save_vector
    from optimer_lib.data import assets_dir

    base_dir = assets_dir() / "base"
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    files = []
    for i, name in enumerate(("ja", "code", "instruct")):
        g = torch.Generator().manual_seed(100 + i)
        tuned = {k: v + 0.01 * v.float().std() * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                 for k, v in base.state_dict().items()}
        vec = extract_vector(base, tuned, name=name, source=f"random/{name}", tokens_trained=1000)
        files.append(save_vector(vec, wd / "vectors" / f"{name}.safetensors", overwrite=True))
    write_manifest(wd, base_dir, files[:2], files[2])
    return wd


def write_manifest(wd: Path, base: Path, vectors: list[Path], instruction: Path | None) -> None:
    """workbench.json as ``workbench.workspace.Workspace.write_manifest`` writes it (absolute paths here)."""
    data = {"base": str(Path(base).resolve()), "vectors": [str(Path(v).resolve()) for v in vectors],
            "instruction": str(Path(instruction).resolve()) if instruction else None, "eval": None}
    wd.mkdir(parents=True, exist_ok=True)
    path = wd / "workbench.json"
    if not path.is_file() or json.loads(path.read_text()) != data:
        path.write_text(json.dumps(data, indent=2))


def smollm2_pool(workdir: Path | None) -> Path:
    wd = workdir or ROOT / "runs/bench-engine"
    paths = [ROOT / SMOLLM2["base"], *(ROOT / v for v in SMOLLM2["vectors"])]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise BenchError(f"the SmolLM2 pool is incomplete (missing {', '.join(missing)}): run `optimer real-cell` "
                         "first, or give another pool with --workdir")
    write_manifest(wd, paths[0], paths[1:], None)
    return wd


def pool_base(wd: Path) -> Path:
    m = json.loads((wd / "workbench.json").read_text()) if (wd / "workbench.json").is_file() else {}
    if m.get("base"):
        b = Path(m["base"])
        return b if b.is_absolute() else wd / b
    from optimer_lib.data import assets_dir  # a demo layout: the embedded base

    return assets_dir() / "base"


# -- one N ----------------------------------------------------------------------------------------------------
def run_n(n: int, workdir: Path, args: argparse.Namespace, chromium: Path) -> dict[str, Any]:
    tag = f"[N={n}]"
    log_path = workdir / f"bench-engine-server-{n}.log"
    server = Server(workdir, args, log_path)
    sampler: MemSampler | None = None
    out: dict[str, Any] = {"sessions": n, "server_log": str(log_path)}
    try:
        up = server.wait_up(args.start_timeout)
        log(f"{tag} workbench up on {server.url} in {up:.1f} s (pid {server.proc.pid}, log {log_path})")
        sampler = MemSampler(server.proc.pid, args.sample_s)
        sampler.start()
        time.sleep(1.0)
        idle = sampler.mark("idle")
        log(f"{tag} idle: RssAnon {idle['anon_gb']:.2f} GB, RssFile {idle['file_gb']:.2f} GB")
        out["server_up_s"] = round(up, 1)
        asyncio.run(drive(n, server.url, args, chromium, sampler, out, tag))
    finally:
        if sampler is not None:
            sampler.stop()
        server.stop()
    return out


async def drive(n: int, url: str, args: argparse.Namespace, chromium: Path, sampler: MemSampler,
                out: dict[str, Any], tag: str) -> None:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(chromium), headless=True, args=BROWSER_ARGS)
        try:
            t_start = time.monotonic()
            results: list[SessionResult] = []
            pages: list[Any] = []
            after: list[float] = []
            if args.concurrent:
                done = await asyncio.gather(*(one_session(browser, url, i, tag, args) for i in range(n)))
                pages, results = [p for p, _ in done], [r for _, r in done]
            else:
                for i in range(n):
                    page, r = await one_session(browser, url, i, tag, args)
                    pages.append(page)
                    results.append(r)
                    m = sampler.mark(f"after session {i}")
                    after.append(m["anon_gb"])
                    log(f"{tag} after session {i}: RssAnon {m['anon_gb']:.2f} GB, RssFile {m['file_gb']:.2f} GB")
            await asyncio.sleep(args.settle_s)
            final = sampler.mark("final")
            peak = sampler.peak(since=t_start)
            idle = sampler.marks["idle"]["anon_gb"]
            out.update({
                "idle_anon_gb": idle, "idle_file_gb": sampler.marks["idle"]["file_gb"],
                "peak_anon_gb": peak["anon_gb"], "peak_file_gb": peak["file_gb"],
                "final_anon_gb": final["anon_gb"], "final_file_gb": final["file_gb"],
                "anon_after_each_session_gb": after,
                "anon_growth_per_session_gb": round((final["anon_gb"] - idle) / n, 3),
                "page_ready_p50_s": p50([r.page_ready_s for r in results]),
                "page_ready_max_s": round(max(r.page_ready_s for r in results), 3),
                "slider_estimate_p50_s": p50([r.estimate_s for r in results]),
                # every move of every session (--moves): the estimate's latency over more than N samples
                "slider_estimate_all_s": [rounded(x) for r in results
                                          for x in [r.estimate_s, *(m["estimate_s"] for m in r.more_moves)]
                                          if x is not None],
                "slider_partial_p50_s": p50([r.partial_s for r in results]),
                "slider_full_p50_s": p50([r.full_s for r in results]),
                "chat_ttft_p50_s": p50([r.chat_first_token_s[0] if r.chat_first_token_s else None for r in results]),
                "chat_ttft_pane2_p50_s": p50([r.chat_first_token_s[1] if len(r.chat_first_token_s) > 1 else None
                                              for r in results]),
                "chat_done_p50_s": p50([r.chat_done_s for r in results]),
                "per_session": [{k: rounded(v) for k, v in asdict(r).items()} for r in results],
            })
            moves = out["slider_estimate_all_s"]
            if len(moves) > n:
                log(f"{tag} estimate over all {len(moves)} moves that drew one: p50 {secs(p50(moves))}, "
                    f"max {secs(max(moves))}")
            log(f"{tag} {n} sessions open: RssAnon final {final['anon_gb']:.2f} GB, peak {peak['anon_gb']:.2f} GB "
                f"(idle {idle:.2f}); RssFile peak {peak['file_gb']:.2f} GB")
            if args.search:
                t_search = time.monotonic()
                out["search"] = await search_phase(browser, url, pages, tag, args)
                out["search"]["peak_anon_gb"] = sampler.peak(since=t_search)["anon_gb"]
        finally:
            await browser.close()


# -- main ---------------------------------------------------------------------------------------------------
def table(runs: list[dict], bound_gb: float) -> str:
    def f(x: Any, fmt: str = ".2f") -> str:
        return "–" if x is None else format(x, fmt)

    def yes(ok: bool) -> str:
        return "yes" if ok else "no"

    cols = ["sessions", "RssAnon idle / peak / final (GB)", "growth per session (GB)",
            "within bound: peak / peak − idle", "page ready p50 / max (s)",
            "slider → estimate / partial / full p50 (s)", "chat first token p50 (s)", "chat done p50 (s)",
            "slider full p50 during a search (s)"]
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)
    rows = [f"| {r['sessions']} | {f(r.get('idle_anon_gb'))} / {f(r.get('peak_anon_gb'))} / "
            f"{f(r.get('final_anon_gb'))} | {f(r.get('anon_growth_per_session_gb'), '.3f')} | "
            f"{yes(r['peak_anon_gb'] <= bound_gb)} / {yes(r['peak_anon_gb'] - r['idle_anon_gb'] <= bound_gb)} | "
            f"{f(r.get('page_ready_p50_s'), '.1f')} / "
            f"{f(r.get('page_ready_max_s'), '.1f')} | {f(r.get('slider_estimate_p50_s'))} / "
            f"{f(r.get('slider_partial_p50_s'))} / {f(r.get('slider_full_p50_s'))} | {f(r.get('chat_ttft_p50_s'))} | "
            f"{f(r.get('chat_done_p50_s'), '.1f')} | {f((r.get('search') or {}).get('slider_full_p50_s'))} |"
            for r in runs if "peak_anon_gb" in r]
    return "\n".join([head, *rows])


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", default="1,3,10", help="comma-separated N: one run (fresh server) per N")
    p.add_argument("--smollm2", action="store_true", help="the SmolLM2-135M pool under runs/smollm2 (default: tiny)")
    p.add_argument("--workdir", type=Path, help="the workbench workdir (default: see above)")
    p.add_argument("--code", type=Path, help="run the workbench from this checkout instead (e.g. the commit before "
                   "a change: git archive COMMIT | tar -x -C DIR)")
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. which commit --code holds)")
    p.add_argument("--concurrent", action="store_true", help="run the N sessions at once, not one after another")
    p.add_argument("--no-chat", action="store_true", help="skip the chat step")
    p.add_argument("--moves", type=int, default=1, help="slider moves per session (the later ones: JSON only)")
    p.add_argument("--search", action="store_true", help="also: slider latency in one session while another searches")
    p.add_argument("--search-trials", type=int, default=50, help="trials of that search (it is stopped anyway)")
    p.add_argument("--search-moves", type=int, default=2, help="slider moves timed while the search runs")
    p.add_argument("--search-warmup", type=float, default=2.0, help="seconds between search start and the moves")
    p.add_argument("--slots", type=int, default=2, help="merged models the engine may hold (for the bound)")
    p.add_argument("--threads", type=int, help="--threads of the workbench (default: its own choice)")
    p.add_argument("--device", help="--device of the workbench (default: its own, cpu)")
    p.add_argument("--dtype", help="--dtype of the workbench (default: its own, float32 on CPU)")
    p.add_argument("--heap", help="--heap of the workbench: fast (its default) or lean")
    p.add_argument("--tune-slots", type=int, help="--tune-slots of the workbench (default: its own, 2)")
    p.add_argument("--timeout", type=float, default=600, help="seconds any one step may take")
    p.add_argument("--start-timeout", type=float, default=300, help="seconds the server may take to answer")
    p.add_argument("--sample-s", type=float, default=0.2, help="memory sampling period")
    p.add_argument("--settle-s", type=float, default=2.0, help="wait before the final memory figure")
    p.add_argument("--out", type=Path, help="write the figures here as JSON")
    a = p.parse_args(argv)
    try:
        a.n_list = [int(x) for x in a.sessions.split(",") if x.strip()]
    except ValueError:
        p.error(f"--sessions wants comma-separated integers, got {a.sessions!r}")
    if not a.n_list or min(a.n_list) < 1:
        p.error("--sessions wants integers >= 1")
    a.shots_dir = None  # set to the workdir once it is known
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import CHROMIUM_MISSING, chromium_path  # Debian's chromium, as the browser tests use

    chromium = chromium_path()
    if chromium is None:
        print(CHROMIUM_MISSING, file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM):  # raise at once, also inside asyncio.run (whose own Ctrl-C
        signal.signal(sig, _interrupt)            # handler only cancels a task that may be blocked in the browser)
    t_all = time.perf_counter()
    result: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "command": "python bench/engine_sessions.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
        "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip(),
        "code": str((args.code or ROOT).resolve()), "note": args.note, "selectors": SELECTORS, "runs": []}
    rc = 0
    try:
        workdir = (smollm2_pool(args.workdir) if args.smollm2 else tiny_pool(args.workdir)).resolve()
        args.shots_dir = workdir  # a step that times out leaves a screenshot here, next to the server logs
        base = pool_base(workdir)
        params, stored = safetensors_size(base)
        dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}.get(args.dtype or "float32", 4)
        model_bytes = params * dtype_bytes
        bound_gb = 1.25 * (1 + args.slots) * model_bytes / GB
        result.update({"workdir": str(workdir), "base": str(base), "parameters": params, "stored_bytes": stored,
                       "dtype_bytes": dtype_bytes, "model_bytes": model_bytes, "slots": args.slots,
                       "bound_gb": round(bound_gb, 3)})
        log(f"pool {workdir}: base {base} ({params / 1e6:.1f}M parameters, model {model_bytes / GB:.3f} GB at "
            f"{dtype_bytes} bytes); bound 1.25 × (1 + {args.slots}) × model = {bound_gb:.2f} GB")
        for n in args.n_list:
            t0 = time.perf_counter()
            run: dict[str, Any] = {"sessions": n}
            result["runs"].append(run)
            try:
                run.update(run_n(n, workdir, args, chromium))
            except BenchError as exc:
                run["error"] = str(exc)
                log(f"[N={n}] FAILED: {exc}")
                rc = 1
            run["wall_s"] = round(time.perf_counter() - t0, 1)
    except KeyboardInterrupt:
        log("interrupted: the server was stopped; figures so far follow")
        rc = 130
    except BenchError as exc:
        log(f"FAILED: {exc}")
        rc = 1
    result["wall_s"] = round(time.perf_counter() - t_all, 1)
    if "bound_gb" in result:
        print("\n" + table(result["runs"], result["bound_gb"]))
        print(f"\nmodel {result['parameters']:,} parameters × {result['dtype_bytes']} bytes = "
              f"{result['model_bytes'] / GB:.3f} GB; bound 1.25 × (base + {args.slots} slots) = "
              f"{result['bound_gb']:.2f} GB")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        log(f"wrote {args.out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
