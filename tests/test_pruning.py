"""Multi-fidelity search with Optuna pruners: PRUNED trials, nested scoring, costs, resume, CLI flags."""

from __future__ import annotations

import json

import optuna
import pytest
import torch
from conftest import make_model, perturbed
from helpers import FakeMerger
from optuna.trial import TrialState

from optimer_lib.cli import main
from optimer_lib.errors import ConfigError
from optimer_lib.experiments.costs import CostLedger, ledger_from_study
from optimer_lib.scoring.evaluate import EvalSuite, evaluate_suite
from optimer_lib.scoring.fidelity import default_fidelities, nested_metrics
from optimer_lib.scoring.objectives import Objective, parse_objective
from optimer_lib.scoring.scorer import TrialScorer
from optimer_lib.search.pruning import fidelity_problems, parse_fidelities, reduction_factor
from optimer_lib.search.study import SearchConfig, run_search, trial_table
from optimer_lib.search.trials import counted

optuna.logging.set_verbosity(optuna.logging.WARNING)
OPT = {"a": 0.2, "b": 0.7}
SUITE = EvalSuite(texts={"en": [f"doc {i}" for i in range(20)]}, qa={"math": [("q", "1")] * 4})


def biased(model, tokenizer, limit):
    """Distance to OPT; low fidelities read 2 *better* than the full one, so a pruned trial's last
    report is lower than every completed value (it must still never become best)."""
    biased.calls.append((dict(model.weights), limit))
    return sum((model.weights[k] - v) ** 2 for k, v in OPT.items()) - (2.0 if limit < 10 else 0.0)


def fake_search(tmp_path, pruner="median", trials=30, **kw):
    biased.calls = []
    kw.setdefault("storage", ":memory:")
    cfg = SearchConfig(trials=trials, sampler="random", workdir=tmp_path, top_k=0, search_limit=10,
                       pruner=pruner, fidelities=(2, 5, 10), **kw)
    return run_search(FakeMerger(OPT), None, SUITE, Objective(fn=biased), cfg, progress=False)


@pytest.mark.parametrize("pruner", ["median", "asha", "successive-halving", "hyperband"])
def test_pruned_trials_report_lower_rungs_only_and_never_win(tmp_path, pruner):
    res = fake_search(tmp_path, pruner)
    trials = res.study.trials
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert pruned and complete and len(pruned) + len(complete) == 30
    scored_at = {}
    for weights, limit in biased.calls:
        scored_at.setdefault(tuple(weights.values()), []).append(limit)
    for t in pruned:
        steps = sorted(t.intermediate_values)
        assert steps in ([2], [2, 5]), steps
        assert f"metrics@{steps[-1]}" in t.user_attrs and "metrics@10" not in t.user_attrs
        assert t.value == t.intermediate_values[steps[-1]]  # Optuna keeps the last report as its value
        assert scored_at[tuple(t.params.values())] == steps  # never scored at the search limit
        assert t.user_attrs["docs_evaluated"] == sum(r + min(r, 4) for r in steps)  # a call per rung
    for t in complete:
        assert sorted(t.intermediate_values) == [2, 5, 10] and "metrics@10" in t.user_attrs
        assert t.user_attrs["docs_evaluated"] == (2 + 2) + (5 + 4) + (10 + 4)
    # low fidelities read 2 lower (more than any distance): a pruned trial would win if it could
    assert min(t.value for t in pruned) < min(t.value for t in complete)
    best = min(complete, key=lambda t: t.value)
    assert res.best_trial == best.number and res.best_value == best.value
    assert json.loads(res.path.read_text())["trial"] == best.number
    table = trial_table(res.study).set_index("number")
    assert table.loc[pruned[0].number, "state"] == "PRUNED"
    assert table.loc[pruned[0].number, "fidelity"] == max(pruned[0].intermediate_values)


def test_no_pruner_is_a_plain_one_fidelity_search(tmp_path):
    biased.calls = []
    cfg = SearchConfig(trials=6, sampler="random", workdir=tmp_path, top_k=0, search_limit=10, storage=":memory:")
    res = run_search(FakeMerger(OPT), None, SUITE, Objective(fn=biased), cfg, progress=False)
    assert [limit for _, limit in biased.calls] == [10] * 6
    assert all(t.state == TrialState.COMPLETE and not t.intermediate_values for t in res.study.trials)


