"""Dev-set metrics for an in-memory model: per-distribution loss/perplexity and exact-match accuracy.

    from optimer_lib.scoring.evaluate import EvalSuite, evaluate_suite
    suite = EvalSuite(texts={"en": en_docs, "ja": ja_docs},
                      qa={"math": [("Question: What is 12 + 35?\\nAnswer:", "47")]})
    metrics = evaluate_suite(model, tokenizer, suite, limit=100)
    # {"loss:en": 3.1, "ppl:en": 22.2, "loss:ja": ..., "ppl:ja": ..., "acc:math": 0.4}
    scores = score_suite(model, tokenizer, suite, limit=8)          # per item: {"loss:en": SetScores, ...}
    for name, metrics, set_scores in stream_suite(model, tokenizer, suite, limit=8, qa_limit=8,
                                                  batch_size=4, should_stop=lambda: newer_request):
        ...                                                         # each set as it finishes; stops early

Every metric is computed from per-item scores (:class:`SetScores`: a document's summed NLL and token count, a
QA item's correctness), in one place, so intervals (:mod:`optimer_lib.scoring.uncertainty`) and the reported
numbers always agree.

``EvalSuite`` (named dev sets) lives in :mod:`optimer_lib.data` and is re-exported here.
``limit`` takes the *first* N items of every set, so two calls with limits 100 and 300 form the
paper's two-fidelity protocol (search on 100, re-score the top candidates on 300). The model is
used as is (no ``.eval()``/device moves); inputs follow the model's device.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import partial
from types import EllipsisType
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from optimer_lib.data import EvalSuite
from optimer_lib.errors import ConfigError, DataError
from optimer_lib.scoring.row_logits import row_logits


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


class Cancelled(Exception):
    """Scoring stopped because its ``should_stop`` callback said so (a newer request replaced it).

    Not an :class:`~optimer_lib.errors.OptimerError`: nothing went wrong. :func:`stream_suite` catches it and
    simply ends; the per-set functions below let it propagate to whoever passed ``should_stop``.
    """


StopCheck = Callable[[], bool]


def _check(should_stop: StopCheck | None) -> None:
    if should_stop is not None and should_stop():
        raise Cancelled


@dataclass(frozen=True)
class SetScores:
    """Per-item scores of one dev set: the numbers every metric of that set is computed from.

        s = text_scores(model, tokenizer, docs, name="en", limit=8)
        s.value        # Σtotal / Σcount: loss:en, exactly what evaluate_suite reports
        s.items        # per document mean NLL (nats per token), in dev-set order
        s.metrics()    # {"loss:en": ..., "ppl:en": ...}

    Item ``i`` is entry ``index[i]`` of the dev set (documents under 2 tokens are not scored, so absent).
    For a text set (``kind="loss"``) ``total[i]`` is the document's summed next-token NLL in nats and
    ``count[i]`` its predicted tokens, so the set's loss is token-weighted (a long document counts more, as in
    :func:`mean_token_loss`). For a QA set (``kind="acc"``) ``total[i]`` is 1.0 when the answer was right,
    0.0 otherwise, and ``count[i]`` is 1. A bootstrap resamples items and recomputes Σtotal / Σcount
    (:mod:`optimer_lib.scoring.uncertainty`). ``dataclasses.asdict`` / ``SetScores(**d)`` round-trip it (JSON).
    """

    name: str
    kind: str
    index: tuple[int, ...]
    total: tuple[float, ...]
    count: tuple[float, ...]

    def __post_init__(self) -> None:
        for attr in ("index", "total", "count"):  # lists from JSON become tuples: hashable and immutable
            object.__setattr__(self, attr, tuple(getattr(self, attr)))
        if self.kind not in ("loss", "acc"):
            raise ConfigError(f"SetScores kind must be 'loss' or 'acc', got {self.kind!r}")
        if not len(self.index) == len(self.total) == len(self.count):
            raise ConfigError(f"SetScores {self.key}: index, total and count differ in length "
                              f"({len(self.index)}, {len(self.total)}, {len(self.count)})")
        if not self.index:
            raise DataError(f"no items scored in dev set {self.name!r}")

    @property
    def key(self) -> str:
        """The set's metric: ``loss:<name>`` or ``acc:<name>``."""
        return f"{self.kind}:{self.name}"

    @property
    def value(self) -> float:
        return sum(self.total) / sum(self.count)

    @property
    def items(self) -> list[float]:
        """Per item score: a document's mean token loss, or a QA item's 1.0 / 0.0."""
        return [t / c for t, c in zip(self.total, self.count, strict=True)]

    def metrics(self) -> dict[str, float]:
        """``loss:<name>`` and ``ppl:<name>`` for a text set, ``acc:<name>`` for a QA set."""
        value = self.value
        if self.kind == "acc":
            return {self.key: value}
        return {self.key: value, f"ppl:{self.name}": math.exp(min(value, 700.0))}  # exp overflows past ~709


