"""The weight gradient (dL/dα against finite differences), projected descent, and the ``grad`` sampler."""

from __future__ import annotations

import copy
import math

import optuna
import pytest
import torch
from conftest import make_model, perturbed
from helpers import FakeMerger

import optimer_lib.search.gradient as gradient_mod
from optimer_lib.checkpoints.vectors import extract_vector
from optimer_lib.errors import ConfigError
from optimer_lib.merging.resident import ResidentMerger
from optimer_lib.scoring.evaluate import EvalSuite
from optimer_lib.scoring.objectives import Objective
from optimer_lib.search.gradient import (
    WARM_START_ATTR,
    GradientTPESampler,
    default_start,
    objective_gradient,
    projected_descent,
)
from optimer_lib.search.samplers import SAMPLERS
from optimer_lib.search.study import SearchConfig, run_search

optuna.logging.set_verbosity(optuna.logging.WARNING)
NAMES = ("ja", "zh", "good")
# Documents of different lengths: several batches of 2 with right padding, as mean_token_loss scores them.
SUITE = EvalSuite(
    texts={"en": [f"the quick brown fox {i} jumps over the lazy dog" + " again" * (i % 4) for i in range(7)],
           "code": ["def f(x):\n    return x", "def g(y):\n    return y + 1", "12 + 35 = 47"]},
    qa={"math": [("12 + 35 =", "47")]})
MIXED = Objective(terms={"loss:en": 1.0, "ppl:code": 0.5, "acc:math": 2.0})
KW = {"limit": None, "seq_len": 32, "batch_size": 2}


def _descent_vector(base, tokenizer, scale: float):
    """A copy of ``base`` moved ``scale`` (relative, per tensor) down the gradient of the en loss: a 'CPT'
    that helps, so the objective has a clear interior optimum along its weight."""
    tuned = copy.deepcopy(base)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:31] for t in SUITE.texts["en"]]
    loss = sum(torch.nn.functional.cross_entropy(tuned(input_ids=torch.tensor([[1, *s]])).logits[0, :-1],
                                                 torch.tensor(s)) for s in ids)
    params = [p for p in tuned.parameters() if p.is_floating_point()]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            if g is not None:
                p.sub_(scale * g * p.norm() / (g.norm() + 1e-30))
    return tuned


def _merger(arch: str, tokenizer, dtype: torch.dtype = torch.float64) -> ResidentMerger:
    base = make_model(arch).to(dtype)
    tuned = [perturbed(base, 0.05, 10 + i) for i in range(2)] + [_descent_vector(base, tokenizer, 0.3)]
    vecs = [extract_vector(base, t, name=n) for n, t in zip(NAMES, tuned, strict=True)]
    return ResidentMerger(base, vecs)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "llama_untied"])
def test_gradient_matches_central_differences(arch, tiny_tokenizer):
    merger = _merger(arch, tiny_tokenizer)
    at = {"ja": 0.3, "zh": -0.2, "good": 0.6}
    g = objective_gradient(merger, tiny_tokenizer, SUITE, MIXED, at, **KW)
    assert g.dropped == ("acc:math",) and g.weights == at and merger.weights == at
    # acc is left out of the value, but its weight stays in the normaliser sum |w| = 3.5
    assert g.value == pytest.approx((g.metrics["loss:en"] + 0.5 * g.metrics["ppl:code"]) / 3.5, rel=1e-12)
    # Fourth-order central differences. h is not tiny: the merger accumulates merges in fp32 (even for fp64
    # parameters), so parameters carry ~1e-8 rounding, which swamps small steps; here both errors are ~1e-5.
    h = 8e-3
    for n in NAMES:
        def f(d: float, n: str = n) -> float:
            return objective_gradient(merger, tiny_tokenizer, SUITE, MIXED, {**at, n: at[n] + d}, **KW).value

        fd = (8 * (f(h) - f(-h)) - (f(2 * h) - f(-2 * h))) / (12 * h)
        assert abs(fd) > 1e-2, "a vector that does not move the objective tests nothing"
        assert g.grad[n] == pytest.approx(fd, rel=1e-4), (n, g.grad[n], fd)
    # per-set derivatives combine by the chain rule, ppl = exp(loss)
    ppl = g.metrics["ppl:code"]
    for n in NAMES:
        combined = (g.loss_grads["loss:en"][n] + 0.5 * ppl * g.loss_grads["loss:code"][n]) / 3.5
        assert g.grad[n] == pytest.approx(combined, rel=1e-12)


