"""Contracts of the search layer: objective direction, the versioned study record, the Merger protocol, the one
source of search defaults, and the one scorer that every search asks."""

from __future__ import annotations

import dataclasses
import json

import optuna
import pytest
from helpers import FakeMerger, TinyMerger
from test_rerank import SUITE as METRIC_SUITE
from test_rerank import fake_metrics
from test_search import OPT, SUITE, config

import optimer_lib.scoring.scorer as scorer_mod
from optimer_lib.cli import build_parser, main
from optimer_lib.errors import ConfigError
from optimer_lib.experiments.baselines import MethodMerger
from optimer_lib.merging.merger import Merger
from optimer_lib.merging.resident import ResidentMerger
from optimer_lib.scoring.objectives import Objective, parse_objective
from optimer_lib.scoring.scorer import TrialScorer
from optimer_lib.search import record
from optimer_lib.search.defaults import BATCH, INTERACTIVE
from optimer_lib.search.pareto import pareto_front, run_pareto_search
from optimer_lib.search.rerank import rerank
from optimer_lib.search.study import SearchConfig, run_search

optuna.logging.set_verbosity(optuna.logging.WARNING)


def closeness(model, tokenizer):
    """An 'accuracy' that peaks (at 1.0) at OPT: to be maximised."""
    return 1.0 - sum((model.weights[k] - v) ** 2 for k, v in OPT.items())


closeness.higher_is_better = True


def test_a_callable_that_says_higher_is_better_is_maximised(tmp_path):
    res = run_search(FakeMerger(), None, SUITE, Objective(fn=closeness), config(tmp_path, trials=40), progress=False)
    assert res.study.direction == optuna.study.StudyDirection.MAXIMIZE
    values = [t.value for t in res.study.trials]
    assert res.best_value == max(values) and res.best_value > 0.9  # the best is the largest, near the peak
    assert res.study.user_attrs[record.DIRECTION] == "maximize"
    assert json.loads(res.path.read_text())["direction"] == "maximize"
    # re-ranked for its own objective, the order is by value, largest first
    ranked = rerank(res.study, res.study.user_attrs[record.OBJECTIVE])
    assert [r.value for r in ranked.ranking] == sorted(values, reverse=True)


def test_maximize_flag_and_its_refusals(tmp_path):
    plain = Objective(fn=lambda m, t: closeness(m, t))  # no attribute: minimised unless asked
    assert plain.direction == "minimize" and Objective(fn=plain.fn, maximize=True).direction == "maximize"
    with pytest.raises(ConfigError, match="always minimised"):
        parse_objective("loss:en", ["en"], maximize=True)
    with pytest.raises(ConfigError, match="always minimised"):
        Objective(terms={"loss:en": 1.0}, maximize=True)
    with pytest.raises(ConfigError, match="to be maximized"):
        run_search(FakeMerger(), None, SUITE, Objective(fn=closeness), config(tmp_path, trials=2,
                                                                            direction="minimize"), progress=False)


def test_cli_maximize_reaches_the_study(tmp_path, tiny_pool, capsys):
    base, tuned = tiny_pool("llama", 1)
    from optimer_lib.checkpoints.vectors import extract_vector, save_vector

    vec = save_vector(extract_vector(base, tuned[0], name="v"), tmp_path / "v.safetensors")
    (tmp_path / "obj.py").write_text("def size(model, tokenizer):\n"
                                     "    return float(sum(p.detach().abs().sum() for p in model.parameters()))\n")
    notes = tmp_path / "notes.txt"
    notes.write_text("the quick brown fox\n\njumps over the dog")
    argv = ["search", "--base", str(base), "--vector", str(vec), "--eval", f"notes={notes}", "--objective",
            f"{tmp_path / 'obj.py'}:size", "--maximize", "--trials", "6", "--top-k", "0", "--sampler", "random",
            "--workdir", str(tmp_path / "w")]
    assert main(argv) == 0
    best = json.loads((tmp_path / "w" / "best.json").read_text())
    study = optuna.load_study(study_name="optimer", storage=f"sqlite:///{tmp_path / 'w' / 'optuna.db'}")
    assert best["direction"] == "maximize" and best["objective"] == max(t.value for t in study.trials)
    weighted = ["search", "--base", str(base), "--vector", str(vec), "--eval", f"notes={notes}", "--objective",
                "loss:notes", "--maximize", "--trials", "2", "--workdir", str(tmp_path / "w2")]
    assert main(weighted) == 2  # a user mistake: one clear line, no traceback
    assert "always minimised" in capsys.readouterr().err


def test_pareto_keeps_each_objectives_direction(tmp_path, monkeypatch):
    monkeypatch.setattr(scorer_mod, "evaluate_suite", fake_metrics)
    fake_metrics.calls = []
    acc = Objective(fn=lambda model, tokenizer: 1 - (model.weights["b"] - 0.7) ** 2, spec="acc_b", maximize=True)
    loss = parse_objective("loss:en", list(METRIC_SUITE.texts), qa_names=list(METRIC_SUITE.qa))
    cfg = SearchConfig(trials=30, sampler="random", storage=":memory:", workdir=tmp_path)
    res = run_pareto_search(FakeMerger(["a", "b", "c"]), None, METRIC_SUITE, [loss, acc], cfg, progress=False)
    assert [d.name for d in res.study.directions] == ["MINIMIZE", "MAXIMIZE"]
    values = {t.number: t.values for t in res.study.trials}
    best_acc = max(v[1] for v in values.values())
    front = pareto_front(res.study)
    # the trial with the highest accuracy is on the front (a minimising front would drop it), negated there
    assert any(-p.values["acc_b"] == best_acc for p in front)


