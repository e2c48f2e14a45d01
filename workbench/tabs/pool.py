"""Pool tab: the vectors (name, source, tokens, norm), their cosine heatmap, adding a vector from a
checkpoint directory or vector file in the workdir, adding or removing a dev corpus of your own (scored in Tune),
and choosing the base and the instruction vector.
The first-start panel that builds the embedded demo pool lives here too (:class:`SetupPanel`).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from workbench.figures import cosine_heatmap, empty
from workbench.session import Session
from workbench.tabs import Ctx, error_md

NONE = "(none)"
TRACK_TQDM = gr.Progress(track_tqdm=True)  # shows the CPT runs' tqdm bars in the page
COLUMNS = ["name", "role", "source", "tokens", "norm", "file"]


def _label(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


class SetupPanel:
    """Shown while the workdir has no pool: builds the embedded demo pool, with a progress bar."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        with gr.Group(visible=False, elem_id="setup") as self.group:
            gr.Markdown(f"### No pool in `{html.escape(str(ctx.workspace.workdir))}` yet\n"
                        "Build the embedded demo pool: one continual-pretraining run on each of ja, zh, math "
                        "and code from `assets/base`, then their distribution vectors and the instruction "
                        "vector (a few minutes on a laptop CPU; *quick* trains on fewer tokens).")
            with gr.Row():
                self.quick = gr.Checkbox(False, label="quick (60k tokens per run)")
                self.button = gr.Button("Build the demo pool", variant="primary", elem_id="setup-build")
            self.status = gr.Markdown(min_height=60, container=True, elem_id="setup-status")  # progress shows here
        self.outputs: list[Any] = [self.group]

    def on_build(self, session: Session, quick: bool, progress: gr.Progress = TRACK_TQDM) -> str:
        try:
            progress(0, desc="training the CPT models")
            shared = self.ctx.workspace.build_demo_pool(quick=bool(quick))
            session.use_pool(shared)
        except Exception as exc:
            return error_md(exc)
        return f"built a pool of {', '.join(shared.names)}"

    def refresh(self, session: Session) -> list[Any]:
        return [gr.update(visible=not session.has_pool)]


