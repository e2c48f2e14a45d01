"""Per-layer-group weights in the Tune tab without a browser: the heat-map's numbers, a release that reads only
the moved slider (the page's other group sliders may be stale), and Tune streams drained on one thread."""

from __future__ import annotations

import threading

import gradio as gr
import pytest
import torch
from test_workbench_session import SUITE, tiny_workdir

from optimer_lib.merging import groups
from workbench.figures import FigureCache, layer_heatmap, tune_chart
from workbench.session import Session
from workbench.tabs import Ctx
from workbench.tabs.tune import TuneTab
from workbench.tabs.tune_groups import VECTOR_VIEW
from workbench.workspace import Workspace

torch.set_num_threads(1)


def test_layer_heatmap_z_is_each_vectors_weight_per_layer():
    weights = {"ja": 0.3, "ja@blocks2-3": 0.9, "ja@embed": 0.1, "zh@blocks0-1": 0.5}  # zh: 0 outside its group
    fig = layer_heatmap(groups.per_layer(weights, ["ja", "zh"], layers=4), zmax=1.5)
    heat = fig.data[0]
    assert list(heat.y) == ["ja", "zh"]
    assert list(heat.x) == ["embed", "block 0", "block 1", "block 2", "block 3", "head"]
    assert [list(r) for r in heat.z] == [[0.1, 0.3, 0.3, 0.9, 0.9, 0.3], [0.0, 0.5, 0.5, 0.0, 0.0, 0.0]]
    assert [list(r) for r in heat.text][0] == ["0.10", "0.30", "0.30", "0.90", "0.90", "0.30"]
    assert (heat.zmin, heat.zmax) == (0.0, 1.5)
    # one layout's group weights, expanded, draw the same rows as the layer table of its groups
    layout = groups.group_names(4, "layer-groups:2")
    full = groups.expand(weights, ["ja", "zh"], layout)
    again = layer_heatmap(groups.per_layer(full, ["ja", "zh"], layers=4)).data[0]
    assert [list(r) for r in again.z] == [list(r) for r in heat.z]
    assert layer_heatmap({}).data == ()  # nothing to draw: an empty figure with a note


def test_a_figure_cache_draws_equal_arguments_once_and_keeps_the_most_recent():
    calls = []
    chart = FigureCache(lambda *a, **k: calls.append((a, k)) or tune_chart(*a, **k), size=2)
    m, refs = {"loss:ja": 3.25, "acc:math": 0.5}, {"base": {"loss:ja": 3.5, "acc:math": 0.25}}
    fig = chart(m, refs, title="t", intervals={"loss:ja": (3.0, 3.5)})
    assert chart(dict(m), {"base": dict(refs["base"])}, title="t", intervals={"loss:ja": [3.0, 3.5]}) is fig
    current = [round(y, 6) for t in fig.data if t.name == "current" for y in t.y]
    assert len(calls) == 1 and current == [-0.25, 0.5]  # drawn once, and the real chart (loss − base, accuracy)
    other = chart({"loss:ja": 3.25 + 1e-12, "acc:math": 0.5}, refs, title="t", intervals={"loss:ja": (3.0, 3.5)})
    assert other is not fig and len(calls) == 2  # floats are keyed exactly
    heat = FigureCache(layer_heatmap)
    rows = heat({"ja": [0.1, 0.2], "zh": [0.3, 0.4]}).data[0].y
    assert list(heat({"zh": [0.3, 0.4], "ja": [0.1, 0.2]}).data[0].y) == ["zh", "ja"] and list(rows) == ["ja", "zh"]
    chart(m, refs, title="u")  # a third figure: the least recently used (fig) goes
    assert chart(m, refs, title="t", intervals={"loss:ja": (3.0, 3.5)}) is not fig and len(calls) == 4


@pytest.fixture(scope="module")
def tab_and_session(tmp_path_factory: pytest.TempPathFactory) -> tuple[TuneTab, Session]:
    root = tiny_workdir(tmp_path_factory.mktemp("groups") / "wd")
    session = Session(Workspace(root, suite=SUITE), tune_limit=3, qa_limit=2)
    with gr.Blocks():
        ctx = Ctx(workspace=session.workspace, state=gr.State(), max_vectors=4)
        tab = TuneTab(ctx)
    return tab, session


def without_poll(yields) -> list[list]:
    """A handler's yields without the poll timer: each leaves it as it is, and a last one sets only the timer (on
    while a reference bar is still being scored)."""
    *ys, last = (list(y) for y in yields)
    assert all(u == gr.skip() for u in last[:-1]) and isinstance(last[-1], gr.Timer)
    assert all(y[-1] == gr.skip() for y in ys)
    return [y[:-1] for y in ys]


