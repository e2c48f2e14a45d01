"""Search tab: objective, sampler, trials, bounds, merge method; start/stop a background search; live Optuna charts.

The charts poll the study in Optuna storage with a ``gr.Timer``, so any study in the storage, including
one an ``optimer search --storage URL`` process is writing, can be watched; they redraw only when a
trial has finished. Below them, :mod:`workbench.tabs.objectives` re-ranks the shown study for a new
objective and draws Pareto fronts.

The merge method and its parameters (the registry's, as in the Tune tab) go into the :class:`SearchSpec`. With
sample prompts, each trial stores greedy generations (``optimer_lib.search.samples``): hovering a point of the
optimisation history previews them, clicking it shows them in full below the chart. ``gr.Plot`` has no click
event, so a ``gr.HTML`` bridge (as in :mod:`workbench.tabs.objectives`) sends the clicked point's trial number
(``customdata[0]``) as a ``pick`` event.
"""

from __future__ import annotations

import html
from typing import Any

import gradio as gr
import optuna
import plotly.graph_objects as go

from optimer_lib.scoring.objectives import presets
from optimer_lib.search import record
from optimer_lib.search.defaults import INTERACTIVE as D
from optimer_lib.search.samplers import SAMPLERS
from workbench.figures import study_figures
from workbench.searching import SearchSpec, load_study, study_names, study_table
from workbench.session import Session
from workbench.tabs import Ctx, error_md, in_page_words, method_controls, plotly_click_js, stop_reply
from workbench.tabs.objectives import ObjectivesPanel

KINDS = ("preset", "weighted metrics", "callable")
SAMPLES_HINT = "<small>With sample prompts, hover a point of the history for a preview, click it to read them.</small>"
PREVIEW_CHARS = 80


def _preview(samples: list[dict[str, str]]) -> str:
    """A hover label: each prompt's continuation, one line each, cut to :data:`PREVIEW_CHARS`."""
    lines = []
    for s in samples:
        text = " ".join(s["text"].split())
        cut = text[:PREVIEW_CHARS] + ("…" if len(text) > PREVIEW_CHARS else "")
        # quote=False: plotly's hover labels decode &amp; &lt; &gt; but show &quot; as it is
        lines.append(f"<i>{html.escape(s['prompt'][:30], quote=False)}</i> → {html.escape(cut, quote=False)}")
    return "<br>".join(lines) if lines else "(no sample generations)"


def with_samples(fig: go.Figure, study: optuna.Study | None) -> go.Figure:
    """The optimisation history with each trial marker's number as ``customdata[0]`` (the click bridge sends it)
    and its sample generations in the hover label (``customdata[1]``)."""
    if study is None:
        return fig
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    for trace in fig.data:
        if getattr(trace, "type", "") != "scatter" or "markers" not in (trace.mode or "markers") or trace.x is None:
            continue
        numbers = [int(x) for x in trace.x]
        trace.customdata = [[n, _preview(record.trial_samples(trials[n]) if n in trials else [])] for n in numbers]
        trace.hovertemplate = "trial %{customdata[0]}: %{y:.4g}<br>%{customdata[1]}<extra></extra>"
    return fig


def samples_md(study: optuna.Study | None, number: int) -> str:
    """Markdown of one trial's sample generations (prompt, then the greedy continuation), for the panel."""
    trial = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None) if study else None
    if trial is None:
        return f"no trial {number} in the study shown"
    samples = record.trial_samples(trial)
    weights = ", ".join(f"{k}={v:.3g}" for k, v in trial.params.items())
    head = f"**trial {number}** ({weights})"
    if not samples:
        return head + ": no sample generations (set sample prompts before starting a search)"
    # <code>, not a Markdown code span: a backtick in the model's text would end the span and garble the rest
    body = "\n\n".join(f"<i>{html.escape(s['prompt'])}</i> → <code>{html.escape(s['text']) or '(nothing)'}</code>"
                       for s in samples)
    return f"{head}\n\n{body}"


