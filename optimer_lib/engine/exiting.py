"""Interpreter exit while engine leases still run: end them first.

A background score, a search trial or a chat reply runs in a daemon thread. A daemon thread still inside a torch
op when the process exits aborts it ("terminate called without an active exception", exit 134). So every engine
registers here (:func:`watch`), and at exit :data:`EXITING` is set: each lease raises :class:`EngineExiting` at
its next transformer block (``MergeEngine._check_cancel``), waiting requests leave without a slot
(``MergeEngine._acquire``), and the exit waits up to :data:`EXIT_WAIT_S` for the threads that held a lease, its
merge included, to unwind.
"""

from __future__ import annotations

import atexit
import threading
import time
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from optimer_lib.engine.engine import MergeEngine

EXIT_WAIT_S = 5.0  # at interpreter exit, how long leases get to end (each stops at its next transformer block)
EXITING = threading.Event()
_ENGINES: weakref.WeakSet[MergeEngine] = weakref.WeakSet()


class EngineExiting(KeyboardInterrupt):
    """Raised in a thread holding a lease once the interpreter exits: a search marks its trial interrupted."""


def watch(engine: MergeEngine) -> None:
    """End ``engine``'s leases before the interpreter ends (held weakly: a dropped engine is forgotten)."""
    _ENGINES.add(engine)


@atexit.register
def _end_leases_at_exit() -> None:
    EXITING.set()
    hook = threading.excepthook
    threading.excepthook = lambda a: None if issubclass(a.exc_type, EngineExiting) else hook(a)  # expected: quiet
    deadline = time.monotonic() + EXIT_WAIT_S
    holders = [t for engine in list(_ENGINES) for t in engine._wake_for_exit()]
    for thread in holders:  # the lease's end is not the thread's: it still unwinds through torch frames
        thread.join(max(0.0, deadline - time.monotonic()))