def test_study_record_versions(tmp_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    old = optuna.create_study(storage=storage, study_name="old")
    old.set_user_attr("names", ["a"])  # a study written before record versions existed
    assert record.read_version(old) == 1
    record.write_study_attrs(old, {record.NAMES: ["zzz"]})  # keeps what it has, adds the version
    assert old.user_attrs[record.NAMES] == ["a"] and old.user_attrs[record.RECORD_VERSION] == record.VERSION
    new = optuna.create_study(storage=storage, study_name="new")
    new.set_user_attr(record.RECORD_VERSION, record.VERSION + 1)
    with pytest.raises(ConfigError, match="newer OptiMer"):
        record.read_version(new)
    with pytest.raises(ConfigError) as info:
        record.check_study(old, {record.NAMES: ["b"], record.OBJECTIVE: "x"})
    assert "names ['a']" in str(info.value)


def test_a_version_1_study_still_reranks(tmp_path):
    """A study as the search wrote it before this module (plain string keys, no version) reads the same."""
    study = optuna.create_study(study_name="legacy")
    dist = {"a": optuna.distributions.FloatDistribution(0, 1)}
    for a in (0.1, 0.5, 0.9):
        study.add_trial(optuna.trial.create_trial(params={"a": a}, distributions=dist, value=a,
                                                  user_attrs={"weights": {"a": a},
                                                              "metrics@100": {"loss:en": (a - 0.5) ** 2}}))
    study.set_user_attr("names", ["a"])
    study.set_user_attr("suite", {"texts": ["en"], "qa": []})
    assert record.read_version(study) == 1
    assert rerank(study, "loss:en").best_weights == {"a": 0.5}
    assert record.stored_metrics(study)[1] == {"100": {"loss:en": 0.0}}


def test_every_merger_is_a_merger(tiny_pool):
    from transformers import AutoModelForCausalLM

    base, tuned = tiny_pool("llama", 1)
    from optimer_lib.checkpoints.vectors import extract_vector

    resident = ResidentMerger(AutoModelForCausalLM.from_pretrained(base), [extract_vector(base, tuned[0], name="v")])
    for merger in (resident, MethodMerger(resident, "ties"), FakeMerger(), TinyMerger(
            AutoModelForCausalLM.from_pretrained(base), {"v": AutoModelForCausalLM.from_pretrained(tuned[0])})):
        assert isinstance(merger, Merger), type(merger)
    assert not isinstance(object(), Merger)


def test_one_source_of_defaults():
    """The CLI and SearchConfig read BATCH; the workbench form, the widget and SearchSpec read INTERACTIVE."""
    from workbench.searching import SearchSpec

    cfg = SearchConfig()
    for f in ("trials", "sampler", "seed", "search_limit", "rescore_limit", "top_k", "seq_len", "batch_size",
              "record_metrics", "pruner"):
        assert getattr(cfg, f) == getattr(BATCH, f), f
    ns = build_parser().parse_args(["search", "--base", "b", "--vector", "v"])
    assert (ns.trials, ns.sampler, ns.seed, ns.search_limit, ns.rescore_limit, ns.top_k, ns.pruner) == (
        BATCH.trials, BATCH.sampler, BATCH.seed, BATCH.search_limit, BATCH.rescore_limit, BATCH.top_k, BATCH.pruner)
    spec = SearchSpec()
    for f in ("trials", "sampler", "seed", "bounds", "search_limit", "rescore_limit", "top_k", "instruction_weight"):
        assert getattr(spec, f) == getattr(INTERACTIVE, f), f
    assert INTERACTIVE.trials < BATCH.trials and INTERACTIVE.search_limit < BATCH.search_limit  # deliberate


def test_the_scorer_is_what_searches_store(tmp_path, monkeypatch):
    """A trial's stored metrics and value are exactly the scorer's, for one and for several objectives."""
    monkeypatch.setattr(scorer_mod, "evaluate_suite", fake_metrics)
    fake_metrics.calls = []
    merger = FakeMerger(["a", "b", "c"])
    objs = [parse_objective(s, list(METRIC_SUITE.texts), qa_names=list(METRIC_SUITE.qa)) for s in
            ("loss:en", "acc:math")]
    res = run_search(merger, None, METRIC_SUITE, objs[0], config(tmp_path, trials=3, search_limit=7), progress=False)
    scorer = TrialScorer(merger, None, METRIC_SUITE, objs[:1])
    for t in res.study.trials:
        value, metrics = scorer.score(t.params, 7)
        assert t.value == value and t.user_attrs[record.metrics_key(7)] == metrics
    pareto = run_pareto_search(merger, None, METRIC_SUITE, objs, dataclasses.replace(
        config(tmp_path, trials=3, search_limit=7), study_name="p", sampler="random"), progress=False)
    many = TrialScorer(merger, None, METRIC_SUITE, objs)
    for t in pareto.study.trials:
        assert list(t.values) == many.score(t.params, 7)[0]
    needed = TrialScorer(merger, None, METRIC_SUITE, objs[:1], record_metrics="needed")
    assert list(needed.scored_suite().texts) == ["en"] and not needed.scored_suite().qa


def test_a_late_worker_with_another_seed_draws_new_weights(tmp_path):
    """Worker --seed 1 runs one trial, worker --seed 0 joins: it must not replay worker 1's proposal."""
    from test_search import quadratic

    storage = f"sqlite:///{tmp_path / 's.db'}"
    for seed, total in ((1, 1), (0, 2)):
        res = run_search(FakeMerger(), None, SUITE, Objective(fn=quadratic),
                         config(tmp_path / f"w{seed}", trials=total, seed=seed, sampler="random", storage=storage),
                         progress=False)
    first, second = res.study.trials
    assert first.params != second.params
