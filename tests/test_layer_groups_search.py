"""Per-layer-group weights in searches: parameters, best.json, the per-group gradient, the grad sampler, rerank."""

from __future__ import annotations

import json

import optuna
import pytest
import torch
from test_gradient import KW, SUITE, _merger

from optimer_lib.errors import ConfigError
from optimer_lib.merging.methods import merge_state_dict
from optimer_lib.merging.recipes import check_recipe, load_recipe
from optimer_lib.scoring.objectives import Objective
from optimer_lib.search import record
from optimer_lib.search.gradient import objective_gradient, projected_descent
from optimer_lib.search.rerank import rerank
from optimer_lib.search.study import SearchConfig, run_search

optuna.logging.set_verbosity(optuna.logging.WARNING)
LAYOUT = ["embed", "blocks0-0", "blocks1-1", "head"]
SKW = {"search_limit": None, "seq_len": 32, "batch_size": 2}
LOSS = Objective(terms={"loss:en": 1.0, "ppl:code": 0.5})


def test_per_group_gradient_matches_finite_differences(tiny_tokenizer):
    merger = _merger("llama", tiny_tokenizer)  # float64, vectors ja, zh, good
    at = {f"{n}@{g}": w for n, w0 in (("ja", 0.3), ("zh", -0.2), ("good", 0.6))
          for g, w in zip(LAYOUT, (w0, w0 + 0.1, w0 - 0.1, w0 + 0.05), strict=True)}
    g = objective_gradient(merger, tiny_tokenizer, SUITE, LOSS, at, **KW)
    assert set(g.grad) == set(at) and g.weights == pytest.approx(at)
    h = 8e-3
    for key in ("good@embed", "good@blocks1-1", "ja@head", "zh@blocks0-0"):
        def f(d: float, key: str = key) -> float:
            return objective_gradient(merger, tiny_tokenizer, SUITE, LOSS, {**at, key: at[key] + d}, **KW).value

        fd = (8 * (f(h) - f(-h)) - (f(2 * h) - f(-2 * h))) / (12 * h)
        assert abs(fd) > 1e-3, f"{key} does not move the objective: it tests nothing"
        assert g.grad[key] == pytest.approx(fd, rel=2e-3, abs=1e-6), key
    # the groups partition the model: per-group partials sum to the per-vector one at a uniform point
    flat = {"ja": 0.3, "zh": -0.2, "good": 0.6}
    whole = objective_gradient(merger, tiny_tokenizer, SUITE, LOSS, flat, **KW)
    split = objective_gradient(merger, tiny_tokenizer, SUITE, LOSS, flat, layout=LAYOUT, **KW)
    for n in flat:
        assert sum(split.grad[f"{n}@{grp}"] for grp in LAYOUT) == pytest.approx(whole.grad[n], rel=1e-9)


def test_projected_descent_per_group(tiny_tokenizer):
    merger = _merger("llama", tiny_tokenizer, torch.float32)
    bounds = {f"{n}@{g}": (0.0, 1.0) for n in ("ja", "zh", "good") for g in ("embed", "blocks0-1", "head")}
    path = projected_descent(merger, tiny_tokenizer, SUITE, LOSS, bounds, steps=2, lr=0.2, **KW)
    assert path[0].weights == dict.fromkeys(bounds, pytest.approx(1 / 3))  # 1/K per vector, not per group
    assert set(path[0].grad) == set(bounds) and path[1].value <= path[0].value + 1e-9


def test_search_with_layer_groups_records_params(tiny_tokenizer, tmp_path):
    merger = _merger("llama", tiny_tokenizer, torch.float32)
    cfg = SearchConfig(trials=4, sampler="random", storage=f"sqlite:///{tmp_path / 's.db'}", top_k=0,
                       workdir=tmp_path, granularity="layer-groups:2", bounds={"ja": (0.0, 0.5)}, **SKW)
    res = run_search(merger, tiny_tokenizer, SUITE, LOSS, cfg, progress=False)
    keys = [f"{n}@{g}" for n in ("ja", "zh", "good") for g in LAYOUT]
    assert all(sorted(t.params) == sorted(keys) for t in res.study.trials)
    assert all(t.params[k] <= 0.5 for t in res.study.trials for k in keys[:4])  # ja's bounds hold per group
    assert res.study.user_attrs[record.GRANULARITY] == "layer-groups:2"
    best = json.loads(res.path.read_text())
    assert best["granularity"] == "layer-groups:2" and best["groups"] == LAYOUT
    assert sorted(best["weights"]) == sorted(keys)
    assert best["group_weights"]["zh"]["blocks1-1"] == best["weights"]["zh@blocks1-1"]
    # the merger holds the best per-group merge; the recipe loads and merges to the same tensors
    recipe = load_recipe(res.path)
    check_recipe(recipe, ["ja", "zh", "good"])
    assert recipe.weights == best["weights"]
    want = merge_state_dict(merger._targets and {t.name: t.base for t in merger._targets}, merger._vectors,
                            recipe.weights)
    for t in merger._targets:
        assert torch.allclose(t.param, want[t.name], atol=1e-6), t.name
    with pytest.raises(ConfigError, match="granularity"):  # a resumed study keeps its layout
        run_search(merger, tiny_tokenizer, SUITE, LOSS, SearchConfig(**{**cfg.__dict__, "granularity": "vector"}),
                   progress=False)
    with pytest.raises(ConfigError, match="layer-groups:G"):
        run_search(merger, tiny_tokenizer, SUITE, LOSS, SearchConfig(**{**cfg.__dict__, "granularity": "layers"}),
                   progress=False)
    ranked = rerank(res.study, "loss:en")
    assert sorted(ranked.best_weights) == sorted(keys)
    t = res.study.trials[ranked.best.number]
    assert ranked.best_value == pytest.approx(t.user_attrs[record.metrics_key(None)]["loss:en"])


def test_grad_sampler_with_layer_groups(tiny_tokenizer, tmp_path):
    merger = _merger("llama", tiny_tokenizer, torch.float32)
    cfg = SearchConfig(trials=4, sampler="grad", storage=":memory:", top_k=0, workdir=tmp_path,
                       granularity="layer-groups:1", **SKW)
    res = run_search(merger, tiny_tokenizer, SUITE, LOSS, cfg, progress=False)
    first = res.study.trials[0]
    assert first.user_attrs[record.GRAD_STEP] == 0
    assert first.params == {f"{n}@{g}": pytest.approx(1 / 3) for n in ("ja", "zh", "good")
                            for g in ("embed", "blocks0-1", "head")}
    stepped = res.study.trials[1].params
    assert len(set(round(v, 9) for v in stepped.values())) > 1  # the groups moved apart
