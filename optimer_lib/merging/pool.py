"""A vector pool opened for work: base model + distribution vectors + a resident merger.

    from optimer_lib.merging.pool import open_pool
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

from optimer_lib.checkpoints.mapped import base_load_args, copy_to
from optimer_lib.checkpoints.models import load_model, load_tokenizer, resolve_device
from optimer_lib.checkpoints.vectors import DistributionVector, check_compatible, load_vector, state_fingerprint
from optimer_lib.errors import ConfigError, VectorError
from optimer_lib.merging.resident import ResidentMerger


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


def _raise_problems(problems: list[str]) -> None:
    """One problem: one line; several: one line each (every problem is reported at once)."""
    if len(problems) == 1:
        raise VectorError(f"cannot open the pool: {problems[0]}")
    if problems:
        raise VectorError("\n  ".join(["cannot open the pool:", *problems]))


def _load_files(paths: Sequence[str | os.PathLike]) -> tuple[list[DistributionVector], list[str]]:
    """Read every vector file (existence, format, NaN/Inf) before any model is loaded."""
    vectors, problems = [], []
    for p in paths:
        try:
            vectors.append(load_vector(p))
        except VectorError as exc:
            problems.append(f"{p}: {exc}")
    names = [v.name for v in vectors]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        problems.append(f"several vectors are named {dupes}: rename one (optimer vector extract --name)")
    return vectors, problems


def _check_all(vectors: Sequence[DistributionVector], base_state, fingerprint: str, allow_mismatch: bool) -> None:
    problems = []
    for vec in vectors:
        try:
            check_compatible(vec, base_state, base_fingerprint=fingerprint, allow_fingerprint_mismatch=allow_mismatch)
        except VectorError as exc:
            problems.append(f"{vec.path or vec.name}: {exc}")
    _raise_problems(problems)


def load_checked(base: str | os.PathLike, vectors: Sequence[str | os.PathLike], *,
                 instruction: str | os.PathLike | None = None, device: str = "cpu", dtype: str = "float32",
                 allow_fingerprint_mismatch: bool = False, trust_remote_code: bool = False
                 ) -> tuple[Any, Any, list[DistributionVector], DistributionVector | None]:
    """``(base model, tokenizer, vectors, instruction vector)``, every vector checked against the base.

    The vector files are read (format, NaN/Inf, duplicate names) before the model is loaded, then checked
    against it (names, shapes, base fingerprint); every problem is reported at once as a VectorError.
    """
    if not vectors:
        raise VectorError("no vectors given: pass at least one distribution vector file (--vector FILE)")
    vecs, problems = _load_files(vectors)
    insts, inst_problems = _load_files([instruction]) if instruction else ([], [])
    _raise_problems(problems + inst_problems)
    model = load_model(base, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(base, trust_remote_code=trust_remote_code)
    state = model.state_dict()
    _check_all([*vecs, *insts], state, state_fingerprint(state), allow_fingerprint_mismatch)
    return model, tokenizer, vecs, insts[0] if insts else None


def open_pool(base: str | os.PathLike, vectors: Sequence[str | os.PathLike], *,
              instruction: str | os.PathLike | None = None, device: str = "cpu", dtype: str = "float32",
              allow_fingerprint_mismatch: bool = False, trust_remote_code: bool = False,
              base_on: str = "device") -> Pool:
    """Read the vectors, load the base, validate the vectors against it (:func:`load_checked`), and wrap it in a
    ResidentMerger.

    ``base_on="host"``: the base stays on the CPU, memory-mapped, and ``pool.model`` is a copy of it on ``device``
    that the merger rewrites reading the host base and streaming the vectors; the device then holds one model
    instead of the model plus a copy of every merged tensor's base (``"device"``, the default)."""
    if base_on not in ("host", "device"):
        raise ConfigError(f"base_on must be 'host' or 'device', got {base_on!r}: for the automatic choice, pass "
                          "optimer_lib.engine.host_base.pool_base_on(None, base, vectors, device=...) (what "
                          "`optimer search --base-on auto` does)")
    host = base_on == "host"
    where, dt = base_load_args(base_on, device, dtype)
    model, tokenizer, vecs, inst = load_checked(base, vectors, instruction=instruction, dtype=dt, device=where,
                                                allow_fingerprint_mismatch=allow_fingerprint_mismatch,
                                                trust_remote_code=trust_remote_code)
    if host:
        base_state = dict(model.state_dict())
        model = copy_to(model, resolve_device(device))
        merger = ResidentMerger(model, vecs, instruction=inst, base=base_state, stream_deltas=True)
    else:
        merger = ResidentMerger(model, vecs, instruction=inst)
    return Pool(Path(base), model, tokenizer, vecs, inst, merger)
