"""Training loop (mixture sampling, resume, trajectory) and data loading, on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_model
from helpers import require

from optimer_lib import data
from optimer_lib.errors import ConfigError, DataError, OptimerError
from optimer_lib.training.train import TrainConfig, normalise_ratios, train_model


def _blocks(tok, n=40):
    a = data.pack_tokens(["the quick brown fox jumps over the lazy dog"] * n, tok, 16)
    b = data.pack_tokens(["12 + 35 = 47 def f(x): return x"] * n, tok, 16)
    return {"a": a, "b": b}


def _cfg(**kw):
    base = dict(tokens=8 * 4 * 16, lr=1e-2, batch_size=4, seq_len=16, seed=0, device="cpu", checkpoint_every=0)
    base.update(kw)
    return TrainConfig(**base)


def test_training_lowers_loss_and_records_mixture(tmp_path, tiny_tokenizer):
    model = make_model("llama")
    blocks = _blocks(tiny_tokenizer)
    before = model(input_ids=blocks["a"][:4], labels=blocks["a"][:4]).loss.item()
    res = train_model(model, tiny_tokenizer, blocks, {"a": 0.75, "b": 0.25}, tmp_path / "out",
                      _cfg(tokens=30 * 4 * 16), progress=False)
    after = model(input_ids=blocks["a"][:4], labels=blocks["a"][:4]).loss.item()
    assert after < before - 0.5
    info = json.loads((tmp_path / "out" / "training.json").read_text())
    assert info["tokens_trained"] == 30 * 4 * 16 == res.tokens
    share = res.tokens_by_dataset["a"] / res.tokens
    assert 0.6 < share < 0.9  # 120 sequences drawn with p=0.75
    assert not (tmp_path / "out" / "resume").exists()


def test_resume_after_crash_gives_identical_weights(tmp_path, tiny_tokenizer, monkeypatch):
    blocks = _blocks(tiny_tokenizer)
    ref = make_model("llama")
    train_model(ref, tiny_tokenizer, blocks, {"a": 0.5, "b": 0.5}, tmp_path / "ref", _cfg(), progress=False)

    crashing = make_model("llama")
    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("simulated crash")
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_model(crashing, tiny_tokenizer, blocks, {"a": 0.5, "b": 0.5}, tmp_path / "run",
                    _cfg(checkpoint_every=3), progress=False)
    assert (tmp_path / "run" / "resume" / "state.pt").exists()
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    resumed = make_model("llama")  # fresh weights: everything must come from the resume point
    train_model(resumed, tiny_tokenizer, blocks, {"a": 0.5, "b": 0.5}, tmp_path / "run",
                _cfg(checkpoint_every=3), progress=False)
    for (n, p), q in zip(ref.named_parameters(), resumed.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), n
    with pytest.raises(OptimerError, match="other settings"):
        (tmp_path / "run" / "resume").mkdir()
        torch.save({"config": {}, "ratios": {}}, tmp_path / "run" / "resume" / "state.pt")
        train_model(make_model("llama"), tiny_tokenizer, blocks, {"a": 1.0}, tmp_path / "run", _cfg(), progress=False)


def test_trajectory_checkpoints(tmp_path, tiny_tokenizer):
    train_model(make_model("gpt2"), tiny_tokenizer, _blocks(tiny_tokenizer), {"a": 1.0}, tmp_path / "t",
                _cfg(trajectory=4), progress=False)
    steps = sorted(p.name for p in (tmp_path / "t" / "trajectory").iterdir())
    assert steps == ["step-000002", "step-000004", "step-000006"]  # the 4th is the final model itself


def test_checkpoints_at_token_counts(tmp_path, tiny_tokenizer):
    """``save_at``: checkpoints after given token counts (whole steps, rounded down; the run's end is the model
    itself). At a constant lr a checkpoint is the shorter run of the same seed: the regime map's bases rely on it."""
    from optimer_lib.checkpoints.vectors import as_state

    blocks = _blocks(tiny_tokenizer)  # 64 tokens per step, 8 steps
    train_model(make_model("llama"), tiny_tokenizer, blocks, {"a": 1.0}, tmp_path / "long",
                _cfg(save_at=(64, 200, 512), schedule="constant", warmup=0.0), progress=False)
    steps = sorted(p.name for p in (tmp_path / "long" / "trajectory").iterdir())
    assert steps == ["step-000001", "step-000003"]
    ck = tmp_path / "long" / "trajectory" / "step-000003"
    assert json.loads((ck / "training.json").read_text())["tokens"] == 192
    train_model(make_model("llama"), tiny_tokenizer, blocks, {"a": 1.0}, tmp_path / "short",
                _cfg(tokens=192, schedule="constant", warmup=0.0), progress=False)
    a, b = as_state(ck), as_state(tmp_path / "short")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_config_and_ratio_errors():
    with pytest.raises(ConfigError, match="less than one batch"):
        TrainConfig(tokens=10).validate()
    with pytest.raises(ConfigError, match="--lr"):
        TrainConfig(lr=5).validate()
    assert normalise_ratios("ja") == {"ja": 1.0}
    assert normalise_ratios({"ja": 2, "zh": 6, "x": 0}) == {"ja": 0.25, "zh": 0.75}
    with pytest.raises(ConfigError):
        normalise_ratios({"ja": -1})
    with pytest.raises(ConfigError):
        normalise_ratios({"ja": 0})


def test_user_files_and_errors(tmp_path, tiny_tokenizer):
    txt = tmp_path / "notes.txt"
    txt.write_text("first doc\nline two\n\nsecond doc\n\n\n")
    assert data.load_corpus(txt) == ["first doc\nline two", "second doc"]
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert data.load_corpus(jl) == ["a", "b"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": 1}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        data.load_corpus(bad)
    with pytest.raises(DataError, match="unknown corpus 'klingon'"):
        data.load_corpus("klingon")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        data.load_corpus(empty)
    with pytest.raises(DataError, match="too small"):
        data.pack_tokens(["hi"], tiny_tokenizer, 64)
    xz = tmp_path / "c.jsonl.xz"
    data.write_jsonl_xz(["x\ny", "日本"], xz)
    assert data.read_jsonl(xz) == ["x\ny", "日本"]
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"text": "Question: 1+1?\\nAnswer: 2"}\n')
    suite = data.load_eval_suite([f"arith={qa}"], "dev")
    assert suite.qa["arith"] == [("Question: 1+1?\nAnswer:", "2")]


def test_pack_tokens_joins_with_eos(tiny_tokenizer):
    blocks = data.pack_tokens(["ab", "cd"] * 50, tiny_tokenizer, 8)
    assert blocks.shape[1] == 8 and (blocks == tiny_tokenizer.eos_token_id).any()


def test_accelerate_single_process_matches_plain_training(tmp_path, tiny_tokenizer):
    require("accelerate")
    blocks = _blocks(tiny_tokenizer)
    plain, accel = make_model("llama"), make_model("llama")
    train_model(plain, tiny_tokenizer, blocks, {"a": 1.0}, tmp_path / "p", _cfg(), progress=False)
    res = train_model(accel, tiny_tokenizer, blocks, {"a": 1.0}, tmp_path / "a", _cfg(distributed="on"),
                      progress=False)
    assert res.tokens == 8 * 4 * 16
    assert json.loads((tmp_path / "a" / "training.json").read_text())["processes"] == 1
    for p, q in zip(plain.parameters(), accel.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)
