"""Merge methods (pure tensor functions) and the resident merger that re-merges a model in place.

    from optimer_lib.merging.methods import ResidentMerger, merge_state_dict
    merger = ResidentMerger(model, [ja, zh], instruction=it)   # model holds the base weights
    merger.set_weights({"ja": 0.3, "zh": 0.1})                 # theta = base + 0.3 ja + 0.1 zh + 1.0 it
    with merger.lock:                                           # a re-merge never races a generation
        out = merger.model.generate(...)
    merged = merge_state_dict(base.state_dict(), [ja, zh], {"ja": 1, "zh": 1}, method="ties", density=0.2)

Every method in :data:`MERGE_METHODS` is ``fn(base, deltas, weights, **params) -> Tensor``: it never
modifies its inputs, computes in fp32 and returns the base's dtype. Add one with
``@register_merge_method("name")``; CLI users pick it with ``--method name``.
"""

from __future__ import annotations

import inspect
import math
import threading
import zlib
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from optimer_lib.checkpoints.vectors import DistributionVector, check_compatible, unique_tensors
from optimer_lib.errors import ConfigError
from optimer_lib.merging import groups

MergeMethod = Callable[..., Tensor]
MERGE_METHODS: dict[str, MergeMethod] = {}


def register_merge_method(*names: str) -> Callable[[MergeMethod], MergeMethod]:
    """Decorator: register a pure merge function under one or more names."""

    def deco(fn: MergeMethod) -> MergeMethod:
        for n in names:
            MERGE_METHODS[n] = fn
        return fn

    return deco


def get_merge_method(name: str) -> MergeMethod:
    """The merge function called ``name``, or ConfigError listing the valid choices."""
    if name not in MERGE_METHODS:
        raise ConfigError(f"unknown merge method {name!r}: choose one of {', '.join(sorted(MERGE_METHODS))}")
    return MERGE_METHODS[name]


