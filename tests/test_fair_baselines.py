"""Fair comparisons in the experiment set: every merge method searched by one code path with OptiMer's sampler,
seed and trial budget; uniform averaging one point; each method's trial count recorded."""

from __future__ import annotations

from dataclasses import fields
from types import SimpleNamespace

import optuna
import pytest
from conftest import make_model, perturbed

from optimer_lib.checkpoints.vectors import extract_vector
from optimer_lib.experiments import baselines as bl
from optimer_lib.experiments.run import ExperimentConfig, Experiments
from optimer_lib.merging.resident import ResidentMerger
from optimer_lib.scoring.evaluate import EvalSuite
from optimer_lib.scoring.objectives import parse_objective
from optimer_lib.search import record
from optimer_lib.search.study import SearchConfig

optuna.logging.set_verbosity(optuna.logging.WARNING)
SUITE = EvalSuite(texts={"en": ["the quick brown fox jumps", "the lazy dog"], "code": ["def f(x):\n    return x"]})


def test_no_separate_baseline_budget():
    """The config has one trial budget for every searched merge method: there is nothing to set lower."""
    names = {f.name for f in fields(ExperimentConfig)}
    assert "baseline_trials" not in names and "trials" in names
    assert ExperimentConfig().trials == 100 and ExperimentConfig.quick().trials == 12


def _experiments(tmp_path, trials: int, seed: int) -> tuple[Experiments, list]:
    cfg = ExperimentConfig(workdir=tmp_path, trials=trials, seed=seed)
    exp = Experiments(cfg)
    seen: list = []

    def fake(merger, tok, suite, objective, name, config, *, ledger=None, **kw):
        seen.append((name, config))
        return {"choice": {"method": "x", "weights": {}}, "objective": 1.0, "metrics": {},
                "trials": 1 if name == "uniform" else config.trials, "seconds": 0.0}

    exp.__dict__.update(pool=SimpleNamespace(merger=None, tokenizer=None), dev=None, objective=None)
    return exp, [fake, seen]


@pytest.mark.parametrize("seed", [0, 7])
def test_baseline_stage_uses_optimers_budget_sampler_and_seed(tmp_path, monkeypatch, seed):
    exp, (fake, seen) = _experiments(tmp_path, trials=37, seed=seed)
    monkeypatch.setattr(bl, "search_baseline", fake)
    out = {b: exp.baseline_stage(b) for b in ("uniform", "task_arithmetic", "ties", "dare")}
    optimer_cfg = exp.search_config("optimer", exp.cfg.trials)
    assert [n for n, _ in seen] == ["uniform", "task_arithmetic", "ties", "dare"]
    for _name, config in seen:
        assert (config.trials, config.sampler, config.seed) == (37, optimer_cfg.sampler, seed) == (37, "tpe", seed)
        assert (config.search_limit, config.rescore_limit, config.top_k) == \
            (optimer_cfg.search_limit, optimer_cfg.rescore_limit, optimer_cfg.top_k)
    for b in ("task_arithmetic", "ties", "dare"):
        assert out[b]["trials"] == out[b]["trial_budget"] == 37
        assert out[b]["sampler"] == "tpe" and out[b]["seed"] == seed
    assert out["uniform"]["trials"] == out["uniform"]["trial_budget"] == 1 and out["uniform"]["sampler"] is None


