"""Shared fixtures: tiny random models of several architectures, built on the fly (no downloads),
and ``optimer``, the command run in this process. Plain helpers are in ``helpers.py``; the strict-skip
policy of CI (``OPTIMER_STRICT_SKIPS=1``) is the plugin ``skip_policy.py``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread: tiny test models gain nothing from more, and it keeps parallel jobs from thrashing.
torch.set_num_threads(1)

ARCHS = ("llama", "gpt2", "llama_untied")
pytest_plugins = ("pytester", "skip_policy")
# pytest-timeout: the default per-test limit is pyproject's `timeout`; a slow test without its own
# @pytest.mark.timeout gets this (real CPT, notebooks, the wheel install, PostgreSQL workers on a busy machine).
SLOW_TIMEOUT_S = 1800


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))


def make_tokenizer():
    """A tiny byte-level BPE tokenizer trained in memory, with bos/eos/pad and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["the quick brown fox jumps over the lazy dog", "12 + 35 = 47", "def f(x):\n    return x",
              "日本語のテキスト", "中文文本"] * 20
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                          "{% if add_generation_prompt %}<s>assistant: {% endif %}")
    return fast


def make_model(arch: str = "llama", vocab_size: int = 320, seed: int = 0):
    """A randomly initialised causal LM with a few thousand parameters."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=16, n_layer=2, n_head=2,
                         bos_token_id=1, eos_token_id=2)
        return GPT2LMHeadModel(cfg).eval()
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=(arch == "llama"), bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def perturbed(model, scale: float, seed: int):
    """A copy of ``model`` with every float parameter shifted by seeded Gaussian noise (a fake CPT)."""
    import copy

    new = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return new


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny_pool(tmp_path: Path, tiny_tokenizer):
    """Factory: ``tiny_pool(arch, n)`` saves a base and ``n`` perturbed 'CPT' models as HF dirs.

    Returns ``(base_dir, [tuned_dir, ...])``.
    """

    def build(arch: str = "llama", n: int = 2) -> tuple[Path, list[Path]]:
        base = make_model(arch)
        base_dir = tmp_path / f"{arch}-base"
        base.save_pretrained(base_dir)
        tiny_tokenizer.save_pretrained(base_dir)
        tuned = []
        for i in range(n):
            d = tmp_path / f"{arch}-tuned{i}"
            perturbed(base, 0.02, seed=100 + i).save_pretrained(d)
            tiny_tokenizer.save_pretrained(d)
            tuned.append(d)
        return base_dir, tuned

    return build


@pytest.fixture
def tiny_vectors(tmp_path: Path, tiny_pool):
    """Factory: ``tiny_vectors(names=("v0", "v1"), arch="llama")`` saves one vector file per name, each from
    a perturbed ``tiny_pool`` model, as ``tmp_path/NAME.safetensors``. Returns ``(base_dir, [vector file, ...])``.
    """
    from optimer_lib.checkpoints.vectors import extract_vector, save_vector

    def build(names=("v0", "v1"), arch: str = "llama") -> tuple[Path, list[Path]]:
        base, tuned = tiny_pool(arch, len(names))
        return base, [save_vector(extract_vector(base, t, name=n), tmp_path / f"{n}.safetensors")
                      for n, t in zip(names, tuned, strict=True)]

    return build


@dataclass
class CliResult:
    """What one ``optimer`` command did: exit status and what it printed."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def optimer(capsys, monkeypatch):
    """``optimer(*args, ok=True)``: run ``optimer ARGS`` in this process (``optimer_lib.cli.main``), no cold start.

    Returns a :class:`CliResult`; ``ok=True`` asserts exit 0, ``ok=False`` a non-zero exit, ``ok=None``
    nothing. A usage error from argparse (``SystemExit``) counts as its exit status, as in a real process.
    A few tests still start real processes (``sys.executable -m optimer_lib.cli``) to cover the entry point.
    """
    from optimer_lib.cli import main

    monkeypatch.delenv("OPTIMER_DEBUG", raising=False)

    def run(*args: object, ok: bool | None = True) -> CliResult:
        capsys.readouterr()
        try:
            rc = main([str(a) for a in args])
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        sys.stdout.flush()
        out = capsys.readouterr()
        res = CliResult(rc, out.out, out.err)
        if ok is not None:
            assert (rc == 0) == ok, f"optimer {' '.join(map(str, args))} exited {rc}: {res.stderr[-3000:]}"
        return res

    return run