def check_method_params(name: str, params: Mapping[str, object]) -> None:
    """ConfigError if ``params`` holds an option the method does not take (catches typos early)."""
    sig = inspect.signature(get_merge_method(name))
    valid = [p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    bad = sorted(set(params) - set(valid))
    if bad:
        raise ConfigError(f"merge method {name!r} has no option(s) {bad}: valid options are {valid or 'none'}")


def parse_method_params(items: str | Sequence[str] | None, method: str | None = None, *,
                        flag: str = "") -> dict[str, object]:
    """``"density=0.5, lam=1"`` (or ``["density=0.5", "lam=1"]``) as ``{"density": 0.5, "lam": 1}``.

    Values are numbers (integers stay integers, e.g. DARE's ``seed``). With ``method`` the names are checked
    against the method's options. ConfigError with one line per mistake, naming ``flag`` (e.g. ``--param``).
    """
    if isinstance(items, str):
        items = [i for i in items.split(",") if i.strip()]
    what, example = (flag, f"{flag} density=0.5") if flag else ("method parameter", "density=0.5")
    out: dict[str, object] = {}
    for item in items or []:
        k, sep, v = item.strip().partition("=")
        k, v = k.strip(), v.strip()
        if not sep or not k:
            raise ConfigError(f"bad {what} {item.strip()!r}: use NAME=VALUE (e.g. {example})")
        try:
            out[k] = int(v) if v.lstrip("-").isdigit() else float(v)
        except ValueError:
            raise ConfigError(f"bad {what} {item.strip()!r}: the value must be a number") from None
    if method is not None:
        check_method_params(method, out)
    return out


@register_merge_method("optimer", "linear")
def optimer_merge(base: Tensor, deltas: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """base + sum_i w_i d_i with free per-vector weights.

    OptiMer (Song & Utiyama 2026, arXiv 2603.28858); identical to mergekit ``task_arithmetic`` with
    per-model weights. Zero weights are skipped, so all-zero weights return the base bit for bit.
    """
    out = base.to(torch.float32, copy=True)
    for d, w in zip(deltas, weights, strict=True):
        if w:
            out.add_(d.to(out.device), alpha=float(w))
    return out.to(base.dtype)


@register_merge_method("average")
def average_merge(base: Tensor, deltas: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """base + mean_i d_i, i.e. the uniform average of the tuned models; ``weights`` are ignored.

    Model soups (Wortsman et al. 2022, arXiv 2203.05482).
    """
    out = base.to(torch.float32, copy=True)
    if deltas:
        acc = torch.zeros_like(out)
        for d in deltas:
            acc.add_(d.to(out.device))
        out.add_(acc, alpha=1.0 / len(deltas))
    return out.to(base.dtype)


@register_merge_method("task_arithmetic")
def task_arithmetic_merge(base: Tensor, deltas: Sequence[Tensor], weights: Sequence[float], *,
                          lam: float = 1.0) -> Tensor:
    """base + lam * sum_i d_i with one scaling coefficient; ``weights`` are ignored.

    Task arithmetic (Ilharco et al. 2023, arXiv 2212.04089).
    """
    return optimer_merge(base, deltas, [lam] * len(deltas))


def _check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"density must be in (0, 1], got {density}: e.g. density=0.2 keeps 20% of entries")


def _trim(d: Tensor, density: float) -> Tensor:
    """Keep the top ``density`` fraction of entries by magnitude (at least one), zero the rest."""
    if density >= 1.0:
        return d
    k = max(1, int(density * d.numel()))
    flat = d.reshape(-1)
    mask = torch.zeros_like(flat)
    mask[flat.abs().topk(k).indices] = 1
    return (flat * mask).view_as(d)


@register_merge_method("ties")
def ties_merge(base: Tensor, deltas: Sequence[Tensor], weights: Sequence[float], *, density: float = 0.2,
               lam: float = 1.0, normalize: bool = True) -> Tensor:
    """TIES: trim each delta to its top-``density`` magnitudes, elect a sign per entry, disjoint mean.

    TIES-Merging (Yadav et al. 2023, arXiv 2306.01708), with mergekit's semantics: the elected sign is
    the sign of sum_i w_i trim(d_i) (ties go to +); entries whose weighted sign disagrees (or is zero)
    are dropped; with ``normalize`` the sum is divided by the summed weights of the agreeing entries;
    the result is scaled by ``lam``. Unlike mergekit, a tiny tensor keeps at least one entry.
    """
    _check_density(density)
    if not deltas:
        return base.clone()
    out = base.to(torch.float32, copy=True)
    stacked = torch.stack([_trim(d.to(out.device, torch.float32), density) for d in deltas])
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32, device=out.device)
    w = w.view(-1, *([1] * base.dim()))
    weighted = stacked * w
    majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = (weighted.sign() == majority).to(torch.float32)
    mixed = (weighted * agree).sum(0)
    if normalize:
        divisor = (w * agree).sum(0)
        mixed = mixed / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return out.add_(mixed, alpha=float(lam)).to(base.dtype)


@register_merge_method("dare")
def dare_merge(base: Tensor, deltas: Sequence[Tensor], weights: Sequence[float], *, density: float = 0.5,
               seed: int = 0) -> Tensor:
    """DARE: drop each delta entry with probability 1 - density, rescale survivors by 1/density, then
    combine linearly (base + sum_i w_i dare(d_i)); mergekit's ``dare_linear``.

    Language Models are Super Mario (Yu et al. 2024, arXiv 2311.03099). Masks come from a generator
    seeded with ``seed`` and are drawn for every delta, so changing one weight leaves other masks alone.
    """
    _check_density(density)
    if density >= 1.0:
        return optimer_merge(base, deltas, weights)
    out = base.to(torch.float32, copy=True)
    gen = torch.Generator(device=out.device).manual_seed(int(seed))
    for d, w in zip(deltas, weights, strict=True):
        keep = torch.rand(d.shape, generator=gen, device=out.device) < density
        if w:
            out.add_(d.to(out.device, torch.float32) * keep, alpha=float(w) / density)
    return out.to(base.dtype)


def _tensor_params(params: Mapping[str, object], name: str) -> dict[str, object]:
    """Per-tensor method options: a ``seed`` is mixed with the tensor name so masks differ by tensor."""
    p = dict(params)
    if "seed" in p:
        seed = int(str(p["seed"]))
        p["seed"] = (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**62)
    return p


def ordered_weights(names: Sequence[str], weights: Mapping[str, float]) -> list[float]:
    """Weights in vector order; ConfigError naming missing or unknown keys, or non-finite values."""
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if list(names).count(n) > 1})
        raise ConfigError(f"vector names must be unique, {dup} repeat: rename with --name when extracting")
    missing, extra = sorted(set(names) - set(weights)), sorted(set(weights) - set(names))
    if missing or extra:
        raise ConfigError(f"weights must name every vector exactly once (vectors: {list(names)}); "
                          f"missing: {missing}, unknown: {extra}")
    try:
        out = [float(weights[n]) for n in names]
    except (TypeError, ValueError):
        raise ConfigError(f"weights must be numbers, got {dict(weights)}") from None
    bad = [n for n, w in zip(names, out, strict=True) if not math.isfinite(w)]
    if bad:
        raise ConfigError(f"weights of {bad} are not finite numbers: give a number such as 0.3")
    return out


