"""A vector pool opened for work: base model + distribution vectors + a resident merger.

    from optimer_lib.pool import open_pool
    pool = open_pool("assets/base", ["runs/demo/vectors/ja.safetensors", ...],
                     instruction="runs/demo/vectors/instruct.safetensors")
    pool.merger.set_weights({"ja": 0.3, "zh": 0.2, ...})   # rewrites pool.model in place
    pool.model.generate(...)

Every vector is validated against the base (tensor names, shapes, fingerprint) before any
model work starts, and all problems are reported at once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimer_lib.errors import VectorError
from optimer_lib.merge import ResidentMerger
from optimer_lib.models import load_model, load_tokenizer
from optimer_lib.vectors import DistributionVector, check_compatible, load_vector, state_fingerprint


@dataclass
class Pool:
    base_dir: Path
    model: Any
    tokenizer: Any
    vectors: list[DistributionVector]
    instruction: DistributionVector | None
    merger: ResidentMerger

    @property
    def names(self) -> list[str]:
        return [v.name for v in self.vectors]


def _load_checked(paths: Sequence[str | os.PathLike], base_state, fingerprint: str,
                  allow_mismatch: bool) -> list[DistributionVector]:
    vectors, problems = [], []
    for p in paths:
        try:
            vec = load_vector(p)
            check_compatible(vec, base_state, base_fingerprint=fingerprint,
                             allow_fingerprint_mismatch=allow_mismatch)
            vectors.append(vec)
        except VectorError as exc:
            problems.append(f"{p}: {exc}")
    names = [v.name for v in vectors]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        problems.append(f"several vectors are named {dupes}: rename one (optimer vector extract --name)")
    if problems:
        raise VectorError("\n  ".join(["cannot open the pool:", *problems]))
    return vectors


def open_pool(base: str | os.PathLike, vectors: Sequence[str | os.PathLike], *,
              instruction: str | os.PathLike | None = None, device: str = "cpu", dtype: str = "float32",
              allow_fingerprint_mismatch: bool = False) -> Pool:
    """Load the base, validate and load the vectors, and wrap the model in a ResidentMerger."""
    if not vectors:
        raise VectorError("no vectors given: pass at least one distribution vector file (--vector FILE)")
    model = load_model(base, dtype=dtype, device=device)
    tokenizer = load_tokenizer(base)
    state = model.state_dict()
    fp = state_fingerprint(state)
    vecs = _load_checked(vectors, state, fp, allow_fingerprint_mismatch)
    inst = _load_checked([instruction], state, fp, allow_fingerprint_mismatch)[0] if instruction else None
    merger = ResidentMerger(model, vecs, instruction=inst)
    return Pool(Path(base), model, tokenizer, vecs, inst, merger)
