"""The Merger protocol: what every consumer of a merged model (scorer, search, gradient sampler, workbench) needs.

    from optimer_lib.merging.merger import Merger
    def score(merger: Merger, weights: dict[str, float]) -> None:
        merger.set_weights(weights)          # the merged model now holds base + Σ w_i τ_i (or a method's merge)
        merger.model(...)                    # the live, merged model

Implemented by :class:`optimer_lib.merging.resident.ResidentMerger` (in-place linear merge),
:class:`optimer_lib.experiments.baselines.MethodMerger` (any registered merge method with its parameters), the
workbench's stoppable wrapper and the test fakes. It is the library's internal interface: front ends send weights,
never hold models.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Merger(Protocol):
    """A merged model whose weights can be set: ``names`` of the vectors, the live ``model``, ``set_weights``."""

    @property
    def names(self) -> list[str]:
        """The vector names, in order (the keys ``set_weights`` takes)."""
        ...

    @property
    def model(self) -> Any:
        """The merged model as of the last ``set_weights`` (a ``torch.nn.Module``)."""
        ...

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """Merge ``weights`` (vector name -> α) into ``model``."""
        ...
