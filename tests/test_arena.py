"""The preference arena (optimer_lib.search.arena): votes in the study storage, resumed, shared by voters;
the pair it proposes; the best estimate under a consistent voter; ties; bad input."""

from __future__ import annotations

import math

import optuna
import pytest

from optimer_lib.errors import ConfigError
from optimer_lib.search.arena import Arena, Pair

NAMES = ["ja", "zh"]
TARGET = {"ja": 0.8, "zh": 0.2}


def dist(w: dict[str, float]) -> float:
    return math.dist([w[n] for n in NAMES], [TARGET[n] for n in NAMES])


def consistent_vote(pair: Pair) -> str:
    """A voter who always prefers the merge nearer TARGET."""
    return "left" if dist(pair.left.weights) <= dist(pair.right.weights) else "right"


def test_pair_differs_and_is_in_bounds():
    arena = Arena.open(NAMES, bounds={"ja": (0.0, 1.0), "zh": (0.0, 0.5)}, sampler="random", seed=3)
    pair = arena.pair()
    assert pair.left.number != pair.right.number
    assert pair.left.weights != pair.right.weights
    for c in (pair.left, pair.right):
        assert 0.0 <= c.weights["ja"] <= 1.0 and 0.0 <= c.weights["zh"] <= 0.5
    assert arena.pair() == pair  # asking again proposes nothing new
    assert arena.best() is None


def test_gp_arena_starts_with_seeded_uniform_merges():
    """The first ``startup`` merges of a GP arena are uniform draws fixed by the seed (the GP explores nothing)."""
    import random

    arena = Arena.open(NAMES, sampler="gp", seed=5, startup=3)
    pair = arena.pair()
    expect = []
    for number in range(2):
        rng = random.Random(f"5:{number}")
        expect.append({n: rng.uniform(0.0, 1.0) for n in NAMES})
    assert sorted([pair.left.weights, pair.right.weights], key=str) == sorted(expect, key=str)
    assert Arena.open(NAMES, sampler="gp", seed=5, startup=3).pair() == pair  # same seed, same first pair


def test_votes_stored_and_resumed_from_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'arena.db'}"
    arena = Arena.open(NAMES, storage=url, study_name="a1", sampler="random", seed=0)
    pair = arena.pair()
    first = pair
    pair = arena.vote(pair, "left", voter="alice")
    winner = first.left.number
    assert winner in (pair.left.number, pair.right.number)  # the winner stays for the next round
    pair = arena.vote(pair, "tie", voter="bob")
    pair = arena.vote(pair, "right", voter="alice")
    best = arena.best()

    again = Arena.open(NAMES, storage=url, study_name="a1", sampler="random", seed=0)
    assert [v["choice"] for v in again.votes] == ["left", "tie", "right"]
    assert [v["voter"] for v in again.votes] == ["alice", "bob", "alice"]
    assert again.pair() == pair
    assert again.best() == best and best is not None
    # optuna-dashboard sees the two decisive votes only (a tie is no preference)
    assert len(again.study.preferences) == 2
    # the study loads as an optuna-dashboard preferential study too
    from optuna_dashboard.preferential import load_study
    assert len(load_study(study_name="a1", storage=url).preferences) == 2


def test_tie_keeps_incumbent_and_retires_challenger():
    arena = Arena.open(NAMES, sampler="random", seed=1)
    pair = arena.vote(arena.pair(), "left")
    champ = arena.best()
    challenger = pair.left if pair.right.number == champ.number else pair.right
    nxt = arena.vote(pair, "tie")
    numbers = {nxt.left.number, nxt.right.number}
    assert champ.number in numbers and challenger.number not in numbers
    assert arena.best() == champ
    tie = arena.votes[-1]
    assert tie["choice"] == "tie" and tie["retired"] == challenger.number
    assert arena.raw.trials[challenger.number].state == optuna.trial.TrialState.COMPLETE


