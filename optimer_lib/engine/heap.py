"""How a long-lived server hands the memory that forward passes freed back to the OS (glibc only).

    from optimer_lib.engine.heap import configure_heap, trim_heap
    configure_heap("fast")   # once, at server start (optimer workbench --heap fast|lean); False: not glibc
    trim_heap()              # True where glibc's malloc_trim ran (Linux), False elsewhere (a no-op)

A server (the workbench) runs forward passes in many threads. glibc gives threads their own heaps ("arenas") and
keeps freed blocks in them, so each new worker thread that scored once kept its activations' worth of memory:
~0.3 GB per browser session on SmolLM2-135M. Two ways out, measured on SmolLM2-135M with 10 browser sessions and
by ``bench/heap_modes.py`` (BENCHMARKS.md, "The merge engine with 1, 3 and 10 browser sessions"):

- ``"fast"`` (the default): 2 arenas for the process, a 32 MiB threshold (larger blocks get their own mapping),
  ``malloc_trim`` when each engine lease ends (``MergeEngine(trim_memory=True)``, as the workbench's engines are)
  and every 5 s from a daemon thread. Scoring at full speed, memory flat over 10 sessions; peaks are higher than
  with "lean" (freed blocks are kept until the next trim) but, since the scorer stopped holding a batch's logits
  (:mod:`optimer_lib.scoring.row_logits`), within base + slots + 25% (1.90-1.98 GB against 2.02 GB on SmolLM2-135M).
- ``"lean"``: a fixed 256 KiB mmap threshold, so every block from 256 KiB up is its own mapping, returned on free.
  The lowest peaks (1.85-1.88 GB), but each activation of each forward pass is mapped and page-faulted anew: Tune
  scoring takes ~1.3x as long (17.6-17.9 s against 13.4-13.7 s through the browser).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform
import threading

from optimer_lib.errors import ConfigError

M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # glibc's mallopt parameters (malloc.h)
LEAN_MMAP_THRESHOLD = 256 << 10  # "lean": every block from 256 KiB up is its own mapping


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def trim_heap() -> bool:
    """Return the free pages of every malloc arena to the OS; False where that cannot be done (not glibc)."""
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    libc.malloc_trim(0)
    return True


def limit_heap(mmap_threshold: int = 32 << 20, arenas: int = 2) -> bool:
    """Call once at the start of a server, before its worker threads exist: at most ``arenas`` malloc heaps for
    the whole process (freed blocks are reused by any thread, not kept per thread) and a fixed ``mmap_threshold``
    (blocks at least that large, such as the logits of a batch over a 49k vocabulary, 201 MB for SmolLM2 at 8 x
    128 tokens, get their own mapping, returned on free; a fixed value also stops glibc raising it). False where
    that cannot be set (not glibc)."""
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_ARENA_MAX, int(arenas))) and bool(libc.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)))


def start_trimmer(every_s: float = 5.0) -> threading.Event | None:
    """Start a daemon thread calling :func:`trim_heap` every ``every_s`` seconds; returns the event that stops it
    (None where trimming is not possible). A server's other threads (Gradio's events: figures, JSON, chat histories)
    free memory outside any engine lease. See :func:`configure_heap`, which starts one per process."""
    if _libc() is None:
        return None
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(every_s):
            trim_heap()

    threading.Thread(target=run, name="heap-trimmer", daemon=True).start()
    return stop


HEAP_MODES = ("lean", "fast")
_TRIMMER: threading.Event | None = None  # the stop event of configure_heap's trimmer thread
_TRIMMER_LOCK = threading.Lock()


def configure_heap(mode: str = "fast") -> bool:
    """Set up the process's malloc for a server, before its worker threads exist (see the module docstring);
    False where it cannot be done (not glibc)."""
    if mode not in HEAP_MODES:
        raise ConfigError(f"heap mode must be one of {', '.join(HEAP_MODES)}, got {mode!r}: lean keeps memory flat in "
                          "the number of sessions at the lowest peaks, fast (the default) scores in ~0.75x the time")
    libc = _libc()
    if libc is None:
        return False
    if mode == "lean":
        return bool(libc.mallopt(M_MMAP_THRESHOLD, LEAN_MMAP_THRESHOLD))  # fixed: glibc no longer raises it
    ok = limit_heap()
    global _TRIMMER
    with _TRIMMER_LOCK:  # one per process, however many servers (tests, notebooks) a process launches
        if _TRIMMER is None or _TRIMMER.is_set():
            _TRIMMER = start_trimmer()
    return ok