def _indexed_documents(model: Any, tokenizer: Any, texts: Sequence[str], seq_len: int,
                       limit: int | None) -> list[tuple[int, list[int]]]:
    subset = tuple(texts[:limit] if limit is not None else texts)
    if not subset:
        raise DataError("no documents to score: the dev set is empty (check the corpus split and the document limit)")
    max_pos = max_positions(model)
    seq_len = min(seq_len, max_pos) if max_pos else seq_len
    encoded = [(i, e) for i, e in enumerate(encoded_texts(tokenizer, subset, seq_len)) if len(e) >= 2]
    if not encoded:
        raise DataError("every dev document is shorter than 2 tokens; nothing to predict")
    return sorted(encoded, key=lambda ie: len(ie[1]), reverse=True)


def scored_documents(model: Any, tokenizer: Any, texts: Sequence[str], seq_len: int,
                     limit: int | None) -> list[list[int]]:
    """Token ids of the first ``limit`` documents as the loss scores them (see :func:`mean_token_loss`).

    bos first, truncated to ``seq_len`` and the model's position limit, documents under 2 tokens
    dropped, longest first (batches then hold similar lengths, little padding, and memory peaks early).
    """
    return [e for _, e in _indexed_documents(model, tokenizer, texts, seq_len, limit)]


def text_scores(model: Any, tokenizer: Any, texts: Sequence[str], *, name: str = "", seq_len: int = 128,
                batch_size: int = 16, limit: int | None = None, progress: bool = False,
                should_stop: StopCheck | None = None) -> SetScores:
    """Per-document summed NLL and predicted tokens of the first ``limit`` documents (see :class:`SetScores`).

    Documents are scored as :func:`scored_documents` lays them out, ``batch_size`` at a time;
    ``should_stop()`` is asked before every batch and raises :class:`Cancelled` when true.
    """
    docs = _indexed_documents(model, tokenizer, texts, seq_len, limit)
    device, pad = model_device(model), pad_token_id(tokenizer)
    total, count = [0.0] * len(docs), [0.0] * len(docs)
    starts = range(0, len(docs), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="loss", unit="batch", leave=False)
    with torch.inference_mode():
        for start in starts:
            _check(should_stop)
            batch = [e for _, e in docs[start:start + batch_size]]
            width = len(batch[0])
            # Right padding keeps real tokens at their natural positions; the causal mask means
            # they never see the pads that follow them.
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, seq in enumerate(batch):
                ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
                mask[row, :len(seq)] = 1
            ids, mask = ids.to(device), mask.to(device)
            # Targets shifted left with -100 (ignored) at pads and the last column: cross-entropy then runs
            # on each sequence's contiguous logits as they are.
            target = torch.full_like(ids, -100)
            target[:, :-1] = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            # A few sequences' logits at a time (row_logits): on a 49k-token vocabulary a batch's would be 0.4 GB.
            # Cross-entropy row by row: its log-softmax buffer is one sequence's.
            for row, logits in row_logits(model, ids, mask):
                nll = F.cross_entropy(logits.float(), target[row], ignore_index=-100, reduction="none")
                total[start + row] = float(nll.double().sum())  # float64 row sums: order-independent
                count[start + row] = float(len(batch[row]) - 1)
                del logits, nll  # no view left on the chunk when row_logits makes the next one
    order = sorted(range(len(docs)), key=lambda k: docs[k][0])  # back to dev-set order
    return SetScores(name, "loss", tuple(docs[k][0] for k in order), tuple(total[k] for k in order),
                     tuple(count[k] for k in order))


def mean_token_loss(model: Any, tokenizer: Any, texts: Sequence[str], *, seq_len: int = 128,
                    batch_size: int = 16, limit: int | None = None, progress: bool = False) -> float:
    """Token-weighted mean next-token NLL (nats) over the first ``limit`` documents.

    Each document is tokenised (bos first when the tokenizer has one) and truncated to ``seq_len``
    tokens (and to the model's position limit); padding never counts. ``exp`` of the result is the
    perplexity. Raises DataError when nothing is left to score. Per document: :func:`text_scores`.
    """
    return text_scores(model, tokenizer, texts, seq_len=seq_len, batch_size=batch_size, limit=limit,
                       progress=progress).value


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


