"""The OptiMer workbench: a Gradio app over ``optimer_lib`` (Pool, Tune, Search, Chat, Export tabs).

    optimer workbench --workdir runs/demo            # http://127.0.0.1:7860
    from workbench.app import build_app, launch
    demo = build_app("runs/demo")                     # gr.Blocks, not launched (tests, notebooks, mounting)
    launch("runs/demo", port=7861)

The app is thin: every action is a :class:`workbench.session.Session` call. Each browser tab gets its
own Session (a ``gr.State``), so sliders, chats and searches of one tab never change another's models;
the base weights and vectors are loaded once per workdir and shared read-only. What a browser tab holds survives a
page reload: the Tune merge (weights, instruction weight, method), the chat panes and the watched study are
kept in the browser's localStorage (``gr.BrowserState``, encrypted with a secret kept in the workdir) and
put back into the new Session before the tabs are drawn; a snapshot that no longer fits the pool is
ignored with a note. It listens on 127.0.0.1
unless ``host`` says otherwise, never opens a share link unless ``share=True``, and asks for a login when
``auth`` is given (``optimer workbench --auth user:password`` or ``OPTIMER_AUTH=user:password``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import secrets
from pathlib import Path
from typing import Any

import gradio as gr
from starlette.middleware import Middleware

from optimer_lib.engine.heap import configure_heap
from optimer_lib.errors import ConfigError
from optimer_lib.merging import groups
from optimer_lib.scoring.evaluate import EvalSuite
from workbench.page_cache import PageCache
from workbench.searching import load_study
from workbench.session import Session
from workbench.tabs import Ctx
from workbench.tabs.chat import ChatTab, restore_chat
from workbench.tabs.export import ExportTab
from workbench.tabs.pool import PoolTab, SetupPanel
from workbench.tabs.search import SearchTab
from workbench.tabs.tune import TuneTab
from workbench.tabs.tune_groups import granularity_of
from workbench.workspace import DEFAULT_TUNE_SLOTS, Workspace

CSS = ".gradio-container {max-width: 1500px !important}"
HEADER = ("## OptiMer Workbench\nMerge continual-pretraining models as θ_base + Σ α_i τ_i "
          "([arXiv 2603.28858](https://arxiv.org/abs/2603.28858)): tune α by hand, search it with Optuna, "
          "chat with the merges side by side, export the one you like.")


def _close(session: Any) -> None:
    if isinstance(session, Session):
        session.close()


# -- state that survives a page reload -----------------------------------------------------------------
SNAPSHOT_VERSION = 1
SECRET_FILE = ".workbench-browser-secret"


def browser_secret(workdir: Path) -> str:
    """The key the browser's saved state is encrypted with: one per workdir, so it outlives a server restart."""
    path = workdir / SECRET_FILE
    try:
        return path.read_text().strip() or _new_secret(path)
    except FileNotFoundError:
        return _new_secret(path)


def _new_secret(path: Path) -> str:
    key = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # readable by the server's user only
    with os.fdopen(fd, "w") as f:
        f.write(key)
    return key


def tune_snapshot(session: Session) -> dict[str, Any] | None:
    """What a browser keeps of the Tune tab (JSON-able), None without a pool."""
    if not session.has_pool:
        return None
    t = session.tune
    return {"v": SNAPSHOT_VERSION, "names": list(session.names), "weights": dict(t.weights),
            "instruction_weight": t.instruction_weight, "method": t.method, "params": dict(t.params)}


def set_tune(session: Session, weights: dict[str, float], iw: float, method: str, params: dict[str, Any]) -> None:
    """Make this the session's Tune merge without scoring it (a page load must not wait for a score)."""
    session.set_tune(weights, iw, method=method, params=params)


def _fits_a_layout(session: Session, grouped: dict[str, float]) -> bool:
    """Whether ``name@group`` weights give every vector of the pool a weight per group of one of the Tune tab's
    granularities on this model (another model's layers, or a partial set, do not)."""
    _, layout = granularity_of(session, grouped)
    return set(grouped) == {groups.param_name(n, g) for n in session.names for g in layout}


def restore_tune(session: Session, saved: Any) -> str:
    """Put a :func:`tune_snapshot` back into ``session``; a note ("" if restored) when it does not fit the pool."""
    if not saved:
        return ""
    if not isinstance(saved, dict) or saved.get("v") != SNAPSHOT_VERSION:
        return "saved Tune weights are from another version of the workbench: not restored"
    names = list(session.names)
    if saved.get("names") != names:
        return (f"saved Tune weights are for vectors {saved.get('names')} but this pool has {names}: "
                "not restored")
    try:
        weights = {n: float(saved["weights"][n]) for n in names}
        grouped = {k: float(v) for k, v in saved["weights"].items() if groups.split_key(k)[1] is not None}
        if grouped and not _fits_a_layout(session, grouped):
            return "saved per-layer-group weights do not fit this model's layer groups: not restored"
        weights.update(grouped)
        iw = float(saved.get("instruction_weight") or 0.0)
        if iw and session.shared.instruction is None:
            iw = 0.0  # the pool lost its instruction vector: keep the rest
        set_tune(session, weights, iw, str(saved.get("method") or "optimer"), dict(saved.get("params") or {}))
    except Exception as exc:
        return f"saved Tune weights could not be restored ({exc})"
    return ""


