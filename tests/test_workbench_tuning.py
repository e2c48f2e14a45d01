"""A Tune move as it streams: estimate, partial and final scores with intervals, cache, cancellation, scoring set."""

from __future__ import annotations

import re
import time

import pytest
from test_workbench_session import tiny_workdir

from optimer_lib.engine import BACKGROUND
from optimer_lib.scoring.evaluate import EvalSuite, evaluate_suite
from workbench.session import Session
from workbench.tuning import last_update, score_stream, tracker_summary
from workbench.workspace import WorkbenchError, Workspace

# varied documents, so bootstrap intervals have width; "math" is a text set and a QA set, as in the embedded world
SUITE = EvalSuite(texts={"en": ["the quick brown fox jumps", "over the lazy dog", "a fox and a dog",
                                "quick quick brown", "the lazy fox sleeps", "dog days of summer"],
                         "ja": ["日本語のテキスト", "テキスト 日本語 の", "日本の語", "語のテキスト テキスト"],
                         "math": ["12 + 35 = 47", "1 + 1 = 2", "7 + 8 = 15"]},
                  qa={"math": [("Question: What is 12 + 35?\nAnswer:", "47"),
                               ("Question: What is 1 + 1?\nAnswer:", "2")]})


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace(tiny_workdir(tmp_path / "wd"), suite=SUITE)


def test_a_move_streams_partial_then_final_scores_with_intervals(ws):
    s = Session(ws, tune_limit=4, qa_limit=2)
    ups = list(s.score_stream({"ja": 0.5}))
    # nothing scored yet: no estimate, but an answer at once ("scoring"), then the sets as they are scored
    assert [u.phase for u in ups] == ["scoring"] + ["partial"] * 3 + ["final"]
    assert not ups[0].metrics and ups[0].sets_total == 4 and ups[0].objective is None
    ups = ups[1:]
    # sets come as they finish (on a CPU with a core per lease, two slots share them): one more each time
    names = ["en", "ja", "math", "math (QA)"]
    assert [len(u.sets_done) for u in ups] == [1, 2, 3, 4] and ups[-1].sets_done == names
    assert all(set(a.sets_done) < set(b.sets_done) <= set(names) for a, b in zip(ups, ups[1:], strict=False))
    assert {"loss:math", "acc:math"} <= set(ups[-1].metrics)
    final = ups[-1]
    with s.merged() as model:  # the exact numbers of the merged model, scored the old way
        ref = evaluate_suite(model, ws.pool().tokenizer, SUITE, limit=4, seq_len=128)
    assert final.metrics["loss:en"] == pytest.approx(ref["loss:en"], rel=1e-6)
    assert final.metrics["acc:math"] == ref["acc:math"]
    for key in ("loss:en", "loss:ja", "objective"):
        ci = final.intervals[key]
        assert ci.low < ci.high and ci.contains(final.objective if key == "objective" else final.metrics[key])
    first = ups[0].sets_done[0]  # partial: per set only
    assert "objective" not in ups[0].intervals and list(ups[0].intervals) == [f"loss:{first}"]
    assert s.last.weights == {"ja": 0.5, "math": 0.0} and s.last.intervals == final.intervals


def test_an_estimate_comes_first_once_merges_were_scored_and_is_tracked(ws):
    s = Session(ws, tune_limit=4, qa_limit=2)
    for a in (0.0, 0.5, 1.0):  # one coordinate explored: enough for a fit along it
        s.apply({"ja": a})
    ups = list(s.score_stream({"ja": 0.75}))
    assert ups[0].phase == "estimate" and ups[0].estimate.available
    assert ups[0].objective is not None and "loss:en" in ups[0].metrics and not ups[0].intervals
    summary = tracker_summary(ws.pool())
    assert summary and summary[0]["checked"] >= 1  # the shown estimate was checked against the exact interval


def test_a_merge_scored_by_one_session_is_instant_for_another(ws):
    a, b = Session(ws, tune_limit=4, qa_limit=2), Session(ws, tune_limit=4, qa_limit=2)
    first = a.apply({"ja": 0.3, "math": 0.2})
    again = list(b.score_stream({"ja": 0.3, "math": 0.2}))
    assert [u.phase for u in again] == ["final"] and again[0].cached
    assert again[0].metrics == first.metrics
    assert b.cached_result().metrics == first.metrics


