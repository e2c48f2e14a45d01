"""bench/vs_llamacpp.py without llama.cpp: its helpers, and one exported file run end to end against a stand-in.

The stand-in plays the llama-cpp-python venv's interpreter: called like it with bench/_llamacpp_worker.py, a
request and an output folder, it re-imports the GGUF file with ``import_gguf`` and answers with torch on those
weights (logits, greedy continuations, tokenisation by the re-imported tokenizer), so the request, the files it
writes, the comparison and the verdict are all exercised. ``STANDIN_BREAK=logits`` makes it lie: 7 added to one
vocabulary column. The real llama.cpp run is the bench.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_model
from helpers import require

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS.parent / "bench"))

import vs_llamacpp as vl  # noqa: E402

require("gguf", "pip install gguf")

STAND_IN = f"""#!{sys.executable}
import json, os, sys
from pathlib import Path
import numpy as np, torch
from optimer_lib.checkpoints.gguf_import import import_gguf
from optimer_lib.checkpoints.models import load_model, load_tokenizer
req, out = json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[3])
broken = os.environ.get("STANDIN_BREAK") == "logits"
import_gguf(req["model"], out / "hf")
model, tok = load_model(out / "hf").eval(), load_tokenizer(out / "hf")
with torch.no_grad():
    for i, ids in enumerate(req["sequences"]):
        logits = model(torch.tensor([ids])).logits[0].numpy()
        if broken:
            logits[:, 3] += 7.0
        np.save(out / f"logits_{{i}}.npy", logits)
    gen = []
    for ids in req["prompts"]:
        seq = list(ids)
        for _ in range(req["new_tokens"]):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        gen.append(seq[len(ids):])
toks = []
for text in req["texts"]:
    plain = tok(text, add_special_tokens=False)["input_ids"]
    toks.append({{"plain": plain, "default": tok(text)["input_ids"], "detok": tok.decode(plain)}})
(out / "result.json").write_text(json.dumps({{"llama_cpp": "stand-in", "n_vocab": model.config.vocab_size,
                                              "generated": gen, "tokenized": toks}}))
