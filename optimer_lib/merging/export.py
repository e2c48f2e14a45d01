"""Export a merged model as a normal Hugging Face checkpoint, with a model card and a mergekit recipe.

    from optimer_lib.merging.export import export_merged
    merger.set_weights(best)                                    # a ResidentMerger holding the merge
    export_merged(merger.model, tok, "out/merged", base_path="assets/base", vectors=vecs, weights=best,
                  scores={"dev_loss": 3.68})
    # AutoModelForCausalLM.from_pretrained("out/merged") now loads it; CLI: optimer merge ... --out DIR

The directory holds safetensors weights, config, tokenizer, ``README.md`` (base, vectors, weights,
method, scores, the command that reproduces it) and ``mergekit.yaml`` (the same merge for mergekit).
It is written into a temporary directory beside ``out_dir`` and renamed into place, so a crash never
leaves a half-written model under the final name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from optimer_lib.checkpoints.vectors import DistributionVector, unique_tensors
from optimer_lib.errors import OptimerError
from optimer_lib.fileio import normal_permissions
from optimer_lib.merging import groups

# mergekit has no single-step equivalent of these; the recipe names its closest method.
_MERGEKIT_METHOD = {"ties": "ties", "dare": "dare_linear"}


def _effective_weights(method: str, names: Sequence[str], weights: Mapping[str, float],
                       params: Mapping[str, object]) -> dict[str, float]:
    """Per-vector weights of the task_arithmetic sum that reproduces linear-family methods."""
    if method == "average":
        return {n: 1.0 / len(names) for n in names}
    if method == "task_arithmetic":
        lam = float(str(params.get("lam", 1.0)))
        return {n: lam for n in names}
    return {n: float(weights[n]) for n in names}


def layer_weight(name: str, weights: Mapping[str, float], names: Sequence[str],
                 state: Mapping[str, torch.Tensor]) -> list[dict[str, object]]:
    """Vector ``name``'s per-layer-group weights as a mergekit parameter: one ``{filter, value}`` per tensor outside
    the blocks (its full name: embedding, tied or untied head, final norm), then ``{value: [w_0, ..., w_L-1]}``, a
    per-layer gradient with one entry per block (mergekit evaluates block i at t = i / (L - 1), i.e. entry i)."""
    gw = groups.resolve(names, weights)
    assert gw is not None
    col = list(names).index(name)
    kept, aliases = unique_tensors(state)
    of = {alias: [canon] for alias, canon in aliases.items()}
    for alias, canon in aliases.items():
        of.setdefault(canon, []).append(alias)
    out: list[dict[str, object]] = []
    for t in state:
        if groups.layer_index(t) is None and state[t].is_floating_point():
            out.append({"filter": t, "value": gw.at(groups.position(t, of.get(t, ())))[col]})
    layers = groups.n_layers(state)
    out.append({"value": [gw.at(i)[col] for i in range(layers)]})
    return out


def _model_dtype(model: torch.nn.Module) -> str:
    p = next(model.parameters(), None)
    return str(p.dtype).removeprefix("torch.") if p is not None else "float32"


def mergekit_config(*, base_path: str, vectors: Sequence[DistributionVector], weights: Mapping[str, float],
                    method: str = "optimer", method_params: Mapping[str, object] | None = None,
                    instruction: DistributionVector | None = None, instruction_weight: float | None = None,
                    dtype: str = "float32", state: Mapping[str, torch.Tensor] | None = None) -> dict:
    """A mergekit config dict for this merge (``task_arithmetic`` for optimer/linear/average/task_arithmetic).

    Each vector's ``source`` (its tuned checkpoint) is the model entry; the instruction model is one more
    entry. ties/dare map to mergekit's ``ties``/``dare_linear``, which differ in detail (see the card).
    Per-layer-group weights (``name@group`` keys) need the model's ``state`` (tensor names) and become per-layer
    weights (:func:`layer_weight`).
    """
    params = dict(method_params or {})
    names = [v.name for v in vectors]
    if groups.is_grouped(weights) and method in ("optimer", "linear"):
        if state is None:
            raise OptimerError("per-layer-group weights need the model's tensor names for mergekit.yaml: pass state=")
        eff: dict[str, object] = {n: layer_weight(n, weights, names, state) for n in names}
    else:
        eff = dict(_effective_weights(method, names, weights, params))
    mk_method = _MERGEKIT_METHOD.get(method, "task_arithmetic")
    models = []
    for v in vectors:
        entry: dict[str, object] = {"weight": eff[v.name]}
        if "density" in params:
            entry["density"] = float(str(params["density"]))
        models.append({"model": v.source or f"<path to the {v.name} checkpoint>", "parameters": entry})
    if instruction is not None and instruction_weight:
        models.append({"model": instruction.source or f"<path to the {instruction.name} checkpoint>",
                       "parameters": {"weight": float(instruction_weight)}})
    cfg: dict[str, object] = {"merge_method": mk_method, "base_model": str(base_path), "models": models}
    if mk_method == "task_arithmetic":
        cfg["parameters"] = {"normalize": False}
    elif method == "ties":
        cfg["parameters"] = {"normalize": bool(params.get("normalize", True)),
                             "lambda": float(str(params.get("lam", 1.0)))}
    cfg["dtype"] = dtype
    return cfg


def model_card(*, base_path: str, vectors: Sequence[DistributionVector], weights: Mapping[str, float], method: str,
          params: Mapping[str, object], instruction: DistributionVector | None, instruction_weight: float | None,
          scores: Mapping[str, float] | None, out_dir: Path) -> str:
    lines = ["---", "library_name: transformers", "tags: [merge, optimer]", "---", "",
             f"# {out_dir.name}", "",
             "A merge of distribution vectors made with OptiMer (arXiv 2603.28858): "
             "theta = theta_base + sum_i alpha_i tau_i" + (" + w_IT tau_IT" if instruction else "") + ".", "",
             f"- base model: `{base_path}`", f"- merge method: `{method}`"]
    if params:
        lines.append("- method options: " + ", ".join(f"`{k}={v}`" for k, v in params.items()))
    grouped = groups.is_grouped(weights)
    lines += ["", "| vector | source | tokens trained | weight |", "|---|---|---|---|"]
    for v in vectors:
        w = "per layer group (below)" if grouped else f"{float(weights[v.name]):g}"
        lines.append(f"| {v.name} | `{v.source or '-'}` | {v.tokens_trained or '-'} | {w} |")
    if instruction is not None:
        lines.append(f"| {instruction.name} (instruction) | `{instruction.source or '-'}` | "
                     f"{instruction.tokens_trained or '-'} | {float(instruction_weight or 0):g} |")
    if grouped:
        lines += ["", "## Per-layer-group weights", "", "`name@group` weights (a plain name: every group it does not "
                  "name); groups: embed (with a tied head), blocksA-B (layers A..B), head (final norm, untied head).",
                  "", "| weight | value |", "|---|---|"]
        lines += [f"| `{k}` | {float(w):g} |" for k, w in weights.items()]
    if scores:
        lines += ["", "## Scores", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {float(v):.6g} |" for k, v in scores.items()]
    cmd = [f"optimer merge --base {base_path}"]
    for v in vectors:
        cmd.append(f"--vector {v.path or v.name + '.safetensors'}={float(weights.get(v.name, 0.0))!r}")
    if instruction is not None:
        cmd.append(f"--instruction {instruction.path or instruction.name + '.safetensors'}"
                   f"={float(instruction_weight or 0)!r}")
    cmd.append(f"--method {method}" + "".join(f" --param {k}={v}" for k, v in params.items())
               + f" --out {out_dir}")
    repro = ["```", " \\\n    ".join(cmd), "```"] if not grouped else [
        "`optimer merge` takes one weight per vector: load this folder (or its mergekit.yaml) as a recipe "
        "(`optimer_lib.merging.recipes.load_recipe`, the workbench's Tune tab) to redo the per-group merge."]
    lines += ["", "## Reproduce", "", *repro, "",
              "`mergekit.yaml` holds the same merge for mergekit"
              + (" (`task_arithmetic`, exact)." if method not in _MERGEKIT_METHOD
                 else f" (closest method `{_MERGEKIT_METHOD[method]}`; masks and the linear instruction term "
                      "differ in detail)."), ""]
    return "\n".join(lines)


def export_merged(model: torch.nn.Module, tokenizer: object, out_dir: str | os.PathLike, *, base_path: str,
                  vectors: Sequence[DistributionVector], weights: Mapping[str, float], method: str = "optimer",
                  instruction: DistributionVector | None = None, instruction_weight: float | None = None,
                  scores: Mapping[str, float] | None = None, method_params: Mapping[str, object] | None = None,
                  overwrite: bool = False) -> Path:
    """Save the (already merged) ``model`` and ``tokenizer`` to ``out_dir`` with card and recipe."""
    import yaml

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise OptimerError(f"{str(out)!r} already exists: choose another --out or use --force to replace it")
    missing = [v.name for v in vectors if v.name not in weights and not any(
        groups.split_key(k)[0] == v.name for k in weights)]
    if missing:
        raise OptimerError(f"no weight given for vector(s) {missing}: pass NAME=WEIGHT for each vector")
    if instruction is not None and instruction_weight is None:
        instruction_weight = 1.0
    params = dict(method_params or {})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old: Path | None = None
    try:
        model.save_pretrained(tmp)  # type: ignore[operator]
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)  # type: ignore[attr-defined]
        cfg = mergekit_config(base_path=str(base_path), vectors=vectors, weights=weights, method=method,
                              method_params=params, instruction=instruction,
                              instruction_weight=instruction_weight, dtype=_model_dtype(model),
                              state=model.state_dict())
        (tmp / "mergekit.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        (tmp / "README.md").write_text(model_card(
            base_path=str(base_path), vectors=vectors, weights=weights, method=method, params=params,
            instruction=instruction, instruction_weight=instruction_weight, scores=scores, out_dir=out))
        normal_permissions(tmp)  # mkdtemp and safetensors make the folder and weights private
        if out.exists():  # overwrite: move the old one aside first so the swap is two renames
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "prev")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():  # put the previous export back
            os.replace(old / "prev", out)
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out
