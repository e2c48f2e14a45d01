"""Merge methods (pure tensor functions) and whole state-dict merges; the in-place merger is in ``resident``.

    from optimer_lib.merging.methods import merge_state_dict
    merged = merge_state_dict(base.state_dict(), [ja, zh], {"ja": 1, "zh": 1}, method="ties", density=0.2)

Every method in :data:`MERGE_METHODS` is ``fn(base, deltas, weights, **params) -> Tensor``: it never
modifies its inputs, computes in fp32 and returns the base's dtype. Add one with
``@register_merge_method("name")``; CLI users pick it with ``--method name``.
"""

from __future__ import annotations

import inspect
import math
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


def format_method_params(params: Mapping[str, object]) -> str:
    """``{"density": 0.5, "seed": 7}`` as ``"density=0.5, seed=7"``: what :func:`parse_method_params` reads back."""
    return ", ".join(f"{k}={v}" for k, v in params.items())


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
    """Keep the top ``density`` fraction of entries by magnitude (at least one), zero the rest.

    Entries tied with the k-th largest magnitude are kept lowest index first. ``topk``'s own choice among ties
    differs between CPU and CUDA, and ties are common in bf16 (8 significant bits): a GPU then kept other entries
    than the CPU (0.73 relative on one tensor); the k-th value itself is the same on every device.
    """
    if density >= 1.0:
        return d
    k = max(1, int(density * d.numel()))
    mag = d.reshape(-1).abs()
    kth = mag.topk(k).values[-1]
    above = mag > kth
    at = mag == kth
    keep = above | (at & (torch.cumsum(at, 0) <= k - above.sum()))
    return (d.reshape(-1) * keep).view_as(d)


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


def vector_delta(vec: DistributionVector, name: str, aliases_of: Mapping[str, list[str]]) -> Tensor | None:
    """The vector's delta for ``name``, found under a tied alias if the vector used that name."""
    for n in (name, *aliases_of.get(name, ())):
        if n in vec.tensors:
            return vec.tensors[n]
    return None


def split_aliases(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str], dict[str, list[str]]]:
    """``(kept, {alias: kept_name}, {kept_name: [aliases]})`` for a state dict with tied weights."""
    kept, aliases = unique_tensors(state)
    aliases_of: dict[str, list[str]] = {}
    for alias, canon in aliases.items():
        aliases_of.setdefault(canon, []).append(alias)
    return kept, aliases, aliases_of


def merge_tensor(name: str, base: Tensor, deltas: Sequence[Tensor | None], weights: Sequence[float],
                  method: str, params: Mapping[str, object], instr: Tensor | None, instr_w: float) -> Tensor:
    fn = get_merge_method(method)
    # Deltas are rounded to the base's dtype first, as every merger does (resident ones cast once, streamed ones
    # per use): the search, the engine and the export then agree whatever dtype the vectors were saved in.
    cast = {"device": base.device, "dtype": base.dtype}
    ds = [torch.zeros_like(base) if d is None else d.to(**cast) for d in deltas]
    ws = list(weights)
    if fn is optimer_merge:  # linear: the instruction is one more term, summed in the same fp32 pass
        if instr is not None:
            ds.append(instr.to(**cast))
            ws.append(instr_w)
        return optimer_merge(base, ds, ws)
    merged = fn(base, ds, ws, **_tensor_params(params, name))
    if instr is not None and instr_w:
        merged = merged.float().add_(instr.to(**cast), alpha=instr_w).to(base.dtype)
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
    kept, aliases, aliases_of = split_aliases(state)
    out: dict[str, Tensor] = {}
    for name, base in kept.items():
        deltas = [vector_delta(v, name, aliases_of) for v in vectors]
        instr = vector_delta(instruction, name, aliases_of) if instruction is not None else None
        if not base.is_floating_point() or (instr is None and all(d is None for d in deltas)):
            out[name] = base
            continue
        wt = ws if gw is None else gw.at(groups.position(name, aliases_of.get(name, ())))
        out[name] = merge_tensor(name, base.detach(), deltas, wt, method, params, instr,
                                  float(instruction_weight))
    for alias, canon in aliases.items():
        out[alias] = out[canon]
    return {k: out[k] for k in state}
