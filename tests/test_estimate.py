"""The instant estimate: exact recovery of quadratics, graceful fallbacks, the hit-rate tracker, and speed."""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import make_model, perturbed
from test_evaluate import DOCS

from optimer_lib.errors import ConfigError
from optimer_lib.scoring.estimate import ScoreEstimator, n_terms
from optimer_lib.scoring.evaluate import EvalSuite, score_suite
from optimer_lib.scoring.objectives import parse_objective
from optimer_lib.scoring.uncertainty import OBJECTIVE, Interval, bootstrap

NAMES = ["ja", "zh", "code"]


def known_quadratic(a: np.ndarray) -> float:
    """3.0 − α_ja + 0.5 α_zh + 2 α_code + 1.5 α_ja² + 0.7 α_zh² + 3 α_code² − 0.8 α_ja α_zh + 0.4 α_zh α_code."""
    ja, zh, code = a
    return (3.0 - ja + 0.5 * zh + 2 * code + 1.5 * ja**2 + 0.7 * zh**2 + 3 * code**2
            - 0.8 * ja * zh + 0.4 * zh * code)


def points(n: int, seed: int = 0) -> list[np.ndarray]:
    return list(np.random.default_rng(seed).uniform(0, 1, (n, len(NAMES))))


def w(a) -> dict[str, float]:
    return dict(zip(NAMES, map(float, a), strict=True))


@pytest.mark.parametrize("ridge, n, tol", [(None, 20, 1e-5), (0.0, 10, 1e-9)])
def test_recovers_a_known_quadratic(ridge, n, tol):
    # with the default (tiny) ridge from 2× as many points as coefficients; without it from exactly as many (10)
    est = ScoreEstimator(NAMES) if ridge is None else ScoreEstimator(NAMES, ridge=ridge)
    assert n_terms("quadratic", 3) == 10
    for a in points(n):
        est.add(w(a), {"loss:ja": known_quadratic(a), "acc:math": 0.25 + 0.1 * a[0]})
    for a in points(20, seed=1):  # new weights, inside and outside the scored box
        got = est.predict(w(a * 1.5))
        assert got.kind == "quadratic" and got.kinds == {"loss:ja": "quadratic", "acc:math": "quadratic"}
        assert got.values["loss:ja"] == pytest.approx(known_quadratic(a * 1.5), abs=tol)
        assert got.values["acc:math"] == pytest.approx(0.25 + 0.15 * a[0], abs=tol)


def test_fallbacks_with_few_points_say_which():
    est = ScoreEstimator(NAMES)
    none = est.predict({"ja": 0.1})
    assert (none.kind, none.values, none.available, none.n_points) == ("none", {}, False, 0)
    linear = lambda a: 1.0 + 2 * a[0] - a[1] + 0.5 * a[2]  # noqa: E731
    pts = points(10)
    est.add(w(pts[0]), {"loss:ja": linear(pts[0])})
    one = est.predict({"ja": 0.9})
    assert one.kind == "nearest" and one.values["loss:ja"] == pytest.approx(linear(pts[0]))
    est.add(w(pts[1]), {"loss:ja": linear(pts[1])})
    assert est.predict(w(pts[1] + 0.01)).values["loss:ja"] == pytest.approx(linear(pts[1]))  # the nearer one
    est.add(w(pts[1]), {"loss:ja": linear(pts[1])})  # the same weights again are not a new point
    est.add(w(pts[2]), {"loss:ja": linear(pts[2])})
    assert est.predict(w(pts[0])).kind == "nearest"  # 4 points, 3 distinct
    est.add(w(pts[3]), {"loss:ja": linear(pts[3])})  # 4 distinct = 1 + K: linear, exact on a linear function
    got = est.predict({"ja": 2.0, "zh": -1.0})
    assert got.kind == "linear" and got.values["loss:ja"] == pytest.approx(linear([2.0, -1.0, 0.0]), abs=1e-5)
    for a in pts[4:7]:
        est.add(w(a), {"loss:ja": linear(a)})
    assert est.predict({}).kind == "separable"  # 7 = 1 + 2K
    assert [est.kind_for(n) for n in (0, 1, 3, 4, 6, 7, 9, 10, 500)] == [
        "none", "nearest", "nearest", "linear", "linear", "separable", "separable", "quadratic", "quadratic"]
    capped = ScoreEstimator(NAMES, max_kind="linear")
    assert capped.kind_for(500) == "linear"


def test_one_slider_moved_only_stays_sane():
    # every point moves ja alone: zh and code were never explored, so their terms stay at zero (the ridge),
    # and along ja the quadratic is exact
    est = ScoreEstimator(NAMES)
    for x in np.linspace(0, 1, 12):
        est.add({"ja": x}, {"loss:ja": 2 + (x - 0.4) ** 2})
    got = est.predict({"ja": 0.75, "zh": 0.5})
    assert got.kind == "quadratic"
    assert got.values["loss:ja"] == pytest.approx(2 + 0.35**2, abs=1e-4)


