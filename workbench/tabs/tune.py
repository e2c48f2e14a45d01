"""Tune tab: one slider per vector (+ instruction); on release the session's model is re-merged in place
and scored on small dev subsets, and the chart compares it with base, uniform average and best found.

Latency (release -> chart) is printed under the chart: merge, score and chart times in milliseconds.
"""

from __future__ import annotations

import time
from typing import Any

import gradio as gr

from workbench.figures import empty, tune_chart
from workbench.session import Session, TuneResult
from workbench.tabs import Ctx, error_md

SLIDER_MAX = 1.5


class TuneTab:
    """Handles of the Tune tab; :meth:`show` turns weights into slider updates + chart + status."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        gr.Markdown("Drag a slider and release it: the model is re-merged in place "
                    "(θ = θ_base + Σ α_i τ_i + w·τ_instruction) and scored on the first few documents "
                    "of each dev set.")
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                self.sliders = [gr.Slider(0, SLIDER_MAX, value=0, step=0.01, precision=3, label=f"α {i}",
                                          visible=False, elem_id=f"alpha-{i}") for i in range(ctx.max_vectors)]
                self.instruction = gr.Slider(0, SLIDER_MAX, value=0, step=0.01, precision=3,
                                             label="instruction weight", visible=False, elem_id="alpha-instruction")
                with gr.Row():
                    self.zeros = gr.Button("zeros", size="sm", elem_id="preset-zeros")
                    self.average = gr.Button("average", size="sm", elem_id="preset-average")
                    self.best = gr.Button("best of last search", size="sm", elem_id="preset-best")
            with gr.Column(scale=3):
                self.chart = gr.Plot(label="per-distribution metrics", elem_id="tune-chart")
                self.status = gr.Markdown(elem_id="tune-status")
        self.outputs: list[Any] = [*self.sliders, self.instruction, self.chart, self.status]
        inputs = [ctx.state, *self.sliders, self.instruction]
        for s in [*self.sliders, self.instruction]:
            s.release(self.on_release, inputs, [self.chart, self.status], show_progress="hidden",
                      trigger_mode="always_last", concurrency_limit=None)
        for button, name in ((self.zeros, "zeros"), (self.average, "average"), (self.best, "best")):
            button.click(self._preset_fn(name), [ctx.state, self.instruction], self.outputs,
                         show_progress="hidden", concurrency_limit=None)

    # -- rendering -----------------------------------------------------------------------------
    def render(self, session: Session, r: TuneResult, t0: float, wait_best: bool = False) -> tuple[Any, str]:
        """Chart + status line for a Tune result (references are cached in the shared pool).

        A new best of a running search is scored in the background unless ``wait_best``, so a slider
        release never pays for it; the bars appear on the next update.
        """
        iw = r.instruction_weight
        refs = {"base": session.reference("base", iw), "average": session.reference("average", iw),
                "best": session.reference("best", iw, wait=wait_best)}
        fig = tune_chart(r.metrics, refs, title=f"dev metrics, first {r.limit} documents per set"
                         + (f" (instruction weight {iw:g} in every bar)" if iw else ""))
        total = time.perf_counter() - t0
        obj = f" · objective (balanced) **{r.objective:.4f}**" if r.objective is not None else ""
        status = (f"release → chart **{total * 1000:.0f} ms** (merge {r.merge_s * 1000:.0f} ms, "
                  f"score {r.score_s * 1000:.0f} ms){obj}")
        print(f"[workbench] tune: {status.replace('**', '')}", flush=True)
        return fig, status

    def show(self, session: Session, weights: dict[str, float], iw: float) -> list[Any]:
        """Apply ``weights`` and return updates for every output (sliders get the values)."""
        t0 = time.perf_counter()
        r = session.apply(weights, iw)
        fig, status = self.render(session, r, t0, wait_best=True)
        names = session.names
        slider_updates = [gr.update(value=r.weights[names[i]]) if i < len(names) else gr.update()
                          for i in range(self.ctx.max_vectors)]
        return [*slider_updates, gr.update(value=r.instruction_weight), fig, status]

    # -- events --------------------------------------------------------------------------------
    def on_release(self, session: Session, *values: float) -> tuple[Any, str]:
        t0 = time.perf_counter()
        try:
            names = session.names
            r = session.apply(dict(zip(names, values[:len(names)], strict=True)), float(values[-1]))
            return self.render(session, r, t0)
        except Exception as exc:
            return gr.update(), error_md(exc)

    def _preset_fn(self, name: str):
        def fn(session: Session, iw: float) -> list[Any]:
            try:
                return self.show(session, session.preset(name), float(iw))
            except Exception as exc:
                return [*(gr.update() for _ in self.outputs[:-1]), error_md(exc)]

        fn.__name__ = f"preset_{name}"
        return fn

    def refresh(self, session: Session) -> list[Any]:
        """Slider count/labels for the session's pool, then the chart of its current weights."""
        hidden = [gr.update(visible=False) for _ in self.outputs[:-2]]
        if not session.has_pool:
            return [*hidden, empty("no pool yet: build the demo pool on the Pool tab"), ""]
        try:
            names = session.names
            if len(names) > self.ctx.max_vectors:
                raise ValueError(f"the pool has {len(names)} vectors but this app shows at most "
                                 f"{self.ctx.max_vectors}: start it with a larger max_vectors")
            current = session.tune.weights
            iw = session.tune.instruction_weight
            t0 = time.perf_counter()
            r = session.apply(current, iw)
            fig, status = self.render(session, r, t0)
        except Exception as exc:
            return [*hidden, empty("the pool could not be opened"), error_md(exc)]
        sliders = [gr.update(visible=True, label=f"α {names[i]}", value=current[names[i]]) if i < len(names)
                   else gr.update(visible=False) for i in range(self.ctx.max_vectors)]
        inst = session.shared.instruction
        inst_update = gr.update(visible=inst is not None, value=iw,
                                label=f"instruction weight ({inst.name})" if inst else "instruction weight")
        return [*sliders, inst_update, fig, status]
