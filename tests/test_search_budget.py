"""Searches that say what they cost: the estimate before a search, and a time budget that stops it cleanly."""

from __future__ import annotations

import json

import optuna
import pytest
from conftest import make_model, make_tokenizer, perturbed
from helpers import FakeMerger, TinyMerger

from optimer_lib.errors import ConfigError
from optimer_lib.scoring.evaluate import EvalSuite
from optimer_lib.scoring.objectives import Objective, parse_objective
from optimer_lib.scoring.scorer import TrialScorer
from optimer_lib.search import record
from optimer_lib.search.cost import SearchCost, estimate_search_cost, fmt_seconds, parse_duration
from optimer_lib.search.study import SearchConfig, run_search
from optimer_lib.search.trials import Deadline

optuna.logging.set_verbosity(optuna.logging.WARNING)
SUITE = EvalSuite(texts={"en": ["unused by fake objectives"]})


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("30m", 1800), ("2h", 7200), ("1h30m", 5400),
                                           ("1.5h", 5400), (" 2 m ", 120), (45, 45), (0.5, 0.5), ("1d", 86400)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "soon", "30x", "-5", "0", "1h30", "m", float("nan"), 0])
def test_bad_durations_are_refused(bad):
    with pytest.raises(ConfigError, match="duration"):
        parse_duration(bad)


def test_deadline_with_an_injected_clock():
    now = [100.0]
    d = Deadline(25, clock=lambda: now[0])
    now[0] += 1000
    assert d() is False  # the first ask never stops: a search always finishes one trial
    assert d() is True and d.spent and d.elapsed == 1000
    now[0] = 100.0
    e = Deadline(25, clock=lambda: now[0])
    e()
    for t, stop in ((10, False), (24.9, False), (25, True), (26, True)):
        now[0] = 100.0 + t
        assert e() is stop


def ticking(clock: list[float], step: float):
    """A callable objective that advances the fake clock by ``step`` seconds per trial (a trial 'takes' step s)."""
    def fn(model, tokenizer):
        clock[0] += step
        return sum((v - 0.3) ** 2 for v in model.weights.values())
    return fn


def test_time_budget_stops_after_the_running_trial_and_the_study_says_why(tmp_path):
    now = [0.0]
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    cfg = SearchConfig(workdir=tmp_path, storage=storage, trials=10, sampler="random", top_k=2, search_limit=5,
                       rescore_limit=10, time_budget="25s")
    res = run_search(FakeMerger(), None, SUITE, Objective(fn=ticking(now, 10.0)), cfg, progress=False,
                     clock=lambda: now[0])
    # asked at 0 (first: go), 10, 20 (< 25: go), 30 (spent: stop) -> 3 trials of 10
    assert (res.new_trials, res.stopped, len(res.study.trials)) == (3, "time_budget", 3)
    attr = res.study.user_attrs[record.STOPPED]
    assert attr == {"reason": "time_budget", "budget_s": 25.0, "elapsed_s": 30.0, "new_trials": 3, "trials": 3,
                    "of": 10}
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["stopped"] == "time_budget" and best["rescored"] is False and best["trials"] == 3
    # re-running without a budget continues to 10 trials, re-scores, and the stale reason is replaced
    res2 = run_search(FakeMerger(), None, SUITE, Objective(fn=ticking(now, 10.0)),
                      SearchConfig(workdir=tmp_path, storage=storage, trials=10, sampler="random", top_k=2,
                                   search_limit=5, rescore_limit=10), progress=False)
    assert (res2.new_trials, res2.stopped) == (7, None)
    assert res2.study.user_attrs[record.STOPPED]["reason"] == "completed"
    assert json.loads((tmp_path / "best.json").read_text())["rescored"] is True


def test_a_tiny_real_budget_runs_exactly_one_trial(tmp_path):
    cfg = SearchConfig(workdir=tmp_path, storage=":memory:", trials=20, sampler="random", top_k=0, time_budget=1e-9)
    res = run_search(FakeMerger(), None, SUITE, Objective(fn=ticking([0.0], 0)), cfg, progress=False)
    assert (res.new_trials, res.stopped) == (1, "time_budget")


def test_a_budget_that_is_not_spent_changes_nothing(tmp_path):
    cfg = SearchConfig(workdir=tmp_path, storage=":memory:", trials=4, sampler="random", top_k=0, time_budget="1h")
    res = run_search(FakeMerger(), None, SUITE, Objective(fn=ticking([0.0], 0)), cfg, progress=False)
    assert (res.new_trials, res.stopped, res.study.user_attrs[record.STOPPED]["reason"]) == (4, None, "completed")


