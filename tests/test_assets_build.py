"""The asset builder end to end on synthetic sources (hermetic, seconds), and its atomicity."""

from __future__ import annotations

import random

import pytest

from optimer_lib.assets import build as build_mod
from optimer_lib.assets.mathgen import format_problem, generate_problems
from optimer_lib.assets.sources import Distribution, Source


def _fake_distributions():
    rng = random.Random(0)
    words = {"en": ["the", "fox", "runs", "over", "a", "hill", "and", "sees", "water"],
             "ja": ["日本", "の", "テキスト", "です", "ファイル", "を", "表示"],
             "zh": ["中文", "文本", "的", "是", "我们", "这个", "文件"],
             "code": ["def", "f(x):", "return", "x", "+", "1", "\n   "]}

    def reader(ws):
        return lambda: [" ".join(rng.choice(ws) for _ in range(40)) + f" {i}" for i in range(300)]

    d = {k: Distribution(k, k, (Source(k, "generated", "test", reader(v)),)) for k, v in words.items()}
    d["math"] = Distribution("math", "math", (Source("m", "generated", "test",
                                                     lambda: [format_problem(*p) for p in generate_problems(400, 1)]),))
    return d


@pytest.fixture
def fake_sources(monkeypatch):
    monkeypatch.setattr(build_mod, "DISTRIBUTIONS", _fake_distributions())


def test_quick_build_produces_loadable_assets(tmp_path, fake_sources):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = build_mod.build(tmp_path / "assets", build_mod.BuildConfig.quick())
    for part in ("base", "instruct"):
        model = AutoModelForCausalLM.from_pretrained(out / part, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(out / part, local_files_only=True)
        assert model.config.tie_word_embeddings and model.config.vocab_size == len(tok)
    text = "日本のテキスト 中文文本 def f(x): return x + 1"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|assistant|>\n") and "<|user|>" in chat
    assert not list(tmp_path.glob("*.build-tmp"))
    assert {p.name for p in (out / "corpora").iterdir()} == {"en", "ja", "zh", "math", "code"}


def test_interrupted_build_leaves_previous_assets_untouched(tmp_path, fake_sources, monkeypatch):
    out = tmp_path / "assets"
    out.mkdir()
    (out / "base").mkdir()
    (out / "base" / "marker").write_text("old")

    def boom(*a, **k):
        raise RuntimeError("simulated crash during base training")

    monkeypatch.setattr("optimer_lib.training.train.train_model", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_mod.build(out, build_mod.BuildConfig.quick())
    assert (out / "base" / "marker").read_text() == "old"
    assert sorted(p.name for p in out.iterdir()) == ["base"]
