"""A base model that stays memory-mapped on the host, and copies of it built on a device tensor by tensor.

    from optimer_lib.checkpoints.mapped import load_model_mapped, copy_to
    base, info = load_model_mapped("runs/smollm2/base", dtype="float32")   # on the CPU, file-backed
    info.mapped_bytes, info.total_bytes, info.note     # 538 MB, 538 MB, "" (note: why some bytes are not mapped)
    slot = copy_to(base, "cuda")                       # a device copy, no second host copy on the way

Why it maps. transformers (5.x) builds the architecture on the ``meta`` device and assigns each tensor handed
out by ``safetensors.safe_open`` (a private, copy-on-write memory map of the file), then computes the
non-persistent buffers (rotary ``inv_freq``) for real and re-ties tied weights. So a safetensors checkpoint
loaded on the CPU in its stored dtype *is* file-backed: its bytes are page cache (RssFile), not process memory
(RssAnon), and the kernel can drop and re-read them. :func:`load_model_mapped` is :func:`load_model` on the CPU
plus a check of that promise, measured from ``/proc/self/maps`` (:func:`file_backed_bytes`): a future loader that
copies would show up in ``info`` (and in ``tests/test_host_base.py``), not silently double the memory.

What cannot stay mapped. A checkpoint stored in another dtype than ``dtype`` is converted, so the base is process
memory: loaded anyway, with ``info.note`` saying so and which ``--dtype`` would keep it mapped (refusing would
make a bf16 slot of an fp32 checkpoint impossible on a GPU, the common case). Non-safetensors checkpoints load as
:func:`load_model` does, and the note says how much of them is mapped. Writing into a mapped tensor is allowed
(the map is private): the written pages become process memory, the file is never changed.
"""

from __future__ import annotations

import bisect
import copy
import itertools
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from optimer_lib.checkpoints.models import load_model, resolve_device, resolve_dtype
from optimer_lib.errors import ModelError


def _mb(n: float) -> str:
    return f"{n / 1e6:.0f} MB" if n >= 1e7 else f"{n / 1e6:.2f} MB"


@dataclass(frozen=True)
class MappedInfo:
    """How much of a model's tensor bytes are file-backed (page cache), and why the rest is not (``note``)."""

    mapped_bytes: int
    total_bytes: int
    note: str = ""  # empty when every tensor is file-backed (or the platform cannot tell: no /proc)

    @property
    def fraction(self) -> float:
        return self.mapped_bytes / self.total_bytes if self.total_bytes else 1.0


