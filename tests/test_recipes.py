"""optimer_lib.merging.recipes: recipes written by the project's own export and search code load back.

Every recipe here is a real file: a model exported by ``export_merged`` (folder, its mergekit.yaml) or the
best.json a real ``run_search`` wrote on tiny models. The loaded weights are merged again and compared with
the exported tensors, so a wrong mapping (method, instruction weight, normalisation) fails with numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from optimer_lib.checkpoints.models import load_model
from optimer_lib.checkpoints.vectors import extract_vector, load_vector, save_vector
from optimer_lib.errors import ConfigError, DataError
from optimer_lib.merging.export import export_merged
from optimer_lib.merging.methods import merge_state_dict
from optimer_lib.merging.recipes import Recipe, check_recipe, load_recipe
from optimer_lib.merging.resident import ResidentMerger
from optimer_lib.scoring.evaluate import EvalSuite
from optimer_lib.scoring.objectives import Objective
from optimer_lib.search.study import SearchConfig, run_search

torch.set_num_threads(1)
PROBE = ("model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight")


@pytest.fixture
def pool(tiny_pool, tmp_path: Path):
    """``(base_dir, [v0, v1], instruction)``: vectors extracted from tiny CPT checkpoints (sources = their dirs)."""
    base_dir, tuned = tiny_pool("llama", 3)
    vecs = [load_vector(save_vector(extract_vector(base_dir, d, name=f"v{i}"), tmp_path / f"v{i}.safetensors"))
            for i, d in enumerate(tuned[:2])]
    inst = load_vector(save_vector(extract_vector(base_dir, tuned[2], name="it"), tmp_path / "it.safetensors"))
    return base_dir, vecs, inst


def _export(pool, out: Path, weights: dict[str, float], method: str = "optimer", iw: float | None = 0.5,
            **params: object) -> tuple[Path, dict[str, torch.Tensor]]:
    """Export the merge with the project's exporter; returns the folder and the merged tensors it holds."""
    base_dir, vecs, inst = pool
    model = load_model(base_dir)
    merger = ResidentMerger(model, vecs, instruction=inst if iw is not None else None,
                            instruction_weight=iw or 0.0, method=method, **params)
    merger.set_weights(weights)
    path = export_merged(merger.model, None, out, base_path=str(base_dir), vectors=vecs, weights=weights,
                         method=method, method_params=params, instruction=inst if iw is not None else None,
                         instruction_weight=iw)
    return path, {k: merger.model.state_dict()[k].clone() for k in PROBE}


def _remerge(pool, r: Recipe) -> dict[str, torch.Tensor]:
    base_dir, vecs, inst = pool
    state = merge_state_dict(load_model(base_dir), vecs, r.weights, method=r.method, instruction=inst,
                             instruction_weight=r.instruction_weight or 0.0, **r.params)
    return {k: state[k] for k in PROBE}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for k in PROBE:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_exported_folder_and_yaml_give_back_the_merge(pool, tmp_path: Path):
    _, vecs, inst = pool
    weights = {"v0": 0.3, "v1": 0.7}
    out, merged = _export(pool, tmp_path / "exp", weights, iw=0.5)
    r = load_recipe(out, vectors=vecs, instruction=inst)
    assert (r.weights, r.instruction_weight, r.method, r.params, r.kind) == (weights, 0.5, "optimer", {}, "export")
    check_recipe(r, ["v0", "v1"], has_instruction=True)
    _assert_same(_remerge(pool, r), merged)
    y = load_recipe(out / "mergekit.yaml", vectors=vecs, instruction=inst)
    assert (y.weights, y.instruction_weight, y.method, y.kind) == (weights, 0.5, "optimer", "mergekit")
    assert "v0=0.3, v1=0.7, instruction 0.5 (optimer)" == r.describe()


def test_zero_instruction_weight_is_left_out_of_the_yaml_and_reads_as_zero(pool, tmp_path: Path):
    _, vecs, inst = pool
    out, merged = _export(pool, tmp_path / "exp", {"v0": 1.0, "v1": 0.25}, iw=0.0)
    cfg = yaml.safe_load((out / "mergekit.yaml").read_text())
    assert len(cfg["models"]) == 2  # the exporter writes no instruction entry for weight 0
    r = load_recipe(out / "mergekit.yaml", vectors=vecs, instruction=inst)
    assert r.instruction_weight == 0.0 and r.weights == {"v0": 1.0, "v1": 0.25}
    _assert_same(_remerge(pool, r), merged)


@pytest.mark.parametrize(("method", "params"), [("ties", {"density": 0.3, "lam": 0.8}), ("dare", {"density": 0.5,
                                                                                                   "seed": 3}),
                                                ("average", {}), ("task_arithmetic", {"lam": 0.6})])
