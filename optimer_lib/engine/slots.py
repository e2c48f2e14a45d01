"""What the merge engine lends and reports: a :class:`Slot` (a merged model), a :class:`Lease` of one, and
:class:`EngineStats` (see :mod:`optimer_lib.engine.engine`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from optimer_lib.engine.state import MergeState
from optimer_lib.merging.resident import ResidentMerger


@dataclass
class Slot:
    """One materialised merged model and the state it holds."""

    index: int
    model: torch.nn.Module
    merger: ResidentMerger
    state: MergeState
    last_used: float = 0.0
    merges: int = 0


@dataclass
class Lease:
    """A slot lent to one request: ``model`` holds ``state`` until the lease ends."""

    model: torch.nn.Module
    state: MergeState
    slot: int
    changed: int  # vectors the re-merge had to read (0: the slot already held the state)
    merge_s: float
    waited_s: float


@dataclass
class EngineStats:
    """Counters since the engine started; ``bytes_*`` are tensor bytes the engine holds."""

    slots: int
    max_slots: int
    merges: int
    reused: int
    cache_hits: int
    cache_size: int
    waiting: int
    bytes_base: int
    bytes_per_slot: int
    merges_by_slot: list[int] = field(default_factory=list)
    leases: int = 0  # leases granted (each one job: a score, a trial, a batch of chat replies)
    base_on: str = "device"  # "host": the base stays (memory-mapped) in host memory, the slots on the device
    bytes_base_mapped: int = 0  # of bytes_base, those file-backed (page cache, not process memory)
