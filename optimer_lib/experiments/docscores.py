"""Per-document test scores, so findings can carry paired bootstrap intervals over documents and seeds.

    from optimer_lib.experiments.docscores import score_documents, metrics_of, objective_of_means, components
    docs = score_documents(model, tokenizer, test_suite, limit=300, chat_qa=True)
    # {"nll": {"ja": [...]}, "tokens": {"ja": [...]}, "correct": {"math": [0, 1, ...]}, "chat_correct": {...}}
    metrics_of(docs)                      # {"loss:ja": Σnll/Σtokens, "ppl:ja": ..., "acc:math": ...}
    objective_of_means(obj.terms, {k: v.mean() for k, v in components(docs).items()})   # == obj(metrics_of(docs))

Losses are scored exactly as :func:`optimer_lib.scoring.evaluate.mean_token_loss` scores them (per document:
summed next-token NLL and token count, via :func:`optimer_lib.experiments.real_cell.document_losses`), so
Σnll / Σtokens of a corpus is that function's value. QA items are scored as
:func:`optimer_lib.scoring.evaluate.exact_match` scores them (greedy, left-padded batches, first number of the
continuation), one 0/1 per item. ``chat_qa`` also asks each question through the tokenizer's chat template
(``Question: X\\nAnswer:`` becomes the user turn ``X`` and the assistant's turn is generated): the accuracy an
instruction-tuned merge is for. An objective is a function of *means* of per-document components (``nll:c``,
``tok:c``, ``acc:q``), which is what :func:`optimer_lib.experiments.stats.bootstrap` resamples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from optimer_lib.scoring.evaluate import EvalSuite, answers_match, encode_text, model_device, pad_token_id

QUESTION, ANSWER = "Question:", "\nAnswer:"


def chat_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a ``Question: X\\nAnswer:`` prompt asked as a chat user turn, ready for the assistant's reply.

    The template's own bos text is dropped before :func:`encode_text` adds the bos id (one bos, as for raw
    prompts). A tokenizer without a chat template raises ``ValueError`` (transformers' message).
    """
    question = prompt.removeprefix(QUESTION).removesuffix(ANSWER).strip()
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        text = text[len(bos):]
    return encode_text(tokenizer, text)