def restore_watched(session: Session, saved: Any) -> str:
    """Watch the saved ``{"storage", "study"}`` again if the study is still there; else a note."""
    if not saved:
        return ""
    if not isinstance(saved, dict) or not isinstance(saved.get("storage"), str) \
            or not isinstance(saved.get("study"), str):
        return "the saved watched study is malformed: not restored"
    storage, study = saved["storage"], saved["study"]
    try:
        found = load_study(storage, study)
    except Exception as exc:
        return f"the watched study {study!r} could not be opened ({exc}): not restored"
    if found is None:
        return f"the watched study {study!r} is no longer in {storage}: not restored"
    session.watched = (storage, study)
    return ""


def restore(session: Session, tune: Any, chat: Any, study: Any) -> str:
    """Restore a reloaded page's Tune merge, chat panes and watched study; the notes as Markdown."""
    if not (tune or chat or study) or not session.has_pool:
        return ""
    notes = []
    for fn, saved in ((restore_tune, tune), (restore_chat, chat), (restore_watched, study)):
        try:
            notes.append(fn(session, saved))
        except Exception as exc:  # stale state must never stop the page from loading
            notes.append(f"saved state ignored ({type(exc).__name__}: {exc})")
    return "\n".join(f"*{n}*" for n in notes if n)


