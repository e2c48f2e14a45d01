"""The notebook ArenaWidget and workbench.arena.ArenaRun on a tiny pool: ask both, vote, the next pair answers,
the vote is in the storage (resumed by a second widget), the best goes to Tune; parallel replies."""

from __future__ import annotations

from pathlib import Path

import test_widgets

from optimer_lib.search.arena import Arena
from workbench.arena import ArenaRun
from workbench.chatting import GenSettings, stream_many, stream_reply
from workbench.widgets import ArenaWidget

session = test_widgets.session  # the tiny ja/math/instruct pool fixture


def test_arena_widget_vote_resume_and_best_to_tune(session, tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'arena.db'}"
    settings = GenSettings(max_new_tokens=4, greedy=True)
    w = ArenaWidget(session, storage=url, sampler="random", seed=0, settings=settings)
    w._guard(lambda: w.vote("left"))  # a button's error goes to the status line
    assert "ask both merges a prompt first" in w.status.value
    shown = w.run.pair
    replies = w.ask("hello")
    assert len(replies) == 2 and not any(r.startswith("[") for r in replies)  # neither reply failed
    assert all("hello" in p.value for p in w.panes) and "A</b>" in w.panes[0].value
    assert w.best_weights is None and "0 vote(s)" in w.best_label.value

    nxt = w.vote("right")  # B is better: B stays, a challenger joins, and the pair answers "hello" again
    assert len(nxt) == 2 and [len(h) for h in w.run.histories] == [2, 2]
    assert w.best_weights == shown.right.weights
    assert shown.right.number in (w.run.pair.left.number, w.run.pair.right.number)
    assert shown.left.number not in (w.run.pair.left.number, w.run.pair.right.number)
    assert "1 vote(s)" in w.best_label.value and "vote recorded (A was" in w.status.value

    stored = Arena.open(["ja", "math"], storage=url, study_name="arena", sampler="random")
    assert [(v["left"], v["right"], v["choice"]) for v in stored.votes] == \
        [(shown.left.number, shown.right.number, "right")]
    again = ArenaWidget(session, storage=url, sampler="random", settings=settings)  # another viewer, resumed
    assert again.run.pair == w.run.pair and again.best_weights == w.best_weights

    r = w.to_tune()
    assert session.tune.weights == {n: shown.right.weights[n] for n in ("ja", "math")}
    assert r.instruction_weight == 1.0 and r.metrics  # scored, with the pool's instruction vector at weight 1


def test_stream_many_equals_replies_one_at_a_time(session):
    """Replies generated at the same time are the replies generated one after the other (greedy)."""
    engine = session.shared.engine
    states = [engine.state({"ja": 0.5}, 1.0), engine.state({"math": 0.9}, 0.0)]
    settings = GenSettings(max_new_tokens=6, greedy=True)
    together = list(stream_many(engine, states, [[], []], "hello", settings))[-1]
    alone = [list(stream_reply(engine, s, [], "hello", settings))[-1] for s in states]
    assert together == alone and all(t for t in together)


def test_arena_run_keeps_the_pair_of_the_session(session, tmp_path: Path):
    run = ArenaRun.open(session, f"sqlite:///{tmp_path / 'a.db'}", "s1", "random")
    assert ArenaRun.of(session) is run
    assert run.ask(session, "   ") is not None and list(run.ask(session, "   ")) == []  # nothing asked
    pair = run.pair
    run.vote("tie")
    now = {run.pair.left.number, run.pair.right.number}
    assert pair.left.number + pair.right.number == 1 and now == {0, 2}  # challenger 1 retired, 0 meets 2
    assert run.best_weights is None  # a tie is no preference: no best yet
    assert "**1 vote(s)** (1 tie(s))" in run.summary()
