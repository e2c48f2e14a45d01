"""Regenerate ``arith_mc.jsonl``: 4-way multiple-choice arithmetic from the embedded math dev split.

    python examples/lmeval/make_arith_mc.py            # rewrites examples/lmeval/arith_mc.jsonl

Each line is ``{"question": ..., "choices": [4 numbers as text], "label": index of the right one}``;
the questions and right answers are the first :data:`N_ITEMS` problems of ``assets/corpora/math/dev``
(the search split), the three wrong answers are near misses (±1, ±2, ±10, digits swapped) picked with
a fixed seed, so the file is the same on every run. ``arith_mc.yaml`` is the lm-eval task that reads it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

N_ITEMS = 32
SEED = 0
OUT = Path(__file__).resolve().parent / "arith_mc.jsonl"


def distractors(gold: int, rng: random.Random) -> list[int]:
    """Three distinct non-negative wrong answers close to ``gold``."""
    near = [gold + 1, gold - 1, gold + 2, gold - 2, gold + 10, gold - 10]
    swapped = int(str(gold)[::-1])
    if swapped != gold:
        near.append(swapped)
    pool = sorted({n for n in near if n >= 0 and n != gold})
    return rng.sample(pool, 3)


def items(n: int = N_ITEMS, seed: int = SEED) -> list[dict]:
    """The task's documents (what :func:`main` writes)."""
    from optimer_lib.data import load_corpus, qa_pairs

    rng = random.Random(seed)
    out = []
    for prompt, gold in qa_pairs(load_corpus("math", "dev"))[:n]:
        question = prompt.removeprefix("Question: ").removesuffix("\nAnswer:")
        choices = [int(gold), *distractors(int(gold), rng)]
        rng.shuffle(choices)
        out.append({"question": question, "choices": [str(c) for c in choices], "label": choices.index(int(gold))})
    return out


def main() -> None:
    OUT.write_text("".join(json.dumps(d) + "\n" for d in items()))
    print(f"wrote {OUT} ({N_ITEMS} items)")


if __name__ == "__main__":
    main()