def test_a_newer_move_cancels_the_older_scoring(ws, monkeypatch):
    import threading

    from optimer_lib.scoring.tune_config import TuneScoring

    s = Session(ws, tune_limit=4, qa_limit=2)
    real, calls, moved = TuneScoring.stream, [], threading.Event()

    def gated(self, *a, **kw):  # every dev set but the first waits for the newer move: the old one is mid-scoring
        calls.append(1)
        if len(calls) > 1:
            assert moved.wait(60)
        yield from real(self, *a, **kw)

    monkeypatch.setattr(TuneScoring, "stream", gated)
    old = s.score_stream({"ja": 0.2})
    assert next(old).phase == "scoring"  # nothing to estimate from: answered before any forward pass
    assert next(old).phase == "partial"  # holding the engine mid-scoring
    newer = s.score_stream({"ja": 0.9})  # the user moved again: asked now, scored once the old one lets go
    moved.set()
    assert next(old).phase == "cancelled"  # the old one stops at its next check and hands the slot back
    assert [u.phase for u in newer][-1] == "final"
    assert s.last.weights["ja"] == 0.9
    assert ws.pool().engine.cached(ws.pool().engine.state({"ja": 0.2}), ("tune", s.scoring, id(SUITE))) is None


def test_the_scoring_set_is_configurable_and_says_its_cost(ws):
    s = Session(ws, tune_limit=4, qa_limit=2)
    sc = s.set_scoring(["en"], docs=2, qa_items=1, seq_len=32, batch_size=2)
    r = s.apply({"ja": 0.4})
    assert set(r.metrics) == {"loss:en"} and r.limit == 2
    both = s.set_scoring(["math"], docs=2, qa_items=1)  # the text set and the QA set of that name
    assert set(s.apply({"ja": 0.4}).metrics) == {"loss:math", "acc:math"}
    sc = s.set_scoring(["en"], docs=2, qa_items=1, seq_len=32, batch_size=2)
    assert both != sc
    cost = s.scoring_cost()
    assert "tokens" in cost and "TFLOP" in cost
    tokens = int(cost.split("reads ")[1].split(" tokens")[0].replace(",", ""))
    assert tokens == sc.tokens(ws.pool().tokenizer, SUITE)
    full = s.apply({"ja": 0.4}, confirm=True)  # every document of the chosen set
    assert full.limit is None and full.metrics["loss:en"] != r.metrics["loss:en"]
    with pytest.raises(WorkbenchError, match="unknown dev sets"):
        s.set_scoring(["nope"])


def test_method_and_params_follow_the_session(ws):
    s = Session(ws, tune_limit=2, qa_limit=1)
    r = s.apply({"ja": 0.5, "math": 0.5}, method="ties", params={"density": 0.5})
    assert (r.method, r.params) == ("ties", {"density": 0.5})
    assert s.apply({"ja": 0.6}).method == "ties"  # kept for the next move
    assert s.apply({"ja": 0.6}, method="optimer").params == {}  # a new method starts from its defaults
    with pytest.raises(WorkbenchError, match="no option"):
        s.apply({"ja": 0.6}, method="dare", params={"densty": 0.5})


def test_estimates_on_a_pool_without_an_instruction_vector(tmp_path):
    root = tiny_workdir(tmp_path / "wd")
    m = Workspace(root).manifest()
    Workspace(root).write_manifest(m["base"], m["vectors"], None)
    s = Session(Workspace(root, suite=SUITE), tune_limit=2, qa_limit=1)
    assert s.shared.instruction is None
    for a in (0.0, 0.5, 1.0):
        s.apply({"ja": a})
    assert next(s.score_stream({"ja": 0.25})).phase == "estimate"


def test_a_search_says_what_it_costs_and_stops_at_its_time_budget(ws):
    from workbench.searching import SearchSpec

    s = Session(ws, tune_limit=2, qa_limit=1)
    spec = SearchSpec(trials=200, time_budget="2s", search_limit=2, rescore_limit=None, top_k=0)
    run = s.start_search(spec)
    assert run.wait(120)
    assert run.error is None and run.result is not None
    assert run.result.stopped == "time_budget" and 1 <= len(run.events) < 200
    line = s.search.estimate()
    assert "per trial" in line and "200 trials" in line and "time budget of 2" in line
    before = s.estimate_search(SearchSpec(trials=10, search_limit=2, rescore_limit=None, top_k=0))
    assert "10 trials" in before and "time budget" not in before
    with pytest.raises(WorkbenchError, match="time budget works for single-objective"):
        s.start_pareto(SearchSpec(objectives=("loss:en", "loss:ja"), trials=4, time_budget="1m"))


