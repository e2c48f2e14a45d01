"""The merge engine: exact slots after many changes, shared memory, slot reuse, priorities, searches."""

from __future__ import annotations

import copy
import inspect
import random
import threading
import time

import pytest
import torch

from optimer_lib.checkpoints.models import load_model
from optimer_lib.checkpoints.vectors import load_vector
from optimer_lib.engine import BACKGROUND, INTERACTIVE, SEARCH, MergeEngine, MergeState
from optimer_lib.errors import ConfigError


def _engine(tiny_vectors, names=("v0", "v1", "v2"), dtype="float32", **kw) -> MergeEngine:
    base_dir, files = tiny_vectors(names=names)
    inst = files[-1]
    vecs = [load_vector(f) for f in files[:-1]]
    from transformers import AutoTokenizer

    model = load_model(base_dir, dtype=dtype)
    return MergeEngine(model, AutoTokenizer.from_pretrained(base_dir), vecs, instruction=load_vector(inst), **kw)


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


def _rel_err(model: torch.nn.Module, exact: dict[str, torch.Tensor]) -> float:
    """Largest per-tensor max |slot - fresh| / max |fresh|."""
    worst = 0.0
    for k, v in _params(model).items():
        ref = exact[k].float()
        worst = max(worst, float((v.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)))
    return worst


def _ulps(model: torch.nn.Module, exact: dict[str, torch.Tensor]) -> float:
    """Largest |slot - fresh| in units of the fresh value's bf16 spacing (ulp)."""
    worst = 0.0
    for k, v in _params(model).items():
        ref = exact[k].float()
        exp = torch.floor(torch.log2(ref.abs().clamp_min(2.0 ** -126)))
        ulp = torch.pow(2.0, exp - 7)  # bf16 keeps 7 explicit mantissa bits
        worst = max(worst, float(((v.float() - ref).abs() / ulp).max()))
    return worst


def _random_changes(engine: MergeEngine, n: int, seed: int = 0):
    """``n`` states, each moving one or two α (or the instruction weight) like slider drags."""
    rng = random.Random(seed)
    ws, iw = dict.fromkeys(engine.names, 0.0), 0.0
    for _ in range(n):
        for name in rng.sample(engine.names, rng.choice((1, 2))):
            ws[name] = rng.uniform(-1.0, 2.0)
        if rng.random() < 0.2:
            iw = rng.choice((0.0, 1.0, rng.uniform(0, 1.5)))
        yield engine.state(ws, iw)


def test_a_slot_equals_a_fresh_merge_after_1000_changes_fp32(tiny_vectors):
    engine = _engine(tiny_vectors, max_slots=1)
    worst = 0.0
    for i, state in enumerate(_random_changes(engine, 1000)):
        with engine.lease(state) as lease:
            if i % 50 == 49 or i == 999:
                worst = max(worst, _rel_err(lease.model, engine.exact(state)))
    assert engine.stats().merges == 1000
    assert worst <= 1e-6, worst


def test_a_slot_equals_a_fresh_merge_after_1000_changes_bf16(tiny_vectors):
    engine = _engine(tiny_vectors, dtype="bfloat16", max_slots=1)
    assert engine.dtype == torch.bfloat16
    worst = 0.0
    for i, state in enumerate(_random_changes(engine, 1000, seed=1)):
        with engine.lease(state) as lease:
            if i % 50 == 49 or i == 999:
                worst = max(worst, _ulps(lease.model, engine.exact(state)))
    assert worst <= 2.0, worst


def test_slots_share_the_base_and_the_vectors_instead_of_copying_them(tiny_vectors):
    engine = _engine(tiny_vectors, max_slots=2)
    base_ptrs = {t.untyped_storage().data_ptr() for t in engine.base.state_dict().values()}
    vec_ptrs = {t.untyped_storage().data_ptr() for v in engine.vectors for t in v.tensors.values()}
    for w in ({"v0": 0.5}, {"v1": 0.5}, {"v0": 0.1, "v1": 0.2}, {"v0": 1.0}):
        with engine.lease(w):
            pass
    stats = engine.stats()
    assert stats.slots == 2  # four different states, never more than max_slots models
    for slot in engine._slots:
        for t in slot.merger._targets:
            assert t.base.untyped_storage().data_ptr() in base_ptrs
            assert all(d is None or d.untyped_storage().data_ptr() in vec_ptrs for d in t.deltas)
    assert stats.bytes_per_slot == stats.bytes_base


