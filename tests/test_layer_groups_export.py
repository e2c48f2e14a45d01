"""Export of a per-layer-group merge: mergekit per-layer weights, model card, and the recipe round trip."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from test_layer_groups import ALPHA, FLAT, _expected, _pool

from optimer_lib.merging import groups
from optimer_lib.merging.export import export_merged
from optimer_lib.merging.methods import merge_state_dict
from optimer_lib.merging.recipes import check_recipe, load_recipe
from optimer_lib.merging.resident import ResidentMerger


def mergekit_value(tensor: str, setting, t: float):
    """mergekit's ``evaluate_setting`` (mergekit/config.py, arcee-ai/mergekit a6e4028), for dict conditions."""
    if isinstance(setting, (float, int)):
        return setting
    if all(isinstance(e, (int, float)) for e in setting):
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        if cond.get("filter") in (None, "*") or cond["filter"] in tensor:
            return mergekit_value(tensor, cond["value"], t)
    return None


@pytest.mark.parametrize("arch", ["llama", "gpt2", "llama_untied"])
def test_export_layer_groups_round_trip(arch, tiny_tokenizer, tmp_path):
    base, vecs = _pool(arch)
    merger = ResidentMerger(copy.deepcopy(base), vecs)
    merger.set_weights(FLAT)
    out = export_merged(merger.model, tiny_tokenizer, tmp_path / "m", base_path="base", vectors=vecs, weights=FLAT)
    cfg = yaml.safe_load((out / "mergekit.yaml").read_text())
    assert cfg["merge_method"] == "task_arithmetic" and cfg["parameters"] == {"normalize": False}
    want = _expected(base, vecs, ALPHA)
    # every tensor's weight under mergekit's own rules (blocks at t = i / (L - 1), the rest at t = 0)
    for entry, v in zip(cfg["models"], vecs, strict=True):
        setting = entry["parameters"]["weight"]
        for name in base.state_dict():
            i = groups.layer_index(name)
            got = mergekit_value(name, setting, 0.0 if i is None else i / 1)  # 2 blocks: t = i
            pos = groups.position(name, ["model.embed_tokens.weight"] if name == "lm_head.weight"
                                  and base.config.tie_word_embeddings else [])
            group = pos if isinstance(pos, str) else f"blocks{pos}-{pos}"
            assert got == pytest.approx(ALPHA[v.name][group], abs=1e-12), (v.name, name)
    card = (out / "README.md").read_text()
    assert "## Per-layer-group weights" in card and "| `zh@blocks1-1` | 0.25 |" in card
    recipe = load_recipe(out, vectors=vecs)
    check_recipe(recipe, ["ja", "zh"])
    assert recipe.weights == FLAT
    merged = merge_state_dict(base, vecs, recipe.weights)
    for name, w in want.items():
        assert torch.allclose(merged[name].double(), w, atol=1e-6), name
    yml = load_recipe(out / "mergekit.yaml", vectors=vecs)
    assert yml.weights == FLAT


def test_recipe_runs_of_equal_layers(tmp_path):
    """Adjacent blocks with one weight load as one group; the merge is the same."""
    cfg = {"merge_method": "task_arithmetic", "base_model": "b", "models": [
        {"model": "<path to the ja checkpoint>", "parameters": {"weight": [
            {"filter": "model.embed_tokens.weight", "value": 0.1}, {"filter": "model.norm.weight", "value": 0.2},
            {"value": [0.5, 0.5, 0.5, 0.7]}]}}]}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    r = load_recipe(tmp_path / "m.yaml")
    assert r.weights == {"ja@embed": 0.1, "ja@head": 0.2, "ja@blocks0-2": 0.5, "ja@blocks3-3": 0.7}
    assert groups.per_layer(r.weights, ["ja"], 4) == {"ja": [0.1, 0.5, 0.5, 0.5, 0.7, 0.2]}