def test_a_bad_budget_is_a_settings_problem(tmp_path):
    cfg = SearchConfig(workdir=tmp_path, storage=":memory:", trials=0, time_budget="soon")
    problems = cfg.setting_problems()
    assert any(p.startswith("time_budget: bad duration 'soon'") for p in problems) and len(problems) == 2
    with pytest.raises(ConfigError, match="time_budget"):
        run_search(FakeMerger(), None, SUITE, Objective(fn=ticking([0.0], 0)), cfg, progress=False)


def test_cost_arithmetic_and_scaling():
    c = SearchCost(trials=10, tokens_per_trial=1000, seconds_per_token=1e-3, merge_seconds=0.5, rescore_trials=2,
                   tokens_per_rescore=3000)
    assert c.seconds_per_trial == pytest.approx(1.5)
    assert c.rescore_seconds == pytest.approx(2 * (0.5 + 3.0))
    assert c.total_seconds == pytest.approx(10 * 1.5 + 7.0)
    assert c.tokens_per_second == pytest.approx(1000)
    assert c.trials_within(7.0) == 4 and c.trials_within(0.1) == 1 and c.trials_within(1e9) == 10
    twice = SearchCost(20, 1000, 1e-3, 0.5, 2, 3000)
    assert twice.total_seconds - c.total_seconds == pytest.approx(10 * c.seconds_per_trial)
    s = c.summary(budget=7.0)
    assert "1.5 s per trial" in s and "10 trials ≈ 15 s" in s and "top 2 ≈ 7.0 s" in s and "about 4 of 10" in s
    assert [fmt_seconds(x) for x in (0.41, 12, 200, 7500)] == ["0.41 s", "12 s", "3 min 20 s", "2 h 05 min"]


@pytest.fixture(scope="module")
def tiny_world():
    tok = make_tokenizer()
    base = make_model("llama")
    merger = TinyMerger(base, {"a": perturbed(base, 0.02, 1), "b": perturbed(base, 0.02, 2)})
    texts = {"en": [f"the quick brown fox {i} jumps over the lazy dog" * 3 for i in range(12)],
             "code": [f"def f{i}(x):\n    return x + {i}" for i in range(12)]}
    return merger, tok, EvalSuite(texts=texts)


def test_measured_estimate_is_positive_and_scales_with_trials(tiny_world):
    merger, tok, suite = tiny_world
    obj = parse_objective("balanced", list(suite.texts))
    cfg = SearchConfig(trials=10, search_limit=8, rescore_limit=12, top_k=2, storage=":memory:")
    cost = estimate_search_cost(merger, tok, suite, [obj], cfg, min_seconds=0.05)
    scorer = TrialScorer(merger, tok, suite, [obj])
    assert cost.tokens_per_trial == scorer.eval_tokens(8) > 0 and cost.tokens_per_rescore == scorer.eval_tokens(12)
    assert cost.seconds_per_token > 0 and cost.merge_seconds > 0 and cost.total_seconds > 0
    assert cost.seconds_per_trial == pytest.approx(cost.merge_seconds + cost.tokens_per_trial * cost.seconds_per_token)
    more = estimate_search_cost(merger, tok, suite, [obj], cfg, trials=30, seconds_per_token=cost.seconds_per_token,
                                merge_seconds=cost.merge_seconds)
    assert more.total_seconds - cost.total_seconds == pytest.approx(20 * cost.seconds_per_trial)
    assert merger.model is not None and {"a", "b"} == set(merger.names)


def test_estimate_is_near_the_real_trial_time(tiny_world, tmp_path):
    """The estimate is within 4x of what trials really take (loose: a shared 2-core machine). A burst of load
    from another process can land on the estimate or on the trials alone, so up to 3 paired measurements are
    taken; an estimate that is systematically off fails all three."""
    import time

    merger, tok, suite = tiny_world
    obj = parse_objective("balanced", list(suite.texts))
    pairs = []
    for attempt in range(3):
        cfg = SearchConfig(trials=4, search_limit=8, top_k=0, storage=":memory:", sampler="random",
                           workdir=tmp_path / str(attempt))
        cost = estimate_search_cost(merger, tok, suite, [obj], cfg, min_seconds=0.2)
        t0 = time.perf_counter()
        run_search(merger, tok, suite, obj, cfg, progress=False)
        pairs.append((cost.seconds_per_trial, (time.perf_counter() - t0) / 4))
        if cost.seconds_per_trial / 4 < pairs[-1][1] < 4 * cost.seconds_per_trial:
            return
    raise AssertionError(f"(estimate, real) seconds per trial, 3 tries: {pairs}")


