"""The browser side of ``bench/engine_sessions.py``: the workbench server as a subprocess, its memory sampler,
and a Playwright driver for one browser session (page ready, a slider move, a two-pane chat, a search); the
scenarios that use them (one session, a search beside a slider) are in ``bench/_workbench_scenarios.py``.

    server = Server(workdir, args, log_path); server.wait_up(120)
    mem = MemSampler(server.proc.pid, 0.2); mem.start()
    driver = Driver(...)   # see engine_sessions.run_n for how one N drives its sessions

``SELECTORS`` is the one place that says what the driver looks for in the page: update it when the UI changes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import free_port, proc_tree_memory

ROOT = Path(__file__).resolve().parent.parent
GB = 1e9

# What the script looks for in the page. Update here when the UI changes (ids are the components' elem_id).
SELECTORS = {
    "tune_tab": "Tune",                                  # tab label (role=tab)
    "chat_tab": "Chat",
    "search_tab": "Search",
    "chart": "#tune-chart .js-plotly-plot",              # plotly div inside the gr.Plot
    "current_trace": "current",                          # name of the trace with the session's own merge
    "estimate_trace": r"estimate",                       # regex: the instant estimate's trace ("≈ estimate")
    "estimate": "#tune-estimate, .tune-estimate",        # or a visible element marking the estimate
    "tune_status": "#tune-status",
    "tune_done": r"release → chart",                     # regex: the status once the full result is shown
    "tune_partial": r"scoring|partial|\d+\s*(/|of)\s*\d+ (dev )?sets",  # regex: a status saying more is coming
    "error": r"^\s*error:",                              # regex: a status line reporting a failure
    # regex (multiline): Gradio's overlay on an output while its event runs ("queue: 1/1 | 0.0s", "processing |
    # 0.4/1.2s", or a bare "6.2s" line just before them)
    "busy": r"processing \||queue:|^\s*[\d.]+(/[\d.]+)?s\s*$",
    "slider": "#alpha-{i} input[type=range]",
    "chat_prompt": "#chat-prompt textarea",
    "chat_send": "#chat-send",
    "chat_pane": "#chat-{i} .bot",                       # the pane's bot messages (last = the reply)
    "chat_status": "#chat-status",
    "chat_busy": r"generating",                          # regex: the chat status while replies stream
    "search_trials": "#search-trials input",
    "search_start": "#search-start",
    "search_stop": "#search-stop",
    "search_status": "#search-status",
    "search_running": r"running",
    "search_ended": r"stopped|done|failed",
}
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROMPT = "Tell me about Tokyo."


class BenchError(RuntimeError):
    """A step failed or timed out; the message says which session and what it waited for."""


def secs(x: float | None, fmt: str = ".2f") -> str:
    """``x`` seconds for a progress line (``–`` when not measured)."""
    return "–" if x is None else f"{x:{fmt}} s"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- the server and its memory ---------------------------------------------------------------------------
class Server:
    """``optimer workbench`` in its own process group; :meth:`stop` kills the group (idempotent)."""

    def __init__(self, workdir: Path, args: argparse.Namespace, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        cmd = [sys.executable, "-m", "optimer_lib.cli", "workbench", "--workdir", str(workdir),
               "--port", str(self.port)]
        for flag in ("threads", "device", "dtype", "heap", "tune_slots"):
            if getattr(args, flag, None):
                cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        code = (args.code or ROOT).resolve()  # another checkout's optimer_lib + workbench come first on the path
        env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1"}
        env.pop("OPTIMER_AUTH", None)
        self.log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=code, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.log_path = log_path

    def wait_up(self, timeout: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text()[-2000:]
                raise BenchError(f"the workbench exited ({self.proc.returncode}) before answering:\n{tail}")
            try:
                urllib.request.urlopen(self.url, timeout=2)
                return time.monotonic() - t0
            except OSError:
                time.sleep(0.5)
        raise BenchError(f"the workbench did not answer on {self.url} within {timeout:.0f} s (log: {self.log_path})")

    def stop(self) -> None:
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if not self.log.closed:
            self.log.close()


class MemSampler(threading.Thread):
    """Samples the server's process tree; ``mark(label)`` records the current figures under a label."""

    def __init__(self, pid: int, every_s: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.every_s = pid, every_s
        self.samples: list[tuple[float, int, int]] = []  # (monotonic s, anon bytes, file bytes)
        self.marks: dict[str, dict[str, float]] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def sample(self) -> tuple[float, int, int]:
        m = proc_tree_memory(self.pid)
        s = (time.monotonic(), m["anon"], m["file"])
        with self._lock:
            self.samples.append(s)
        return s

    def run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every_s)

    def stop(self) -> None:
        self._stop.set()

    def mark(self, label: str) -> dict[str, float]:
        _, anon, file = self.sample()
        self.marks[label] = {"anon_gb": round(anon / GB, 3), "file_gb": round(file / GB, 3)}
        return self.marks[label]

    def peak(self, since: float = 0.0, until: float = float("inf")) -> dict[str, float]:
        with self._lock:
            xs = [s for s in self.samples if since <= s[0] <= until]
        return {"anon_gb": round(max((s[1] for s in xs), default=0) / GB, 3),
                "file_gb": round(max((s[2] for s in xs), default=0) / GB, 3)}


