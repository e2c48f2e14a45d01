"""Objectives on demand in the workbench (controller level): re-rank, Pareto search and fronts, picking a point."""

from __future__ import annotations

import gradio as gr
import optuna
import pytest
import torch
from test_workbench_session import SUITE, tiny_workdir

from optimer_lib.search.pareto import dominates, pareto_front
from optimer_lib.search.rerank import rerank
from workbench.figures import pareto_chart, study_figures
from workbench.searching import SearchSpec, best_params, load_study, study_table
from workbench.session import Session
from workbench.tabs import Ctx
from workbench.tabs.objectives import ObjectivesPanel, default_objectives
from workbench.workspace import WorkbenchError, Workspace

torch.set_num_threads(1)
FAST = {"sampler": "random", "search_limit": 2}


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> Session:
    """A session with a finished 4-trial single-objective search ("single") and a 4-trial Pareto search."""
    root = tiny_workdir(tmp_path_factory.mktemp("obj") / "wd")
    s = Session(Workspace(root, suite=SUITE), tune_limit=3, qa_limit=2)
    run = s.start_search(SearchSpec(trials=4, top_k=0, study_name="single", **FAST))
    assert run.wait(60) and run.error is None
    pareto = s.start_pareto(SearchSpec(objectives=("loss:ja", "loss:en"), trials=4, study_name="front", **FAST))
    assert pareto.wait(60) and pareto.error is None, pareto.error
    return s


def test_rerank_equals_library_rerank(searched: Session):
    spec = "loss:ja=1,loss:en=0.5"
    res = searched.rerank(spec)                                   # the watched study: "single"
    lib = rerank(load_study(searched.workspace.storage_url, "single"), spec)
    assert res.study.study_name == "single" and len(res.ranking) == 4
    assert [(r.number, r.value, r.weights) for r in res.ranking] == [(r.number, r.value, r.weights)
                                                                      for r in lib.ranking]
    assert res.confidence == lib.confidence
    assert searched.reranked_best() == lib.best_weights
    other = searched.rerank("loss:en", study="front")             # a Pareto study stores all metrics too
    assert other.study.study_name == "front" and len(other.ranking) == 4
    with pytest.raises(WorkbenchError, match="outside the workdir"):
        searched.rerank("/tmp/evil.py:score")
    with pytest.raises(WorkbenchError, match="no study"):
        searched.rerank("loss:en", study="nope")


def test_pareto_search_runs_in_background(searched: Session):
    run = searched.pareto
    assert run.result is not None and len(run.events) == 4
    assert all(e.values is not None and len(e.values) == 2 for e in run.events)
    assert run.result.path.is_file() and "front points" in run.status()
    study = load_study(searched.workspace.storage_url, "front")
    assert best_params(study, searched.names) is None             # no single best of a multi-objective study
    watched, searched.watched = searched.watched, (searched.workspace.storage_url, "front")
    try:
        with pytest.raises(WorkbenchError, match="multi-objective"):
            searched.preset("best")
    finally:
        searched.watched = watched
    assert all(not f.data for f in study_figures(study))          # notes, not an error
    assert list(study_table(study).columns)[:3] == ["number", "loss:ja", "loss:en"]
    fig = pareto_chart(study)
    assert sorted(n for t in fig.data for (n,) in t.customdata) == [0, 1, 2, 3]
    with pytest.raises(WorkbenchError, match="2 or 3 objectives"):
        searched.start_pareto(SearchSpec(objectives=("loss:ja",)))
    with pytest.raises(WorkbenchError, match="multi-objective sampler"):
        searched.start_pareto(SearchSpec(objectives=("loss:ja", "loss:en"), sampler="gp"))


def test_front_of_a_stored_study_and_picking_a_point_sets_tune(searched: Session):
    front = searched.show_front(study="single", objectives=["loss:ja", "loss:en", ""])
    lib = pareto_front(load_study(searched.workspace.storage_url, "single"), ["loss:ja", "loss:en"])
    assert [p.number for p in front] == [p.number for p in lib] and front
    vals = [list(p.values.values()) for p in front]
    assert not any(dominates(a, b) for a in vals for b in vals)
    assert searched.front_shown[1:] == ("single", ("loss:ja", "loss:en"))
    pick = front[-1]
    r = searched.apply(searched.front_weights(pick.number))
    assert r.weights == pick.weights and searched.tune.weights == pick.weights
    with pytest.raises(WorkbenchError, match="one objective"):
        searched.show_front(study="single")
    with pytest.raises(WorkbenchError, match="no complete trial"):
        searched.front_weights(99)


