"""Objectives on demand, in the Search tab: re-rank stored trials for a new objective, and Pareto fronts.

- **Re-rank**: a new objective spec ranks every stored trial of the study shown above from its stored
  metrics (``optimer_lib.search.rerank``; nothing is evaluated), with the confidence line; the re-ranked best
  can be sent to Tune.
- **Pareto front**: 2–3 objective specs; either a multi-objective search in the background
  (``optimer_lib.search.pareto.run_pareto_search`` on the session's own model copy, like a search) or the front
  of the study shown above recomputed from stored metrics. ``gr.Plot`` has no click event in Gradio 6
  (its only event is ``change``), so a small ``gr.HTML`` bridge listens to plotly's ``plotly_click`` on
  the plot and sends the clicked marker's ``customdata[0]`` (its trial number) as a custom ``pick``
  event; the front points are also listed in a dropdown. Either way the point's weights go to Tune.
"""

from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from optimer_lib.search.defaults import INTERACTIVE
from optimer_lib.search.pareto import PARETO_SAMPLERS, measured, pareto_front
from workbench.figures import pareto_chart
from workbench.searching import SearchSpec, load_study
from workbench.session import Session
from workbench.tabs import Ctx, error_md, plotly_click_js, stop_reply
from workbench.text import counted

TOP_ROWS = 10
HINT = "<small>Click a point of the front (or choose it below) to load its weights into Tune.</small>"


def default_objectives(texts: list[str], qa: list[str]) -> list[str]:
    """Three objectives for the suite: a target language's loss, an accuracy, English retention."""
    target = next((t for t in texts if t != "en"), texts[0] if texts else "")
    out = [f"loss:{target}"] if target else []
    out += [f"acc:{qa[0]}"] if qa else [f"loss:{t}" for t in texts if t != target][:1]
    out += [f"loss:{t}" for t in texts if f"loss:{t}" not in out][:1]
    return (out + ["", "", ""])[:3]


def point_label(number: int, values: dict[str, float]) -> str:
    """A front point in the dropdown, each value as measured (an accuracy as an accuracy, not negated)."""
    return f"trial {number}: " + ", ".join(f"{k} {measured(k, v):.4g}" for k, v in values.items())


