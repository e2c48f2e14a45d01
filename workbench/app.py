"""The OptiMer workbench: a Gradio app over ``optimer_lib`` (Pool, Tune, Search, Chat, Export tabs).

    optimer workbench --workdir runs/demo            # http://127.0.0.1:7860
    from workbench.app import build_app, launch
    demo = build_app("runs/demo")                     # gr.Blocks, not launched (tests, notebooks, mounting)
    launch("runs/demo", port=7861)

The app is thin: every action is a :class:`workbench.session.Session` call. Each browser tab gets its
own Session (a ``gr.State``), so sliders, chats and searches of one tab never change another's models;
the base weights and vectors are loaded once per workdir and shared read-only. It listens on 127.0.0.1
unless ``host`` says otherwise, never opens a share link unless ``share=True``, and asks for a login when
``auth`` is given (``optimer workbench --auth user:password`` or ``OPTIMER_AUTH=user:password``).
"""

from __future__ import annotations

import os
from typing import Any

import gradio as gr

from optimer_lib.errors import ConfigError
from optimer_lib.scoring.evaluate import EvalSuite
from workbench.session import Session
from workbench.tabs import Ctx
from workbench.tabs.chat import ChatTab
from workbench.tabs.export import ExportTab
from workbench.tabs.pool import PoolTab, SetupPanel
from workbench.tabs.search import SearchTab
from workbench.tabs.tune import TuneTab
from workbench.workspace import Workspace

CSS = ".gradio-container {max-width: 1500px !important}"
HEADER = ("## OptiMer Workbench\nMerge continual-pretraining models as θ_base + Σ α_i τ_i "
          "([arXiv 2603.28858](https://arxiv.org/abs/2603.28858)): tune α by hand, search it with Optuna, "
          "chat with the merges side by side, export the one you like.")


def _close(session: Any) -> None:
    if isinstance(session, Session):
        session.close()


def build_app(workdir: str | os.PathLike = "runs/demo", *, suite: EvalSuite | None = None, device: str = "cpu",
              dtype: str = "float32", tune_limit: int = 8, qa_limit: int = 8, max_vectors: int = 8,
              poll_s: float = 2.0) -> gr.Blocks:
    """Build (not launch) the workbench over ``workdir``.

    ``suite`` replaces the dev suite (default: every embedded corpus, dev split); ``tune_limit``/``qa_limit``
    are the documents / QA pairs per dev set scored on each Tune change; ``poll_s`` is the Search tab's
    refresh period.
    """
    ws = Workspace(workdir, suite=suite, device=device, dtype=dtype)
    with gr.Blocks(title="OptiMer Workbench", analytics_enabled=False) as demo:
        state = gr.State(lambda: Session(ws, tune_limit=tune_limit, qa_limit=qa_limit), delete_callback=_close)
        ctx = Ctx(workspace=ws, state=state, max_vectors=max_vectors, poll_s=poll_s)
        gr.Markdown(HEADER)
        setup = SetupPanel(ctx)
        with gr.Tabs():
            with gr.Tab("Pool", id="pool"):
                pool = PoolTab(ctx)
            with gr.Tab("Tune", id="tune"):
                ctx.tune = tune = TuneTab(ctx)
            with gr.Tab("Search", id="search"):
                search = SearchTab(ctx)
            with gr.Tab("Chat", id="chat"):
                chat = ChatTab(ctx)
            with gr.Tab("Export", id="export"):
                export = ExportTab(ctx)
        parts = [setup, pool, tune, search, chat, export]
        outputs = [c for p in parts for c in p.outputs]

        def refresh_all(session: Session) -> list[Any]:
            """Every pool-dependent component, for this session's pool (page load, pool changes)."""
            return [u for p in parts for u in p.refresh(session)]

        demo.load(refresh_all, state, outputs, concurrency_limit=None)
        setup.button.click(setup.on_build, [state, setup.quick], setup.status, concurrency_limit=1).then(
            refresh_all, state, outputs)
        pool.add.click(pool.on_add, [state, pool.path, pool.name], pool.status).then(refresh_all, state, outputs)
        pool.open.click(pool.on_open, [state, pool.base, pool.instruction, pool.vectors], pool.status).then(
            refresh_all, state, outputs)
    demo.queue(default_concurrency_limit=4)
    return demo


def parse_auth(spec: str) -> tuple[str, str]:
    """``"user:password"`` -> ``("user", "password")``; the password may itself contain ':'."""
    user, sep, password = (spec or "").partition(":")
    if not sep or not user.strip() or not password:
        raise ConfigError("bad --auth / OPTIMER_AUTH: use USER:PASSWORD with a non-empty user and password "
                          "(e.g. OPTIMER_AUTH=alice:s3cret optimer workbench)")
    return user.strip(), password


def launch(workdir: str | os.PathLike = "runs/demo", *, host: str = "127.0.0.1", port: int = 7860,
           share: bool = False, block: bool = True, threads: int | None = None,
           auth: tuple[str, str] | str | None = None, **kwargs: Any) -> gr.Blocks:
    """Build and serve the workbench; ``block=False`` returns once the server is up (tests, notebooks).

    ``threads`` sets torch's intra-op threads for the process; by default 1 on CPU machines with at most
    4 cores, where Tune scoring, searches, chat and other programs compete for the cores (measured on 2
    busy cores: 0.74 s per Tune update with 1 thread, 1.2 s median and 10 s spikes with 2), else torch's
    own choice. ``auth`` (``(user, password)`` or ``"user:password"``) requires that login on every page and
    API call. ``kwargs`` go to :func:`build_app`.
    """
    import torch

    if threads is None and str(kwargs.get("device", "cpu")).startswith("cpu") and (os.cpu_count() or 1) <= 4:
        threads = 1
    if threads:
        torch.set_num_threads(int(threads))
    if isinstance(auth, str):
        auth = parse_auth(auth)
    demo = build_app(workdir, **kwargs)
    demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block, quiet=not block,
                css=CSS, run_history=False, auth=auth,
                auth_message="OptiMer Workbench: log in with the user and password it was started with" if auth
                else None)
    return demo
