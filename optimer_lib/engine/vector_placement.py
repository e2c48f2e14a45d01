"""Where the merge engine keeps the vectors: as given, one copy on the device, or one pinned host copy.

    from optimer_lib.engine.vector_placement import choose_vectors_on, place_vectors
    where = choose_vectors_on(vectors, base_state, device, model_bytes=..., slots=1)   # "device" | "pinned" | "host"
    vectors, instruction, where = place_vectors(vectors, instruction, device, base_state, where, fallback=True)

``"host"`` leaves the vectors where they are (``load_vector`` tensors are memory-mapped from their files) and each
merge moves a tensor to the device as it reads it. ``"device"`` makes one device copy that every slot reads.
``"pinned"`` (CUDA only) makes one page-locked host copy streamed by DMA: a slider move took 73.9 ms against
522.7 ms from pageable memory and 12.8 ms with the vectors on the device (0.84B bf16 on an H200, BENCHMARKS.md).
Both copies round each delta to the dtype of the base tensor it changes, as every merge does, so the placement
never changes a merge (a bf16 model may keep its norms in fp32).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import torch

from optimer_lib.checkpoints.vectors import DistributionVector
from optimer_lib.engine.machine import available_host_memory
from optimer_lib.errors import ConfigError

log = logging.getLogger(__name__)
VECTORS_ON = ("host", "pinned", "device")


def check_vectors_on(vectors_on: str | None, device: torch.device) -> None:
    """A ConfigError unless ``vectors_on`` is None (automatic) or one of :data:`VECTORS_ON` usable on ``device``."""
    if vectors_on is not None and vectors_on not in VECTORS_ON:
        raise ConfigError(f"vectors_on must be 'host', 'pinned', 'device' or None (automatic), got {vectors_on!r}")
    if vectors_on == "pinned" and device.type != "cuda":
        raise ConfigError(f"vectors_on='pinned' streams page-locked host memory to a CUDA GPU; the engine computes "
                          f"on {device}: use 'host' (or None)")


def _dtype(like: Mapping[str, torch.Tensor], name: str, t: torch.Tensor) -> torch.dtype:
    """The dtype a delta ``t`` of tensor ``name`` is rounded to: the base tensor's (tied aliases have each name)."""
    return like[name].dtype if name in like and t.is_floating_point() else t.dtype


def _copy(vec: DistributionVector, device: torch.device, like: Mapping[str, torch.Tensor],
          pin: bool = False) -> DistributionVector:
    """``vec`` with each tensor in its base tensor's dtype, on ``device`` or (``pin``) in page-locked host memory."""
    out = {}
    for k, t in vec.tensors.items():
        t = t.to(_dtype(like, k, t))
        out[k] = t.pin_memory() if pin else t.to(device)
    return dataclasses.replace(vec, tensors=out)


def pinned_bytes(vectors: Sequence[DistributionVector], like: Mapping[str, torch.Tensor]) -> int:
    """Host memory the pinned copies take: torch's pinned allocator rounds each block up to a power of two."""
    total = 0
    for v in vectors:
        for k, t in v.tensors.items():
            n = t.numel() * _dtype(like, k, t).itemsize
            total += 1 << max(0, (n - 1).bit_length())
    return total


def choose_vectors_on(vectors: Sequence[DistributionVector], like: Mapping[str, torch.Tensor], device: torch.device,
                      *, model_bytes: int, slots: int, dtype: torch.dtype) -> str:
    """The automatic placement: the device when it is a GPU with room for the vectors (in ``dtype``) beside
    ``slots`` models of ``model_bytes`` and a 25% margin; else pinned host memory when the host has that room (a
    streamed move from pageable memory took 42x a resident one on an H200); else the host as they are.
    ``optimer plan`` prices the same rule (:func:`optimer_lib.engine.plan.make_plan`)."""
    if device.type != "cuda":
        return "host"
    free, _ = torch.cuda.mem_get_info(device)
    vec = sum(t.numel() * dtype.itemsize for v in vectors for t in v.tensors.values())
    if vec + slots * model_bytes <= 0.75 * free:
        return "device"
    try:
        host = available_host_memory()
    except ConfigError:  # no way to read it: do not page-lock what may not fit
        return "host"
    return "pinned" if pinned_bytes(vectors, like) <= 0.75 * host else "host"


def place_vectors(vectors: Sequence[DistributionVector], instruction: DistributionVector | None,
                  device: torch.device, like: Mapping[str, torch.Tensor], where: str, *, fallback: bool
                  ) -> tuple[list[DistributionVector], DistributionVector | None, str]:
    """``(vectors, instruction, where)`` after placing them ``where`` (see the module docstring); on a CPU every
    placement is the host. With ``fallback`` (an automatic choice) a pinned copy that fails to allocate leaves the
    vectors where they are ("host") instead of raising."""
    if where == "host" or device.type == "cpu":
        return list(vectors), instruction, where
    pin = where == "pinned"
    try:
        placed = [_copy(v, device, like, pin) for v in vectors]
        return placed, None if instruction is None else _copy(instruction, device, like, pin), where
    except RuntimeError as exc:  # the page-locked copy did not fit after all
        if not (fallback and pin):
            raise
        log.warning("vectors_on: pinning the vectors failed (%s); streaming them from where they are", exc)
        return list(vectors), instruction, "host"