def test_value_is_mean_token_loss_and_model_is_left_as_found(tiny_tokenizer, monkeypatch):
    merger = _merger("llama", tiny_tokenizer, torch.float32)
    model = merger.model
    params = list(model.parameters())
    params[3].requires_grad_(False)
    marker = torch.ones_like(params[5])
    params[5].grad = marker
    obj = Objective(terms={"loss:en": 1.0, "ppl:code": 0.5})
    at = {"ja": 0.1, "zh": 0.2, "good": 0.3}
    g = objective_gradient(merger, tiny_tokenizer, SUITE, obj, at, seq_len=32, batch_size=3, limit=5)
    value, metrics = obj.evaluate(model, tiny_tokenizer, SUITE, limit=5, seq_len=32, batch_size=3)
    assert g.value == pytest.approx(value, rel=1e-6)
    assert g.metrics["loss:en"] == pytest.approx(metrics["loss:en"], rel=1e-6)
    assert [p.requires_grad for p in params] == [i != 3 for i in range(len(params))]
    assert params[5].grad is marker and all(p.grad is None for i, p in enumerate(params) if i != 5)
    # dot products split into chunks (as for huge tensors) give the same derivatives
    monkeypatch.setattr(gradient_mod, "_DOT_CHUNK", 7)
    chunked = objective_gradient(merger, tiny_tokenizer, SUITE, obj, at, seq_len=32, batch_size=3, limit=5)
    assert chunked.grad == pytest.approx(g.grad, rel=1e-5) and chunked.value == g.value
    # the parameters hold exactly the merge at `at` (nothing was stepped or left behind)
    fresh = _merger("llama", tiny_tokenizer, torch.float32)
    fresh.set_weights(at)
    assert all(torch.equal(a, b) for a, b in zip(params, fresh.model.parameters(), strict=True))


def test_projected_steps_stay_in_bounds(tiny_tokenizer):
    merger = _merger("gpt2", tiny_tokenizer)
    bounds = {"ja": (0.0, 0.3), "zh": (-0.2, 0.1), "good": (0.0, 0.4)}
    seen = []
    for optimizer, lr in (("adam", 0.7), ("sgd", 1e3)):  # steps far larger than the box
        path = projected_descent(merger, tiny_tokenizer, SUITE, MIXED, bounds, steps=3, lr=lr, optimizer=optimizer,
                                 start={"ja": 0.25, "zh": 0.05, "good": 0.1}, callback=seen.append, **KW)
        assert path[0].weights == {"ja": 0.25, "zh": 0.05, "good": 0.1}
        for p in path:
            assert all(lo <= p.weights[n] <= hi for n, (lo, hi) in bounds.items()), (optimizer, p.weights)
        assert any(p.weights[n] in bounds[n] for p in path[1:] for n in NAMES), "no step reached a bound"
        assert path[-1].value is None or len(path) <= 3
    assert len(seen) >= 2 and all(p.value is not None for p in seen)
    assert default_start(bounds) == {"ja": 0.3, "zh": 0.1, "good": 1 / 3}