def test_memory_is_flat_in_the_number_of_callers(tiny_vectors):
    """Ten 'sessions' with their own weights, interleaved: still max_slots models, and each answer right."""
    engine = _engine(tiny_vectors, max_slots=2)
    rng = random.Random(3)
    sessions = [{n: rng.uniform(0, 1) for n in engine.names} for _ in range(10)]
    for _ in range(3):
        for w in sessions:
            state = engine.state(w)
            with engine.lease(state) as lease:
                assert _rel_err(lease.model, engine.exact(state)) <= 1e-6
    assert engine.stats().slots == 2
    assert len({id(s.model) for s in engine._slots}) == 2


def test_a_state_already_in_a_slot_is_not_merged_again(tiny_vectors):
    engine = _engine(tiny_vectors, max_slots=2)
    a, b = engine.state({"v0": 0.3}), engine.state({"v1": 0.7})
    for _ in range(5):  # two chat panes with different weights alternate without re-merging
        for s in (a, b):
            with engine.lease(s) as lease:
                assert lease.state == s
    st = engine.stats()
    assert (st.merges, st.reused) == (2, 8)
    # a third state goes to the slot with the fewest changed weights: {v0: 0.3, v1: 0.1} is one move from a
    c = engine.state({"v0": 0.3, "v1": 0.1})
    with engine.lease(c) as lease:
        assert lease.changed == 1
        assert lease.slot == 0


def test_non_linear_methods_are_served_and_exact(tiny_vectors):
    engine = _engine(tiny_vectors, max_slots=1)
    for method, params in (("ties", {"density": 0.5}), ("dare", {"density": 0.5, "seed": 3}),
                           ("task_arithmetic", {"lam": 0.7}), ("average", {}), ("optimer", {})):
        state = engine.state({"v0": 0.4, "v1": 0.9}, 1.0, method=method, params=params)
        with engine.lease(state) as lease:
            assert lease.changed == len(engine.names) + 1  # a method switch re-merges every vector
            assert _rel_err(lease.model, engine.exact(state)) == 0.0, method


def test_run_caches_results_by_state_and_key(tiny_vectors):
    engine = _engine(tiny_vectors)
    calls = []

    def job(model):
        calls.append(1)
        return float(next(model.parameters()).sum())

    a = engine.run({"v0": 0.5}, job, key="sum")
    b = engine.run({"v0": 0.5}, job, key="sum")
    c = engine.run({"v0": 0.6}, job, key="sum")
    assert a == b != c
    assert len(calls) == 2 and engine.stats().cache_hits == 1


def test_bad_requests_are_config_errors(tiny_vectors):
    engine = _engine(tiny_vectors)
    with pytest.raises(ConfigError, match="unknown vector"):
        engine.state({"nope": 1.0})
    with pytest.raises(ConfigError, match="no option"):
        engine.state({"v0": 1.0}, method="ties", params={"densty": 0.2})
    with pytest.raises(ConfigError, match="at least 1"):
        MergeEngine(engine.base, engine.tokenizer, engine.vectors, max_slots=0)
    with pytest.raises(ConfigError, match="vectors_on"):
        MergeEngine(engine.base, engine.tokenizer, engine.vectors, vectors_on="gpu")
    assert engine.vectors_on == "host"  # CPU: the vectors stay memory-mapped where load_vector put them
    with engine.lease({"v0": 0.1}), pytest.raises(RuntimeError, match="already holds"):
        with engine.lease({"v0": 0.2}):
            pass


