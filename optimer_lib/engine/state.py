"""What a slot holds: the weights, the instruction weight and the merge method with its parameters.

    from optimer_lib.engine.state import MergeState
    a = MergeState.of(["ja", "code"], {"ja": 0.3})             # missing names get 0
    b = a.with_weights({"ja": 0.3, "code": 0.2})
    a.changes_to(b)                                           # 1: only code's α moves (a linear re-merge)

States are hashable, so identical requests share a slot and a cached result. Per-layer-group weights are
``name@group`` keys (:mod:`optimer_lib.merging.groups`), kept after the plain names in sorted order:
``MergeState.of(["ja"], {"ja": 0.3, "ja@blocks0-1": 0.5})``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from optimer_lib.errors import ConfigError
from optimer_lib.merging import groups
from optimer_lib.merging.methods import check_method_params

LINEAR = ("optimer", "linear")


@dataclass(frozen=True)
class MergeState:
    """A merge, fully described: ``weights`` in vector order, ``instruction_weight``, ``method`` and ``params``."""

    weights: tuple[tuple[str, float], ...]
    instruction_weight: float = 0.0
    method: str = "optimer"
    params: tuple[tuple[str, object], ...] = ()

    @classmethod
    def of(cls, names: Sequence[str], weights: Mapping[str, float], instruction_weight: float = 0.0,
           method: str = "optimer", params: Mapping[str, object] | None = None) -> MergeState:
        """A state over the pool's ``names``: names missing from ``weights`` get 0, unknown ones are refused;
        ``name@group`` keys (per-layer-group weights) are checked and kept after the plain names."""
        unknown = sorted({groups.split_key(k)[0] for k in weights} - set(names))
        if unknown:
            raise ConfigError(f"unknown vector(s) {unknown}: the pool has {list(names)}")
        grouped = sorted(k for k in weights if groups.SEP in k)
        if grouped:
            groups.resolve(names, {k: weights[k] for k in grouped})  # group names, overlaps, values
        ws = tuple((n, float(weights.get(n, 0.0))) for n in names) + tuple((k, float(weights[k])) for k in grouped)
        bad = [n for n, w in ws if not math.isfinite(w)]
        if bad or not math.isfinite(float(instruction_weight)):
            raise ConfigError(f"weights must be finite numbers, got {dict(weights)} (instruction "
                              f"{instruction_weight})")
        params = dict(params or {})
        check_method_params(method, params)
        return cls(ws, float(instruction_weight), method, tuple(sorted(params.items())))

    @property
    def weight_map(self) -> dict[str, float]:
        return dict(self.weights)

    @property
    def grouped(self) -> bool:
        """Whether the state has per-layer-group weights (``name@group`` keys)."""
        return any(groups.SEP in n for n, _ in self.weights)

    @property
    def param_map(self) -> dict[str, object]:
        return dict(self.params)

    @property
    def linear(self) -> bool:
        return self.method in LINEAR

    def with_weights(self, weights: Mapping[str, float], instruction_weight: float | None = None) -> MergeState:
        iw = self.instruction_weight if instruction_weight is None else instruction_weight
        names = [n for n, _ in self.weights if groups.SEP not in n]
        return MergeState.of(names, weights, iw, self.method, self.param_map)

    def changes_to(self, other: MergeState) -> int:
        """Vectors a re-merge from ``self`` to ``other`` must read: the changed α of a linear merge (the
        instruction counts as one), or every vector when the method or its parameters differ, or when either
        method is non-linear (those re-merge fully)."""
        full = len(self.weights) + 1
        if self == other:
            return 0
        if not (self.linear and other.linear) or self.params != other.params:
            return full
        a, b = self.weight_map, other.weight_map
        moved = {groups.split_key(k)[0] for k in {*a, *b} if a.get(k) != b.get(k)}  # a group key: its vector
        return len(moved) + (self.instruction_weight != other.instruction_weight)
