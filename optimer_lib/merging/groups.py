"""Per-layer-group merge weights: which group a tensor belongs to, group names, and weight keys ``vector@group``.

    from optimer_lib.merging.groups import Granularity, layout, param_names
    g = Granularity.parse("layer-groups:2")              # or "vector" (one α per vector, the default)
    groups = layout(model, g)                             # ["embed", "blocks0-0", "blocks1-1", "head"]
    param_names(["ja", "zh"], groups)                     # ["ja@embed", "ja@blocks0-0", ..., "zh@head"]
    merger.set_weights({"ja": 0.3, "ja@blocks1-1": 0.5, "zh": 0.1})   # ja's block 1 at 0.5, the rest of ja at 0.3

Groups: ``embed`` (the token/position embeddings, and the output head when it is tied to them, as in the
embedded tiny model and SmolLM2), the transformer blocks in G contiguous slices ``blocksA-B`` (layers A..B, both
included; sizes differ by at most one), and ``head`` (the final norm, an untied output head, and any tensor that
is neither an embedding nor in a block). So ``layer-groups:G`` gives G + 2 weights per vector.

Weight keys: a plain vector name is that vector's weight everywhere; ``name@group`` overrides it on the group's
tensors. A group name describes itself (``blocks2-5`` is layers 2..5), so the merge needs no layout: every merge
path (:class:`~optimer_lib.merging.resident.ResidentMerger`, ``merge_state_dict``, the engine's ``MergeState``)
takes such keys. Without any ``@`` key the weights are per vector, exactly as before; with some, a vector with no
plain weight gets 0 outside its groups.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from optimer_lib.errors import ConfigError

SEP = "@"
EMBED, HEAD = "embed", "head"
Position = str | int  # "embed", "head" or a block index
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
_BLOCKS = re.compile(r"^blocks(\d+)-(\d+)$")
_EMBED_PARTS = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "tok_embeddings")
_EXAMPLE = "e.g. --granularity layer-groups:4 (or vector)"


@dataclass(frozen=True)
class Granularity:
    """How many weights a vector gets: ``groups == 0`` one (``"vector"``), else G block slices + embed + head."""

    groups: int = 0

    @classmethod
    def parse(cls, spec: str | Granularity | None) -> Granularity:
        """``"vector"`` (or None) or ``"layer-groups:G"`` with G >= 1; ConfigError with an example otherwise."""
        if isinstance(spec, Granularity):
            return spec
        text = "vector" if spec is None else str(spec).strip()
        if text == "vector":
            return cls(0)
        kind, sep, raw = text.partition(":")
        if kind != "layer-groups" or not sep or not raw.strip().isdigit() or int(raw) < 1:
            raise ConfigError(f"bad granularity {spec!r}: use 'vector' or 'layer-groups:G' with G >= 1, {_EXAMPLE}")
        return cls(int(raw))

    @property
    def per_vector(self) -> bool:
        return self.groups == 0

    @property
    def spec(self) -> str:
        return "vector" if self.per_vector else f"layer-groups:{self.groups}"


def layer_index(name: str) -> int | None:
    """The transformer block a tensor name belongs to (``model.layers.3.mlp...`` -> 3), or None."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def position(name: str, aliases: Iterable[str] = ()) -> Position:
    """Where a tensor sits: its block index, ``"embed"`` (an embedding, or tied to one), or ``"head"``."""
    names = [name, *aliases]
    for n in names:
        i = layer_index(n)
        if i is not None:
            return i
    if any(part in n for n in names for part in _EMBED_PARTS):
        return EMBED
    return HEAD


def n_layers(names: Iterable[str]) -> int:
    """The number of transformer blocks named in ``names`` (max block index + 1; 0 if none)."""
    idx = [i for i in (layer_index(n) for n in names) if i is not None]
    return max(idx) + 1 if idx else 0