class SearchTab:
    """Handles of the Search tab."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                self.kind = gr.Radio(list(KINDS), value="preset", label="objective")
                self.preset = gr.Dropdown(["balanced"], value="balanced", label="preset", elem_id="obj-preset")
                self.spec = gr.Textbox(label="weighted metrics or callable", visible=False, elem_id="obj-spec",
                                       placeholder="loss:ja=1,acc:math=2   or   my_module:score / file.py:score")
                with gr.Row():
                    self.sampler = gr.Dropdown(list(SAMPLERS), value=D.sampler, label="sampler", min_width=100)
                    self.trials = gr.Number(D.trials, precision=0, minimum=1, label="trials", elem_id="search-trials")
                with gr.Row():
                    self.bounds = gr.Textbox(D.bounds, label="bounds", info="0:1, or ja=0:1.5,zh=0:1")
                    self.seed = gr.Number(D.seed, precision=0, label="seed", min_width=80)
                with gr.Accordion("fidelity, study, instruction", open=False):
                    self.search_limit = gr.Number(D.search_limit, precision=0, minimum=1,
                                                  label="documents per dev set / trial")
                    self.top_k = gr.Number(D.top_k, precision=0, minimum=0, label="re-score top-k (0: no re-scoring)")
                    self.rescore_limit = gr.Number(D.rescore_limit, precision=0, minimum=1,
                                                   label="documents for re-scoring")
                    self.study_name = gr.Textbox("", label="study name (empty: a new wb-<time> study)")
                    self.iw = gr.Number(D.instruction_weight, label="instruction weight during the search")
                with gr.Row():
                    self.method, self.params = method_controls("search", min_width=100)
                with gr.Accordion("sample generations per trial", open=False):
                    self.sample_prompts = gr.Textbox("", lines=3, label="prompts, one per line (empty: none)",
                                                     elem_id="search-sample-prompts")
                    self.sample_tokens = gr.Number(32, precision=0, minimum=1, maximum=512, label="tokens per prompt",
                                                   elem_id="search-sample-tokens")
                self.budget = gr.Textbox("", label="time budget", info="e.g. 30m or 2h: stop after the running "
                                         "trial once spent (empty: none)", elem_id="search-budget")
                with gr.Row():
                    self.start = gr.Button("Start", variant="primary", elem_id="search-start")
                    self.stop = gr.Button("Stop", variant="stop", elem_id="search-stop")
                    self.estimate = gr.Button("Estimate cost", size="sm", elem_id="search-estimate")
                self.status = gr.Markdown(elem_id="search-status")
            with gr.Column(scale=3):
                with gr.Row():
                    self.storage = gr.Textbox(ctx.workspace.storage_url, label="Optuna storage", scale=3)
                    self.study = gr.Dropdown([], label="study shown", scale=2, elem_id="search-study",
                                             allow_custom_value=True)
                    self.reload = gr.Button("↻", size="sm", scale=0, min_width=40)
                with gr.Row():
                    self.history = gr.Plot(elem_id="search-history", show_label=False)
                    self.alphas = gr.Plot(elem_id="search-alphas", show_label=False)
                self.bridge = gr.HTML(SAMPLES_HINT, js_on_load=plotly_click_js("search-history"),
                                      elem_id="search-click")
                self.samples = gr.Markdown(elem_id="search-samples")
                with gr.Row():
                    self.importance = gr.Plot(elem_id="search-importance", show_label=False)
                    self.landscape = gr.Plot(elem_id="search-landscape", show_label=False)
                self.table = gr.Dataframe(label="trials", elem_id="search-table", interactive=False, max_height=300)
                self.send = gr.Button("Send best to Tune", elem_id="search-send-best")
        self.objectives = ObjectivesPanel(ctx, self)
        # polls only while the Search tab is shown (the app turns it on and off with the tab): an idle page elsewhere
        # asks the server nothing
        self.timer = gr.Timer(ctx.poll_s, active=False)
        self.timers = [self.timer, self.objectives.timer]
        self.live = [self.status, self.history, self.alphas, self.importance, self.landscape, self.table]
        self.outputs: list[Any] = [self.preset, self.storage, self.study, *self.objectives.outputs]

        self.kind.change(lambda k: (gr.update(visible=k == "preset"), gr.update(visible=k != "preset")),
                         self.kind, [self.preset, self.spec], show_progress="hidden")
        form = [ctx.state, self.kind, self.preset, self.spec, self.sampler, self.trials, self.bounds, self.seed,
                self.search_limit, self.top_k, self.rescore_limit, self.study_name, self.iw, self.budget,
                self.method, self.params, self.sample_prompts, self.sample_tokens]
        self.start.click(self.on_start, form, [self.status, self.study], concurrency_limit=None)
        self.estimate.click(self.on_estimate, form, self.status, concurrency_limit=None)
        self.stop.click(self.on_stop, ctx.state, self.status, concurrency_limit=None)
        self.reload.click(self.on_reload, [ctx.state, self.storage, self.study], self.study, concurrency_limit=None)
        self.study.change(self.on_watch, [ctx.state, self.storage, self.study], self.live, show_progress="hidden",
                          concurrency_limit=None)
        self.study.change(lambda: "", None, self.samples, show_progress="hidden",  # a trial of the old study
                          concurrency_limit=None)
        self.timer.tick(self.on_tick, [ctx.state, self.storage, self.study], self.live, show_progress="hidden",
                        concurrency_limit=None)
        self.bridge.pick(self.on_pick, [ctx.state, self.storage, self.study], self.samples, show_progress="hidden",
                         concurrency_limit=None)
        tune = ctx.tune
        self.send.click(self.on_send, [ctx.state, tune.instruction], tune.outputs, show_progress="hidden",
                        concurrency_limit=None)

    # -- events --------------------------------------------------------------------------------
    @staticmethod
    def _spec(kind: str, preset: str, spec: str, sampler: str, trials: float, bounds: str, seed: float,
              search_limit: float, top_k: float, rescore_limit: float, study_name: str, iw: float,
              budget: str, method: str = "optimer", params: str = "", sample_prompts: str = "",
              sample_tokens: float = 32) -> SearchSpec:
        return SearchSpec(objective=(preset if kind == "preset" else spec) or "", sampler=sampler,
                          trials=int(trials or 1), bounds=bounds or "", study_name=study_name or "",
                          search_limit=int(search_limit or 1), top_k=int(top_k or 0),
                          rescore_limit=int(rescore_limit or 1), seed=int(seed or 0),
                          instruction_weight=float(iw or 0), time_budget=budget or "", method=method or "optimer",
                          method_params=params or "", sample_prompts=sample_prompts or "",
                          sample_tokens=int(sample_tokens or 32))

    def on_estimate(self, session: Session, *form: Any) -> str:
        """The search's estimated cost on this pool (times one merge and a short scoring on the engine)."""
        try:
            return session.estimate_search(self._spec(*form))
        except Exception as exc:
            return error_md(exc)

    def on_start(self, session: Session, *form: Any) -> tuple[str, Any]:
        try:
            run = session.start_search(self._spec(*form))
        except Exception as exc:
            return error_md(exc), gr.update()
        session.ui.pop("search_sig", None)
        names = list(dict.fromkeys([run.study_name, *study_names(run.storage)]))  # the thread creates the study
        return run.status(), gr.update(choices=names, value=run.study_name)

    def on_stop(self, session: Session) -> str:
        if session.search is None or not session.search.running:
            return "no search of this session is running"
        session.stop_search()
        return stop_reply(session, session.search, "search_sig")

    def on_reload(self, session: Session, storage: str, current: str | None) -> Any:
        try:
            names = study_names(storage)
        except Exception as exc:
            gr.Warning(in_page_words(str(exc)))
            return gr.update(choices=[], value=None)
        return gr.update(choices=names, value=current if current in names else (names[0] if names else None))

    def on_watch(self, session: Session, storage: str, study: str | None) -> list[Any]:
        session.watched = (storage, study) if study else None
        session.ui.pop("search_sig", None)
        return self.on_tick(session, storage, study)

    def on_tick(self, session: Session, storage: str, study_name: str | None) -> list[Any]:
        """Redraw when the watched study gained a finished trial or the run's state changed; else skip."""
        run = session.search
        status = run.status() if run is not None and run.study_name == study_name else ""
        try:
            study = load_study(storage, study_name) if study_name else None
        except Exception as exc:
            return [error_md(exc), *(gr.skip() for _ in self.live[1:])]
        trials = study.get_trials(deepcopy=False) if study is not None else []
        sig = (storage, study_name, len(trials), sum(t.state.is_finished() for t in trials), status)
        if session.ui.get("search_sig") == sig:
            return [gr.skip() for _ in self.live]
        session.ui["search_sig"] = sig
        history, *rest = study_figures(study)
        if status:  # read again after the figures: a tick that began before Stop must not draw "running" after it
            status = run.status()
        if study is not None and not status:
            status = f"watching `{study_name}`: {sum(t.state.is_finished() for t in trials)} finished trials"
        return [status, with_samples(history, study), *rest, study_table(study)]

    def on_pick(self, session: Session, storage: str, study_name: str | None, evt: gr.EventData) -> str:
        """A clicked point of the history: that trial's sample generations."""
        try:
            number = int(getattr(evt, "_data", {}).get("trial"))
            return samples_md(load_study(storage, study_name) if study_name else None, number)
        except Exception as exc:
            return error_md(exc)

    def on_send(self, session: Session, iw: float) -> list[Any]:
        tune = self.ctx.tune
        try:
            return tune.show(session, session.preset("best"), float(iw))
        except Exception as exc:
            return [*(gr.update() for _ in tune.outputs[:-1]), error_md(exc)]

    def refresh(self, session: Session) -> list[Any]:
        """Objective presets of the pool's dev suite and the studies in the workbench storage."""
        panel = self.objectives.refresh(session)
        if not session.has_pool:
            return [gr.update(), gr.update(), gr.update(), *panel]
        # the watched study (restored after a page reload, say) may live in another storage than the workbench's
        storage = session.watched[0] if session.watched else self.ctx.workspace.storage_url
        try:
            suite = session.shared.suite
            choices = list(presets(list(suite.texts), list(suite.qa)))
            names = study_names(storage)
        except Exception:
            return [gr.update(), gr.update(), gr.update(), *panel]
        watched = session.watched[1] if session.watched else None
        return [gr.update(choices=choices, value="balanced" if "balanced" in choices else choices[0]),
                gr.update(value=storage),
                gr.update(choices=names, value=watched if watched in names else (names[0] if names else None)),
                *panel]
