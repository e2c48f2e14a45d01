"""What ``bench/engine_sessions.py`` does in the browser, built on ``bench/_workbench_driver.py``: one session (page
ready, slider moves, a two-pane chat) and a search in one session while another moves a slider.

    page, result = await one_session(browser, url, idx, tag, args)
    figures = await search_phase(browser, url, pages, tag, args)
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from _workbench_driver import SELECTORS, BenchError, Driver, SessionResult, log, p50, secs


def move_line(r: SessionResult) -> str:
    """What one slider move showed, for the log."""
    est = secs(r.estimate_s) if r.estimate_s is not None else "none shown"
    return f"slider → {r.slider_value:g}: estimate {est}, partial {secs(r.partial_s)}, full {secs(r.full_s)}"


async def one_session(browser: Any, url: str, idx: int, tag: str, args: argparse.Namespace,
                      chat: bool = True) -> tuple[Any, SessionResult]:
    ctx = await browser.new_context(viewport={"width": 1400, "height": 1000})
    ctx.set_default_timeout(args.timeout * 1000)
    page = await ctx.new_page()
    d, r = Driver(page, idx, tag, args.timeout, args.shots_dir), SessionResult(idx)
    with d.step("opening the page"):
        await d.open(url, r)
    log(f"{tag} session {idx}: page ready {r.page_ready_s:.1f} s (chart: {r.first_chart})")
    with d.step("moving a slider"):
        await d.move_slider(r)
    log(f"{tag} session {idx}: {move_line(r)}")
    for k in range(1, getattr(args, "moves", 1)):  # more moves, each to a merge no session has scored yet
        m = SessionResult(idx)
        with d.step(f"moving a slider (move {k + 1})"):
            await d.move_slider(m, frac=0.1 + (0.37 * idx + 0.23 * k) % 0.8)
        r.more_moves.append({"estimate_s": m.estimate_s, "partial_s": m.partial_s, "full_s": m.full_s})
        log(f"{tag} session {idx}: move {k + 1}: {move_line(m)}")
    if chat and not args.no_chat:
        with d.step("chatting"):
            await d.chat(r)
        ttft = ", ".join("empty" if t is None else secs(t) for t in r.chat_first_token_s)
        log(f"{tag} session {idx}: chat first token {ttft}; both replies done {secs(r.chat_done_s, '.1f')} "
            f"({r.chat_reply_chars} chars)")
    return page, r


async def search_phase(browser: Any, url: str, pages: list[Any], tag: str, args: argparse.Namespace) -> dict:
    """Start a search in the first session, move a slider in another one (opened here if N = 1) meanwhile."""
    searcher = Driver(pages[0], 0, tag, args.timeout, args.shots_dir)
    other_page = pages[1] if len(pages) > 1 else None
    if other_page is None:
        other_page, _ = await one_session(browser, url, len(pages), tag + " search", args, chat=False)
    mover = Driver(other_page, 1 if len(pages) > 1 else len(pages), tag + " search", args.timeout, args.shots_dir)
    p = searcher.page
    with searcher.step("starting a search"):
        await p.get_by_role("tab", name=SELECTORS["search_tab"]).click()
        await p.locator(SELECTORS["search_trials"]).fill(str(args.search_trials))
        await p.locator(SELECTORS["search_trials"]).press("Tab")
        await p.locator(SELECTORS["search_start"]).click()
    status = SELECTORS["search_status"]
    await searcher.until("([s, re]) => { const e = document.querySelector(s);"
                         " return e && new RegExp(re).test(e.innerText); }",
                         [status, SELECTORS["search_running"]], "the search to run")
    log(f"{tag} search running ({args.search_trials} trials); moving a slider in session {mover.idx}")
    await asyncio.sleep(args.search_warmup)
    moves = []
    for k in range(args.search_moves):
        r = SessionResult(mover.idx)
        with mover.step("moving a slider during the search"):
            await mover.move_slider(r, frac=0.15 + 0.2 * k)
        moves.append(r)
        log(f"{tag} during search: slider partial {secs(r.partial_s)}, full {secs(r.full_s)}")
    with searcher.step("stopping the search"):
        still = await p.locator(status).inner_text()
        t_stop = time.perf_counter()
        await p.locator(SELECTORS["search_stop"]).click()
    stop_s = None
    try:  # a workbench that stops after its running trial may take long on a real model: the server is stopped anyway
        await searcher.until("([s, re]) => { const e = document.querySelector(s);"
                             " return e && new RegExp(re).test(e.innerText); }",
                             [status, SELECTORS["search_ended"]], "the search to stop", timeout_s=30)
        stop_s = round(time.perf_counter() - t_stop, 3)
        log(f"{tag} Stop clicked -> the status says the search ended: {stop_s:.2f} s")
    except BenchError as exc:
        log(f"{exc}; going on (the server is stopped next)")
    return {"trials": args.search_trials, "extra_session": len(pages) == 1, "status_during": still.strip(),
            "status_after": (await p.locator(status).inner_text()).strip(), "stop_s": stop_s,
            "slider_partial_s": [m.partial_s and round(m.partial_s, 3) for m in moves],
            "slider_full_s": [m.full_s and round(m.full_s, 3) for m in moves],
            "slider_full_p50_s": p50([m.full_s for m in moves])}