class ObjectivesPanel:
    """Re-rank and Pareto panels under the Search tab's charts; ``search`` is the SearchTab handle."""

    def __init__(self, ctx: Ctx, search: Any) -> None:
        self.ctx = ctx
        with gr.Accordion("Re-rank the stored trials for a new objective (no evaluation)", open=True):
            with gr.Row():
                self.spec = gr.Textbox(label="new objective", scale=4, elem_id="rerank-spec",
                                       placeholder="loss:ja=1,acc:math=2   (any weighted list of stored metrics)")
                with gr.Column(scale=1, min_width=220):
                    self.rerank = gr.Button("Re-rank", size="sm", variant="primary", elem_id="rerank-go")
                    self.send = gr.Button("Send re-ranked best to Tune", size="sm", elem_id="rerank-send")
            self.rerank_status = gr.Markdown(elem_id="rerank-status")
            self.rerank_table = gr.Dataframe(pd.DataFrame(columns=["rank", "trial", "fidelity", "objective"]),
                                             elem_id="rerank-table", interactive=False, max_height=260,
                                             label=f"top {TOP_ROWS} stored trials for the new objective")
        with gr.Accordion("Pareto front: several objectives at once", open=True):
            with gr.Row():
                with gr.Column(scale=1, min_width=280):
                    self.objectives = [gr.Textbox(label=f"objective {i + 1}" + (" (optional)" if i == 2 else ""),
                                                  elem_id=f"pareto-obj-{i}") for i in range(3)]
                    with gr.Row():
                        self.sampler = gr.Dropdown(list(PARETO_SAMPLERS), value="tpe", label="sampler",
                                                   min_width=100)
                        self.trials = gr.Number(INTERACTIVE.trials, precision=0, minimum=1, label="trials",
                                                elem_id="pareto-trials")
                    with gr.Row():
                        self.run = gr.Button("Run Pareto search", variant="primary", elem_id="pareto-run")
                        self.stop = gr.Button("Stop", variant="stop", elem_id="pareto-stop")
                    self.from_study = gr.Button("Front of the study shown above (stored metrics)", size="sm",
                                                elem_id="pareto-from-study")
                    gr.Markdown("<small>The search uses the bounds, seed, fidelity and instruction weight of the "
                                "form above; every objective is minimised (acc enters negated).</small>")
                    self.status = gr.Markdown(elem_id="pareto-status")
                with gr.Column(scale=3):
                    self.plot = gr.Plot(elem_id="pareto-plot", show_label=False)
                    self.bridge = gr.HTML(HINT, js_on_load=plotly_click_js("pareto-plot"), elem_id="pareto-click")
                    with gr.Row():
                        self.point = gr.Dropdown([], label="front point", scale=3, elem_id="pareto-point")
                        self.load = gr.Button("Load into Tune", scale=1, size="sm", elem_id="pareto-load")
                    self.pick_status = gr.Markdown(elem_id="pareto-pick-status")
        self.timer = gr.Timer(ctx.poll_s, active=False)  # on while the Search tab is shown (SearchTab.timers)
        self.outputs: list[Any] = list(self.objectives)
        self.live = [self.status, self.plot, self.point]

        shown = [ctx.state, search.storage, search.study]
        self.rerank.click(self.on_rerank, [*shown, self.spec], [self.rerank_status, self.rerank_table],
                          concurrency_limit=None)
        self.spec.submit(self.on_rerank, [*shown, self.spec], [self.rerank_status, self.rerank_table],
                         concurrency_limit=None)
        tune = ctx.tune
        self.send.click(self.on_send, [ctx.state, tune.instruction], [*tune.outputs, self.rerank_status],
                        show_progress="hidden", concurrency_limit=None)
        form = [ctx.state, *self.objectives, self.sampler, self.trials, search.bounds, search.seed,
                search.search_limit, search.iw]
        self.run.click(self.on_run, form, self.live, concurrency_limit=None)
        self.stop.click(self.on_stop, ctx.state, self.status, concurrency_limit=None)
        self.from_study.click(self.on_from_study, [*shown, *self.objectives], self.live, concurrency_limit=None)
        self.timer.tick(self.on_tick, ctx.state, self.live, show_progress="hidden", concurrency_limit=None)
        picked = [*tune.outputs, self.pick_status, self.point]
        self.bridge.pick(self.on_click, [ctx.state, tune.instruction], picked, show_progress="hidden",
                         concurrency_limit=None)
        self.point.input(self.on_pick, [ctx.state, self.point, tune.instruction], picked, show_progress="hidden",
                         concurrency_limit=None)
        self.load.click(self.on_pick, [ctx.state, self.point, tune.instruction], picked, show_progress="hidden",
                        concurrency_limit=None)

    # -- re-rank -------------------------------------------------------------------------------
    def on_rerank(self, session: Session, storage: str, study: str | None, spec: str) -> tuple[str, Any]:
        try:
            res = session.rerank(spec or "", storage, study)
        except Exception as exc:
            return error_md(exc), gr.update()
        rows = [{"rank": i, "trial": r.number, "fidelity": r.fidelity, "objective": r.value, **r.weights}
                for i, r in enumerate(res.ranking[:TOP_ROWS], 1)]
        return self._summary(session), pd.DataFrame(rows).round(4)

    @staticmethod
    def _summary(session: Session) -> str:
        res = session.reranked
        best = res.best
        return (f"**{res.objective}** on `{res.study.study_name}`: best stored trial **{best.number}** "
                f"(objective {best.value:.4g}), nothing evaluated. {res.confidence.summary()}.")

    def on_send(self, session: Session, iw: float) -> list[Any]:
        tune = self.ctx.tune
        try:
            updates = tune.show(session, session.reranked_best(), float(iw))
        except Exception as exc:
            return [*(gr.update() for _ in tune.outputs), error_md(exc)]
        return [*updates, f"{self._summary(session)}\n\nSent trial {session.reranked.best.number} to Tune."]

    # -- Pareto --------------------------------------------------------------------------------
    def on_run(self, session: Session, o1: str, o2: str, o3: str, sampler: str, trials: float, bounds: str,
               seed: float, search_limit: float, iw: float) -> list[Any]:
        try:
            run = session.start_pareto(SearchSpec(
                objectives=tuple(o for o in (o1, o2, o3) if o and o.strip()), sampler=sampler,
                trials=int(trials or 1), bounds=bounds or "", seed=int(seed or 0),
                search_limit=int(search_limit or 1), instruction_weight=float(iw or 0)))
        except Exception as exc:
            return [error_md(exc), gr.skip(), gr.skip()]
        session.ui.pop("pareto_sig", None)
        return [run.status(), gr.skip(), gr.update(choices=[], value=None)]

    def on_stop(self, session: Session) -> str:
        if session.pareto is None or not session.pareto.running:
            return "no Pareto search of this session is running"
        session.stop_pareto()
        return stop_reply(session, session.pareto, "pareto_sig")

    def on_from_study(self, session: Session, storage: str, study: str | None, *objectives: str) -> list[Any]:
        try:
            session.show_front(storage, study, [o for o in objectives if o])
        except Exception as exc:
            return [error_md(exc), gr.skip(), gr.skip()]
        session.ui.pop("pareto_sig", None)
        return self.on_tick(session)

    def on_tick(self, session: Session) -> list[Any]:
        """Redraw the shown front when its study gained a finished trial or the run's state changed."""
        shown = session.front_shown
        if shown is None:
            return [gr.skip() for _ in self.live]
        storage, name, specs = shown
        run = session.pareto
        status = run.status() if run is not None and run.study_name == name else ""
        try:
            study = load_study(storage, name)
            trials = study.get_trials(deepcopy=False) if study is not None else []
            sig = (shown, len(trials), sum(t.state.is_finished() for t in trials), status)
            if session.ui.get("pareto_sig") == sig:
                return [gr.skip() for _ in self.live]
            fig = pareto_chart(study, specs)
            front = pareto_front(study, specs) if fig.data else []
        except Exception as exc:
            session.ui["pareto_sig"] = None
            return [error_md(exc), gr.skip(), gr.skip()]
        session.ui["pareto_sig"] = sig
        if status:  # read again after the chart: a tick that began before Stop must not draw "running" after it
            status = run.status()
        if not status:
            what = " × ".join(specs) if specs else "its own objectives"
            points = counted(len(front), "point")
            status = f"front of `{name}` ({what}, from stored metrics): {points}"
        choices = [(point_label(p.number, p.values), p.number) for p in front]
        keep = session.ui.get("pareto_pick")
        return [status, fig, gr.update(choices=choices, value=keep if keep in {c[1] for c in choices} else None)]

    def on_click(self, session: Session, iw: float, evt: gr.EventData) -> list[Any]:
        return self.on_pick(session, getattr(evt, "_data", {}).get("trial"), iw)

    def on_pick(self, session: Session, number: Any, iw: float) -> list[Any]:
        tune = self.ctx.tune
        try:
            if number is None or number == "":
                raise ValueError("choose a front point first")
            updates = tune.show(session, session.front_weights(int(number)), float(iw))
        except Exception as exc:
            return [*(gr.update() for _ in tune.outputs), error_md(exc), gr.skip()]
        session.ui["pareto_pick"] = int(number)
        name = session.front_shown[1] if session.front_shown else "?"
        return [*updates, f"loaded trial **{int(number)}** of `{name}` into Tune", gr.update(value=int(number))]

    def refresh(self, session: Session) -> list[Any]:
        """Default objectives for the pool's dev suite (target loss, an accuracy, English loss)."""
        try:
            suite = session.shared.suite if session.has_pool else None
        except Exception:
            suite = None
        if suite is None:
            return [gr.update() for _ in self.outputs]
        return [gr.update(value=v) for v in default_objectives(list(suite.texts), list(suite.qa))]
