"""Cost accounting: units, totals, quality-vs-cost curves, tokens evaluated, study timestamps."""

from __future__ import annotations

import time

import optuna
import pytest
from helpers import FakeMerger

from optimer_lib.experiments.costs import (
    BACKWARD_FACTOR,
    CostEntry,
    CostLedger,
    cost_to_reach,
    ledger_from_study,
    quality_curve,
)
from optimer_lib.scoring.evaluate import EvalSuite
from optimer_lib.scoring.objectives import Objective, parse_objective
from optimer_lib.scoring.scorer import TrialScorer, eval_tokens
from optimer_lib.search.study import SearchConfig, run_search

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_units_and_totals():
    e = CostEntry("m", tokens_trained=100, tokens_evaluated=7, seconds=2.5)
    assert e.amount("seconds") == 2.5 and e.amount("tokens") == 107
    assert e.amount("compute") == BACKWARD_FACTOR * 100 + 7
    with pytest.raises(ValueError, match="unknown cost unit"):
        e.amount("flops")
    led = CostLedger()
    led.add("a", tokens_trained=10, seconds=1.0)
    led.add("a", tokens_evaluated=5, seconds=2.0, objective=3.0)
    led.add("b", tokens_evaluated=1, seconds=4.0, objective=1.0)
    t = led.totals("a")
    assert (t["tokens_trained"], t["tokens_evaluated"], t["seconds"], t["entries"]) == (10, 5, 3.0, 2)
    assert led.totals()["seconds"] == 7.0 and led.methods() == ["a", "b"]


def test_curve_is_best_so_far_over_cumulative_cost():
    led = CostLedger()
    led.add("m", kind="train", seconds=10.0)           # no objective: adds cost only
    for secs, obj in ((1.0, 5.0), (2.0, 6.0), (1.0, 4.0), (3.0, None), (1.0, 4.5)):
        led.add("m", seconds=secs, objective=obj)
    assert led.curve("m") == [(11.0, 5.0), (13.0, 5.0), (14.0, 4.0), (18.0, 4.0)]
    assert led.curve("m", kinds=("trial",)) == [(1.0, 5.0), (3.0, 5.0), (4.0, 4.0), (8.0, 4.0)]
    assert quality_curve(led.of("m", ("trial",)), offset=100.0)[0] == (101.0, 5.0)
    curve = led.curve("m", kinds=("trial",))
    assert cost_to_reach(curve, 4.0) == 4.0 and cost_to_reach(curve, 5.5) == 1.0 and cost_to_reach(curve, 3.9) is None


def test_json_round_trip(tmp_path):
    led = CostLedger()
    led.add("m", tokens_trained=3, seconds=1.5, objective=2.0, info={"ratios": {"ja": 1.0}})
    path = led.save(tmp_path / "c.json")
    again = CostLedger.load(path)
    assert again.entries == led.entries


def _manual_count(tok, docs, limit, width):
    n = 0
    for d in docs[:limit]:
        k = min(1 + len(tok(d, add_special_tokens=False)["input_ids"]), width)  # bos + ids, truncated
        n += k if k >= 2 else 0
    return n


def test_eval_tokens_counts_scored_and_generated_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    en = ["the quick brown fox jumps over the lazy dog " * 4, "the dog", "x"]
    code = ["def f(x):\n    return x"] * 3
    qa = [("12 + 35 =", "47"), ("1 + 1 =", "2")]
    suite = EvalSuite(texts={"en": en, "code": code}, qa={"math": qa})
    prompts = sum(1 + len(tok(p, add_special_tokens=False)["input_ids"]) for p, _ in qa)
    full = _manual_count(tok, en, None, 16) + _manual_count(tok, code, None, 16) + prompts + 2 * 8
    assert eval_tokens(tok, suite, None, seq_len=16) == full
    # the limit takes the first N items of every set, and only the sets the objective reads count
    obj = parse_objective("loss:en", ["en", "code"], qa_names=["math"])
    assert eval_tokens(tok, suite, obj, limit=2, seq_len=16) == _manual_count(tok, en, 2, 16)
    obj = parse_objective("acc:math", ["en", "code"], qa_names=["math"])
    first = 1 + len(tok(qa[0][0], add_special_tokens=False)["input_ids"])
    assert eval_tokens(tok, suite, obj, limit=1, max_new_tokens=4) == first + 4
    assert _manual_count(tok, en, None, 16) < _manual_count(tok, en, None, 1000)  # truncation matters
    # a search that records every metric scores the whole suite whatever the objective reads
    obj = parse_objective("loss:en", ["en", "code"], qa_names=["math"])
    scorer = TrialScorer(None, tok, suite, [obj], seq_len=16, record_metrics="all")  # counting needs no model
    assert scorer.eval_tokens(2) == eval_tokens(tok, suite, None, limit=2, seq_len=16)
    assert scorer.eval_tokens(None) == full
    scorer = TrialScorer(None, tok, suite, [obj], seq_len=16, record_metrics="needed")
    assert scorer.eval_tokens(2) == _manual_count(tok, en, 2, 16)


def _slow_quadratic(model, tokenizer):
    time.sleep(0.01)
    return (model.weights["a"] - 0.3) ** 2 + (model.weights["b"] - 0.6) ** 2


def test_recorder_and_study_timestamps(tmp_path):
    led = CostLedger()
    t0 = time.perf_counter()
    cfg = SearchConfig(trials=6, storage=":memory:", workdir=tmp_path, top_k=0, sampler="random")
    res = run_search(FakeMerger(["a", "b"]), None, EvalSuite(texts={"en": ["x"]}), Objective(fn=_slow_quadratic), cfg,
                     callbacks=[led.recorder("tpe", tokens_evaluated=42)], progress=False)
    wall = time.perf_counter() - t0
    rec = led.of("tpe")
    assert len(rec) == 6 and all(e.tokens_evaluated == 42 and e.seconds >= 0.01 for e in rec)
    assert [e.objective for e in rec] == pytest.approx([t.value for t in res.study.trials])
    assert sum(e.seconds for e in rec) <= wall
    from_study = ledger_from_study(res.study, "tpe", tokens_evaluated=42, tokens_trained=5)
    assert [e.objective for e in from_study] == [e.objective for e in rec]
    assert all(0.01 <= e.seconds <= r.seconds + 1e-3 for e, r in zip(from_study, rec, strict=True))
    assert CostLedger(from_study).totals()["tokens_trained"] == 30
