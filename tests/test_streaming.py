"""Streaming extract/merge (checkpoints.streaming) equal the in-memory paths, on tiny sharded checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_model, perturbed
from helpers import card_weights
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from optimer_lib.checkpoints.models import load_model
from optimer_lib.checkpoints.streaming import checkpoint_files, extract_vector_streaming, parse_size
from optimer_lib.checkpoints.vectors import extract_vector, load_vector, save_vector
from optimer_lib.errors import ConfigError, VectorError
from optimer_lib.merging.methods import merge_state_dict
from optimer_lib.merging.streamed import merge_streaming

SHARD = "20KB"  # tiny models are ~30-60 KB: several shards each


def _save(model, path: Path, tok, dtype: torch.dtype = torch.float32) -> Path:
    model.to(dtype).save_pretrained(path, max_shard_size=SHARD)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def sharded(tmp_path, tiny_tokenizer):
    """``sharded(arch, dtype)`` -> (base_dir, [tuned_dir, tuned_dir]) saved in several shards."""

    def build(arch: str = "llama", dtype: torch.dtype = torch.float32):
        base = make_model(arch)
        dirs = [_save(perturbed(base, 0.02, 10 + i), tmp_path / f"{arch}-t{i}", tiny_tokenizer, dtype)
                for i in range(2)]
        return _save(base, tmp_path / f"{arch}-base", tiny_tokenizer, dtype), dirs

    return build


def _state(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in set(checkpoint_files(model_dir).values()):
        out.update(load_file(f))
    return out


def test_parse_size():
    assert parse_size(10) == 10 and parse_size("2GB") == 2 * 10**9 and parse_size("1GiB") == 2**30
    assert parse_size("1.5 MB") == 1_500_000
    with pytest.raises(ConfigError, match="500MB"):
        parse_size("lots")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "llama_untied"])
def test_extract_equals_in_memory(sharded, tmp_path, arch):
    base, (t0, _) = sharded(arch)
    assert len(set(checkpoint_files(base).values())) > 1
    ref = extract_vector(base, t0, name="ja", tokens_trained=7)
    one = extract_vector_streaming(base, t0, tmp_path / "one.safetensors", name="ja", tokens_trained=7)
    many = extract_vector_streaming(base, t0, tmp_path / "many.safetensors", name="ja", tokens_trained=7,
                                    shard_size=8_000)
    assert one.shards == 1 and (tmp_path / "one.safetensors").is_file()
    assert many.shards > 1 and (tmp_path / "many.safetensors" / "vector.safetensors.index.json").is_file()
    assert one.norm == pytest.approx(ref.norm(), rel=1e-9)
    for res in (one, many):
        vec = load_vector(res.path)
        assert vec.name == "ja" and vec.tokens_trained == "7" and vec.base_fingerprint == ref.base_fingerprint
        assert set(vec.tensors) == set(ref.tensors)  # tied lm_head stored once, as in memory
        for k, d in ref.tensors.items():
            assert torch.equal(vec.tensors[k], d), k


@pytest.mark.parametrize("method, params", [("optimer", {}), ("ties", {"density": 0.5}), ("dare", {"seed": 3})])
def test_merge_equals_in_memory(sharded, tmp_path, method, params):
    base, tuned = sharded("llama")
    paths = [extract_vector_streaming(base, t, tmp_path / f"v{i}", name=f"v{i}", shard_size=8_000).path
             for i, t in enumerate(tuned)]
    weights = {"v0": 0.7, "v1": -0.2}
    res = merge_streaming(base, paths, weights, tmp_path / "merged", method=method, params=params,
                          shard_size="16KB")
    assert res.shards > 1 and (res.path / "model.safetensors.index.json").is_file()
    ref = merge_state_dict(load_model(base).state_dict(), [load_vector(p) for p in paths], weights,
                           method=method, **params)
    got = _state(res.path)
    assert "lm_head.weight" not in got  # tied: the merged checkpoint looks like the base
    for k, t in got.items():
        assert torch.equal(t, ref[k]), k
    model = load_model(res.path)  # a normal HF checkpoint
    for k, t in model.state_dict().items():
        assert torch.equal(t, ref[k]), k
    assert {"README.md", "mergekit.yaml", "tokenizer.json", "config.json"} <= {p.name for p in res.path.iterdir()}
    assert card_weights((res.path / "README.md").read_text()) == weights


def test_bf16_stays_bf16_and_dtype_option(sharded, tmp_path):
    base, (t0, t1) = sharded("llama_untied", torch.bfloat16)
    v = extract_vector_streaming(base, t0, tmp_path / "v.safetensors", name="v")
    vec = load_vector(v.path)
    assert vec.metadata["dtype"] == "bfloat16" and all(t.dtype == torch.bfloat16 for t in vec.tensors.values())
    res = merge_streaming(base, [v.path], {"v": 0.5}, tmp_path / "m")
    ref = merge_state_dict(load_model(base, dtype="bfloat16").state_dict(), [vec], {"v": 0.5})
    got = _state(res.path)
    assert all(t.dtype == torch.bfloat16 and torch.equal(t, ref[k]) for k, t in got.items())
    assert json.loads((res.path / "config.json").read_text())["dtype"] == "bfloat16"
    up = merge_streaming(base, [v.path], {"v": 0.5}, tmp_path / "m32", dtype="float32")
    assert all(t.dtype == torch.float32 for t in _state(up.path).values())
    assert json.loads((up.path / "config.json").read_text())["dtype"] == "float32"


def test_instruction_and_fingerprint_check(sharded, tmp_path):
    base, (t0, t1) = sharded("llama")
    a = extract_vector_streaming(base, t0, tmp_path / "a.safetensors", name="a").path
    it = extract_vector_streaming(base, t1, tmp_path / "it.safetensors", name="it").path
    res = merge_streaming(base, [a], {"a": 0.3}, tmp_path / "m", instruction=it, instruction_weight=0.5)
    ref = merge_state_dict(load_model(base).state_dict(), [load_vector(a)], {"a": 0.3},
                           instruction=load_vector(it), instruction_weight=0.5)
    assert all(torch.equal(t, ref[k]) for k, t in _state(res.path).items())
    # a vector from another base: refused, nothing left under the final name
    other = make_model("llama", seed=5)
    other.save_pretrained(tmp_path / "other", max_shard_size=SHARD)
    with pytest.raises(VectorError, match="different base"):
        merge_streaming(tmp_path / "other", [a], {"a": 0.3}, tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))
    merge_streaming(tmp_path / "other", [a], {"a": 0.3}, tmp_path / "bad", allow_fingerprint_mismatch=True)
    make_model("gpt2").save_pretrained(tmp_path / "gpt2")  # another architecture: names do not fit
    with pytest.raises(VectorError, match="does not fit"):
        merge_streaming(tmp_path / "gpt2", [a], {"a": 0.3}, tmp_path / "x", allow_fingerprint_mismatch=True)


def test_checkpoint_key_renames(tmp_path, tiny_tokenizer):
    """A GPT-2 checkpoint saved without the ``transformer.`` prefix: names follow the loaded model."""
    base, tuned = make_model("gpt2"), perturbed(make_model("gpt2"), 0.02, 1)
    dirs = []
    for name, m in (("b", base), ("t", tuned)):
        m.save_pretrained(tmp_path / name)
        sd = load_file(tmp_path / name / "model.safetensors")
        save_file({k.removeprefix("transformer."): v for k, v in sd.items()}, tmp_path / name / "model.safetensors",
                  metadata={"format": "pt"})
        dirs.append(tmp_path / name)
    ref = extract_vector(*dirs, name="g")
    vec = load_vector(extract_vector_streaming(*dirs, tmp_path / "g.safetensors", name="g").path)
    assert set(vec.tensors) == set(ref.tensors) and any(k.startswith("transformer.") for k in vec.tensors)
    assert all(torch.equal(vec.tensors[k], ref.tensors[k]) for k in ref.tensors)
    res = merge_streaming(dirs[0], [tmp_path / "g.safetensors"], {"g": 1.0}, tmp_path / "m")
    with safe_open(str(res.path / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("transformer.") for k in f.keys())  # the base's own names
    merged = load_model(res.path).state_dict()
    for k, t in load_model(dirs[1]).state_dict().items():
        torch.testing.assert_close(merged[k], t)


def test_cli_streams_sharded_checkpoints(sharded, tmp_path, optimer):
    base, (t0, t1) = sharded("llama")

    def run(*args: object) -> str:
        return optimer(*args).stdout

    assert "streamed" in run("vector", "extract", "--base", base, "--tuned", t0, "--out", tmp_path / "a",
                             "--name", "a", "--shard-size", "8KB")  # sharded base: streams by default
    assert (tmp_path / "a" / "vector.safetensors.index.json").is_file()
    save_vector(extract_vector(base, t1, name="b"), tmp_path / "b.safetensors")  # an in-memory vector file
    out = run("merge", "--base", base, "--vector", f"{tmp_path / 'a'}=0.5", "--vector",
              f"{tmp_path / 'b.safetensors'}=0.25", "--out", tmp_path / "m", "--dtype", "bf16", "--shard-size", "8KB")
    assert "streamed" in out
    ref = merge_state_dict(load_model(base).state_dict(), [load_vector(tmp_path / "a"),
                                                           load_vector(tmp_path / "b.safetensors")],
                           {"a": 0.5, "b": 0.25})
    got = _state(tmp_path / "m")
    assert all(t.dtype == torch.bfloat16 and torch.equal(t, ref[k].to(torch.bfloat16)) for k, t in got.items())


def test_fingerprint_of_tensors_above_2_pow_24_entries():
    """Real embeddings (e.g. 32000 x 768) have > 2**24 entries, where float32 indices round past the end."""
    from optimer_lib.checkpoints.vectors import state_fingerprint

    assert len(state_fingerprint({"w": torch.zeros(2**24 + 4, dtype=torch.bfloat16)})) == 16
