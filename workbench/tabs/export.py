"""Export tab: the session's current Tune merge as an HF checkpoint (+ model card + mergekit YAML) under
``<workdir>/exports/<name>``, offered as a zip download, optionally also as one GGUF file for llama.cpp
(:func:`optimer_lib.checkpoints.gguf_export.add_gguf_to_export`, read from the exported folder tensor by tensor,
offered as its own download); and the way back: a saved recipe (a search's
best.json, an export's mergekit.yaml or folder; a path inside the workdir or an uploaded file) loaded into Tune
with :func:`optimer_lib.merging.recipes.load_recipe`.
"""

from __future__ import annotations

import html
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr

from optimer_lib.checkpoints.gguf_export import DTYPES, add_gguf_to_export
from optimer_lib.merging.methods import format_method_params
from optimer_lib.merging.recipes import Recipe, check_recipe, load_recipe
from workbench.session import Session
from workbench.tabs import Ctx, error_md
from workbench.tabs.tune_groups import on_layout


def read_recipe(session: Session, path: str | None, upload: str | None) -> Recipe:
    """The recipe at ``upload`` (a file the browser sent) or ``path`` (inside the workdir), checked against the pool.

    The pool's vectors name a mergekit YAML's checkpoints; ConfigError/DataError/WorkbenchError say what is wrong.
    """
    where = upload if upload else session.workspace.resolve(path or "")
    sh = session.shared
    recipe = load_recipe(where, vectors=sh.vectors, instruction=sh.instruction)
    check_recipe(recipe, sh.names, has_instruction=sh.instruction is not None)
    return recipe


def _servable(path: Path) -> Path:
    """``path`` where Gradio serves downloads from (the temp folder, like the zip): a hard link, or a copy when the
    workdir is on another filesystem (a workdir outside the working directory is not served otherwise)."""
    out = Path(tempfile.mkdtemp(prefix="optimer-gguf-")) / path.name
    try:
        os.link(path, out)
    except OSError:
        shutil.copy2(path, out)
    return out


class ExportTab:
    """Handles of the Export tab."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        gr.Markdown("Writes the merge the Tune sliders hold now (weights, instruction weight and the last "
                    "Tune scores go into the model card).")
        with gr.Row():
            self.name = gr.Textbox("merge-1", label="folder name under exports/", elem_id="export-name")
            self.overwrite = gr.Checkbox(False, label="replace an existing export")
            self.gguf = gr.Dropdown(["no", *DTYPES], value="no", label="also as GGUF (llama.cpp; Llama models)",
                                    elem_id="export-gguf")
            self.button = gr.Button("Export", variant="primary", elem_id="export-button")
        self.status = gr.Markdown(elem_id="export-status")
        with gr.Row():
            self.zip = gr.File(label="download (zip)", elem_id="export-zip", interactive=False)
            self.gguf_file = gr.File(label="GGUF file", elem_id="export-gguf-file", interactive=False)
        with gr.Accordion("model card", open=False):
            self.card = gr.Markdown(elem_id="export-card")
        gr.Markdown("**Load a recipe into Tune**: a search's `best.json`, an export's `mergekit.yaml`, or an "
                    "exported folder (path relative to the workdir, e.g. `exports/merge-1`), or upload a file.")
        with gr.Row():
            self.recipe_path = gr.Textbox(label="recipe path (inside the workdir)", elem_id="recipe-path", scale=3,
                                          placeholder="exports/merge-1   or   searches/wb-.../best.json")
            self.recipe_file = gr.File(label="or upload best.json / mergekit.yaml", file_types=[".json", ".yaml",
                                                                                               ".yml"],
                                       type="filepath", elem_id="recipe-file", scale=2)
            self.recipe_button = gr.Button("Load recipe into Tune", elem_id="recipe-load", scale=1)
        self.recipe_status = gr.Markdown(elem_id="recipe-status")
        self.outputs: list[Any] = []
        self.button.click(self.on_export, [ctx.state, self.name, self.overwrite, self.gguf],
                          [self.status, self.zip, self.card, self.gguf_file], concurrency_limit=None)
        tune = ctx.tune
        # the Tune tab's method controls (when it has them) follow the recipe, like its sliders
        self._method = [c for c in (getattr(tune, "method", None), getattr(tune, "params", None)) if c is not None]
        self.recipe_button.click(self.on_recipe, [ctx.state, self.recipe_path, self.recipe_file, tune.instruction],
                                 [*tune.outputs, *self._method, self.recipe_status], show_progress="hidden",
                                 concurrency_limit=None)

    def on_recipe(self, session: Session, path: str, upload: str | None, iw: float) -> list[Any]:
        """Apply a recipe's weights, instruction weight and method, then show them on the Tune tab."""
        tune = self.ctx.tune
        try:
            r = read_recipe(session, path, upload)
            iw = float(iw or 0.0) if r.instruction_weight is None else r.instruction_weight
            weights = on_layout(session, r.weights)  # joined per-layer ranges: the Tune tab's own groups
            session.apply(weights, iw, method=r.method, params=r.params)
            shown = tune.show(session, weights, iw)
        except Exception as exc:
            return [*(gr.update() for _ in tune.outputs), *(gr.update() for _ in self._method), error_md(exc)]
        opts = format_method_params(r.params)
        method = [gr.update(value=r.method), gr.update(value=opts)][:len(self._method)]
        kept = " (instruction weight: the slider's, the recipe has none)" if r.instruction_weight is None else ""
        notes = "".join(f" · {html.escape(n)}" for n in r.notes)
        return [*shown, *method, f"loaded {html.escape(r.source)} into Tune: {html.escape(r.describe())}"
                f"{kept}{notes}"]

    def on_export(self, session: Session, name: str, overwrite: bool, gguf: str = "no") -> tuple[str, Any, str, Any]:
        try:
            res = session.export(name or "", bool(overwrite))
        except Exception as exc:
            return error_md(exc), None, "", None
        w = ", ".join(f"{k}={v:.3g}" for k, v in session.tune.weights.items())
        iw = session.tune.instruction_weight
        status = (f"saved `{html.escape(str(res.path))}` ({w}" + (f", instruction {iw:.3g}" if iw else "")
                  + "): load it with `AutoModelForCausalLM.from_pretrained(...)`")
        if not gguf or gguf == "no":
            return status, str(res.zip_path), res.card, None
        try:
            g = add_gguf_to_export(res.path, dtype=gguf, overwrite=True)
        except Exception as exc:  # the HF export stands; say why the GGUF file is missing
            return status + "<br>" + error_md(exc), str(res.zip_path), res.card, None
        status += (f"<br>GGUF: `{html.escape(str(g.path))}` ({g.dtype}, {g.bytes / 1e6:.1f} MB): "
                   f"`llama-cli -m {html.escape(g.path.name)}`")
        return status, str(res.zip_path), (res.path / "README.md").read_text(), str(_servable(g.path))

    def refresh(self, session: Session) -> list[Any]:
        return []
