"""Objective specs: presets, weighted lists, callables, and the errors users see."""

from __future__ import annotations

import pytest

from optimer_lib.errors import ConfigError
from optimer_lib.scoring.evaluate import EvalSuite
from optimer_lib.scoring.objectives import RETENTION_WEIGHT, Objective, parse_objective, presets

TEXTS = ["en", "ja", "math"]
QA = ["math"]
METRICS = {"loss:en": 2.0, "ppl:en": 7.4, "loss:ja": 4.0, "ppl:ja": 54.6, "loss:math": 1.0, "ppl:math": 2.7,
           "acc:math": 0.5}


def test_balanced_preset():
    obj = parse_objective("balanced", TEXTS, qa_names=QA)
    assert obj.terms == {"loss:en": 1, "loss:ja": 1, "loss:math": 1, "acc:math": 1}
    assert obj(METRICS) == pytest.approx((2 + 4 + 1 - 0.5) / 4)
    assert parse_objective("balanced", ["en", "ja"]).terms == {"loss:en": 1, "loss:ja": 1}


def test_distribution_preset_has_retention_guard():
    obj = parse_objective("ja", TEXTS, qa_names=QA)
    assert obj.terms == {"loss:ja": 1, "loss:en": RETENTION_WEIGHT, "loss:math": RETENTION_WEIGHT}
    assert obj(METRICS) == pytest.approx((4 + 0.1 * 2 + 0.1 * 1) / 1.2)
    assert obj.needed_texts == {"en", "ja", "math"} and obj.needed_qa == set()
    qa_only = presets(["en"], ["arc"])["arc"]
    assert qa_only == {"acc:arc": 1, "loss:en": RETENTION_WEIGHT}


def test_weighted_list_normalised_and_acc_sign():
    obj = parse_objective("ppl:ja=1, loss:en=0.5,acc:math=2", TEXTS, qa_names=QA)
    assert obj.terms == {"ppl:ja": 1, "loss:en": 0.5, "acc:math": 2}
    assert obj(METRICS) == pytest.approx((54.6 + 0.5 * 2 - 2 * 0.5) / 3.5)
    assert obj.needed_metrics == ("ppl:ja", "loss:en", "acc:math")
    assert obj.needed_texts == {"ja", "en"} and obj.needed_qa == {"math"}
    # better accuracy -> lower objective
    assert obj({**METRICS, "acc:math": 0.9}) < obj(METRICS)
    assert parse_objective("loss:en", TEXTS).terms == {"loss:en": 1.0}


def test_objective_evaluate_computes_only_needed(tiny_tokenizer):
    from conftest import make_model

    model = make_model("llama")
    suite = EvalSuite(texts={"en": ["the quick brown fox"], "ja": ["日本語のテキスト"]},
                      qa={"math": [("12 + 35 =", "47")]})
    obj = parse_objective("loss:ja", suite.names(), qa_names=list(suite.qa))
    value, metrics = obj.evaluate(model, tiny_tokenizer, suite, limit=1)
    assert set(metrics) == {"loss:ja", "ppl:ja"} and value == pytest.approx(metrics["loss:ja"])


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_scores.py").write_text(
        "def score(model, tokenizer):\n    return 1.5\n"
        "def score_dict(model, tokenizer, *, limit=None):\n    return {'objective': float(limit), 'x': 2}\n"
        "def score_kw(model, tokenizer, **kw):\n    return {'objective': len(kw)}\n"
        "def no_objective(model, tokenizer):\n    return {'x': 1}\n"
        "NOT_CALLABLE = 3\n")
    (tmp_path / "broken_mod.py").write_text("import does_not_exist_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_callable_objectives(user_module):
    suite = EvalSuite(texts={"en": ["a"]})
    obj = parse_objective("my_scores:score", ["en"])
    assert obj.needed_metrics == () and obj.evaluate(None, None, suite) == (1.5, {"objective": 1.5})
    value, metrics = parse_objective("my_scores:score_dict", ["en"]).evaluate(None, None, suite, limit=7)
    assert value == 7.0 and metrics == {"objective": 7.0, "x": 2.0}
    assert parse_objective("my_scores:score_kw", ["en"]).evaluate(None, None, suite)[0] == 4.0
    by_path = parse_objective(f"{user_module / 'my_scores.py'}:score", ["en"])
    assert by_path.evaluate(None, None, suite)[0] == 1.5
    with pytest.raises(ConfigError, match="'objective' entry"):
        parse_objective("my_scores:no_objective", ["en"]).evaluate(None, None, suite)


@pytest.mark.parametrize("spec, fragments", [
    ("balancd", ["unknown objective preset", "balanced", "loss:en", "example"]),
    ("loss:fr", ["unknown distribution 'fr'", "en, ja, math"]),
    ("perplexity:ja=1", ["unknown metric kind 'perplexity'", "loss, ppl, acc"]),
    ("loss:en=abc", ["weight 'abc' is not a number"]),
    ("loss:en=inf", ["finite"]),
    ("acc:ja", ["no QA task 'ja'", "QA tasks: math"]),
    ("loss:en=0", ["all weights are zero"]),
    ("loss:en,loss:en", ["given twice"]),
    ("", ["empty --objective"]),
    ("nonexistent_mod_xyz:fn", ["cannot import objective module", "PYTHONPATH"]),
    ("broken_mod:fn", ["cannot import", "does_not_exist_xyz"]),
    ("my_scores:missing", ["no attribute 'missing'", "score"]),
    ("my_scores:NOT_CALLABLE", ["not callable"]),
    ("missing_dir/x.py:fn", ["does not exist"]),
])
def test_bad_specs_explain_themselves(spec, fragments, user_module):
    with pytest.raises(ConfigError) as info:
        parse_objective(spec, TEXTS, qa_names=QA)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as info:
        parse_objective("loss:fr=1,zzz:en,loss:en=x", TEXTS, qa_names=QA)
    msg = str(info.value)
    assert "'fr'" in msg and "'zzz'" in msg and "'x'" in msg and msg.count("\n  - ") == 3


def test_objective_constructor_guards():
    with pytest.raises(ConfigError):
        Objective()
    with pytest.raises(ConfigError, match="zero"):
        Objective(terms={"loss:en": 0.0})
    with pytest.raises(ConfigError, match="not computed"):
        Objective(terms={"loss:en": 1.0})({"loss:ja": 1.0})