def _delta(vec: DistributionVector, name: str, aliases_of: Mapping[str, list[str]]) -> Tensor | None:
    """The vector's delta for ``name``, found under a tied alias if the vector used that name."""
    for n in (name, *aliases_of.get(name, ())):
        if n in vec.tensors:
            return vec.tensors[n]
    return None


def _split_aliases(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str], dict[str, list[str]]]:
    """``(kept, {alias: kept_name}, {kept_name: [aliases]})`` for a state dict with tied weights."""
    kept, aliases = unique_tensors(state)
    aliases_of: dict[str, list[str]] = {}
    for alias, canon in aliases.items():
        aliases_of.setdefault(canon, []).append(alias)
    return kept, aliases, aliases_of


def merge_tensor(name: str, base: Tensor, deltas: Sequence[Tensor | None], weights: Sequence[float],
                  method: str, params: Mapping[str, object], instr: Tensor | None, instr_w: float) -> Tensor:
    fn = get_merge_method(method)
    ds = [torch.zeros_like(base) if d is None else d.to(base.device) for d in deltas]
    ws = list(weights)
    if fn is optimer_merge:  # linear: the instruction is one more term, summed in the same fp32 pass
        if instr is not None:
            ds.append(instr.to(base.device))
            ws.append(instr_w)
        return optimer_merge(base, ds, ws)
    merged = fn(base, ds, ws, **_tensor_params(params, name))
    if instr is not None and instr_w:
        merged = merged.float().add_(instr.to(base.device), alpha=instr_w).to(base.dtype)
    return merged


def merge_state_dict(base_state: Mapping[str, Tensor] | torch.nn.Module, vectors: Sequence[DistributionVector],
                     weights: Mapping[str, float], *, method: str = "optimer",
                     instruction: DistributionVector | None = None, instruction_weight: float = 1.0,
                     **params: object) -> dict[str, Tensor]:
    """A merged state dict, built tensor by tensor; ``weights`` maps each vector's name to its weight.

    Tensors no vector touches (and non-float ones) are the base's own tensor objects, not copies; tied
    aliases map to the same merged tensor. The instruction vector is added linearly with its own weight
    after the method's merge. Names and shapes are checked; the base fingerprint is the caller's job
    (see :func:`optimer_lib.checkpoints.vectors.check_compatible`).
    """
    check_method_params(method, params)
    gw = groups.resolve([v.name for v in vectors], weights)  # ``name@group`` keys: per-layer-group weights
    ws = ordered_weights([v.name for v in vectors], weights) if gw is None else gw.plain
    state = base_state.state_dict() if isinstance(base_state, torch.nn.Module) else base_state
    extra = [instruction] if instruction is not None else []
    for v in [*vectors, *extra]:
        check_compatible(v, state, allow_fingerprint_mismatch=True)
    kept, aliases, aliases_of = _split_aliases(state)
    out: dict[str, Tensor] = {}
    for name, base in kept.items():
        deltas = [_delta(v, name, aliases_of) for v in vectors]
        instr = _delta(instruction, name, aliases_of) if instruction is not None else None
        if not base.is_floating_point() or (instr is None and all(d is None for d in deltas)):
            out[name] = base
            continue
        wt = ws if gw is None else gw.at(groups.position(name, aliases_of.get(name, ())))
        out[name] = merge_tensor(name, base.detach(), deltas, wt, method, params, instr,
                                  float(instruction_weight))
    for alias, canon in aliases.items():
        out[alias] = out[canon]
    return {k: out[k] for k in state}