def slices(layers: int, g: int) -> list[tuple[int, int]]:
    """``g`` contiguous ``(first, last)`` block ranges covering ``layers`` blocks (sizes differ by at most one)."""
    if not 1 <= g <= max(layers, 1) or layers < 1:
        raise ConfigError(f"cannot split {layers} transformer blocks into {g} groups: choose layer-groups:G with "
                          f"1 <= G <= {layers}")
    bounds = [k * layers // g for k in range(g + 1)]
    return [(bounds[k], bounds[k + 1] - 1) for k in range(g)]


def group_names(layers: int, granularity: Granularity | str) -> list[str]:
    """The groups of a model with ``layers`` blocks: ``["embed", "blocks0-3", ..., "head"]`` ([] for ``vector``)."""
    g = Granularity.parse(granularity)
    if g.per_vector:
        return []
    return [EMBED, *(f"blocks{a}-{b}" for a, b in slices(layers, g.groups)), HEAD]


def state_names(obj: Any) -> list[str]:
    """Tensor names of a model, a state dict, a merge engine (its base), or a merger (its model or engine)."""
    for attr in ("engine", "_merger", "inner"):
        inner = getattr(obj, attr, None)
        if inner is not None and not isinstance(inner, (str, int, float)):
            return state_names(inner)
    for attr in ("base", "model"):
        if hasattr(obj, attr) and hasattr(getattr(obj, attr), "state_dict"):
            return list(getattr(obj, attr).state_dict())
    if hasattr(obj, "state_dict"):
        return list(obj.state_dict())
    if isinstance(obj, Mapping):
        return list(obj)
    raise ConfigError(f"cannot find the model behind {type(obj).__name__} to name its layer groups")


def layout(obj: Any, granularity: Granularity | str) -> list[str]:
    """The group names of ``obj``'s model (see :func:`state_names`) at ``granularity`` ([] for ``vector``)."""
    g = Granularity.parse(granularity)
    return [] if g.per_vector else group_names(n_layers(state_names(obj)), g)


def param_name(vector: str, group: str) -> str:
    return f"{vector}{SEP}{group}"


def param_names(names: Sequence[str], groups: Sequence[str]) -> list[str]:
    """Search parameters: the vector names for no groups, else ``name@group`` per vector then group."""
    return list(names) if not groups else [param_name(n, g) for n in names for g in groups]


def split_key(key: str) -> tuple[str, str | None]:
    """``"ja@blocks0-3"`` -> ``("ja", "blocks0-3")``; ``"ja"`` -> ``("ja", None)`` (a vector name has no ``@``)."""
    name, sep, group = key.rpartition(SEP)
    return (name, group) if sep else (key, None)


def group_range(group: str) -> tuple[int, int] | str:
    """``(first, last)`` block of ``blocksA-B``, or ``"embed"``/``"head"``; ConfigError for anything else."""
    if group in (EMBED, HEAD):
        return group
    m = _BLOCKS.match(group)
    if m and int(m.group(1)) <= int(m.group(2)):
        return int(m.group(1)), int(m.group(2))
    raise ConfigError(f"unknown layer group {group!r}: use embed, head or blocksA-B (blocks A..B, A <= B)")


def contains(group: str, pos: Position) -> bool:
    r = group_range(group)
    return r == pos if isinstance(r, str) else isinstance(pos, int) and r[0] <= pos <= r[1]


def group_of(pos: Position, groups: Sequence[str]) -> str | None:
    """The group of ``groups`` holding a tensor at ``pos`` (None when none does)."""
    return next((g for g in groups if contains(g, pos)), None)


def is_grouped(weights: Mapping[str, Any]) -> bool:
    return any(SEP in k for k in weights)


def groups_in(keys: Iterable[str]) -> list[str]:
    """The distinct groups named by ``name@group`` keys, in first-seen order."""
    return list(dict.fromkeys(g for g in (split_key(k)[1] for k in keys) if g is not None))


class GroupWeights:
    """Resolved weights with per-group overrides: ``plain`` in vector order, :meth:`at` per tensor position."""

    def __init__(self, names: Sequence[str], plain: list[float], overrides: list[list[tuple[str, float]]]) -> None:
        self.names, self.plain, self._over = list(names), plain, overrides
        self._memo: dict[Position, list[float]] = {}

    def at(self, pos: Position) -> list[float]:
        """The weight of every vector (in order) on a tensor at ``pos``."""
        if pos not in self._memo:
            self._memo[pos] = [next((w for g, w in over if contains(g, pos)), p)
                               for p, over in zip(self.plain, self._over, strict=True)]
        return self._memo[pos]


def resolve(names: Sequence[str], weights: Mapping[str, Any]) -> GroupWeights | None:
    """None without ``@`` keys (the caller checks plain weights as always), else the resolved group weights.

    ConfigError naming unknown vectors, bad group names, non-finite values, or two groups of one vector that
    overlap (e.g. ``ja@blocks0-3`` and ``ja@blocks2-5``).
    """
    if not is_grouped(weights):
        return None
    index = {n: i for i, n in enumerate(names)}
    plain = [0.0] * len(names)
    over: list[list[tuple[str, float]]] = [[] for _ in names]
    problems = []
    for key, raw in weights.items():
        name, group = split_key(str(key))
        if name not in index:
            problems.append(f"unknown vector {name!r} in {key!r} (vectors: {list(names)})")
            continue
        try:
            w = float(raw)
        except (TypeError, ValueError):
            problems.append(f"weight of {key!r} must be a number, got {raw!r}")
            continue
        if not math.isfinite(w):
            problems.append(f"weight of {key!r} is not a finite number")
            continue
        if group is None:
            plain[index[name]] = w
            continue
        try:
            r = group_range(group)
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        for other, _ in over[index[name]]:
            o = group_range(other)
            if r == o or (not isinstance(r, str) and not isinstance(o, str) and r[0] <= o[1] and o[0] <= r[1]):
                problems.append(f"groups {other!r} and {group!r} of {name!r} overlap")
        over[index[name]].append((group, w))
    if problems:
        raise ConfigError("bad group weights: " + "; ".join(problems))
    return GroupWeights(names, plain, over)


def expand(weights: Mapping[str, float], names: Sequence[str], groups: Sequence[str]) -> dict[str, float]:
    """``weights`` (plain and/or grouped) as one ``name@group`` weight per vector and group of ``groups``.

    Each group takes the weight at its first position (exact when the source is uniform over the group, as a
    plain weight or the same layout is).
    """
    gw = resolve(names, weights) or GroupWeights(names, [float(weights.get(n, 0.0)) for n in names],
                                                 [[] for _ in names])
    out = {}
    for i, n in enumerate(names):
        for g in groups:
            r = group_range(g)
            out[param_name(n, g)] = gw.at(r if isinstance(r, str) else r[0])[i]
    return out


def per_layer(weights: Mapping[str, float], names: Sequence[str], layers: int) -> dict[str, list[float]]:
    """Effective weight of each vector at ``[embed, block 0, ..., block L-1, head]`` (the heat-map's rows)."""
    gw = resolve(names, weights) or GroupWeights(names, [float(weights.get(n, 0.0)) for n in names],
                                                 [[] for _ in names])
    cols: list[Position] = [EMBED, *range(layers), HEAD]
    table = [gw.at(p) for p in cols]
    return {n: [row[i] for row in table] for i, n in enumerate(names)}


def nested(weights: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """``{"ja@embed": 0.1, "ja": 0.3}`` -> ``{"ja": {"embed": 0.1, "*": 0.3}}`` (``*``: the plain weight)."""
    out: dict[str, dict[str, float]] = {}
    for k, w in weights.items():
        name, group = split_key(k)
        out.setdefault(name, {})[group or "*"] = float(w)
    return out
