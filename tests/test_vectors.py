"""Distribution vectors: extraction, fingerprint, save/load and validation, statistics."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, perturbed
from helpers import vector_info_tables
from safetensors.torch import save_file

from optimer_lib.checkpoints.models import load_model
from optimer_lib.checkpoints.vectors import (
    DistributionVector,
    check_compatible,
    cosine_matrix,
    extract_vector,
    format_info,
    load_vector,
    norms,
    save_vector,
    state_fingerprint,
)
from optimer_lib.errors import OptimerError, VectorError

TIED = {"llama": True, "gpt2": True, "llama_untied": False}


def _pair(arch: str, seed: int = 1):
    base = make_model(arch)
    return base, perturbed(base, 0.02, seed)


def test_extract_from_dirs_matches_modules(tiny_pool, arch):
    base_dir, tuned = tiny_pool(arch, 1)
    v = extract_vector(base_dir, tuned[0], name="ja", tokens_trained=1234)
    base, t = load_model(base_dir), load_model(tuned[0])
    vm = extract_vector(base, t, name="ja")
    assert set(v.tensors) == set(vm.tensors)
    for k in v.tensors:
        assert torch.equal(v.tensors[k], vm.tensors[k])
    assert v.source == str(tuned[0]) and v.tokens_trained == "1234"
    assert v.base_fingerprint == state_fingerprint(base) == vm.base_fingerprint
    # Tied weights are stored once; every float parameter is covered.
    assert ("lm_head.weight" in v.tensors) is not TIED[arch]
    assert len(v.tensors) == len(list(base.parameters()))
    sd_b, sd_t = base.state_dict(), t.state_dict()
    for k, d in v.tensors.items():
        assert torch.allclose(sd_b[k] + d, sd_t[k], atol=1e-7)


def test_fingerprint_order_dtype_and_base():
    base = make_model("llama")
    sd = base.state_dict()
    fp = state_fingerprint(sd)
    assert len(fp) == 16
    assert state_fingerprint(dict(reversed(list(sd.items())))) == fp
    assert state_fingerprint({k: v.to(torch.bfloat16) for k, v in sd.items()}) == fp
    no_alias = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    assert state_fingerprint(no_alias) == fp
    assert state_fingerprint(make_model("llama", seed=1)) != fp
    assert state_fingerprint(perturbed(base, 0.1, 3)) != fp


def test_bf16_stays_bf16_and_int_buffers_skipped():
    base, tuned = _pair("llama_untied")
    b = {k: v.to(torch.bfloat16) for k, v in base.state_dict().items()}
    t = {k: v.to(torch.bfloat16) for k, v in tuned.state_dict().items()}
    b["steps"], t["steps"] = torch.tensor([1]), torch.tensor([2])
    v = extract_vector(b, t, name="x")
    assert "steps" not in v.tensors
    assert all(d.dtype == torch.bfloat16 for d in v.tensors.values())
    assert v.metadata["dtype"] == "bfloat16"


def test_bf16_checkpoint_dirs_give_bf16_vector(tmp_path):
    base, tuned = _pair("llama")
    base.to(torch.bfloat16).save_pretrained(tmp_path / "b")
    tuned.to(torch.bfloat16).save_pretrained(tmp_path / "t")
    v = extract_vector(tmp_path / "b", tmp_path / "t", name="x")
    assert v.metadata["dtype"] == "bfloat16" and v.base_fingerprint == state_fingerprint(base)


def test_save_load_roundtrip_atomic_and_overwrite(tmp_path):
    base, tuned = _pair("llama")
    v = extract_vector(base, tuned, name="zh", source="runs/zh", tokens_trained=10)
    p = save_vector(v, tmp_path / "vec" / "zh.safetensors")
    assert sorted(x.name for x in p.parent.iterdir()) == ["zh.safetensors"]  # no temp files left
    w = load_vector(p)
    assert w.name == "zh" and w.metadata == v.metadata and w.path == p
    assert set(w.tensors) == set(v.tensors)
    assert all(torch.equal(w.tensors[k], v.tensors[k]) for k in v.tensors)
    with pytest.raises(OptimerError, match="--force"):
        save_vector(v, p)
    v2 = extract_vector(base, perturbed(base, 0.02, 9), name="zh")
    save_vector(v2, p, overwrite=True)
    assert torch.equal(next(iter(load_vector(p).tensors.values())), next(iter(v2.tensors.values())))
    assert sorted(x.name for x in p.parent.iterdir()) == ["zh.safetensors"]


def test_load_errors(tmp_path, tiny_pool):
    with pytest.raises(VectorError, match="does not exist"):
        load_vector(tmp_path / "nope.safetensors")
    base, tuned = _pair("llama")
    p = save_vector(extract_vector(base, tuned, name="a"), tmp_path / "a.safetensors")
    data = p.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(VectorError, match="corrupt or truncated.*re-extract"):
        load_vector(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(VectorError, match="corrupt or truncated"):
        load_vector(tmp_path / "junk.safetensors")
    base_dir, _ = tiny_pool("llama", 0)
    with pytest.raises(VectorError, match="not an OptiMer vector.*vector extract"):
        load_vector(base_dir / "model.safetensors")
    meta = {"format": "optimer-vector", "format_version": "1", "name": "bad"}
    save_file({"w": torch.tensor([1.0, float("nan")])}, tmp_path / "nan.safetensors", metadata=meta)
    with pytest.raises(VectorError, match="NaN or Inf in w"):
        load_vector(tmp_path / "nan.safetensors")


def test_extract_errors():
    base = make_model("llama")
    with pytest.raises(VectorError, match=r"shape mismatch for model\.embed_tokens\.weight.*resize_token_embeddings"):
        extract_vector(base, make_model("llama", vocab_size=330), name="x")
    sd = dict(perturbed(base, 0.02, 1).state_dict())
    del sd["model.norm.weight"]
    with pytest.raises(VectorError, match=r"only in base: \['model.norm.weight'\]"):
        extract_vector(base, sd, name="x")
    bad = perturbed(base, 0.02, 1)
    with torch.no_grad():
        bad.model.norm.weight[0] = float("inf")
    with pytest.raises(VectorError, match="model.norm.weight contains NaN or Inf"):
        extract_vector(base, bad, name="x")


def test_check_compatible():
    base, tuned = _pair("gpt2")
    v = extract_vector(base, tuned, name="a")
    check_compatible(v, base)
    unknown = DistributionVector("u", {**v.tensors, "extra.weight": torch.zeros(2)}, dict(v.metadata))
    with pytest.raises(VectorError, match="lacks.*extra.weight"):
        check_compatible(unknown, base)
    shaped = DistributionVector("s", {"transformer.ln_f.weight": torch.zeros(3)}, dict(v.metadata))
    with pytest.raises(VectorError, match=r"shape of transformer.ln_f.weight is \(3,\)"):
        check_compatible(shaped, base)
    other = make_model("gpt2", seed=5)
    with pytest.raises(VectorError, match="different base.*--allow-base-mismatch"):
        check_compatible(v, other)
    check_compatible(v, other, allow_fingerprint_mismatch=True)


def test_cosine_matrix_and_norms():
    base = make_model("llama")
    vecs = [extract_vector(base, perturbed(base, 0.02, s), name=f"v{s}") for s in (1, 2)]
    vecs.append(DistributionVector("sum", {k: vecs[0].tensors[k] * 2 + vecs[1].tensors[k]
                                           for k in vecs[0].tensors}, {}))
    names, cos = cosine_matrix(vecs)
    assert names == ["v1", "v2", "sum"]
    flat = torch.stack([torch.cat([v.tensors[k].double().reshape(-1) for k in sorted(v.tensors)])
                        for v in vecs])
    direct = torch.nn.functional.cosine_similarity(flat.unsqueeze(1), flat.unsqueeze(0), dim=-1)
    assert torch.allclose(cos, direct, atol=1e-10)
    assert torch.allclose(cos.diagonal(), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(cos, cos.T)
    n = norms(vecs)
    assert n["v2"] == pytest.approx(float(flat[1].norm()), rel=1e-9)


def test_cosine_orthogonal_and_zero():
    a = DistributionVector("a", {"w": torch.tensor([1.0, 0.0, 0.0]), "b": torch.tensor([2.0])}, {})
    b = DistributionVector("b", {"w": torch.tensor([0.0, 3.0, 0.0])}, {})  # lacks "b": counts as zero
    z = DistributionVector("z", {"w": torch.zeros(3)}, {})
    _, cos = cosine_matrix([a, b, z])
    assert abs(float(cos[0, 1])) < 1e-12
    assert torch.equal(cos[2], torch.zeros(3, dtype=torch.float64))
    info = format_info([a, b])
    norms, cosines = vector_info_tables(info)
    assert norms == {"a": pytest.approx(5 ** 0.5, abs=1e-4), "b": pytest.approx(3.0, abs=1e-4)}
    assert cosines == {"a": [1.0, 0.0], "b": [0.0, 1.0]}


def test_tokens_trained_read_from_training_json(tiny_pool):
    import json

    from optimer_lib.checkpoints.vectors import extract_vector

    base, (tuned,) = tiny_pool("llama", 1)
    (tuned / "training.json").write_text(json.dumps({"tokens_trained": 12345}))
    vec = extract_vector(base, tuned, name="t")
    assert vec.tokens_trained == "12345" and vec.source == str(tuned)
