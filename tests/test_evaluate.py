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