def test_interactive_requests_overtake_waiting_search_trials(tiny_vectors):
    engine = _engine(tiny_vectors, max_slots=1)
    order: list[str] = []
    held = threading.Event()
    go = threading.Event()

    def holder():
        with engine.lease({"v0": 0.1}, priority=SEARCH):
            held.set()
            go.wait(5)

    def ask(tag: str, prio: int, w: float):
        with engine.lease({"v0": w}, priority=prio):
            order.append(tag)

    t0 = threading.Thread(target=holder)
    t0.start()
    held.wait(5)
    threads = []
    for n, (tag, prio, w) in enumerate((("trial", SEARCH, 0.2), ("reference", BACKGROUND, 0.4),
                                        ("slider", INTERACTIVE, 0.3)), start=1):
        threads.append(threading.Thread(target=ask, args=(tag, prio, w)))
        threads[-1].start()
        while engine.stats().waiting < n:
            time.sleep(0.001)
    go.set()
    for t in (t0, *threads):
        t.join(5)
    assert order == ["slider", "reference", "trial"]  # served by priority, not by arrival


def test_a_slider_move_during_a_search_finishes_before_the_next_trial(tiny_vectors, tmp_path):
    """A real run_search on an EngineMerger: the slider's lease is granted between two trials."""
    from optimer_lib.data import EvalSuite
    from optimer_lib.scoring.objectives import parse_objective
    from optimer_lib.search.study import SearchConfig, run_search

    engine = _engine(tiny_vectors, max_slots=1)
    suite = EvalSuite(texts={"a": ["the quick brown fox"] * 3, "b": ["12 + 35 = 47"] * 3})
    events: list[tuple[str, float]] = []
    trial_started = threading.Event()

    class Logged(type(engine.merger())):
        def set_weights(self, weights, instruction_weight=None):
            super().set_weights(weights, instruction_weight)
            events.append(("trial", time.perf_counter()))
            trial_started.set()
            time.sleep(0.05)  # the trial is busy scoring while the slider arrives

    merger = Logged(engine, priority=SEARCH)
    cfg = SearchConfig(trials=4, search_limit=None, rescore_limit=None, top_k=0, seed=0, storage=":memory:",
                       workdir=tmp_path)

    def slider():
        trial_started.wait(5)
        with engine.lease({"v0": 0.9}, priority=INTERACTIVE):
            events.append(("slider", time.perf_counter()))

    t = threading.Thread(target=slider)
    t.start()
    try:
        run_search(merger, engine.tokenizer, suite, parse_objective("balanced", ["a", "b"]), cfg, progress=False)
    finally:
        merger.close()
    t.join(5)
    kinds = [k for k, _ in events]
    assert kinds[0] == "trial" and "slider" in kinds
    assert kinds.index("slider") == 1, kinds  # right after the trial it interrupted, before the next one


def test_a_state_counts_the_vectors_a_re_merge_reads():
    a = MergeState.of(["ja", "code"], {"ja": 0.3})
    assert a.weight_map == {"ja": 0.3, "code": 0.0}
    assert a.changes_to(a.with_weights({"ja": 0.3, "code": 0.2})) == 1
    assert a.changes_to(a.with_weights({"ja": 0.3}, instruction_weight=1.0)) == 1
    assert a.changes_to(a.with_weights({"ja": 0.1, "code": 0.2}, instruction_weight=1.0)) == 3
    ties = MergeState.of(["ja", "code"], {"ja": 0.3}, method="ties", params={"density": 0.2})
    assert a.changes_to(ties) == 3 and ties.changes_to(ties.with_weights({"ja": 0.4})) == 3  # non-linear: all
    assert hash(a) == hash(MergeState.of(["ja", "code"], {"ja": 0.3, "code": 0}))
    with pytest.raises(ConfigError, match="finite"):
        MergeState.of(["ja"], {"ja": float("nan")})


def _alongside_a_slider(engine: MergeEngine, job, ready: threading.Event, events: list[str]) -> None:
    """Run ``job`` in a thread and, once ``ready`` is set, a slider's lease in another that logs "slider"."""
    def slider():
        ready.wait(5)
        with engine.lease({"v0": 0.1}, priority=INTERACTIVE):
            events.append("slider")

    threads = [threading.Thread(target=job), threading.Thread(target=slider)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)


