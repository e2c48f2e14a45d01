"""Metrics: loss parity with a per-document reference loop, exact-match parsing and batching."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_model

from optimer_lib.errors import ConfigError, DataError
from optimer_lib.scoring.evaluate import (
    EvalSuite,
    answers_match,
    evaluate_suite,
    exact_match,
    mean_token_loss,
    parse_answer,
)

DOCS = ["the quick brown fox jumps over the lazy dog and the fox again",
        "12 + 35 = 47",
        "def f(x):\n    return x",
        "日本語のテキスト",
        "the dog"]


def reference_loss(model, tok, docs, seq_len):
    """Token-weighted mean NLL, one unpadded document at a time, via HF's own labels loss."""
    total, count = 0.0, 0
    with torch.no_grad():
        for doc in docs:
            ids = ([tok.bos_token_id] + tok(doc, add_special_tokens=False)["input_ids"])[:seq_len]
            x = torch.tensor([ids])
            loss = model(input_ids=x, labels=x).loss.item()  # mean over len(ids) - 1 predictions
            total += loss * (len(ids) - 1)
            count += len(ids) - 1
    return total / count


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_loss_matches_reference_with_padding(arch, tiny_tokenizer):
    model = make_model(arch)
    lengths = {len(tiny_tokenizer(d, add_special_tokens=False)["input_ids"]) for d in DOCS}
    assert len(lengths) > 2  # batches really contain padding
    got = mean_token_loss(model, tiny_tokenizer, DOCS, seq_len=12, batch_size=3)
    assert got == pytest.approx(reference_loss(model, tiny_tokenizer, DOCS, 12), abs=1e-5)
    # batch size must not change the result, and the cached tokenisation must be reused correctly
    assert mean_token_loss(model, tiny_tokenizer, DOCS, seq_len=12, batch_size=16) == pytest.approx(got, abs=1e-5)


def test_limit_takes_first_and_ppl_is_exp(tiny_tokenizer):
    model = make_model("llama")
    first = mean_token_loss(model, tiny_tokenizer, DOCS, limit=2)
    assert first == pytest.approx(reference_loss(model, tiny_tokenizer, DOCS[:2], 128), abs=1e-5)
    suite = EvalSuite(texts={"en": DOCS}, qa={})
    m = evaluate_suite(model, tiny_tokenizer, suite, limit=2)
    assert m["loss:en"] == pytest.approx(first)
    assert m["ppl:en"] == pytest.approx(math.exp(first))


def test_cache_sees_changed_texts(tiny_tokenizer):
    model = make_model("llama")
    docs = list(DOCS)
    a = mean_token_loss(model, tiny_tokenizer, docs)
    docs[0] = "a completely different first document"
    assert mean_token_loss(model, tiny_tokenizer, docs) != pytest.approx(a)


def test_empty_sets_raise(tiny_tokenizer):
    model = make_model("llama")
    with pytest.raises(DataError, match="empty"):
        mean_token_loss(model, tiny_tokenizer, [])
    with pytest.raises(DataError, match="empty"):
        exact_match(model, tiny_tokenizer, [])


@pytest.mark.parametrize("text, want", [("The answer is 1,234.", "1234"), ("-3.50", "-3.50"), ("x = 7 or 8", "7"),
                                        ("no number here", None), ("1, 2, 3", "1"), ("got 2.5%", "2.5")])
def test_parse_answer(text, want):
    assert parse_answer(text) == want


def test_answers_match():
    assert answers_match(" -3.50\nQuestion", "-3.5")
    assert answers_match(" 1,234 apples", "1234")
    assert not answers_match(" 48", "47")
    assert not answers_match(" none", "47")
    assert answers_match(" Paris. Next", "Paris")
    assert not answers_match(" London", "Paris")


