"""Per-document test scores (optimer_lib.experiments.docscores): they add up to what the library's own scoring says."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import make_model

from optimer_lib.experiments.docscores import (
    chat_prompt,
    components,
    metrics_of,
    objective_of_means,
    qa_correct,
    score_documents,
)
from optimer_lib.scoring.evaluate import EvalSuite, encode_text, evaluate_suite, exact_match
from optimer_lib.scoring.objectives import parse_objective

TEXTS = {"en": ["the quick brown fox jumps over the lazy dog", "the lazy dog", "a", "def f(x):\n    return x"],
         "code": ["def f(x):\n    return x", "12 + 35 = 47 and more text"]}
PAIRS = [(f"Question: What is {a} + {b}?\nAnswer:", str(a + b + (k % 3 == 0))) for k, (a, b) in
         enumerate([(12, 35), (3, 4), (20, 7), (1, 1), (9, 9), (40, 2), (5, 6)])]  # every third gold is wrong


class Adder(torch.nn.Module):
    """A stand-in LM whose greedy 'generation' is the sum of the first two numbers in each prompt."""

    def __init__(self, tokenizer) -> None:
        super().__init__()
        self.tok, self.w = tokenizer, torch.nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, attention_mask, max_new_tokens, **_kw):
        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            text = self.tok.decode(ids[mask.bool()].tolist(), skip_special_tokens=True)
            a, b = (int(x) for x in re.findall(r"\d+", text)[:2])
            rows.append(ids.tolist() + self.tok(f" {a + b}", add_special_tokens=False)["input_ids"])
        width = max(len(r) for r in rows)
        return torch.tensor([r + [0] * (width - len(r)) for r in rows])


def test_losses_add_up_to_the_library_loss(tiny_tokenizer):
    model = make_model("llama")
    suite = EvalSuite(texts=TEXTS)
    docs = score_documents(model, tiny_tokenizer, suite, limit=3, batch_size=2)
    assert len(docs["nll"]["en"]) == 3 and docs["tokens"]["en"][2] == 1  # "a": bos + 1 token -> 1 predicted
    ref = evaluate_suite(model, tiny_tokenizer, suite, limit=3)
    got = metrics_of(docs)
    for k in ("loss:en", "loss:code", "ppl:en"):
        assert got[k] == pytest.approx(ref[k], rel=1e-5)
    obj = parse_objective("loss:en=2,loss:code=1", ["en", "code"])
    means = {k: sum(v) / len(v) for k, v in components(docs).items()}
    assert objective_of_means(obj.terms, means) == pytest.approx(obj(ref), rel=1e-5)


def test_qa_items_match_exact_match(tiny_tokenizer):
    model = Adder(tiny_tokenizer)
    correct = qa_correct(model, tiny_tokenizer, [encode_text(tiny_tokenizer, p) for p, _ in PAIRS],
                         [g for _, g in PAIRS], batch_size=3)
    assert correct == [0, 1, 1, 0, 1, 1, 0]
    assert sum(correct) / len(correct) == pytest.approx(exact_match(model, tiny_tokenizer, PAIRS, batch_size=3))
    docs = score_documents(model, tiny_tokenizer, EvalSuite(texts={}, qa={"math": PAIRS}), limit=5, chat_qa=True)
    assert docs["correct"]["math"] == docs["chat_correct"]["math"] == [0, 1, 1, 0, 1]
    m = metrics_of(docs)
    assert m["acc:math"] == m["chat_acc:math"] == pytest.approx(3 / 5)
    means = {k: sum(v) / len(v) for k, v in components(docs).items()}
    assert objective_of_means({"acc:math": 1.0}, means) == pytest.approx(-3 / 5)  # accuracies enter negated
    assert objective_of_means({"chat_acc:math": 2.0}, means) == pytest.approx(-3 / 5)


def test_chat_prompt_is_the_user_turn_with_one_bos(tiny_tokenizer):
    ids = chat_prompt(tiny_tokenizer, "Question: What is 2 + 3?\nAnswer:")
    text = tiny_tokenizer.decode(ids)
    assert ids[0] == tiny_tokenizer.bos_token_id and ids.count(tiny_tokenizer.bos_token_id) == 2  # one bos, not two
    assert text.startswith("<s>user: What is 2 + 3?</s><s>assistant: ") and "Question" not in text