def release(tab: TuneTab, session: Session, move: tuple[str, int], granularity: str, plain: list[float],
            group_value: float = 0.0) -> list:
    """Run a move's handler as Gradio would (all its yields) with what its event sends: the last chart and status,
    and the heat-map and group view, which only the second yield carries (Gradio rebuilds a component per update):
    the first answers the move on the chart (cached score, estimate or "scoring", before any forward pass)."""
    values = [group_value] if move[0] == "group" else [*plain, *[0.0] * (tab.ctx.max_vectors - len(plain))]
    assert len(tab.inputs(move)) == 2 + len(values)
    first, heat, *later = without_poll(tab._release_fn(move)(session, granularity, *values))
    assert first[2:] == [gr.skip(), gr.skip()] and first[1] != gr.skip()  # the chart's status answers first
    assert heat[:2] == [gr.skip(), gr.skip()] and heat[2] != gr.skip()  # then the heat-map and view, once
    assert all(u == gr.skip() for y in later for u in y[2:])
    return [*(later or [first])[-1][:2], *heat[2:]]  # the final chart and status, with the heat-map and view


def test_release_reads_only_the_moved_group_slider(tab_and_session):
    tab, session = tab_and_session
    out = release(tab, session, ("vector", 0), "vector", [0.4, 0.0], [])
    assert session.tune.weights == {"ja": 0.4, "math": 0.0}
    assert out[3] == VECTOR_VIEW == tab.group_view.value  # one α per vector: the page's view, no controls sent
    assert tab.group_sliders[7] not in tab.inputs(("group", 6)) and tab.inputs(("group", 6))[-1] is \
        tab.group_sliders[6]  # a group move sends only its own slider (a collapsed one may send nothing)
    layout = session.group_layout("layer-groups:2")
    assert layout == ["embed", "blocks0-0", "blocks1-1", "head"]
    for _ in range(2):  # the dropdown fires `input` on select and again on blur: both start from the merge
        out = release(tab, session, ("granularity", 0), "layer-groups:2", [0.4, 0.0])
        assert groups.expand(session.tune.weights, session.names, layout) == {
            **{f"ja@{g}": 0.4 for g in layout}, **{f"math@{g}": 0.0 for g in layout}}
    assert "error" not in str(out[1]).lower()
    view = out[3]  # its change draws the controls: granularity, accordions, then the group sliders
    assert tab.group_controls == [tab.granularity, *tab.accordions, *tab.group_sliders]
    controls = tab.on_group_view(view)
    assert controls[0]["value"] == "layer-groups:2" and controls[1]["visible"] is True
    sliders = controls[1 + len(tab.accordions):]
    assert [u["value"] for u in sliders[:4]] == [0.4] * 4 and sliders[4]["visible"] is False
    assert [u["label"] for u in sliders[:2]] == ["α ja@embed", "α ja@blocks0-0"]
    assert not any(u.get("visible") for u in tab.on_group_view(VECTOR_VIEW)[1:])  # back to vector: all hidden

    release(tab, session, ("group", 2), "layer-groups:2", [0.4, 0.0], 1.2)  # vector 0, group 2: blocks1-1
    got = groups.expand(session.tune.weights, session.names, layout)
    assert [got[f"ja@{g}"] for g in layout] == [0.4, 0.4, 1.2, 0.4]
    assert [got[f"math@{g}"] for g in layout] == [0.0] * 4
    heat, view = release(tab, session, ("vector", 1), "layer-groups:2", [0.4, 0.7])[2:]  # math: every group
    assert [list(r) for r in heat.data[0].z] == [[0.4, 0.4, 1.2, 0.4], [0.7, 0.7, 0.7, 0.7]]
    assert view["values"]["math@head"] == 0.7 and view["values"]["ja@blocks1-1"] == 1.2


def test_a_tune_stream_resumed_on_any_thread_scores_on_the_engines_own(tmp_path, monkeypatch):
    """Gradio resumes a sync generator on whichever worker thread is free. A Tune stream holds no lease itself (its
    dev sets are scored on leased_map's threads), so it may: every set is scored on one of those, the stream ends
    with the final score, and a failing set is raised to the reader."""
    from optimer_lib.scoring.tune_config import TuneScoring

    session = Session(Workspace(tiny_workdir(tmp_path / "wd"), suite=SUITE), tune_limit=2, qa_limit=1)
    seen, real = [], TuneScoring.stream

    def spied(self, *a, **kw):
        seen.append(threading.current_thread().name)
        yield from real(self, *a, **kw)

    monkeypatch.setattr(TuneScoring, "stream", spied)

    def next_on(name: str, it):  # as Gradio does: each next() on whichever worker thread is free
        out: list = []
        t = threading.Thread(target=lambda: out.append(next(it, None)), name=name)
        t.start()
        t.join()
        return out[0]

    it = session.score_stream({"ja": 0.4})
    updates = [next_on(f"worker-{k}", it) for k in range(8)]
    phases = [u.phase for u in updates if u is not None]
    assert phases[-1] == "final" and set(phases) <= {"estimate", "scoring", "partial", "final"}
    assert seen and all(n.startswith("leased-map-") for n in seen), seen

    def broken(self, *a, **kw):
        raise ValueError("scoring failed")
        yield

    monkeypatch.setattr(TuneScoring, "stream", broken)
    with pytest.raises(ValueError, match="scoring failed"):
        list(session.score_stream({"ja": 0.9}))