def build_app(workdir: str | os.PathLike = "runs/demo", *, suite: EvalSuite | None = None, device: str = "cpu",
              dtype: str = "float32", tune_limit: int = 8, qa_limit: int = 8, max_vectors: int = 8,
              poll_s: float = 2.0, slots: int | None = None, preload: bool = False,
              base_on: str | None = None, tune_slots: int = DEFAULT_TUNE_SLOTS) -> gr.Blocks:
    """Build (not launch) the workbench over ``workdir``.

    ``suite`` replaces the dev suite (default: every embedded corpus, dev split); ``tune_limit``/``qa_limit``
    are the documents / QA pairs per dev set scored on each Tune change; ``poll_s`` is the Search tab's
    refresh period; ``slots`` the merged models the pool's engine may hold (default 2 on CPU, 1 on a GPU);
    ``base_on`` where it keeps the base ("host": memory-mapped in host memory, "device", None: automatic);
    ``preload`` opens the pool (and computes the vectors' norms and cosines) now, so the first page does not wait;
    ``tune_slots`` how many slots a slider release's dev sets are shared by (``optimer workbench --tune-slots``).
    """
    ws = Workspace(workdir, suite=suite, device=device, dtype=dtype, slots=slots, base_on=base_on,
                   tune_slots=tune_slots)
    if preload and ws.has_pool():
        sh = ws.pool()
        sh.cosines(), sh.vector_rows()  # every first page shows them: computed now, not by the first pages at once
        Session(ws, tune_limit=tune_limit, qa_limit=qa_limit).warm()  # its chart's bars, scored in the background
    key = "optimer-wb-" + hashlib.sha1(str(ws.workdir).encode()).hexdigest()[:10]  # one per workdir
    secret = browser_secret(ws.workdir)
    with gr.Blocks(title="OptiMer Workbench", analytics_enabled=False) as demo:
        state = gr.State(lambda: Session(ws, tune_limit=tune_limit, qa_limit=qa_limit), delete_callback=_close)
        saved_tune, saved_chat, saved_study = (gr.BrowserState(None, storage_key=f"{key}-{part}", secret=secret)
                                               for part in ("tune", "chat", "study"))
        ctx = Ctx(workspace=ws, state=state, max_vectors=max_vectors, poll_s=poll_s)
        gr.Markdown(HEADER)
        restored = gr.Markdown(elem_id="restore-status")
        setup = SetupPanel(ctx)
        with gr.Tabs():
            with gr.Tab("Pool", id="pool") as pool_tab:
                pool = PoolTab(ctx)
            with gr.Tab("Tune", id="tune") as tune_tab:
                ctx.tune = tune = TuneTab(ctx)
            with gr.Tab("Search", id="search") as search_tab:
                search = SearchTab(ctx)
            with gr.Tab("Chat", id="chat") as chat_tab:
                chat = ChatTab(ctx)
            with gr.Tab("Export", id="export") as export_tab:
                export = ExportTab(ctx)
        # The Search tab's charts poll the study storage only while that tab is shown
        for tab in (pool_tab, tune_tab, search_tab, chat_tab, export_tab):
            on = tab is search_tab
            tab.select(lambda on=on: [gr.Timer(active=on) for _ in search.timers], None, search.timers,
                       show_progress="hidden", concurrency_limit=None)
        parts = [setup, pool, tune, search, chat, export]
        outputs = [c for p in parts for c in getattr(p, "refresh_outputs", p.outputs)]

        def refresh_all(session: Session) -> list[Any]:
            """Every pool-dependent component, for this session's pool (page load, pool changes)."""
            return [u for p in parts for u in p.refresh(session)]

        def on_load(session: Session, tune_saved: Any, chat_saved: Any, study_saved: Any) -> tuple[str, Session]:
            # The Session goes back out as an output: Gradio creates a new page's State lazily and without a lock,
            # so an event racing this one (a timer tick) can store a second fresh Session under the same key; the
            # output makes the restored one the page's Session for the refresh and every later event.
            return restore(session, tune_saved, chat_saved, study_saved), session

        # restore what this browser saved before the tabs draw, so they show it; then keep saving it
        # Two page-load refreshes at a time: pages opened together then finish roughly first come, first served
        # instead of all sharing the cores and finishing together at the end (20 pages at once: median 2.6 s against
        # 3.2 s unlimited over alternated runs, BENCHMARKS.md "Page load, second pass"); two, not one, so that a page
        # whose refresh reads a large or remote Optuna storage does not hold up every other new page.
        demo.load(on_load, [state, saved_tune, saved_chat, saved_study], [restored, state],
                  concurrency_limit=None).then(refresh_all, state, outputs, concurrency_limit=2,
                                               concurrency_id="page-load")
        tune.chart.change(lambda s: tune_snapshot(s) or gr.skip(), state, saved_tune, show_progress="hidden",
                          concurrency_limit=None)
        search.study.change(lambda url, name: {"storage": url, "study": name} if name else None,
                            [search.storage, search.study], saved_study, show_progress="hidden",
                            concurrency_limit=None)
        chat.persist(saved_chat)
        # Refreshes after pool changes run one at a time, so they finish in the order they were asked: two clicks in a
        # row (a refused one, then the real one) could otherwise end the other way round, and the older refresh would
        # put back the old dev sets and slider values over a move made in between.
        in_order = {"concurrency_limit": 1, "concurrency_id": "pool-refresh"}
        # the Pool tab's answer is at the foot of a long page: bring it into view (in the browser, no server call)
        show_status = {"fn": None, "js": "() => document.getElementById('pool-status')?.scrollIntoView("
                                         "{block: 'nearest', behavior: 'smooth'})"}
        setup.button.click(setup.on_build, [state, setup.quick], setup.status, concurrency_limit=1).then(
            refresh_all, state, outputs, **in_order)
        pool.add.click(pool.on_add, [state, pool.path, pool.name], pool.status).then(**show_status).then(
            refresh_all, state, outputs, **in_order)
        pool.add_eval.click(pool.on_add_eval, [state, pool.eval_name, pool.eval_path], pool.status).then(
            **show_status).then(refresh_all, state, outputs, **in_order)
        pool.remove_eval.click(pool.on_remove_eval, [state, pool.eval_added], pool.status).then(
            **show_status).then(refresh_all, state, outputs, **in_order)
        pool.open.click(pool.on_open, [state, pool.base, pool.instruction, pool.vectors], pool.status).then(
            **show_status).then(refresh_all, state, outputs, **in_order)
        hide_internal_api(demo)  # before the context closes: the page config says so too
    hide_internal_api(demo)  # and the State's initial-value event, which gradio adds as the context closes
    skip_unused_per_event_work()  # before the queue is made: it reads the analytics setting then
    demo.queue(default_concurrency_limit=4)
    return demo


def skip_unused_per_event_work() -> None:
    """Two things Gradio does for every event, and for every streamed update of one, that the workbench never uses.

    Found with a sampler on the server under 20 chat clients (bench/load_chat.py): after each event the queue
    rebuilds its traffic summary for the optional monitoring page, a pandas table of up to the last 10,000 events
    (3.5-8.6 ms, measured, holding the interpreter lock), and each streamed update tries ``import matplotlib``,
    which, when it is not installed, searches the whole import path again every time. The summary is now rebuilt
    every 1,000 events (``GRADIO_ANALYTICS_CACHE_FREQUENCY``, unless the user set it: the monitoring page's summary
    lags by up to that many events and is empty before the first 1,000), and with no matplotlib installed its
    backend switch is skipped (it has nothing to switch).
    """
    os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", "1000")
    if importlib.util.find_spec("matplotlib") is None and hasattr(gr.utils, "MatplotlibBackendMananger"):
        gr.utils.MatplotlibBackendMananger = contextlib.nullcontext  # type: ignore[attr-defined,misc]