def test_a_long_search_job_is_preempted_between_forward_passes(tiny_vectors):
    """A slider arriving mid-trial runs after the trial's current forward pass, not after the whole trial; the
    trial then goes on with its own merge (re-merged if the slider used its slot)."""
    engine = _engine(tiny_vectors, max_slots=1)  # worst case: the slider must borrow the trial's own slot
    trial_state = engine.state({"v0": 0.7, "v1": 0.2})
    ids = torch.tensor([[1, 5, 9, 14]])
    events: list[str] = []
    errs: list[float] = []
    second = threading.Event()

    def trial():
        with engine.lease(trial_state, priority=SEARCH) as lease:
            for step in range(8):
                lease.model(input_ids=ids)
                events.append(f"trial forward {step}")
                if step == 1:
                    second.set()
                time.sleep(0.05)
            errs.append(_rel_err(lease.model, engine.exact(trial_state)))  # its own merge again at the end

    _alongside_a_slider(engine, trial, second, events)
    assert "slider" in events and events.index("slider") <= 4, events  # within a forward pass or two
    assert events[-1] == "trial forward 7" and engine.preemptions >= 1
    assert errs and errs[0] <= 1e-6


def _preempted_inside_a_pass(engine: MergeEngine, grad: bool) -> tuple[list[str], float, int]:
    """A background job's single forward pass, paused after block 0 until a slider request waits: the events in
    order, the pass's logits error against the background merge's, and the preemptions it took."""
    before = engine.preemptions
    bg_state = engine.state({"v0": 0.7, "v1": 0.2})
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    events: list[str] = []
    out: dict[str, torch.Tensor] = {}
    in_block0 = threading.Event()

    def job():
        with engine.lease(bg_state, priority=BACKGROUND) as lease:
            blocks = lease.model.model.layers

            def hold(module, args, output):  # after block 0: let the slider queue up before block 1 starts
                in_block0.set()
                deadline = time.monotonic() + 5
                while not engine._waiting and time.monotonic() < deadline:
                    time.sleep(0.005)

            handle = blocks[0].register_forward_hook(hold)
            with torch.set_grad_enabled(grad):
                out["logits"] = lease.model(input_ids=ids).logits.detach()
            handle.remove()
            events.append("background pass done")
            with torch.no_grad():
                out["exact"] = lease.model(input_ids=ids).logits  # the lease's merge, re-checked after the pass

    _alongside_a_slider(engine, job, in_block0, events)
    err = float((out["logits"] - out["exact"]).abs().max() / out["exact"].abs().max())
    return events, err, engine.preemptions - before


def test_a_slider_preempts_a_background_pass_between_blocks(tiny_vectors):
    """A real model's forward pass is seconds on a CPU core, so a slider waits for one transformer block of a
    background (or search) pass, not for the pass: it runs between blocks 0 and 1, re-merging the shared slot,
    and the rest of the pass runs on the background merge again (its logits equal a pass without preemption).
    With autograd on (the gradient sampler) a pass is never paused inside: the slider comes after it."""
    engine = _engine(tiny_vectors, max_slots=1)  # the slider must borrow the background job's own slot
    events, err, preemptions = _preempted_inside_a_pass(engine, grad=False)
    assert events == ["slider", "background pass done"] and preemptions == 1
    assert err <= 1e-5
    events, err, _ = _preempted_inside_a_pass(engine, grad=True)
    assert events == ["background pass done", "slider"] and err <= 1e-5


class _Cancelled(Exception):
    pass


def test_a_lease_s_cancel_check_abandons_a_pass_between_blocks_and_frees_the_slot(tiny_vectors):
    """``cancel`` runs as the lease begins, before the pass and before every block, in the lease's thread only:
    raising from it stops the pass at the next block (a stopped search's trial) and the lease ends, so the next
    request gets the slot; raising as the lease begins skips its merge."""
    engine = _engine(tiny_vectors, max_slots=1)
    calls: list[int] = []
    blocks_run: list[int] = []

    def cancel():
        calls.append(len(blocks_run))
        if len(blocks_run) == 1:  # once block 0 has run
            raise _Cancelled

    with pytest.raises(_Cancelled), engine.lease({"v0": 0.5}, priority=SEARCH, cancel=cancel) as lease:
        for block in lease.model.model.layers:
            block.register_forward_hook(lambda *_: blocks_run.append(1))
        other = threading.Thread(target=lambda: lease.model(input_ids=torch.tensor([[1, 5]])))
        other.start()  # another thread's pass on the slot is not this lease's job: no check
        other.join()
        assert calls == [0] and len(blocks_run) == 2  # once as the lease began, none for the other thread
        blocks_run.clear()
        lease.model(input_ids=torch.tensor([[1, 5, 9]]))
    assert calls == [0, 0, 0, 1] and len(blocks_run) == 1  # then before the pass, block 0, block 1: stopped there
    assert engine._cancels == {} and engine._held == {}
    with engine.lease({"v1": 0.5}, priority=INTERACTIVE) as lease:  # the slot is free again, no check left
        lease.model(input_ids=torch.tensor([[1, 5, 9]]))
    assert calls == [0, 0, 0, 1]
    merges = engine.stats().merges

    def stopped():
        raise _Cancelled

    with pytest.raises(_Cancelled), engine.lease({"v0": 0.9}, priority=SEARCH, cancel=stopped):
        pass  # stopped while it waited for its turn: never merged
    assert engine.stats().merges == merges and engine._active == 0 and engine._cancels == {}