def test_sessions_waiting_for_the_same_merge_score_it_once(tmp_path, monkeypatch):
    """Sessions opened together ask for the same (reference) merge at once: it is scored once, the others wait for
    the lease and take the cached result."""
    import threading
    import time

    from optimer_lib.scoring.tune_config import TuneScoring

    ws = Workspace(tiny_workdir(tmp_path / "wd"), suite=SUITE, slots=1)
    sessions = [Session(ws, tune_limit=4, qa_limit=2) for _ in range(3)]
    engine = ws.pool().engine
    scored, real = [], TuneScoring.stream

    def counting(self, *a, **kw):
        scored.append(1)  # one per dev set scored (en, ja, math, math QA)
        yield from real(self, *a, **kw)

    monkeypatch.setattr(TuneScoring, "stream", counting)
    results = []
    with engine.lease(engine.state({"ja": 0.9})):  # the only slot: every session queues behind it
        threads = [threading.Thread(target=lambda s=s: results.append(s.apply({"ja": 0.3}))) for s in sessions]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while engine.stats().waiting < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats().waiting == 3
    for t in threads:
        t.join(60)
    assert len(scored) == 4 and sorted(r.cached for r in results) == [False, True, True]  # the 4 sets once
    assert results[0].metrics == results[1].metrics == results[2].metrics


