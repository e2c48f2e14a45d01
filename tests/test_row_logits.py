"""Scoring's LM head on chunks of sequences (row_logits): the same losses, never a batch's logits alive, and the full
forward kept for models that transform their logits after the head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import ARCHS, make_model
from transformers import LlamaForCausalLM

from optimer_lib.scoring import row_logits as rl
from optimer_lib.scoring.evaluate import scored_documents, text_scores


@pytest.fixture(autouse=True)
def fresh_probes(monkeypatch):
    """Every test probes its own models (the cache is per process)."""
    monkeypatch.setattr(rl, "_SPLIT_OK", {})


DOCS = ["the quick brown fox jumps over the lazy dog and the fox again", "12 + 35 = 47",
        "def f(x):\n    return x", "日本語のテキスト", "the dog"]


class Scaled(LlamaForCausalLM):
    """Logits scaled after the head, as Cohere's ``logit_scale`` does (Gemma's soft-capping is another such)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = 8.0 * out.logits
        return out


def scaled() -> Scaled:
    base = make_model("llama_untied")
    model = Scaled(base.config).eval()
    model.load_state_dict(base.state_dict())
    return model


def own_forward_sums(model, tok, seq_len: int = 32) -> list[float]:
    """Each document's summed NLL from the model's own forward, one unpadded document at a time."""
    sums = []
    with torch.inference_mode():
        for ids in scored_documents(model, tok, DOCS, seq_len, None):
            x = torch.tensor([ids])
            logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, :-1]
            sums.append(float(F.cross_entropy(logits.float(), x[0, 1:], reduction="sum")))
    return sorted(sums)


def head_call_rows(model, tok) -> list[int]:
    """Sequences per LM-head call while scoring DOCS in batches of 4."""
    rows: list[int] = []
    hook = model.get_output_embeddings().register_forward_hook(lambda _m, _i, out: rows.append(out.shape[0]))
    try:
        text_scores(model, tok, DOCS, seq_len=32, batch_size=4)
    finally:
        hook.remove()
    return rows


def test_sequences_per_head_call_fill_the_chunk_budget():
    assert rl.HEAD_CHUNK_BYTES == 128 * 2**20
    assert rl.chunk_rows(128, 49_152) == 5          # SmolLM2: 25 MB of fp32 logits per sequence
    assert rl.chunk_rows(128, 262_144, 2) == 2      # a 262k vocabulary in bf16: 67 MB per sequence
    assert rl.chunk_rows(4096, 262_144) == 1        # never fewer than one


@pytest.mark.parametrize("arch", ARCHS)
def test_the_head_runs_on_chunks_of_sequences_and_the_losses_match_the_models_forward(arch, tiny_tokenizer,
                                                                                       monkeypatch):
    model = make_model(arch)
    assert rl.splits(model)
    assert head_call_rows(model, tiny_tokenizer) == [4, 1]  # the tiny vocabulary: a whole batch per call
    one_row = 32 * 320 * 4  # at most one sequence's fp32 logits per call
    monkeypatch.setattr(rl, "HEAD_CHUNK_BYTES", one_row)
    assert head_call_rows(model, tiny_tokenizer) == [1, 1, 1, 1, 1]  # batches of 4 and 1, never a batch's logits
    got = text_scores(model, tiny_tokenizer, DOCS, seq_len=32, batch_size=4).total
    assert sorted(got) == pytest.approx(own_forward_sums(model, tiny_tokenizer), rel=1e-5)
    monkeypatch.setattr(rl, "HEAD_CHUNK_BYTES", 3 * one_row)
    assert head_call_rows(model, tiny_tokenizer) == [3, 1, 1]
    assert text_scores(model, tiny_tokenizer, DOCS, seq_len=32, batch_size=4).total == pytest.approx(got)


def test_a_model_that_transforms_its_logits_after_the_head_keeps_the_full_forward(tiny_tokenizer):
    model = scaled()
    assert not rl.splits(model)
    assert head_call_rows(model, tiny_tokenizer) == [4, 1]  # one full forward per batch
    got = text_scores(model, tiny_tokenizer, DOCS, seq_len=32, batch_size=4).total
    want = own_forward_sums(model, tiny_tokenizer)
    assert sorted(got) == pytest.approx(want, rel=1e-5)
    plain = text_scores(make_model("llama_untied"), tiny_tokenizer, DOCS, seq_len=32, batch_size=4).total
    assert sorted(plain) != pytest.approx(want, rel=1e-3)  # the scale matters: the split would have scored wrong


def test_a_config_that_names_a_transform_after_the_head_keeps_the_full_forward():
    """Soft-capping moves small logits too little for a short probe to see, so the config is read as well."""
    model = make_model("llama_untied")
    model.config.final_logit_softcapping = 30.0  # the forward ignores it: only the config says so
    assert not rl.splits(model)
    model.config.final_logit_softcapping = None
    assert rl.splits(model)


def test_the_probe_is_cached_per_dtype_and_a_failed_probe_is_not_a_crash(monkeypatch):
    model = make_model("llama_untied")
    calls: list[torch.dtype] = []
    real = rl._probe
    monkeypatch.setattr(rl, "_probe", lambda m, *a: calls.append(a[-1].dtype) or real(m, *a))
    assert rl.splits(model) and rl.splits(model) and calls == [torch.float32]  # once per class and config
    assert rl.splits(model.to(torch.bfloat16)) and calls == [torch.float32, torch.bfloat16]  # same config, new dtype
    broken = make_model("llama_untied", seed=1)
    broken.config.hidden_act = "no-such-activation"  # the forward raises: the split is refused, nothing crashes
    monkeypatch.setattr(broken.base_model, "forward", lambda *a, **k: (_ for _ in ()).throw(ValueError("boom")))
    assert not rl.splits(broken)


def test_a_model_without_a_decoder_and_head_keeps_the_full_forward():
    class Bare(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            raise AssertionError("not called")

    assert not rl.splits(Bare())


@pytest.mark.parametrize("make", [lambda: make_model("llama"), scaled], ids=["split", "full forward"])
def test_scoring_keeps_no_key_value_cache(make, tiny_tokenizer):
    """Scoring never generates: a cache would only hold every layer's keys and values of the batch."""
    model = make()
    seen: list[object] = []
    hook = model.base_model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw.get("use_cache")),
                                                      with_kwargs=True)
    try:
        text_scores(model, tiny_tokenizer, DOCS, seq_len=32, batch_size=4)
    finally:
        hook.remove()
    assert seen and set(seen) == {False}


def test_a_bf16_model_splits_and_scores_as_its_full_forward(tiny_tokenizer, monkeypatch):
    """The probe's bf16 tolerance accepts a bf16 model, and the split scores it as the full forward does."""
    model = make_model("llama_untied").to(torch.bfloat16)
    assert rl.splits(model)
    got = text_scores(model, tiny_tokenizer, DOCS, seq_len=32, batch_size=4).total
    monkeypatch.setattr(rl, "splits", lambda _model: False)
    assert text_scores(model, tiny_tokenizer, DOCS, seq_len=32, batch_size=4).total == pytest.approx(got, rel=1e-3)
