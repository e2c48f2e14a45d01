"""Per-row token choice for batched generation: each reply samples with its own settings and its own seed.

    from optimer_lib.engine.sampling import Sampling, RowSampler
    rows = [Sampling(48, temperature=0.8, top_p=0.95, seed=7), Sampling(12)]    # a sampled row, a greedy row
    model.generate(input_ids=..., attention_mask=..., do_sample=False,
                   logits_processor=LogitsProcessorList([RowSampler(rows)]), max_new_tokens=48)

``generate`` runs greedy (``do_sample=False``); :class:`RowSampler` is the last logits processor and returns,
for every row, scores that are 0 at the token it picked and -inf elsewhere, so the argmax is that token. A
sampled row applies temperature, top-k and top-p (transformers' order and definitions) and draws from a CPU
``torch.Generator`` seeded with the row's seed, one draw per step of that row. So a reply depends on its
prompt, its settings and its seed only, never on which other replies share its batch (up to the float rounding
of batched matrix products, far below the gaps between token probabilities in practice).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor


@dataclass(frozen=True)
class Sampling:
    """How one reply picks tokens: ``temperature`` 0 takes the argmax (greedy); else temperature, top-k (0: off;
    50 is transformers' default) and top-p, then a draw seeded by ``seed``. At most ``max_new_tokens`` tokens."""

    max_new_tokens: int = 48
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    top_k: int = 50

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def candidates(scores: torch.Tensor, rows: Sequence[Sampling]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token probabilities over each row's top-k candidates after temperature and top-p, and the candidates'
    token ids: ``(probs, ids)``, both ``[len(rows), k]`` (rows must share ``top_k``).

    The same distribution as filtering the whole vocabulary, at a fraction of the cost: top-p sorts k scores, not
    the vocabulary. Every operation works row by row, so a row's result does not depend on the other rows.
    """
    logits = scores.detach().to("cpu", torch.float32)
    logits = logits / torch.tensor([s.temperature for s in rows])[:, None]
    k = rows[0].top_k if 0 < rows[0].top_k < logits.shape[-1] else logits.shape[-1]
    best, ids = torch.topk(logits, k)  # descending
    top_p = torch.tensor([s.top_p for s in rows])[:, None]
    # drop the least likely tokens whose total probability is at most 1 - top_p (transformers' rule); keep one
    drop = best.flip(-1).softmax(-1).cumsum(-1).flip(-1) <= 1 - top_p
    drop[:, 0] = False
    return best.masked_fill(drop & (top_p < 1), -float("inf")).softmax(-1), ids


def draw(probs: torch.Tensor, ids: torch.Tensor, s: Sampling, generator: torch.Generator) -> int:
    """One row's token: a draw from its candidates' ``probs`` with its own ``generator``."""
    return int(ids[torch.multinomial(probs, 1, generator=generator)])


def pick(scores: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> int:
    """The token one row takes from its next-token ``scores`` (1-D): argmax when greedy, else one seeded draw
    (what :class:`RowSampler` does for that row in any batch)."""
    if s.greedy or generator is None:
        return int(torch.argmax(scores))
    probs, ids = candidates(scores[None], [s])
    return draw(probs[0], ids[0], s, generator)


class RowSampler(LogitsProcessor):
    """Pick every row's next token by its own :class:`Sampling` and force it (see the module docstring).

    ``skip(i)``: row ``i`` is finished (its reader is gone, or it hit its own length or end-of-text): no draw,
    the argmax stands in for a token nobody reads. ``on_error(i, exc)``: drawing row ``i``'s token failed; that
    row gets the argmax too (the caller ends it) and the other rows go on. Filtering runs on all sampled rows at
    once (per top-k), the draws row by row, each from the row's own generator.
    """

    def __init__(self, rows: Sequence[Sampling], skip: Callable[[int], bool] | None = None,
                 on_error: Callable[[int, BaseException], None] | None = None) -> None:
        self.rows = list(rows)
        self.generators = [None if s.greedy else torch.Generator().manual_seed(int(s.seed)) for s in self.rows]
        self.skip = skip or (lambda i: False)
        self.on_error = on_error

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        tokens = scores.argmax(-1).tolist()  # greedy rows and finished ones
        sampled = [i for i, s in enumerate(self.rows) if not s.greedy and not self.skip(i)]
        for k in sorted({self.rows[i].top_k for i in sampled}):
            group = [i for i in sampled if self.rows[i].top_k == k]
            probs, ids = candidates(scores[group], [self.rows[i] for i in group])
            for j, i in enumerate(group):
                try:
                    tokens[i] = draw(probs[j], ids[j], self.rows[i], self.generators[i])
                except Exception as exc:  # this row's failure, not the batch's
                    if self.on_error is None:
                        raise
                    self.on_error(i, exc)
        forced = torch.full_like(scores, -float("inf"))
        forced[torch.arange(len(tokens)), torch.tensor(tokens)] = 0.0
        return forced