@pytest.fixture
def merger():
    base = make_model("llama")
    vecs = [extract_vector(base, perturbed(base, 0.05, seed=20 + i), name=n) for i, n in enumerate(["x", "y"])]
    return ResidentMerger(base, vecs)


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "dare"])
def test_searched_baselines_run_the_one_trial_loop_with_tpe(name, merger, tiny_tokenizer, tmp_path, monkeypatch):
    """A real search: the study is Optuna's, its sampler TPE with the given seed, and it ran exactly the budget."""
    obj = parse_objective("balanced", list(SUITE.texts))
    cfg = SearchConfig(trials=5, sampler="tpe", seed=3, storage=":memory:", workdir=tmp_path, top_k=0,
                       search_limit=None)
    captured = {}
    real = bl.run_search

    def spy(*a, **kw):
        captured["result"] = real(*a, **kw)
        return captured["result"]

    monkeypatch.setattr(bl, "run_search", spy)
    out = bl.search_baseline(merger, tiny_tokenizer, SUITE, obj, name, cfg)
    study = captured["result"].study
    assert isinstance(study.sampler, optuna.samplers.TPESampler)
    assert study.user_attrs[record.SAMPLER] == "tpe" and study.user_attrs[record.SEED] == 3
    assert out["trials"] == len(study.trials) == 5


def test_the_uniform_mixture_is_trained_apart_when_the_first_candidate_was_killed(tmp_path, monkeypatch):
    """A run killed while training the uniform candidate (trial 0) and resumed: the search spends its budget on
    searched candidates, and the uniform yardstick of finding 5 and the final table is trained apart, with the
    candidates' tokens, outside the search; a completed first candidate is used as it is."""
    import shutil

    from optimer_lib.data import assets_dir
    from optimer_lib.experiments.run import seed_config

    exp = Experiments(seed_config(ExperimentConfig.quick(tmp_path), 0))
    mcfg = bl.MixtureSearchConfig(tokens_per_candidate=4096, budget_tokens=8192, workdir=tmp_path / "mixture-x",
                                  search_limit=2)
    trained = []

    def fake_train(base, ratios, out, cfg):  # the base itself as the "trained" model: scoring it is real
        trained.append((dict(ratios), cfg.tokens))
        shutil.copytree(assets_dir() / "base", out)
        (out / "training.json").write_text("{}")

    monkeypatch.setattr(bl, "train_mixture", fake_train)
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, params={}, distributions={}))
    got = exp.uniform_mixture(study, mcfg)
    k = len(exp.cfg.corpora)
    assert trained == [(dict.fromkeys(exp.cfg.corpora, 1 / k), 4096)] and got["trained_apart"] is True
    assert got["dir"] == str(tmp_path / "mixture-x" / "uniform") and 0 < got["objective"] < 20  # a real dev loss
    assert exp.uniform_mixture(study, mcfg)["objective"] == got["objective"] and len(trained) == 1  # not retrained

    done = optuna.create_study()
    done.add_trial(optuna.trial.create_trial(value=3.5, params={}, distributions={}))
    assert exp.uniform_mixture(done, mcfg) == {"dir": str(tmp_path / "mixture-x" / "cand-000"), "objective": 3.5}


def test_a_searched_baselines_rescoring_is_in_its_ledger(merger, tiny_tokenizer, tmp_path):
    """The top-k re-scoring run_search does after the trials is charged to the baseline as to OptiMer: one
    ``rescore`` entry of top-k × the re-score set's tokens (the compute table compares like with like)."""
    from optimer_lib.experiments.costs import CostLedger
    from optimer_lib.scoring.scorer import TrialScorer

    obj = parse_objective("balanced", list(SUITE.texts))
    cfg = SearchConfig(trials=4, sampler="tpe", seed=3, storage=":memory:", workdir=tmp_path, top_k=2,
                       search_limit=2, rescore_limit=4)
    ledger = CostLedger()
    bl.search_baseline(merger, tiny_tokenizer, SUITE, obj, "task_arithmetic", cfg, ledger=ledger)
    (entry,) = ledger.of("task_arithmetic", ("rescore",))
    per = TrialScorer(merger, tiny_tokenizer, SUITE, [obj], seq_len=cfg.seq_len).eval_tokens(4)
    assert entry.tokens_evaluated == 2 * per > 0 and entry.seconds >= 0
    assert len(ledger.of("task_arithmetic", ("trial",))) == 4
