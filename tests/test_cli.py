"""The ``optimer`` command on tiny random models: in this process (``optimer`` fixture), plus real processes.

Most commands run through ``optimer_lib.cli.main`` (a cold start costs ~3 s of imports each); the last
tests start the command as a user does (``python -m optimer_lib.cli``) to cover the entry point and its
exit status.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import card_weights, vector_info_tables
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

OPTIMER = [sys.executable, "-m", "optimer_lib.cli"]


def run_process(*args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPTIMER_DEBUG": ""}
    return subprocess.run([*OPTIMER, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    p = tmp_path / "notes.txt"
    p.write_text("\n\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(60)))
    return p


def both(base: Path, a: Path, b: Path, out: Path) -> Path:
    """A checkpoint changed by both ``a``'s and ``b``'s change from ``base``: its vector has a cosine with
    ``b``'s that is neither 0 nor 1, so a wrong cosine table cannot match it by chance."""
    model = AutoModelForCausalLM.from_pretrained(a)
    theta, other = (AutoModelForCausalLM.from_pretrained(d).state_dict() for d in (base, b))
    with torch.no_grad():
        for key, value in model.state_dict().items():
            value.add_(other[key] - theta[key])
    model.save_pretrained(out)
    return out


def norm(a: Path) -> float:
    """L2 norm of a vector file over all its tensors, in float64."""
    return float(torch.cat([t.double().flatten() for t in load_file(a).values()]).norm())


def cosine(a: Path, b: Path) -> float:
    """Cosine of two vector files over all their tensors, computed here in float64 (not by the library)."""
    ta, tb = load_file(a), load_file(b)
    assert sorted(ta) == sorted(tb)
    x = torch.cat([ta[k].double().flatten() for k in sorted(ta)])
    y = torch.cat([tb[k].double().flatten() for k in sorted(ta)])
    return float(x @ y / (x.norm() * y.norm()))


def test_train_extract_info_merge_search(tmp_path, tiny_pool, corpus, optimer):
    base, (t0, t1) = tiny_pool("llama", 2)
    out = tmp_path / "cpt"
    r = optimer("train", "--base", base, "--data", corpus, "--out", out, "--tokens", 4 * 4 * 16, "--batch-size", 4,
                "--seq-len", 16, "--lr", "0.01", "--device", "cpu")
    assert "saved" in r.stdout and (out / "model.safetensors").exists()
    v0, v1 = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    optimer("vector", "extract", "--base", base, "--tuned", out, "--out", v0, "--name", "notes")
    optimer("vector", "extract", "--base", base, "--tuned", both(base, t1, out, tmp_path / "other"), "--out", v1,
            "--name", "other")
    norms, table = vector_info_tables(optimer("vector", "info", v0, v1).stdout)
    expected = cosine(v0, v1)
    assert 0.1 < expected < 0.95, expected  # a value a wrong table (identity, all ones) cannot print
    assert table["notes"] == pytest.approx([1.0, expected], abs=1e-4)
    assert table["other"] == pytest.approx([expected, 1.0], abs=1e-4)
    assert norms["notes"] == pytest.approx(norm(v0), abs=1e-4) and norms["other"] == pytest.approx(norm(v1), abs=1e-4)

    merged = tmp_path / "merged"
    optimer("merge", "--base", base, "--vector", f"{v0}=0.5", "--vector", f"{v1}=0.25", "--out", merged)
    recipe = yaml.safe_load((merged / "mergekit.yaml").read_text())
    assert recipe["merge_method"] == "task_arithmetic"
    assert sorted(m["parameters"]["weight"] for m in recipe["models"]) == [0.25, 0.5]
    assert card_weights((merged / "README.md").read_text()) == {"notes": 0.5, "other": 0.25}
    got = AutoModelForCausalLM.from_pretrained(merged).state_dict()
    theta, tau0, tau1 = AutoModelForCausalLM.from_pretrained(base).state_dict(), load_file(v0), load_file(v1)
    for key, value in tau0.items():
        torch.testing.assert_close(got[key], theta[key] + 0.5 * value + 0.25 * tau1[key])
    r = optimer("merge", "--base", base, "--vector", f"{v0}=0.5", "--out", merged, ok=False)
    assert r.returncode == 2 and "--force" in r.stderr

    wd = tmp_path / "search"
    r = optimer("search", "--base", base, "--vector", v0, "--vector", v1, "--eval", f"notes={corpus}",
                "--objective", "loss:notes", "--trials", 4, "--search-limit", 5, "--rescore-limit", 10, "--top-k", 2,
                "--workdir", wd, "--sampler", "random")
    best = json.loads((wd / "best.json").read_text())
    assert set(best["weights"]) == {"notes", "other"}
    assert json.loads(r.stdout)["objective"] == pytest.approx(best["objective"])


