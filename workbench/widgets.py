"""ipywidgets for notebooks over the workbench controller: weight sliders, a search runner, a chat comparison.

    from workbench import Session, Workspace
    from workbench.widgets import ChatCompare, SearchRunner, WeightSliders
    session = Session(Workspace("runs/notebooks"))
    sliders = WeightSliders(session); sliders            # a cell's last value shows it; release a slider to re-merge
    sliders.set({"ja": 0.3, "math": 0.2}).metrics        # the same from code (one re-merge)
    runner = SearchRunner(session, trials=20); runner     # objective, sampler, trials, start/stop, live history
    runner.start(); runner.wait(); runner.best_weights    # headless: block until the search ends
    ChatCompare(session).ask("What is 12 + 35?")          # two replies, also shown in the panes
    ArenaWidget(session)                                  # vote between two merges (workbench.arena_widget)

Each component keeps its ipywidgets in attributes, shows itself when it is a cell's last value
(``.widget`` is the container) and has methods doing what its buttons do, so notebooks executed
without a frontend (nbclient) drive them from code. Models, scores, searches and generation are the
session's (:mod:`workbench.session`); nothing here re-implements them. Charts are plotly
``FigureWidget`` objects (plotly >= 6 needs ``anywidget``).
"""

from __future__ import annotations

import html
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import ipywidgets as widgets
import plotly.graph_objects as go
from optuna.trial import TrialState

from optimer_lib.errors import OptimerError
from optimer_lib.scoring.objectives import presets
from optimer_lib.search.defaults import INTERACTIVE
from optimer_lib.search.samplers import SAMPLERS
from optimer_lib.search.study import SearchResult
from workbench.chatting import GenSettings, Message
from workbench.figures import HEIGHT, TEMPLATE, empty, tune_chart
from workbench.searching import SearchRun, SearchSpec, load_study
from workbench.session import BASE, BASE_IT, TUNE, Session, TuneResult
from workbench.text import counted, reworded
from workbench.widget_parts import Component, pane_html, redraw
from workbench.workspace import WorkbenchError


class WeightSliders(Component):
    """One slider per vector (+ the instruction weight) bound to the session's Tune merger.

    Releasing a slider (``continuous_update=False``) or setting ``sliders[name].value`` from code
    re-merges the model in place and scores the first ``session.tune_limit`` documents of each dev
    set; ``figure`` charts them next to the ``references`` (base, uniform average, best of the last
    search). :meth:`set` changes several sliders with one re-merge; names it omits keep their value.
    """

    def __init__(self, session: Session, *, max_weight: float = 1.5, step: float = 0.01,
                 references: Sequence[str] = ("base", "average", "best")) -> None:
        self.session, self.references = session, tuple(references)
        merger = session.tune
        slider = dict(min=0.0, max=max_weight, step=step, continuous_update=False, readout_format=".2f",
                      style={"description_width": "110px"})
        self.sliders = {n: widgets.FloatSlider(value=merger.weights[n], description=f"α {n}", **slider)
                        for n in session.names}
        inst = session.shared.instruction
        self.instruction = (widgets.FloatSlider(value=merger.instruction_weight, description=f"w {inst.name}",
                                                **slider) if inst is not None else None)
        self.figure = go.FigureWidget()
        self.status = widgets.HTML()
        self.result: TuneResult | None = None
        self._quiet = False
        for s in self._all():
            s.observe(self._on_change, names="value")
        buttons = []
        for name in ("zeros", "average", "best"):
            b = widgets.Button(description=name, layout={"width": "80px"})
            b.on_click(lambda _b, name=name: self._guard(lambda: self.preset(name)))
            buttons.append(b)
        self.widget = widgets.HBox([widgets.VBox([*self._all(), widgets.HBox(buttons)]),
                                    widgets.VBox([self.figure, self.status], layout={"flex": "1"})])
        self.apply()

    def _all(self) -> list[widgets.FloatSlider]:
        return [*self.sliders.values(), *([self.instruction] if self.instruction is not None else [])]

    @property
    def weights(self) -> dict[str, float]:
        """The α merged into the Tune model now."""
        return self.session.tune.weights

    @property
    def instruction_weight(self) -> float:
        return self.session.tune.instruction_weight

    def apply(self) -> TuneResult:
        """Re-merge with the sliders' values, score, and redraw the chart."""
        iw = self.instruction.value if self.instruction is not None else 0.0
        t0 = time.perf_counter()
        r = self.session.apply({n: s.value for n, s in self.sliders.items()}, iw)
        refs = {k: self.session.reference(k, iw) for k in self.references}
        title = f"dev metrics, first {counted(r.limit, 'document')} per set"
        redraw(self.figure, tune_chart(r.metrics, refs, title=title))
        obj = f" · balanced objective <b>{r.objective:.4f}</b>" if r.objective is not None else ""
        self.status.value = (f"merge {r.merge_s * 1000:.0f} ms + score {r.score_s * 1000:.0f} ms; "
                             f"{(time.perf_counter() - t0) * 1000:.0f} ms with the chart{obj}")
        self.result = r
        return r

    def set(self, weights: dict[str, float] | None = None, instruction_weight: float | None = None) -> TuneResult:
        """Move several sliders at once (unknown names raise), then re-merge and score once."""
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(self.sliders))
        if unknown:
            raise WorkbenchError(f"unknown vector(s) {unknown}: the pool has {list(self.sliders)}")
        if instruction_weight is not None and self.instruction is None:
            raise WorkbenchError("the pool has no instruction vector: leave instruction_weight unset")
        targets = [(self.sliders[n], float(v)) for n, v in weights.items()]
        if instruction_weight is not None and self.instruction is not None:
            targets.append((self.instruction, float(instruction_weight)))
        bad = {s.description: v for s, v in targets if not math.isfinite(v)}
        if bad:  # checked before any slider moves: a refused value never sticks in a slider
            raise WorkbenchError(f"weights must be finite numbers, got {bad}")
        self._quiet = True
        try:
            for s, v in targets:  # the slider's range grows to hold the value (as session.apply takes it), not clamps
                s.max = max(s.max, v)
                s.min = min(s.min, v)
                s.value = v
        finally:
            self._quiet = False
        return self.apply()

    def preset(self, name: str) -> TuneResult:
        """``zeros``, ``average`` or ``best`` (of the session's last search), as the buttons do."""
        return self.set(self.session.preset(name))

    def _on_change(self, change: dict) -> None:
        if not self._quiet:
            self._guard(self.apply)


