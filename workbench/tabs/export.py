"""Export tab: the session's current Tune merge as an HF checkpoint (+ model card + mergekit YAML) under
``<workdir>/exports/<name>``, offered as a zip download.
"""

from __future__ import annotations

import html
from typing import Any

import gradio as gr

from workbench.session import Session
from workbench.tabs import Ctx, error_md


class ExportTab:
    """Handles of the Export tab."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        gr.Markdown("Writes the merge the Tune sliders hold now (weights, instruction weight and the last "
                    "Tune scores go into the model card).")
        with gr.Row():
            self.name = gr.Textbox("merge-1", label="folder name under exports/", elem_id="export-name")
            self.overwrite = gr.Checkbox(False, label="replace an existing export")
            self.button = gr.Button("Export", variant="primary", elem_id="export-button")
        self.status = gr.Markdown(elem_id="export-status")
        self.zip = gr.File(label="download (zip)", elem_id="export-zip", interactive=False)
        with gr.Accordion("model card", open=False):
            self.card = gr.Markdown(elem_id="export-card")
        self.outputs: list[Any] = []
        self.button.click(self.on_export, [ctx.state, self.name, self.overwrite],
                          [self.status, self.zip, self.card], concurrency_limit=None)

    def on_export(self, session: Session, name: str, overwrite: bool) -> tuple[str, Any, str]:
        try:
            res = session.export(name or "", bool(overwrite))
        except Exception as exc:
            return error_md(exc), None, ""
        w = ", ".join(f"{k}={v:.3g}" for k, v in session.tune.weights.items())
        iw = session.tune.instruction_weight
        return (f"saved `{html.escape(str(res.path))}` ({w}" + (f", instruction {iw:.3g}" if iw else "")
                + "): load it with `AutoModelForCausalLM.from_pretrained(...)`", str(res.zip_path), res.card)

    def refresh(self, session: Session) -> list[Any]:
        return []
