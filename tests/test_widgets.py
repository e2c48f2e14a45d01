"""Notebook widgets (workbench.widgets) driven from code on a tiny random pool, as a headless notebook does."""

from __future__ import annotations

import math
import time
from pathlib import Path

import plotly.graph_objects as go
import pytest
import torch

from optimer_lib.checkpoints.vectors import extract_vector, save_vector
from optimer_lib.scoring.evaluate import EvalSuite
from workbench.chatting import GenSettings
from workbench.session import BASE, BASE_IT, TUNE, Session
from workbench.widgets import ChatCompare, SearchRunner, WeightSliders, history_figure
from workbench.workspace import WorkbenchError, Workspace

SUITE = EvalSuite(texts={"en": ["the quick brown fox jumps over the lazy dog"] * 3,
                         "ja": ["日本語のテキスト 日本語のテキスト"] * 3},
                  qa={"math": [("Question: What is 12 + 35?\nAnswer:", "47")] * 2})


@pytest.fixture
def session(tiny_pool, tmp_path: Path) -> Session:
    """A session over a tiny llama base with vectors ja, math and an instruction vector."""
    base_dir, tuned = tiny_pool("llama", 3)
    wd = tmp_path / "wd"
    files = [save_vector(extract_vector(base_dir, d, name=n, source=str(d)), wd / "vectors" / f"{n}.safetensors")
             for n, d in zip(("ja", "math", "instruct"), tuned, strict=True)]
    Workspace(wd).write_manifest(base_dir, files[:2], files[2])
    s = Session(Workspace(wd, suite=SUITE), tune_limit=3, qa_limit=2)
    yield s
    s.close()


def _ys(fig: go.FigureWidget) -> list[tuple]:
    return [tuple(t.y) for t in fig.data]


def test_sliders_remerge_and_redraw(session: Session):
    ws = WeightSliders(session)
    assert set(ws.sliders) == {"ja", "math"} and ws.instruction is not None
    assert ws.sliders["ja"].continuous_update is False
    names = [t.name for t in ws.figure.data]
    assert {"average", "current"} <= set(names)       # base is the zero line of the loss deltas
    before, merged_before = _ys(ws.figure), ws.result
    ws.sliders["ja"].value = 1.0                          # what releasing the slider does
    assert ws.weights == {"ja": 1.0, "math": 0.0}
    assert ws.result is not merged_before and ws.result.weights["ja"] == 1.0
    assert _ys(ws.figure) != before
    base = session.shared.model.model.embed_tokens.weight
    ja = session.shared.vectors[0].tensors["model.embed_tokens.weight"]
    with session.merged() as model:
        torch.testing.assert_close(model.model.embed_tokens.weight, base + ja)
    assert "score" in ws.status.value
    assert "application/vnd.jupyter.widget-view+json" in ws._repr_mimebundle_()


def test_sliders_set_and_presets(session: Session):
    ws = WeightSliders(session)
    calls = []
    orig = session.apply
    session.apply = lambda *a, **k: calls.append(a) or orig(*a, **k)   # type: ignore[method-assign]
    r = ws.set({"math": 2.0}, instruction_weight=0.5)                   # beyond the slider max: max grows
    assert len(calls) == 1                                              # one re-merge for several sliders
    assert r.weights == {"ja": 0.0, "math": 2.0} and r.instruction_weight == 0.5
    assert ws.sliders["math"].value == 2.0 and ws.instruction.value == 0.5
    ws.preset("average")
    assert ws.weights == {"ja": 0.5, "math": 0.5}
    with pytest.raises(WorkbenchError, match="unknown vector"):
        ws.set({"xx": 1.0})
    with pytest.raises(WorkbenchError, match="no search result"):
        ws.preset("best")
    ws._guard(lambda: ws.preset("best"))                                # a button shows the error instead
    assert "no search result" in ws.status.value