def test_other_methods_round_trip(pool, tmp_path: Path, method: str, params: dict):
    _, vecs, inst = pool
    weights = {"v0": 0.4, "v1": 0.9}
    out, merged = _export(pool, tmp_path / "exp", weights, method=method, iw=0.5, **params)
    folder = load_recipe(out, vectors=vecs, instruction=inst)  # the card states the exact method
    assert (folder.method, folder.params) == (method, params)
    _assert_same(_remerge(pool, folder), merged)
    only_yaml = load_recipe(out / "mergekit.yaml", vectors=vecs, instruction=inst)
    expected = {"ties": ("ties", {"density": 0.3, "lam": 0.8, "normalize": True}),
                "dare": ("dare", {"density": 0.5}), "average": ("optimer", {}),
                "task_arithmetic": ("optimer", {})}[method]
    assert (only_yaml.method, only_yaml.params) == expected
    if method in ("average", "task_arithmetic", "ties"):  # the YAML alone reproduces these exactly
        _assert_same(_remerge(pool, only_yaml), merged)
    if method == "average":
        assert only_yaml.weights == {"v0": 0.5, "v1": 0.5}  # 1/K each: task_arithmetic's form of the average
    if method == "dare":
        assert any("seed" in n for n in only_yaml.notes)


def test_vectors_without_a_source_are_named_by_the_placeholder(pool, tmp_path: Path):
    base_dir, vecs, inst = pool
    for v in [*vecs, inst]:
        v.metadata.pop("source", None)
    out, _ = _export(pool, tmp_path / "exp", {"v0": 0.2, "v1": 0.1}, iw=1.0)
    assert "<path to the v0 checkpoint>" in (out / "mergekit.yaml").read_text()
    r = load_recipe(out / "mergekit.yaml", vectors=vecs, instruction=inst)
    assert r.weights == {"v0": 0.2, "v1": 0.1} and r.instruction_weight == 1.0


def test_best_json_of_a_real_search(pool, tmp_path: Path):
    base_dir, vecs, _ = pool
    merger = ResidentMerger(load_model(base_dir), vecs)
    target = merger.model.state_dict()[PROBE[0]].clone()

    def far_from_base(model, tokenizer):  # a real merged model is scored; the best is a real trial's weights
        return float((model.state_dict()[PROBE[0]] - target).abs().sum())

    res = run_search(merger, None, EvalSuite(texts={"en": ["x"]}), Objective(fn=far_from_base, spec="far"),
                     SearchConfig(trials=4, sampler="random", storage=":memory:", workdir=tmp_path / "s", top_k=0),
                     progress=False)
    r = load_recipe(res.path)
    assert r.weights == res.best_weights and r.kind == "best.json"
    assert r.instruction_weight is None and r.method == "optimer"  # a search holds the instruction weight fixed
    assert r.source == f"best.json of study 'optimer' (trial {res.best_trial})"
    check_recipe(r, ["v0", "v1"])
    with pytest.raises(ConfigError, match=r"does not fit this pool \(no weight for \['v2'\]"):
        check_recipe(r, ["v0", "v1", "v2"])


def test_mistakes_are_one_line_errors(pool, tmp_path: Path):
    _, vecs, inst = pool
    cases: list[tuple[Path, type, str]] = []
    cases.append((tmp_path / "nope.json", DataError, "no recipe at"))
    (tmp_path / "list.json").write_text("[1, 2]")
    cases.append((tmp_path / "list.json", ConfigError, "is not a recipe this can read"))
    (tmp_path / "broken.json").write_text("{\"weights\": ")
    cases.append((tmp_path / "broken.json", DataError, "is not valid JSON"))
    (tmp_path / "notes.jsonl").write_text('{"text": "a: b: c"}\n{"text": "x"}\n')  # a corpus given as a recipe
    cases.append((tmp_path / "notes.jsonl", DataError, r"is not valid YAML \(.*\): give a search's best.json"))
    (tmp_path / "empty").mkdir()
    cases.append((tmp_path / "empty", ConfigError, "has no mergekit.yaml"))
    (tmp_path / "slerp.yaml").write_text(yaml.safe_dump({"merge_method": "slerp", "models": [{"model": "x"}]}))
    cases.append((tmp_path / "slerp.yaml", ConfigError, "mergekit method 'slerp' has no OptiMer equivalent"))
    (tmp_path / "bad.json").write_text(json.dumps({"weights": {"v0": "high"}}))
    cases.append((tmp_path / "bad.json", ConfigError, "weight of 'v0' must be a finite number"))
    (tmp_path / "opt.json").write_text(json.dumps({"weights": {"v0": 1}, "method": "ties", "params": {"rho": 1}}))
    cases.append((tmp_path / "opt.json", ConfigError, "has no option"))
    for path, err, msg in cases:
        with pytest.raises(err, match=msg) as info:
            load_recipe(path, vectors=vecs, instruction=inst)
        assert "\n" not in str(info.value), str(info.value)

    out, _ = _export(pool, tmp_path / "exp", {"v0": 0.3, "v1": 0.7})
    other = load_vector(tmp_path / "v0.safetensors")
    other.metadata["source"], other.name = "/elsewhere/cpt-fr", "fr"
    with pytest.raises(ConfigError, match="is none of the pool's checkpoints"):
        load_recipe(out, vectors=[other, vecs[1]], instruction=inst)
    # without the pool, entries are named after their checkpoint folders: the check then says so
    loose = load_recipe(out / "mergekit.yaml")
    with pytest.raises(ConfigError, match="it was made on another pool"):
        check_recipe(loose, ["v0", "v1"])
    with pytest.raises(ConfigError, match="this pool has none"):
        check_recipe(load_recipe(out, vectors=vecs, instruction=inst), ["v0", "v1"], has_instruction=False)
