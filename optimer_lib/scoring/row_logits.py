"""Next-token logits a few sequences at a time, so scoring never holds a whole batch's logits.

    for row, logits in row_logits(model, ids, mask):   # logits: (seq, vocab) of sequence ``row``
        nll = F.cross_entropy(logits.float(), target[row], ignore_index=-100, reduction="none")

Why: on a 49k-token vocabulary the fp32 logits of one batch of 16 × 128 tokens take 0.4 GB. On SmolLM2 that was
most of what a scoring lease held beyond its slot, and two leases scoring at once (a slider and a background
score on a 2-core machine) pushed the workbench's peak 0.4 GB above base + slots (issue 15). Here the decoder runs
once per batch and the LM head (the output embeddings) on as many sequences as :data:`HEAD_CHUNK_BYTES` of logits
hold (5 sequences of 128 tokens on SmolLM2, at least one): the same products, so the same values. Not one sequence
per call: the head's weight (vocab × hidden) is then read once per sequence, which made scoring SmolLM2 5% slower
on a CPU core (bench/tune_set_time.py; 4–5 sequences per call cost nothing).

The split is used only where a model's logits are exactly ``head(last hidden state)``. Some architectures transform
them after the head (Gemma's soft-capping, Cohere's logit scale), and wrappers may not expose a decoder. So the
split is checked once per model class and config on a short probe against the model's own forward; a model that
fails falls back to one full forward per batch, as before. Either way the forward keeps no key/value cache
(``use_cache=False``): scoring never generates, and the cache of a batch of 16 × 128 tokens is 0.1 GB on SmolLM2.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

# config.json keys of architectures that transform their logits after the head (Gemma 2's soft-capping, Cohere's
# logit scale, Granite's logits scaling). The run-time probe decides for a loaded model; capacity planning, which
# reads only the config, uses this list to count a batch's logits for them.
POST_HEAD_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling")

# (model class, config as JSON) -> whether head(decoder(x).last_hidden_state) reproduces model(x).logits
_SPLIT_OK: dict[tuple[type, str], bool] = {}
_PROBE_TOKENS = 6
HEAD_CHUNK_BYTES = 128 * 2**20  # logits per LM-head call (one sequence's at least)
# Logits after the head are the same products in a different batch shape, so they agree to rounding; a transform
# such as soft-capping at 30 moves a logit of 10 by 0.35.
_RTOL = {torch.float32: 1e-4, torch.float64: 1e-8}
_RTOL_LOW_PRECISION = 2e-2  # bf16 / fp16: a few ulps of the largest logit


def _parts(model: Any) -> tuple[Any, Any] | None:
    """The decoder and LM head of a Hugging Face causal LM, or None when it does not have both."""
    decoder = getattr(model, "base_model", None)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if decoder is None or decoder is model or not isinstance(head, torch.nn.Module):
        return None
    return decoder, head


def _hidden(decoder: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = decoder(input_ids=ids, attention_mask=mask, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _config_key(model: Any) -> str:
    cfg = getattr(model, "config", None)
    to_json = getattr(cfg, "to_json_string", None)
    return to_json() if callable(to_json) else repr(cfg)


def chunk_rows(seq_len: int, vocab_size: int, itemsize: int = 4) -> int:
    """Sequences of ``seq_len`` tokens per LM-head call: as many as :data:`HEAD_CHUNK_BYTES` of logits hold (≥ 1)."""
    return max(1, HEAD_CHUNK_BYTES // max(1, seq_len * vocab_size * itemsize))


def splits_by_config(config: Mapping[str, Any] | Any) -> bool:
    """Whether a model with this config (``config.json`` as a dict, or a loaded model's ``config``; None: nothing
    said) may score a chunk of sequences' logits at a time, as far as its config says (no :data:`POST_HEAD_KEYS`
    transform); :func:`splits` also checks the loaded model itself."""
    def get(key: str) -> Any:
        return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)

    return all(get(k) in (None, 1, 1.0) for k in POST_HEAD_KEYS)


def splits(model: Any) -> bool:
    """Whether :func:`row_logits` runs ``model``'s head on chunks of sequences: its config names no transform after
    the head and a probe agrees (checked once per class, config, dtype, device type and train/eval mode)."""
    parts = _parts(model)
    if parts is None:
        return False
    try:
        param = next(model.parameters())
    except (StopIteration, TypeError):
        return False
    key = (type(model), _config_key(model), param.dtype, param.device.type, bool(getattr(model, "training", False)))
    if key not in _SPLIT_OK:
        try:
            ok = splits_by_config(getattr(model, "config", None)) and _probe(model, *parts, param)
        except torch.OutOfMemoryError:
            return False  # not now; asked again next batch (a second lease may hold the memory)
        _SPLIT_OK[key] = ok
    return _SPLIT_OK[key]


def _probe(model: Any, decoder: Any, head: Any, param: torch.Tensor) -> bool:
    """Whether ``head(decoder(x))`` reproduces ``model(x).logits`` on a short probe (False if it cannot run)."""
    try:
        vocab = int(head.weight.shape[0])
        ids = (torch.arange(_PROBE_TOKENS, device=param.device) * 7919 % vocab).unsqueeze(0)
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            want = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[0].float()
            got = head(_hidden(decoder, ids, mask)[0]).float()
            rtol = _RTOL.get(param.dtype, _RTOL_LOW_PRECISION)
            return got.shape == want.shape and bool(
                (got - want).abs().max() <= rtol * max(1.0, float(want.abs().max())))
    except torch.OutOfMemoryError:
        raise
    except Exception:  # noqa: BLE001 - any model the split cannot drive keeps the full forward
        return False


def row_logits(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """``(row, logits of sequence row)`` for every sequence of the batch ``ids`` (attention ``mask``), in order.

    The logits of :func:`chunk_rows` sequences at a time where :func:`splits` says the model allows it; otherwise
    the batch's logits from one forward, handed out row by row. Call it under ``torch.inference_mode()``.
    """
    parts = _parts(model) if splits(model) else None
    if parts is None:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        for row in range(ids.shape[0]):
            yield row, logits[row]
        return
    decoder, head = parts
    hidden = _hidden(decoder, ids, mask)
    step = chunk_rows(ids.shape[1], int(head.weight.shape[0]), head.weight.element_size())
    for start in range(0, ids.shape[0], step):
        logits = head(hidden[start:start + step])
        for k in range(logits.shape[0]):
            yield start + k, logits[k]
        del logits  # before the next chunk's are made
