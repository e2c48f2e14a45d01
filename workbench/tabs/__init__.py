"""Tab modules of the Gradio workbench; each ``build(ctx)`` returns a handle with ``outputs`` and ``refresh``.

``refresh(session)`` returns one update per component in ``outputs``: the app calls every tab's refresh
on page load and whenever the pool changes, so tabs never reach into each other except through ``Ctx``.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import gradio as gr

from optimer_lib.merging.methods import MERGE_METHODS
from workbench.text import reworded
from workbench.workspace import Workspace

METHODS = sorted(m for m in MERGE_METHODS if m != "linear")  # "linear" is an alias of "optimer"


@dataclass
class Ctx:
    """What every tab sees: the workspace, the per-browser Session state and cross-tab handles."""

    workspace: Workspace
    state: gr.State
    max_vectors: int = 8
    poll_s: float = 2.0
    tune: Any = None  # the Tune tab's handle (the Search tab's "send best to Tune" writes its sliders)


# The library's messages name the CLI flag a user would change; on a page the same setting is a labelled box.
FLAG_LABELS = {
    "--objective": "objective", "--objectives": "per-distribution metrics", "--sampler": "sampler",
    "--trials": "trials", "--bounds": "bounds", "--study": "study name", "--storage": "Optuna storage",
    "--search-limit": "documents per dev set / trial", "--rescore-docs": "documents for re-scoring",
    "--top-k": "re-score top-k", "--sample-prompts": "prompts", "--sample-tokens": "tokens per prompt",
    "--time-budget": "time budget", "--method": "merge method", "--param": "method parameters",
    "--granularity": "weights per layer", "--seq-len": "tokens per document", "--batch-size": "batch size",
    "--dev-docs": "documents per set", "--seed": "seed", "--vector": "distribution vectors",
    "--base": "base checkpoint", "--instruction": "instruction vector",
}


def in_page_words(message: str) -> str:
    """``message`` with the CLI flags it names replaced by the quoted labels of the boxes that set them."""
    return reworded(message, FLAG_LABELS)


def error_md(exc: BaseException) -> str:
    """A short Markdown error line for a status box, in the page's words (the message says what to do)."""
    return f"**error:** {html.escape(in_page_words(str(exc)))}"


def method_controls(prefix: str, **layout: Any) -> tuple[gr.Dropdown, gr.Textbox]:
    """The merge-method dropdown and its parameters box (elem ids ``<prefix>-method``, ``<prefix>-params``)."""
    method = gr.Dropdown(METHODS, value="optimer", label="merge method", elem_id=f"{prefix}-method", **layout)
    params = gr.Textbox(label="method parameters", placeholder="e.g. density=0.2, lam=1", elem_id=f"{prefix}-params",
                        **layout)
    return method, params


def plotly_click_js(plot_id: str) -> str:
    """``js_on_load`` of a ``gr.HTML``: a click on a point of the plotly chart in ``#plot_id`` fires that HTML's
    ``pick`` event with ``{trial: customdata[0]}``.

    plotly keeps listeners across Plotly.react, so each plot div is hooked once; the poll finds new divs.
    """
    return """
const hook = () => {
  const gd = document.querySelector('#PLOT .js-plotly-plot');
  if (!gd || !gd.on || gd.__optimerPick) return;
  gd.__optimerPick = true;
  gd.on('plotly_click', (ev) => {
    const p = ev && ev.points && ev.points[0];
    const cd = p ? p.customdata : undefined;
    const n = Array.isArray(cd) ? cd[0] : cd;
    if (n !== undefined && n !== null) trigger('pick', {trial: Number(n)});
  });
};
hook();
setInterval(hook, 500);
""".replace("PLOT", plot_id)


STOP_WAIT_S = 2.0  # Stop waits this long for a search to end (one transformer block), so it shows the final status


def stop_reply(session: Any, run: Any, sig_key: str) -> str:
    """What a Stop button shows once ``run`` (a SearchRun or ParetoRun, already told to stop) ends or
    :data:`STOP_WAIT_S` has passed: its status ("stopped …", or "stopping …" while it still runs). Then forgets the
    tab's last drawn signature (``session.ui[sig_key]``), so the next poll redraws the status over this reply."""
    run.wait(STOP_WAIT_S)
    status = run.status()
    session.ui.pop(sig_key, None)
    return status