def test_objective_estimate_is_the_objective_of_the_metric_estimates():
    objective = parse_objective("balanced", ["ja", "zh"], qa_names=["math"])
    est = ScoreEstimator(NAMES, objective=objective)
    rng = np.random.default_rng(3)
    for a in points(12):
        est.add(w(a), {"loss:ja": 3 + rng.normal(), "loss:zh": 2 + rng.normal(), "acc:math": rng.uniform()})
    got = est.predict({"ja": 0.2, "code": 0.3})
    # least squares is linear in the targets and the objective is linear in the metrics: the two agree
    assert got.values[OBJECTIVE] == pytest.approx(objective(got.values), abs=1e-9)
    assert got.kind == got.kinds[OBJECTIVE] == "quadratic"


def test_metrics_fitted_on_the_points_that_have_them():
    est = ScoreEstimator(["ja"])
    for x in (0.0, 0.5, 1.0):
        est.add({"ja": x}, {"loss:ja": 1 + x, **({"acc:math": 0.5} if x == 0.5 else {})})
    got = est.predict({"ja": 0.25})
    assert got.kinds == {"loss:ja": "quadratic", "acc:math": "nearest"}
    assert got.kind == "nearest"  # no objective: the crudest model among the metrics
    assert got.values == pytest.approx({"loss:ja": 1.25, "acc:math": 0.5})


def test_tracker_counts_hits_of_the_estimate_shown():
    est = ScoreEstimator(NAMES)
    assert est.tracker.rate is None and "no estimate" in est.tracker.summary()
    ci = {OBJECTIVE: Interval(3.0, 2.9, 3.1)}
    assert est.add({"ja": 0.1}, {OBJECTIVE: 3.0}, intervals=ci) is None  # nothing to estimate from yet
    assert est.add({"ja": 0.2}, {OBJECTIVE: 3.05}, intervals=ci) is True  # nearest said 3.0: inside [2.9, 3.1]
    shown = est.predict({"ja": 0.3})
    assert est.add({"ja": 0.3}, {OBJECTIVE: 3.5}, intervals={OBJECTIVE: Interval(3.5, 3.4, 3.6)},
                   shown=shown) is False  # the nearest point's 3.05 was shown: outside
    assert (est.tracker.hits, est.tracker.total, est.tracker.rate) == (1, 2, 0.5)
    assert est.tracker.by_kind == {"nearest": [1, 2]}
    assert est.tracker.abs_errors == pytest.approx([0.0, 0.45])  # |3.0 − 3.0|, |3.05 − 3.5|
    assert est.tracker.summary() == ("estimate of objective inside the exact interval 1 of 2 times (50%; nearest 1/2); "
                                     "mean |estimate − exact| 0.225")


def test_estimate_against_real_scores_and_intervals(tiny_tokenizer):
    """The loop a UI runs: exact scores of merged tiny models, intervals by bootstrap, the estimate checked."""
    base, tuned = make_model("llama"), perturbed(make_model("llama"), 0.05, seed=7)
    suite = EvalSuite(texts={"en": DOCS, "code": DOCS[::-1]})
    objective = parse_objective("balanced", ["en", "code"])
    est = ScoreEstimator(["v"], objective=objective)
    model = make_model("llama")
    hits = []
    for x in (0.0, 1.0, 0.5, 0.25, 0.75, 0.6):
        with torch_no_grad():
            for p, b, t in zip(model.parameters(), base.parameters(), tuned.parameters(), strict=True):
                p.copy_(b + x * (t - b))
        scores = score_suite(model, tiny_tokenizer, suite)
        ci = bootstrap(scores, objective)
        metrics = {k: v.value for k, v in ci.items() if k != OBJECTIVE}
        hits.append(est.add({"v": x}, metrics, intervals=ci))
        assert ci[OBJECTIVE].value == pytest.approx(objective(metrics))
    assert hits[0] is None and est.tracker.total == 5
    # a smooth loss curve in one weight: once quadratic (from the 4th point), the estimate is inside the interval
    assert hits[3:] == [True, True, True]
    assert est.predict({"v": 0.6}).kind == "quadratic"


def torch_no_grad():
    import torch

    return torch.no_grad()


def test_prediction_speed_ten_weights_two_hundred_points():
    names = [f"v{i}" for i in range(10)]
    est = ScoreEstimator(names, objective=parse_objective("balanced", list("abcde"), qa_names=["m"]))
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = rng.uniform(0, 1, 10)
        est.add(dict(zip(names, a, strict=True)), {**{f"loss:{s}": float(a @ a) + i for i, s in enumerate("abcde")},
                                                   "acc:m": float(a[0])})
    query = dict(zip(names, rng.uniform(0, 1, 10), strict=True))
    assert est.predict(query).kind == "quadratic"  # 66 terms, 200 points
    best = min(_timed(lambda: est.predict(query), 200) for _ in range(5))
    assert best < 2e-4, best  # per prediction; the goal is ≤ 0.3 s for the whole estimate shown


def _timed(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def test_bad_inputs():
    with pytest.raises(ConfigError, match="distinct weight names"):
        ScoreEstimator([])
    with pytest.raises(ConfigError, match="distinct weight names"):
        ScoreEstimator(["a", "a"])
    with pytest.raises(ConfigError, match="max_kind"):
        ScoreEstimator(["a"], max_kind="cubic")
    with pytest.raises(ConfigError, match=r"weights \['x'\] are not estimator coordinates; known: a, b"):
        ScoreEstimator(["a", "b"]).predict({"x": 1.0})