class _Target:
    """One parameter the merger rewrites: the live tensor, the base tensor and each vector's delta.

    ``base`` is a tensor shared with whoever owns the base (a merge engine keeps one base for all its
    slots); without it the parameter's current value is copied. With ``stream`` the deltas stay where
    they are (e.g. memory-mapped on the host, in the vector's dtype) and are moved per use; otherwise
    they are cast once to the parameter's device and dtype.
    """

    __slots__ = ("name", "param", "base", "deltas", "instr", "pos")

    def __init__(self, name: str, param: Tensor, deltas: list[Tensor | None], instr: Tensor | None,
                 base: Tensor | None = None, stream: bool = False, pos: groups.Position = groups.HEAD):
        self.name, self.param, self.pos = name, param, pos  # pos: the layer group position (per-group weights)
        if base is not None and tuple(base.shape) != tuple(param.shape):
            raise ConfigError(f"shared base tensor {name} has shape {tuple(base.shape)}, the model "
                              f"{tuple(param.shape)}: pass the base of this model")
        self.base = param.detach().clone() if base is None else base.detach()
        cast = {"device": param.device, "dtype": param.dtype}
        if stream:
            self.deltas, self.instr = list(deltas), instr
        else:
            self.deltas = [None if d is None else d.to(**cast) for d in deltas]
            self.instr = None if instr is None else instr.to(**cast)


def _on(t: Tensor, like: Tensor) -> Tensor:
    """``t`` on ``like``'s device (a no-op when it is there already); dtypes are left to the arithmetic."""
    return t if t.device == like.device else t.to(like.device, non_blocking=True)