def test_resume_counts_pruned_trials(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    first = fake_search(tmp_path, trials=15, storage=storage)
    assert first.new_trials == 15 and any(t.state == TrialState.PRUNED for t in first.study.trials)
    again = fake_search(tmp_path, trials=20, storage=storage)
    assert again.new_trials == 5 and len(again.study.trials) == 20 and counted(again.study) == 20
    assert fake_search(tmp_path, trials=20, storage=storage).new_trials == 0
    assert again.study.user_attrs["fidelities"] == [2, 5, 10] and again.study.user_attrs["pruner"] == "median"


def test_settings_are_checked_all_at_once():
    with pytest.raises(ConfigError) as err:
        SearchConfig(trials=0, pruner="median", fidelities=(30, 20)).check(["a"])
    said = str(err.value)
    assert "trials must be >= 1" in said and "must increase" in said and "end at the search limit 100" in said
    with pytest.raises(ConfigError, match="unknown pruner 'bogus'.*median"):
        SearchConfig(pruner="bogus").check(["a"])
    with pytest.raises(ConfigError, match="need a pruner"):
        SearchConfig(fidelities=(10, 100)).check(["a"])
    with pytest.raises(ConfigError, match="too small for the default fidelities"):
        SearchConfig(pruner="asha", search_limit=10).check(["a"])
    assert fidelity_problems("median", (10, 30, None), None) == []
    assert fidelity_problems("median", None, 100) == []
    assert default_fidelities(100) == (11, 33, 100) and default_fidelities(20) == (7, 20)
    assert reduction_factor((10, 30, 100)) == 3 and reduction_factor((10, 20, 100)) == 2
    assert parse_fidelities("10, 30,all") == (10, 30, None)
    with pytest.raises(ConfigError, match="bad --fidelities"):
        parse_fidelities("10,-3")


@pytest.fixture(scope="module")
def real(tiny_tokenizer):
    """A tiny Llama whose weights a merger sets to base + Σ α τ, and a suite of texts and QA."""
    base = make_model("llama")
    state = {k: v.clone() for k, v in base.state_dict().items()}
    taus = {n: {k: v - state[k] for k, v in perturbed(base, 0.05, seed=s).state_dict().items()}
            for n, s in (("a", 1), ("b", 2))}

    class Merger:
        names = ["a", "b"]
        model = base

        def set_weights(self, weights):
            with torch.no_grad():
                for k, p in base.state_dict().items():
                    p.copy_(state[k] + sum(w * taus[n][k] for n, w in weights.items()))

    words = "the quick brown fox jumps over the lazy dog 12 + 35 = 47 def f(x): return x".split()
    texts = {name: [" ".join(words[(i * 7 + j) % len(words)] for j in range(3 + (i * 5 + off) % 17))
                    for i in range(12)] for name, off in (("en", 0), ("code", 3))}
    texts["en"][4] = ""  # bos only: skipped by the loss, still a document
    suite = EvalSuite(texts=texts, qa={"math": [(f"{i} + {i} =", str(2 * i)) for i in range(7)]})
    return Merger(), tiny_tokenizer, suite


def test_nested_scoring_equals_evaluate_suite_at_each_limit(real):
    merger, tok, suite = real
    merger.set_weights({"a": 0.3, "b": 0.6})
    kw = {"seq_len": 16, "batch_size": 4}
    got = list(nested_metrics(merger.model, tok, suite, (3, 7, None), **kw))
    assert [limit for limit, _ in got] == [3, 7, None]
    for k, (limit, metrics) in enumerate(got):
        want = evaluate_suite(merger.model, tok, suite, limit=limit, **kw)
        assert list(metrics) == list(want)
        if k == 0:
            assert metrics == want  # the first rung is exactly evaluate_suite's scoring
        assert metrics == pytest.approx(want, rel=1e-5)
        assert metrics["acc:math"] == want["acc:math"]


def test_real_search_costs_and_complete_values(real, tmp_path):
    merger, tok, suite = real
    objective = parse_objective("balanced", list(suite.texts), qa_names=list(suite.qa))
    cfg = SearchConfig(trials=12, sampler="random", storage=":memory:", workdir=tmp_path, top_k=0, search_limit=9,
                       seq_len=16, batch_size=4, pruner="median", fidelities=(3, 9))
    ledger = CostLedger()
    res = run_search(merger, tok, suite, objective, cfg, progress=False,
                     callbacks=[ledger.recorder("live", tokens_evaluated=-1)])
    states = {t.state for t in res.study.trials}
    assert TrialState.COMPLETE in states
    tokens = {r: TrialScorer(merger, tok, suite, [objective], seq_len=16).eval_tokens(r) for r in (3, 9)}
    for t in res.study.trials:
        reached = max(t.intermediate_values)
        assert t.user_attrs["docs_evaluated"] == {3: 3 * 3, 9: 9 * 2 + 7}[reached]  # each item scored once
        assert t.user_attrs["tokens_evaluated"] == tokens[reached]
    charged = [t.user_attrs["tokens_evaluated"] for t in res.study.trials]
    assert [e.tokens_evaluated for e in ledger_from_study(res.study, "m", tokens_evaluated=-1)] == charged
    assert [e.tokens_evaluated for e in ledger.of("live")] == charged  # the live recorder too, not a flat rate
    assert len(set(charged)) == 2  # some trials were pruned at the first rung, some ran to the end
    best = res.study.trials[res.best_trial]
    merger.set_weights(best.params)
    want = evaluate_suite(merger.model, tok, suite, limit=9, seq_len=16, batch_size=4)
    assert best.user_attrs["metrics@9"] == pytest.approx(want, rel=1e-5)
    assert best.user_attrs["metrics@3"] == evaluate_suite(merger.model, tok, suite, limit=3, seq_len=16, batch_size=4)


@pytest.fixture
def cli_pool(tmp_path, tiny_pool):
    from optimer_lib.checkpoints.vectors import extract_vector, save_vector

    base, (t0,) = tiny_pool("llama", 1)
    save_vector(extract_vector(base, t0, name="v"), tmp_path / "v.safetensors")
    corpus = tmp_path / "notes.txt"
    corpus.write_text("\n\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(30)))
    return ["search", "--base", str(base), "--vector", str(tmp_path / "v.safetensors"), "--eval",
            f"notes={corpus}", "--objective", "loss:notes", "--workdir", str(tmp_path / "run"), "--top-k", "0"]


@pytest.mark.parametrize("extra, message", [
    (["--pruner", "median", "--fidelities", "10,x,100"], "bad --fidelities '10,x,100'"),
    (["--pruner", "median", "--fidelities", "10,30"], "fidelities must end at the search limit 100"),
    (["--pruner", "anneal"], "unknown pruner 'anneal'"),
    (["--fidelities", "10,100"], "need a pruner"),
    (["--pruner", "median", "--objectives", "loss:notes", "ppl:notes"], "not a Pareto search"),
])
def test_cli_bad_pruning_flags_give_one_line_errors(cli_pool, capsys, extra, message):
    args = [a for a in cli_pool if a not in ("--objective", "loss:notes")] if "--objectives" in extra else cli_pool
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in err.partition("error: ")[2], err


def test_cli_pruned_search(cli_pool, capsys, tmp_path):
    assert main([*cli_pool, "--pruner", "asha", "--fidelities", "3,9", "--search-limit", "9", "--trials", "8",
                 "--sampler", "random"]) == 0
    out = json.loads(capsys.readouterr().out)
    study = optuna.load_study(study_name="optimer", storage=f"sqlite:///{tmp_path / 'run' / 'optuna.db'}")
    assert len(study.trials) == 8 and {max(t.intermediate_values) for t in study.trials} <= {3, 9}
    assert any(t.state == TrialState.PRUNED for t in study.trials)
    assert study.trials[json.loads((tmp_path / "run" / "best.json").read_text())["trial"]].state == \
        TrialState.COMPLETE
    assert set(out) >= {"best_weights", "objective"}
