"""Analyses on tiny random models: cosine, linearity, landscape, search comparison, ratios, re-optimisation."""

from __future__ import annotations

import copy

import optuna
import pytest
import torch
from conftest import make_model, perturbed

from optimer_lib.checkpoints.vectors import DistributionVector, extract_vector
from optimer_lib.errors import ConfigError
from optimer_lib.experiments.analysis import (
    alpha_to_ratios,
    compare_searches,
    landscape_grid,
    linearity,
    pairwise_cosine,
    ratio_conversions,
    reoptimise,
    trajectory_checkpoints,
    trials_to_reach,
)
from optimer_lib.merging.resident import ResidentMerger
from optimer_lib.scoring.evaluate import EvalSuite
from optimer_lib.scoring.objectives import parse_objective
from optimer_lib.search.study import SearchConfig
from optimer_lib.training.train import TrainConfig, train_cpt

optuna.logging.set_verbosity(optuna.logging.WARNING)
SUITE = EvalSuite(texts={"en": ["the quick brown fox jumps", "the lazy dog"], "code": ["def f(x):\n    return x"]},
                  qa={"math": [("12 + 35 =", "47")]})


def _vec(name, **tensors):
    return DistributionVector(name=name, tensors={k: torch.tensor(v, dtype=torch.float32) for k, v in tensors.items()})


def test_pairwise_cosine():
    out = pairwise_cosine([_vec("a", w=[1.0, 0.0]), _vec("b", w=[0.0, 2.0]), _vec("c", w=[1.0, 1.0])])
    assert out["names"] == ["a", "b", "c"]
    assert out["matrix"][0][1] == pytest.approx(0.0) and out["matrix"][0][2] == pytest.approx(2 ** -0.5)
    assert out["off_diagonal"]["max"] == pytest.approx(2 ** -0.5) and out["off_diagonal"]["min"] == pytest.approx(0)
    assert out["norms"]["b"] == pytest.approx(2.0)


def _shifted(model, direction: dict, t: float, noise: float = 0.0, seed: int = 0):
    new = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in new.state_dict().items():
            if k in direction:
                p.add_(direction[k] * t + torch.randn(p.shape, generator=g) * noise)
    return new


@pytest.mark.parametrize("as_dirs", [False, True])
def test_linearity_exact_line_recovers_t(tmp_path, tiny_tokenizer, as_dirs):
    base = make_model("llama")
    tau = extract_vector(base, perturbed(base, 0.05, seed=1), name="x")
    ts = [0.2, 0.5, 0.8]
    ckpts = [_shifted(base, tau.tensors, t) for t in ts]
    srcs = [c.state_dict() for c in ckpts]
    base_src = base
    if as_dirs:  # exercise the lazy safetensors reader
        srcs = []
        for i, c in enumerate(ckpts):
            c.save_pretrained(tmp_path / f"c{i}")
            srcs.append(tmp_path / f"c{i}")
        base.save_pretrained(tmp_path / "base")
        base_src = tmp_path / "base"
    rows = linearity(base_src, srcs, tau, fractions=ts)
    for r, t in zip(rows, ts, strict=True):
        assert r["t"] == pytest.approx(t, abs=1e-5)
        assert r["residual"] < 1e-3 and r["cosine"] == pytest.approx(1.0, abs=1e-6)
        assert r["fraction"] == t and r["norm_ratio"] == pytest.approx(t, abs=1e-5)


def test_linearity_non_linear_trajectory():
    base = make_model("llama")
    tau = extract_vector(base, perturbed(base, 0.05, seed=1), name="x")
    # a detour: half-way point pushed off the line by noise as large as the shift itself
    off = _shifted(base, tau.tensors, 0.5, noise=0.025, seed=7)
    final = _shifted(base, tau.tensors, 1.0)
    rows = linearity(base, [off.state_dict()], final.state_dict())  # tau given as the final checkpoint
    r = rows[0]
    assert r["residual"] > 0.5 and r["cosine"] < 0.9
    assert r["t"] == pytest.approx(0.5, abs=0.1)  # the noise is ~orthogonal to tau


def test_trajectory_checkpoints_of_a_real_run(tmp_path, tiny_pool):
    base, _ = tiny_pool("llama", 1)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(80)))
    run = tmp_path / "run"
    train_cpt(base, str(corpus), run, TrainConfig(tokens=4 * 4 * 16, batch_size=4, seq_len=16, lr=0.01,
                                                  device="cpu", trajectory=2), progress=False)
    steps = trajectory_checkpoints(run)
    assert [f for f, _ in steps] == [0.5, 1.0] and steps[-1][1] == run
    rows = linearity(base, [p for _, p in steps], run, fractions=[f for f, _ in steps])
    assert rows[-1]["t"] == pytest.approx(1.0) and rows[-1]["residual"] < 1e-6
    assert 0 < rows[0]["t"] < 1.2 and 0 < rows[0]["cosine"] <= 1


