"""Bootstrap intervals over scored documents: exact cases, shrinkage, pairing, speed, and errors."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from conftest import make_model
from test_evaluate import DOCS

from optimer_lib.errors import ConfigError, DataError
from optimer_lib.scoring.evaluate import EvalSuite, SetScores, evaluate_suite, score_suite
from optimer_lib.scoring.objectives import Objective, parse_objective
from optimer_lib.scoring.uncertainty import OBJECTIVE, Interval, bootstrap, objective_interval, paired_bootstrap


def loss_set(name: str, losses, counts) -> SetScores:
    """A text set whose documents have the given mean token losses and token counts."""
    counts = [float(c) for c in counts]
    return SetScores(name, "loss", range(len(counts)), [x * c for x, c in zip(losses, counts, strict=True)], counts)


def acc_set(name: str, right) -> SetScores:
    return SetScores(name, "acc", range(len(right)), [float(r) for r in right], [1.0] * len(right))


def synthetic(n_docs: int, seed: int = 1) -> list[SetScores]:
    rng = np.random.default_rng(seed)
    sets = [loss_set(n, rng.normal(3.0, 0.5, n_docs), rng.integers(40, 128, n_docs)) for n in ("en", "ja", "code")]
    return [*sets, acc_set("math", rng.integers(0, 2, n_docs))]


BALANCED = parse_objective("balanced", ["en", "ja", "code"], qa_names=["math"])


def test_real_model_intervals_hold_the_reported_scores(tiny_tokenizer):
    model = make_model("llama")
    suite = EvalSuite(texts={"en": DOCS, "code": DOCS[::-1]}, qa={"math": [("12 + 35 =", "="), ("1 + 1 =", "47")]})
    objective = parse_objective("balanced", ["en", "code"], qa_names=["math"])
    metrics = evaluate_suite(model, tiny_tokenizer, suite, max_new_tokens=4)
    ci = bootstrap(score_suite(model, tiny_tokenizer, suite, max_new_tokens=4), objective)
    assert set(ci) == {*metrics, OBJECTIVE}
    for key, value in metrics.items():
        assert ci[key].value == pytest.approx(value, rel=1e-12), key  # the same numbers evaluate_suite reports
        assert ci[key].low <= value <= ci[key].high, key
    assert ci[OBJECTIVE].value == pytest.approx(objective(metrics), rel=1e-12)
    assert ci[OBJECTIVE].contains(objective(metrics)) and ci[OBJECTIVE].width > 0
    assert ci["ppl:en"].low == pytest.approx(math.exp(ci["loss:en"].low))  # exp is monotone: same quantile
    assert ci["ppl:en"].high == pytest.approx(math.exp(ci["loss:en"].high))


def test_all_equal_documents_give_zero_width():
    sets = [loss_set("en", [2.5] * 8, [10, 20, 30, 40, 50, 60, 70, 128]), acc_set("math", [1] * 8)]
    objective = parse_objective("balanced", ["en"], qa_names=["math"])
    ci = bootstrap(sets, objective)
    assert ci["loss:en"] == Interval(2.5, 2.5, 2.5)
    assert ci["acc:math"] == Interval(1.0, 1.0, 1.0)
    assert ci[OBJECTIVE] == Interval(0.75, 0.75, 0.75)  # (2.5 − 1) / 2


def test_resamples_are_token_weighted_like_the_score():
    # 7 one-token documents with loss 0 and one 1,000-token document with loss 1: the token-weighted set loss is
    # 1000/1007; any resample holding the long document is ≈ 1, so the top of the interval is ≈ 1 (a mean of
    # per-document losses would put it near 3/8).
    ci = bootstrap([loss_set("en", [0.0] * 7 + [1.0], [1] * 7 + [1000])])["loss:en"]
    assert ci.value == pytest.approx(1000 / 1007)
    assert ci.low == 0.0 and ci.high > 0.99


def test_interval_contains_point_and_shrinks_with_more_documents():
    # the same 8 documents, then each 16 times (128): same spread, 16× the documents, so ~1/4 the width
    sets = synthetic(8)
    more = [SetScores(s.name, s.kind, range(128), s.total * 16, s.count * 16) for s in sets]
    few, many = bootstrap(sets, BALANCED), bootstrap(more, BALANCED)
    for key in few:
        assert many[key].value == pytest.approx(few[key].value), key
        assert few[key].contains(few[key].value) and many[key].contains(many[key].value), key
        assert few[key].width / 6 < many[key].width < few[key].width / 3, key
    # a fair coin on 100 items: the 95% interval is about ±1.96·0.05 wide
    coin = bootstrap([acc_set("m", [1, 0] * 50)])["acc:m"]
    assert coin.value == 0.5 and 0.17 <= coin.width <= 0.23


def test_seed_fixed_and_sets_independent():
    sets = synthetic(8)
    a, b = bootstrap(sets, BALANCED, seed=3), bootstrap(sets, BALANCED, seed=3)
    assert a == b
    assert bootstrap(sets, BALANCED, seed=4)["loss:en"] != a["loss:en"]
    # one set's interval does not depend on which other sets were scored
    assert bootstrap(sets[:1], seed=3)["loss:en"] == a["loss:en"]
    assert bootstrap({s.key: s for s in sets}, seed=3)["acc:math"] == a["acc:math"]  # dict or iterable
    narrow = bootstrap(sets, level=0.5)["loss:en"]
    assert a["loss:en"].low < narrow.low <= narrow.high < a["loss:en"].high


def test_paired_identical_settings_is_exactly_zero():
    sets = synthetic(8)
    diff = paired_bootstrap(sets, sets, BALANCED)
    assert set(diff) == set(bootstrap(sets, BALANCED))
    assert all(iv == Interval(0.0, 0.0, 0.0) for iv in diff.values())
    assert not diff[OBJECTIVE].excludes(0.0)


def test_paired_sees_a_small_uniform_shift_that_unpaired_intervals_cannot():
    before = synthetic(8)
    # the new weights lower every document's loss by 0.01 nats/token: far inside the spread between documents
    after = [SetScores(s.name, s.kind, s.index, [t - 0.01 * c for t, c in zip(s.total, s.count, strict=True)],
                       s.count) if s.kind == "loss" else s for s in before]
    diff = paired_bootstrap(before, after, BALANCED)
    assert diff["loss:en"].value == pytest.approx(-0.01)
    assert diff["loss:en"].low == pytest.approx(-0.01) and diff["loss:en"].high == pytest.approx(-0.01)
    assert diff[OBJECTIVE].value == pytest.approx(-0.0075)  # three of four equal-weight terms moved by −0.01
    assert diff[OBJECTIVE].excludes(0.0) and diff[OBJECTIVE].width < 1e-9
    a, b = bootstrap(before, BALANCED)[OBJECTIVE], bootstrap(after, BALANCED)[OBJECTIVE]
    assert a.contains(b.value) and b.contains(a.value)  # unpaired: indistinguishable


def test_paired_one_item_flip():
    before, after = [acc_set("m", [1, 0, 1, 0, 1, 0, 1, 0])], [acc_set("m", [1, 1, 1, 0, 1, 0, 1, 0])]
    diff = paired_bootstrap(before, after)["acc:m"]
    assert diff.value == pytest.approx(1 / 8)
    assert diff.low == 0.0 and diff.high > 0.125  # one flipped item of eight: not distinguishable


def test_speed_five_sets_eight_documents():
    sets = [*synthetic(8), loss_set("zh", [3.0] * 8, [64] * 8)]
    objective = parse_objective("balanced", ["en", "ja", "code", "zh"], qa_names=["math"])
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        bootstrap(sets, objective, n_resamples=1000)
        paired_bootstrap(sets, sets, objective, n_resamples=1000)
        times.append(time.perf_counter() - t0)
    assert min(times) < 0.020, times  # both together under the 20 ms budget of one


def test_errors_say_what_to_do():
    sets = synthetic(8)
    with pytest.raises(ConfigError, match="callable"):
        bootstrap(sets, Objective(fn=lambda model, tok: 0.0))
    with pytest.raises(ConfigError, match=r"reads \['loss:zh'\]"):
        bootstrap(sets, parse_objective("loss:zh", ["zh"]))
    with pytest.raises(ConfigError, match="level"):
        bootstrap(sets, level=95)
    with pytest.raises(ConfigError, match="n_resamples"):
        bootstrap(sets, n_resamples=0)
    with pytest.raises(DataError, match="no scored dev sets"):
        bootstrap([])
    with pytest.raises(DataError, match="different documents"):
        paired_bootstrap(synthetic(8), synthetic(9))
    with pytest.raises(DataError, match="share no dev set"):
        paired_bootstrap([acc_set("a", [1])], [acc_set("b", [1])])
    with pytest.raises(ConfigError, match="differ in length"):
        SetScores("en", "loss", [0, 1], [1.0], [1.0, 1.0])
    assert objective_interval(sets, BALANCED) == bootstrap(sets, BALANCED)[OBJECTIVE]
    assert str(Interval(3.68123, 3.6011, 3.763)) == "3.6812 [3.6011, 3.763]"


def test_sets_are_resampled_independently():
    # two sets with the same documents: the same draws for both would make loss:a − loss:b exactly 0 every time
    same = loss_set("a", [2.0, 3.0, 4.0, 5.0], [10, 20, 30, 40])
    other = SetScores("b", "loss", same.index, same.total, same.count)
    ci = bootstrap([same, other], parse_objective("loss:a=1,loss:b=-1", ["a", "b"]))
    assert ci[OBJECTIVE].value == 0.0 and ci[OBJECTIVE].width > 0.5