# -- one browser session ------------------------------------------------------------------------------------
@dataclass
class SessionResult:
    index: int
    page_ready_s: float | None = None
    first_chart: str = ""               # what the Tune chart showed when ready: "bars" or "placeholder"
    slider_value: float | None = None
    estimate_s: float | None = None     # None: the UI drew no estimate marked as such
    partial_s: float | None = None
    full_s: float | None = None
    chat_first_token_s: list[float | None] = field(default_factory=list)  # per pane; None: empty reply
    chat_done_s: float | None = None
    chat_reply_chars: list[int] = field(default_factory=list)
    more_moves: list[dict[str, float | None]] = field(default_factory=list)  # --moves > 1: estimate/partial/full_s


BARS_JS = """([sel, trace]) => {
    const el = document.querySelector(sel);
    if (!el || !el.data) return null;
    const ys = el.data.filter(d => (d.name || '') === trace).flatMap(d => Array.from(d.y || []));
    return ys.length ? JSON.stringify(ys) : null;
}"""
ESTIMATE_JS = """([sel, traceRe, elSel]) => {
    const el = document.querySelector(sel), re = new RegExp(traceRe, 'i');
    if (el && el.data && el.data.some(d => re.test(d.name || ''))) return true;
    return Array.from(document.querySelectorAll(elSel)).some(e => e.offsetParent !== null && e.innerText.trim());
}"""


