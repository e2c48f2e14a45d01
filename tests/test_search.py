"""The Optuna search: optimum recovery, resume, sampler contract, failures, best.json, re-scoring."""

from __future__ import annotations

import json

import optuna
import pytest
import torch
from conftest import make_model, perturbed
from helpers import FakeMerger, TinyMerger

from optimer_lib.errors import ConfigError, MissingDependencyError, OptimerError
from optimer_lib.scoring.evaluate import EvalSuite
from optimer_lib.scoring.objectives import Objective, parse_objective
from optimer_lib.search.samplers import SAMPLERS, make_sampler
from optimer_lib.search.study import SearchConfig, run_search, trial_table

optuna.logging.set_verbosity(optuna.logging.WARNING)
OPT = {"a": 0.2, "b": 0.7, "c": 0.5}
SUITE = EvalSuite(texts={"en": ["unused by fake objectives"]})


def quadratic(model, tokenizer):
    return sum((model.weights[k] - v) ** 2 for k, v in OPT.items())


def config(tmp_path, **kw) -> SearchConfig:
    kw.setdefault("storage", ":memory:")
    return SearchConfig(workdir=tmp_path, top_k=0, **kw)


def test_tpe_recovers_known_optimum(tmp_path):
    merger = FakeMerger()
    res = run_search(merger, None, SUITE, Objective(fn=quadratic), config(tmp_path, trials=60), progress=False)
    assert len(res.study.trials) == 60
    for k, v in OPT.items():
        assert abs(res.best_weights[k] - v) < 0.1, res.best_weights
    assert merger.weights == res.best_weights  # the merger is left at the best weights