# The endpoints gradio_client users see: the chat and the page-load refresh (bench/load_chat.py drives both).
PUBLIC_API = ("chat", "refresh_all")


def hide_internal_api(demo: gr.Blocks) -> None:
    """Mark every event but :data:`PUBLIC_API` "undocumented" (still callable, not described).

    Gradio embeds the API description in every page it serves and builds code snippets for each endpoint per
    request: with the ~140 UI events public that was 1.7 MB of HTML and most of the server's time per page load.
    Call inside the ``gr.Blocks`` context, before it closes (the page config is taken then), and after it.
    """
    for fn in demo.fns.values():
        if fn.api_visibility == "public" and fn.api_name not in PUBLIC_API:
            fn.api_visibility = "undocumented"


def parse_auth(spec: str) -> tuple[str, str]:
    """``"user:password"`` -> ``("user", "password")``; the password may itself contain ':'."""
    user, sep, password = (spec or "").partition(":")
    if not sep or not user.strip() or not password:
        raise ConfigError("bad --auth / OPTIMER_AUTH: use USER:PASSWORD with a non-empty user and password "
                          "(e.g. OPTIMER_AUTH=alice:s3cret optimer workbench)")
    return user.strip(), password


def launch(workdir: str | os.PathLike = "runs/demo", *, host: str = "127.0.0.1", port: int = 7860,
           share: bool = False, block: bool = True, threads: int | None = None,
           auth: tuple[str, str] | str | None = None, heap: str = "fast", announce: str | None = None,
           **kwargs: Any) -> gr.Blocks:
    """Build and serve the workbench; ``block=False`` returns once the server is up (tests, notebooks).

    ``threads`` sets torch's intra-op threads for the process; by default 1 on CPU machines with at most 4 cores,
    where Tune scoring, searches, chat and other programs compete for the cores (measured on 2 busy cores before the
    merge engine: 0.74 s per Tune update with 1 thread, 1.2 s median and 10 s spikes with 2; with the engine on 2
    idle cores 2 threads changed nothing, BENCHMARKS.md), else torch's own choice. ``auth`` (``(user, password)`` or
    ``"user:password"``) requires that login on every page and API call. ``heap`` is how freed memory goes back to
    the OS (:func:`optimer_lib.engine.heap.configure_heap`: "fast" scores at full speed, "lean" at ~1.3x the time
    with peaks ~0.1 GB lower; both keep memory flat in the number of sessions). ``announce`` is printed once the
    pool is open, just before the server starts (the CLI's "OptiMer workbench on http://..." line: never printed for
    a pool that fails to open).
    ``kwargs`` go to :func:`build_app`.
    """
    import torch

    if threads is None and str(kwargs.get("device", "cpu")).startswith("cpu") and (os.cpu_count() or 1) <= 4:
        threads = 1
    if threads:
        torch.set_num_threads(int(threads))
    if isinstance(auth, str):
        auth = parse_auth(auth)
    configure_heap(heap)  # memory flat in the number of sessions, at full-speed scoring ("fast") or the lowest peaks
    kwargs.setdefault("preload", True)  # a served app opens its pool before the first page asks for it
    demo = build_app(workdir, **kwargs)
    if announce:
        print(announce, flush=True)
    try:
        # the page from memory after its first render (workbench.page_cache), unless a login makes it per user
        middleware = [] if auth else [Middleware(PageCache)]
        demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
                    quiet=not block or not share,  # our own line gives the URL; Gradio speaks for a share link
                    css=CSS, run_history=False, auth=auth, app_kwargs={"middleware": middleware},
                    auth_message="OptiMer Workbench: log in with the user and password it was started with" if auth
                    else None)
    except ValueError as exc:
        # Gradio gives its new server one 3-second HEAD request and calls localhost inaccessible when it times out,
        # which happens on a busy machine although the server is up: ask again, patiently, before giving up.
        if "localhost is not accessible" not in str(exc) or not _answers(demo.local_url):
            raise
        if block:
            demo.block_thread()
    return demo


def _answers(url: str | None, seconds: float = 60.0) -> bool:
    """Whether the server at ``url`` answers any HTTP request within ``seconds``."""
    import time

    import httpx

    deadline = time.monotonic() + seconds
    while url and time.monotonic() < deadline:
        try:
            httpx.head(url, timeout=10)
            return True
        except httpx.HTTPError:
            time.sleep(0.5)
    return False