def test_descent_improves_and_grad_search_beats_its_start(tiny_tokenizer, tmp_path):
    merger = _merger("llama", tiny_tokenizer)
    obj = Objective(terms={"loss:en": 1.0, "loss:code": 0.2})
    bounds = dict.fromkeys(NAMES, (0.0, 1.0))
    path = projected_descent(merger, tiny_tokenizer, SUITE, obj, bounds, steps=4, **KW)
    values = [p.value for p in path if p.value is not None]
    assert min(values) < values[0] - 1e-3 and path[-2].weights["good"] > path[0].weights["good"]

    cfg = SearchConfig(trials=7, sampler="grad", storage=f"sqlite:///{tmp_path / 's.db'}", top_k=0,
                       search_limit=None, seq_len=32, batch_size=2, workdir=tmp_path, record_metrics="needed")
    res = run_search(merger, tiny_tokenizer, SUITE, obj, cfg, progress=False)
    trials = sorted(res.study.trials, key=lambda t: t.number)
    steps = [t.user_attrs.get("grad_step") for t in trials]
    assert steps[:3] == [0, 1, 2] and steps[-1] is None  # gradient points first, then TPE
    assert trials[0].params == pytest.approx(default_start(bounds))
    # trials score the same objective the descent followed (no acc terms here): same values
    assert trials[1].value == pytest.approx(trials[1].user_attrs["grad_value"], rel=1e-6)
    assert res.best_value < trials[0].value - 1e-3
    info = res.study.user_attrs[WARM_START_ATTR]
    assert info["evaluations"] == 2 and info["enqueued"] == 3  # default_steps(7) = 2, plus the final point
    # resuming does not run the descent again or enqueue more
    res2 = run_search(merger, tiny_tokenizer, SUITE, obj, SearchConfig(**{**cfg.__dict__, "trials": 9}),
                      progress=False)
    assert len(res2.study.trials) == 9
    assert sum("grad_step" in t.user_attrs for t in res2.study.trials) == 3


@pytest.mark.parametrize("objective, merger_kind, match", [
    (Objective(terms={"acc:math": 1.0}), "real", "no differentiable term"),
    (Objective(terms={"loss:en": 0.0, "acc:math": 1.0}), "real", "no differentiable term"),
    (Objective(fn=lambda model, tokenizer: 0.0), "real", "callable"),
    (Objective(terms={"loss:en": 1.0}), "fake", "resident merger"),
    (Objective(terms={"loss:en": 1.0}), "ties", "not linear"),
])
def test_grad_sampler_refuses_what_it_cannot_differentiate(objective, merger_kind, match, tiny_tokenizer, tmp_path):
    merger = FakeMerger(["a"]) if merger_kind == "fake" else _merger("llama", tiny_tokenizer, torch.float32)
    if merger_kind == "ties":
        merger.method, merger.params = "ties", {"density": 0.5}
    cfg = SearchConfig(trials=3, sampler="grad", storage=":memory:", top_k=0, workdir=tmp_path)
    with pytest.raises(ConfigError, match=match):
        run_search(merger, tiny_tokenizer, SUITE, objective, cfg, progress=False)


def test_grad_sampler_elsewhere_and_bad_settings(tiny_tokenizer, tmp_path):
    merger = _merger("llama", tiny_tokenizer, torch.float32)
    obj = Objective(terms={"loss:en": 1.0})
    with pytest.raises(ConfigError, match="maximize|minimi"):
        run_search(merger, tiny_tokenizer, SUITE, obj, SearchConfig(trials=2, sampler="grad", storage=":memory:",
                   top_k=0, workdir=tmp_path, direction="maximize"), progress=False)
    study = optuna.create_study(sampler=SAMPLERS["grad"](0, {"ja": (0.0, 1.0)}, 10))
    assert isinstance(study.sampler, GradientTPESampler)
    with pytest.raises(ConfigError, match="--sampler tpe"):  # another search loop: no silent plain TPE
        study.ask()
    bounds = dict.fromkeys(NAMES, (0.0, 1.0))
    for kw, match in (({"steps": 0}, "steps"), ({"lr": -1.0}, "lr"), ({"optimizer": "lbfgs"}, "adam"),
                      ({"start": {"ja": 0.1}}, "start")):
        with pytest.raises(ConfigError, match=match):
            projected_descent(merger, tiny_tokenizer, SUITE, obj, bounds, **kw)
    with pytest.raises(ConfigError, match="lacks"):
        objective_gradient(merger, tiny_tokenizer, EvalSuite(texts={"code": ["x = 1"]}), obj)
    assert not math.isnan(objective_gradient(merger, tiny_tokenizer, SUITE, obj, limit=2).value)
