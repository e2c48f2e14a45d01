"""Rebuild the embedded world: corpora, tokenizer, base model, instruction-tuned model.

    python -m optimer_lib.assets build --out assets                # full rebuild (~25 min on 2 CPU cores)
    python -m optimer_lib.assets build --out /tmp/world --quick    # tiny sizes, for testing the builder itself
    python -m optimer_lib.assets readme --out assets               # re-measure and rewrite assets/README.md

``--out assets`` (what ``make assets`` passes) is the checkout's folder that ships as the ``optimer_assets``
package; any other folder is used through ``OPTIMER_ASSETS=DIR``.

Deterministic (fixed seeds). Everything is built in ``<out>.build-tmp/`` and moved into place
only when complete, so an interrupted build never leaves half-written assets.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from optimer_lib.assets.instruct import instruction_conversations
from optimer_lib.assets.sources import DISTRIBUTIONS
from optimer_lib.data import pack_tokens, read_jsonl, write_jsonl_xz

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass
class BuildConfig:
    """Sizes and seeds of the embedded world. ``quick()`` gives a seconds-long version for tests."""

    seed: int = 0
    dev_docs: int = 400
    test_docs: int = 400
    train_chars: int = 1_500_000          # CPT split per distribution
    base_chars: dict | None = None        # base-pretraining split per distribution
    vocab_size: int = 8192
    hidden: int = 192
    layers: int = 4
    heads: int = 6
    intermediate: int = 512
    seq_len: int = 128
    base_tokens: int = 3_000_000
    base_lr: float = 3e-3
    base_mix: dict | None = None          # share of each distribution in base pretraining
    instruct_convs: int = 4000
    instruct_tokens: int = 300_000
    instruct_lr: float = 5e-4

    def __post_init__(self) -> None:
        self.base_chars = self.base_chars or {"en": 6_000_000, "ja": 500_000, "zh": 500_000,
                                              "math": 400_000, "code": 500_000}
        self.base_mix = self.base_mix or {"en": 0.7, "ja": 0.075, "zh": 0.075, "math": 0.075, "code": 0.075}

    @classmethod
    def quick(cls) -> BuildConfig:
        return cls(dev_docs=20, test_docs=20, train_chars=20_000, base_chars=dict.fromkeys(DISTRIBUTIONS, 20_000),
                   vocab_size=600, hidden=32, layers=2, heads=2, intermediate=64, base_tokens=20_000,
                   instruct_convs=50, instruct_tokens=8_000)


def split_corpus(docs: list[str], cfg: BuildConfig, name: str) -> dict[str, list[str]]:
    """Shuffle (seeded) and cut into disjoint test/dev/train/base splits by document count and size."""
    docs = list(docs)
    random.Random(f"{cfg.seed}-{name}").shuffle(docs)
    splits = {"test": docs[: cfg.test_docs], "dev": docs[cfg.test_docs: cfg.test_docs + cfg.dev_docs]}
    rest = docs[cfg.test_docs + cfg.dev_docs:]
    for split, budget in (("train", cfg.train_chars), ("base", cfg.base_chars[name])):
        take, size = 0, 0
        while take < len(rest) and size < budget:
            size += len(rest[take])
            take += 1
        splits[split], rest = rest[:take], rest[take:]
    return splits


def build_corpora(out: Path, cfg: BuildConfig) -> dict:
    stats = {}
    for name, dist in tqdm(DISTRIBUTIONS.items(), desc="corpora", unit="corpus"):
        splits = split_corpus(dist.collect(), cfg, name)
        for split, docs in splits.items():
            write_jsonl_xz(docs, out / "corpora" / name / f"{split}.jsonl.xz")
        stats[name] = {
            "description": dist.description,
            "sources": [{"name": s.name, "kind": s.kind, "version": s.version(), "licence": s.licence,
                         "note": s.note} for s in dist.sources],
            "docs": {k: len(v) for k, v in splits.items()},
            "chars": {k: sum(map(len, v)) for k, v in splits.items()},
        }
    return stats


def build_tokenizer(out: Path, cfg: BuildConfig):
    """Byte-level BPE (lossless on any UTF-8) trained on the base and train splits of every corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def texts():
        for name in DISTRIBUTIONS:
            for split in ("base", "train"):
                yield from read_jsonl(out / "corpora" / name / f"{split}.jsonl.xz")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=True,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=SPECIAL_TOKENS[3:])
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 512
    return fast


def new_base_model(tokenizer, cfg: BuildConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                         max_position_embeddings=512, tie_word_embeddings=True, rope_theta=10000.0,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def build(out: Path, cfg: BuildConfig) -> Path:
    """Run every stage into a temp dir, then swap it into ``out`` (keeping ``out/README.md`` fresh)."""
    from optimer_lib.training.train import TrainConfig, train_model

    t0 = time.perf_counter()
    tmp = out.with_name(out.name + ".build-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    info: dict = {"config": asdict(cfg), "torch": torch.__version__}
    info["corpora"] = build_corpora(tmp, cfg)
    info["seconds_corpora"] = time.perf_counter() - t0

    tokenizer = build_tokenizer(tmp, cfg)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    base = new_base_model(tokenizer, cfg)
    info["parameters"] = sum(p.numel() for p in base.parameters())
    blocks = {n: pack_tokens(read_jsonl(tmp / "corpora" / n / "base.jsonl.xz"), tokenizer, cfg.seq_len)
              for n in cfg.base_mix}
    tcfg = TrainConfig(tokens=cfg.base_tokens, lr=cfg.base_lr, seq_len=cfg.seq_len, batch_size=16,
                       warmup=0.02, seed=cfg.seed, device="cpu", checkpoint_every=500)
    res = train_model(base, tokenizer, blocks, cfg.base_mix, tmp / "base", tcfg, meta={"stage": "base"})
    info["base"] = {"tokens": res.tokens, "final_loss": res.final_loss, "seconds": res.seconds,
                    "mix": cfg.base_mix, "lr": cfg.base_lr}

    corpora = {n: read_jsonl(tmp / "corpora" / n / "base.jsonl.xz") for n in DISTRIBUTIONS}
    convs = instruction_conversations(cfg.instruct_convs, seed=cfg.seed, corpora=corpora)
    chats = [tokenizer.apply_chat_template(c, tokenize=False) for c in convs]
    iblocks = {"instruct": pack_tokens(chats, tokenizer, cfg.seq_len)}
    icfg = TrainConfig(tokens=cfg.instruct_tokens, lr=cfg.instruct_lr, seq_len=cfg.seq_len, batch_size=16,
                       seed=cfg.seed, device="cpu", checkpoint_every=0)
    res = train_model(base, tokenizer, iblocks, {"instruct": 1.0}, tmp / "instruct", icfg,
                      meta={"stage": "instruct", "base": "../base"})
    info["instruct"] = {"tokens": res.tokens, "final_loss": res.final_loss, "seconds": res.seconds,
                        "conversations": len(convs), "lr": cfg.instruct_lr}
    info["seconds_total"] = time.perf_counter() - t0
    (tmp / "build_info.json").write_text(json.dumps(info, indent=2, ensure_ascii=False))

    out.mkdir(parents=True, exist_ok=True)
    for part in ("corpora", "base", "instruct", "build_info.json"):
        target = out / part
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        (tmp / part).rename(target)
    shutil.rmtree(tmp, ignore_errors=True)
    return out