class PoolTab:
    """Handles of the Pool tab."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self._cosine: tuple[Any, Any] | None = None  # (pool, its heat-map): the same for every page of a pool
        root = ctx.workspace.workdir
        with gr.Row():  # the table gets the width its paths need; a long path wraps rather than being cut off
            with gr.Column(scale=5):
                self.table = gr.Dataframe(label="vectors", interactive=False, wrap=True, elem_id="pool-table")
            with gr.Column(scale=2, min_width=320):
                self.heatmap = gr.Plot(show_label=False, elem_id="pool-heatmap")
        with gr.Accordion("add a vector", open=False):
            gr.Markdown(f"A checkpoint directory trained from this base (its vector is extracted into "
                        f"`vectors/`) or an OptiMer `.safetensors` vector file; paths are relative to "
                        f"`{html.escape(str(root))}` and must stay inside it.")
            with gr.Row():
                self.path = gr.Textbox(label="path", placeholder="cpt/legal  or  vectors/legal.safetensors",
                                       elem_id="pool-add-path")
                self.name = gr.Textbox(label="name (checkpoints only; default: the folder name)")
                self.add = gr.Button("Add", elem_id="pool-add")
        with gr.Accordion("add a dev corpus (scored in Tune)", open=False):
            gr.Markdown("Your own dev data as one more dev set of the suite: a `.txt` file (documents separated by "
                        "blank lines) or `.jsonl` (a `text` field per line), optionally `.gz`/`.xz`, inside the "
                        "workdir. It is kept in `workbench.json` (`eval`) and scored as `loss:NAME` in Tune; "
                        "removing an added one takes it out of both (the file stays).")
            with gr.Row():
                self.eval_name = gr.Textbox(label="name", placeholder="legal", elem_id="pool-eval-name")
                self.eval_path = gr.Textbox(label="path", placeholder="data/legal_dev.jsonl", elem_id="pool-eval-path")
                self.add_eval = gr.Button("Add dev corpus", elem_id="pool-eval-add")
            with gr.Row():
                self.eval_added = gr.Dropdown([], label="added dev corpus", elem_id="pool-eval-added")
                self.remove_eval = gr.Button("Remove dev corpus", elem_id="pool-eval-remove")
        with gr.Accordion("choose base, vectors and instruction vector", open=False):
            with gr.Row():
                self.base = gr.Dropdown([], label="base checkpoint")
                self.instruction = gr.Dropdown([], label="instruction vector")
            self.vectors = gr.CheckboxGroup([], label="distribution vectors")
            self.open = gr.Button("Open this pool", elem_id="pool-open")
        self.status = gr.Markdown(elem_id="pool-status")
        self.outputs: list[Any] = [self.table, self.heatmap, self.base, self.instruction, self.vectors,
                                   self.eval_added]

    def on_add(self, session: Session, path: str, name: str) -> str:
        try:
            shared = self.ctx.workspace.add_vector(path, name.strip() or None)
            session.use_pool(shared)
        except Exception as exc:
            return error_md(exc)
        return f"added; the pool is now {', '.join(shared.names)}"

    def on_add_eval(self, session: Session, name: str, path: str) -> str:
        try:
            shared = self.ctx.workspace.add_eval(name, path)
            session.use_pool(shared)
        except Exception as exc:
            return error_md(exc)
        sets = shared.suite.names()
        return f"added dev set **{html.escape(name.strip())}**; the suite is now {', '.join(sets)}"

    def on_remove_eval(self, session: Session, name: str | None) -> str:
        try:
            if not name:
                raise ValueError("choose an added dev corpus to remove")
            shared = self.ctx.workspace.remove_eval(name)
            session.use_pool(shared)  # leaves the removed set out of this session's scoring set
        except Exception as exc:
            return error_md(exc)
        return (f"removed dev set **{html.escape(name)}** (its file stays); the suite is now "
                f"{', '.join(shared.suite.names())}")

    def on_open(self, session: Session, base: str | None, instruction: str | None, vectors: list[str]) -> str:
        try:
            if not base:
                raise ValueError("choose a base checkpoint")
            inst = None if instruction in (None, NONE) else instruction
            shared = self.ctx.workspace.set_pool(base, [v for v in vectors if v != inst], inst)
            session.use_pool(shared)
        except Exception as exc:
            return error_md(exc)
        return f"opened a pool of {', '.join(shared.names)} on `{html.escape(str(shared.base_dir))}`"

    def refresh(self, session: Session) -> list[Any]:
        ws = self.ctx.workspace
        root = ws.workdir
        files = [(_label(p, root), str(p)) for p in ws.vector_files()]
        bases = [(_label(p, root), str(p)) for p in ws.base_candidates()]
        added = gr.update(choices=list(ws.user_evals()), value=None)
        if not session.has_pool:
            return [pd.DataFrame(columns=COLUMNS), empty("no pool yet"), gr.update(choices=bases),
                    gr.update(choices=files), gr.update(choices=files), added]
        try:
            sh = session.shared
        except Exception as exc:
            return [pd.DataFrame({"error": [str(exc)]}), empty("the pool could not be opened"),
                    gr.update(choices=bases), gr.update(choices=[(NONE, NONE), *files]), gr.update(choices=files),
                    added]
        rows = pd.DataFrame(sh.vector_rows(), columns=COLUMNS)
        if not rows.empty:
            rows["file"] = [_label(Path(f), root) if f != "-" else f for f in rows["file"]]
        chosen = [str(Path(v.path).resolve()) for v in sh.vectors if v.path]
        inst = str(Path(sh.instruction.path).resolve()) if sh.instruction and sh.instruction.path else NONE
        if self._cosine is None or self._cosine[0] is not sh:
            self._cosine = (sh, cosine_heatmap(*sh.cosines()))
        return [rows, self._cosine[1],
                gr.update(choices=bases, value=str(sh.base_dir.resolve())),
                gr.update(choices=[(NONE, NONE), *files], value=inst),
                gr.update(choices=files, value=chosen), added]
