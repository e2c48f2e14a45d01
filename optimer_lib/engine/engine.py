"""The merge engine: every model of a workspace in one place, lent out by priority.

    from optimer_lib.engine import MergeEngine, INTERACTIVE, SEARCH
    engine = MergeEngine(base_model, tokenizer, vectors, instruction=it)   # or MergeEngine.open(dirs...)
    with engine.lease({"ja": 0.3, "code": 0.1}, instruction_weight=1.0) as lease:
        lease.model(...)                        # merged; lease.merge_s says what the re-merge cost
    metrics = engine.run(weights, lambda model: score(model), key=("dev", 8))   # cached by (state, key)
    engine.stats()                              # slots, merges, cache hits, bytes held

Memory. The engine holds the base model once (never merged into: it is the exact reference every slot is
re-materialised from), the vectors as given (``load_vector`` tensors are memory-mapped from their safetensors
files, so they are page cache, not process memory) and at most ``max_slots`` merged models. A slot's merger
reads the engine's base tensors instead of keeping its own copy, and reads the vectors where the engine keeps
them: on the host (memory-mapped; each tensor moved to the device when a merge reads it), on a GPU with room for
them one device copy shared by every slot, or else one page-locked host copy streamed by DMA (7x faster than
pageable memory on an H200); both copies keep each model tensor's dtype, which every merge rounds deltas to, so
placement never changes a merge. So memory is base + slots x model (+ the vectors' copy), the same for 1 or 100
callers. With ``base_on="host"`` (automatic on a GPU
that cannot hold base + slots) the base stays memory-mapped on the host and only the slots use the device
(:mod:`optimer_lib.engine.host_base`); ``stats()`` says where the base is and how much of it is file-backed.

Scheduling. Up to ``concurrency`` leases are active at once, each on its own slot (default: on a CPU as many as
the cores allow at torch's intra-op thread count, at most ``max_slots``; on an accelerator 1, where two jobs
would contend for the same memory bandwidth). Waiting requests are served lowest ``priority`` first,
then in arrival order: interactive requests (``INTERACTIVE``: a slider move, a chat reply) overtake background
scoring (``BACKGROUND``) and search trials (``SEARCH``). A search takes one lease per trial, and a lower-priority
lease is also preempted *between forward passes*, and between transformer blocks of a pass run without
autograd: every slot model and each of its blocks carries a forward pre-hook that, when a higher-priority request
waits, hands the engine over and takes it back afterwards (re-merging the slot if the other request used it, so
the rest of the pass runs on the lease's own merge). So a slider move waits for one block of a running trial or
background score, not for the trial.

Slots. A request is served by the slot needing the fewest vectors re-read: the one already holding the state,
else a new slot while fewer than ``max_slots`` exist, else the slot with the fewest changed α (least recently
used on ties). Linear merges re-merge incrementally (fp32; see :class:`ResidentMerger`), other methods re-merge
every tensor.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

from optimer_lib.checkpoints.mapped import base_load_args, copy_to, mapping_of
from optimer_lib.checkpoints.vectors import DistributionVector
from optimer_lib.engine.exiting import EXITING, EngineExiting, watch
from optimer_lib.engine.heap import trim_heap
from optimer_lib.engine.host_base import module_bytes, place_base, pool_base_on
from optimer_lib.engine.slots import EngineStats, Lease, Slot
from optimer_lib.engine.state import MergeState
from optimer_lib.engine.vector_placement import check_vectors_on, choose_vectors_on, place_vectors
from optimer_lib.errors import ConfigError
from optimer_lib.merging.resident import ResidentMerger

INTERACTIVE = 0  # a slider move, a chat message, a "confirm" score
BACKGROUND = 5  # work nobody is waiting for yet (reference bars, prefetching): after users, before trials
SEARCH = 10  # a search trial: waits behind every interactive request
T = TypeVar("T")
log = logging.getLogger(__name__)


def _preempt_hook(engine: weakref.ref[MergeEngine], index: int, inside: bool = False) -> None:
    """A slot model's forward pre-hook (``inside``: a transformer block's): the lease's ``cancel`` check, then
    :meth:`MergeEngine._preempt`, while the engine lives. Preemption inside a forward pass only without autograd:
    a re-merge of the slot meanwhile would rewrite weights that earlier blocks saved for the backward pass (the
    gradient sampler's), and the re-merge back bumps their version counters."""
    live = engine()
    if live is None:
        return
    live._check_cancel()
    if not (inside and torch.is_grad_enabled()):
        live._preempt(live._slots[index])


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of ``model``: the children of its longest ``ModuleList`` ([] without one)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


class MergeEngine:
    """Owns the base, the vectors and the merged slots of one pool; see the module docstring.

    ``model`` must hold the base weights and is never modified (keep no other reference that writes to it).
    ``device`` is where slots are merged and run (default: the model's device); ``base_on`` is ``"device"`` (the
    base beside the slots, moved there if needed), ``"host"`` (the base stays on the CPU, memory-mapped when loaded
    by ``load_model_mapped``/``load_model``) or None (see :mod:`optimer_lib.engine.host_base`).
    ``max_slots`` defaults to ``host_base.default_slots`` for ``device``. ``vectors_on`` is ``"host"`` (stream
    them tensor by tensor to the device from where they are, e.g. memory-mapped files), ``"pinned"`` (CUDA only:
    one copy in page-locked host memory, in the model's dtype, streamed by DMA), ``"device"`` (one copy there, in
    the model's dtype) or None: the device when it is a GPU with room for the vectors beside the slots, else
    pinned host memory when the host has room for that copy, else the host as they are.
    ``cache_size`` results are kept by :meth:`run`; ``concurrency`` leases run at once (see the module docstring);
    ``trim_memory`` gives the memory a lease's forward passes freed back to the OS when it ends
    (:mod:`optimer_lib.engine.heap`: for long-lived servers whose many threads would each keep some).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, vectors: Sequence[DistributionVector], *,
                 instruction: DistributionVector | None = None, max_slots: int | None = None,
                 vectors_on: str | None = None, cache_size: int = 512, concurrency: int | None = None,
                 base_on: str | None = None, device: str | torch.device | None = None,
                 trim_memory: bool = False) -> None:
        if not vectors:
            raise ConfigError("an engine needs at least one distribution vector")
        self.base_on, self.device, model, self.max_slots = place_base(model, base_on, device, max_slots)
        self.base = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.vectors = list(vectors)
        self.instruction = instruction
        self.dtype = next(model.parameters()).dtype
        mapped = mapping_of(model)  # measured once: the base is never written, so its pages stay file-backed
        self._base_mapped, self.base_note = mapped.mapped_bytes, mapped.note if self.base_on == "host" else ""
        if self.base_note:  # the user asked for a mapped base and got process memory: say why, once
            log.warning("base_on='host': %s", self.base_note)
        check_vectors_on(vectors_on, self.device)
        self._base_state = dict(model.state_dict())  # tied aliases appear under each name
        everything = [*self.vectors, *([instruction] if instruction is not None else [])]
        where = vectors_on or choose_vectors_on(everything, self._base_state, self.device, dtype=self.dtype,
                                                model_bytes=module_bytes(self.base), slots=self.max_slots)
        self.vectors, self.instruction, self.vectors_on = place_vectors(
            self.vectors, instruction, self.device, self._base_state, where, fallback=vectors_on is None)
        self._slots: list[Slot] = []
        self._cond = threading.Condition()
        self._waiting: list[tuple[int, int]] = []
        self._tickets = itertools.count()
        if concurrency is None:
            cores = os.cpu_count() or 1
            concurrency = max(1, cores // max(1, torch.get_num_threads())) if self.device.type == "cpu" else 1
        self.concurrency = max(1, min(int(concurrency), self.max_slots))
        self.trim_memory = bool(trim_memory)
        self._active = 0
        self._busy: set[int] = set()  # indices of leased slots
        # thread -> (priority, slot, state) of its lease (a second lease from the same thread is refused)
        self._held: dict[int, tuple[int, Slot, MergeState]] = {}
        self._cancels: dict[int, Callable[[], None]] = {}  # thread -> its lease's cancel check
        self._leasing: dict[int, threading.Thread] = {}  # thread -> itself, from its turn to its lease's end
        self.preemptions = 0
        self._cache: OrderedDict[tuple[MergeState, Hashable], Any] = OrderedDict()
        self._cache_size = int(cache_size)
        self._merges = self._reused = self._hits = self._leases = 0
        watch(self)  # its leases end before the interpreter does

    @classmethod
    def open(cls, base: str | os.PathLike, vectors: Sequence[str | os.PathLike], *,
             instruction: str | os.PathLike | None = None, device: str = "cpu", dtype: str = "float32",
             allow_fingerprint_mismatch: bool = False, trust_remote_code: bool = False,
             base_on: str | None = None, **kwargs: Any) -> MergeEngine:
        """Load the base and check every vector against it (all problems at once), then build the engine.

        ``base_on`` (None: decided as ``optimer plan`` decides, from the headers and the GPU's free memory): with
        "host" the base is loaded on the CPU, memory-mapped, and only the slots go to ``device``."""
        from optimer_lib.merging.pool import load_checked

        mode = pool_base_on(base_on, base, vectors, instruction, device=device, dtype=dtype,
                            slots=kwargs.get("max_slots"))
        where, dt = base_load_args(mode, device, dtype)  # on the host: mapped
        model, tok, vecs, inst = load_checked(base, vectors, instruction=instruction, dtype=dt, device=where,
                                              allow_fingerprint_mismatch=allow_fingerprint_mismatch,
                                              trust_remote_code=trust_remote_code)
        return cls(model, tok, vecs, instruction=inst, base_on=mode, device=device, **kwargs)

    # -- what callers read ---------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [v.name for v in self.vectors]

    def state(self, weights: Mapping[str, float], instruction_weight: float = 0.0, *, method: str = "optimer",
              params: Mapping[str, object] | None = None) -> MergeState:
        """A checked :class:`MergeState` over this pool (missing names get 0)."""
        if instruction_weight and self.instruction is None:
            raise ConfigError("this pool has no instruction vector: set the instruction weight to 0, or open the "
                              "pool with an instruction vector (optimer vector extract --base BASE --tuned IT)")
        return MergeState.of(self.names, weights, instruction_weight, method, params)

    def stats(self) -> EngineStats:
        with self._cond:
            per_slot = module_bytes(self._slots[0].model) if self._slots else module_bytes(self.base)
            return EngineStats(len(self._slots), self.max_slots, self._merges, self._reused, self._hits,
                               len(self._cache), len(self._waiting), module_bytes(self.base), per_slot,
                               [s.merges for s in self._slots], self._leases, self.base_on, self._base_mapped)

    # -- leases --------------------------------------------------------------------------------
    @contextmanager
    def lease(self, weights: Mapping[str, float] | MergeState, instruction_weight: float = 0.0, *,
              method: str = "optimer", params: Mapping[str, object] | None = None,
              priority: int = INTERACTIVE, exact: bool = False,
              cancel: Callable[[], None] | None = None) -> Iterator[Lease]:
        """A slot merged to ``weights`` (or a :class:`MergeState`), held until the block ends.

        ``exact=True`` re-merges the slot from the base even if it holds the state already (drops the rounding
        drift of incremental updates; an export wants it). ``cancel()`` is called before every forward pass and
        transformer block the lease's thread runs on the slot: raise from it to abandon the job mid-pass (a
        stopped search's running trial ends within one block, not one trial). Do not keep ``lease.model`` after
        the block: the engine re-merges it for the next request.
        """
        state = weights if isinstance(weights, MergeState) else self.state(
            weights, instruction_weight, method=method, params=params)
        waited = self._acquire(priority)
        slot = None
        # The thread that took the lease: a generator holding it (a streamed Tune score) may be resumed and closed
        # on another thread (Gradio's workers), so the entry is dropped by this key, not the closing thread's.
        me = threading.get_ident()
        self._leasing[me] = threading.current_thread()  # waited for at exit, its merge included
        try:
            if EXITING.is_set():
                raise EngineExiting
            if cancel is not None:  # stopped while waiting for the turn: no merge for a job nobody wants
                cancel()
            slot, changed, merge_s = self._materialise(state, exact)  # the slot is released below, or on failure
            self._held[me] = (int(priority), slot, state)
            if cancel is not None:
                self._cancels[me] = cancel
            yield Lease(slot.model, state, slot.index, changed, merge_s, waited)
        finally:
            self._cancels.pop(me, None)
            self._leasing.pop(me, None)
            held = self._held.get(me)
            if held is not None and held[1] is slot:
                del self._held[me]
            self._release(slot)  # slot None: the merge failed and freed it already
            if self.trim_memory:  # what this lease's forward passes freed leaves the process (engine.heap)
                trim_heap()

    def run(self, weights: Mapping[str, float] | MergeState, job: Callable[[torch.nn.Module], T], *,
            key: Hashable | None = None, instruction_weight: float = 0.0, method: str = "optimer",
            params: Mapping[str, object] | None = None, priority: int = INTERACTIVE) -> T:
        """``job(model)`` on a slot merged to ``weights``; with ``key``, the result is cached by (state, key)."""
        state = weights if isinstance(weights, MergeState) else self.state(
            weights, instruction_weight, method=method, params=params)
        if key is not None and (hit := self.cached(state, key)) is not None:
            return hit
        with self.lease(state, priority=priority) as lease:
            out = job(lease.model)
        if key is not None:
            self.remember(state, key, out)
        return out

    def cached(self, state: MergeState, key: Hashable) -> Any | None:
        """A result stored by :meth:`run` (or :meth:`remember`) for ``(state, key)``, or None."""
        with self._cond:
            hit = self._cache.get((state, key))
            if hit is not None:
                self._cache.move_to_end((state, key))
                self._hits += 1
            return hit

    def remember(self, state: MergeState, key: Hashable, result: Any) -> None:
        with self._cond:
            self._cache[(state, key)] = result
            self._cache.move_to_end((state, key))
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def merger(self, priority: int = SEARCH, **state_kw: Any):  # -> EngineMerger (import cycle-free below)
        """A :class:`~optimer_lib.merging.merger.Merger` for searches: each ``set_weights`` is a new lease."""
        from optimer_lib.engine.merger import EngineMerger

        return EngineMerger(self, priority=priority, **state_kw)

    # -- internals -----------------------------------------------------------------------------
    def _acquire(self, priority: int, slot: Slot | None = None) -> float:
        """Wait for a turn (and, given ``slot``, for that slot to be free): by priority, then arrival."""
        me = threading.get_ident()
        with self._cond:
            if me in self._held:
                raise RuntimeError("this thread already holds an engine lease: end it before asking for another "
                                   "(nested leases would deadlock)")
            ticket = (int(priority), next(self._tickets))
            heapq.heappush(self._waiting, ticket)
            t0 = time.perf_counter()
            while (self._active >= self.concurrency or self._waiting[0] != ticket
                   or (slot is not None and slot.index in self._busy)):
                if EXITING.is_set() and slot is None:  # a preempted lease takes its slot back, then stops
                    self._waiting.remove(ticket)
                    heapq.heapify(self._waiting)
                    self._cond.notify_all()
                    raise EngineExiting
                self._cond.wait()
            heapq.heappop(self._waiting)
            self._active += 1
            if slot is None:  # a new lease (a preempted one taking its slot back is not counted again)
                self._leases += 1
            else:
                self._busy.add(slot.index)
            self._cond.notify_all()  # the next waiter may fit too
            return time.perf_counter() - t0

    def _release(self, slot: Slot | None) -> None:
        with self._cond:
            self._active -= 1
            if slot is not None:
                self._busy.discard(slot.index)
            self._cond.notify_all()

    def _wake_for_exit(self) -> list[threading.Thread]:
        """At interpreter exit (:mod:`optimer_lib.engine.exiting`): wake the waiting requests, which then leave, and
        return the daemon threads holding a lease now (merging or running a job), for the exit to wait for."""
        with self._cond:
            self._cond.notify_all()
        return [t for t in list(self._leasing.values()) if t.daemon]

    def _check_cancel(self) -> None:
        """Run the ``cancel`` check of the calling thread's lease, if it gave one (it raises to abandon the job)."""
        me = threading.get_ident()
        if EXITING.is_set() and me in self._held:
            raise EngineExiting
        check = self._cancels.get(me)
        if check is not None:
            check()

    def _preempt(self, slot: Slot) -> None:
        """Between forward passes of ``slot``: if a higher-priority request waits, let it run first.

        Called by the slot model's forward pre-hook in whatever thread runs the forward; acts only for the
        thread holding the lease on that slot. Afterwards the slot holds the lease's state again.
        """
        me = threading.get_ident()
        held = self._held.get(me)
        if held is None or held[1] is not slot:
            return
        priority, _, state = held
        with self._cond:  # only when the waiter cannot run otherwise
            if not self._waiting or self._waiting[0][0] >= priority or self._active < self.concurrency:
                return
        self.preemptions += 1
        del self._held[me]
        self._release(slot)
        self._acquire(priority, slot)  # the same slot: this thread's forward pass is running on its model
        self._held[me] = (priority, slot, state)
        self._check_cancel()  # stopped while it waited: no re-merge back for a job nobody wants
        if slot.state != state:  # the other request re-merged this slot: put the lease's merge back
            self._remerge(slot, state)
        slot.last_used = time.monotonic()

    def _new_slot(self, state: MergeState) -> Slot:
        model = copy_to(self.base, self.device)  # tensor by tensor: no second host copy of a host base
        merger = ResidentMerger(model, self.vectors, instruction=self.instruction, instruction_weight=0.0,
                                method=state.method, base=self._base_state, stream_deltas=True,
                                **state.param_map)
        zero = MergeState.of(self.names, {}, 0.0, state.method, state.param_map)
        slot = Slot(len(self._slots), model, merger, zero)
        # The hook holds the engine and its slot weakly: a strong closure would make model -> hook -> slot -> model
        # and model -> hook -> engine cycles, and a dropped engine (a pool switch) would keep its slots' device
        # memory until the garbage collector happened to run.
        engine, index = weakref.ref(self), slot.index
        model.register_forward_pre_hook(lambda module, args: _preempt_hook(engine, index))
        # also before every block: a forward pass of a real model (one dev set's batch: ~3 s for SmolLM2-135M on a
        # CPU core) is too long a wait for a slider; a block is ~1/30 of it
        for block in _blocks(model):
            block.register_forward_pre_hook(lambda module, args: _preempt_hook(engine, index, inside=True))
        self._slots.append(slot)
        return slot

    def _pick(self, state: MergeState) -> tuple[Slot, int]:
        """The free slot to serve ``state`` and the vectors its re-merge reads (see the module docstring); marked
        busy. There is always one: fewer leases than ``concurrency`` <= ``max_slots`` are active."""
        with self._cond:
            free = [s for s in self._slots if s.index not in self._busy]
            slot = next((s for s in free if s.state == state), None)
            if slot is None and len(self._slots) < self.max_slots:
                slot = self._new_slot(state)
            if slot is None:
                slot = min(free, key=lambda s: (s.state.changes_to(state), s.last_used))
            self._busy.add(slot.index)
            return slot, slot.state.changes_to(state)

    def _materialise(self, state: MergeState, exact: bool = False) -> tuple[Slot, int, float]:
        slot, changed = self._pick(state)
        try:
            return (slot, *self._merge(slot, state, changed, exact))
        except BaseException:
            with self._cond:  # a failed merge must not leave its slot marked busy
                self._busy.discard(slot.index)
                self._cond.notify_all()
            raise

    def _merge(self, slot: Slot, state: MergeState, changed: int, exact: bool) -> tuple[int, float]:
        t0 = time.perf_counter()
        if exact or changed:
            self._remerge(slot, state, rebuild=exact)
            changed = max(changed, 1)
        else:
            self._reused += 1
        slot.last_used = time.monotonic()
        return changed, time.perf_counter() - t0

    def _remerge(self, slot: Slot, state: MergeState, rebuild: bool = False) -> None:
        """Merge ``state`` into ``slot`` (``rebuild``: afresh from the base, dropping incremental drift)."""
        m = slot.merger
        m.method, m.params = state.method, state.param_map
        m.set_weights(state.weight_map, instruction_weight=state.instruction_weight)
        if rebuild:
            m.rebuild()
        slot.state = state
        slot.merges += 1
        self._merges += 1

    def exact(self, state: MergeState) -> dict[str, torch.Tensor]:
        """A fresh merge of ``state`` from the base, tensor by tensor (the reference drift tests compare with)."""
        from optimer_lib.merging.methods import merge_state_dict

        return merge_state_dict(self._base_state, self.vectors, state.weight_map, method=state.method,
                                instruction=self.instruction, instruction_weight=state.instruction_weight,
                                **state.param_map)