def _file_ranges() -> tuple[list[int], list[int]] | None:
    """Sorted (starts, ends) of this process's file-backed mappings (regular files: not anonymous memory, not
    shared memory); None where /proc/self/maps cannot be read (not Linux)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    ranges = []
    for line in lines:
        parts = line.split(maxsplit=5)
        path = parts[5].strip() if len(parts) == 6 else ""
        if parts[4] == "0" or not path.startswith("/") or path.startswith(("/dev/", "/memfd:", "/SYSV")):
            continue  # anonymous, [heap]/[stack], shared memory: process memory, not page cache of a file
        start, end = (int(x, 16) for x in parts[0].split("-"))
        ranges.append((start, end))
    ranges.sort()
    return [s for s, _ in ranges], [e for _, e in ranges]


def file_backed_bytes(tensors: Iterable[torch.Tensor]) -> tuple[int, int] | None:
    """``(file-backed bytes, all bytes)`` of the distinct CPU storages of ``tensors`` (tied tensors once); None
    where the platform cannot tell (no /proc/self/maps). A storage counts as file-backed when its memory lies in
    a mapping of a regular file, as ``safe_open`` tensors do."""
    ranges = _file_ranges()
    if ranges is None:
        return None
    starts, ends = ranges
    seen: dict[int, tuple[int, bool]] = {}
    for t in tensors:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr in seen or st.nbytes() == 0:
            continue
        i = bisect.bisect_right(starts, ptr) - 1
        mapped = t.device.type == "cpu" and i >= 0 and ptr + st.nbytes() <= ends[i]
        seen[ptr] = (st.nbytes(), mapped)
    return sum(n for n, m in seen.values() if m), sum(n for n, _ in seen.values())


def mapping_of(model: torch.nn.Module, stored: torch.dtype | None = None) -> MappedInfo:
    """:class:`MappedInfo` of ``model``'s parameters and buffers; ``stored`` (the checkpoint's dtype; default: read
    from the folder the model was loaded from) explains a conversion in the note."""
    counted = file_backed_bytes(itertools.chain(model.parameters(), model.buffers()))
    if counted is None:
        return MappedInfo(0, 0, "cannot tell which tensors are memory-mapped on this platform (no /proc/self/maps)")
    mapped, total = counted
    params = {t.untyped_storage().data_ptr() for t in model.parameters()}
    buffers = sum(b.untyped_storage().nbytes() for b in model.buffers() if b.untyped_storage().data_ptr() not in params)
    if mapped + buffers >= total:  # buffers (rotary tables) are computed at load time, never in the file
        return MappedInfo(mapped, total)
    dtype = next(model.parameters()).dtype
    held = total - buffers - mapped
    where = getattr(model, "name_or_path", "")  # transformers records the folder a model was loaded from
    if stored is None and where and Path(where).is_dir():
        stored = stored_dtype(where)
    if stored is not None and stored != dtype:
        name = str(stored).removeprefix("torch.")
        note = (f"the checkpoint stores {name} and the base is converted to {str(dtype).removeprefix('torch.')}, so "
                f"{_mb(held)} of it are process memory, not memory-mapped: --dtype {name} keeps it mapped")
    else:
        note = (f"{_mb(held)} of the base's {_mb(total)} are process memory, not memory-mapped (not a "
                "safetensors checkpoint, or weights converted while loading)")
    return MappedInfo(mapped, total, note)


def stored_dtype(path: str | os.PathLike) -> torch.dtype | None:
    """The dtype most of a safetensors checkpoint's floating-point bytes are stored in (None: not safetensors)."""
    from optimer_lib.checkpoints.streaming import TensorReader, checkpoint_files

    try:
        reader = TensorReader(checkpoint_files(path))
    except ModelError:
        return None
    by_dtype: dict[str, int] = {}
    for k, (_, dt) in reader.info.items():
        if reader.is_float(k):
            by_dtype[dt] = by_dtype.get(dt, 0) + reader.nbytes(k)
    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
    return names.get(max(by_dtype, key=by_dtype.__getitem__)) if by_dtype else None


def load_model_mapped(path: str | os.PathLike, *, dtype: str | torch.dtype | None = "float32",
                      trust_remote_code: bool = False) -> tuple[torch.nn.Module, MappedInfo]:
    """``(model on the CPU, MappedInfo)``: the base as :func:`load_model` loads it, kept on the host and checked to
    be memory-mapped (see the module docstring); ``info.note`` says what is not mapped and why."""
    model = load_model(path, dtype=dtype, device="cpu", trust_remote_code=trust_remote_code)
    return model, mapping_of(model)


def base_load_args(base_on: str, device: str | None, dtype: str | None) -> tuple[str | None, str | None]:
    """``(device, dtype)`` to load a base for slots on ``device``: as given when ``base_on`` is "device"; for a base
    kept on the host ("host"), the CPU, and ``dtype`` as the *compute* device resolves it (None/"auto": bfloat16
    on CUDA), not as the CPU would (float32)."""
    if base_on != "host":
        return device, dtype
    if dtype is None or dtype == "auto":
        dtype = str(resolve_dtype(dtype, resolve_device(device))).removeprefix("torch.")
    return "cpu", dtype


def copy_to(model: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """A copy of ``model`` with every parameter and buffer on ``device``, filled tensor by tensor.

    ``copy.deepcopy`` then ``.to(device)`` would first clone a host base whole into process memory; here the copy
    is built around empty tensors already on ``device`` (tied weights share one id, so they stay tied) and each
    base tensor is copied into its twin. On the host's own device this is a plain deep copy.
    """
    dev = torch.device(device)
    memo: dict[int, object] = {}
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    for t in itertools.chain(model.parameters(), model.buffers()):
        if id(t) in memo:
            continue
        new = torch.empty_like(t, device=dev)
        if isinstance(t, torch.nn.Parameter):
            new = torch.nn.Parameter(new, requires_grad=t.requires_grad)
        memo[id(t)] = new
        pairs.append((t, new))
    out = copy.deepcopy(model, memo)
    with torch.no_grad():
        for src, dst in pairs:
            dst.copy_(src)
    return out
