"""One merge's jobs on several slots at once: :func:`leased_map`.

    jobs = [lambda model, stopped: score(model, dev_set) for dev_set in sets]
    for index, value, lease in leased_map(engine, state, jobs, workers=2, should_stop=lambda: newer_move):
        ...   # each job's value as soon as a lease finishes it (in finishing order, not job order)

Why: on a CPU the engine runs one lease per core (``MergeEngine.concurrency``). A Tune move scored on one lease
left the second core idle, or to a background score nobody waits for, while the user waited for five dev sets
one after another. Here up to ``workers`` leases of the same merge share the jobs: each lease takes the next job
when it finishes one (work stealing), so a lease that gets its turn late (the other slot busy with another
user's request) takes only what is left, and one that gets its turn after the last job was taken ends before it
merges anything (its lease's cancel check refuses it). A lease waiting at ``INTERACTIVE`` priority preempts a
background score or a search trial at its next transformer block, as any interactive request does. Memory does
not grow: the leases are the engine's slots, at most ``concurrency`` of them scoring at once as before.

A job's value is the same on whichever slot ran it: the slots hold the same merge (incremental fp32 updates agree
with a fresh merge to ~1e-7 relative, see ``tests/test_engine.py``).
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from optimer_lib.engine.engine import INTERACTIVE, Lease, MergeEngine
from optimer_lib.engine.priority import compute_thread
from optimer_lib.engine.state import MergeState

T = TypeVar("T")
Job = Callable[[Any, Callable[[], bool]], T]  # (model, stopped) -> value; return early once stopped() is true


class _NothingLeft(Exception):
    """A helper lease whose turn came after the last job was taken: it ends before merging."""


def leased_map(engine: MergeEngine, state: MergeState, jobs: Sequence[Job], *, priority: int = INTERACTIVE,
               workers: int = 1, should_stop: Callable[[], bool] | None = None,
               on_complete: Callable[[list[Any]], None] | None = None) -> Iterator[tuple[int, Any, Lease]]:
    """Run ``jobs`` on up to ``workers`` leases of ``state``; yield ``(index, value, lease)`` as each finishes.

    Each job is called as ``job(model, stopped)``: ``stopped()`` turns true once ``should_stop()`` does or the
    caller closed this generator, and a job should then return early (its value is still yielded; no further job
    starts). ``on_complete(values)`` (values in job order) runs once, when every job has finished, inside the lease
    that finished the last one: what it caches is there before that lease's slot serves anyone else. A job's
    exception ends the map: it is raised here, after the other leases were told to stop. The map ends with the
    last job's value, even while a helper lease still waits for its turn (it then ends without merging).
    """
    n = len(jobs)
    if n == 0:
        return
    pending, lock, closed = deque(range(n)), threading.Lock(), threading.Event()
    values: list[Any] = [None] * n
    finished = [0]
    out: queue.Queue[tuple[str, Any]] = queue.Queue()

    def stopped() -> bool:
        return closed.is_set() or (should_stop is not None and bool(should_stop()))

    def take() -> int | None:
        with lock:
            return pending.popleft() if pending and not stopped() else None

    def work(helper: bool) -> None:
        started = threading.Event()

        def nothing_left() -> None:  # the lease's cancel check: before its merge, and before every block after
            if not started.is_set() and (stopped() or (helper and not pending)):
                raise _NothingLeft  # stopped, or late: no merge for work nobody needs

        try:
            with engine.lease(state, priority=priority, cancel=nothing_left) as lease:
                started.set()
                with lock:
                    began[0] += 1
                while (i := take()) is not None:
                    value = jobs[i](lease.model, stopped)
                    with lock:
                        values[i] = value
                        finished[0] += 1
                        complete = finished[0] == n
                    if complete and on_complete is not None:
                        on_complete(list(values))
                    out.put(("value", (i, value, lease)))
        except _NothingLeft:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, which raises it
            closed.set()
            out.put(("error", exc))
        finally:
            with lock:
                ended[0] += 1
                done_working[0] += started.is_set()
            out.put(("end", None))

    count = max(1, min(int(workers), n))
    # under ``lock``: leases that started working, those of them that finished, and workers that finished
    began, done_working, ended = [0], [0], [0]
    received = 0
    try:
        for w in range(count):
            threading.Thread(target=compute_thread(work), args=(w > 0,), name=f"leased-map-{w}", daemon=True).start()
        # Not until every worker ended: a helper still waiting for a slot (another user's request holds it) must
        # not hold back the last result, nor a stopped map; when its turn comes it ends without merging.
        while received < n:
            try:
                kind, item = out.get(timeout=0.1)
            except queue.Empty:  # only on an empty queue: the counters run ahead of messages not yet read
                with lock:
                    idle = ended[0] >= count or (stopped() and done_working[0] >= began[0])
                if idle:
                    return
                continue
            if kind == "error":
                raise item
            if kind == "value":
                received += 1
                yield item
    finally:
        closed.set()  # a caller that stops reading stops the leases at their next job or batch