def qa_correct(model: Any, tokenizer: Any, prompts: Sequence[list[int]], golds: Sequence[str], *,
               max_new_tokens: int = 8, batch_size: int = 32) -> list[int]:
    """1/0 per item, in order: greedy generation from each tokenised prompt answers its gold (``answers_match``).

    Batches are formed as in ``exact_match`` (sorted by prompt length, left-padded), so the mean equals its
    accuracy on raw prompts.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    device, pad = model_device(model), pad_token_id(tokenizer)
    out = [0] * len(prompts)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(prompts[i]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i], dtype=torch.long)
                mask[r, width - len(prompts[i]):] = 1
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            texts = tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
            for i, text in zip(rows, texts, strict=True):
                out[i] = int(answers_match(text, golds[i]))
    return out


def score_documents(model: Any, tokenizer: Any, suite: EvalSuite, *, limit: int | None = None, seq_len: int = 128,
                    batch_size: int = 16, max_new_tokens: int = 8, chat_qa: bool = False,
                    chat_new_tokens: int = 12) -> dict[str, Any]:
    """Per-document NLL and token counts of every text set, per-item QA correctness (raw, and chat with
    ``chat_qa``), each on the first ``limit`` items."""
    from optimer_lib.experiments.real_cell import document_losses

    out: dict[str, Any] = {"nll": {}, "tokens": {}, "correct": {}}
    for name, docs in suite.texts.items():
        nll, tok = document_losses(model, tokenizer, list(docs[:limit]), seq_len=seq_len, batch_size=batch_size)
        out["nll"][name], out["tokens"][name] = [round(x, 4) for x in nll], tok
    for name, pairs in suite.qa.items():
        sub = list(pairs[:limit])
        golds = [g for _, g in sub]
        out["correct"][name] = qa_correct(model, tokenizer, [encode_text(tokenizer, p) for p, _ in sub], golds,
                                          max_new_tokens=max_new_tokens, batch_size=batch_size)
        if chat_qa:
            out.setdefault("chat_correct", {})[name] = qa_correct(
                model, tokenizer, [chat_prompt(tokenizer, p) for p, _ in sub], golds,
                max_new_tokens=chat_new_tokens, batch_size=batch_size)
    return out


def components(docs: Mapping[str, Any], tokens: Mapping[str, Sequence[int]] | None = None) -> dict[str, list[float]]:
    """``{"nll:c": [...], "tok:c": [...], "acc:q": [...], "chat:q": [...]}``; ``tokens`` replaces the doc's own
    token counts (stored once per stage, identical for every model)."""
    tok = tokens if tokens is not None else docs["tokens"]
    out: dict[str, list[float]] = {}
    for c, nll in docs["nll"].items():
        out[f"nll:{c}"], out[f"tok:{c}"] = list(nll), [float(t) for t in tok[c]]
    out.update({f"acc:{q}": [float(x) for x in v] for q, v in docs.get("correct", {}).items()})
    out.update({f"chat:{q}": [float(x) for x in v] for q, v in docs.get("chat_correct", {}).items()})
    return out


def metric_of_means(metric: str, means: Mapping[str, float]) -> float:
    """One metric (``loss:c``, ``ppl:c``, ``acc:q``, ``chat_acc:q``) from component means."""
    kind, _, name = metric.partition(":")
    if kind in ("loss", "ppl"):  # plain numpy arithmetic: works on arrays of bootstrap draws too
        with np.errstate(divide="ignore", invalid="ignore"):
            loss = np.divide(means[f"nll:{name}"], means[f"tok:{name}"])  # 0 tokens: nan
        return loss if kind == "loss" else np.exp(np.minimum(loss, 700.0))
    return means[f"chat:{name}" if kind == "chat_acc" else f"{kind}:{name}"]


def objective_of_means(terms: Mapping[str, float], means: Mapping[str, float]) -> float:
    """A weighted-metric objective (``Objective.terms``) from component means: Σ w·v / Σ|w|, accuracies entering
    as −v (``chat_acc`` too)."""
    total = sum(abs(w) for w in terms.values())
    return sum(w * (-1.0 if k.startswith(("acc:", "chat_acc:")) else 1.0) * metric_of_means(k, means)
               for k, w in terms.items()) / total


def metrics_of(docs: Mapping[str, Any], tokens: Mapping[str, Sequence[int]] | None = None) -> dict[str, float]:
    """The metrics :func:`optimer_lib.scoring.evaluate.evaluate_suite` reports, from per-document scores."""
    comp = components(docs, tokens)
    means = {k: sum(v) / len(v) if v else math.nan for k, v in comp.items()}
    out: dict[str, float] = {}
    for c in docs["nll"]:
        out[f"loss:{c}"] = float(metric_of_means(f"loss:{c}", means))
        out[f"ppl:{c}"] = float(metric_of_means(f"ppl:{c}", means))
    out.update({f"acc:{q}": means[f"acc:{q}"] for q in docs.get("correct", {})})
    out.update({f"chat_acc:{q}": means[f"chat:{q}"] for q in docs.get("chat_correct", {})})
    return out


def needed_components(terms: Mapping[str, float]) -> list[str]:
    """The components (``nll:c``, ``tok:c``, ``acc:q``, ``chat:q``) an objective's ``terms`` read."""
    out = []
    for k in terms:
        kind, _, name = k.partition(":")
        out += [f"nll:{name}", f"tok:{name}"] if kind in ("loss", "ppl") else [k if kind != "chat_acc" else
                                                                                f"chat:{name}"]
    return list(dict.fromkeys(out))


def recovery_of_means(terms: Mapping[str, float], means: Mapping[str, Mapping[str, float]]) -> float:
    """Gain recovery R = (base − merged) / (base − mixture) of the objective ``terms`` from the component means of
    ``means["b"]`` (base), ``["o"]`` (merged) and ``["x"]`` (mixture); arrays of bootstrap draws work too."""
    b, o, x = (objective_of_means(terms, means[k]) for k in ("b", "o", "x"))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.divide(b - o, b - x)  # b == x: inf or nan, dropped by the bootstrap as non-finite
