"""Dev-set metrics for an in-memory model: per-distribution loss/perplexity and exact-match accuracy.

    from optimer_lib.scoring.evaluate import EvalSuite, evaluate_suite
    suite = EvalSuite(texts={"en": en_docs, "ja": ja_docs},
                      qa={"math": [("Question: What is 12 + 35?\\nAnswer:", "47")]})
    metrics = evaluate_suite(model, tokenizer, suite, limit=100)
    # {"loss:en": 3.1, "ppl:en": 22.2, "loss:ja": ..., "ppl:ja": ..., "acc:math": 0.4}

``EvalSuite`` (named dev sets) lives in :mod:`optimer_lib.data` and is re-exported here.
``limit`` takes the *first* N items of every set, so two calls with limits 100 and 300 form the
paper's two-fidelity protocol (search on 100, re-score the top candidates on 300). The model is
used as is (no ``.eval()``/device moves); inputs follow the model's device.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Collection, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

import torch
import torch.nn.functional as F

from optimer_lib.data import EvalSuite
from optimer_lib.errors import DataError


def model_device(model: Any) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def max_positions(model: Any) -> int | None:
    """The model's context length from its config (None when it does not say)."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def encode_text(tokenizer: Any, text: str) -> list[int]:
    # add_special_tokens=False + explicit bos gives the same layout for every tokenizer family
    # (some add bos themselves, some add eos, some nothing).
    ids = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos, *ids] if bos is not None else ids


# A search scores the same dev set hundreds of times; tokenising it once saves most of the CPU
# time of small models. Keys hold a strong reference to the tokenizer (so its id cannot be reused)
# and the texts themselves (equality check: str hashes are cached, so this is cheap).
_CACHE: OrderedDict[tuple, tuple[Any, tuple[str, ...], list[list[int]]]] = OrderedDict()
_CACHE_SIZE = 32


def encoded_texts(tokenizer: Any, texts: tuple[str, ...], seq_len: int) -> list[list[int]]:
    key = (id(tokenizer), seq_len, len(texts), hash(texts))
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is tokenizer and hit[1] == texts:
        _CACHE.move_to_end(key)
        return hit[2]
    encoded = [encode_text(tokenizer, t)[:seq_len] for t in texts]
    _CACHE[key] = (tokenizer, texts, encoded)
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return encoded


def pad_token_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def scored_documents(model: Any, tokenizer: Any, texts: Sequence[str], seq_len: int,
                     limit: int | None) -> list[list[int]]:
    """Token ids of the first ``limit`` documents as the loss scores them (see :func:`mean_token_loss`).

    bos first, truncated to ``seq_len`` and the model's position limit, documents under 2 tokens
    dropped, longest first (batches then hold similar lengths, little padding, and memory peaks early).
    """
    subset = tuple(texts[:limit] if limit is not None else texts)
    if not subset:
        raise DataError("no documents to score: the dev set is empty (check the corpus split or --limit)")
    max_pos = max_positions(model)
    seq_len = min(seq_len, max_pos) if max_pos else seq_len
    encoded = [e for e in encoded_texts(tokenizer, subset, seq_len) if len(e) >= 2]
    if not encoded:
        raise DataError("every dev document is shorter than 2 tokens; nothing to predict")
    return sorted(encoded, key=len, reverse=True)


def mean_token_loss(model: Any, tokenizer: Any, texts: Sequence[str], *, seq_len: int = 128,
                    batch_size: int = 16, limit: int | None = None, progress: bool = False) -> float:
    """Token-weighted mean next-token NLL (nats) over the first ``limit`` documents.

    Each document is tokenised (bos first when the tokenizer has one) and truncated to ``seq_len``
    tokens (and to the model's position limit); padding never counts. ``exp`` of the result is the
    perplexity. Raises DataError when nothing is left to score.
    """
    encoded = scored_documents(model, tokenizer, texts, seq_len, limit)
    device, pad = model_device(model), pad_token_id(tokenizer)
    starts = range(0, len(encoded), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="loss", unit="batch", leave=False)
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in starts:
            batch = encoded[start:start + batch_size]
            width = len(batch[0])
            # Right padding keeps real tokens at their natural positions; the causal mask means
            # they never see the pads that follow them.
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, seq in enumerate(batch):
                ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
                mask[row, :len(seq)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits
            # Targets shifted left with -100 (ignored) at pads and the last column: cross-entropy then runs
            # on the contiguous logits as they are (slicing off the last position would copy all of them,
            # ~10% of the scoring time of the embedded model, see bench/eval_throughput.py).
            target = torch.full_like(ids, -100)
            target[:, :-1] = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                                           ignore_index=-100, reduction="sum"))
            count += int((target != -100).sum())
    return total / count


