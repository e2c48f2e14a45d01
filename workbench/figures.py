"""Plotly figures of the workbench: Tune metrics, vector cosines, and live views of an Optuna study.

    from workbench.figures import tune_chart, cosine_heatmap, study_figures
    fig = tune_chart(result.metrics, {"base": base_metrics, "average": avg_metrics})
    history, alphas, importances, landscape = study_figures(study)   # optuna.visualization underneath
    fig = pareto_chart(study, ["loss:ja", "acc:math"])                # optimer_lib.search.pareto.pareto_figure

Every function returns a ``plotly.graph_objects.Figure`` (an empty one with a note when there is
nothing to show yet), sized for a dashboard cell.
"""

from __future__ import annotations

import json
import logging
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import optuna
import plotly.graph_objects as go
import plotly.io as pio
from optuna.trial import TrialState
from plotly.subplots import make_subplots

COLORS = {"base": "#9e9e9e", "average": "#8da0cb", "best": "#66c2a5", "current": "#fc8d62"}
HEIGHT = 320
MIN_TRIALS_FOR_IMPORTANCE = 4
# Trials drawn in the α and landscape plots and used for the importances. Optuna's contour puts every trial on
# its grid, so its JSON grows with the square of the trials (300: 1.1 MB, 2,000: 50 MB, which froze the browser
# tab); the parallel plot draws one line per trial. Above this many, a sample is drawn (see plotted_trials).
PLOT_TRIALS = 300
# plotly_white cut to the trace types drawn here: the full template carries defaults for 24 trace types, and
# validating them on every figure cost ~8 ms each (a page load draws several): 2-3x less with the same look.
_WHITE = pio.templates["plotly_white"]
TEMPLATE = go.layout.Template(layout=_WHITE.layout,
                              data={k: _WHITE.data[k] for k in ("bar", "scatter", "heatmap", "contour")})


class FigureCache:
    """``fn``'s figures by their arguments: the same chart asked for by several sessions is drawn once.

        chart = FigureCache(tune_chart)
        fig = chart(metrics, refs, title="dev metrics")   # a second call with equal arguments returns ``fig``

    Why: building a plotly figure validates every property (~50 ms for the Tune chart on 2 cores), and every
    page load draws the same chart of the same default weights. Arguments are keyed by their JSON (floats
    exactly, dict order kept: it orders the bars and heat-map rows); the ``size`` most recently used figures are
    kept. A returned figure is shared: serialise it, never change it in place.
    """

    def __init__(self, fn: Callable[..., go.Figure], size: int = 64) -> None:
        self.fn, self.size = fn, size
        self._figures: OrderedDict[str, go.Figure] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, *args: object, **kwargs: object) -> go.Figure:
        key = json.dumps([args, kwargs], default=repr)  # insertion order kept: it orders the bars and rows
        with self._lock:
            fig = self._figures.get(key)
            if fig is not None:
                self._figures.move_to_end(key)
                return fig
        fig = self.fn(*args, **kwargs)  # outside the lock: two sessions may draw one chart at once, not serially
        with self._lock:
            self._figures[key] = fig
            while len(self._figures) > self.size:
                self._figures.popitem(last=False)
        return fig


def _layout(fig: go.Figure, title: str) -> go.Figure:
    fig.update_layout(title={"text": title, "font": {"size": 14}}, height=HEIGHT, template=TEMPLATE,
                      margin={"l": 50, "r": 20, "t": 40, "b": 40}, legend={"orientation": "h", "y": -0.2})
    return fig


def empty(note: str, title: str = "") -> go.Figure:
    """A blank figure that says why it is blank."""
    fig = go.Figure()
    fig.add_annotation(text=note, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, title)


