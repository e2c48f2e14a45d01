"""Tab modules of the Gradio workbench; each ``build(ctx)`` returns a handle with ``outputs`` and ``refresh``.

``refresh(session)`` returns one update per component in ``outputs``: the app calls every tab's refresh
on page load and whenever the pool changes, so tabs never reach into each other except through ``Ctx``.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import gradio as gr

from workbench.workspace import Workspace


@dataclass
class Ctx:
    """What every tab sees: the workspace, the per-browser Session state and cross-tab handles."""

    workspace: Workspace
    state: gr.State
    max_vectors: int = 8
    poll_s: float = 2.0
    tune: Any = None  # the Tune tab's handle (the Search tab's "send best to Tune" writes its sliders)


def error_md(exc: BaseException) -> str:
    """A short Markdown error line for a status box (the message says what to do)."""
    return f"**error:** {html.escape(str(exc))}"
