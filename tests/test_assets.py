"""The shipped embedded world in assets/: loads offline, lossless tokenizer, disjoint splits, CPT headroom."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from optimer_lib.data import SPLITS, assets_dir, embedded_corpora, load_corpus, pack_tokens

ASSETS = assets_dir()
pytestmark = pytest.mark.skipif(not (ASSETS / "base" / "config.json").exists(),
                                reason="assets/ not built: python -m optimer_lib.assets build")


def test_size_budget_and_readme():
    size = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file())
    assert size <= 60 * 2**20, f"assets/ is {size / 2**20:.1f} MiB"
    readme = (ASSETS / "README.md").read_text()
    for name in ("en", "ja", "zh", "math", "code"):
        assert f"| {name} |" in readme
    assert "base dev ppl" in readme and "licence" in readme


@pytest.mark.parametrize("part", ["base", "instruct"])
def test_models_load_offline_with_auto_classes(part, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(ASSETS / part, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(ASSETS / part, local_files_only=True)
    assert 1_000_000 < sum(p.numel() for p in model.parameters()) < 20_000_000
    assert model.config.model_type == "llama" and len(tok) == model.config.vocab_size
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]


def test_tokenizer_is_lossless_on_every_corpus():
    from optimer_lib.checkpoints.models import load_tokenizer

    tok = load_tokenizer(ASSETS / "base")
    assert set(embedded_corpora()) >= {"en", "ja", "zh", "math", "code"}
    for name in embedded_corpora():
        for doc in load_corpus(name, "dev", limit=100):
            assert tok.decode(tok(doc, add_special_tokens=False)["input_ids"]) == doc, name


def test_splits_are_disjoint_and_sized():
    for name in embedded_corpora():
        splits = {s: load_corpus(name, s) for s in SPLITS}
        seen: dict[str, str] = {}
        for split, docs in splits.items():
            for d in docs:
                assert seen.setdefault(d, split) == split, f"{name}: a document is in {seen[d]} and {split}"
        assert len(splits["dev"]) >= 300 and len(splits["test"]) >= 300
        assert sum(map(len, splits["train"])) >= 1_000_000


@pytest.mark.slow  # ~30 s of real CPT per distribution on 2 cores: make test-slow (CI runs it)
@pytest.mark.parametrize("name", ["ja", "zh", "math", "code"])
def test_short_cpt_clearly_improves_the_base(name, tmp_path):
    """The base knows a little of each distribution; a short CPT run must clearly beat it on dev."""
    from optimer_lib.checkpoints.models import load_model, load_tokenizer
    from optimer_lib.scoring.evaluate import mean_token_loss
    from optimer_lib.training.train import TrainConfig, train_model

    tok = load_tokenizer(ASSETS / "base")
    model = load_model(ASSETS / "base")
    dev = load_corpus(name, "dev", limit=64)
    before = mean_token_loss(model, tok, dev)
    blocks = {name: pack_tokens(load_corpus(name, "train", limit=1500), tok, 128)}
    cfg = TrainConfig(tokens=40 * 16 * 128, lr=1e-3, warmup=0.25, device="cpu", checkpoint_every=0)
    train_model(model, tok, blocks, {name: 1.0}, tmp_path / "cpt", cfg, progress=False)
    after = mean_token_loss(model, tok, dev)
    assert after < before - 0.1, (name, before, after)


def test_assets_dir_can_be_overridden(monkeypatch, tmp_path):
    monkeypatch.setenv("OPTIMER_ASSETS", str(tmp_path))
    assert assets_dir() == Path(tmp_path) and embedded_corpora() == []
    assert os.environ["OPTIMER_ASSETS"] == str(tmp_path)
