"""The notebook ArenaWidget and workbench.arena.ArenaRun on a tiny pool: ask both, vote, the next pair answers,
the vote is in the storage (resumed by a second widget), the best goes to Tune, is chatted with and exported
(the widget's own buttons, clicked from code); parallel replies."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pytest
import test_widgets
from helpers import require
from safetensors import safe_open

from optimer_lib.merging.recipes import load_recipe
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
    assert w.best_weights is None and "0 votes" in w.best_label.value

    nxt = w.vote("right")  # B is better: B stays, a challenger joins, and the pair answers "hello" again
    assert len(nxt) == 2 and [len(h) for h in w.run.histories] == [2, 2]
    assert w.best_weights == shown.right.weights
    assert shown.right.number in (w.run.pair.left.number, w.run.pair.right.number)
    assert shown.left.number not in (w.run.pair.left.number, w.run.pair.right.number)
    assert "1 vote " in w.best_label.value and "vote recorded (A was" in w.status.value

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
    assert "**1 vote** (1 tie)" in run.summary()


def test_arena_widget_buttons_chat_with_and_export_the_best(session, tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'arena.db'}"
    # sampled with a fixed seed: the same merge gives the same reply, and (unlike greedy blanks from a tiny random
    # model) different merges give different ones
    settings = GenSettings(max_new_tokens=12, greedy=False, temperature=1.0, seed=0)
    w = ArenaWidget(session, storage=url, sampler="random", seed=0, settings=settings)
    engine = session.shared.engine

    def reply(weights: dict[str, float], history=(), prompt: str = "hello") -> str:  # the engine, asked directly
        return list(stream_reply(engine, engine.state(weights, 1.0), list(history), prompt, settings))[-1]

    w.chat_prompt.value = "hello"
    w.chat_button.click()  # before any vote: one line in the status, nothing generated
    assert w.status.value.count("no best merge yet: vote on a pair first") == 1 and w.chat_history == []
    w.export_button.click()
    assert "no best merge yet" in w.status.value and not (session.workspace.exports_dir / "arena-best").exists()

    w.ask("hello")
    shown = w.run.pair
    w.vote("right")
    best = Arena.open(["ja", "math"], storage=url, study_name="arena", sampler="random").best()
    assert best.weights == shown.right.weights and w.best_weights == best.weights
    w.chat_button.click()
    first = reply(best.weights)
    assert first != reply(shown.left.weights)  # the other merge of the pair answers otherwise: the check can tell
    assert w.chat_history == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first}]
    assert html.escape(first) in w.chat_pane.value and "best estimate (ja " in w.chat_pane.value
    w.chat_prompt.value = "and then?"
    w.chat_button.click()  # the conversation goes on with the same merge
    assert w.chat_history[-1]["content"] == reply(best.weights, w.chat_history[:2], "and then?")
    assert len(w.chat_history) == 4

    w.export_name.value = "arena-best"
    w.export_button.click()
    out = session.workspace.exports_dir / "arena-best"
    sh = session.shared  # the pool's vectors name the YAML's checkpoints
    recipe = load_recipe(out, vectors=sh.vectors, instruction=sh.instruction)
    assert recipe.weights == best.weights  # exactly the arena's best
    assert recipe.instruction_weight == 1.0 and session.tune.weights == best.weights
    assert w.status.value == html.escape(f"exported the best estimate to {out}")
    w.export_button.click()  # the folder exists: refused in one line, the export kept
    assert html.escape("exports/arena-best exists: tick 'replace'") in w.status.value and "\n" not in w.status.value
    assert load_recipe(out, vectors=sh.vectors, instruction=sh.instruction).weights == best.weights
    gguf = require("gguf", "pip install gguf")
    w.export_overwrite.value, w.export_gguf.value = True, "f32"
    w.export_button.click()  # replaced, and the same model for llama.cpp beside it
    g = out / "arena-best-f32.gguf"
    assert w.status.value == html.escape(f"exported the best estimate to {out} and {g.name} (f32, "
                                         f"{g.stat().st_size / 1e6:.1f} MB)")
    embd = next(t for t in gguf.GGUFReader(g).tensors if t.name == "token_embd.weight")
    with safe_open(out / "model.safetensors", "np") as f:
        want = f.get_tensor("model.embed_tokens.weight")
    assert np.array_equal(np.asarray(embd.data).reshape(want.shape), want)

    pair = w.run.pair  # the best meets a challenger; the challenger wins: a new best, a new conversation
    w.vote("left" if pair.right.number == best.number else "right")
    new = w.best_weights
    assert new != best.weights and new in (pair.left.weights, pair.right.weights)
    assert w.chat_best("hello") == reply(new) and len(w.chat_history) == 2


def test_the_widget_lives_in_arena_widget_and_the_old_import_works():
    from workbench import arena_widget, widgets

    assert ArenaWidget is arena_widget.ArenaWidget  # imported above from workbench.widgets
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        widgets.Nope  # noqa: B018 (the module's __getattr__ answers only for ArenaWidget)
