"""Tune tab: one slider per vector (+ instruction), a merge method, and the scoring set.

"weights per": ``vector`` (one α each) or ``layer-groups:G``: then each vector's "per layer group" accordion holds
one slider per group (embedding, G block slices, head; moving the vector's own slider sets all its groups) and a
heat-map shows every vector's weight on every layer.

On release the chart first shows an instant estimate (hatched, "≈": a quadratic in α fitted to the merges
scored so far), then each dev set as the engine scores it, then the full score with 95% bootstrap error bars
over the scored documents; a newer release cancels the older scoring. "Confirm" scores every document of the
chosen dev sets. The status line says what each step cost (release → estimate / first set / full score).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

import gradio as gr

from optimer_lib.merging import groups
from optimer_lib.merging.methods import format_method_params, parse_method_params
from optimer_lib.scoring.tune_config import TuneScoring
from workbench.figures import FigureCache, empty, layer_heatmap, tune_chart
from workbench.session import Session, TuneResult
from workbench.tabs import Ctx, error_md, method_controls
from workbench.tabs.tune_groups import GRANULARITIES, MAX_GROUPS, VECTOR_VIEW, GroupControls
from workbench.text import counted
from workbench.tuning import TuneUpdate

SLIDER_MAX = 1.5
REFS_WAIT_S = 300.0  # how long a chart drawn without a reference bar waits for it (scored in the background)


def _fmt_interval(u: TuneUpdate) -> str:
    ci = u.objective_interval
    if u.objective is None:
        return ""
    band = f" (95% [{ci.low:.4f}, {ci.high:.4f}] over the scored documents)" if ci is not None else ""
    return f" · objective (balanced) **{u.objective:.4f}**{band}"


def cost_line(session: Session, scoring: TuneScoring | None = None) -> str:
    """The scoring set's cost line (``scoring`` or the Tune one): tokens and forward FLOPs of one Tune score."""
    return f"one Tune score {session.scoring_cost(scoring)}"


def dev_sets_update(session: Session, ticked: Sequence[str] | None) -> dict[str, Any]:
    """The scoring set's dev-set choices: the session pool's, with the ``ticked`` ones that are still there."""
    names = session.shared.suite.names()
    return gr.update(choices=names, value=[n for n in ticked or [] if n in names])