@pytest.fixture
def merger():
    base = make_model("llama")
    vecs = [extract_vector(base, perturbed(base, 0.05, seed=10 + i), name=n) for i, n in enumerate(["a", "b", "c"])]
    return ResidentMerger(base, vecs)


def test_landscape_grid_matches_direct_evaluation(merger, tiny_tokenizer):
    obj = parse_objective("balanced", list(SUITE.texts), qa_names=list(SUITE.qa))
    fixed = {"a": 0.1, "b": 0.2, "c": 0.3}
    out = landscape_grid(merger, tiny_tokenizer, SUITE, obj, "a", "c", fixed=fixed, points=3, limit=None)
    assert out["xs"] == [0.0, 0.5, 1.0] and out["ys"] == out["xs"]
    assert len(out["z"]) == 3 and all(len(r) == 3 for r in out["z"]) and out["evals"] == 9
    for i, vy in enumerate(out["ys"]):
        for j, vx in enumerate(out["xs"]):
            merger.set_weights({"a": vx, "b": 0.2, "c": vy})
            assert out["z"][i][j] == pytest.approx(obj.evaluate(merger.model, tiny_tokenizer, SUITE)[0], rel=1e-6)
    assert out["best"] == min(v for r in out["z"] for v in r) and 0 < out["share_within"] <= 1
    with pytest.raises(ConfigError, match="two different vectors"):
        landscape_grid(merger, tiny_tokenizer, SUITE, obj, "a", "a", fixed=fixed)


def test_trials_to_reach_and_compare():
    assert trials_to_reach([5.0, None, 3.0, 4.0, 1.0], 3.0) == 3
    assert trials_to_reach([5.0, 4.0], 1.0) is None
    out = compare_searches({"grid": [5.0, 4.0, 3.0, 2.5], "tpe": [4.0, 2.005, 1.99]}, within=0.01)
    assert out["best"] == 1.99 and out["target"] == pytest.approx(1.99 * 1.01)
    assert out["runs"]["tpe"]["trials_to_reach"] == 2 and out["runs"]["grid"]["trials_to_reach"] is None


def test_alpha_to_ratios():
    alpha = {"ja": 0.3, "zh": 0.1, "math": 0.0}
    assert alpha_to_ratios(alpha) == pytest.approx({"ja": 0.75, "zh": 0.25, "math": 0.0})
    tokens = {"ja": 100.0, "zh": 300.0, "math": 50.0}
    assert alpha_to_ratios(alpha, tokens) == pytest.approx({"ja": 0.5, "zh": 0.5, "math": 0.0})
    conv = ratio_conversions(alpha, tokens)
    assert conv["effective_total"] == pytest.approx(60.0) and conv["effective_tokens"]["ja"] == pytest.approx(30.0)
    equal = ratio_conversions(alpha, dict.fromkeys(alpha, 7.0))
    assert equal["normalised"] == pytest.approx(equal["token_weighted"])  # equal runs: both forms agree
    with pytest.raises(ConfigError, match="all weights are zero"):
        alpha_to_ratios({"ja": 0.0, "zh": -1.0})


def test_reoptimise_evaluates_every_distribution(merger, tiny_tokenizer, tmp_path):
    names, qa = list(SUITE.texts), list(SUITE.qa)
    objs = {"en": parse_objective("en", names, qa_names=qa), "code": parse_objective("code", names, qa_names=qa)}
    cfg = SearchConfig(trials=3, storage=":memory:", workdir=tmp_path, top_k=0, search_limit=None)
    out = reoptimise(merger, tiny_tokenizer, SUITE, objs, cfg, eval_suites={"dev": SUITE, "test": SUITE})
    assert set(out) == {"en", "code"}
    for entry in out.values():
        assert set(entry["weights"]) == {"a", "b", "c"}
        assert {"loss:en", "loss:code", "acc:math"} <= set(entry["dev"]) and entry["test"] == entry["dev"]
        assert set(entry["dev_objectives"]) == {"en", "code"}
    assert (tmp_path / "en" / "best.json").is_file() and (tmp_path / "code" / "best.json").is_file()
    # each search's own objective value is reproduced by scoring its weights
    merger.set_weights(out["en"]["weights"])
    assert out["en"]["dev_objectives"]["en"] == pytest.approx(objs["en"].evaluate(merger.model, tiny_tokenizer,
                                                                                   SUITE)[0], rel=1e-6)