def test_search_runner_four_trials(session: Session):
    runner = SearchRunner(session, trials=4, sampler="random", search_limit=2, study_name="nb-test")
    assert runner.objective == "balanced" and "ja" in runner.preset.options
    with pytest.raises(WorkbenchError, match="no search started"):
        runner.wait()
    runner.custom.value = "loss:ja=1,acc:math=1"
    seen: list[int] = []
    refresh = runner.refresh

    def recording() -> None:
        refresh()
        with runner._lock:
            data = runner.figure.data
            seen.append(len(data[0].x) if data and data[0].x is not None else 0)

    runner.refresh = recording  # type: ignore[method-assign]
    run = runner.start()
    assert run.wait(timeout=120)
    for _ in range(100):                                   # the widget redraws by itself once the search ends
        if "done" in runner.status.value:
            break
        time.sleep(0.05)
    assert "done" in runner.status.value
    assert {1, 2, 3, 4} <= set(seen)                       # redrawn live, trial by trial
    result = runner.wait(timeout=120)
    assert result is not None and not run.running
    assert run.objective.spec == "loss:ja=1,acc:math=1"
    trials = runner.figure.data[0]
    assert len(trials.x) == 4 and len(runner.figure.data[1].y) == 4            # 4 points, best-so-far line
    assert list(runner.figure.data[1].y) == sorted(runner.figure.data[1].y, reverse=True)
    assert set(runner.best_weights) == {"ja", "math"}
    assert len(runner.study.trials) == 4 and "done" in runner.status.value
    # the sliders can then show the best of the search
    ws = WeightSliders(session)
    assert "best" in [t.name for t in ws.figure.data]
    assert ws.preset("best").weights == pytest.approx(runner.best_weights)


def test_search_runner_reports_bad_settings(session: Session):
    runner = SearchRunner(session, trials=2, bounds="ja=1:0")
    runner._guard(runner.start)
    assert "bounds" in runner.status.value and runner.run is None
    runner.bounds.value = "0:1"
    runner.custom.value = "acc:nope"
    with pytest.raises(WorkbenchError, match="nope") as err:
        runner.start()
    # in the form's words: the field to change, not a CLI flag the notebook user never typed
    assert '"objective (custom, or the preset)"' in str(err.value) and "--objective" not in str(err.value)
    runner.custom.value = ""
    runner.bounds.value = "0-1"
    with pytest.raises(WorkbenchError) as err:
        runner.start()
    assert '"bounds"' in str(err.value) and "--bounds" not in str(err.value)


def test_search_runner_refuses_an_unknown_sampler_and_a_zero_budget_in_its_own_words(session: Session):
    with pytest.raises(WorkbenchError, match="unknown sampler 'TPE': choose one of .*tpe"):
        SearchRunner(session, sampler="TPE")
    with pytest.raises(WorkbenchError, match="trials must be 1..100000"):
        SearchRunner(session, trials=0)


def test_sliders_refuse_a_weight_that_is_not_a_number_and_take_a_negative_one(session: Session):
    """A refused value never sticks in a slider (the next move still works); a negative weight is merged as
    session.apply merges it, the slider's range growing to hold it instead of clamping it to 0 unsaid."""
    ws = WeightSliders(session)
    with pytest.raises(WorkbenchError, match="finite"):
        ws.set({"ja": float("nan")})
    assert math.isfinite(ws.sliders["ja"].value)  # the refused NaN did not stick
    r = ws.set({"ja": -0.5, "math": 0.2})
    assert r.weights == {"ja": -0.5, "math": 0.2} and ws.sliders["ja"].value == -0.5 and ws.sliders["ja"].min <= -0.5


def test_history_figure_without_trials_says_why():
    assert history_figure([]).layout.annotations[0].text.startswith("waiting")


def test_chat_compare_two_replies(session: Session):
    chat = ChatCompare(session, settings=GenSettings(max_new_tokens=5, greedy=True))
    assert [c.value for c in chat.choosers] == [BASE_IT, TUNE]
    replies = chat.ask("hello")
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)
    assert not any(r.startswith("[") for r in replies)                # no pane failed
    assert [len(h) for h in chat.histories] == [2, 2]
    assert "hello" in chat.panes[0].value and "hello" in chat.panes[1].value
    chat.choosers[1].value = BASE                                      # a new model starts a new conversation
    assert [len(h) for h in chat.histories] == [2, 0]
    chat.ask("again")
    assert [len(h) for h in chat.histories] == [4, 2]
    chat.clear()
    assert chat.histories == [[], []]
    chat.prompt.value = "   "
    chat._send()                                                       # the send button shows errors
    assert "type a prompt" in chat.status.value
    with pytest.raises(WorkbenchError, match="two panes"):
        ChatCompare(session, panes=[BASE, "nope"])
