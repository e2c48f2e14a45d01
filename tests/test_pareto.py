"""Multi-objective (Pareto) search: non-dominated fronts, samplers, resume, warm start, figure, export, CLI."""

from __future__ import annotations

import json

import optuna
import pytest
from helpers import FakeMerger, card_weights
from test_rerank import SUITE, fake_metrics, obj

import optimer_lib.scoring.scorer as scorer_mod
import optimer_lib.search.pareto as pareto_mod
from optimer_lib.errors import ConfigError
from optimer_lib.scoring.evaluate import EvalSuite, evaluate_suite
from optimer_lib.scoring.objectives import parse_objective
from optimer_lib.search.pareto import dominates, export_point, pareto_figure, pareto_front, run_pareto_search
from optimer_lib.search.study import SearchConfig, run_search
from optimer_lib.search.warmstart import warm_start_study

optuna.logging.set_verbosity(optuna.logging.WARNING)
SPECS = ["loss:en", "loss:ja", "acc:math"]


@pytest.fixture
def fake_eval(monkeypatch):
    fake_metrics.calls = []
    monkeypatch.setattr(scorer_mod, "evaluate_suite", fake_metrics)  # the one scorer every search calls
    return fake_metrics


def config(tmp_path, **kw) -> SearchConfig:
    kw.setdefault("storage", ":memory:")
    kw.setdefault("search_limit", 10)
    return SearchConfig(workdir=tmp_path, **kw)


def check_front(front, points):
    """Pairwise non-dominated, and every point left out is dominated by a front member."""
    vals = {p.number: list(p.values.values()) for p in points}
    numbers = {p.number for p in front}
    for p in front:
        assert not any(dominates(vals[q], vals[p.number]) for q in vals if q != p.number)
    for n in set(vals) - numbers:
        assert any(dominates(vals[f], vals[n]) for f in numbers), n


@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "random"])
def test_front_is_non_dominated(tmp_path, fake_eval, sampler):
    res = run_pareto_search(FakeMerger(), None, SUITE, [obj(s) for s in SPECS],
                            config(tmp_path, trials=16, sampler=sampler), progress=False)
    trials = res.study.trials
    assert len(trials) == 16 and res.new_trials == 16
    points = pareto_mod.all_points(res.study)
    check_front(res.front, points)
    assert {p.number for p in res.front} == {t.number for t in res.study.best_trials}
    for p in res.front:
        t = trials[p.number]
        assert p.weights == pytest.approx(t.params) and list(p.values) == SPECS
        m = t.user_attrs["metrics@10"]
        assert list(p.values.values()) == pytest.approx([m["loss:en"], m["loss:ja"], -m["acc:math"]])
    saved = json.loads(res.path.read_text())
    assert saved["objectives"] == SPECS and [f["trial"] for f in saved["front"]] == [p.number for p in res.front]


def test_bad_settings_and_resume(tmp_path, fake_eval):
    with pytest.raises(ConfigError) as info:
        run_pareto_search(FakeMerger(), None, SUITE, [obj("loss:en")], config(tmp_path, sampler="cmaes"))
    assert "at least two objectives" in str(info.value) and "nsga2" in str(info.value)
    with pytest.raises(ConfigError, match="pruning works with one objective"):
        run_pareto_search(FakeMerger(), None, SUITE, [obj("loss:en"), obj("acc:math")],
                          config(tmp_path, pruner="asha"))
    url = f"sqlite:///{tmp_path / 'p.db'}"
    objs = [obj("loss:en"), obj("acc:math")]
    for trials, new in ((4, 4), (7, 3)):
        res = run_pareto_search(FakeMerger(), None, SUITE, objs, config(tmp_path, trials=trials, storage=url),
                                progress=False)
        assert res.new_trials == new and len(res.study.trials) == trials
    with pytest.raises(ConfigError, match="pick a new --study"):
        run_pareto_search(FakeMerger(), None, SUITE, [obj("loss:ja"), obj("acc:math")],
                          config(tmp_path, trials=8, storage=url), progress=False)
    # the needed-only mode scores the union of what the objectives read
    run_pareto_search(FakeMerger(), None, SUITE, objs, config(tmp_path, trials=1, record_metrics="needed"),
                      progress=False)
    assert fake_eval.calls[-1] == (["en"], ["math"])


def test_a_time_budget_stops_the_pareto_search_after_the_running_trial(tmp_path, fake_eval):
    objs = [obj("loss:en"), obj("acc:math")]
    with pytest.raises(ConfigError, match="time_budget: bad duration 'soon'"):
        run_pareto_search(FakeMerger(), None, SUITE, objs, config(tmp_path, time_budget="soon"))
    res = run_pareto_search(FakeMerger(), None, SUITE, objs, config(tmp_path, trials=50, time_budget=1e-9),
                            progress=False)
    assert (res.new_trials, len(res.study.trials), res.stopped) == (1, 1, "time_budget")
    saved = json.loads(res.path.read_text())
    assert (saved["trials"], saved["stopped"]) == (1, "time_budget")
    res = run_pareto_search(FakeMerger(), None, SUITE, objs, config(tmp_path / "b", trials=3, time_budget="1h"),
                            progress=False)
    assert (res.new_trials, res.stopped) == (3, None) and "stopped" not in json.loads(res.path.read_text())