class Driver:
    """Runs the steps of one session on one page, with timeouts that name what was awaited."""

    def __init__(self, page: Any, idx: int, tag: str, timeout_s: float, shots_dir: Path | None = None) -> None:
        self.page, self.idx, self.tag, self.timeout_s, self.shots_dir = page, idx, tag, timeout_s, shots_dir

    async def until(self, js: str, arg: Any, what: str, timeout_s: float | None = None, polling_ms: int = 50) -> Any:
        from playwright.async_api import TimeoutError as PwTimeout

        t = timeout_s or self.timeout_s
        try:
            handle = await self.page.wait_for_function(js, arg=arg, polling=polling_ms, timeout=t * 1000)
            return await handle.json_value()
        except PwTimeout:
            shot = await self.screenshot()
            raise BenchError(f"{self.tag} session {self.idx}: timed out after {t:.0f} s waiting for {what}"
                             + (f" (page: {shot})" if shot else "")) from None

    async def screenshot(self) -> str | None:
        """Save what the page shows now (next to the server log) and return the path; None if that fails."""
        if self.shots_dir is None:
            return None
        path = self.shots_dir / f"bench-engine-{re.sub(r'[^A-Za-z0-9]+', '-', self.tag).strip('-')}-s{self.idx}.png"
        try:
            await self.page.screenshot(path=str(path), full_page=True, timeout=15_000)
            return str(path)
        except Exception:  # noqa: BLE001 - a failed screenshot must not hide the timeout
            return None

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        """Turn a browser error inside the block into a one-line BenchError naming the session and the step."""
        from playwright.async_api import Error as PwError

        try:
            yield
        except PwError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BenchError(f"{self.tag} session {self.idx}: {what}: {first}") from None

    async def bars(self) -> str | None:
        return await self.page.evaluate(BARS_JS, [SELECTORS["chart"], SELECTORS["current_trace"]])

    async def open(self, url: str, r: SessionResult) -> None:
        t0 = time.perf_counter()
        await self.page.goto(url, timeout=self.timeout_s * 1000)
        await self.page.get_by_role("tab", name=SELECTORS["tune_tab"]).click(timeout=self.timeout_s * 1000)
        # ready: the sliders are shown and the chart holds a figure, bars or a placeholder saying they will come
        await self.until("([chart, slider]) => { const el = document.querySelector(chart),"
                         " s = document.querySelector(slider);"
                         " return !!(el && (el.data || el.layout) && s && s.offsetParent !== null); }",
                         [SELECTORS["chart"], SELECTORS["slider"].format(i=0)], "the Tune tab (sliders and chart)")
        r.page_ready_s = time.perf_counter() - t0
        r.first_chart = "bars" if await self.bars() else "placeholder"

    async def move_slider(self, r: SessionResult, i: int = 0, frac: float | None = None) -> None:
        """Drag slider ``i`` to ``frac`` of its width with the mouse and release; time what the chart shows."""
        page = self.page
        slider = page.locator(SELECTORS["slider"].format(i=i))
        before_value = float(await slider.input_value())
        before_bars = await self.bars()
        status_sel = SELECTORS["tune_status"]
        await self.until("([s, busy]) => { const e = document.querySelector(s);"
                         " return e && !new RegExp(busy, 'm').test(e.innerText); }",
                         [status_sel, SELECTORS["busy"]], "the Tune tab to be idle")
        before_status = await page.locator(status_sel).inner_text()
        box = await slider.bounding_box()
        if box is None:
            raise BenchError(f"{self.tag} session {self.idx}: slider {i} is not visible")
        frac = frac if frac is not None else 0.2 + 0.1 * (self.idx % 5)
        y = box["y"] + box["height"] / 2
        lo, hi = float(await slider.get_attribute("min") or 0), float(await slider.get_attribute("max") or 1)
        x0 = box["x"] + box["width"] * (before_value - lo) / (hi - lo)
        await page.mouse.move(x0, y)
        await page.mouse.down()
        await page.mouse.move(box["x"] + box["width"] * frac, y, steps=5)
        t0 = time.perf_counter()
        await page.mouse.up()  # release: the workbench re-merges and scores

        async def timed(js: str, arg: Any, what: str) -> float:
            # polled every 16 ms (a frame): at 50 ms the poll alone added up to 50 ms to a 0.2-0.4 s estimate
            value = await self.until(js, arg, what, polling_ms=16)
            if isinstance(value, str) and value.startswith("error:"):  # the status reports a failure: stop now
                shot = await self.screenshot()
                raise BenchError(f"{self.tag} session {self.idx}: the workbench answered the slider with "
                                 f"{value[6:].strip()[:400]!r}" + (f" (page: {shot})" if shot else ""))
            return time.perf_counter() - t0

        estimate = asyncio.create_task(timed(ESTIMATE_JS, [SELECTORS["chart"], SELECTORS["estimate_trace"],
                                                           SELECTORS["estimate"]], "an estimate"))
        partial = asyncio.create_task(timed(
            "([b, s, t]) => { const el = document.querySelector(s); if (!el || !el.data) return false;"
            " const ys = el.data.filter(d => (d.name || '') === t).flatMap(d => Array.from(d.y || []));"
            " return ys.length > 0 && JSON.stringify(ys) !== b; }",
            [before_bars, SELECTORS["chart"], SELECTORS["current_trace"]], "the chart to change"))
        full = asyncio.create_task(timed(
            "([before, sel, done, part, busy, err]) => { const e = document.querySelector(sel); if (!e) return false;"
            " const s = e.innerText; if (s === before || new RegExp(busy, 'm').test(s)) return false;"
            " if (new RegExp(err, 'i').test(s)) return 'error:' + s;"
            " return new RegExp(done).test(s) && !new RegExp(part, 'i').test(s); }",
            [before_status, status_sel, SELECTORS["tune_done"], SELECTORS["tune_partial"], SELECTORS["busy"],
             SELECTORS["error"]], "the full result"))
        try:  # read once the watches are asked for: they need not wait for its round trip
            r.slider_value = float(await slider.input_value())
            if r.slider_value == before_value:
                raise BenchError(f"{self.tag} session {self.idx}: the drag did not move slider {i} ({before_value})")
        except BaseException:
            for task in (estimate, partial, full):
                task.cancel()
            await asyncio.gather(estimate, partial, full, return_exceptions=True)
            raise
        try:
            r.full_s = await full
            try:  # drawn with or before the full result; plotly may draw it a moment after the status
                r.partial_s = await asyncio.wait_for(asyncio.shield(partial), timeout=10)
            except asyncio.TimeoutError:
                log(f"{self.tag} session {self.idx}: the chart's bars did not change within 10 s of the full result")
        finally:
            for task in (estimate, partial):
                if not task.done():
                    task.cancel()
            await asyncio.gather(estimate, partial, return_exceptions=True)
        r.estimate_s = estimate.result() if estimate.done() and not estimate.cancelled() \
            and estimate.exception() is None else None

    async def chat(self, r: SessionResult, panes: int = 2) -> None:
        page = self.page
        await page.get_by_role("tab", name=SELECTORS["chat_tab"]).click()
        await page.evaluate("""([sel, busy]) => {  // note every streamed status: a short reply may be missed by polling
            window.__busySeen = false;
            const el = document.querySelector(sel), re = new RegExp(busy, 'm');
            new MutationObserver(() => { if (re.test(el.innerText)) window.__busySeen = true; })
                .observe(el, {subtree: true, childList: true, characterData: true});
        }""", [SELECTORS["chat_status"], SELECTORS["chat_busy"]])
        before = [await page.locator(SELECTORS["chat_pane"].format(i=i)).count() for i in range(panes)]
        await page.locator(SELECTORS["chat_prompt"]).fill(PROMPT)
        t0 = time.perf_counter()
        await page.locator(SELECTORS["chat_send"]).click()

        async def first_token(i: int) -> float:
            await self.until("([sel, n]) => { const b = document.querySelectorAll(sel);"
                             " return b.length > n && b[b.length - 1].innerText.trim().length > 0; }",
                             [SELECTORS["chat_pane"].format(i=i), before[i]], f"the first token of pane {i + 1}")
            return time.perf_counter() - t0

        tasks = [asyncio.create_task(first_token(i)) for i in range(panes)]
        try:
            await self.until("([sel, gen, busy]) => { const s = document.querySelector(sel).innerText; return"
                             " window.__busySeen && !new RegExp(gen).test(s) && !new RegExp(busy, 'm').test(s); }",
                             [SELECTORS["chat_status"], SELECTORS["chat_busy"], SELECTORS["busy"]],
                             "the end of the replies")
            r.chat_done_s = time.perf_counter() - t0
            await asyncio.sleep(0.2)  # the last streamed update lands with the status
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        r.chat_first_token_s = [t.result() if not t.cancelled() and t.exception() is None else None for t in tasks]
        texts = [await page.locator(SELECTORS["chat_pane"].format(i=i)).last.inner_text()
                 if await page.locator(SELECTORS["chat_pane"].format(i=i)).count() > before[i] else ""
                 for i in range(panes)]
        r.chat_reply_chars = [len(t.strip()) for t in texts]
        await page.get_by_role("tab", name=SELECTORS["tune_tab"]).click()


def rounded(v: Any) -> Any:
    """Floats (also inside lists) to milliseconds, for the JSON."""
    if isinstance(v, list):
        return [rounded(x) for x in v]
    return round(v, 3) if isinstance(v, float) else v


def p50(xs: list[float | None]) -> float | None:
    v = [x for x in xs if x is not None]
    return round(statistics.median(v), 3) if v else None