def test_leases_trim_the_heap_when_asked(tiny_vectors, monkeypatch):
    """``trim_memory=True`` (the workbench's engines) hands what a lease's passes freed back to the OS as it ends
    (optimer_lib.engine.heap: its effect on memory is measured in test_workbench_app); off by default."""
    import optimer_lib.engine.engine as engine_module

    calls: list[int] = []
    monkeypatch.setattr(engine_module, "trim_heap", lambda: calls.append(1) or True)
    engine = _engine(tiny_vectors)
    for trim, expected in ((False, 0), (True, 2)):
        calls.clear()
        engine.trim_memory = trim
        for w in (0.2, 0.3):
            before = len(calls)
            with engine.lease({"v0": w}):
                assert len(calls) == before  # not while the lease runs
        assert len(calls) == expected
    assert inspect.signature(MergeEngine).parameters["trim_memory"].default is False


def test_a_bad_heap_mode_is_refused_with_the_choices():
    from optimer_lib.engine.heap import configure_heap

    with pytest.raises(ConfigError, match="heap mode must be one of lean, fast, got 'quick'"):
        configure_heap("quick")


def test_the_fast_heap_starts_one_trimmer_per_process(monkeypatch):
    """Tests and notebooks launch several servers in one process: each configure_heap("fast") must not add a thread."""
    from optimer_lib.engine import heap

    if heap._libc() is None:
        assert heap.configure_heap("fast") is False
        return
    started: list[threading.Event] = []
    monkeypatch.setattr(heap, "limit_heap", lambda: True)  # leave this process's malloc as it is
    monkeypatch.setattr(heap, "start_trimmer", lambda: started.append(threading.Event()) or started[-1])
    monkeypatch.setattr(heap, "_TRIMMER", None)
    assert all(heap.configure_heap("fast") for _ in range(3)) and len(started) == 1
    started[0].set()  # a stopped trimmer is replaced by the next call
    assert heap.configure_heap("fast") and len(started) == 2


def test_the_heap_trimmer_trims_until_stopped(monkeypatch):
    """launch() starts engine.heap.start_trimmer: a daemon thread trimming the heap periodically until stopped."""
    import platform

    from optimer_lib.engine import heap

    if platform.libc_ver()[0] != "glibc":
        assert heap.start_trimmer(0.01) is None  # nothing to trim with: no thread
        return
    calls: list[float] = []
    monkeypatch.setattr(heap, "trim_heap", lambda: calls.append(time.monotonic()) or True)
    stop = heap.start_trimmer(0.01)
    deadline = time.monotonic() + 5
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    time.sleep(0.05)
    n = len(calls)
    time.sleep(0.1)
    assert n >= 3 and len(calls) == n  # it ran, then stopped