def test_panel_handlers_load_points_and_reranked_best_into_tune(searched: Session):
    """The Search tab's handlers, called directly (no server): the same path as a click or a dropdown pick."""
    from workbench.tabs.tune import TuneTab

    with gr.Blocks():
        ctx = Ctx(workspace=searched.workspace, state=gr.State(), max_vectors=4)
        ctx.tune = TuneTab(ctx)
        search = type("Form", (), {k: gr.Textbox() for k in ("storage", "study", "bounds", "seed", "search_limit",
                                                                  "iw")})()
        panel = ObjectivesPanel(ctx, search)
    status, fig, point = panel.on_from_study(searched, searched.workspace.storage_url, "front")[:3]
    assert "`front`" in status and fig.data and point["choices"]
    number = point["choices"][0][1]
    out = panel.on_click(searched, 0.0, gr.EventData(None, {"trial": number}))
    expect = searched.front_weights(number)
    assert searched.tune.weights == expect and f"trial **{number}**" in out[-2]
    assert [u["value"] for u in out[:len(searched.names)]] == [expect[n] for n in searched.names]

    status, table = panel.on_rerank(searched, searched.workspace.storage_url, "single", "loss:en")
    assert "best stored trial" in status and len(table) == 4 and list(table.columns)[:4] == \
        ["rank", "trial", "fidelity", "objective"]
    out = panel.on_send(searched, 0.0)
    assert searched.tune.weights == searched.reranked_best() and "Sent trial" in out[-1]
    status, _ = panel.on_rerank(searched, searched.workspace.storage_url, "single", "loss:")  # a typo
    assert status.startswith("**error:**") and "--objective" not in status and "&quot;objective&quot;" in status
    assert "error" in panel.on_pick(searched, None, 0.0)[-2]
    assert default_objectives(["en", "ja"], ["math"]) == ["loss:ja", "acc:math", "loss:en"]
    assert default_objectives(["en"], []) == ["loss:en", "", ""]


def test_a_large_study_is_plotted_from_a_sample_that_keeps_its_best_trials():
    """2,000 trials froze the Search tab (a 50 MB contour: optuna puts every trial on its grid): above PLOT_TRIALS the
    α plot, importances and landscape use the best fifth plus a spread of the rest, and their titles say so."""
    from workbench.figures import PLOT_TRIALS, plotted_trials

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: (t.suggest_float("a", 0, 1) - 0.3) ** 2 + t.suggest_float("b", 0, 1), n_trials=900)
    complete = study.trials
    shown, note = plotted_trials(study, complete)
    number = {(t.params["a"], t.params["b"]): t.number for t in complete}  # the copy numbers its trials anew
    kept = {number[(t.params["a"], t.params["b"])] for t in shown.trials}
    assert len(kept) == len(shown.trials) == PLOT_TRIALS and note == f" ({PLOT_TRIALS} of 900 trials)"
    best = sorted(complete, key=lambda t: t.value)[: PLOT_TRIALS // 5]
    assert {t.number for t in best} <= kept and shown.best_value == study.best_value
    assert max(kept) > 800 and min(kept) < 100  # the rest spread over the whole run, not its start
    history, alphas, _, land = study_figures(study)
    assert "(300 of 900 trials)" in land.layout.title.text and "(300 of 900" in alphas.layout.title.text
    assert len(land.to_json()) < 2_000_000  # ~1.1 MB; all 900 trials made ~10 MB
    assert len(history.data[0].x) == 900  # the history keeps every trial (two points each: small)
    small = optuna.create_study()
    small.add_trials(complete[:50])
    assert plotted_trials(small, small.trials) == (small, "")


def test_a_study_file_replaced_while_the_server_runs_is_read_anew(tmp_path):
    """The Search tab keeps one storage per URL; an optuna.db moved away and written afresh by a new search must not
    be read through the old connection (the tab said "no study selected" and, on a large old file, hung)."""
    from workbench.searching import storage_for, study_names

    db = tmp_path / "optuna.db"
    url = f"sqlite:///{db}"
    optuna.create_study(storage=url, study_name="old")
    first = storage_for(url)
    assert storage_for(url) is first and study_names(url) == ["old"]  # polling reuses one connection
    db.rename(tmp_path / "moved.db")
    optuna.create_study(storage=url, study_name="new")
    assert storage_for(url) is not first and study_names(url) == ["new"]
    assert load_study(url, "new") is not None and load_study(url, "old") is None


def test_a_front_point_is_listed_with_its_accuracy_as_measured():
    """An accuracy objective is minimised as −accuracy; the dropdown shows the accuracy itself (0.25, not −0.25),
    as the chart's axis does (optimer_lib.search.pareto.measured)."""
    from workbench.tabs.objectives import point_label

    assert point_label(3, {"loss:ja": 3.2, "acc:math": -0.25}) == "trial 3: loss:ja 3.2, acc:math 0.25"
    assert point_label(4, {"loss:ja=1,acc:math=2": 2.5}) == "trial 4: loss:ja=1,acc:math=2 2.5"  # a mix: as is