def tune_chart(current: Mapping[str, float] | None, references: Mapping[str, Mapping[str, float] | None],
               title: str = "dev metrics (first documents of each set)", *,
               intervals: Mapping[str, tuple[float, float]] | None = None, estimate: bool = False) -> go.Figure:
    """Grouped bars per distribution for each reference (base, average, best) and the current merge.

    Losses (left) are drawn as the difference to ``base`` when it is given (below zero = better than
    the base; hover shows the absolute loss), accuracies (right) as they are. The current merge's
    trace is named ``current``; ``intervals`` (metric -> (low, high), e.g. 95% bootstrap) draw error bars
    on it, and ``estimate=True`` draws it hatched and names it ``≈ estimate`` (no forward pass behind it).
    """
    series = {k: v for k, v in references.items() if v}
    current_label = "≈ estimate" if estimate else "current"
    if current:
        series[current_label] = current
    if not series:
        return empty("move a slider to score a merge", title)
    keys = list(dict.fromkeys(k for m in series.values() for k in m))
    losses = [k for k in keys if k.startswith("loss:")]
    accs = [k for k in keys if k.startswith(("acc:", "lmeval:"))]  # lm-eval metrics: on the right, as they are
    base = series.get("base")
    delta = base is not None and all(k in base for k in losses)
    cols = 2 if accs else 1
    loss_title = "loss − base loss (lower is better)" if delta else "loss (lower is better)"
    fig = make_subplots(rows=1, cols=cols, column_widths=[0.75, 0.25] if accs else None,
                        subplot_titles=[loss_title, *(["accuracy" if all(k.startswith("acc:") for k in accs)
                                                        else "accuracy, lm-eval"] if accs else [])])
    for label, metrics in series.items():
        color = COLORS.get(label, COLORS["current"] if label == current_label else "#e78ac3")
        for col, group in ((1, losses), (2, accs)):
            if not group or col > cols or (col == 1 and delta and label == "base"):
                continue
            absolute = [metrics.get(k) for k in group]
            shown = [None if v is None else v - base[k] for v, k in zip(absolute, group, strict=True)] \
                if col == 1 and delta else absolute
            extra: dict = {}
            if label == current_label and intervals:
                lo = [None if v is None or k not in intervals else v - intervals[k][0]
                      for v, k in zip(absolute, group, strict=True)]
                hi = [None if v is None or k not in intervals else intervals[k][1] - v
                      for v, k in zip(absolute, group, strict=True)]
                extra["error_y"] = {"type": "data", "array": hi, "arrayminus": lo, "visible": True}
            if label == current_label and estimate:
                extra["marker_pattern_shape"] = "/"
            fig.add_trace(go.Bar(name=label, x=[k.split(":", 1)[1] for k in group], y=shown, customdata=absolute,
                                 marker_color=color, legendgroup=label, showlegend=col == 1 or label == "base",
                                 hovertemplate="%{x}: %{customdata:.4f}<extra>" + label + "</extra>", **extra),
                          row=1, col=col)
    fig.update_layout(barmode="group")
    if delta:
        fig.add_hline(y=0, line_color=COLORS["base"], row=1, col=1)
    if accs and all(0 <= m[k] <= 1 for m in series.values() for k in accs if m.get(k) is not None):
        fig.update_yaxes(range=[0, 1], row=1, col=2)  # a fraction (an lm-eval perplexity is not)
    return _layout(fig, title)