class ResidentMerger:
    """Keeps ``model`` loaded and rewrites its parameters in place for each new set of weights.

    The model must hold the base weights when the merger is built; names and shapes are checked here,
    the base fingerprint is the caller's job (``optimer_lib.merging.pool.open_pool`` does it, once). ``method``
    and ``params`` are plain attributes read at each ``set_weights``. Memory: one copy of every touched
    parameter plus each vector, all on the model's device and in its dtype. Tied parameters are one
    tensor and are written once, so they stay tied. ``method="optimer"`` takes a fast path (in-place
    ``add`` with ``alpha``; low-precision models accumulate in one reused fp32 scratch buffer); other
    methods run their pure function per tensor.

    Speed paths of the linear merge (``bench/merge_throughput.py`` measures both):

    - ``chunk_elems``: tensors larger than this are merged chunk by chunk (base copy and every
      vector's add per chunk), so the partial sum stays in cache and memory traffic approaches the
      ``(K + 2) · P · bytes`` of reading base and K vectors and writing the result once. ``0`` turns
      it off; ``None`` (default) means 1M elements when torch runs one intra-op thread, else off
      (measured 1.0-2x faster with one thread; with two threads on busy shared cores every chunk is
      one more thread barrier and it was often slower). Same floating-point operations in the same
      order, so results equal the unchunked path.
    - ``rebuild_every``: on fp32 parameters, when fewer weights change than terms a fresh merge
      would add, only ``Δα_i · τ_i`` of the changed ones is added in place; every ``rebuild_every``
      incremental updates (and after a non-linear method or ``reset``) a fresh merge bounds the
      rounding drift. ``0`` turns it off. It assumes nothing but the merger writes the parameters;
      call :meth:`rebuild` after changing them elsewhere. Low-precision (bf16/fp16) parameters are always
      merged fresh: an in-place bf16 update rounds to the *intermediate* value's precision, and where
      base + Σ α τ nearly cancels no rebuild interval bounds the error in ulps of the result.

    Shared memory (what :class:`optimer_lib.engine.MergeEngine` uses so memory does not grow with users):
    ``base`` (name -> tensor, e.g. another model's ``state_dict()``) is read instead of copying the model's
    own weights, so the merger adds nothing beyond the model; ``stream_deltas=True`` keeps the vectors'
    tensors where they are (memory-mapped on the host, in their own dtype) and moves each to the device
    when a merge reads it, instead of holding a converted copy per merger.
    """

    chunk_elems: int | None = None
    rebuild_every: int = 16

    def __init__(self, model: torch.nn.Module, vectors: Sequence[DistributionVector], *,
                 method: str = "optimer", instruction: DistributionVector | None = None,
                 instruction_weight: float = 1.0, base: Mapping[str, Tensor] | None = None,
                 stream_deltas: bool = False, **params: object) -> None:
        check_method_params(method, params)
        ordered_weights([v.name for v in vectors], {v.name: 0.0 for v in vectors})  # unique names
        self._model, self._vectors, self.method, self.params = model, list(vectors), method, dict(params)
        self.instruction = instruction
        self.instruction_weight = float(instruction_weight)
        self.lock = threading.RLock()
        state = model.state_dict(keep_vars=True)
        extra = [instruction] if instruction is not None else []
        for v in [*vectors, *extra]:
            check_compatible(v, state, allow_fingerprint_mismatch=True)
        kept, _, aliases_of = _split_aliases(state)
        self._targets: list[_Target] = []
        for name, p in kept.items():
            deltas = [_delta(v, name, aliases_of) for v in vectors]
            instr = _delta(instruction, name, aliases_of) if instruction is not None else None
            if p.is_floating_point() and (instr is not None or any(d is not None for d in deltas)):
                shared = None if base is None else base[name]
                self._targets.append(_Target(name, p, deltas, instr, shared, stream_deltas,
                                             groups.position(name, aliases_of.get(name, ()))))
        # One fp32 accumulator per device, reused by every low-precision parameter on it (a chunk's
        # worth when chunking; resized in _write_linear if chunk_elems is changed later).
        self._scratch: dict[torch.device, Tensor] = {}
        self._weights: dict[str, float] = {v.name: 0.0 for v in vectors}
        self._groups: groups.GroupWeights | None = None  # resolved ``name@group`` weights of _weights, if any
        self._incremental_ok = False  # True once the parameters hold base + sum(_weights) + iw * instruction
        self._since_rebuild = 0

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def names(self) -> list[str]:
        return [v.name for v in self._vectors]

    @property
    def weights(self) -> dict[str, float]:
        """The weights currently merged into the model (all 0 after construction or reset)."""
        return dict(self._weights)

    def set_weights(self, weights: Mapping[str, float], instruction_weight: float | None = None) -> None:
        """Re-merge in place: theta = base + merge(weights) (+ instruction_weight * instruction).

        ``instruction_weight=None`` keeps the merger's current ``instruction_weight``. ``name@group`` keys give
        per-layer-group weights (:mod:`optimer_lib.merging.groups`); without them one weight per vector.
        """
        gw = groups.resolve(self.names, weights)
        ws = ordered_weights(self.names, weights) if gw is None else gw.plain
        iw = self.instruction_weight if instruction_weight is None else float(instruction_weight)
        with self.lock, torch.no_grad():
            linear = self.method in ("optimer", "linear")
            inst = self.instruction is not None
            old_gw, plans = self._groups, {}
            stepped = False
            for t in self._targets:
                key = None if gw is None and old_gw is None else t.pos  # per vector: one plan for every tensor
                if key not in plans:
                    wt = ws if gw is None else gw.at(t.pos)
                    ot = [self._weights[n] for n in self.names] if old_gw is None else old_gw.at(t.pos)
                    new = [*wt, iw] if inst else wt
                    old = [*ot, *([self.instruction_weight] if inst else [])]
                    diff = [(i, w - o) for i, (w, o) in enumerate(zip(new, old, strict=True)) if w != o]
                    fresh = sum(1 for w in new if w)  # terms a fresh merge adds; an incremental one adds len(diff)
                    step = (linear and self.rebuild_every > 0 and self._incremental_ok
                            and self._since_rebuild < self.rebuild_every and len(diff) < fresh)
                    plans[key] = (wt, diff, step)
                wt, diff, step = plans[key]
                stepped = stepped or step
                if step and t.param.dtype == torch.float32:
                    self._add_linear(t, diff)
                elif linear:
                    self._write_linear(t, wt, iw)
                else:
                    t.param.copy_(merge_tensor(t.name, t.base, t.deltas, wt, self.method, self.params,
                                                t.instr, iw))
            self._since_rebuild = self._since_rebuild + 1 if stepped else 0
            self._incremental_ok = linear
            self._weights = dict(zip(self.names, ws, strict=True))
            if gw is not None:
                self._weights.update({k: float(v) for k, v in weights.items() if groups.SEP in k})
            self._groups = gw
            self.instruction_weight = iw

    def rebuild(self) -> None:
        """Re-merge the current weights from the base copies (drops any incremental rounding drift)."""
        with self.lock:
            self._incremental_ok = False
            self.set_weights(self._weights)

    def _chunks(self, n: int) -> list[slice]:
        size = self.chunk_elems
        if size is None:  # 1M elements: 4 MiB of fp32 partial sums, within L3
            size = 1 << 20 if torch.get_num_threads() == 1 else 0
        step = size if 0 < size < n else n
        return [slice(s, min(s + step, n)) for s in range(0, n, step)]

    def _add_linear(self, t: _Target, diff: Sequence[tuple[int, float]]) -> None:
        """Incremental update of an fp32 parameter: param += sum of Δw_i · d_i over changed terms."""
        srcs = [*t.deltas, t.instr]
        p = t.param.detach()
        terms = [(_on(srcs[i], p), dw) for i, dw in diff if srcs[i] is not None]
        if not terms:
            return
        if not p.is_contiguous():
            for d, w in terms:
                p.add_(d, alpha=w)
            return
        flat_p = p.view(-1)
        flat = [(d.reshape(-1), w) for d, w in terms]
        for sl in self._chunks(flat_p.numel()):
            chunk = flat_p[sl]
            for d, w in flat:
                chunk.add_(d[sl], alpha=w)

    def _write_linear(self, t: _Target, ws: Sequence[float], iw: float) -> None:
        p = t.param.detach()
        terms = [(_on(d, p), w) for d, w in zip(t.deltas, ws, strict=True) if d is not None and w]
        if t.instr is not None and iw:
            terms.append((_on(t.instr, p), iw))
        if not terms:
            p.copy_(t.base)
            return
        n = p.numel()
        if p.is_contiguous():
            p, base, terms = p.view(-1), _on(t.base, p).reshape(-1), [(d.reshape(-1), w) for d, w in terms]
            chunks = self._chunks(n)
        else:
            base, chunks = _on(t.base, p), [slice(None)]
        if p.dtype == torch.float32:
            # Per chunk: param = base + w0 d0, then += w_i d_i while the chunk is still in cache.
            for sl in chunks:
                out = p[sl]
                torch.add(base[sl], terms[0][0][sl], alpha=terms[0][1], out=out)
                for d, w in terms[1:]:
                    out.add_(d[sl], alpha=w)
            return
        width = n if len(chunks) == 1 else chunks[0].stop
        scratch = self._scratch.get(p.device)
        if scratch is None or scratch.numel() < width:
            scratch = self._scratch[p.device] = torch.empty(width, dtype=torch.float32, device=p.device)
        for sl in chunks:
            out = p[sl]
            acc = scratch[: out.numel()].view(out.shape)
            acc.copy_(base[sl])
            for d, w in terms:
                acc.add_(d[sl], alpha=w)
            out.copy_(acc)

    def reset(self) -> None:
        """Put the base weights back (no vector, no instruction)."""
        with self.lock, torch.no_grad():
            for t in self._targets:
                t.param.copy_(t.base)
            self._weights, self._groups = {n: 0.0 for n in self.names}, None
            self._incremental_ok = False  # the instruction is out too: the next merge is a fresh one
