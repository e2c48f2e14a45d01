"""Write ``<out>/README.md`` from ``build_info.json`` plus measurements of the built models.

    python -m optimer_lib.assets readme --out assets
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

_INTRO = """# Embedded tiny world

Everything here is built by `python -m optimer_lib.assets build --out assets` (see `optimer_lib/assets/`)
from offline sources, deterministically (fixed seeds), and is what the demo, the tests and the
workbench use by default. It ships as package data: the wheel installs this folder as the package
`optimer_assets` (`optimer_assets.path()`). Rebuild with `make assets`;
`python -m optimer_lib.assets readme --out assets` rewrites this page. Set `OPTIMER_ASSETS=/other/dir`
to use another tree of the same layout.

- `corpora/<name>/{base,train,dev,test}.jsonl.xz` — one `{"text": ...}` per line; disjoint
  splits: `base` was used to pretrain the base model, `train` is for CPT, `dev` for search,
  `test` for final numbers only.
- `base/` — Llama-architecture base model + byte-level BPE tokenizer (Hugging Face format).
- `instruct/` — the base after a short instruction tuning on synthetic chats (chat template in
  the tokenizer config); `instruct − base` is the instruction vector.
"""


def _tokens(tokenizer, docs: list[str]) -> int:
    return sum(len(x) for x in tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"])


def write_readme(out: Path) -> Path:
    from optimer_lib.checkpoints.models import load_model, load_tokenizer
    from optimer_lib.data import read_jsonl
    from optimer_lib.scoring.evaluate import mean_token_loss

    out = Path(out)
    info = json.loads((out / "build_info.json").read_text())
    tok = load_tokenizer(out / "base")
    base = load_model(out / "base")
    inst = load_model(out / "instruct")
    cfg = info["config"]
    rows, src_rows, roundtrip = [], [], {}
    with torch.inference_mode():
        for name, c in info["corpora"].items():
            splits = {s: read_jsonl(out / "corpora" / name / f"{s}.jsonl.xz") for s in ("base", "train", "dev", "test")}
            toks = {s: _tokens(tok, d) for s, d in splits.items()}
            roundtrip[name] = all(tok.decode(tok(d, add_special_tokens=False)["input_ids"]) == d
                                  for d in splits["dev"])
            loss_b = mean_token_loss(base, tok, splits["dev"], seq_len=cfg["seq_len"])
            loss_i = mean_token_loss(inst, tok, splits["dev"], seq_len=cfg["seq_len"])
            chars = c["chars"]
            rows.append(f"| {name} | {c['docs']['train']:,} / {chars['train']:,} / {toks['train']:,} "
                        f"| {c['docs']['dev']} / {toks['dev']:,} | {c['docs']['test']} / {toks['test']:,} "
                        f"| {c['docs']['base']:,} / {toks['base']:,} | {chars['train'] / max(1, toks['train']):.2f} "
                        f"| {math.exp(loss_b):.1f} | {math.exp(loss_i):.1f} |")
            for s in c["sources"]:
                src_rows.append(f"| {name} | {s['name']} ({s['kind']}) | {s['version']} | {s['licence']} "
                                f"| {s['note']} |")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and "__pycache__" not in f.parts)
    b, i = info["base"], info["instruct"]
    text = "\n".join([
        _INTRO,
        "## Corpora",
        "",
        "Sizes as documents / characters / tokens (our tokenizer). Perplexity: first 128 tokens of each dev "
        "document, token-weighted.",
        "",
        "| distribution | train docs / chars / tokens | dev docs / tokens | test docs / tokens "
        "| base-split docs / tokens | chars per token | base dev ppl | instruct dev ppl |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "## Sources",
        "",
        "| distribution | source | version | licence | note |",
        "|---|---|---|---|---|",
        *src_rows,
        "",
        "Cleaning: roff, HTML and ANSI codes stripped; whitespace normalised; exact duplicates removed "
        "(per corpus, before splitting); documents chunked at paragraph boundaries to at most 400–800 "
        "characters. Math problems come from `optimer_lib/assets/mathgen.py` (seeded).",
        "",
        "## Tokenizer",
        "",
        f"Byte-level BPE (HF `tokenizers`), {len(tok):,} tokens incl. specials {tok.all_special_tokens}, "
        "trained on the base and train splits of every corpus. Lossless round-trip on every dev document: "
        + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in roundtrip.items()) + ".",
        "",
        "## Models",
        "",
        f"- Architecture: Llama, hidden {cfg['hidden']}, {cfg['layers']} layers, {cfg['heads']} heads, MLP "
        f"{cfg['intermediate']}, tied embeddings, context {cfg['seq_len']} in training; "
        f"{info['parameters']:,} parameters (fp32, safetensors).",
        f"- Base: {b['tokens']:,} tokens from the `base` splits with mixture {b['mix']}, AdamW lr {b['lr']} "
        f"(cosine to 10%, 2% warm-up), batch 16×{cfg['seq_len']}; final training loss {b['final_loss']:.3f}; "
        f"{b['seconds'] / 60:.1f} min.",
        f"- Instruct: {i['tokens']:,} tokens of {i['conversations']:,} synthetic chats "
        f"(`optimer_lib/assets/instruct.py`), lr {i['lr']}; final loss {i['final_loss']:.3f}; "
        f"{i['seconds'] / 60:.1f} min.",
        "",
        f"Build: {info['seconds_total'] / 60:.1f} min on this project's 2-core CPU machine, torch {info['torch']}. "
        f"Total size of `assets/`: {size / 2**20:.1f} MiB.",
        "",
    ])
    path = out / "README.md"
    path.write_text(text)
    return path
