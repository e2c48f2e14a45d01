"""Sample generations per search trial: stored through the record, greedy (reproducible), counted in the cost ledger."""

from __future__ import annotations

import optuna
import pytest
from conftest import make_model, perturbed
from helpers import TinyMerger

from optimer_lib.errors import ConfigError
from optimer_lib.experiments.costs import CostLedger, ledger_from_study
from optimer_lib.scoring.evaluate import EvalSuite
from optimer_lib.scoring.objectives import Objective
from optimer_lib.search import record
from optimer_lib.search.samples import MAX_PROMPTS, generate_samples, read_sample_prompts
from optimer_lib.search.study import SearchConfig, run_search

optuna.logging.set_verbosity(optuna.logging.WARNING)
SUITE = EvalSuite(texts={"en": ["unused by the callable objective"]})
PROMPTS = ("the quick brown", "12 + 35 =")


def _weight_sum(model, tokenizer) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def _merger() -> TinyMerger:
    base = make_model("llama")
    return TinyMerger(base, {"a": perturbed(base, 0.5, seed=1), "b": perturbed(base, 0.5, seed=2)})


def test_trials_store_greedy_generations_counted_in_the_ledger(tmp_path, tiny_tokenizer):
    merger, ledger = _merger(), CostLedger()
    cfg = SearchConfig(trials=4, sampler="random", storage=":memory:", workdir=tmp_path, top_k=0,
                       sample_prompts=PROMPTS, sample_tokens=6)
    res = run_search(merger, tiny_tokenizer, SUITE, Objective(fn=_weight_sum), cfg,
                     callbacks=[ledger.recorder("optimer", tokens_evaluated=42)], progress=False)
    trials = res.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 4
    texts = []
    for t in trials:
        samples = record.trial_samples(t)
        assert [s["prompt"] for s in samples] == list(PROMPTS)
        generated = t.user_attrs[record.TOKENS_GENERATED]
        assert 0 < generated <= 2 * 6 and t.user_attrs[record.SAMPLE_SECONDS] > 0
        # greedy: the same weights merged again give the same texts
        merger.set_weights(t.params)
        again = generate_samples(merger.model, tiny_tokenizer, PROMPTS, 6)
        assert [g["text"] for g in again] == [s["text"] for s in samples]
        assert sum(g["tokens"] for g in again) == generated
        texts.append(tuple(s["text"] for s in samples))
    assert len(set(texts)) > 1  # the texts follow the weights (vectors at scale 0.5 change the argmax)
    # the ledger charges each trial its generated tokens on top of what it scored, and records their seconds
    entries = ledger.of("optimer")
    assert [e.tokens_evaluated for e in entries] == [42 + t.user_attrs[record.TOKENS_GENERATED] for t in trials]
    assert all(0 < e.info["sample_seconds"] <= e.seconds for e in entries)
    from_study = ledger_from_study(res.study, "optimer", tokens_evaluated=42)
    assert [e.tokens_evaluated for e in from_study] == [e.tokens_evaluated for e in entries]
    assert all(e.seconds >= e.info["sample_seconds"] for e in from_study)


def test_off_by_default_and_settings_checked(tmp_path, tiny_tokenizer):
    res = run_search(_merger(), tiny_tokenizer, SUITE, Objective(fn=_weight_sum),
                     SearchConfig(trials=2, storage=":memory:", workdir=tmp_path, top_k=0), progress=False)
    assert all(record.SAMPLES not in t.user_attrs and record.trial_samples(t) == [] for t in res.study.trials)
    assert CostLedger(ledger_from_study(res.study, "x", tokens_evaluated=7)).totals()["tokens_evaluated"] == 14
    for bad, match in (({"sample_prompts": ("p",) * (MAX_PROMPTS + 1)}, "at most 16"),
                       ({"sample_prompts": ("p",), "sample_tokens": 0}, "sample tokens")):
        with pytest.raises(ConfigError, match=match):
            SearchConfig(workdir=tmp_path, **bad).check(["a"])


def test_read_sample_prompts(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("first prompt\n\n  \nsecond\\nline\n")
    assert read_sample_prompts([str(f), "a literal prompt"]) == ("first prompt", "second\nline", "a literal prompt")
    assert read_sample_prompts(None) == ()


def test_cost_estimate_times_the_samples(tmp_path, tiny_tokenizer):
    from optimer_lib.search.cost import estimate_search_cost

    cfg = SearchConfig(trials=10, workdir=tmp_path, top_k=0, sample_prompts=PROMPTS, sample_tokens=6)
    cost = estimate_search_cost(_merger(), tiny_tokenizer, SUITE, Objective(fn=_weight_sum), cfg,
                                seconds_per_token=1e-3, merge_seconds=0.5)
    assert cost.sample_tokens == 12 and cost.sample_seconds > 0
    assert cost.seconds_per_trial == pytest.approx(0.5 + cost.tokens_per_trial * 1e-3 + cost.sample_seconds)
    assert "samples" in cost.summary() and "12 generated tokens" in cost.summary()
    plain = estimate_search_cost(_merger(), tiny_tokenizer, SUITE, Objective(fn=_weight_sum),
                                 SearchConfig(trials=10, workdir=tmp_path, top_k=0), seconds_per_token=1e-3,
                                 merge_seconds=0.5)
    assert plain.sample_seconds == 0 and "samples" not in plain.summary()


def test_cli_search_stores_samples(tmp_path, tiny_vectors, optimer):
    base, (v0, v1) = tiny_vectors(("v0", "v1"))
    corpus = tmp_path / "notes.txt"
    corpus.write_text("\n".join(["the quick brown fox jumps over the lazy dog"] * 8))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the quick\n12 + 35 =\n")
    wd = tmp_path / "search"
    r = optimer("search", "--base", base, "--vector", v0, "--vector", v1, "--eval", f"notes={corpus}",
                "--objective", "loss:notes", "--trials", 3, "--search-limit", 2, "--top-k", 0, "--workdir", wd,
                "--sampler", "random", "--sample-prompts", prompts, "--sample-prompts", "def f(x):",
                "--sample-tokens", 5)
    assert "samples" in r.stderr  # the cost estimate counts them
    study = optuna.load_study(study_name="optimer", storage=f"sqlite:///{wd / 'optuna.db'}")
    assert len(study.trials) == 3
    for t in study.trials:
        assert [s["prompt"] for s in record.trial_samples(t)] == ["the quick", "12 + 35 =", "def f(x):"]
        assert 0 < t.user_attrs[record.TOKENS_GENERATED] <= 15
    r = optimer("search", "--base", base, "--vector", v0, "--eval", f"notes={corpus}", "--workdir", tmp_path / "x",
                "--sample-prompts", "p", "--sample-tokens", 0, ok=False)
    assert "sample tokens must be 1..512" in r.stderr
