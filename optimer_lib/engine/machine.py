"""The machine a pool is planned for: memory available on the host and the compute device, and measured bandwidths.

    from optimer_lib.engine.machine import this_machine, resolve_compute
    machine = this_machine("auto")              # Machine(host_bytes=..., device_bytes=..., bandwidth=...), measured now
    device, dtype = resolve_compute("cuda:1", "bfloat16")   # ConfigError naming what to use instead

:mod:`optimer_lib.engine.plan` turns a :class:`Machine` and a pool's sizes into a capacity plan.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from optimer_lib.checkpoints.models import resolve_device, resolve_dtype
from optimer_lib.errors import ConfigError

GB, GiB = 1e9, 2**30
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(frozen=True)
class Machine:
    """Memory available (bytes) and bandwidths (bytes/s) of one compute device and its host."""

    name: str
    device: str                         # "cpu" or "cuda:N"
    host_bytes: int                     # host memory available (MemAvailable), page cache counted as free
    device_bytes: int | None = None     # free memory of the CUDA device (None on a CPU)
    bandwidth: float = 10 * GB          # read+write bandwidth of an in-place add on the compute device
    host_to_device: float | None = None  # host -> device copy bandwidth from pageable memory (CUDA only)
    pinned_to_device: float | None = None  # the same from page-locked memory (the engine's pinned vectors)
    disk: float = 2 * GB                 # reads of files the page cache cannot hold (assumed: an NVMe SSD)


def available_host_memory() -> int:
    """Host memory available to a new process: psutil when installed, else MemAvailable of /proc/meminfo."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise ConfigError("cannot read the available memory (no psutil, no /proc/meminfo): pip install psutil")


def free_device_memory(device: str | torch.device) -> int:
    """Bytes a new tensor on the CUDA ``device`` can use: the driver's free memory plus what torch's caching
    allocator holds unused (freed tensors stay reserved, and the allocator reuses them before asking for more)."""
    free = int(torch.cuda.mem_get_info(device)[0])
    return free + max(0, int(torch.cuda.memory_reserved(device)) - int(torch.cuda.memory_allocated(device)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(device: str | torch.device = "cpu", *, seconds: float = 0.2, mib: int = 64) -> float:
    """Bytes/s of ``a.add_(b, alpha=...)`` on ``device`` over two ``mib``-MiB fp32 tensors (3 × size moved per add).

    Tensors larger than the caches, as a re-merge's; repeated for about ``seconds``.
    """
    dev = torch.device(device)
    n = mib * 2**20 // 4
    a, b = torch.zeros(n, device=dev), torch.ones(n, device=dev)
    a.add_(b, alpha=0.5)  # first touch: page faults / lazy allocation are not bandwidth
    _sync(dev)
    start, reps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds or reps < 2:
        a.add_(b, alpha=0.5)
        reps += 1
        if dev.type == "cuda" and reps % 8:
            continue
        _sync(dev)
    _sync(dev)
    return 3 * a.nbytes * reps / (time.perf_counter() - start)


def measure_host_to_device(device: str | torch.device, *, seconds: float = 0.2, mib: int = 64,
                           pinned: bool = False) -> float:
    """Bytes/s of copying pageable host memory (as a memory-mapped vector is), or with ``pinned`` page-locked host
    memory (the engine's ``vectors_on="pinned"``), to the CUDA ``device``."""
    dev = torch.device(device)
    src = torch.ones(mib * 2**20 // 4)
    if pinned:
        src = src.pin_memory()
    dst = src.to(dev)
    _sync(dev)
    start, reps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds or reps < 2:
        dst.copy_(src)
        _sync(dev)
        reps += 1
    return src.nbytes * reps / (time.perf_counter() - start)


def resolve_compute(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """``--device``/``--dtype`` checked: the names (one line each) and that a CUDA device is there."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device} but no CUDA device is visible: use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                              f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif dev.type != "cpu":
        raise ConfigError(f"--device {device} is not supported: use cpu, cuda, cuda:N or auto")
    dt = resolve_dtype(dtype, dev)
    if dt not in DTYPE_NAMES:
        raise ConfigError(f"--dtype {dtype}: choose float32, bfloat16 or float16")
    return dev, dt


def this_machine(device: str | None = "auto", *, bandwidth: float | None = None, host_bytes: int | None = None,
                 device_bytes: int | None = None, host_to_device: float | None = None,
                 pinned_to_device: float | None = None, seconds: float = 0.2) -> Machine:
    """The machine this process runs on: available memory now and (unless given) measured bandwidths."""
    dev, _ = resolve_compute(device, None)
    host = available_host_memory() if host_bytes is None else int(host_bytes)
    free, h2d, pinned = None, None, None
    if dev.type == "cuda":
        free = free_device_memory(dev) if device_bytes is None else int(device_bytes)
        h2d = measure_host_to_device(dev, seconds=seconds) if host_to_device is None else float(host_to_device)
        pinned = (measure_host_to_device(dev, seconds=seconds, pinned=True) if pinned_to_device is None
                  else float(pinned_to_device))
    bw = measure_bandwidth(dev, seconds=seconds) if bandwidth is None else float(bandwidth)
    return Machine("this machine", str(dev), host, free, bw, h2d, pinned_to_device=pinned)
