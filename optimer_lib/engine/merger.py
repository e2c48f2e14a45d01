"""A :class:`~optimer_lib.merging.merger.Merger` backed by the engine: what a search scores trials with.

    merger = engine.merger(priority=SEARCH)          # or EngineMerger(engine, instruction_weight=1.0)
    try:
        run_search(merger, tokenizer, suite, objective, config)
    finally:
        merger.close()                               # hand the last trial's slot back

Each ``set_weights`` ends the previous lease and takes a new one at the merger's priority, so the slot is held
from one trial's merge to the next trial's: scoring never sees a slot another request re-merged, and between
trials every waiting interactive request goes first. ``cancel`` is every lease's cancel check (see
:meth:`MergeEngine.lease`): a workbench search passes one that raises once the user pressed Stop. ``merger.model``
is only valid after ``set_weights`` and before ``close``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

from optimer_lib.errors import ConfigError

if TYPE_CHECKING:
    from optimer_lib.engine.engine import Lease, MergeEngine


class EngineMerger:
    """Leases a slot per ``set_weights`` (see the module docstring); a context manager that closes itself."""

    def __init__(self, engine: MergeEngine, *, priority: int = 10, instruction_weight: float = 0.0,
                 method: str = "optimer", params: Mapping[str, object] | None = None,
                 cancel: Callable[[], None] | None = None) -> None:
        self.engine, self.priority, self.cancel = engine, int(priority), cancel
        self.instruction_weight, self.method, self.params = float(instruction_weight), method, dict(params or {})
        self.engine.state({}, self.instruction_weight, method=method, params=self.params)  # checked early
        self._stack: ExitStack | None = None
        self._lease: Lease | None = None

    @property
    def names(self) -> list[str]:
        return self.engine.names

    @property
    def model(self) -> Any:
        if self._lease is None:
            raise ConfigError("no merged model: call set_weights first (the engine lends a slot per set_weights)")
        return self._lease.model

    @property
    def lease_info(self) -> Lease | None:
        """The current lease (slot, vectors re-read, merge and wait seconds), or None."""
        return self._lease

    def set_weights(self, weights: Mapping[str, float], instruction_weight: float | None = None) -> None:
        iw = self.instruction_weight if instruction_weight is None else float(instruction_weight)
        state = self.engine.state(weights, iw, method=self.method, params=self.params)
        self.close()
        stack = ExitStack()
        self._lease = stack.enter_context(self.engine.lease(state, priority=self.priority, cancel=self.cancel))
        self._stack = stack

    def close(self) -> None:
        """End the current lease (idempotent)."""
        stack, self._stack, self._lease = self._stack, None, None
        if stack is not None:
            stack.close()

    def __enter__(self) -> EngineMerger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