def test_a_failed_move_sends_the_sessions_group_view_again(tab_and_session):
    """A granularity the model cannot show fails; the page's menu already shows it, so the view of the session's
    weights goes out again, marked new (an equal view would not fire the State's change)."""
    tab, session = tab_and_session
    release(tab, session, ("vector", 0), "vector", [0.3, 0.0])
    (out,) = without_poll(tab._release_fn(("granularity", 0))(session, "layer-groups:9", *[0.3, 0.0, 0.0, 0.0]))
    assert "error" in str(out[1]).lower() or "groups" in str(out[1])
    view = out[3]
    assert {k: v for k, v in view.items() if k != "sync"} == VECTOR_VIEW and "sync" in view
    again = without_poll(tab._release_fn(("granularity", 0))(session, "layer-groups:9", 0.3, 0.0, 0.0, 0.0))[-1][3]
    assert again != view  # each failure re-sends: the menu is reset every time
    assert tab.on_group_view(view)[0]["value"] == "vector"


def test_an_older_moves_heat_map_never_follows_a_newer_moves(tab_and_session):
    """The heat-map goes out after a move's first chart update: if a newer move came meanwhile (another event of
    the same tab), the older one's must not overwrite what the newer one drew."""
    tab, session = tab_and_session
    moves = tab._release_fn(("vector", 0))(session, "vector", 0.61, 0.0, 0.0, 0.0)
    first = list(next(moves))
    assert first[2:] == [gr.skip(), gr.skip(), gr.skip()] and "error" not in str(first[1]).lower()
    session.set_tune({"ja": 0.2, "math": 0.0})  # the newer move
    assert all(y[2] == gr.skip() and y[3] == gr.skip() for y in moves)
    assert session.tune.weights == {"ja": 0.2, "math": 0.0}


def test_confirm_says_what_it_scored(tab_and_session):
    """The confirm button scores every document: its chart title and status say so, and that the reference bars
    stay at the scoring set's documents (they were labelled as the scoring set's before)."""
    tab, session = tab_and_session
    *_, (fig, status) = list(tab.on_confirm(session))
    docs = session.scoring.docs
    assert status.startswith("**confirm** (every document) · release → chart"), status
    assert f"current: every document (confirm); base, average, best: first {docs} per set" in fig.layout.title.text
    moves = without_poll(tab._release_fn(("vector", 0))(session, "vector", 0.21, 0.0, 0.0, 0.0))
    fig, status = moves[-1][0], moves[-1][1]
    assert "confirm" not in status and f"first {docs} documents per set" in fig.layout.title.text


def test_a_recipe_with_joined_ranges_opens_in_the_granularity_it_was_made_with(tab_and_session):
    """A mergekit recipe written from layer-groups:2 joins a vector's equal neighbouring groups (ja@blocks0-1 on a
    2-block model): it opens at layer-groups:2, as that layout's own keys (a reload restores those), not at the
    finest granularity with the vector's weights lost."""
    from workbench.tabs.tune_groups import granularity_of, on_layout

    _, session = tab_and_session
    layout = session.group_layout("layer-groups:2")  # embed, blocks0-0, blocks1-1, head
    full = {"ja@embed": 0.1, "ja@blocks0-0": 0.5, "ja@blocks1-1": 0.5, "ja@head": 0.2,
            "math@embed": 0.0, "math@blocks0-0": 0.3, "math@blocks1-1": 0.7, "math@head": 0.0}
    joined = {k: v for k, v in full.items() if k not in ("ja@blocks0-0", "ja@blocks1-1")} | {"ja@blocks0-1": 0.5}
    assert granularity_of(session, joined) == ("layer-groups:2", layout)
    assert on_layout(session, joined) == full
    assert granularity_of(session, full) == ("layer-groups:2", layout)  # named exactly: kept as it is
    uniform = {f"{n}@{g}": 0.4 for n in ("ja", "math") for g in layout}  # named by layer-groups:2: stays there
    assert granularity_of(session, uniform)[0] == "layer-groups:2"
    assert on_layout(session, {"ja": 0.3, "math": 0.1}) == {"ja": 0.3, "math": 0.1}  # plain weights: untouched
    split = {"ja@embed": 0.1, "ja@blocks0-1": 0.5, "ja@head": 0.2,  # math's halves equal: layer-groups:1 holds it
             "math@embed": 0.0, "math@blocks0-0": 0.3, "math@blocks1-1": 0.3, "math@head": 0.0}
    coarse = session.group_layout("layer-groups:1")
    assert granularity_of(session, split) == ("layer-groups:1", coarse)  # the coarsest exact one, not the finest
    assert on_layout(session, split) == {"ja@embed": 0.1, "ja@blocks0-1": 0.5, "ja@head": 0.2, "math@embed": 0.0,
                                         "math@blocks0-1": 0.3, "math@head": 0.0}