def qa_scores(model: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]], *, name: str = "",
              limit: int | None = None, max_new_tokens: int = 8, batch_size: int = 32,
              should_stop: StopCheck | None = None) -> SetScores:
    """Per-item correctness (1.0 / 0.0) of greedy, batched, left-padded generation on (prompt, gold) pairs.

    Only the generated continuation is parsed (see :func:`answers_match`); ``should_stop()`` is asked before
    every batch and raises :class:`Cancelled` when true. See :class:`SetScores`.
    """
    subset = list(pairs[:limit] if limit is not None else pairs)
    if not subset:
        raise DataError("no QA pairs to score: the QA dev set is empty (check the split and the document limit)")
    encoded = sorted(((i, encode_text(tokenizer, p), g) for i, (p, g) in enumerate(subset)), key=lambda e: len(e[1]))
    device, pad = model_device(model), pad_token_id(tokenizer)
    correct = [0.0] * len(subset)
    with torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            _check(should_stop)
            batch = encoded[start:start + batch_size]
            width = max(len(e) for _, e, _ in batch)
            # Left padding: every prompt ends at the same column, so generation continues all rows.
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (_, seq, _) in enumerate(batch):
                ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
                mask[row, width - len(seq):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
            for text, (i, _, gold) in zip(texts, batch, strict=True):
                correct[i] = float(answers_match(text, gold))
    n = len(subset)
    return SetScores(name, "acc", tuple(range(n)), tuple(correct), (1.0,) * n)


def exact_match(model: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]], *, limit: int | None = None,
                max_new_tokens: int = 8, batch_size: int = 32) -> float:
    """Accuracy in [0, 1] of greedy, batched, left-padded generation on (prompt, gold) pairs.

    Only the generated continuation is parsed (see :func:`answers_match`); per item: :func:`qa_scores`.
    """
    return qa_scores(model, tokenizer, pairs, limit=limit, max_new_tokens=max_new_tokens,
                     batch_size=batch_size).value


class SetResult(NamedTuple):
    """One finished dev set, as :func:`stream_suite` yields it: ``for name, metrics, scores in ...``."""

    name: str
    metrics: dict[str, float]
    scores: SetScores


def stream_suite(model: Any, tokenizer: Any, suite: EvalSuite, *, limit: int | None = None,
                 qa_limit: int | None | EllipsisType = ..., seq_len: int = 128, batch_size: int = 16,
                 max_new_tokens: int = 8, names: Collection[str] | None = None,
                 should_stop: StopCheck | None = None) -> Iterator[SetResult]:
    """Score the sets of ``suite`` one by one, yielding each as it finishes (a UI draws partial results).

        for name, metrics, scores in stream_suite(model, tok, suite, limit=8, should_stop=lambda: newer):
            chart.update(metrics)            # {"loss:en": ..., "ppl:en": ...}; scores: per-item SetScores

    Text sets first, then QA sets (``qa_limit`` items each, default ``limit``), as :func:`evaluate_suite`.
    ``should_stop()`` is asked before every set and every batch: when it returns true the generator ends
    cleanly (no exception; the sets yielded so far stay valid), so a newer request can take the model.
    """
    qa_limit = limit if qa_limit is ... else qa_limit
    jobs: list[tuple[str, Callable[[], SetScores]]] = []
    for name, docs in suite.texts.items():
        if names is None or name in names:
            jobs.append((name, partial(text_scores, model, tokenizer, docs, name=name, seq_len=seq_len,
                                       batch_size=batch_size, limit=limit, should_stop=should_stop)))
    for name, pairs in suite.qa.items():
        if names is None or name in names:
            jobs.append((name, partial(qa_scores, model, tokenizer, pairs, name=name, limit=qa_limit,
                                       max_new_tokens=max_new_tokens, batch_size=batch_size,
                                       should_stop=should_stop)))
    for name, job in jobs:
        try:
            _check(should_stop)
            scores = job()
        except Cancelled:
            return
        yield SetResult(name, scores.metrics(), scores)


def score_suite(model: Any, tokenizer: Any, suite: EvalSuite, **kw: Any) -> dict[str, SetScores]:
    """Per-item scores of every set, keyed by metric (``loss:en``, ``acc:math``); ``kw`` as :func:`stream_suite`.

    Feed them to :func:`optimer_lib.scoring.uncertainty.bootstrap` for intervals.
    """
    return {r.scores.key: r.scores for r in stream_suite(model, tokenizer, suite, **kw)}


def evaluate_suite(model: Any, tokenizer: Any, suite: EvalSuite, *, limit: int | None = None,
                   seq_len: int = 128, batch_size: int = 16, max_new_tokens: int = 8,
                   names: Collection[str] | None = None) -> dict[str, float]:
    """Score every set of ``suite`` (or only those in ``names``).

    Returns ``loss:<name>`` and ``ppl:<name>`` for text sets and ``acc:<name>`` for QA tasks, each computed
    from the per-item scores (:func:`score_suite`, :meth:`SetScores.metrics`).
    """
    metrics: dict[str, float] = {}
    for result in stream_suite(model, tokenizer, suite, limit=limit, seq_len=seq_len, batch_size=batch_size,
                               max_new_tokens=max_new_tokens, names=names):
        metrics.update(result.metrics)
    return metrics
