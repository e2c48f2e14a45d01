"""Compute threads run at a lower priority than the web server's (Linux: a nice value per thread)."""

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


def test_a_compute_thread_is_lowered_and_its_starter_is_not(monkeypatch):
    monkeypatch.delenv("OPTIMER_COMPUTE_NICE", raising=False)
    before = thread_nice()
    assert compute_nice() == 5
    assert run_in_thread(compute_thread(thread_nice)) == max(5, before)
    assert thread_nice() == before  # the caller's own thread (here: the test's) keeps its value
    assert run_in_thread(thread_nice) == before  # and so do the plain threads it starts

    def nested() -> int:  # a compute thread that starts another: 5 stays 5, not 10
        return run_in_thread(compute_thread(thread_nice))

    assert run_in_thread(compute_thread(nested)) == max(5, before)


@pytest.mark.parametrize("value, expected", [("0", 0), ("12", 12), ("40", 19), ("-3", 0), ("high", 5)])
def test_the_value_comes_from_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv("OPTIMER_COMPUTE_NICE", value)
    assert compute_nice() == expected
    before = run_in_thread(thread_nice)
    assert run_in_thread(compute_thread(thread_nice)) == max(expected, before)  # 0: left as it is


def test_lowering_never_raises_a_thread(monkeypatch):
    def lowered_twice() -> tuple[int | None, int | None]:
        return lower_this_thread(9), lower_this_thread(3)  # a lower value asked later does not raise it again

    first, second = run_in_thread(lowered_twice)
    assert first == second == max(9, thread_nice())
