"""leased_map: one merge's jobs shared by several engine leases (a Tune move's dev sets on every core)."""

from __future__ import annotations

import os
import threading
import time

import pytest
from test_engine import _engine

from optimer_lib.engine import INTERACTIVE
from optimer_lib.engine.shared_work import leased_map


def _sleepy(n: int, seconds: float = 0.15):
    """``n`` jobs that each take ``seconds`` and return the id of the model they ran on."""
    def job(model, stopped):
        time.sleep(seconds)
        return id(model)
    return [job] * n


def _holder(engine, release: threading.Event):
    """``hold(priority, flag=None)``: another user's request, holding a slot (``flag`` set once it does) until
    ``release``."""
    def hold(priority: int, flag: threading.Event | None = None) -> None:
        with engine.lease(engine.state({"v1": 0.7}), priority=priority):
            if flag is not None:
                flag.set()
            release.wait(60)
    return hold


def test_jobs_are_shared_by_two_slots_and_each_runs_once(tiny_vectors):
    engine = _engine(tiny_vectors, max_slots=2, concurrency=2)
    state = engine.state({"v0": 0.4})
    done = list(leased_map(engine, state, _sleepy(6), workers=2))
    assert sorted(i for i, _, _ in done) == list(range(6))  # each job once
    assert {lease.slot for _, _, lease in done} == {0, 1}  # both slots worked
    assert len({model for _, model, _ in done}) == 2
    assert all(lease.state == state for _, _, lease in done)


def test_one_worker_keeps_one_slot(tiny_vectors):
    engine = _engine(tiny_vectors, max_slots=2, concurrency=2)
    done = list(leased_map(engine, engine.state({"v0": 0.4}), _sleepy(3, 0.05), workers=1))
    assert {lease.slot for _, _, lease in done} == {0} and engine.stats().slots == 1


def test_a_helper_whose_turn_comes_late_neither_delays_the_result_nor_merges(tiny_vectors):
    """The other slot is held by someone else's long request: the move's own lease does every job and the map ends
    at once; the helper's turn comes when the move's lease ends, and it leaves without taking a slot (neither a
    merge nor a reuse of the slot that holds the merge)."""
    engine = _engine(tiny_vectors, max_slots=2, concurrency=2)
    held, release = threading.Event(), threading.Event()

    def other_user() -> None:
        with engine.lease(engine.state({"v1": 0.7}), priority=INTERACTIVE):
            held.set()
            release.wait(60)

    t = threading.Thread(target=other_user)
    t.start()
    assert held.wait(60)
    before = engine.stats()
    done = list(leased_map(engine, engine.state({"v0": 0.4}), _sleepy(3, 0.05), workers=2))
    assert len(done) == 3 and len({lease.slot for _, _, lease in done}) == 1  # ended while the slot is still held
    deadline = time.monotonic() + 10
    while engine.stats().leases < before.leases + 2 and time.monotonic() < deadline:  # the helper's turn
        time.sleep(0.01)
    time.sleep(0.1)
    after = engine.stats()
    assert after.leases == before.leases + 2 and after.waiting == 0
    assert (after.merges, after.reused) == (before.merges + 1, before.reused)  # the move's own merge only
    release.set()
    t.join(60)


def test_on_complete_runs_once_with_every_value_in_job_order(tiny_vectors):
    engine = _engine(tiny_vectors, max_slots=2, concurrency=2)
    seen = []
    jobs = [lambda model, stopped, k=k: (time.sleep(0.05 * (4 - k)), k)[1] for k in range(4)]
    list(leased_map(engine, engine.state({"v0": 0.1}), jobs, workers=2, on_complete=seen.append))
    assert seen == [[0, 1, 2, 3]]


def test_a_failing_job_is_raised_and_stops_the_others(tiny_vectors):
    engine = _engine(tiny_vectors, max_slots=2, concurrency=2)
    ran = []

    def boom(model, stopped):
        raise ValueError("bad dev set")

    def slow(model, stopped):
        ran.append(1)
        time.sleep(0.2)
        return 1

    with pytest.raises(ValueError, match="bad dev set"):
        list(leased_map(engine, engine.state({"v0": 0.1}), [boom] + [slow] * 10, workers=2))
    time.sleep(0.5)
    assert len(ran) < 10  # no job starts after the failure


def test_closing_the_map_stops_taking_jobs(tiny_vectors):
    engine = _engine(tiny_vectors, max_slots=2, concurrency=2)
    ran = []

    def job(model, stopped):
        ran.append(1)
        time.sleep(0.1)
        return 1

    it = leased_map(engine, engine.state({"v0": 0.1}), [job] * 20, workers=2)
    next(it)
    it.close()
    time.sleep(0.5)
    assert len(ran) <= 4  # the jobs running when it closed, at most one more each