def history_figure(trials: Sequence[Any], title: str = "objective per trial (lower is better)") -> go.Figure:
    """Each complete trial's value and the best so far, by trial number."""
    done = sorted((t for t in trials if t.state == TrialState.COMPLETE and t.value is not None),
                  key=lambda t: t.number)
    if not done:
        return empty("waiting for the first finished trial", title)
    xs, ys = [t.number for t in done], [float(t.value) for t in done]
    best = [min(ys[: i + 1]) for i in range(len(ys))]
    fig = go.Figure([go.Scatter(x=xs, y=ys, mode="markers", name="trial"),
                     go.Scatter(x=xs, y=best, mode="lines", name="best so far", line={"shape": "hv"})])
    fig.update_layout(title=title, height=HEIGHT, template=TEMPLATE, xaxis_title="trial",
                      yaxis_title="objective", margin={"l": 50, "r": 20, "t": 40, "b": 40})
    return fig


MAX_TRIALS, MAX_DOCS = 100_000, 1_000_000  # the form's trials and docs/set boxes, and the constructor's check

# What the SearchRunner form calls the settings the library's messages name by their CLI flags.
FORM_FIELDS = {"--objective": "objective (custom, or the preset)", "--bounds": "bounds", "--sampler": "sampler",
               "--trials": "trials", "--search-limit": "search_limit"}


