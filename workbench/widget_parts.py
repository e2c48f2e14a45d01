"""The pieces every notebook widget shares: the component base (shows itself, reports callback errors) and the
chat pane's HTML. Used by :mod:`workbench.widgets` and :mod:`workbench.arena_widget`:

    class MyWidget(Component):
        def __init__(self): self.status = widgets.HTML(); self.widget = widgets.VBox([self.status])
    pane.value = pane_html(history, "<b>A</b>")
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import ipywidgets as widgets
import plotly.graph_objects as go

from workbench.chatting import Message

PANE_STYLE = "border:1px solid #ddd;border-radius:4px;padding:6px;height:240px;overflow:auto;white-space:pre-wrap"


def redraw(target: go.FigureWidget, fig: go.Figure) -> None:
    """Replace the traces and layout of a live ``FigureWidget`` with those of ``fig``."""
    with target.batch_update():
        target.data = ()
        target.layout = fig.layout
        target.add_traces(list(fig.data))


def pane_html(history: Sequence[Message], head: str = "") -> str:
    """One chat pane: ``head`` (HTML) above the conversation's turns in a scrolling box."""
    turns = "".join(f"<b>{html.escape(m['role'])}</b>: {html.escape(m['content'])}\n" for m in history)
    return f"{head}<div style='{PANE_STYLE}'>{turns or '<i>no messages yet</i>'}</div>"


def error_html(exc: BaseException) -> str:
    return f"<span style='color:#b00020'>{html.escape(f'{type(exc).__name__}: {exc}')}</span>"


class Component:
    """Shows ``self.widget`` when the component is a cell's last value; ``status`` shows callback errors."""

    widget: widgets.Widget
    status: widgets.HTML

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def _guard(self, fn: Any) -> None:
        try:
            fn()
        except Exception as exc:  # a widget callback has nowhere to raise to: show it
            self.status.value = error_html(exc)