def cosine_heatmap(names: Sequence[str], matrix: Sequence[Sequence[float]]) -> go.Figure:
    """Pairwise cosine similarity of the distribution vectors (the paper reports 0.03-0.31)."""
    if not names:
        return empty("no vectors", "cosine similarity")
    fig = go.Figure(go.Heatmap(z=[list(r) for r in matrix], x=list(names), y=list(names), zmin=-1, zmax=1,
                               colorscale="RdBu_r", text=[[f"{v:.2f}" for v in r] for r in matrix],
                               texttemplate="%{text}", hovertemplate="%{y} · %{x}: %{z:.4f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, "cosine similarity of distribution vectors")


def _quiet(fn, *args, **kwargs) -> go.Figure:
    """Call an optuna.visualization function without its experimental/empty-study warnings."""
    logger = logging.getLogger("optuna")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args, **kwargs)
    finally:
        logger.setLevel(level)


def study_figures(study: optuna.Study | None) -> tuple[go.Figure, go.Figure, go.Figure, go.Figure]:
    """(optimisation history, α of each trial, parameter importances, 2-D landscape) of a study.

    Importances and the contour need at least four complete trials; with one parameter the landscape is a
    slice plot.
    """
    import optuna.visualization as vis

    titles = ("optimisation history", "α of each trial", "parameter importances", "landscape")
    complete = [] if study is None else study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if study is not None and len(study.directions) > 1:
        return tuple(empty("a multi-objective study: see its Pareto front below", t)  # type: ignore[return-value]
                     for t in titles)
    if not complete:
        note = "no study selected" if study is None else "waiting for the first finished trial"
        return tuple(empty(note, t) for t in titles)  # type: ignore[return-value]
    params = list(dict.fromkeys(p for t in complete for p in t.params))
    history = _layout(_quiet(vis.plot_optimization_history, study), titles[0])  # two points per trial: all of them
    shown, note = plotted_trials(study, complete)
    alphas = _layout(_quiet(vis.plot_parallel_coordinate, shown), titles[1] + note)
    if len(complete) >= MIN_TRIALS_FOR_IMPORTANCE and len(params) >= 2:
        try:
            importance = optuna.importance.get_param_importances(shown)
            imp = _layout(_quiet(vis.plot_param_importances, shown), titles[2] + note)
            top = list(importance)[:2]
            land = _layout(_quiet(vis.plot_contour, shown, params=top),
                           f"{titles[3]}: {top[0]} × {top[1]}{note}")
        except (RuntimeError, ValueError) as exc:  # e.g. all values equal
            imp = empty(f"not available: {exc}", titles[2])
            land = _layout(_quiet(vis.plot_slice, shown), titles[3] + note)
    else:
        need = f"needs {MIN_TRIALS_FOR_IMPORTANCE} finished trials" if len(params) >= 2 else "needs 2 vectors"
        imp = empty(need, titles[2])
        land = _layout(_quiet(vis.plot_slice, shown), f"{titles[3]} (slice){note}")
    return history, alphas, imp, land


def plotted_trials(study: optuna.Study, complete: Sequence[optuna.trial.FrozenTrial],
                   limit: int = PLOT_TRIALS) -> tuple[optuna.Study, str]:
    """``(study, "")`` with at most ``limit`` finished trials, else an in-memory copy holding the best fifth of
    ``limit`` and the others spread evenly over the rest, with a title note saying so (figures stay small)."""
    if len(complete) <= limit:
        return study, ""
    best = sorted(complete, key=lambda t: t.value if study.direction == optuna.study.StudyDirection.MINIMIZE
                  else -t.value)[: limit // 5]
    chosen = {t.number for t in best}
    rest = [t for t in complete if t.number not in chosen]
    step = len(rest) / (limit - len(chosen))
    chosen |= {rest[int(i * step)].number for i in range(limit - len(best))}
    copy = optuna.create_study(direction=study.direction)
    copy.add_trials([t for t in complete if t.number in chosen])
    return copy, f" ({len(chosen):,} of {len(complete):,} trials)"


def pareto_chart(study: optuna.Study | None, objectives: Sequence[str] | None = None) -> go.Figure:
    """:func:`optimer_lib.search.pareto.pareto_figure` for the workbench, or a note while there is nothing to plot.

    ``objectives=None`` plots a multi-objective study's own values; specs recompute them from stored metrics.
    Each marker's ``customdata[0]`` is its trial number (the Search tab's click-to-load reads it).
    """
    from optimer_lib.search.pareto import pareto_figure

    title = "Pareto front"
    if study is None:
        return empty("no study: run a Pareto search or pick a study above", title)
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return empty("waiting for the first finished trial", title)
    fig = pareto_figure(study, objectives)
    scene = any(t.type == "scatter3d" for t in fig.data)  # a 3-D scene needs the room its axis titles take
    fig.update_layout(height=520 if scene else 420, template=TEMPLATE, clickmode="event",
                      margin={"l": 0, "r": 0, "t": 50, "b": 0} if scene else {"l": 60, "r": 20, "t": 50, "b": 40},
                      title={"font": {"size": 14}})
    return fig


def layer_heatmap(per_layer: Mapping[str, Sequence[float]], zmax: float = 1.5,
                  title: str = "merge weight per layer") -> go.Figure:
    """Vectors x [embed, block 0..L-1, head]: each vector's weight on each part of the model
    (``optimer_lib.merging.groups.per_layer``), so per-layer-group weights show where each vector acts."""
    if not per_layer:
        return empty("no vectors", title)
    names = list(per_layer)
    layers = len(per_layer[names[0]]) - 2
    cols = ["embed", *(f"block {i}" for i in range(layers)), "head"]
    z = [[float(w) for w in per_layer[n]] for n in names]
    fig = go.Figure(go.Heatmap(z=z, x=cols, y=names, zmin=0.0, zmax=zmax, colorscale="Viridis",
                               text=[[f"{w:.2f}" for w in row] for row in z], texttemplate="%{text}",
                               colorbar={"title": "α"}))
    return _layout(fig, title)