def test_two_leases_run_at_once_on_their_own_slots(tiny_vectors):
    """With concurrency 2 (a 2-core CPU at one torch thread), two jobs hold two slots at the same time, each
    with its own merge; a third request waits. With concurrency 1 the two would never meet."""
    engine = _engine(tiny_vectors, max_slots=2, concurrency=2)
    barrier = threading.Barrier(2, timeout=5)
    seen: dict[str, float] = {}
    errors: list[BaseException] = []

    def job(name: str, w: float):
        try:
            state = engine.state({"v0": w})
            with engine.lease(state) as lease:
                barrier.wait()  # both leases are active now
                seen[name] = _rel_err(lease.model, engine.exact(state))
                assert engine.stats().waiting == 0
                barrier.wait()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=job, args=(n, w)) for n, w in (("a", 0.2), ("b", 1.4))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors, errors
    assert seen["a"] <= 1e-6 and seen["b"] <= 1e-6
    assert MergeEngine(engine.base, None, engine.vectors, max_slots=1, concurrency=4).concurrency == 1


def test_a_lease_held_by_a_generator_closed_on_another_thread_frees_its_thread(tiny_vectors):
    """Gradio resumes a streamed Tune score on whichever worker is free: the lease taken on thread A and ended on
    thread B must leave thread A free to take the next lease (a stale entry refused every later one)."""
    engine = _engine(tiny_vectors)

    def stream():
        with engine.lease({"v0": 0.5}) as lease:
            yield lease.slot

    gen = stream()
    next(gen)  # the lease is taken on this thread
    closer = threading.Thread(target=gen.close)  # ...and ended on another
    closer.start()
    closer.join()
    with engine.lease({"v0": 0.25}) as lease:  # this thread is free again
        assert dict(lease.state.weights)["v0"] == 0.25


def test_the_vectors_dtype_never_changes_a_bf16_merge(tiny_vectors):
    """Deltas are rounded to the model's dtype before every merge, wherever they live: a bf16 engine gives the same
    slot with fp32 vectors (streamed per use) as with vectors saved in bf16, for the linear merge and for TIES (whose
    top-k trim picked other entries on fp32 than on bf16 deltas: 0.89 relative on one tensor, seen on a GPU), and the
    export's merge_state_dict agrees with the slot."""
    import dataclasses

    from optimer_lib.merging.methods import merge_state_dict

    fp32 = _engine(tiny_vectors, dtype="bfloat16", max_slots=1)
    as_bf16 = [dataclasses.replace(v, tensors={k: t.to(torch.bfloat16) for k, t in v.tensors.items()})
               for v in fp32.vectors]
    assert all(t.dtype == torch.float32 for v in fp32.vectors for t in v.tensors.values())
    bf16 = MergeEngine(fp32.base, fp32.tokenizer, as_bf16, instruction=fp32.instruction, max_slots=1)
    ties = {"density": 0.2, "lam": 1.0}
    for weights, method, params in (({"v0": -0.2, "v1": 0.8}, "optimer", {}), ({"v0": 0.6, "v1": 0.9}, "ties", ties)):
        states = []
        for engine in (fp32, bf16):
            with engine.lease(weights, 0.5, method=method, params=params) as lease:
                states.append({k: v.clone() for k, v in _params(lease.model).items()})
        export = merge_state_dict(fp32.base, fp32.vectors, weights, method=method, instruction=fp32.instruction,
                                  instruction_weight=0.5, **params)
        for k, v in states[0].items():
            assert torch.equal(v, states[1][k]), (method, k)
            assert torch.equal(v, export[k]), (method, k, "export")


def test_a_dropped_engine_frees_its_slots_without_the_garbage_collector(tiny_vectors):
    """Switching pools drops an engine: its slot models (a model's worth of device memory each) must go with the
    last reference, not wait for a garbage-collector pass (the forward hook once closed over the engine)."""
    import gc
    import weakref

    engine = _engine(tiny_vectors, max_slots=2)
    for w in ({"v0": 0.5}, {"v1": 0.5}):
        with engine.lease(w) as lease:
            lease.model(torch.tensor([[1, 2, 3]]))  # runs the pre-forward (preemption) hook
    refs = [weakref.ref(engine), *(weakref.ref(s.model) for s in engine._slots)]
    assert len(refs) == 3
    gc.disable()
    try:
        del engine, lease
        assert [r() is None for r in refs] == [True] * 3
    finally:
        gc.enable()


