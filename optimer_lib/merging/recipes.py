"""Read a saved merge recipe back: a search's ``best.json``, an exported model's mergekit YAML, or the folder.

    from optimer_lib.merging.recipes import check_recipe, load_recipe
    r = load_recipe("runs/search/best.json")                        # {"weights": {...}, "study": ...}
    r = load_recipe("runs/demo/exports/my-merge", vectors=pool.vectors, instruction=pool.instruction)
    check_recipe(r, pool.names, has_instruction=pool.instruction is not None)   # ConfigError on another pool
    r.weights, r.instruction_weight, r.method, r.params                # what Tune / ``optimer merge`` take

A mergekit YAML names checkpoints, not vectors: each ``models`` entry is matched to the vector whose
``source`` (its CPT checkpoint) it names, or to ``<path to the NAME checkpoint>`` (what the export writes for
a vector without a source); the instruction vector's entry becomes ``instruction_weight``. Method names map
back (mergekit -> ours): ``task_arithmetic`` -> ``optimer`` (per-model weights; exact for the optimer,
average and task_arithmetic exports), ``ties`` -> ``ties`` (``lambda``, ``normalize``, ``density``),
``dare_linear`` -> ``dare`` (``density``; mergekit has no seed, so 0). An exported folder also has its model
card, whose ``merge method`` and ``method options`` lines give the method exactly (an export made with
``average`` loads as ``average``, a DARE seed survives).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from optimer_lib.errors import ConfigError, DataError
from optimer_lib.merging import groups
from optimer_lib.merging.methods import check_method_params

MERGEKIT_YAML = "mergekit.yaml"
CARD = "README.md"
FORMATS = "a search's best.json, an exported model's mergekit.yaml, or an exported model folder"
# mergekit method -> (our method, {mergekit parameter: our parameter}) for the methods the export writes
_FROM_MERGEKIT: dict[str, tuple[str, dict[str, str]]] = {
    "task_arithmetic": ("optimer", {}),
    "ties": ("ties", {"lambda": "lam", "normalize": "normalize"}),
    "dare_linear": ("dare", {}),
}
_PLACEHOLDER = re.compile(r"^<path to the (.+) checkpoint>$")


class Named(Protocol):
    """What a recipe is matched against: a vector's name and the checkpoint it came from."""

    name: str

    @property
    def source(self) -> str: ...


@dataclass(frozen=True)
class Recipe:
    """A merge to reproduce: weights per vector name, instruction weight, method and its parameters.

    ``instruction_weight`` is None when the recipe does not record one (a search's best.json: the search held
    it fixed); ``source`` says where the recipe came from; ``notes`` list what could not be carried over exactly.
    """

    weights: dict[str, float]
    instruction_weight: float | None
    method: str = "optimer"
    params: dict[str, object] = field(default_factory=dict)
    source: str = ""
    kind: str = ""  # "best.json" | "mergekit" | "export"
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line: the weights, instruction weight and method."""
        w = ", ".join(f"{k}={v:.3g}" for k, v in self.weights.items())
        iw = "" if self.instruction_weight is None else f", instruction {self.instruction_weight:.3g}"
        opts = "".join(f" {k}={v}" for k, v in self.params.items())
        return f"{w}{iw} ({self.method}{opts})"


def _number(value: Any, what: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ConfigError(f"{where}: {what} must be a finite number, got {value!r}")
    return float(value)


def _read(path: Path) -> Any:
    """The parsed JSON or YAML of ``path`` (JSON first for .json, YAML for anything else, which also reads JSON)."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read recipe {path}: {exc}") from None
    try:
        return json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"recipe {path} is not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'} "
                        f"({first}): give {FORMATS}") from None


# -- best.json -----------------------------------------------------------------------------------
def _from_best(data: Mapping[str, Any], path: Path) -> Recipe:
    weights = data["weights"]
    if not isinstance(weights, Mapping) or not weights:
        raise ConfigError(f"{path}: 'weights' must map vector names to numbers, got {weights!r}")
    ws = {str(k): _number(v, f"weight of {k!r}", str(path)) for k, v in weights.items()}
    iw = data.get("instruction_weight")
    method = str(data.get("method") or "optimer")
    params = dict(data.get("method_params") or data.get("params") or {})
    study = data.get("study")
    where = f"best.json of study {study!r}" + (f" (trial {data['trial']})" if "trial" in data else "") if study \
        else str(path)
    return Recipe(ws, None if iw is None else _number(iw, "instruction_weight", str(path)), method, params,
                  source=where, kind="best.json")