class SearchRunner(Component):
    """Objective (preset, or a weighted/callable spec typed in ``custom``), sampler, trials, start and stop.

    :meth:`start` launches ``session.start_search`` (a background thread); ``figure`` redraws as
    trials finish. :meth:`wait` blocks until the search ends (for headless runs) and raises if it failed.
    """

    def __init__(self, session: Session, *, objective: str = "balanced", sampler: str = INTERACTIVE.sampler,
                 trials: int = INTERACTIVE.trials, bounds: str = INTERACTIVE.bounds,
                 search_limit: int = INTERACTIVE.search_limit or 32, top_k: int = INTERACTIVE.top_k,
                 study_name: str = "", instruction_weight: float = INTERACTIVE.instruction_weight) -> None:
        if sampler not in SAMPLERS:  # the Dropdown would refuse it with traitlets' bare "Invalid selection"
            raise WorkbenchError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
        if not 1 <= int(trials) <= MAX_TRIALS or not 1 <= int(search_limit) <= MAX_DOCS:  # not clamped unsaid
            raise WorkbenchError(f"trials must be 1..{MAX_TRIALS} and search_limit 1..{MAX_DOCS}, got {trials} and "
                                 f"{search_limit}")
        self.session = session
        suite = session.shared.suite
        choices = list(presets(list(suite.texts), list(suite.qa)))
        wide = {"style": {"description_width": "90px"}}
        self.preset = widgets.Dropdown(options=choices, value=objective if objective in choices else choices[0],
                                       description="objective", **wide)
        self.custom = widgets.Text(value="" if objective in choices else objective, description="custom",
                                   placeholder="loss:ja=1,acc:math=2 or file.py:fn (overrides the preset)", **wide)
        self.sampler = widgets.Dropdown(options=list(SAMPLERS), value=sampler, description="sampler", **wide)
        self.trials = widgets.BoundedIntText(value=trials, min=1, max=MAX_TRIALS, description="trials", **wide)
        self.bounds = widgets.Text(value=bounds, description="bounds", placeholder="0:1 or ja=0:1.5,zh=0:1", **wide)
        self.search_limit = widgets.BoundedIntText(value=search_limit, min=1, max=MAX_DOCS, description="docs/set",
                                                   **wide)
        self.top_k, self.study_name, self.instruction_weight = top_k, study_name, instruction_weight
        self.start_button = widgets.Button(description="start", button_style="primary")
        self.stop_button = widgets.Button(description="stop")
        self.start_button.on_click(lambda _b: self._guard(self.start))
        self.stop_button.on_click(lambda _b: self._guard(self.stop))
        self.status = widgets.HTML("no search yet")
        self.figure = go.FigureWidget()
        redraw(self.figure, history_figure([]))
        self.run: SearchRun | None = None
        self._study: Any = None
        self._lock = threading.Lock()
        form = [self.preset, self.custom, self.sampler, self.trials, self.bounds, self.search_limit,
                widgets.HBox([self.start_button, self.stop_button])]
        self.widget = widgets.HBox([widgets.VBox(form), widgets.VBox([self.figure, self.status],
                                                                    layout={"flex": "1"})])

    @property
    def objective(self) -> str:
        """The objective spec a start would use: ``custom`` if filled in, else the preset."""
        return self.custom.value.strip() or self.preset.value

    def spec(self) -> SearchSpec:
        return SearchSpec(objective=self.objective, sampler=self.sampler.value, trials=int(self.trials.value),
                          bounds=self.bounds.value, study_name=self.study_name,
                          search_limit=int(self.search_limit.value), top_k=self.top_k,
                          instruction_weight=self.instruction_weight)

    def start(self) -> SearchRun:
        """Start the search the form describes (one per session at a time); returns at once. A mistake in the form
        raises WorkbenchError naming the widget's field (``custom``, ``bounds``, ...)."""
        try:
            run = self.session.start_search(self.spec())
        except OptimerError as exc:
            raise WorkbenchError(reworded(str(exc), FORM_FIELDS)) from exc
        self.run = run
        run.on_event = lambda _ev: self.refresh()
        self.refresh()  # trials that finished before on_event was set
        threading.Thread(target=lambda: run.wait() and self.refresh(), daemon=True, name="search-widget").start()
        return run

    def stop(self) -> None:
        """Stop now: the running trial is abandoned at its next transformer block; finished trials stay."""
        self.session.stop_search()
        self.refresh()

    def wait(self, timeout: float | None = None) -> SearchResult | None:
        """Block until the search ends (or ``timeout`` s); its result, None while running or when stopped early."""
        if self.run is None:
            raise WorkbenchError("no search started: call start() (or press start) first")
        self.run.wait(timeout)
        self.refresh()
        if self.run.error:
            raise WorkbenchError(f"the search failed: {self.run.error}")
        return self.run.result

    @property
    def study(self) -> Any:
        """The optuna.Study of the last search (None before it has one)."""
        if self.run is None:
            return None
        if self._study is None or self._study.study_name != self.run.study_name:
            self._study = load_study(self.run.storage, self.run.study_name)
        return self._study

    @property
    def best_weights(self) -> dict[str, float] | None:
        """α of the best trial (re-scored best when the search finished with ``top_k`` > 0)."""
        return self.session.best_weights()

    def refresh(self) -> None:
        """Redraw the history from the study's storage and update the status line."""
        with self._lock:
            study = self.study
            trials = [] if study is None else study.get_trials(deepcopy=False)
            name = "" if self.run is None else f"{self.run.study_name}: "
            redraw(self.figure, history_figure(trials, f"{name}objective per trial (lower is better)"))
            if self.run is not None:
                self.status.value = html.escape(self.run.status()).replace("`", "")


