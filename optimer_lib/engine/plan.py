"""Capacity planning: what a pool needs on a device, what fits, and what a re-merge costs, before loading anything.

    optimer plan --base runs/smollm2/base --vector vectors/ja.safetensors --vector vectors/code.safetensors
    optimer plan --sizes                         # 135M-27B on a 24 GiB CPU and an 80 GiB GPU (docs table)

    from optimer_lib.engine.plan import plan_pool, hypothetical_plans, markdown_table
    plan = plan_pool("assets/base", ["runs/demo/vectors/ja.safetensors"], device="cpu", dtype="float32")
    plan.fits, plan.slots_fit, plan.seconds_per_change      # True, 900, 0.002
    plan.check()                                            # PlanError with what to do when it does not fit
    print(markdown_table(hypothetical_plans()))

Sizes come from safetensors headers only (no tensor is read). The model the numbers describe is the merge
engine's: the base once on the compute device in the chosen dtype, ``slots`` materialised merged models beside it
(default 1 on a GPU, 2 on a CPU), vectors memory-mapped from their files (page cache, not anonymous memory) and
moved to the device tensor by tensor. Peak memory on the compute device ≈ base + slots × model + working memory
(runtime plus the scorer's logits). On a GPU whose memory cannot hold base + slots, the base stays memory-mapped
on the host and is streamed in for each full re-merge; vectors are kept on the device only when they fit beside
everything else. A linear re-merge of one changed vector in an fp32 slot reads the vector once and reads and
writes the slot once; bf16/fp16 slots (and non-linear methods) are re-merged fully from the base, which reads
the base and every vector and writes the slot. Times divide those bytes by a measured bandwidth (an ``add_`` over
tensors larger than any cache, about 0.2 s) or a given one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from optimer_lib.checkpoints.models import resolve_dtype
from optimer_lib.checkpoints.streaming import TensorReader, checkpoint_files
from optimer_lib.checkpoints.vectors import check_shapes, vector_files
from optimer_lib.engine.machine import DTYPE_NAMES, GB, GiB, Machine, resolve_compute, this_machine
from optimer_lib.errors import ConfigError
from optimer_lib.scoring.row_logits import chunk_rows, splits_by_config

RUNTIME_BYTES = GiB // 2   # Python, torch, tokenizer, dev suite (host) or the CUDA context (device)


class PlanError(ConfigError):
    """The pool cannot fit this machine; the message says by how much and what to change."""


def fmt_bytes(n: float) -> str:
    """Decimal units, as disk and model sizes are quoted: ``538 MB``, ``54.0 GB``."""
    return f"{n / GB:.1f} GB" if n >= GB else f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


@dataclass(frozen=True)
class PoolSize:
    """What the planner needs to know of a pool: parameter count, stored bytes, vector bytes (stored dtype)."""

    parameters: int                  # floating-point elements of the base (tied tensors once)
    base_stored_bytes: int
    vector_bytes: tuple[int, ...]    # one entry per vector file (instruction included), in its stored dtype
    vocab_size: int | None = None
    name: str = ""
    head_split: bool = True  # the scorer runs the LM head on a few sequences at a time (False: a batch; work_bytes)


def pool_size(base: str | os.PathLike, vectors: Sequence[str | os.PathLike] = (),
              instruction: str | os.PathLike | None = None) -> PoolSize:
    """Read sizes from the safetensors headers of ``base`` and each vector (no tensor data is read); VectorError
    when a vector's tensor names or shapes are not the base's."""
    import json

    reader = TensorReader(checkpoint_files(base))
    floats = [k for k in reader.info if reader.is_float(k)]
    params = sum(math.prod(reader.info[k][0]) for k in floats)
    stored = sum(reader.nbytes(k) for k in reader.info)
    try:
        config = json.loads((Path(base) / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    config = config if isinstance(config, dict) else {}
    base_shapes = {k: tuple(reader.info[k][0]) for k in reader.info}
    if config.get("tie_word_embeddings") and "lm_head.weight" not in base_shapes:
        # a tied head is stored once, as the embedding, but a loaded model (and so a vector) may name it too
        emb = [k for k in base_shapes if k.endswith("embed_tokens.weight")]
        base_shapes.update({"lm_head.weight": base_shapes[emb[0]]} if emb else {})
    vec_bytes = []
    for v in [*vectors, *([instruction] if instruction else [])]:
        meta, files = vector_files(v)
        vr = TensorReader(files)
        # names and shapes from the headers: a vector of another architecture is refused here, not when it loads
        # (the base fingerprint needs the tensors: the pool checks it when it opens)
        check_shapes(meta.get("name") or Path(v).stem, {k: tuple(vr.info[k][0]) for k in vr.info}, base_shapes)
        vec_bytes.append(sum(vr.nbytes(k) for k in vr.info))
    vocab = config.get("vocab_size")
    return PoolSize(params, stored, tuple(vec_bytes), vocab if isinstance(vocab, int) else None, str(base),
                    splits_by_config(config))


def hypothetical_pool(parameters: float, *, vectors: int = 2, itemsize: int = 2, vocab_size: int | None = None,
                      name: str = "") -> PoolSize:
    """A pool of a model with ``parameters`` parameters whose base and ``vectors`` vectors are stored at ``itemsize``
    bytes per parameter."""
    n = int(parameters)
    return PoolSize(n, itemsize * n, (n * itemsize,) * vectors, vocab_size, name)


@dataclass
class CapacityPlan:
    """What fits where; every size in bytes, every time in seconds (see the module docstring)."""

    pool: str
    machine: str
    device: str
    dtype: str
    parameters: int
    base_bytes: int                  # the base in ``dtype``
    slot_bytes: int                  # one merged model in ``dtype``
    vector_bytes: int                # every vector, stored dtype
    vectors: int
    work_bytes: int                  # runtime + the scorer's logits
    slots: int                       # requested
    slots_fit: int                   # most slots that fit (0: not even one)
    available_bytes: int             # compute-device memory available (host RAM on a CPU)
    host_bytes: int
    base_on_host: bool               # the base stays memory-mapped on the host (GPU too small for base + slots)
    vectors_resident: bool           # vectors fit on the device (GPU) or in the page cache (CPU)
    bandwidth: float
    host_to_device: float | None
    seconds_per_vector: float        # incremental linear re-merge of one changed vector (fp32 slots)
    seconds_full_merge: float        # re-materialise a slot from the base and every vector
    problems: list[str] = field(default_factory=list)
    vectors_pinned: bool = False     # GPU: not resident, one page-locked host copy in ``dtype`` (engine "pinned")
    pinned_to_device: float | None = None

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def need_bytes(self) -> int:
        """Memory the compute device must hold: base (unless it stays on the host) + slots + working memory."""
        return (0 if self.base_on_host else self.base_bytes) + self.slots * self.slot_bytes + self.work_bytes

    @property
    def seconds_per_change(self) -> float:
        """What one changed vector costs in this dtype: incremental in fp32, a full re-merge otherwise."""
        return self.seconds_per_vector if self.dtype == "float32" else self.seconds_full_merge

    def check(self) -> CapacityPlan:
        """Raise :class:`PlanError` (one line: sizes, what to change) unless the pool fits; returns self."""
        if self.problems:
            raise PlanError(self.problems[0])
        return self

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "fits": self.fits, "need_bytes": self.need_bytes,
                "seconds_per_change": self.seconds_per_change}

    def table(self) -> str:
        """The plan as a human-readable block (``optimer plan``)."""
        where = (self.device if not self.base_on_host else "host (memory-mapped: page cache, not process memory)"
                 if self.device == "cpu" else "host (memory-mapped), streamed to the device per full re-merge")
        if self.vectors_resident:
            vec_where = "resident on the device" if self.device != "cpu" else "in the page cache"
        elif self.vectors_pinned:
            vec_where = "pinned in host memory (process memory), streamed by DMA"
        else:
            vec_where = ("streamed from host memory" if self.device != "cpu" else
                         "streamed from disk (they do not fit the page cache)")
        h2d = f", host->device {self.host_to_device / GB:.1f} GB/s" if self.host_to_device else ""
        h2d += f" ({self.pinned_to_device / GB:.1f} GB/s pinned)" if self.vectors_pinned else ""
        rows = [("pool", f"{self.pool}: {self.parameters / 1e6:,.1f}M parameters, {self.vectors} vector(s)"),
                ("device", f"{self.device} ({self.machine}), {self.dtype}"),
                ("available", f"{fmt_bytes(self.available_bytes)} on the device" +
                 (f", {fmt_bytes(self.host_bytes)} host memory" if self.device != "cpu" else "")),
                ("base", f"{fmt_bytes(self.base_bytes)} on {where}"),
                ("slots", f"{self.slots} × {fmt_bytes(self.slot_bytes)} (at most {self.slots_fit} fit)"),
                ("working memory", fmt_bytes(self.work_bytes)),
                ("vectors", f"{fmt_bytes(self.vector_bytes)} stored, {vec_where}"),
                ("peak", f"{fmt_bytes(self.need_bytes)} of {fmt_bytes(self.available_bytes)}"),
                ("bandwidth", f"{self.bandwidth / GB:.1f} GB/s{h2d}"),
                ("re-merge", f"{self.seconds_per_vector:.3g} s per changed vector (fp32, incremental); "
                             f"{self.seconds_full_merge:.3g} s full; this dtype: {self.seconds_per_change:.3g} s"),
                ("verdict", "fits" if self.fits else f"does not fit: {self.problems[0]}")]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def work_bytes(vocab_size: int | None, *, batch_size: int = 16, seq_len: int = 128, leases: int = 1,
               head_split: bool = True, itemsize: int = 4) -> int:
    """Runtime plus, for each of ``leases`` jobs scoring at once, the scorer's logits in the model's dtype
    (``itemsize`` bytes; seq × vocab per sequence) and one sequence's fp32 log-softmax (a model in another dtype also
    makes an fp32 copy of that sequence's logits): the logits of :func:`~optimer_lib.scoring.row_logits.chunk_rows`
    sequences (at most the batch), or for a model that transforms its logits after the head (``head_split=False``)
    the whole batch's twice: the transform's result beside its input."""
    vocab = vocab_size or 32_000
    rows = min(batch_size, chunk_rows(seq_len, vocab, itemsize)) if head_split else batch_size
    copies = 1 if head_split else 2  # a transform after the head (logits / cap, tanh, * cap) makes new tensors
    fp32_rows = 1 if itemsize == 4 else 2
    return RUNTIME_BYTES + max(1, leases) * (copies * rows * itemsize + fp32_rows * 4) * seq_len * vocab


def base_stays_on_host(model_bytes: int, slots: int, work: int, available: int, *, gpu: bool) -> bool:
    """The rule :func:`make_plan` and the merge engine (``base_on=None``) share: the base stays memory-mapped on the
    host when the compute device is a GPU whose ``available`` bytes cannot hold it beside ``slots`` merged models
    and the working memory. On a CPU the host is the device: the base stays where it is."""
    return gpu and model_bytes * (1 + slots) + work > available


def make_plan(size: PoolSize, machine: Machine, *, dtype: str | torch.dtype | None = None, slots: int | None = None,
              batch_size: int = 16, seq_len: int = 128, base_on: str | None = None) -> CapacityPlan:
    """The plan for ``size`` on ``machine`` (``dtype``: None/"auto" = bf16 on CUDA, fp32 on CPU; ``slots``: None =
    1 on CUDA, 2 on CPU; ``base_on``: "host"/"device" as forced by ``--base-on``, None/"auto" = the engine's rule,
    :func:`base_stays_on_host`)."""
    dev = torch.device(machine.device)
    dt = resolve_dtype(dtype, dev)
    gpu = dev.type == "cuda"
    slots = (1 if gpu else 2) if slots is None else int(slots)
    if slots < 1:
        raise ConfigError(f"--slots must be at least 1, got {slots}")
    model = size.parameters * dt.itemsize
    vec_total = sum(size.vector_bytes)
    # a CPU runs a lease per slot at once (one per core at one thread each), a GPU one at a time
    work = work_bytes(size.vocab_size, batch_size=batch_size, seq_len=seq_len, leases=1 if gpu else slots,
                      head_split=size.head_split, itemsize=dt.itemsize)
    avail = machine.device_bytes if gpu and machine.device_bytes is not None else machine.host_bytes
    if base_on not in (None, "auto", "host", "device"):
        raise ConfigError(f"--base-on must be auto, host or device, got {base_on!r}")
    base_on_host = (base_on == "host" if base_on in ("host", "device") else
                    base_stays_on_host(model, slots, work, avail, gpu=gpu))
    resident_base = 0 if base_on_host else model
    slots_fit = max(0, (avail - resident_base - work) // model) if model else 0
    left = avail - resident_base - slots * model - work
    # on the device (GPU); in what anonymous memory leaves to the page cache (CPU), which a host base shares there
    resident = vec_total + (0 if gpu or not base_on_host else size.base_stored_bytes) <= left
    # the engine's rule (vector_placement.choose_vectors_on): vectors the GPU cannot hold get one page-locked host
    # copy in the model's dtype when the host has room for it (at most every parameter per vector)
    pinned = (gpu and not resident and machine.pinned_to_device is not None
              and len(size.vector_bytes) * size.parameters * dt.itemsize <= 0.75 * machine.host_bytes)
    if gpu:  # what is not on the device comes from the host's page cache if it holds it, else from disk
        cached = vec_total + (size.base_stored_bytes if base_on_host else 0) <= machine.host_bytes - RUNTIME_BYTES
        host_bw = min(machine.host_to_device or machine.bandwidth, machine.bandwidth if cached else machine.disk)
        vec_bw = machine.bandwidth if resident else (machine.pinned_to_device or host_bw) if pinned else host_bw
        base_bw = host_bw if base_on_host else machine.bandwidth
    else:
        vec_bw, base_bw = (machine.bandwidth if resident else machine.disk), machine.bandwidth
    per_vector = max(size.vector_bytes, default=0) / vec_bw + 2 * model / machine.bandwidth
    base_read = size.base_stored_bytes if base_on_host else model  # a host-mapped base moves in its stored dtype
    full = base_read / base_bw + vec_total / vec_bw + model / machine.bandwidth
    plan = CapacityPlan(size.name, machine.name, str(dev), DTYPE_NAMES.get(dt, str(dt)), size.parameters, model,
                        model, vec_total, len(size.vector_bytes), work, slots, int(slots_fit), int(avail),
                        machine.host_bytes, base_on_host, resident, machine.bandwidth, machine.host_to_device,
                        per_vector, full, vectors_pinned=pinned, pinned_to_device=machine.pinned_to_device)
    if left < 0:
        plan.problems.append(_refusal(plan))
    return plan


def _refusal(plan: CapacityPlan) -> str:
    """One line: what is needed, what there is, what to change."""
    what = "" if plan.base_on_host else f"the base ({fmt_bytes(plan.base_bytes)}) plus "
    where = "this GPU has" if plan.device != "cpu" else "this machine has"
    fixes = []
    if plan.dtype == "float32":
        fixes.append("--dtype bfloat16")
    if plan.slots > 1:
        fixes.append(f"--slots {max(1, plan.slots_fit)}")
    # one GPU per engine: say so, or a user with several (each too small) looks for a switch that is not there
    fixes.append("a larger machine" if plan.device == "cpu" else
                 "--device cpu or a GPU with more memory (the engine runs on one GPU: it does not split a model "
                 "across several)")
    return (f"{what}{plan.slots} slot{'s' if plan.slots > 1 else ''} ({fmt_bytes(plan.slots * plan.slot_bytes)}) "
            f"and {fmt_bytes(plan.work_bytes)} of working memory need {fmt_bytes(plan.need_bytes)} but {where} "
            f"{fmt_bytes(plan.available_bytes)} free: use {_either(fixes)}")


def _either(items: Sequence[str]) -> str:
    """``a``, ``a or b``, ``a, b, or c``."""
    return items[0] if len(items) == 1 else f"{items[0]} or {items[1]}" if len(items) == 2 else \
        ", ".join(items[:-1]) + f", or {items[-1]}"


def plan_pool(base: str | os.PathLike, vectors: Sequence[str | os.PathLike] = (), *,
              instruction: str | os.PathLike | None = None, device: str | None = "auto", dtype: str | None = None,
              slots: int | None = None, bandwidth: float | None = None, host_bytes: int | None = None,
              device_bytes: int | None = None, host_to_device: float | None = None,
              pinned_to_device: float | None = None, seconds: float = 0.2, base_on: str | None = None) -> CapacityPlan:
    """:func:`make_plan` for a pool on disk and this machine (``host_bytes``/``device_bytes``/``bandwidth`` override
    what is read or measured: tests, what-ifs; ``base_on`` as in :func:`make_plan`)."""
    dev, dt = resolve_compute(device, dtype)
    size = pool_size(base, vectors, instruction)
    machine = this_machine(str(dev), bandwidth=bandwidth, host_bytes=host_bytes, device_bytes=device_bytes,
                           host_to_device=host_to_device, pinned_to_device=pinned_to_device, seconds=seconds)
    return make_plan(size, machine, dtype=dt, slots=slots, base_on=base_on)


# ---- hypothetical models and machines (docs/performance.md, BENCHMARKS.md: ``optimer plan --sizes``) ---------
HYPOTHETICAL_MODELS = (("135M", 135e6, 49_152), ("1.7B", 1.7e9, 49_152), ("7B", 7e9, 32_000),
                       ("27B", 27e9, 262_144))  # SmolLM2-135M/-1.7B, Llama-2/Mistral-7B, Gemma-3-27B vocabularies
CPU_BANDWIDTH = 20 * GB    # add_ bandwidth measured on this project's 2-core machine: 18-21 GB/s
GPU_BANDWIDTH = 1500 * GB  # an 80 GB A100/H100-class GPU: 2.0-3.35 TB/s nominal, ~75% reached by add_
PCIE_BANDWIDTH = 12 * GB   # pageable host -> device copies over PCIe 4.0 x16
PINNED_BANDWIDTH = 24 * GB  # page-locked ones (PCIe 4.0 x16: ~25 GB/s; ~55 GB/s measured on an H200, BENCHMARKS.md)
HYPOTHETICAL_MACHINES = (
    Machine("24 GiB CPU", "cpu", 24 * GiB, None, CPU_BANDWIDTH),
    Machine("80 GiB GPU", "cuda", 192 * GiB, 80 * GiB, GPU_BANDWIDTH, PCIE_BANDWIDTH, PINNED_BANDWIDTH),
)


def hypothetical_plans(models: Sequence[tuple[str, float, int]] = HYPOTHETICAL_MODELS,
                       machines: Sequence[Machine] = HYPOTHETICAL_MACHINES,
                       dtypes: Sequence[str] = ("float32", "bfloat16"), *, vectors: int = 2,
                       slots: int | None = None) -> list[CapacityPlan]:
    """One plan per (model, machine, dtype): base and ``vectors`` vectors stored in that dtype, default slots."""
    out = []
    for name, params, vocab in models:
        for machine in machines:
            for dtype in dtypes:
                itemsize = resolve_dtype(dtype, torch.device("cpu")).itemsize
                size = hypothetical_pool(params, vectors=vectors, itemsize=itemsize, vocab_size=vocab, name=name)
                out.append(make_plan(size, machine, dtype=dtype, slots=slots))
    return out


def _secs(s: float) -> str:
    return f"{s * 1e3:.0f} ms" if s < 1 else f"{s:.1f} s" if s < 100 else f"{s / 60:.0f} min"


def markdown_table(plans: Sequence[CapacityPlan]) -> str:
    """A Markdown table of plans (one row each): sizes, what fits where, re-merge time per changed vector."""
    head = ("| model | machine | dtype | base | slot | slots (fit) | base on | vectors | peak / available "
            "| per changed vector | verdict |\n|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for p in plans:
        vec_where = ("device" if p.device != "cpu" else "page cache") if p.vectors_resident else \
            "pinned host" if p.vectors_pinned else ("streamed from host" if p.device != "cpu" else "streamed from disk")
        rows.append(f"| {p.pool} | {p.machine} | {p.dtype} | {fmt_bytes(p.base_bytes)} | {fmt_bytes(p.slot_bytes)} "
                    f"| {p.slots} ({p.slots_fit}) | {'host (mmap)' if p.base_on_host else 'device'} "
                    f"| {p.vectors} × {fmt_bytes(p.vector_bytes / max(1, p.vectors))}, {vec_where} "
                    f"| {fmt_bytes(p.need_bytes)} / {fmt_bytes(p.available_bytes)} "
                    f"| {_secs(p.seconds_per_change) if p.fits else '—'} "
                    f"| {'fits' if p.fits else 'does not fit'} |")
    return "\n".join([head, *rows])
