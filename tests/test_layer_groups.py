"""Per-layer-group weights: group layout, and every merge path against base + Σ α_(i,g) τ_i computed by hand."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_model, perturbed

from optimer_lib.checkpoints.vectors import extract_vector
from optimer_lib.engine import MergeEngine, MergeState
from optimer_lib.errors import ConfigError
from optimer_lib.merging import groups
from optimer_lib.merging.groups import Granularity
from optimer_lib.merging.methods import merge_state_dict
from optimer_lib.merging.resident import ResidentMerger

ARCHS = ("llama", "gpt2", "llama_untied")


def _pool(arch: str):
    base = make_model(arch)
    vecs = [extract_vector(base, perturbed(base, 0.05, 10 + i), name=n) for i, n in enumerate(("ja", "zh"))]
    return base, vecs


def _expected(base, vecs, alpha) -> dict[str, torch.Tensor]:
    """base + Σ_i α(i, group of the tensor) τ_i, tensor by tensor, with the group chosen by hand from the name."""
    def group(name: str) -> str:
        if name in ("model.embed_tokens.weight", "transformer.wte.weight", "transformer.wpe.weight") or (
                name == "lm_head.weight" and base.config.tie_word_embeddings):
            return "embed"
        for i in range(2):
            if f".layers.{i}." in name or f".h.{i}." in name:
                return f"blocks{i}-{i}"
        return "head"

    out = {}
    for name, b in base.state_dict().items():
        t = b.clone().double()
        if b.is_floating_point():
            for v in vecs:
                d = v.tensors.get(name)
                if d is None and name == "lm_head.weight":  # tied: the vector stores the embedding once
                    d = v.tensors.get("model.embed_tokens.weight", v.tensors.get("transformer.wte.weight"))
                if d is not None:
                    t += alpha[v.name][group(name)] * d.double()
        out[name] = t
    return out


ALPHA = {"ja": {"embed": 0.1, "blocks0-0": 0.7, "blocks1-1": -0.3, "head": 0.45},
         "zh": {"embed": 0.9, "blocks0-0": 0.0, "blocks1-1": 0.25, "head": 1.2}}
FLAT = {f"{n}@{g}": w for n, per in ALPHA.items() for g, w in per.items()}


def _close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    for name, w in want.items():
        assert torch.allclose(got[name].double(), w, atol=1e-6), name


def test_granularity_and_layout():
    assert Granularity.parse("vector").per_vector and Granularity.parse(None).spec == "vector"
    assert Granularity.parse("layer-groups:3").groups == 3
    for bad in ("layers:2", "layer-groups:0", "layer-groups:x", "layer-groups"):
        with pytest.raises(ConfigError, match="layer-groups:G"):
            Granularity.parse(bad)
    assert groups.group_names(30, "layer-groups:4") == ["embed", "blocks0-6", "blocks7-14", "blocks15-21",
                                                        "blocks22-29", "head"]
    assert groups.slices(5, 2) == [(0, 1), (2, 4)]
    with pytest.raises(ConfigError, match="1 <= G <= 2"):
        groups.group_names(2, "layer-groups:3")
    assert groups.layout(make_model("llama"), "layer-groups:2") == ["embed", "blocks0-0", "blocks1-1", "head"]
    assert groups.layout(make_model("gpt2"), "layer-groups:1") == ["embed", "blocks0-1", "head"]
    assert groups.layout(make_model("llama"), "vector") == []
    assert groups.param_names(["ja"], ["embed", "head"]) == ["ja@embed", "ja@head"]
    # tied head goes with the embedding, untied head and final norm with "head"
    assert groups.position("lm_head.weight", ["model.embed_tokens.weight"]) == "embed"
    assert groups.position("lm_head.weight") == "head" and groups.position("model.norm.weight") == "head"
    assert groups.position("model.layers.11.mlp.up_proj.weight") == 11
    assert groups.position("transformer.h.1.attn.c_attn.weight") == 1


def test_resolve_and_expand():
    gw = groups.resolve(["ja", "zh"], {"ja": 0.3, "ja@blocks2-5": 0.5, "zh@embed": 1.0})
    assert gw.at(3) == [0.5, 0.0] and gw.at(1) == [0.3, 0.0] and gw.at("embed") == [0.3, 1.0]
    assert groups.resolve(["ja"], {"ja": 0.3}) is None
    with pytest.raises(ConfigError, match="overlap"):
        groups.resolve(["ja"], {"ja@blocks0-3": 0.1, "ja@blocks2-5": 0.2})
    with pytest.raises(ConfigError, match="unknown vector 'xx'"):
        groups.resolve(["ja"], {"xx@embed": 0.1})
    with pytest.raises(ConfigError, match="unknown layer group 'middle'"):
        groups.resolve(["ja"], {"ja@middle": 0.1})
    full = groups.expand({"ja": 0.3, "ja@blocks1-1": 0.5}, ["ja"], ["embed", "blocks0-0", "blocks1-1", "head"])
    assert full == {"ja@embed": 0.3, "ja@blocks0-0": 0.3, "ja@blocks1-1": 0.5, "ja@head": 0.3}
    assert groups.per_layer({"ja": 0.3, "ja@blocks1-1": 0.5}, ["ja"], 2) == {"ja": [0.3, 0.3, 0.5, 0.3]}


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_state_dict_per_group(arch):
    base, vecs = _pool(arch)
    _close(merge_state_dict(base, vecs, FLAT), _expected(base, vecs, ALPHA))
    # a plain weight is the default of every group it does not override
    mixed = {"ja": 0.2, "ja@blocks1-1": 0.6, "zh": 0.4}
    alpha = {"ja": dict.fromkeys(ALPHA["ja"], 0.2) | {"blocks1-1": 0.6}, "zh": dict.fromkeys(ALPHA["zh"], 0.4)}
    _close(merge_state_dict(base, vecs, mixed), _expected(base, vecs, alpha))


@pytest.mark.parametrize("arch", ARCHS)
def test_resident_merger_per_group_incremental(arch):
    base, vecs = _pool(arch)
    merger = ResidentMerger(copy.deepcopy(base), vecs)  # rewrites its model in place; ``base`` stays the base
    merger.set_weights({"ja": 0.5, "zh": 0.5})  # per vector, then per group: the incremental path per group
    merger.set_weights(FLAT)
    _close(merger.model.state_dict(), _expected(base, vecs, ALPHA))
    assert merger.weights["ja@blocks1-1"] == -0.3 and merger.weights["ja"] == 0.0
    moved = {**FLAT, "zh@blocks1-1": 0.75}  # one group of one vector moves
    merger.set_weights(moved)
    _close(merger.model.state_dict(), _expected(base, vecs, {**ALPHA, "zh": {**ALPHA["zh"], "blocks1-1": 0.75}}))
    if base.config.tie_word_embeddings:  # the tied head is one tensor and stays tied
        assert merger.model.lm_head.weight.data_ptr() == merger.model.get_input_embeddings().weight.data_ptr()
    merger.set_weights({"ja": 0.3, "zh": 0.1})  # back to per-vector weights: every group follows
    _close(merger.model.state_dict(), _expected(base, vecs, {"ja": dict.fromkeys(ALPHA["ja"], 0.3),
                                                             "zh": dict.fromkeys(ALPHA["zh"], 0.1)}))


def test_engine_and_state_per_group():
    base, vecs = _pool("llama")
    engine = MergeEngine(copy.deepcopy(base), None, vecs, max_slots=1)
    plain = engine.state({"ja": 0.1})
    state = engine.state(FLAT)
    assert state.grouped and not plain.grouped
    assert [n for n, _ in state.weights][:2] == ["ja", "zh"] and state.weight_map["zh@head"] == 1.2
    assert plain.changes_to(state) == 2 and state.changes_to(state.with_weights({**FLAT, "ja@head": 0.0})) == 1
    with pytest.raises(ConfigError, match="unknown vector"):
        engine.state({"xx@embed": 0.1})
    with engine.lease(plain):
        pass
    with engine.lease(state) as lease:
        _close(lease.model.state_dict(), _expected(base, vecs, ALPHA))
    _close(engine.exact(state), _expected(base, vecs, ALPHA))
    assert MergeState.of(["ja"], {"ja": 0.2}).changes_to(MergeState.of(["ja"], {"ja": 0.2})) == 0
