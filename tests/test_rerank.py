"""Objectives on demand: stored metrics, re-ranking from storage, warm-started re-optimisation."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import optuna
import pytest
from conftest import make_model, perturbed
from helpers import FakeMerger, TinyMerger
from optuna.distributions import FloatDistribution

import optimer_lib.scoring.scorer as scorer_mod
from optimer_lib.errors import ConfigError
from optimer_lib.scoring.evaluate import EvalSuite, evaluate_suite
from optimer_lib.scoring.objectives import Objective, parse_objective
from optimer_lib.search.rerank import open_study, rerank
from optimer_lib.search.study import SearchConfig, run_search
from optimer_lib.search.warmstart import warm_start_search, warm_start_study

optuna.logging.set_verbosity(optuna.logging.WARNING)
SUITE = EvalSuite(texts={"en": ["x"], "ja": ["y"]}, qa={"math": [("q", "1")]})
TARGETS = {"loss:en": {"a": 0.2, "b": 0.1}, "loss:ja": {"a": 0.8, "c": 0.5}}


def fake_metrics(model, tokenizer, suite, *, limit=None, **kw):
    """Smooth per-distribution 'metrics' of the current weights; lower fidelity adds a bias."""
    fake_metrics.calls.append((sorted(suite.texts), sorted(suite.qa)))
    w, out = model.weights, {}
    bias = 1.0 / (limit or 1000)
    for name in suite.texts:
        loss = 1 + sum((w[k] - v) ** 2 for k, v in TARGETS[f"loss:{name}"].items()) + bias
        out[f"loss:{name}"], out[f"ppl:{name}"] = loss, math.exp(loss)
    if "math" in suite.qa:
        out["acc:math"] = 1 - (w["b"] - 0.7) ** 2 - (w["c"] - 0.3) ** 2 - bias
    return out


@pytest.fixture
def fake_eval(monkeypatch):
    fake_metrics.calls = []
    monkeypatch.setattr(scorer_mod, "evaluate_suite", fake_metrics)
    monkeypatch.setattr("optimer_lib.scoring.objectives.evaluate_suite", fake_metrics)
    return fake_metrics


def obj(spec: str) -> Objective:
    return parse_objective(spec, list(SUITE.texts), qa_names=list(SUITE.qa))


def search(tmp_path, spec="loss:en", **kw):
    kw.setdefault("storage", f"sqlite:///{tmp_path / 'optuna.db'}")
    cfg = SearchConfig(workdir=tmp_path, search_limit=10, rescore_limit=30, **kw)
    return run_search(FakeMerger(), None, SUITE, obj(spec), cfg, progress=False)


def test_record_all_stores_every_metric_needed_only_the_objectives(tmp_path, fake_eval):
    res = search(tmp_path, trials=3, top_k=0, storage=":memory:")
    for t in res.study.trials:
        assert set(t.user_attrs["metrics@10"]) == {"loss:en", "ppl:en", "loss:ja", "ppl:ja", "acc:math"}
        assert t.value == pytest.approx(t.user_attrs["metrics@10"]["loss:en"])
    assert res.study.user_attrs["suite"] == {"texts": ["en", "ja"], "qa": ["math"]}
    res = search(tmp_path, trials=2, top_k=0, storage=":memory:", record_metrics="needed")
    assert set(res.study.trials[0].user_attrs["metrics@10"]) == {"loss:en", "ppl:en"}
    assert fake_eval.calls[-1] == (["en"], [])
    with pytest.raises(ConfigError, match="record_metrics must be"):
        search(tmp_path, trials=2, record_metrics="some", storage=":memory:")


def test_rerank_equals_direct_evaluation_of_stored_metrics(tmp_path, fake_eval):
    res = search(tmp_path, trials=15, top_k=3)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    fake_eval.calls.clear()
    new = obj("loss:ja=1,acc:math=2")
    study = optuna.load_study(study_name="optimer", storage=url)
    rescored = study.user_attrs["rescore@30"]
    direct = {}
    for t in study.trials:
        entry = rescored.get(str(t.number))
        direct[t.number] = new(entry["metrics"] if entry else t.user_attrs["metrics@10"])
    ranked = rerank(url, "loss:ja=1,acc:math=2")  # by storage URL, the only study picked
    assert fake_eval.calls == []  # nothing evaluated
    assert [r.number for r in ranked.ranking] == sorted(direct, key=lambda n: (direct[n], n))
    for r in ranked.ranking:
        assert r.value == pytest.approx(direct[r.number])
        assert r.fidelity == ("30" if str(r.number) in rescored else "10")
        assert r.weights == pytest.approx(study.trials[r.number].params)
    assert ranked.confidence.fidelities == {"30": 3, "10": 12}
    # one fidelity for all: exactly the search metrics
    at10 = rerank(res.study, new, fidelity=10)
    assert {r.number: r.value for r in at10.ranking} == pytest.approx(
        {t.number: new(t.user_attrs["metrics@10"]) for t in study.trials})
    assert at10.confidence.samples == 10 and at10.best_weights == at10.ranking[0].weights
    d = at10.to_dict()
    assert d["best_trial"] == at10.best.number and len(d["ranking"]) == 15
    assert "rank" in at10.table(5) and len(at10.table(5).splitlines()) == 6


def test_confidence_counts_and_boundary():
    study = optuna.create_study()
    dist = {"a": FloatDistribution(0, 1), "b": FloatDistribution(0, 2)}
    for a, b, loss in ((0.0, 1.0, 1.0), (0.5, 1.0, 1.005), (0.5, 0.2, 1.03), (0.9, 1.0, 1.2), (0.3, 0.3, None)):
        attrs = {"metrics@10": {"loss:en": loss}} if loss is not None else {}
        study.add_trial(optuna.trial.create_trial(params={"a": a, "b": b}, distributions=dist,
                                                  value=loss or 9.0, user_attrs=attrs))
    res = rerank(study, "loss:en")  # no suite attr: distributions come from the stored metrics
    c = res.confidence
    assert (c.trials, c.skipped, c.near_1pct, c.near_5pct) == (4, 1, 1, 2)
    assert c.on_boundary == {"a": "low"} and c.samples == 10 and c.fidelity == "10"
    assert "1 within 1%" in c.summary() and "a at low" in c.summary()


def test_missing_metrics_and_bad_inputs_say_what_to_do(tmp_path, fake_eval):
    search(tmp_path, trials=3, top_k=0, record_metrics="needed")
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    with pytest.raises(ConfigError, match=r"loss:ja.*never stored.*record_metrics='all'"):
        rerank(url, "loss:ja")
    with pytest.raises(ConfigError, match="unknown distribution 'klingon'"):
        rerank(url, "loss:klingon")
    with pytest.raises(ConfigError, match="fidelity '30'"):
        rerank(url, "loss:en", fidelity=30)
    with pytest.raises(ConfigError, match="callable"):
        rerank(url, Objective(fn=lambda m, t: 0.0, spec="pkg:fn"))
    with pytest.raises(ConfigError, match="no study database"):
        open_study(f"sqlite:///{tmp_path / 'nope.db'}")
    with pytest.raises(ConfigError, match="no study 'other'"):
        open_study(url, "other")


def test_warm_start_seeds_stored_trials_and_continues(tmp_path, fake_eval):
    src = search(tmp_path, trials=8, top_k=0, bounds={"c": (-1.0, 2.0)}).study
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    new = obj("loss:ja=1,acc:math=1")
    study = warm_start_study("optimer", new, storage=url, study_name="ja")
    assert len(study.trials) == 8 and study.user_attrs["warm_start"]["seeded"] == 8
    for s, t in zip(src.trials, study.trials, strict=True):
        assert t.state == optuna.trial.TrialState.COMPLETE and t.params == s.params
        assert t.value == pytest.approx(new(s.user_attrs["metrics@10"]))
        assert t.distributions == s.distributions and t.user_attrs["seeded_from"] == f"optimer#{s.number}"
    assert warm_start_study("optimer", new, storage=url, study_name="ja").trials == study.trials  # reused
    with pytest.raises(ConfigError, match="new name"):
        warm_start_study("optimer", new, storage=url, study_name="optimer")

    merger = FakeMerger()
    cfg = SearchConfig(workdir=tmp_path, storage=url, study_name="ja", trials=12, top_k=0, search_limit=10)
    res = warm_start_search(merger, None, SUITE, new, cfg, "optimer", progress=False)
    assert res.new_trials == 4 and len(res.study.trials) == 12  # the seeds count toward trials
    assert all(-1.0 <= t.params["c"] <= 2.0 for t in res.study.trials)  # the source's bounds are adopted
    assert res.study.trials[-1].distributions["c"] == FloatDistribution(-1.0, 2.0)
    res = warm_start_search(merger, None, SUITE, new, cfg, "optimer", extra_trials=6, progress=False)
    assert res.new_trials == 2 and len(res.study.trials) == 14  # 8 seeds + 6
    with pytest.raises(ConfigError, match="differ from the source"):
        warm_start_search(merger, None, SUITE, new, dataclasses.replace(cfg, bounds=(0.0, 1.0)),
                          "optimer", progress=False)


def test_real_tiny_model_rerank_matches_fresh_evaluation(tmp_path, tiny_tokenizer):
    base = make_model("llama")
    merger = TinyMerger(base, {"x": perturbed(base, 0.05, 1), "y": perturbed(base, 0.05, 2)})
    suite = EvalSuite(texts={"en": ["the quick brown fox", "the lazy dog"], "code": ["def f(x):\n    return x"]},
                      qa={"math": [("12 + 35 =", "47")]})
    cfg = SearchConfig(workdir=tmp_path, storage=":memory:", trials=3, search_limit=2, top_k=0)
    res = run_search(merger, tiny_tokenizer, suite, parse_objective("loss:en", ["en", "code"], qa_names=["math"]),
                     cfg, progress=False)
    ranked = rerank(res.study, "loss:code=1,acc:math=1")
    merger.set_weights(ranked.best_weights)
    fresh = evaluate_suite(base, tiny_tokenizer, suite, limit=2)
    assert ranked.best.metrics == pytest.approx(fresh)
    assert ranked.best_value == pytest.approx((fresh["loss:code"] - fresh["acc:math"]) / 2)


def test_cli_rerank_and_warm_start(tmp_path, tiny_vectors, optimer):
    base, files = tiny_vectors()
    vecs = [arg for f in files for arg in ("--vector", str(f))]
    for name in ("notes", "other"):
        (tmp_path / f"{name}.txt").write_text("\n\n".join(f"{name} the quick brown fox {i}" for i in range(8)))
    wd = tmp_path / "wd"
    common = ["search", "--base", str(base), *vecs, "--eval", f"notes={tmp_path / 'notes.txt'}",
              f"other={tmp_path / 'other.txt'}", "--search-limit", "3", "--top-k", "0", "--workdir", str(wd),
              "--sampler", "random"]
    cli = optimer

    cli(*common, "--objective", "loss:notes", "--trials", "4")
    r = cli("rerank", "--workdir", str(wd), "--objective", "loss:other")
    out = json.loads((wd / "rerank.json").read_text())
    lib = rerank(f"sqlite:///{Path(wd).resolve() / 'optuna.db'}", "loss:other")
    assert out["best_trial"] == lib.best.number and out["objective"] == pytest.approx(lib.best_value)
    assert "best weights" in r.stdout and "confidence" in r.stdout and len(out["ranking"]) == 4
    r = cli(*common, "--objective", "loss:other", "--study", "warm", "--warm-start-from", "optimer", "--trials", "6")
    assert json.loads(r.stdout)["seeded"] == 4
    assert json.loads((wd / "best-optimer.json").read_text())["study"] == "optimer"  # the first best is kept
    warm = optuna.load_study(study_name="warm", storage=f"sqlite:///{Path(wd).resolve() / 'optuna.db'}")
    assert len(warm.trials) == 6 and sum("seeded_from" in t.user_attrs for t in warm.trials) == 4
    r = cli("rerank", "--workdir", str(wd), "--objective", "loss:other", ok=False)  # two studies now
    assert r.returncode == 2 and "--study" in r.stderr