# -- mergekit ------------------------------------------------------------------------------------
def _same_path(a: str, b: str) -> bool:
    return bool(a) and bool(b) and (a == b or os.path.normpath(a) == os.path.normpath(b))


def _entry_name(model: str, vectors: Sequence[Named], instruction: Named | None, where: str) -> tuple[str, bool]:
    """``(vector name, is_instruction)`` of one mergekit ``models`` entry."""
    m = _PLACEHOLDER.match(model)
    if m:
        name = m.group(1)
        return name, instruction is not None and name == instruction.name
    if instruction is not None and _same_path(model, instruction.source):
        return instruction.name, True
    for v in vectors:
        if _same_path(model, v.source):
            return v.name, False
    if vectors:
        known = [v.source or v.name for v in vectors] + ([instruction.source] if instruction is not None else [])
        raise ConfigError(f"{where}: model {model!r} is none of the pool's checkpoints ({', '.join(known)}): "
                          "the recipe was made from other models")
    return Path(model.rstrip("/\\")).name or model, False  # no pool to match: the checkpoint folder's name


def _layer_weights(name: str, setting: list, where: str) -> dict[str, float]:
    """``name@group`` weights of a per-layer mergekit weight, as ``export.layer_weight`` writes it: ``{filter,
    value}`` entries for tensors outside the blocks (the first per group wins: a tied head follows its embedding),
    then one ``{value: [w_0, ..., w_L-1]}`` with one entry per block (runs of equal entries become one group)."""
    out: dict[str, float] = {}
    layers: list[float] = []
    for cond in setting:
        if not isinstance(cond, Mapping) or "value" not in cond:
            raise ConfigError(f"{where}: the weight of {name!r} must be a number or a list of {{filter, value}}")
        if cond.get("filter") in (None, "*"):  # matches every tensor left: the blocks
            value = cond["value"]
            layers = [_number(v, f"a layer weight of {name!r}", where) for v in (value if isinstance(value, list)
                                                                                  else [value])]
            break
        pos = groups.position(str(cond["filter"]))
        if isinstance(pos, int):
            raise ConfigError(f"{where}: filter {cond['filter']!r} of {name!r} names one block: OptiMer reads block "
                              "weights from the unfiltered per-layer list only")
        out.setdefault(groups.param_name(name, pos), _number(cond["value"], f"the weight of {name!r}", where))
    i = 0
    while i < len(layers):
        j = i
        while j + 1 < len(layers) and layers[j + 1] == layers[i]:
            j += 1
        out[groups.param_name(name, f"blocks{i}-{j}")] = layers[i]
        i = j + 1
    return out


def _from_mergekit(cfg: Mapping[str, Any], path: Path, vectors: Sequence[Named],
                   instruction: Named | None) -> Recipe:
    where = str(path)
    mk = str(cfg.get("merge_method"))
    if mk not in _FROM_MERGEKIT:
        raise ConfigError(f"{where}: mergekit method {mk!r} has no OptiMer equivalent: a recipe must use "
                          f"{', '.join(_FROM_MERGEKIT)}")
    method, renames = _FROM_MERGEKIT[mk]
    models = cfg.get("models")
    if not isinstance(models, list) or not models:
        raise ConfigError(f"{where}: 'models' must be a non-empty list of {{model, parameters: {{weight}}}}")
    weights: dict[str, float] = {}
    iw = 0.0  # the export leaves out an instruction entry whose weight is 0
    seen: set[str] = set()
    densities = set()
    for entry in models:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("model"), str):
            raise ConfigError(f"{where}: every 'models' entry needs a 'model' path, got {entry!r}")
        p = entry.get("parameters") or {}
        if not isinstance(p, Mapping) or "weight" not in p:
            raise ConfigError(f"{where}: model {entry['model']!r} has no parameters.weight")
        name, is_inst = _entry_name(entry["model"], vectors, instruction, where)
        if isinstance(p["weight"], list) and not is_inst:  # per-layer weights (an export with layer groups)
            weights.update(_layer_weights(name, p["weight"], where))
            w = None
        else:
            w = _number(p["weight"], f"the weight of {entry['model']!r}", where)
        if name in seen:
            raise ConfigError(f"{where}: vector {name!r} appears twice in 'models'")
        seen.add(name)
        if is_inst:
            iw = float(w or 0.0)
        else:
            if w is not None:
                weights[name] = w
            if "density" in p:
                densities.add(_number(p["density"], "density", where))
    top = cfg.get("parameters") or {}
    params: dict[str, object] = {ours: top[theirs] for theirs, ours in renames.items() if theirs in top}
    notes: list[str] = []
    if len(densities) > 1:
        raise ConfigError(f"{where}: models have different densities {sorted(densities)}: OptiMer's "
                          f"{method} takes one density for all vectors")
    if densities and method != "optimer":
        params["density"] = densities.pop()
    if method == "optimer" and top.get("normalize"):  # mergekit divides by the summed weights
        total = sum(weights.values()) + iw
        if total:
            weights, iw = {k: v / total for k, v in weights.items()}, iw / total
            notes.append("normalize: true folded into the weights")
    if method == "dare":
        notes.append("mergekit records no DARE seed: seed 0 (the default) is used")
    return Recipe(weights, iw, method, params, source=where, kind="mergekit", notes=tuple(notes))


