"""Compute threads run at a lower priority than the web server's (Linux: a nice value per thread).

Values are asked above this process's own (``nice make test`` starts it above 0), so every check can fail.
"""

from __future__ import annotations

import os
import sys
import threading

import pytest

from optimer_lib.engine.priority import compute_nice, compute_thread, lower_this_thread

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")


def thread_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def run_in_thread(fn):
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def above_this_process(step: int) -> int:
    """A nice value ``step`` above this process's, or a skip when there is none (19 is the lowest priority) or
    this system refuses to lower a thread (a container's seccomp policy)."""
    before = os.getpriority(os.PRIO_PROCESS, 0)
    if before + step > 19:
        pytest.skip(f"this test process runs at nice {before}: no value {step} above it")
    if run_in_thread(lambda: lower_this_thread(before + 1)) is None:
        pytest.skip("this system refuses to set a thread's nice value")
    return before + step


def test_a_compute_thread_is_lowered_and_its_starter_is_not(monkeypatch):
    target = above_this_process(3)
    monkeypatch.setenv("OPTIMER_COMPUTE_NICE", str(target))
    before = thread_nice()
    assert run_in_thread(compute_thread(thread_nice)) == target
    assert thread_nice() == before  # the caller's own thread (here: the test's) keeps its value
    assert run_in_thread(thread_nice) == before  # and so do the plain threads it starts

    def nested() -> int:  # a compute thread that starts another: the value stays, it does not add up
        return run_in_thread(compute_thread(thread_nice))

    assert run_in_thread(compute_thread(nested)) == target


@pytest.mark.parametrize("value, expected", [("0", 0), ("12", 12), ("40", 19), ("-3", 0), ("high", 5), (None, 5)])
def test_the_value_comes_from_the_environment(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("OPTIMER_COMPUTE_NICE", raising=False)
    else:
        monkeypatch.setenv("OPTIMER_COMPUTE_NICE", value)
    assert compute_nice() == expected


def test_zero_leaves_compute_threads_as_they_are(monkeypatch):
    monkeypatch.setenv("OPTIMER_COMPUTE_NICE", "0")
    assert run_in_thread(compute_thread(thread_nice)) == run_in_thread(thread_nice)


def test_lowering_never_raises_a_thread():
    low, lower = above_this_process(2), above_this_process(1)

    def lowered_twice() -> tuple[int | None, int | None]:
        return lower_this_thread(low), lower_this_thread(lower)  # a smaller value asked later does not raise it

    assert run_in_thread(lowered_twice) == (low, low)