class ChatCompare(Component):
    """Two chat panes, each a model of the session (``session.pane_choices()``), one prompt to both.

    :meth:`ask` sends a prompt to both panes (streamed into them) and returns the two replies;
    ``histories`` holds each pane's conversation; changing a pane's model or :meth:`clear` resets it.
    """

    def __init__(self, session: Session, panes: Sequence[str] | None = None,
                 settings: GenSettings | None = None) -> None:
        self.session = session
        choices = session.pane_choices()
        panes = list(panes or [BASE_IT if BASE_IT in choices else BASE, TUNE])
        bad = [p for p in panes if p not in choices]
        if len(panes) != 2 or bad:
            raise WorkbenchError(f"give two panes from {choices}; got {panes}")
        self.settings = settings or GenSettings()
        self.choosers = [widgets.Dropdown(options=choices, value=p, layout={"width": "95%"}) for p in panes]
        self.panes = [widgets.HTML(layout={"width": "95%"}) for _ in panes]
        self.histories: list[list[Message]] = [[], []]
        for i, c in enumerate(self.choosers):
            c.observe(lambda _ch, i=i: self._reset(i), names="value")
        self.prompt = widgets.Text(placeholder="a prompt for both models", layout={"width": "60%"})
        self.send_button = widgets.Button(description="send", button_style="primary")
        self.clear_button = widgets.Button(description="clear")
        self.send_button.on_click(lambda _b: self._send())
        self.clear_button.on_click(lambda _b: self.clear())
        self.max_new_tokens = widgets.IntSlider(value=self.settings.max_new_tokens, min=1, max=256,
                                                description="new tokens", continuous_update=False)
        self.greedy = widgets.Checkbox(value=self.settings.greedy, description="greedy")
        self.status = widgets.HTML()
        columns = [widgets.VBox([c, p], layout={"width": "50%"}) for c, p in zip(self.choosers, self.panes,
                                                                                    strict=True)]
        self.widget = widgets.VBox([widgets.HBox(columns), widgets.HBox([self.prompt, self.send_button,
                                                                         self.clear_button]),
                                    widgets.HBox([self.max_new_tokens, self.greedy]), self.status])
        self._render()

    def ask(self, prompt: str) -> list[str]:
        """Send ``prompt`` to both panes; returns their replies (a failing pane's reply names its error)."""
        settings = replace(self.settings, max_new_tokens=int(self.max_new_tokens.value),
                           greedy=bool(self.greedy.value))
        last, shown = self.histories, 0.0
        for hist in self.session.chat(prompt, [c.value for c in self.choosers], self.histories, settings):
            last = hist
            if time.perf_counter() - shown > 0.2:  # stream, but not one widget message per token
                self._render(hist)
                shown = time.perf_counter()
        self.histories = [list(h) for h in last]
        self._render()
        return [h[-1]["content"] for h in self.histories]

    def clear(self) -> None:
        self.histories = [[], []]
        self._render()

    def _reset(self, i: int) -> None:
        self.histories[i] = []
        self._render()

    def _send(self) -> None:
        self.status.value = ""
        self._guard(lambda: self.ask(self.prompt.value))

    def _render(self, histories: Sequence[list[Message]] | None = None) -> None:
        for pane, hist in zip(self.panes, histories or self.histories, strict=True):
            pane.value = pane_html(hist)


def __getattr__(name: str) -> Any:
    """``from workbench.widgets import ArenaWidget`` still works: the widget lives in :mod:`workbench.arena_widget`
    (imported on first use: it needs the ``arena`` extra, and it imports this module)."""
    if name == "ArenaWidget":
        from workbench.arena_widget import ArenaWidget

        return ArenaWidget
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