def test_front_from_stored_metrics_of_a_single_objective_study(tmp_path, fake_eval):
    res = run_search(FakeMerger(), None, SUITE, obj("balanced"), config(tmp_path, trials=15, top_k=0),
                     progress=False)
    front = pareto_front(res.study, ["loss:en", "acc:math"])
    points = pareto_mod.all_points(res.study, ["loss:en", "acc:math"])
    assert len(points) == 15
    check_front(front, points)
    for p in points:
        m = res.study.trials[p.number].user_attrs["metrics@10"]
        assert p.values == pytest.approx({"loss:en": m["loss:en"], "acc:math": -m["acc:math"]})
    fig = pareto_figure(res.study, ["loss:en", "acc:math"])
    assert [t.type for t in fig.data] == ["scatter", "scatter"]
    # shown as measured: the objective "acc:math" is −accuracy (minimised); the axis shows the accuracy itself
    assert fig.layout.yaxis.title.text == "acc:math (higher is better)" and min(fig.data[0].y) >= 0
    assert sorted(fig.data[0].y + fig.data[1].y) == pytest.approx(sorted(-p.values["acc:math"] for p in points))
    assert fig.layout.xaxis.title.text == "loss:en (lower is better)"
    assert sorted(n for tr in fig.data for (n,) in tr.customdata) == list(range(15))
    assert {n for (n,) in fig.data[1].customdata} == {p.number for p in front}
    assert pareto_figure(res.study, SPECS).data[0].type == "scatter3d"
    with pytest.raises(ConfigError, match="2 or 3 objectives"):
        pareto_figure(res.study)


def test_warm_started_pareto_study(tmp_path, fake_eval):
    url = f"sqlite:///{tmp_path / 'w.db'}"
    run_search(FakeMerger(), None, SUITE, obj("loss:en"), config(tmp_path, trials=6, top_k=0, storage=url),
               progress=False)
    objs = [obj("loss:ja"), obj("acc:math")]
    study = warm_start_study("optimer", objs, storage=url, study_name="multi")
    assert len(study.trials) == 6 and study.user_attrs["objectives"] == ["loss:ja", "acc:math"]
    res = run_pareto_search(FakeMerger(), None, SUITE, objs, config(tmp_path, trials=9, storage=url,
                                                                     study_name="multi"), progress=False)
    assert res.new_trials == 3 and len(res.study.trials) == 9
    check_front(res.front, pareto_mod.all_points(res.study))


def test_real_tiny_model_pick_and_export(tmp_path, tiny_vectors, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from optimer_lib.merging.pool import open_pool

    base, paths = tiny_vectors()
    pool = open_pool(base, paths)
    suite = EvalSuite(texts={"en": ["the quick brown fox", "the lazy dog"], "code": ["def f(x):\n    return x"]})
    objs = [parse_objective(s, ["en", "code"]) for s in ("loss:en", "loss:code")]
    res = run_pareto_search(pool.merger, pool.tokenizer, suite, objs,
                            config(tmp_path, trials=4, sampler="random", search_limit=2), progress=False)
    point = res.front[0]
    out = export_point(pool, point, tmp_path / "pick")
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    fresh = evaluate_suite(loaded, tiny_tokenizer, suite, limit=2)
    assert [fresh["loss:en"], fresh["loss:code"]] == pytest.approx(list(point.values.values()), rel=1e-5)
    assert card_weights((out / "README.md").read_text()) == pytest.approx(point.weights, rel=1e-5)


def test_cli_objectives(tmp_path, tiny_vectors, optimer):
    base, (v0, v1) = tiny_vectors(("a", "b"))
    corpus = tmp_path / "notes.txt"
    corpus.write_text("\n\n".join(f"the quick brown fox {i}" for i in range(8)))
    wd = tmp_path / "wd"
    args = ["search", "--base", base, "--vector", v0, "--vector", v1,
            "--eval", f"notes={corpus}", "--objectives", "loss:notes", "ppl:notes=1", "--trials", "3",
            "--search-limit", "3", "--sampler", "nsga2", "--workdir", wd]
    r = optimer(*args)
    out = json.loads(r.stdout)
    assert out["objectives"] == ["loss:notes", "ppl:notes=1"] and out["front"]
    saved = json.loads((wd / "pareto.json").read_text())["front"]
    assert [(f["trial"], f["weights"]) for f in saved] == [(f["trial"], f["weights"]) for f in out["front"]]
    assert {"loss:notes", "ppl:notes"} <= set(saved[0]["metrics"])
    r = optimer(*args, "--objective", "loss:notes", ok=False)
    assert r.returncode == 2 and "not allowed with" in r.stderr


def test_callable_objective_values_are_stored_and_reusable(tmp_path, fake_eval):
    from optimer_lib.scoring.objectives import Objective
    from optimer_lib.search.rerank import rerank

    fn = Objective(fn=lambda model, tokenizer: model.weights["a"], spec="pkg:weight_a")
    res = run_pareto_search(FakeMerger(), None, SUITE, [fn, obj("loss:en")], config(tmp_path, trials=5),
                            progress=False)
    for t in res.study.trials:
        assert t.user_attrs["metrics@10"]["objective:pkg:weight_a"] == pytest.approx(t.params["a"])
        assert t.values[0] == pytest.approx(t.params["a"])
    ranked = rerank(res.study, fn)  # its stored value is reused; no model needed
    assert ranked.best_weights["a"] == pytest.approx(min(t.params["a"] for t in res.study.trials))
