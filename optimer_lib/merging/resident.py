"""The resident merger: keeps one model loaded and re-merges its parameters in place for each set of weights.

    from optimer_lib.merging.resident import ResidentMerger
    merger = ResidentMerger(model, [ja, zh], instruction=it)   # model holds the base weights
    merger.set_weights({"ja": 0.3, "zh": 0.1})                 # theta = base + 0.3 ja + 0.1 zh + 1.0 it
    with merger.lock:                                           # a re-merge never races a generation
        out = merger.model.generate(...)

The merge arithmetic is :mod:`optimer_lib.merging.methods` (one place): this module only decides which
tensors change and applies the incremental update or a fresh merge.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from optimer_lib.checkpoints.vectors import DistributionVector, check_compatible
from optimer_lib.errors import ConfigError
from optimer_lib.merging import groups
from optimer_lib.merging.methods import check_method_params, merge_tensor, ordered_weights, split_aliases, vector_delta


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
    """``t`` on ``like``'s device and in its dtype (a no-op when it is so already).

    A streamed delta is rounded to the model's dtype exactly as a resident one is when it is cast once, so where
    the vectors live (host, device, file) never changes a merge: in bf16, TIES's top-k trim on fp32 deltas keeps
    other entries than on the bf16 deltas a resident merger holds (seen on a GPU: 0.89 relative on one tensor).
    """
    if t.device == like.device and t.dtype == like.dtype:
        return t
    return t.to(like.device, like.dtype, non_blocking=True)


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
        kept, _, aliases_of = split_aliases(state)
        self._targets: list[_Target] = []
        for name, p in kept.items():
            deltas = [vector_delta(v, name, aliases_of) for v in vectors]
            instr = vector_delta(instruction, name, aliases_of) if instruction is not None else None
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
                else:  # on the parameter's device, also when the base is kept on the host (MergeEngine base_on)
                    t.param.copy_(merge_tensor(t.name, _on(t.base, t.param), t.deltas, wt, self.method, self.params,
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