class TuneTab(GroupControls):
    """Handles of the Tune tab; :meth:`show` turns weights into slider updates + chart + status."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self._chart, self._heat = FigureCache(tune_chart), FigureCache(layer_heatmap)  # shared by the sessions
        self._syncs = itertools.count()  # makes a re-sent group view differ from the page's (see _resync_view)
        gr.Markdown("Drag a slider and release it: the model is re-merged in place "
                    "(θ = θ_base + Σ α_i τ_i + w·τ_instruction) and scored on the first few documents "
                    "of each dev set.")
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                self.granularity = gr.Dropdown(GRANULARITIES, value="vector", label="weights per",
                                               elem_id="tune-granularity")
                self.sliders, self.accordions, self.group_sliders = [], [], []
                for i in range(ctx.max_vectors):
                    self.sliders.append(gr.Slider(0, SLIDER_MAX, value=0, step=0.01, precision=3, label=f"α {i}",
                                                  visible=False, elem_id=f"alpha-{i}"))
                    with gr.Accordion("per layer group", open=False, visible=False, elem_id=f"groups-{i}") as acc:
                        self.group_sliders += [gr.Slider(0, SLIDER_MAX, value=0, step=0.01, precision=3,
                                                         label=f"group {j}", visible=False,
                                                         elem_id=f"alpha-{i}-g{j}") for j in range(MAX_GROUPS)]
                    self.accordions.append(acc)
                self.instruction = gr.Slider(0, SLIDER_MAX, value=0, step=0.01, precision=3,
                                             label="instruction weight", visible=False, elem_id="alpha-instruction")
                with gr.Row():
                    self.zeros = gr.Button("zeros", size="sm", elem_id="preset-zeros")
                    self.average = gr.Button("average", size="sm", elem_id="preset-average")
                    self.best = gr.Button("best of last search", size="sm", elem_id="preset-best")
                with gr.Row():
                    self.method, self.params = method_controls("tune", scale=1)
                with gr.Accordion("scoring set", open=False) as scoring_box:
                    self.sets = gr.CheckboxGroup([], label="dev sets (none ticked: all)", elem_id="tune-sets")
                    with gr.Row():
                        self.docs = gr.Number(8, label="documents per set", precision=0, minimum=1,
                                              elem_id="tune-docs")
                        self.seq_len = gr.Number(128, label="tokens per document", precision=0, minimum=2,
                                                 elem_id="tune-seq-len")
                        self.batch = gr.Number(16, label="batch size", precision=0, minimum=1, elem_id="tune-batch")
                    self.lmeval = gr.Textbox(label="lm-eval tasks after the dev sets (optional, slow; comma-separated)",
                                             placeholder="tasks/arith_mc.yaml:acc_norm  or  a task shipped with "
                                             "lm-eval", elem_id="tune-lmeval")
                    self.apply_scoring = gr.Button("use this scoring set", size="sm", elem_id="tune-scoring-apply")
                    self.cost = gr.Markdown(elem_id="tune-cost")
                self.confirm = gr.Button("confirm: score every dev document", size="sm", elem_id="tune-confirm")
            with gr.Column(scale=3):
                self.chart = gr.Plot(label="per-distribution metrics", elem_id="tune-chart")
                self.status = gr.Markdown(elem_id="tune-status")
                self.heat = gr.Plot(label="weights per layer", elem_id="tune-heatmap")
        # Page load never scores (see refresh); this shows the background score once it is in, then stops.
        self.poll = gr.Timer(1.0, active=True)
        self.poll.tick(self.on_poll, [ctx.state], [self.chart, self.status, self.poll], show_progress="hidden",
                       concurrency_limit=None)
        # What the per-group controls show (see group_view): a change of it, not every release or page load,
        # sends their 1 + 7 × max_vectors updates (Gradio rebuilds a component for each update, even an empty one).
        self.group_view = gr.State(dict(VECTOR_VIEW))
        self.group_controls: list[Any] = [self.granularity, *self.accordions, *self.group_sliders]
        self.group_view.change(self.on_group_view, [self.group_view], self.group_controls, show_progress="hidden",
                               concurrency_limit=None)
        self.group_outputs: list[Any] = [self.heat, self.group_view]
        self.outputs: list[Any] = [*self.sliders, self.instruction, *self.group_outputs, self.sets, self.cost,
                                   self.chart, self.status]
        # a page load (reload included) also shows the session's method: its merge may be a ties or DARE one
        self.refresh_outputs: list[Any] = [*self.outputs, self.method, self.params]
        moved = [self.chart, self.status, *self.group_outputs, self.poll]
        moves = [*(("vector", i) for i in range(len(self.sliders))), ("instruction", 0),
                 *(("group", k) for k in range(len(self.group_sliders)))]
        for move, s in zip(moves, [*self.sliders, self.instruction, *self.group_sliders], strict=True):
            s.release(self._release_fn(move), self.inputs(move), moved, show_progress="hidden",
                      trigger_mode="always_last", concurrency_limit=None)
        pick = ("granularity", 0)
        self.granularity.input(self._release_fn(pick), self.inputs(pick), moved, show_progress="hidden",
                               trigger_mode="always_last", concurrency_limit=None)
        for i, acc in enumerate(self.accordions):  # a collapsed accordion drops value updates: re-send on open
            acc.expand(self._expand_fn(i), [ctx.state], self.group_sliders[i * MAX_GROUPS:(i + 1) * MAX_GROUPS],
                       show_progress="hidden", concurrency_limit=None)
        # input, not change: a page load or a recipe sets the dropdown to what the session already holds
        self.method.input(self.on_method, [ctx.state, self.method, self.params, *self.sliders, self.instruction],
                           [self.chart, self.status, self.poll], show_progress="hidden", concurrency_limit=None)
        self.params.submit(self.on_method, [ctx.state, self.method, self.params, *self.sliders, self.instruction],
                           [self.chart, self.status, self.poll], show_progress="hidden", concurrency_limit=None)
        self.confirm.click(self.on_confirm, [ctx.state], [self.chart, self.status], show_progress="hidden",
                           concurrency_limit=None)
        # a collapsed accordion drops updates: the dev sets (a corpus added or removed on the Pool tab) again on open
        scoring_box.expand(self.on_scoring_open, [ctx.state, self.sets], [self.sets], show_progress="hidden",
                           concurrency_limit=None)
        scoring_inputs = [ctx.state, self.sets, self.docs, self.seq_len, self.batch, self.lmeval]
        self.apply_scoring.click(self.on_scoring, scoring_inputs, [self.cost, self.chart, self.status, self.poll],
                                 show_progress="hidden", concurrency_limit=None)
        for box in (self.sets, self.docs, self.seq_len, self.batch):  # what the set would cost, before it is used
            box.input(self.on_scoring_preview, scoring_inputs, [self.cost], show_progress="hidden",
                      trigger_mode="always_last", concurrency_limit=None)
        for button, name in ((self.zeros, "zeros"), (self.average, "average"), (self.best, "best")):
            button.click(self._preset_fn(name), [ctx.state, self.instruction], self.outputs,
                         show_progress="hidden", concurrency_limit=None)

    # -- rendering -----------------------------------------------------------------------------
    def render(self, session: Session, r: TuneResult | TuneUpdate, t0: float, wait_best: bool = False,
               times: dict[str, float] | None = None, confirm: bool = False, log: bool = True) -> tuple[Any, str]:
        """Chart + status line for a Tune update or result (references are cached by the pool's engine).

        A new best of a running search is scored in the background unless ``wait_best``, so a slider
        release never pays for it; the bars appear on the next update. ``confirm``: the current bar is a score of
        every document (the confirm button), the reference bars stay the scoring set's. A reference still being
        scored is left out; :meth:`polled` has the poll timer redraw the chart when it is in. ``log``: print the
        status line of a final result to the server log.
        """
        u = r if isinstance(r, TuneUpdate) else None
        session.ui["tune_shown"] = True
        iw = u.state.instruction_weight if u else r.instruction_weight
        refs = {"base": session.reference("base", iw, wait=False), "average": session.reference("average", iw,
                                                                                                  wait=False),
                "best": session.reference("best", iw, wait=wait_best)}
        intervals = {k: (v.low, v.high) for k, v in (u.intervals if u else r.intervals).items()}
        sc = session.scoring
        what = f"first {counted(sc.docs, 'document')} per set" if sc.docs else "every document"
        if confirm and sc.docs:
            what = f"current: every document (confirm); base, average, best: first {sc.docs} per set"
        fig = self._chart(r.metrics, refs, title=f"dev metrics, {what}"
                         + (f" (instruction weight {iw:g} in every bar)" if iw else ""),
                         intervals=intervals, estimate=bool(u and u.phase == "estimate"))
        total = time.perf_counter() - t0
        times = times if times is not None else {}
        if u is None or u.phase == "final":
            times.setdefault("full", total)
        steps = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in times.items())
        if u is not None and u.phase == "estimate":
            n = u.estimate.n_points
            status = (f"≈ **estimate** ({u.estimate.kind} fit to {counted(n, 'scored merge')}; no forward "
                      f"pass) · scoring {u.sets_total} dev sets…")
        elif u is not None and u.phase == "partial":
            status = f"scored **{len(u.sets_done)} of {u.sets_total}** dev sets · release → {steps}"
        else:
            cached = " (cached: scored before)" if (u.cached if u else r.cached) else ""
            merge_s, score_s = (u.merge_s, u.score_s) if u else (r.merge_s, r.score_s)
            status = ("**confirm** (every document) · " if confirm else "") + (
                f"release → chart **{total * 1000:.0f} ms**{cached} ({steps}; merge {merge_s * 1000:.0f} ms, "
                f"score {score_s * 1000:.0f} ms)")
            status += "".join(f" · {k} {v:.2f} s" for k, v in (u.lmeval_s if u else r.lmeval_s).items())
            status += _fmt_interval(u) if u else (f" · objective (balanced) **{r.objective:.4f}**"
                                                  if r.objective is not None else "")
            if log:
                print(f"[workbench] tune: {status.replace('**', '')}", flush=True)
        return fig, status

    def stream(self, session: Session, updates, t0: float, confirm: bool = False):
        """Render each update of a Tune move as it comes (a cancelled move leaves the chart to the newer one)."""
        times: dict[str, float] = {}
        for u in updates:  # no lease here: leased_map's threads score, so any Gradio worker may resume it
            if u.phase == "cancelled":
                return
            if u.phase == "scoring":  # no estimate to draw: the chart stays until the first dev set is scored
                yield gr.skip(), (f"scoring **{u.sets_total}** dev sets… (no estimate yet: too few merges scored "
                                  "with this method and scoring set)")
                continue
            key = {"estimate": "estimate", "partial": "first set"}.get(u.phase)
            if key:
                times.setdefault(key, time.perf_counter() - t0)
            yield self.render(session, u, t0, times=times, confirm=confirm)

    def show(self, session: Session, weights: dict[str, float], iw: float) -> list[Any]:
        """Apply ``weights`` and return updates for every output (sliders get the values)."""
        t0 = time.perf_counter()
        r = session.apply(weights, iw)
        fig, status = self.render(session, r, t0, wait_best=True)
        names = session.names
        slider_updates = [gr.update(value=r.weights[names[i]]) if i < len(names) else gr.update()
                          for i in range(self.ctx.max_vectors)]
        return [*slider_updates, gr.update(value=r.instruction_weight), *self.group_updates(session, r.weights),
                gr.update(), gr.update(), fig, status]

    # -- per layer group ----------------------------------------------------------------------
    def group_updates(self, session: Session, weights: dict[str, float], granularity: str | None = None) -> list[Any]:
        """Updates of ``group_outputs`` for ``weights``: the heat-map and the group view (:meth:`group_view_of`),
        whose change redraws the per-group controls (:meth:`on_group_view`)."""
        names, layers = session.names, session.layers
        heat = self._heat(groups.per_layer(weights, names, layers), zmax=SLIDER_MAX)
        return [heat, self.group_view_of(session, weights, granularity)]

    def inputs(self, moved: tuple[str, int]) -> list[Any]:
        """What a move's event sends: never the group sliders it did not move (they may not be rendered, and
        Gradio refuses a whole event when one slider sends no value)."""
        kind, index = moved
        head = [self.ctx.state, self.granularity]
        if kind == "group":
            return [*head, self.group_sliders[index]]
        return [*head, *self.sliders, *([self.instruction] if kind == "instruction" else [])]

    def _release_fn(self, moved: tuple[str, int]):
        def fn(session: Session, granularity: str, *values: float):
            yield from self.polled(session, scored(session, granularity, *values))

        def scored(session: Session, granularity: str, *values: float):
            t0 = time.perf_counter()
            try:
                weights, iw, layout = self.read_weights(session, granularity, values, moved)
                if not layout:
                    session.ui["tune_layout"] = []
                # The chart answers first: a move's first update comes at once (cached score, estimate or "scoring",
                # see workbench.tuning), and the browser draws one message at a time (~0.1 s per plot on 2 cores),
                # so the heat-map and group view follow it, once (each output update costs a rebuild). They are drawn
                # before the move is made, so a failure drawing them leaves the session's merge as it was.
                heat = self.group_updates(session, weights, granularity)
                updates = session.score_stream(weights, iw)
                move = session.moves
                for n, (fig, status) in enumerate(self.stream(session, updates, t0)):
                    yield fig, status, gr.skip(), gr.skip()
                    if n == 0 and session.moves == move:  # else a newer move's heat-map may be out: keep it
                        yield gr.skip(), gr.skip(), *heat
            except Exception as exc:
                yield gr.update(), error_md(exc), gr.skip(), self._resync_view(session)

        fn.__name__ = f"on_release_{moved[0]}_{moved[1]}"
        return fn

    def polled(self, session: Session, items):
        """A handler's updates (``items``, tuples), each with the poll timer (its last output) left as it is, then
        the timer on while a reference bar the chart lacks is still being scored (see :meth:`on_poll`)."""
        width = None
        for item in items:
            width = len(item)
            yield (*item, gr.skip())
        if width is not None:
            yield (*(gr.skip() for _ in range(width)), self._await_references(session))

    @staticmethod
    def _await_references(session: Session) -> Any:
        """The poll timer: on (until the references are in, or REFS_WAIT_S) when the chart just drawn lacks one."""
        try:
            pending = session.references_pending(session.tune.instruction_weight)
        except Exception:  # no pool (the handler has said so): nothing to wait for
            return gr.Timer(active=False)
        session.ui["refs_wait"] = (session.moves, time.monotonic() + REFS_WAIT_S) if pending else None
        return gr.Timer(active=pending)

    # -- events --------------------------------------------------------------------------------
    def on_method(self, session: Session, method: str, params: str, *values: float):
        yield from self.polled(session, self._method(session, method, params, *values))

    def _method(self, session: Session, method: str, params: str, *values: float):
        t0 = time.perf_counter()
        try:
            names = session.names
            weights = dict(zip(names, values[:len(names)], strict=True))
            if groups.is_grouped(session.tune.weights):  # per-layer-group weights live in the group sliders
                weights = session.tune.weights
            p = parse_method_params(params, method)
            yield from self.stream(session, session.score_stream(weights, float(values[-1]), method=method,
                                                                 params=p), t0)
        except Exception as exc:
            yield gr.update(), error_md(exc)

    def on_confirm(self, session: Session):
        t0 = time.perf_counter()
        try:
            tune = session.tune
            yield from self.stream(session, session.score_stream(tune.weights, tune.instruction_weight,
                                                                 confirm=True), t0, confirm=True)
        except Exception as exc:
            yield gr.update(), error_md(exc)

    def on_poll(self, session: Session):
        """Until a chart is shown: draw the Tune merge's score as soon as the background scoring cached it. After a
        chart drawn without a reference bar (:meth:`polled`): redraw it once every reference is in."""
        try:
            if not session.has_pool:
                return gr.update(), gr.update(), gr.Timer(active=False)
            if session.ui.get("tune_shown"):
                return self._redraw_with_references(session)
            moves = session.moves
            r = session.cached_result()
            if r is None:  # scored in the background by this or another page; again if that score ended unfinished
                session.prefetch()
                return gr.update(), gr.update(), gr.Timer(active=True)
            if session.moves != moves or session.ui.get("tune_shown"):  # a move came meanwhile: it draws its own
                return gr.update(), gr.update(), gr.Timer(active=False)  # chart; this one would overwrite it, stale
            session.ui["tune_shown"] = True
            return *self.render(session, r, time.perf_counter()), self._await_references(session)
        except Exception as exc:
            return gr.update(), error_md(exc), gr.Timer(active=False)

    def _redraw_with_references(self, session: Session) -> tuple[Any, Any, Any]:
        """The chart again, its status line kept, when the references it lacked are in (a newer move draws its own)."""
        wait = session.ui.get("refs_wait")
        if wait is None or wait[0] != session.moves or time.monotonic() > wait[1]:
            session.ui["refs_wait"] = None
            return gr.update(), gr.update(), gr.Timer(active=False)
        if session.references_pending(session.tune.instruction_weight):
            return gr.update(), gr.update(), gr.Timer(active=True)
        session.ui["refs_wait"] = None
        r = session.cached_result()
        fig = self.render(session, r, time.perf_counter(), log=False)[0] if r is not None else gr.update()
        return fig, gr.update(), gr.Timer(active=False)

    def on_scoring_open(self, session: Session, ticked: list[str] | None) -> Any:
        try:
            return dev_sets_update(session, ticked)
        except Exception:  # no pool yet: nothing to offer
            return gr.update()

    def on_scoring_preview(self, session: Session, sets: list[str], docs: float | None, seq_len: float | None,
                           batch: float | None, lmeval: str = "") -> str:
        """The cost line of the scoring set as typed, before it is used (the line says it is not used yet)."""
        try:
            if None in (docs, seq_len, batch):
                return "fill in every number to see what this scoring set costs"
            sc = session.scoring_for(sets or None, int(docs), int(docs), int(seq_len), int(batch),
                                     lmeval=(lmeval or "").split(","))
            line = cost_line(session, sc)
            return line if sc == session.scoring else f"this set (not used yet; press *use this scoring set*): {line}"
        except Exception as exc:
            return error_md(exc)

    def on_scoring(self, session: Session, sets: list[str], docs: float, seq_len: float, batch: float,
                   lmeval: str = ""):
        yield from self.polled(session, self._scoring(session, sets, docs, seq_len, batch, lmeval))

    def _scoring(self, session: Session, sets: list[str], docs: float, seq_len: float, batch: float,
                 lmeval: str = ""):
        try:
            sc = session.set_scoring(sets or None, int(docs), int(docs), int(seq_len), int(batch),
                                     lmeval=(lmeval or "").split(","))
            cost = cost_line(session, sc)
        except Exception as exc:
            yield error_md(exc), gr.update(), gr.update()
            return
        t0 = time.perf_counter()
        tune = session.tune
        for fig, status in self.stream(session, session.score_stream(tune.weights, tune.instruction_weight), t0):
            yield cost, fig, status

    def _preset_fn(self, name: str):
        def fn(session: Session, iw: float) -> list[Any]:
            try:
                return self.show(session, session.preset(name), float(iw))
            except Exception as exc:
                return [*(gr.update() for _ in self.outputs[:-1]), error_md(exc)]

        fn.__name__ = f"preset_{name}"
        return fn

    def refresh(self, session: Session) -> list[Any]:
        """Slider count/labels for the session's pool, and the chart of its current weights if already scored.

        Never scores in the page-load path (a first page must come up in seconds on a real model): an unscored
        merge is scored in the background and shown on the next move.
        """
        hidden = [gr.update(visible=False) for _ in [*self.sliders, self.instruction]]
        hidden += [gr.update() for _ in self.group_outputs]
        keep = [gr.update(), gr.update()]  # method, params
        if not session.has_pool:
            return [*hidden, gr.update(), gr.update(), empty("no pool yet: build the demo pool on the Pool tab"), "",
                    *keep]
        try:
            names = session.names
            if len(names) > self.ctx.max_vectors:
                raise ValueError(f"the pool has {len(names)} vectors but this app shows at most "
                                 f"{self.ctx.max_vectors}: start it with a larger max_vectors")
            current = session.tune.weights
            iw = session.tune.instruction_weight
            t0 = time.perf_counter()
            r = session.cached_result()
            cost = cost_line(session)
            if r is not None:
                fig, status = self.render(session, r, t0)
            else:
                session.ui["tune_shown"] = False
                session.prefetch()
                fig = empty("scoring the current weights in the background: move a slider or press confirm")
                status = cost
            sets = dev_sets_update(session, session.scoring.sets)
        except Exception as exc:
            return [*hidden, gr.update(), gr.update(), empty("the pool could not be opened"), error_md(exc), *keep]
        sliders = [gr.update(visible=True, label=f"α {names[i]}", value=current[names[i]]) if i < len(names)
                   else gr.update(visible=False) for i in range(self.ctx.max_vectors)]
        inst = session.shared.instruction
        inst_update = gr.update(visible=inst is not None, value=iw,
                                label=f"instruction weight ({inst.name})" if inst else "instruction weight")
        tune = session.tune
        method = [gr.update(value=tune.method), gr.update(value=format_method_params(tune.params))]
        return [*sliders, inst_update, *self.group_updates(session, current), sets, cost, fig, status, *method]