def test_resume_counts_total_trials(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    obj = Objective(fn=quadratic)
    for trials, expected_new in ((5, 5), (8, 3), (8, 0)):
        res = run_search(FakeMerger(), None, SUITE, obj,
                         config(tmp_path, trials=trials, storage=storage, sampler="random"), progress=False)
        assert res.new_trials == expected_new
        assert len(res.study.trials) == trials
    params = [tuple(t.params.values()) for t in res.study.trials]
    assert len(set(params)) == 8  # the resumed sampler does not replay its first draws
    # the same study with another objective is refused rather than silently mixed
    with pytest.raises(ConfigError, match="different objective"):
        run_search(FakeMerger(), None, SUITE, Objective(fn=lambda m, t: 0.0),
                   config(tmp_path, trials=9, storage=storage), progress=False)


def test_default_storage_is_sqlite_in_workdir(tmp_path):
    cfg = SearchConfig(workdir=tmp_path, trials=2, top_k=0)
    run_search(FakeMerger(), None, SUITE, Objective(fn=quadratic), cfg, progress=False)
    assert (tmp_path / "optuna.db").is_file() and cfg.storage_url().startswith("sqlite:///")


# "grad" needs a differentiable objective on a real ResidentMerger and refuses a callable: tests/test_gradient.py.
@pytest.mark.parametrize("name", sorted(set(SAMPLERS) - {"grad"}))
def test_every_sampler_runs(name, tmp_path):
    try:
        make_sampler(name, 0, {"a": (0.0, 1.0)}, 4)
    except MissingDependencyError as exc:
        assert "pip install" in str(exc)
        pytest.skip(f"optional dependency missing: {exc}")
    merger = FakeMerger()
    res = run_search(merger, None, SUITE, Objective(fn=quadratic),
                     config(tmp_path, trials=4, sampler=name, bounds={"c": (-1.0, 2.0)}), progress=False)
    states = [t.state for t in res.study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE] * 4
    for w in merger.history:
        assert 0 <= w["a"] <= 1 and -1 <= w["c"] <= 2


def test_grid_stops_when_exhausted(tmp_path):
    res = run_search(FakeMerger(), None, SUITE, Objective(fn=quadratic), config(tmp_path, trials=10, sampler="grid"),
                     progress=False)
    points = {tuple(t.params.values()) for t in res.study.trials}
    assert len(res.study.trials) == 8 and len(points) == 8  # 2 points per axis, 3 axes
    assert points == {(a, b, c) for a in (0.0, 1.0) for b in (0.0, 1.0) for c in (0.0, 1.0)}


def test_bounds_forms(tmp_path):
    assert SearchConfig(bounds=(-0.5, 2.0)).resolved_bounds(["a", "b"]) == {"a": (-0.5, 2.0), "b": (-0.5, 2.0)}
    assert SearchConfig(bounds={"b": (0, 3)}).resolved_bounds(["a", "b"]) == {"a": (0.0, 1.0), "b": (0.0, 3.0)}
    with pytest.raises(ConfigError, match="two numbers"):
        SearchConfig(bounds={"a": (0, 1, 2)}).resolved_bounds(["a"])


def test_bad_settings_reported_together(tmp_path):
    with pytest.raises(ConfigError) as info:
        run_search(FakeMerger(), None, SUITE, Objective(fn=quadratic),
                   config(tmp_path, sampler="nope", bounds={"a": (1, 0), "zz": (0, 1)}, trials=0), progress=False)
    msg = str(info.value)
    for fragment in ("unknown sampler 'nope'", "tpe", "lo < hi", "unknown vector 'zz'", "trials must be"):
        assert fragment in msg


def test_failing_trial_is_recorded_and_search_continues(tmp_path):
    calls = []

    def flaky(model, tokenizer):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return quadratic(model, tokenizer)

    seen = []
    res = run_search(FakeMerger(), None, SUITE, Objective(fn=flaky), config(tmp_path, trials=5),
                     callbacks=[lambda study, trial: seen.append(trial.state)], progress=False)
    states = [t.state.name for t in res.study.trials]
    assert states == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE", "COMPLETE"]
    assert res.study.trials[1].user_attrs["error"] == "RuntimeError: boom"
    assert [s.name for s in seen] == states
    table = trial_table(res.study)
    assert list(table["state"]) == states and table.loc[1, "error"] == "RuntimeError: boom"


def test_optimer_error_stops_and_interrupt_keeps_trials(tmp_path):
    def bad_config(model, tokenizer):
        raise ConfigError("fix your objective")

    with pytest.raises(ConfigError, match="fix your objective"):
        run_search(FakeMerger(), None, SUITE, Objective(fn=bad_config), config(tmp_path, trials=3), progress=False)

    storage = f"sqlite:///{tmp_path / 'intr.db'}"
    calls = []

    def interrupted(model, tokenizer):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return quadratic(model, tokenizer)

    obj = Objective(fn=interrupted, spec="interrupting")
    res = run_search(FakeMerger(), None, SUITE, obj, config(tmp_path, trials=5, storage=storage), progress=False)
    assert res.interrupted and res.new_trials == 2 and len(res.study.trials) == 3
    assert json.loads(res.path.read_text())["interrupted"] is True  # the best finished trial is saved
    # the interrupted trial does not use up one of the 5
    res = run_search(FakeMerger(), None, SUITE, obj, config(tmp_path, trials=5, storage=storage), progress=False)
    assert res.new_trials == 3 and not res.interrupted


def test_ctrl_c_while_re_scoring_keeps_the_search_best(tmp_path):
    """Ctrl-C (or a workbench Stop) during the top-k re-scoring: best.json holds the best trial at the search
    fidelity, marked interrupted, instead of nothing."""
    def two_fidelity(model, tokenizer, *, limit):
        if limit == 30:
            raise KeyboardInterrupt
        return {"objective": quadratic(model, tokenizer)}

    cfg = SearchConfig(workdir=tmp_path, storage=":memory:", trials=6, search_limit=10, rescore_limit=30, top_k=2)
    res = run_search(FakeMerger(), None, SUITE, Objective(fn=two_fidelity), cfg, progress=False)
    best_trial = min((t for t in res.study.trials if t.value is not None), key=lambda t: t.value)
    best = json.loads(res.path.read_text())
    assert res.interrupted and best["interrupted"] is True and best["rescored"] is False
    assert best["trial"] == best_trial.number and best["objective"] == pytest.approx(best_trial.value)


def test_best_json_and_rescoring_picks_rescored_argmin(tmp_path):
    def two_fidelity(model, tokenizer, *, limit):
        q = quadratic(model, tokenizer)
        # at the rescore fidelity the ranking flips: the worst of the top-k becomes the best
        return {"objective": q if limit == 10 else -q, "q": q}

    cfg = SearchConfig(workdir=tmp_path, storage=":memory:", trials=12, search_limit=10, rescore_limit=30, top_k=3)
    res = run_search(FakeMerger(), None, SUITE, Objective(fn=two_fidelity), cfg, progress=False)
    complete = sorted((t for t in res.study.trials if t.value is not None), key=lambda t: t.value)
    top = complete[:3]
    assert res.best_trial == top[-1].number and res.best_value == pytest.approx(-top[-1].value)
    rescored = res.study.user_attrs["rescore@30"]
    assert set(rescored) == {str(t.number) for t in top}
    best = json.loads(res.path.read_text())
    assert res.path == tmp_path / "best.json"
    trial = res.study.trials[best["trial"]]
    assert best["weights"] == pytest.approx(trial.params)
    assert res.best_weights == pytest.approx(trial.params)
    assert best["objective_search"] == pytest.approx(trial.value)
    assert best["objective"] == pytest.approx(res.best_value)
    assert best["metrics"] == pytest.approx(rescored[str(trial.number)]["metrics"])
    assert best["limits"] == [10, 30] and best["sampler"] == "tpe" and best["seed"] == 0
    assert trial.user_attrs["metrics@10"]["q"] == pytest.approx(trial.value)
    assert json.loads((tmp_path / "rescore.json").read_text())["limit"] == 30
    table = trial_table(res.study)
    assert {"number", "state", "objective", "a", "b", "c", "q", "objective@30"} <= set(table.columns)


def test_trial_table_says_which_failed_trials_were_interrupted():
    """Stop/Ctrl-C abandons the running trial as FAIL with a mark (Optuna has no such state); the table reads it."""
    from optimer_lib.search import record

    study = optuna.create_study()
    dist = {"a": optuna.distributions.FloatDistribution(0, 1)}
    study.add_trial(optuna.trial.create_trial(params={"a": 0.1}, distributions=dist, value=1.0))
    fail = optuna.trial.TrialState.FAIL
    study.add_trial(optuna.trial.create_trial(params={"a": 0.2}, distributions=dist, state=fail,
                                              user_attrs={record.INTERRUPTED: True}))
    study.add_trial(optuna.trial.create_trial(params={"a": 0.3}, distributions=dist, state=fail))
    assert list(trial_table(study)["state"]) == ["COMPLETE", "INTERRUPTED", "FAIL"]


def test_real_tiny_model_search(tmp_path, tiny_tokenizer):
    base = make_model("llama")
    merger = TinyMerger(base, {"x": perturbed(base, 0.05, 1), "y": perturbed(base, 0.05, 2)})
    suite = EvalSuite(texts={"en": ["the quick brown fox", "the lazy dog"], "code": ["def f(x):\n    return x"]},
                      qa={"math": [("12 + 35 =", "47"), ("1 + 1 =", "2")]})
    obj = parse_objective("balanced", list(suite.texts), qa_names=list(suite.qa))
    cfg = SearchConfig(workdir=tmp_path, trials=3, search_limit=1, rescore_limit=2, top_k=2)
    res = run_search(merger, tiny_tokenizer, suite, obj, cfg, progress=False)
    assert set(res.best_metrics) >= {"loss:en", "ppl:en", "loss:code", "acc:math"}
    assert res.best_value == pytest.approx(obj(res.best_metrics))
    # the resident model now holds the best merge
    expected = {k: merger.base[k] + sum(res.best_weights[n] * merger.taus[n][k] for n in merger.names)
                for k in merger.base}
    for key, value in base.state_dict().items():
        torch.testing.assert_close(value, expected[key])


def test_no_completed_trial_is_an_error(tmp_path):
    def always(model, tokenizer):
        raise ValueError("bad")

    with pytest.raises(OptimerError, match="no trial .* completed.*ValueError: bad"):
        run_search(FakeMerger(), None, SUITE, Objective(fn=always), config(tmp_path, trials=2), progress=False)