def _card_method(card: str) -> tuple[str, dict[str, object]] | None:
    """``(method, params)`` from a model card's "merge method" / "method options" lines, None if absent."""
    m = re.search(r"^- merge method: `([^`]+)`\s*$", card, re.M)
    if not m:
        return None
    params: dict[str, object] = {}
    opts = re.search(r"^- method options: (.+)$", card, re.M)
    for k, v in re.findall(r"`([^`=]+)=([^`]*)`", opts.group(1) if opts else ""):
        params[k] = v == "True" if v in ("True", "False") else (int(v) if v.lstrip("-").isdigit() else float(v))
    return m.group(1), params


def _from_export(folder: Path, vectors: Sequence[Named], instruction: Named | None) -> Recipe:
    yml = folder / MERGEKIT_YAML
    if not yml.is_file():
        raise ConfigError(f"folder {folder} has no {MERGEKIT_YAML}: it is not a model exported by OptiMer "
                          f"(give {FORMATS})")
    cfg = _read(yml)
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"{yml}: not a mergekit config (a mapping with merge_method and models)")
    r = _from_mergekit(cfg, yml, vectors, instruction)
    card = folder / CARD
    exact = _card_method(card.read_text(encoding="utf-8", errors="replace")) if card.is_file() else None
    method, params, notes = r.method, r.params, r.notes
    if exact is not None:  # the card states the method the export used; the YAML only its closest mergekit form
        method, params = exact
        notes = tuple(n for n in notes if "seed" not in n)
    return Recipe(r.weights, r.instruction_weight, method, params, source=str(folder), kind="export", notes=notes)


# -- entry points --------------------------------------------------------------------------------
def load_recipe(path: str | os.PathLike, *, vectors: Sequence[Named] = (),
                instruction: Named | None = None) -> Recipe:
    """The merge stored at ``path``: a best.json, a mergekit YAML, or an exported model folder.

    ``vectors``/``instruction`` (the pool's, with their ``source`` checkpoints) name a mergekit YAML's model
    entries; without them an entry is named after its checkpoint folder. DataError for a missing or unreadable
    file, ConfigError for an unknown format or a bad method (one line each).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"no recipe at {p}: give {FORMATS}")
    if p.is_dir():
        r = _from_export(p, vectors, instruction)
    else:
        data = _read(p)
        if isinstance(data, Mapping) and "weights" in data:
            r = _from_best(data, p)
        elif isinstance(data, Mapping) and "merge_method" in data and "models" in data:
            r = _from_mergekit(data, p, vectors, instruction)
        else:
            raise ConfigError(f"{p} is not a recipe this can read: give {FORMATS}")
    try:
        check_method_params(r.method, r.params)
    except ConfigError as exc:
        raise ConfigError(f"{r.source}: {exc}") from None
    return r


def check_recipe(recipe: Recipe, names: Sequence[str], *, has_instruction: bool = True) -> None:
    """ConfigError unless ``recipe`` has a weight for exactly the pool's vector ``names`` (per vector, or per
    layer group as ``name@group`` keys: every vector must appear in some key).

    A recipe with a non-zero instruction weight needs a pool with an instruction vector.
    """
    got, want = {groups.split_key(k)[0] for k in recipe.weights}, set(names)
    if got != want:
        parts = [f"no weight for {sorted(want - got)}" if want - got else "",
                 f"weights for unknown {sorted(got - want)}" if got - want else ""]
        raise ConfigError(f"recipe {recipe.source} does not fit this pool ({'; '.join(x for x in parts if x)}; "
                          f"the pool has {list(names)}): it was made on another pool")
    if groups.is_grouped(recipe.weights):
        try:
            groups.resolve(list(names), recipe.weights)
        except ConfigError as exc:
            raise ConfigError(f"recipe {recipe.source}: {exc}") from None
    if recipe.instruction_weight and not has_instruction:
        raise ConfigError(f"recipe {recipe.source} gives the instruction vector weight "
                          f"{recipe.instruction_weight:g} but this pool has none: open a pool with one")