def test_two_voters_on_one_study(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    alice = Arena.open(NAMES, storage=url, study_name="s", sampler="random", seed=0)
    bob = Arena.open(NAMES, storage=url, study_name="s", sampler="random", seed=0)
    seen = alice.pair()
    assert bob.pair() == seen
    alice.vote(seen, "left", voter="alice")
    after = bob.vote(seen, "right", voter="bob")  # bob votes on the pair he saw, already decided by alice
    assert len(alice.votes) == 2
    # both members of the disputed pair were beaten once: neither is in the next pair
    assert {after.left.number, after.right.number}.isdisjoint({seen.left.number, seen.right.number})
    assert alice.pair() == after


def test_consistent_votes_move_best_toward_preferred_region():
    arena = Arena.open(NAMES, sampler="random", seed=3)
    pair = arena.pair()
    start = min(dist(pair.left.weights), dist(pair.right.weights))
    seen = []
    for _ in range(20):
        seen += [pair.left.weights, pair.right.weights]
        pair = arena.vote(pair, consistent_vote(pair))
    best = arena.best()
    # with a consistent voter the incumbent is the nearest merge seen so far
    assert dist(best.weights) == pytest.approx(min(dist(w) for w in seen))
    assert dist(best.weights) < 0.5 * start
    assert round(start, 3) == 0.528 and round(dist(best.weights), 3) == 0.154


@pytest.mark.slow
def test_gp_sampler_learns_the_preferred_region():
    """optuna-dashboard's preferential GP (after 4 uniform startup merges) finds TARGET's neighbourhood in 15
    votes; random challengers do not (seeds 0-3: GP 0.20, 0.014, 0.027, 0.031 from TARGET; random 0.11-0.15)."""
    found, starts = {}, {}
    for kind in ("gp", "random"):
        arena = Arena.open(NAMES, sampler=kind, seed=2)
        pair = arena.pair()
        starts[kind] = min(dist(pair.left.weights), dist(pair.right.weights))
        for _ in range(15):
            pair = arena.vote(pair, consistent_vote(pair))
        found[kind] = dist(arena.best().weights)
    assert round(starts["gp"], 3) == round(starts["random"], 3) == 0.175  # the same seeded first pair
    assert found["gp"] < 0.05 < found["random"]
    assert round(found["gp"], 3) == 0.027 and round(found["random"], 3) == 0.114


def test_bad_inputs(tmp_path):
    arena = Arena.open(NAMES, sampler="random")
    with pytest.raises(ConfigError, match="unknown vote 'both'"):
        arena.vote(arena.pair(), "both")
    with pytest.raises(ConfigError, match="unknown arena sampler 'tpe'"):
        Arena.open(NAMES, sampler="tpe")
    with pytest.raises(ConfigError, match="lo < hi"):
        Arena.open(NAMES, bounds=(1.0, 0.0))
    url = f"sqlite:///{tmp_path / 'x.db'}"
    Arena.open(NAMES, storage=url, study_name="a", sampler="random")
    with pytest.raises(ConfigError, match=r"votes over vectors \['ja', 'zh'\] but this pool has \['ja'\]"):
        Arena.open(["ja"], storage=url, study_name="a", sampler="random")
    optuna.create_study(storage=url, study_name="plain")
    with pytest.raises(ConfigError, match="not an arena study"):
        Arena.open(NAMES, storage=url, study_name="plain", sampler="random")


def _bench():
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parent.parent / "bench"
    sys.path.insert(0, str(bench))  # for its `_common` import
    spec = importlib.util.spec_from_file_location("bench_arena", bench / "arena.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_simulated_voter():
    """bench/arena.py's voter prefers the lower loss with probability sigmoid(delta / 0.01)."""
    import random

    bench = _bench()
    rng = random.Random(0)
    for delta, p in ((0.01, 0.731), (0.0, 0.5), (-0.02, 0.119)):
        share = sum(bench.prefer_left(1.0, 1.0 + delta, rng) for _ in range(20_000)) / 20_000
        assert abs(share - p) < 0.01, (delta, share)
    assert bench.prefer_left(0.0, 100.0, rng) and not bench.prefer_left(100.0, 0.0, rng)  # no overflow
    curve = bench.run_arena(lambda w: 10 * dist(w), NAMES, "random", seed=2, votes=20)
    assert len(curve) == 20 and curve[-1] <= curve[0]
    assert round(curve[-1], 2) == 1.14  # the nearest of the 21 merges seen, as with the consistent voter above


VOTER = """
import math, sys
from optimer_lib.search.arena import Arena
url, name, votes = sys.argv[1], sys.argv[2], int(sys.argv[3])
target = {"ja": 0.8, "zh": 0.2}
d = lambda w: math.dist([w["ja"], w["zh"]], [target["ja"], target["zh"]])
arena = Arena.open(["ja", "zh"], storage=url, study_name="shared", sampler="random", seed=0)
pair = arena.pair()
for _ in range(votes):
    pair = arena.vote(pair, "left" if d(pair.left.weights) <= d(pair.right.weights) else "right", voter=name)
"""


@pytest.mark.slow
def test_two_voter_processes_on_one_postgres_study(tmp_path):
    """Two processes vote at the same time on one PostgreSQL study: every vote is kept, every preference names
    trials of the study, and the shared best is the nearest merge any of them saw."""
    import subprocess
    import sys

    from pg import create_database, missing, postgres_server

    if missing():
        pytest.skip(str(missing()))
    with postgres_server() as server:
        url = create_database(server, "arena_voters")
        Arena.open(NAMES, storage=url, study_name="shared", sampler="random", seed=0)  # create it once
        procs = [subprocess.Popen([sys.executable, "-c", VOTER, url, who, "12"], stderr=subprocess.PIPE, text=True)
                 for who in ("alice", "bob")]
        for p in procs:
            assert p.wait(timeout=240) == 0, p.stderr.read()
        arena = Arena.open(NAMES, storage=url, study_name="shared", sampler="random", seed=0)
        votes = arena.votes
        assert len(votes) == 24 and {v["voter"] for v in votes} == {"alice", "bob"}
        numbers = {t.number for t in arena.raw.trials}
        assert all(v["left"] in numbers and v["right"] in numbers for v in votes)
        assert len(arena.study.preferences) == 24  # no tie: every vote is a preference
        losers = {v["right"] if v["choice"] == "left" else v["left"] for v in votes}
        compared = {n for v in votes for n in (v["left"], v["right"])}
        params = {t.number: t.params for t in arena.raw.trials}
        nearest = min(compared, key=lambda n: dist(params[n]))
        assert nearest not in losers  # a consistent voter never ranks the nearest merge lower, whoever votes
        best = arena.best()
        assert best is not None and best.number not in losers and best.number in compared