def test_a_background_score_in_flight_is_not_started_again_by_another_session(tmp_path, monkeypatch):
    """Pages opened while the launch's warm-up still scores the first chart's merge (or while another page's
    prefetch does) must not score it a second time on the other slot: the pool knows what is in flight."""
    import threading
    import time

    from optimer_lib.scoring.tune_config import TuneScoring

    ws = Workspace(tiny_workdir(tmp_path / "wd"), suite=SUITE)  # two slots on a CPU: one stays free for a duplicate
    first, second = Session(ws, tune_limit=4, qa_limit=2), Session(ws, tune_limit=4, qa_limit=2)
    scored, gate, real = [], threading.Event(), TuneScoring.stream

    def gated(self, *a, **kw):  # every dev set waits until the second session has asked for the same merge
        scored.append(1)
        assert gate.wait(60)
        yield from real(self, *a, **kw)

    monkeypatch.setattr(TuneScoring, "stream", gated)
    first.prefetch()
    deadline = time.monotonic() + 30
    while not scored and time.monotonic() < deadline:
        time.sleep(0.01)
    assert scored, "the first session's background score never started"
    second.prefetch()  # the same Tune merge, asked by another page while the first scores it
    time.sleep(0.5)  # a duplicate, if started, takes the free slot and reaches its first dev set by now
    gate.set()
    deadline = time.monotonic() + 60
    while second.cached_result() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert second.cached_result() is not None
    time.sleep(0.2)  # a duplicate's later sets would be counted too
    assert len(scored) == 4  # en, ja, math, math QA: scored once, not once per page


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the failure itself
def test_a_page_waiting_for_a_background_score_that_failed_starts_it_again(tmp_path, monkeypatch):
    """Another page's background score of this page's merge ended without a result (it failed): the waiting page's
    chart poll scores it itself instead of waiting for it forever."""
    import time

    import gradio as gr

    from optimer_lib.scoring.tune_config import TuneScoring
    from workbench.tabs import Ctx
    from workbench.tabs.tune import TuneTab

    ws = Workspace(tiny_workdir(tmp_path / "wd"), suite=SUITE)
    with gr.Blocks():
        tab = TuneTab(Ctx(workspace=ws, state=gr.State(), max_vectors=4))
    first, waiting = Session(ws, tune_limit=4, qa_limit=2), Session(ws, tune_limit=4, qa_limit=2)
    real, calls = TuneScoring.stream, []

    def failing_once(self, *a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the first background score fails")
        yield from real(self, *a, **kw)

    monkeypatch.setattr(TuneScoring, "stream", failing_once)
    first.prefetch()  # fails at its first dev set: nothing cached, nothing in flight afterwards
    deadline = time.monotonic() + 30
    while (calls != [1] or ws.pool().in_flight) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert calls == [1] and not ws.pool().in_flight and waiting.cached_result() is None
    chart, _, timer = tab.on_poll(waiting)  # nothing to draw yet: keeps polling, and scores the merge again
    assert timer.active
    deadline = time.monotonic() + 60
    while waiting.cached_result() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert waiting.cached_result() is not None
    *_, timer = tab.on_poll(waiting)  # drawn now; the poll goes on only while a reference bar is being scored
    assert timer.active == waiting.references_pending() and waiting.ui["tune_shown"]


def test_a_chart_poll_overtaken_by_a_slider_move_does_not_draw_its_stale_chart(tmp_path, monkeypatch):
    """The first chart's poll read the old merge's score while a slider release was drawing the new one: it must not
    send the old chart after the new (the page would keep showing the old merge's bars)."""
    import gradio as gr

    from workbench.tabs import Ctx
    from workbench.tabs.tune import TuneTab

    ws = Workspace(tiny_workdir(tmp_path / "wd"), suite=SUITE)
    with gr.Blocks():
        tab = TuneTab(Ctx(workspace=ws, state=gr.State(), max_vectors=4))
    s = Session(ws, tune_limit=4, qa_limit=2)
    s.apply({"ja": 0.2})  # the page's merge, scored (as a background prefetch would)
    s.ui["tune_shown"] = False  # the page shows no chart yet: its poll is on
    real = Session.cached_result

    def read_then_moved(self):  # the poll reads the score of ja = 0.2; meanwhile a release moves to 0.7
        r = real(self)
        list(self.score_stream({"ja": 0.7}))
        return r

    monkeypatch.setattr(Session, "cached_result", read_then_moved)
    chart, status, timer = tab.on_poll(s)
    assert chart == gr.update() and status == gr.update() and not timer.active  # nothing drawn over the move's chart
    monkeypatch.setattr(Session, "cached_result", real)
    s.ui["tune_shown"] = False
    chart, _, timer = tab.on_poll(s)  # with no move meanwhile it draws the current merge (ja = 0.7)
    assert chart != gr.update() and s.tune.weights["ja"] == 0.7
    assert timer.active == s.references_pending()  # and stops, unless a reference bar is still being scored


@pytest.mark.parametrize("concurrency, tune_slots, used", [(2, 1, 1), (2, 2, 2)])
def test_a_move_shares_its_dev_sets_between_the_cores_slots(tmp_path, monkeypatch, concurrency, tune_slots, used):
    """With ``tune_slots`` > 1 an interactive move's dev sets are scored on as many slots as the engine runs at once
    (a core each on a CPU), with the same numbers as on one."""
    import time

    from optimer_lib.scoring.tune_config import TuneScoring

    ws = Workspace(tiny_workdir(tmp_path / "wd"), suite=SUITE, tune_slots=tune_slots)
    engine = ws.pool().engine
    engine.concurrency = concurrency
    models, real = [], TuneScoring.stream

    def spied(self, model, *a, **kw):
        models.append(id(model))
        time.sleep(0.1)  # a set takes a while, as on a real model: the second lease gets its share
        yield from real(self, model, *a, **kw)

    monkeypatch.setattr(TuneScoring, "stream", spied)
    s = Session(ws, tune_limit=4, qa_limit=2)
    r = s.apply({"ja": 0.5, "math": 0.25})
    assert len(models) == 4 and len(set(models)) == used
    with s.merged() as model:
        ref = evaluate_suite(model, ws.pool().tokenizer, SUITE, limit=4, seq_len=128)
    assert r.metrics == pytest.approx({k: v for k, v in ref.items() if not k.startswith("ppl:")}, rel=1e-6)
    models.clear()  # a background score (reference bars, prefetching) keeps to one slot: the others are the users'
    last = last_update(score_stream(ws.pool(), engine.state({"ja": 0.1}), s.scoring, priority=BACKGROUND))
    assert last.phase == "final" and len(models) == 4 and len(set(models)) == 1


def test_a_move_scores_its_cheapest_dev_set_first(ws, monkeypatch):
    """The first partial result comes as soon as it can: the set reading the fewest tokens is handed out first, the
    others keep their order, and the final score is the same as in the suite's order."""
    from workbench.tuning import scoring_order

    s = Session(ws, tune_limit=4, qa_limit=2)
    shared = ws.pool()
    units = s.scoring.units(shared.suite)
    tokens = [s.scoring.tokens(shared.tokenizer, u) for u in units]
    cheapest = tokens.index(min(tokens))
    assert cheapest != 0, tokens  # else this suite could not tell the order from the suite's own
    order = scoring_order(shared, s.scoring)
    assert order == [cheapest, *(k for k in range(len(units)) if k != cheapest)]
    counted: list[int] = []
    real = type(s.scoring).tokens
    monkeypatch.setattr(type(s.scoring), "tokens", lambda self, *a, **kw: counted.append(1) or real(self, *a, **kw))
    assert scoring_order(shared, s.scoring) == order and not counted  # counted once per scoring set and suite
    monkeypatch.undo()
    assert scoring_order(shared, s.scoring.full()) == list(range(len(units)))  # a confirm keeps the order
    shared.tune_slots = 1  # one lease: the sets finish in the order they are handed out
    ups = list(s.score_stream({"ja": 0.35}))
    partial = [u for u in ups if u.phase == "partial"]
    names = ["en", "ja", "math", "math (QA)"]
    assert partial[0].sets_done == [names[cheapest]]
    assert ups[-1].phase == "final" and ups[-1].sets_done == names
    assert list(ups[-1].metrics)[:3] == ["loss:en", "loss:ja", "loss:math"]  # the chart's bars keep their order
    (hit,) = Session(ws, tune_limit=4, qa_limit=2).score_stream({"ja": 0.35})  # cached in the suite's order too
    assert hit.cached and list(hit.metrics.items()) == list(ups[-1].metrics.items())


def test_a_new_scoring_set_draws_its_reference_bars_when_they_are_scored(tmp_path, monkeypatch):
    """After "use this scoring set" the base/average bars are not scored on the new set yet (they are scored in the
    background, never in the click's path): the chart comes without them and the poll timer turns on; once they
    are in, the poll redraws the chart with them, leaves the status line as it is, and stops."""
    import threading

    import gradio as gr

    from workbench.tabs import Ctx
    from workbench.tabs.tune import TuneTab

    ws = Workspace(tiny_workdir(tmp_path / "wd"), suite=SUITE)
    with gr.Blocks():
        tab = TuneTab(Ctx(workspace=ws, state=gr.State(), max_vectors=4))
    s = Session(ws, tune_limit=4, qa_limit=2)
    s.apply({"ja": 0.3})
    gate, real = threading.Event(), Session._compute_reference

    def gated(self, *a, **kw):  # the references wait until the test lets them through
        assert gate.wait(30)
        return real(self, *a, **kw)

    monkeypatch.setattr(Session, "_compute_reference", gated)
    *ys, last = list(tab.on_scoring(s, ["ja", "en"], 3, 64, 4))
    cost, fig, status, _ = ys[-1]
    assert "one Tune score" in cost and "release → chart" in status
    assert "average" not in {t.name for t in fig.data} and last[-1].active and s.references_pending()
    chart, kept, timer = tab.on_poll(s)
    assert (chart, kept) == (gr.update(), gr.update()) and timer.active  # still waiting
    gate.set()
    deadline = time.monotonic() + 60
    while s.references_pending() and time.monotonic() < deadline:
        time.sleep(0.02)
    chart, kept, timer = tab.on_poll(s)
    assert "average" in {t.name for t in chart.data} and "base loss" in str(chart.layout.annotations[0].text)
    assert kept == gr.update() and not timer.active


def test_the_scoring_set_shows_its_cost_before_it_is_used(tmp_path):
    """Typing a scoring set's numbers shows what one Tune score would cost on it, marked as not used yet; the set in
    use keeps its plain cost line, and a mistake is an error line in the page's words."""
    import gradio as gr

    from workbench.tabs import Ctx
    from workbench.tabs.tune import TuneTab

    ws = Workspace(tiny_workdir(tmp_path / "wd"), suite=SUITE)
    with gr.Blocks():
        tab = TuneTab(Ctx(workspace=ws, state=gr.State(), max_vectors=4))
    s = Session(ws, tune_limit=4, qa_limit=2)
    before = s.scoring
    small, large = (tab.on_scoring_preview(s, ["ja"], docs, 64, 4) for docs in (2, 8))
    assert small.startswith("this set (not used yet") and s.scoring == before
    tokens = [int(re.search(r"([\d,]+) tokens", line).group(1).replace(",", "")) for line in (small, large)]
    assert tokens[1] > tokens[0] > 0
    s.set_scoring(["ja"], 2, 2, 64, 4)
    assert tab.on_scoring_preview(s, ["ja"], 2, 64, 4) == f"one Tune score {s.scoring_cost()}"
    assert tab.on_scoring_preview(s, ["nope"], 2, 64, 4).startswith("**error:**")
    assert "fill in every number" in tab.on_scoring_preview(s, ["ja"], None, 64, 4)
