"""Safe local loading: missing paths, non-HF folders, remote code refused, device/dtype choice."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_model

from optimer_lib.checkpoints.models import load_model, load_tokenizer, resolve_device, resolve_dtype
from optimer_lib.errors import ModelError


def test_missing_and_non_hf_dirs(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_model(tmp_path / "empty")
    with pytest.raises(ModelError, match="no config.json"):
        load_tokenizer(tmp_path / "empty")


def test_remote_code_is_refused_unless_allowed(tmp_path):
    d = tmp_path / "remote"
    make_model("llama").save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    cfg["model_type"] = "evil"
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(ModelError):
        load_model(d)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/optimer-pickle-ran",))


def _pickled(tmp_path, state):
    d = tmp_path / "pickled"
    make_model("llama").save_pretrained(d)
    (d / "model.safetensors").unlink()
    torch.save(state, d / "pytorch_model.bin")
    return d


def test_pickle_checkpoint_loads_weights_only(tmp_path):
    m = make_model("llama", seed=3)
    loaded = load_model(_pickled(tmp_path, m.state_dict()))
    for p, q in zip(m.parameters(), loaded.parameters(), strict=True):
        assert torch.equal(p, q)


def test_malicious_pickle_never_runs(tmp_path):
    import os

    marker = "/tmp/optimer-pickle-ran"
    if os.path.exists(marker):
        os.unlink(marker)
    state = dict(make_model("llama").state_dict())
    state["evil"] = _Evil()
    with pytest.raises(ModelError, match="could run code"):
        load_model(_pickled(tmp_path, state))
    assert not os.path.exists(marker)


def test_truncated_weights_give_a_clear_error(tmp_path):
    d = tmp_path / "trunc"
    make_model("llama").save_pretrained(d)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:200])
    with pytest.raises(ModelError, match="corrupt"):
        load_model(d)


def test_device_and_dtype_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ModelError, match="unknown dtype"):
        resolve_dtype("int3", torch.device("cpu"))
    with pytest.raises(ModelError, match="unknown device"):
        resolve_device("tpu:banana")