class ScriptedModel(torch.nn.Module):
    """A stand-in LM whose greedy 'generation' is the scripted answer for each (left-padded) prompt."""

    def __init__(self, tok, answers: dict[str, str]):
        super().__init__()
        self.tok, self.answers, self.calls = tok, answers, []

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id):
        assert do_sample is False and pad_token_id == self.tok.pad_token_id
        self.calls.append(input_ids.shape[0])
        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            assert mask[-1] == 1  # left padding: every prompt ends in the last column
            prompt = self.tok.decode(ids[mask.bool()], skip_special_tokens=True)
            new = self.tok(self.answers[prompt], add_special_tokens=False)["input_ids"][:max_new_tokens]
            new = new + [pad_token_id] * (max_new_tokens - len(new))
            rows.append(torch.cat([ids, torch.tensor(new)]))
        return torch.stack(rows)


def test_exact_match_with_scripted_generation(tiny_tokenizer):
    pairs = [("Question: What is 12 + 35?\nAnswer:", "47"), ("Q: 1 + 1 =", "2"),
             ("Q: 10 - 13 =", "-3"), ("Q: capital?", "Paris"), ("Q: half of 7 =", "3.5")]
    answers = {pairs[0][0]: " 47\nQuestion", pairs[1][0]: " 3", pairs[2][0]: " -3 yes",
               pairs[3][0]: " Paris.", pairs[4][0]: " 3.50"}
    model = ScriptedModel(tiny_tokenizer, answers)
    assert exact_match(model, tiny_tokenizer, pairs, batch_size=2) == pytest.approx(4 / 5)
    assert model.calls == [2, 2, 1]
    assert exact_match(model, tiny_tokenizer, pairs, limit=2) == pytest.approx(1 / 2)


