"""Baselines on tiny random models: budgets, mixture CPT and mixture search, merge baselines."""

from __future__ import annotations

import json

import optuna
import pytest
from conftest import make_model, perturbed

from optimer_lib.checkpoints.vectors import extract_vector
from optimer_lib.errors import ConfigError
from optimer_lib.experiments.baselines import (
    BASELINES,
    MethodMerger,
    MixtureSearchConfig,
    apply_choice,
    mixture_budget,
    normalised_ratios,
    run_mixture_search,
    search_baseline,
    train_mixture,
)
from optimer_lib.experiments.costs import CostLedger
from optimer_lib.merging.resident import ResidentMerger
from optimer_lib.scoring.evaluate import EvalSuite
from optimer_lib.scoring.objectives import parse_objective
from optimer_lib.search.study import SearchConfig
from optimer_lib.training.train import TrainConfig

optuna.logging.set_verbosity(optuna.logging.WARNING)
TINY = {"batch_size": 4, "seq_len": 16, "lr": 0.01, "device": "cpu"}


def test_budget_modes():
    assert mixture_budget("equal_total", 400, 4, 3) == (1600, 4800)
    assert mixture_budget("per_run", 400, 4, 3) == (400, 1200)
    with pytest.raises(ConfigError, match="equal_total, per_run"):
        mixture_budget("nope", 1, 1, 1)
    assert normalised_ratios({"a": 0.2, "b": 0.6}) == pytest.approx({"a": 0.25, "b": 0.75})
    assert normalised_ratios({"a": 0.0, "b": 0.0}) == {"a": 0.5, "b": 0.5}


@pytest.fixture
def corpora(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(60)))
    b.write_text("\n\n".join(f"def f{i}(x):\n    return x + {i}" for i in range(60)))
    return {"a": str(a), "b": str(b)}


def test_train_mixture_records_cost(tmp_path, tiny_pool, corpora):
    base, _ = tiny_pool("llama", 0)
    led = CostLedger()
    res = train_mixture(base, {"a": 1, "b": 3}, tmp_path / "mix", TrainConfig(tokens=4 * 4 * 16, **TINY),
                        data=corpora, ledger=led, progress=False)
    info = json.loads((tmp_path / "mix" / "training.json").read_text())
    assert info["ratios"] == {corpora["a"]: 0.25, corpora["b"]: 0.75}
    (entry,) = led.of("mixture")
    assert entry.tokens_trained == res.tokens == 256 and entry.kind == "train" and entry.seconds > 0


def test_mixture_search_respects_budget_and_resumes(tmp_path, tiny_pool, corpora):
    base, _ = tiny_pool("llama", 0)
    suite = EvalSuite(texts={"a": ["the quick brown fox"], "b": ["def f(x):\n    return x"]})
    obj = parse_objective("balanced", ["a", "b"])
    per = 2 * 4 * 16
    cfg = MixtureSearchConfig(tokens_per_candidate=per, budget_tokens=int(2.5 * per), train=TrainConfig(**TINY),
                              sampler="random", workdir=tmp_path / "ms", search_limit=None)
    led = CostLedger()
    res = run_mixture_search(base, ["a", "b"], suite, obj, cfg, data=corpora, ledger=led)
    assert res.trials == 2 and res.tokens_trained == 2 * per <= cfg.budget_tokens
    first = res.study.trials[0]
    assert first.user_attrs["ratios"] == {"a": 0.5, "b": 0.5}  # the uniform mixture is tried first
    for t in res.study.trials:
        assert sum(t.user_attrs["ratios"].values()) == pytest.approx(1.0)
    assert res.best_dir.is_dir() and res.best_value == min(t.value for t in res.study.trials)
    kept = sorted(p.name for p in (tmp_path / "ms").glob("cand-*"))
    assert set(kept) == {"cand-000", res.best_dir.name}
    entries = led.of("mixture")
    assert [e.tokens_trained for e in entries] == [per, per] and all(e.tokens_evaluated > 0 for e in entries)
    assert [e.objective for e in entries] == pytest.approx([t.value for t in res.study.trials])
    # a larger budget resumes the same study instead of starting over
    cfg.budget_tokens = 3 * per
    res = run_mixture_search(base, ["a", "b"], suite, obj, cfg, data=corpora)
    assert res.trials == 3 and res.tokens_trained == 3 * per
    with pytest.raises(ConfigError, match="less than one candidate"):
        run_mixture_search(base, ["a", "b"], suite, obj, MixtureSearchConfig(
            tokens_per_candidate=per, budget_tokens=per - 1, train=TrainConfig(**TINY), workdir=tmp_path / "x"),
            data=corpora)


@pytest.fixture
def merger():
    base = make_model("llama")
    vecs = [extract_vector(base, perturbed(base, 0.05, seed=20 + i), name=n) for i, n in enumerate(["x", "y", "z"])]
    return ResidentMerger(base, vecs)


def test_method_merger_maps_searched_values(merger):
    with MethodMerger(merger, "optimer", weights="shared") as mm:
        assert mm.names == ["lambda"] and mm.bounds() == {"lambda": (0.0, 1.0)}
        mm.set_weights({"lambda": 0.4})
        assert merger.weights == {"x": 0.4, "y": 0.4, "z": 0.4}
    with MethodMerger(merger, "ties", weights="ones", search_params={"density": (0.1, 1.0)}) as mm:
        assert mm.names == ["density"]
        mm.set_weights({"density": 0.5})
        assert merger.method == "ties" and merger.params == {"density": 0.5}
        assert merger.weights == {"x": 1.0, "y": 1.0, "z": 1.0}
    assert merger.method == "optimer" and merger.params == {}
    with pytest.raises(ConfigError):
        MethodMerger(merger, weights="bogus").split({})


SUITE = EvalSuite(texts={"en": ["the quick brown fox jumps", "the lazy dog"], "code": ["def f(x):\n    return x"]})


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_every_merge_baseline(name, merger, tiny_tokenizer, tmp_path):
    obj = parse_objective("balanced", list(SUITE.texts))
    led = CostLedger()
    cfg = SearchConfig(trials=3, storage=":memory:", workdir=tmp_path, top_k=0, search_limit=None)
    out = search_baseline(merger, tiny_tokenizer, SUITE, obj, name, cfg, ledger=led)
    choice, w = out["choice"], out["choice"]["weights"]
    assert merger.method == "optimer" and merger.params == {}  # restored
    assert choice["method"] == BASELINES[name]["method"] and set(w) == {"x", "y", "z"}
    if name == "uniform":
        assert w == pytest.approx(dict.fromkeys("xyz", 1 / 3)) and out["trials"] == 1
    if name == "task_arithmetic":
        assert len(set(w.values())) == 1 and 0 <= w["x"] <= 1
    if name == "ties":
        assert w == dict.fromkeys("xyz", 1.0) and 0.1 <= choice["params"]["density"] <= 1
    if name == "dare":
        assert choice["params"]["seed"] == 0 and len(set(w.values())) == 3
    assert len(led.of(name)) == out["trials"] and all(e.tokens_evaluated > 0 for e in led.of(name))
    apply_choice(merger, choice)
    assert obj.evaluate(merger.model, tiny_tokenizer, SUITE)[0] == pytest.approx(out["objective"], rel=1e-6)
    with pytest.raises(ConfigError, match="unknown baseline"):
        search_baseline(merger, tiny_tokenizer, SUITE, obj, "nope", cfg)
