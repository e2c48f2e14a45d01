"""Compute threads yield the CPU to the web server's own threads.

    from optimer_lib.engine.priority import compute_thread
    threading.Thread(target=compute_thread(work), name="leased-map-0").start()

Why: on a machine with few cores the workbench's merge, scoring and chat threads keep every core busy for seconds,
while what a user waits for first is cheap work of the same process: the web server sending an instant estimate or
a chat token, and answering a page. With equal priorities the kernel shares the cores evenly between all of them.
A compute thread therefore lowers its own priority (Linux: a nice value per thread) when it starts, so it takes
the cores whenever the web threads do not want them; on an idle server nothing changes. Nice values order threads
within one scheduling group (an autogroup: the terminal session that started the server), so this does not take
cores from, or give cores to, other programs such as a browser. Only threads started for compute are lowered
(threads inherit the value of the thread that starts them, and an unprivileged process cannot raise it again):
Tune scoring (``leased_map``), chat generation (``batching``) and workbench searches, never the web server's
workers. ``OPTIMER_COMPUTE_NICE`` sets the value (default 5; 0 turns it off).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


def compute_nice() -> int:
    """The nice value compute threads take (``OPTIMER_COMPUTE_NICE``, default 5, 0 = leave them as they are)."""
    try:
        return max(0, min(19, int(os.environ.get("OPTIMER_COMPUTE_NICE", "5"))))
    except ValueError:
        return 5


def lower_this_thread(nice: int | None = None) -> int | None:
    """Give the calling thread at least ``nice`` (default :func:`compute_nice`); returns its nice value afterwards,
    or None where threads have no priority of their own to set (not Linux) or setting it failed."""
    nice = compute_nice() if nice is None else nice
    if not hasattr(os, "setpriority") or not os.path.isdir("/proc/self/task"):  # per-thread nice is Linux's
        return None
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        if nice > current:  # never raised: a thread started by a lowered one keeps its value, not twice it
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        return os.getpriority(os.PRIO_PROCESS, tid)
    except OSError:
        return None


def compute_thread(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn``, run at compute priority (:func:`lower_this_thread`): the target of a thread that merges or scores."""

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        lower_this_thread()
        return fn(*args, **kwargs)

    return run