def test_pinned_vectors_need_a_cuda_device(tiny_vectors):
    """Page-locked vectors only help a GPU (``tests/test_gpu.py`` checks them there): on a CPU the request is refused
    with what to use instead, before anything is copied."""
    with pytest.raises(ConfigError, match="vectors_on='pinned' streams page-locked host memory to a CUDA GPU"):
        _engine(tiny_vectors, vectors_on="pinned")
    with pytest.raises(ConfigError, match="'host', 'pinned', 'device' or None"):
        _engine(tiny_vectors, names=("w0", "w1", "w2"), vectors_on="gpu")


def test_vectors_placed_once_keep_each_tensors_own_dtype(tiny_vectors):
    """The device and pinned copies round each delta to the dtype of the tensor it changes, as the streamed path
    and the export do: a bf16 model that keeps its norms in fp32 merges the same whichever way the vectors travel."""
    from optimer_lib.engine.vector_placement import _copy
    from optimer_lib.merging.methods import merge_state_dict
    from optimer_lib.merging.resident import ResidentMerger

    engine = _engine(tiny_vectors, dtype="bfloat16", max_slots=1)
    model = copy.deepcopy(engine.base)
    for name, module in model.named_modules():
        if name.endswith("norm"):
            module.float()
    dtypes = {k: t.dtype for k, t in model.state_dict().items()}
    assert {torch.float32, torch.bfloat16} <= set(dtypes.values())
    placed = [_copy(v, torch.device("cpu"), model.state_dict()) for v in engine.vectors]
    assert all(t.dtype == dtypes[k] for v in placed for k, t in v.tensors.items())
    weights = {"v0": 0.37, "v1": -0.81}
    merger = ResidentMerger(copy.deepcopy(model), placed, stream_deltas=True)
    merger.set_weights(weights)
    export = merge_state_dict(model, engine.vectors, weights)
    for k, v in merger.model.state_dict().items():
        assert torch.equal(v, export[k]), k


def test_the_pinned_estimate_rounds_each_block_up_to_a_power_of_two():
    """torch's pinned allocator rounds every block up to a power of two: the automatic placement counts that."""
    from optimer_lib.checkpoints.vectors import DistributionVector
    from optimer_lib.engine.vector_placement import pinned_bytes

    vec = DistributionVector("v", {"a": torch.zeros(5), "b": torch.zeros(8), "c": torch.zeros(3, dtype=torch.int64)})
    like = {"a": torch.zeros(5), "b": torch.zeros(8, dtype=torch.bfloat16)}  # the base tensors: their dtypes count
    assert pinned_bytes([vec], like) == 32 + 16 + 32  # 20 -> 32, 16, 24 -> 32


EXIT_SCRIPT = """
import pathlib, sys, threading, time
import torch
from optimer_lib.engine import MergeEngine

base, vector, flag = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
engine = MergeEngine.open(base, [vector])
started = threading.Event()

def forever():  # a background score that never ends, as a search trial of a large model nearly does
    try:
        with engine.lease({engine.names[0]: 0.5}) as lease:
            ids = torch.arange(4 * 64).reshape(4, 64) % 100
            while True:
                lease.model(input_ids=ids)
                started.set()
    except KeyboardInterrupt:  # the engine's EngineExiting: a search marks its trial interrupted
        flag.write_text("abandoned at exit")

threading.Thread(target=forever, daemon=True).start()
assert started.wait(60)
"""


@pytest.mark.slow  # a subprocess: ~4 s of imports
def test_a_lease_in_a_daemon_thread_ends_before_the_interpreter(tiny_vectors, tmp_path):
    """At exit the engine stops daemon threads' leases at their next block and waits for them: a thread left
    inside a torch op as the process ends aborts it ("terminate called without an active exception", exit 134)."""
    import subprocess
    import sys

    base, (vector,) = tiny_vectors(names=("v0",))
    (tmp_path / "exit.py").write_text(EXIT_SCRIPT)
    r = subprocess.run([sys.executable, tmp_path / "exit.py", base, vector, tmp_path / "flag"], capture_output=True,
                       text=True, timeout=120)
    # without the wait it aborted in 5 runs of 5: the thread is nearly always inside an op at the exit's instant
    assert r.returncode == 0 and "terminate" not in r.stderr, r.stderr[-2000:]
    assert (tmp_path / "flag").read_text() == "abandoned at exit"