@pytest.mark.parametrize("args, message", [
    (["train", "--base", "{base}", "--data", "klingon", "--out", "{tmp}/x"], "unknown corpus 'klingon'"),
    (["train", "--base", "{tmp}/nope", "--data", "{corpus}", "--out", "{tmp}/x"], "does not exist"),
    (["merge", "--base", "{base}", "--vector", "a=b=c", "--out", "{tmp}/m"], "--vector"),
    (["merge", "--base", "{base}", "--vector", "{tmp}/missing.safetensors=0.3", "--out", "{tmp}/m"], "missing"),
    (["search", "--base", "{base}", "--vector", "{tmp}/v.safetensors", "--eval", "notes={corpus}",
      "--objective", "loss:klingon"], "klingon"),
    (["search", "--base", "{base}", "--vector", "{tmp}/v.safetensors", "--eval", "notes={corpus}",
      "--objective", "loss:notes", "--sampler", "anneal"], "tpe"),
    (["vector", "info", "{corpus}"], "corrupt"),
])
def test_user_mistakes_give_one_line_errors(tmp_path, tiny_pool, corpus, args, message, optimer):
    from optimer_lib.checkpoints.vectors import extract_vector, save_vector

    base, (t0,) = tiny_pool("llama", 1)
    save_vector(extract_vector(base, t0, name="v"), tmp_path / "v.safetensors")
    fmt = {"base": base, "tmp": tmp_path, "corpus": corpus}
    r = optimer(*[a.format(**fmt) for a in args], ok=False)
    assert r.returncode == 2, r.stderr
    _, sep, said = r.stderr.partition("error: ")
    assert sep and "Traceback" not in r.stderr, r.stderr
    assert message in said, r.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "m").exists()  # nothing written


def test_the_command_as_a_process(tmp_path, tiny_pool, corpus):
    """The real entry point: output on stdout and exit 0; a mistake is one line on stderr and exit 2."""
    from optimer_lib.checkpoints.vectors import extract_vector, save_vector

    base, (t0, t1) = tiny_pool("llama", 2)
    v0 = save_vector(extract_vector(base, t0, name="v0"), tmp_path / "v0.safetensors")
    v1 = save_vector(extract_vector(base, both(base, t0, t1, tmp_path / "both"), name="v1"),
                     tmp_path / "v1.safetensors")
    r = run_process("vector", "info", v0, v1)
    assert r.returncode == 0, r.stderr[-3000:]
    expected = cosine(v0, v1)
    assert 0.1 < expected < 0.95 and vector_info_tables(r.stdout)[1]["v0"] == pytest.approx([1.0, expected], abs=1e-4)
    r = run_process("vector", "info", corpus)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1 and "corrupt" in r.stderr


INTERRUPTING_OBJECTIVE = """
import pathlib

CALLS = pathlib.Path(__file__).with_name("calls")

def score(model, tokenizer):
    n = len(CALLS.read_text()) if CALLS.exists() else 0
    CALLS.write_text("x" * (n + 1))
    if n == 2:
        raise KeyboardInterrupt  # Ctrl-C during the third trial
    return float(sum(p.detach().float().abs().sum() for p in model.parameters()))


def other(model, tokenizer):  # a second objective for a Pareto search
    return float(sum(p.detach().float().pow(2).sum() for p in model.parameters()))
"""


@pytest.mark.parametrize("pareto", [False, True])
def test_ctrl_c_keeps_the_best_finished_trial(tmp_path, tiny_pool, optimer, pareto):
    """Ctrl-C during a trial: the finished trials' best (a Pareto search: its front) goes to its file, the JSON on
    stdout says it was interrupted, and the command exits 130 saying how to go on, as any Ctrl-C does."""
    from optimer_lib.checkpoints.vectors import extract_vector, save_vector

    base, (t0,) = tiny_pool("llama", 1)
    v = save_vector(extract_vector(base, t0, name="v"), tmp_path / "v.safetensors")
    (tmp_path / "obj.py").write_text(INTERRUPTING_OBJECTIVE)
    wd, score = tmp_path / "search", f"{tmp_path / 'obj.py'}:score"
    objective = ["--objectives", score, f"{tmp_path / 'obj.py'}:other"] if pareto else ["--objective", score]
    r = optimer("search", "--base", base, "--vector", v, *objective, "--trials", 5, "--workdir", wd,
                "--sampler", "random", ok=False)
    assert r.returncode == 130 and "re-run the same command to continue" in r.stderr, r.stderr
    out = json.loads(r.stdout)
    assert out["interrupted"] is True
    if pareto:
        assert len(json.loads((wd / "pareto.json").read_text())["front"]) >= 1
        return
    assert "interrupted after 2 new trial(s)" in r.stderr
    best = json.loads((wd / "best.json").read_text())
    assert best["interrupted"] is True and best["weights"] == out["best_weights"]