_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")
_PUNCT = ".,;:!?\"'()[]{}"


def parse_answer(text: str) -> str | None:
    """The first number in ``text`` with thousands separators removed ("1,234." -> "1234"), else None.

    Integers, decimals and negatives are recognised; compare two parsed answers with
    :func:`answers_match` (numeric, so "-3.50" equals "-3.5").
    """
    found = _NUMBER.search(text)
    return found.group(0).replace(",", "") if found else None


def _as_number(text: str | None) -> Decimal | None:
    if text is None:
        return None
    try:
        value = Decimal(text.strip().replace(",", ""))
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def answers_match(output: str, gold: str) -> bool:
    """Whether a generated continuation answers ``gold``.

    Numeric gold: the first number in ``output`` must equal it numerically. Otherwise the first
    whitespace tokens of ``output`` (as many as ``gold`` has, outer punctuation stripped) must equal
    ``gold`` exactly.
    """
    gold_num = _as_number(gold)
    if gold_num is not None:
        got = _as_number(parse_answer(output))
        return got is not None and got == gold_num
    want = gold.split()
    got = output.split()[:len(want)]
    return [w.strip(_PUNCT) for w in got] == [w.strip(_PUNCT) for w in want]


def exact_match(model: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]], *, limit: int | None = None,
                max_new_tokens: int = 8, batch_size: int = 32) -> float:
    """Accuracy in [0, 1] of greedy, batched, left-padded generation on (prompt, gold) pairs.

    Only the generated continuation is parsed (see :func:`answers_match`).
    """
    subset = list(pairs[:limit] if limit is not None else pairs)
    if not subset:
        raise DataError("no QA pairs to score: the QA dev set is empty (check the split or --limit)")
    encoded = sorted(((encode_text(tokenizer, p), g) for p, g in subset), key=lambda e: len(e[0]))
    device, pad = model_device(model), pad_token_id(tokenizer)
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start:start + batch_size]
            width = max(len(e) for e, _ in batch)
            # Left padding: every prompt ends at the same column, so generation continues all rows.
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (seq, _) in enumerate(batch):
                ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
                mask[row, width - len(seq):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
            correct += sum(answers_match(text, gold) for text, (_, gold) in zip(texts, batch, strict=True))
    return correct / len(subset)


def evaluate_suite(model: Any, tokenizer: Any, suite: EvalSuite, *, limit: int | None = None,
                   seq_len: int = 128, batch_size: int = 16, max_new_tokens: int = 8,
                   names: Collection[str] | None = None) -> dict[str, float]:
    """Score every set of ``suite`` (or only those in ``names``).

    Returns ``loss:<name>`` and ``ppl:<name>`` for text sets and ``acc:<name>`` for QA tasks.
    """
    metrics: dict[str, float] = {}
    for name, docs in suite.texts.items():
        if names is None or name in names:
            loss = mean_token_loss(model, tokenizer, docs, seq_len=seq_len, batch_size=batch_size, limit=limit)
            metrics[f"loss:{name}"] = loss
            metrics[f"ppl:{name}"] = math.exp(min(loss, 700.0))  # exp overflows past ~709
    for name, pairs in suite.qa.items():
        if names is None or name in names:
            metrics[f"acc:{name}"] = exact_match(model, tokenizer, pairs, limit=limit,
                                                 max_new_tokens=max_new_tokens, batch_size=batch_size)
    return metrics