@pytest.fixture
def notes(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("\n\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(40)))
    return p


def test_search_command_prints_its_estimate_and_honours_the_budget(tmp_path, tiny_vectors, notes, optimer):
    base, (v0, v1) = tiny_vectors(("notes", "other"))
    common = ["search", "--base", base, "--vector", v0, "--vector", v1, "--eval", f"notes={notes}", "--objective",
              "loss:notes", "--search-limit", 5, "--sampler", "random", "--device", "cpu", "--dtype", "float32"]
    r = optimer(*common, "--trials", 50, "--workdir", tmp_path / "est", "--estimate-only", "--top-k", 0)
    assert "estimated cost:" in r.stderr and "50 trials ≈" in r.stderr and r.stdout == ""
    assert not (tmp_path / "est" / "best.json").exists()  # nothing ran
    r = optimer(*common, "--trials", 50, "--workdir", tmp_path / "wd", "--time-budget", "0.001s", "--top-k", 2,
                "--rescore-limit", 10)
    out = json.loads(r.stdout)
    assert out["stopped"] == "time_budget" and "stopped for the time budget after 1 new trial(s)" in r.stderr
    assert "the time budget of 0.001 s covers about 1 of 50 trials" in r.stderr
    best = json.loads((tmp_path / "wd" / "best.json").read_text())
    assert (best["trials"], best["stopped"], best["rescored"]) == (1, "time_budget", False)
    r = optimer(*common, "--trials", 3, "--workdir", tmp_path / "wd", "--top-k", 0)  # resumed: prices what is left
    assert "resuming: 1 of 3 trials are done; estimated cost:" in r.stderr and "; 2 trials ≈" in r.stderr, r.stderr
    r = optimer(*common, "--trials", 3, "--workdir", tmp_path / "wd", "--top-k", 0)
    assert "the study already has its 3 trials: nothing to run" in r.stderr and "estimated cost" not in r.stderr


COUNTING = """
import os, pathlib
def count(model, tokenizer):
    with open(os.environ["CALLS_FILE"], "a") as f:
        f.write("x")
    return float(sum(p.detach().float().abs().sum() for p in model.parameters()))
"""


def test_a_callable_objective_is_called_once_per_trial_not_by_the_estimate(tmp_path, tiny_vectors, notes, optimer,
                                                                           monkeypatch):
    """A user callable may take minutes (lm-eval): the search's cost estimate does not run it; --estimate-only
    does (that is what it is asked for)."""
    base, (v0, v1) = tiny_vectors(("notes", "other"))
    (tmp_path / "obj.py").write_text(COUNTING)
    calls = tmp_path / "calls"
    monkeypatch.setenv("CALLS_FILE", str(calls))
    common = ["search", "--base", base, "--vector", v0, "--vector", v1, "--eval", f"notes={notes}", "--objective",
              f"{tmp_path / 'obj.py'}:count", "--sampler", "random", "--top-k", 0, "--trials", 3]
    r = optimer(*common, "--workdir", tmp_path / "wd")
    assert "cost estimate skipped: objective" in r.stderr and "estimated cost:" not in r.stderr
    assert calls.read_text() == "xxx"  # three trials, three calls
    r = optimer(*common, "--workdir", tmp_path / "est", "--estimate-only")
    assert "estimated cost:" in r.stderr and len(calls.read_text()) > 3


@pytest.mark.parametrize("flags, said", [
    (["--time-budget", "soon"], "bad duration 'soon'"),
    (["--dtype", "int8"], "unknown dtype 'int8'"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--device", "meta"], "--device meta is not supported"),
])
def test_bad_search_flags_are_one_line_errors(tmp_path, tiny_vectors, notes, optimer, flags, said):
    base, (v0,) = tiny_vectors(("notes",))  # real files: the flag is the only mistake
    r = optimer("search", "--base", base, "--vector", v0, "--eval", f"notes={notes}", *flags, ok=False)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert said in r.stderr, r.stderr
