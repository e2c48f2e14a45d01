"""bench/vs_mergekit_layers.py without mergekit: its helpers, and one case run end to end against a stand-in.

The stand-in for ``mergekit-yaml`` evaluates the exported YAML by mergekit's own rules (``mergekit_value``, the
re-implementation of its ``evaluate_setting`` in test_layer_groups_export.py; blocks at t = i / (L − 1), the rest
at t = 0) as ``task_arithmetic``: θ_base + Σ_i w_i(tensor) (θ_i − θ_base). The real mergekit run is the bench.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS.parent / "bench"))

import vs_mergekit_layers as vml  # noqa: E402

STAND_IN = f"""#!{sys.executable}
import json, re, sys
from pathlib import Path
import yaml
from safetensors.torch import load_file, save_file
sys.path.insert(0, {str(TESTS)!r})
from test_layer_groups_export import mergekit_value
_state = lambda d: {{k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(str(f)).items()}}
cfg = yaml.safe_load(open(sys.argv[1]))
assert cfg["merge_method"] == "task_arithmetic" and cfg["parameters"] == {{"normalize": False}}
base = _state(Path(cfg["base_model"]))
conf = json.loads((Path(cfg["base_model"]) / "config.json").read_text())
layers = conf.get("num_hidden_layers", conf.get("n_layer"))
models = [(_state(Path(m["model"])), m["parameters"]["weight"]) for m in cfg["models"]]
out = {{}}
for name, b in base.items():
    m = re.search(r"\\.(?:layers|h)\\.(\\d+)\\.", name)
    t = int(m.group(1)) / (layers - 1) if m else 0.0
    out[name] = b + sum(mergekit_value(name, w, t) * (s[name] - b) for s, w in models)
Path(sys.argv[2]).mkdir(parents=True)
save_file(out, str(Path(sys.argv[2]) / "model.safetensors"))
"""


def test_hand_group_and_weight_rule():
    gs = ["embed", "blocks0-1", "blocks2-2", "head"]
    assert vml.hand_group("model.layers.1.mlp.up_proj.weight", False, gs) == "blocks0-1"
    assert vml.hand_group("transformer.h.2.ln_1.bias", True, gs) == "blocks2-2"
    assert vml.hand_group("model.embed_tokens.weight", False, gs) == "embed"
    assert vml.hand_group("transformer.wpe.weight", True, gs) == "embed"
    assert vml.hand_group("lm_head.weight", True, gs) == "embed"
    assert vml.hand_group("lm_head.weight", False, gs) == "head"
    assert vml.hand_group("model.norm.weight", True, gs) == "head"
    with pytest.raises(ValueError, match="block 3"):
        vml.hand_group("model.layers.3.mlp.up_proj.weight", False, gs)
    w = {"ja": 0.3, "ja@head": 0.9, "zh@embed": 0.2}
    assert [vml.alpha_of(w, "ja", "head"), vml.alpha_of(w, "ja", "embed"), vml.alpha_of(w, "zh", "head")] == \
        [0.9, 0.3, 0.0]


def test_compare_reports_the_worst_tensor_and_missing_names():
    a = {"x": torch.tensor([1.0, 2.0]), "y": torch.tensor([0.5]), "only_a": torch.zeros(1)}
    b = {"x": torch.tensor([1.0, 2.25]), "y": torch.tensor([0.0]), "only_b": torch.zeros(1)}
    r = vml.compare(a, b)
    assert r == {"max_abs": 0.5, "at": "y", "tensors": 2, "only_first": ["only_a"], "only_second": ["only_b"]}


@pytest.mark.parametrize("arch,layers,granularity,partial,groups", [
    ("llama_untied", 5, "layer-groups:3", False, ["embed", "blocks0-0", "blocks1-2", "blocks3-4", "head"]),
    ("llama", 4, "layer-groups:4", True, ["embed", "blocks0-0", "blocks1-1", "blocks2-2", "blocks3-3", "head"])])
def test_one_case_end_to_end_with_a_mergekit_stand_in(arch, layers, granularity, partial, groups, tmp_path):
    base, tuned = vml.tiny_world(tmp_path / "w", arch, layers, ("ja", "zh"))
    fake = tmp_path / "mergekit-yaml"
    fake.write_text(STAND_IN)
    fake.chmod(0o755)
    row = vml.run_case("c", base, tuned, tmp_path / "w" / "vectors", granularity, partial, 7, fake,
                       tmp_path / "out", dict(os.environ))
    assert row["groups"] == groups
    # partial: a plain weight per vector plus overrides on half of the 2 x groups keys
    assert len(row["weights"]) == (2 + len(groups) if partial else 2 * len(groups))
    # the stand-in and our export agree with each other and with the float64 reference, to fp32 rounding ...
    for key in ("mk_vs_ours", "ours_vs_ref64", "mk_vs_ref64"):
        assert row[key]["max_abs"] < 1e-6, (key, row[key])
        assert not row[key]["only_first"] and not row[key]["only_second"], (key, row[key])
    # ... on a merge that moved the weights by far more than that
    assert row["ours_vs_base"] > 0.05
    assert row["mk_vs_ours"]["tensors"] == len(vml._state(base))