def _greedy_alone(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """What ``model`` generates for ``prompt`` on its own: one row, no padding, no batching."""
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_exact_match_real_model_agrees_with_unbatched_generation(tiny_tokenizer, arch):
    """Batched, left-padded generation on a real model must read the same continuation as each prompt alone."""
    model = make_model(arch)
    prompts = ["12 + 35 =", "a longer prompt with more words 1 + 1 =", "def f(x):"]
    alone = [_greedy_alone(model, tiny_tokenizer, p, 4) for p in prompts]
    assert all(a.split() for a in alone), alone  # each gold below is a non-empty answer
    gold = [a.split()[0] for a in alone]
    right = list(zip(prompts, gold, strict=True))
    assert exact_match(model, tiny_tokenizer, right, max_new_tokens=4, batch_size=3) == 1.0
    # one wrong gold among three: exactly 2/3, whatever the batch layout
    wrong = [*right[:2], (prompts[2], gold[2] + "zz")]
    assert exact_match(model, tiny_tokenizer, wrong, max_new_tokens=4, batch_size=3) == pytest.approx(2 / 3)
    assert exact_match(model, tiny_tokenizer, wrong, max_new_tokens=4, batch_size=2) == pytest.approx(2 / 3)


def test_suite_names_select_and_validation():
    suite = EvalSuite(texts={"en": ["a"], "math": ["1+1=2"]}, qa={"math": [("1+1=", "2")], "arc": []})
    assert suite.names() == ["en", "math", "arc"]
    sub = suite.select(texts={"en"}, qa=set())
    assert list(sub.texts) == ["en"] and sub.qa == {}
    with pytest.raises(ConfigError, match="metric names"):
        EvalSuite(texts={"loss:en": ["a"]})


# -- per-item scores and streaming (issue 15) ----------------------------------------------------------------

# Golds chosen from what make_model("llama") generates alone (4 new tokens): items 0 and 3 right, 1 and 2 wrong.
QA_PINNED = [("12 + 35 =", "="), ("a longer prompt with more words 1 + 1 =", "47"), ("def f(x):", "nope"),
             ("the quick", "ickickickick")]


def _pinned_suite() -> EvalSuite:
    return EvalSuite(texts={"en": DOCS, "code": [*DOCS[::-1], "x = 1", "", "y"]}, qa={"math": QA_PINNED})


# evaluate_suite before per-item scoring existed (commit e07e288): the refactor must not move these.
PINNED = [(dict(seq_len=12, batch_size=2), {"loss:en": 5.77135537800036, "loss:code": 5.769452095031738,
                                            "acc:math": 0.5}),
          (dict(seq_len=12, batch_size=16), {"loss:en": 5.77135547838713, "loss:code": 5.769452117210211,
                                             "acc:math": 0.5}),
          (dict(limit=3, batch_size=2), {"loss:en": 5.7585624872252, "loss:code": 5.7735323472456495,
                                         "acc:math": 1 / 3})]


@pytest.mark.parametrize("kw, want", PINNED)
def test_evaluate_suite_numbers_unchanged_by_per_item_refactor(tiny_tokenizer, kw, want):
    model = make_model("llama")
    got = evaluate_suite(model, tiny_tokenizer, _pinned_suite(), max_new_tokens=4, **kw)
    assert sorted(got) == sorted([*want, "ppl:en", "ppl:code"])
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert got["ppl:en"] == pytest.approx(math.exp(got["loss:en"]))


def test_per_item_scores_in_dev_set_order_and_aggregate(tiny_tokenizer):
    from optimer_lib.scoring.evaluate import score_suite

    model = make_model("llama")
    scores = score_suite(model, tiny_tokenizer, _pinned_suite(), seq_len=12, batch_size=2, max_new_tokens=4)
    assert list(scores) == ["loss:en", "loss:code", "acc:math"]
    code = scores["loss:code"]
    assert code.index == (0, 1, 2, 3, 4, 5, 7)  # the empty document (bos only) is not scored
    # each document alone, unpadded: its mean NLL is its item score, its predictions its count
    docs = _pinned_suite().texts["code"]
    for i, item, count in zip(code.index, code.items, code.count, strict=True):
        assert item == pytest.approx(reference_loss(model, tiny_tokenizer, [docs[i]], 12), abs=1e-5)
        ids = tiny_tokenizer(docs[i], add_special_tokens=False)["input_ids"]
        assert count == min(len(ids) + 1, 12) - 1
    assert code.value == pytest.approx(sum(code.total) / sum(code.count))
    assert scores["acc:math"].items == [1.0, 0.0, 0.0, 1.0]
    assert scores["acc:math"].metrics() == {"acc:math": 0.5}


class CountingModel(torch.nn.Module):
    """Wraps a model, counting forward calls and raising a flag after ``stop_after`` of them."""

    def __init__(self, inner, stop_after: int):
        super().__init__()
        self.inner, self.calls, self.stop_after = inner, 0, stop_after
        self.config = inner.config

    def forward(self, **kw):
        self.calls += 1
        return self.inner(**kw)

    @property
    def stop(self) -> bool:
        return self.calls >= self.stop_after


def test_stream_suite_yields_each_set_and_cancels_within_one_batch(tiny_tokenizer):
    from optimer_lib.scoring.evaluate import stream_suite

    suite = EvalSuite(texts={"a": DOCS, "b": DOCS, "c": DOCS})
    model = CountingModel(make_model("llama"), stop_after=10**9)
    seen = [(name, sorted(m), s.key) for name, m, s in stream_suite(model, tiny_tokenizer, suite, batch_size=2)]
    assert seen == [(n, [f"loss:{n}", f"ppl:{n}"], f"loss:{n}") for n in "abc"]
    assert model.calls == 9  # 5 documents in batches of 2: 3 forwards per set
    # a newer request arrives after the 4th forward (the first batch of set b): nothing more runs, b is not yielded
    model = CountingModel(make_model("llama"), stop_after=4)
    names = [r.name for r in stream_suite(model, tiny_tokenizer, suite, batch_size=2, should_stop=lambda: model.stop)]
    assert names == ["a"] and model.calls == 4
    # stopped before anything: nothing runs at all
    model = CountingModel(make_model("llama"), stop_after=0)
    assert list(stream_suite(model, tiny_tokenizer, suite, should_stop=lambda: True)) == [] and model.calls == 0


def test_stream_suite_qa_limit_separate_from_limit(tiny_tokenizer):
    from optimer_lib.scoring.evaluate import score_suite

    model = make_model("llama")
    scores = score_suite(model, tiny_tokenizer, _pinned_suite(), limit=2, qa_limit=4, max_new_tokens=4)
    assert len(scores["loss:en"].index) == 2 and scores["acc:math"].items == [1.0, 0.0, 0.0, 1.0]


# -- the Tune scoring set (issue 15) ----------------------------------------------------------------------------

def test_tune_scoring_cost_counts_what_stream_scores(tiny_tokenizer):
    from optimer_lib.scoring.tune_config import TuneScoring

    model = make_model("llama")  # 64 positions: caps seq_len 128
    long_doc = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)  # far over 64 tokens
    suite = EvalSuite(texts={n: [long_doc] * 10 + DOCS for n in ("en", "ja", "zh", "math", "code")},
                      qa={"math": QA_PINNED * 3, "arc": QA_PINNED})
    cfg = TuneScoring(sets=("en", "ja", "zh", "math", "code"), docs=8, qa_items=6, seq_len=128, batch_size=4,
                      max_new_tokens=4).check(suite)
    prompts = sum(len(tiny_tokenizer(p, add_special_tokens=False)["input_ids"]) + 1 for p, _ in (QA_PINNED * 2)[:6])
    want = 5 * 8 * 64 + prompts + 6 * 4  # 5 sets × 8 docs × 64 tokens, 6 math prompts (+bos) + 4 new tokens each
    assert cfg.tokens(tiny_tokenizer, suite, model) == want
    cost = cfg.cost(tiny_tokenizer, suite, n_params=135e6, model=model)
    assert cost.tokens == want and cost.flops == pytest.approx(2 * 135e6 * want)
    assert str(cost) == f"reads {want:,} tokens, ≈ {2 * 135e6 * want / 1e12:.2g} TFLOP"
    assert cost.seconds(1e11) == pytest.approx(cost.flops / 1e11)
    # the tokens counted are the tokens scored: Σ(predicted + bos) over what stream() read, plus the QA part
    results = list(cfg.stream(model, tiny_tokenizer, suite))
    assert [r.scores.key for r in results] == [*(f"loss:{n}" for n in ("en", "ja", "zh", "math", "code")),
                                               "acc:math"]  # arc is not in sets
    assert [len(r.scores.index) for r in results] == [8] * 5 + [6]
    assert sum(sum(r.scores.count) + len(r.scores.index) for r in results if r.scores.kind == "loss") == 5 * 8 * 64
    full = cfg.full()
    assert (full.docs, full.qa_items, full.sets) == (None, None, cfg.sets)
    assert full.tokens(tiny_tokenizer, suite, model) > want
    # None: every set of the suite, arc included
    assert TuneScoring(docs=1, qa_items=1).tokens(tiny_tokenizer, suite) > TuneScoring(
        sets=("en",), docs=1, qa_items=1).tokens(tiny_tokenizer, suite)


def test_tune_scoring_check_lists_every_problem():
    from optimer_lib.scoring.tune_config import TuneScoring

    suite = EvalSuite(texts={"en": ["a b"], "ja": []}, qa={"math": [("1+1=", "2")]})
    with pytest.raises(ConfigError) as err:
        TuneScoring(sets=("en", "xx"), docs=0, seq_len=1, batch_size=True).check(suite)
    msg = str(err.value)
    for part in ("docs must be an integer ≥ 1 or None (all), got 0", "seq_len must be an integer ≥ 2, got 1",
                 "batch_size must be an integer ≥ 1, got True", "unknown dev sets ['xx']; the suite has: en, ja, math"):
        assert part in msg, part
    with pytest.raises(ConfigError, match="nothing to score: text ja"):
        TuneScoring().check(suite)
    with pytest.raises(ConfigError, match="sets is empty"):
        TuneScoring(sets=()).check()
    assert TuneScoring(sets=["en", "math"]).check(suite).sets == ("en", "math")
    assert TuneScoring(sets="en").sets == ("en",)
    with pytest.raises(ConfigError, match="n_params"):
        TuneScoring().cost(None, suite, n_params=0)