"""


def test_compare_logits_merge_stats_and_first_difference():
    ref = np.array([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]], dtype=np.float32)
    got = np.array([[0.0, 2.0, 2.5], [3.0, 0.5, 0.0]], dtype=np.float32)
    r = vl.compare_logits(ref, got)
    assert r == {"max_abs": 1.5, "mean_abs": pytest.approx(2.0 / 6), "argmax_same": 1, "positions": 2,
                 "ref_abs_max": 3.0}
    m = vl.merge_stats([r, vl.compare_logits(ref[:1], ref[:1])])
    assert (m["max_abs"], m["argmax_same"], m["positions"]) == (1.5, 2, 3)
    assert m["mean_abs"] == pytest.approx((2.0 / 6 * 2 + 0.0) / 3)
    with pytest.raises(ValueError, match="shape"):
        vl.compare_logits(ref, got[:1])
    assert [vl.first_difference([1, 2, 3], [1, 2, 3]), vl.first_difference([1, 2, 3], [1, 5, 3]),
            vl.first_difference([1, 2], [1, 2, 3])] == [None, 1, 2]


def _row(dtype, max_abs, same=10, equal=5, plain=6, mean_abs=None):
    logits = {"max_abs": max_abs, "mean_abs": max_abs / 10 if mean_abs is None else mean_abs, "argmax_same": same,
              "positions": 10}
    exact = {"max_abs": 0.0, "mean_abs": 0.0, "argmax_same": 10, "positions": 10}
    return {"dtype": dtype, "logits_vs_merge": logits, "logits_vs_file": exact,
            "greedy_vs_merge": {"prompts": 5, "equal": equal}, "greedy_vs_file": {"prompts": 5, "equal": 5},
            "tokenizer": {"texts": 6, "plain_same": plain, "default_same": 6}}


def test_verdict_rules():
    assert vl.verdict(_row("f32", 1e-5), 1e-3, 0.97) == []
    assert vl.verdict(_row("f32", 2e-3), 1e-3, 0.97) == ["max |Δlogit| 0.002 > 0.001"]
    assert vl.verdict(_row("f32", float("nan")), 1e-3, 0.97) == ["max |Δlogit| nan > 0.001"]
    assert vl.verdict(_row("f32", 1e-5, same=9, equal=4), 1e-3, 0.97) == [
        "argmax agrees at 9/10 positions", "greedy text differs on 1/5 prompts"]
    # f16/q8_0: the mean against the merge is judged (a large max passes; the file's own weights, here matched
    # exactly, do not count: the importer misreads a bad layout as llama.cpp does), 9 of 10 passes at min_agree 0.9,
    # greedy differences are reported, not failed (near ties)
    assert vl.verdict(_row("q8_0", 2.0, same=9, equal=3, mean_abs=0.2), 0.5, 0.9) == []
    assert vl.verdict(_row("q8_0", 2.0, same=8, mean_abs=0.6), 0.5, 0.9) == [
        "mean |Δlogit| 0.6 > 0.5", "argmax agrees at 8/10 positions"]
    assert vl.verdict(_row("q8_0", 0.1, plain=5), 0.5, 0.9) == ["tokenizer: 5/6 strings alike (6 with specials)"]


@pytest.fixture(scope="module")
def case_inputs(tiny_tokenizer):
    model = make_model("llama")  # 2 query heads, 1 key-value head: the grouped k permutation
    seqs, prompts = vl.inputs(tiny_tokenizer, 24)
    return model, seqs, prompts


def _stand_in(tmp_path: Path) -> Path:
    fake = tmp_path / "python"
    fake.write_text(STAND_IN)
    fake.chmod(0o755)
    return fake


def _run(model, tok, seqs, prompts, dtype, tmp_path):
    return vl.run_case("tiny llama", model, tok, dtype, seqs=seqs, prompts=prompts, new_tokens=6,
                       llama_python=_stand_in(tmp_path), tmp=tmp_path / "w", tol=vl.TOLERANCES[dtype], min_agree=0.97)


# ~9 s each: the broken-file variant runs with the slow tests (make test-slow; CI runs it)
@pytest.mark.parametrize("broken", ["", pytest.param("logits", marks=pytest.mark.slow)])
def test_one_file_end_to_end_with_a_llamacpp_stand_in(broken, case_inputs, tiny_tokenizer, tmp_path, monkeypatch):
    model, seqs, prompts = case_inputs
    monkeypatch.setenv("STANDIN_BREAK", broken)
    row = _run(model, tiny_tokenizer, seqs, prompts, "f32", tmp_path)
    assert [len(s) for s in seqs] == [24] * 5 and row["tensors"] == 2 * 9 + 2
    logits, tok = row["logits_vs_merge"], row["tokenizer"]
    assert logits["positions"] == 5 * 24 and tok["texts"] == len(vl.TEXTS)
    if broken:
        assert logits["max_abs"] == pytest.approx(7.0, abs=1e-4)
        assert logits["argmax_same"] < logits["positions"] / 2  # +7 on token 3 makes it the argmax nearly everywhere
        assert row["problems"][:2] == ["max |Δlogit| 7 > 0.001",
                                       f"argmax agrees at {logits['argmax_same']}/{5 * 24} positions"]
        assert not row["ok"] and vl.table_row(row).endswith(f"| FAIL: {'; '.join(row['problems'])} |")
    else:  # the stand-in runs the re-imported f32 weights: the same logits and the same greedy tokens
        assert logits["max_abs"] < 1e-5 and logits["argmax_same"] == logits["positions"]
        assert row["greedy_vs_merge"] == {"prompts": len(vl.PROMPTS), "equal": len(vl.PROMPTS),
                                          "first_difference": [None] * len(vl.PROMPTS)}
        assert tok["plain_same"] == tok["default_same"] == tok["detok_same"] == len(vl.TEXTS)
        assert row["ok"] and row["problems"] == [] and row["llama_cpp"] == "stand-in"
        assert "| tiny llama | f32 |" in vl.table_row(row) and vl.table_row(row).endswith("| ok |")


@pytest.mark.slow
def test_f16_file_is_judged_against_its_own_weights(case_inputs, tiny_tokenizer, tmp_path, monkeypatch):
    model, seqs, prompts = case_inputs
    monkeypatch.setenv("STANDIN_BREAK", "")
    row = _run(model, tiny_tokenizer, seqs, prompts, "f16", tmp_path)
    # the bench's re-import and the stand-in's are the same weights; the merge differs from them by f16 rounding
    assert row["logits_vs_file"]["max_abs"] < 1e-5 < row["logits_vs_merge"]["max_abs"] < 1e-2
    assert row["greedy_vs_file"]["equal"] == len(vl.PROMPTS) and row["ok"]


def test_tokenizer_check_counts_each_kind_of_difference(tiny_tokenizer):
    res = {"tokenized": []}
    for i, text in enumerate(vl.TEXTS):
        plain, default = tiny_tokenizer(text, add_special_tokens=False)["input_ids"], tiny_tokenizer(text)["input_ids"]
        res["tokenized"].append({"plain": plain[:-1] if i == 0 else plain, "detok": text if i != 2 else "x",
                                 "default": [1, *default] if i in (0, 1) else default})
    r = vl.tokenizer_check(tiny_tokenizer, res)
    n = len(vl.TEXTS)
    assert (r["texts"], r["plain_same"], r["default_same"], r["detok_same"]) == (n, n - 1, n - 2, n - 1)
    assert [d["text"] for d in r["differ"]] == list(vl.TEXTS[:2])
    with pytest.raises(ValueError):  # a worker that answered for fewer strings than asked
        vl.tokenizer_check(tiny_tokenizer, {"tokenized": res["tokenized"][:-1]})


def test_missing_llama_python_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["vs_llamacpp.py", "--llama-python", str(tmp_path / "nope" / "python")])
    with pytest.raises(SystemExit) as e:
        vl.main()
    assert str(e.value).startswith(f"error: --llama-python {tmp_path / 'nope' / 'python'} not found: make a venv")