def test_the_map_ends_with_its_last_job_while_its_helper_still_waits(tiny_vectors):
    """Both slots busy (another user's request, then an urgent one queued before the helper): the move's own lease
    does every job and its result does not wait for the helper's turn."""
    engine = _engine(tiny_vectors, max_slots=2, concurrency=2)
    go, release, held = threading.Event(), threading.Event(), threading.Event()

    hold = _holder(engine, release)

    def job(model, stopped):
        assert go.wait(60)
        return 1

    other = threading.Thread(target=hold, args=(INTERACTIVE, held))
    other.start()
    assert held.wait(60)
    done: list = []
    mapper = threading.Thread(target=lambda: done.extend(leased_map(engine, engine.state({"v0": 0.4}), [job] * 3,
                                                                    workers=2)))
    mapper.start()
    deadline = time.monotonic() + 10
    while engine.stats().waiting < 1 and time.monotonic() < deadline:  # the helper queues: both slots are taken
        time.sleep(0.01)
    urgent = threading.Thread(target=hold, args=(INTERACTIVE - 1,))  # will take the move's slot before the helper
    urgent.start()
    while engine.stats().waiting < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats().waiting == 2
    go.set()
    mapper.join(10)
    assert not mapper.is_alive() and len(done) == 3  # ended although the helper still waits behind urgent
    deadline = time.monotonic() + 10
    while engine.stats().waiting > 1 and time.monotonic() < deadline:  # urgent takes the move's slot
        time.sleep(0.01)
    time.sleep(0.1)
    assert engine.stats().waiting == 1  # the helper, still waiting
    release.set()
    for t in (other, urgent):
        t.join(60)


def test_a_stopped_map_ends_while_its_helper_still_waits_and_that_helper_never_merges(tiny_vectors):
    """Stopped (a newer move) while its helper waits behind an urgent request for a slot: the map ends with what it
    has, without waiting for the helper, which ends without a merge when its turn comes."""
    engine = _engine(tiny_vectors, max_slots=2, concurrency=2)
    go, release, held, stop = threading.Event(), threading.Event(), threading.Event(), threading.Event()
    entered = threading.Event()  # the map's first lease has merged and runs its job (its merge is in `before`)

    hold = _holder(engine, release)

    def job(model, stopped):
        entered.set()
        assert go.wait(60)
        stop.set()  # the user moved again while this set was scored
        return None if stopped() else 1

    other = threading.Thread(target=hold, args=(INTERACTIVE, held))
    other.start()
    assert held.wait(60)
    done: list = []
    mapper = threading.Thread(target=lambda: done.extend(leased_map(engine, engine.state({"v0": 0.4}), [job] * 4,
                                                                    workers=2, should_stop=stop.is_set)))
    mapper.start()
    assert entered.wait(60)
    deadline = time.monotonic() + 10
    while engine.stats().waiting < 1 and time.monotonic() < deadline:  # the helper queues: both slots are taken
        time.sleep(0.01)
    urgent = threading.Thread(target=hold, args=(INTERACTIVE - 1,))  # takes the move's slot before the helper
    urgent.start()
    while engine.stats().waiting < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    before = engine.stats()
    go.set()
    mapper.join(5)
    assert not mapper.is_alive() and [v for _, v, _ in done] == [None]  # ended although the helper still waits
    while engine.stats().waiting > 1 and time.monotonic() < deadline:  # urgent takes the move's slot
        time.sleep(0.01)
    time.sleep(0.1)
    release.set()
    for t in (other, urgent):
        t.join(60)
    while engine.stats().waiting and time.monotonic() < deadline:  # the helper's turn
        time.sleep(0.01)
    time.sleep(0.1)
    after = engine.stats()
    assert (after.merges, after.reused, after.waiting) == (before.merges + 1, before.reused, 0)  # urgent's only


def test_the_jobs_run_at_compute_priority(tiny_vectors, monkeypatch):
    """Scoring yields the cores to the web server's threads (optimer_lib.engine.priority); the value is asked one
    above this process's, so the test can fail wherever it runs."""
    target = os.getpriority(os.PRIO_PROCESS, 0) + 1
    if target > 19:
        pytest.skip(f"this test process runs at nice {target - 1}: no lower priority to check")
    monkeypatch.setenv("OPTIMER_COMPUTE_NICE", str(target))
    engine = _engine(tiny_vectors, max_slots=2, concurrency=2)

    def job(model, stopped):
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    done = list(leased_map(engine, engine.state({"v0": 0.4}), [job] * 4, workers=2))
    assert [nice for _, nice, _ in done] == [target] * 4
