"""Where the merge engine keeps its base: on the compute device, or memory-mapped on the host.

    from optimer_lib.engine.host_base import pool_base_on
    pool_base_on(None, "big/base", ["vectors/ja.safetensors"], device="cuda", dtype="bfloat16", slots=1)  # "host"
    engine = MergeEngine.open("big/base", ["vectors/ja.safetensors"], device="cuda", base_on="host")

``base_on="device"`` (the engine's classic layout): the base is a model on the compute device and every slot is a
copy of it there, so the device holds base + slots x model. ``base_on="host"``: the base stays on the host, as
loaded (``load_model_mapped``: a private memory map of its safetensors files, so page cache rather than process
memory), and only the slots live on the compute device, each built tensor by tensor
(:func:`~optimer_lib.checkpoints.mapped.copy_to`); the device then holds slots x model. A linear re-merge of a
changed vector never reads the base; a full re-merge (a bf16 slot, a non-linear method, a rebuild) moves each base
tensor to the device as it merges it, as the vectors are streamed.

``None``/``"auto"`` decides with the rule ``optimer plan`` prints (:func:`~optimer_lib.engine.plan.base_stays_on_host`):
host when the compute device is a GPU whose free memory cannot hold base + slots x model + working memory, else
device. On a CPU automatic means "device" (host and device are the same memory there); asking for "host" on a CPU
loads the base with :func:`~optimer_lib.checkpoints.mapped.load_model_mapped`, which checks and reports (``stats``)
that it is memory-mapped.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence

import torch

from optimer_lib.checkpoints.models import resolve_device
from optimer_lib.engine.machine import Machine, available_host_memory, free_device_memory, resolve_compute
from optimer_lib.engine.plan import base_stays_on_host, make_plan, pool_size, work_bytes
from optimer_lib.errors import ConfigError, ModelError
from optimer_lib.scoring.row_logits import splits_by_config

BASE_ON = ("auto", "host", "device")  # the --base-on choices


def check_base_on(base_on: str | None) -> str | None:
    """``"host"``, ``"device"`` or None (automatic: None or ``"auto"``); anything else is a ConfigError."""
    if base_on is None or base_on == "auto":
        return None
    if base_on not in ("host", "device"):
        raise ConfigError(f"base_on (--base-on) must be auto, host or device, got {base_on!r}: host keeps the base "
                          "memory-mapped in host memory, device puts it beside the slots")
    return base_on


def default_slots(device: torch.device) -> int:
    """2 on CPU (two chat panes or two sessions alternate without re-merging), 1 on an accelerator."""
    return 2 if device.type == "cpu" else 1


def module_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's distinct parameter and buffer storages (tied tensors counted once), wherever they are."""
    seen: dict[int, int] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def compute_device(device: str | torch.device | None) -> torch.device:
    """``device`` resolved; a bare ``cuda`` gets its index (``cuda:0``), so it equals the device of tensors on it
    (``torch.device("cuda") != torch.device("cuda:0")``: a base already there would be taken for one elsewhere)."""
    dev = resolve_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={str(device)!r} but no CUDA device is visible: use device='cpu' (or 'auto')")
    return torch.device("cuda", torch.cuda.current_device()) if dev.type == "cuda" and dev.index is None else dev


def place_base(model: torch.nn.Module, base_on: str | None, device: str | torch.device | None,
               max_slots: int | None) -> tuple[str, torch.device, torch.nn.Module, int]:
    """``(base_on, compute device, base, slots)`` for an engine given a loaded base (see the module docstring).

    ``device`` None is the model's own device; ``max_slots`` None is :func:`default_slots` there. In device mode a
    base elsewhere is moved there; host mode needs the base on the CPU (a base already on a GPU is refused rather
    than copied back behind the caller's back).
    """
    here = next(model.parameters()).device
    dev = here if device is None else compute_device(device)
    slots = default_slots(dev) if max_slots is None else int(max_slots)
    if slots < 1:
        raise ConfigError(f"max_slots must be at least 1, got {max_slots}")
    mode = check_base_on(base_on)
    if mode is None:
        if dev.type != "cuda" or here == dev:  # a base already on the device stays there
            mode = "device"
        else:
            config = getattr(model, "config", None)
            work = work_bytes(getattr(config, "vocab_size", None), head_split=splits_by_config(config),
                              itemsize=next(model.parameters()).element_size())
            host = base_stays_on_host(module_bytes(model), slots, work, free_device_memory(dev), gpu=True)
            mode = "host" if host else "device"
    if mode == "host" and here.type != "cpu":
        raise ConfigError(f"base_on='host' keeps the base in host memory, but this one is on {here}: load it on the "
                          f"CPU (load_model_mapped, or MergeEngine.open(..., base_on='host')) and pass device='{dev}'")
    if mode == "device" and here != dev:
        model = model.to(dev)
    return mode, dev, model, slots


def pool_base_on(base_on: str | None, base: str | os.PathLike, vectors: Sequence[str | os.PathLike] = (),
                 instruction: str | os.PathLike | None = None, *, device: str | None = "cpu",
                 dtype: str | None = None, slots: int | None = None) -> str:
    """``"host"`` or ``"device"`` for a pool on disk, decided before anything loads: what was asked, else the plan's
    decision (``optimer plan`` prints the same) from the safetensors headers and this GPU's free memory."""
    mode = check_base_on(base_on)
    if mode is not None:
        return mode
    dev, dt = resolve_compute(device, dtype)
    if dev.type != "cuda":
        return "device"
    try:
        size = pool_size(base, vectors, instruction)
    except ModelError:  # not safetensors: no headers to size it from; the base goes where it always went
        return "device"
    machine = Machine("this machine", str(dev), available_host_memory(), free_device_memory(dev), bandwidth=1.0)
    return "host" if make_plan(size, machine, dtype=dt, slots=slots).base_on_host else "device"
