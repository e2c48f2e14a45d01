"""The ``optimer`` command, run as a user would (subprocess), on tiny random models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

OPTIMER = [sys.executable, "-m", "optimer_lib.cli"]


def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPTIMER_DEBUG": ""}
    r = subprocess.run([*OPTIMER, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)
    if ok:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    p = tmp_path / "notes.txt"
    p.write_text("\n\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(60)))
    return p


def test_train_extract_info_merge_search(tmp_path, tiny_pool, corpus):
    base, (t0, t1) = tiny_pool("llama", 2)
    out = tmp_path / "cpt"
    r = run("train", "--base", base, "--data", corpus, "--out", out, "--tokens", 4 * 4 * 16, "--batch-size", 4,
            "--seq-len", 16, "--lr", "0.01", "--device", "cpu")
    assert "saved" in r.stdout and (out / "model.safetensors").exists()
    v0, v1 = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    run("vector", "extract", "--base", base, "--tuned", out, "--out", v0, "--name", "notes")
    run("vector", "extract", "--base", base, "--tuned", t1, "--out", v1, "--name", "other")
    info = run("vector", "info", v0, v1).stdout
    assert "notes" in info and "other" in info and "1.000" in info

    merged = tmp_path / "merged"
    run("merge", "--base", base, "--vector", f"{v0}=0.5", "--vector", f"{v1}=0.25", "--out", merged)
    recipe = yaml.safe_load((merged / "mergekit.yaml").read_text())
    assert recipe["merge_method"] == "task_arithmetic"
    assert sorted(m["parameters"]["weight"] for m in recipe["models"]) == [0.25, 0.5]
    assert "0.5" in (merged / "README.md").read_text()
    r = run("merge", "--base", base, "--vector", f"{v0}=0.5", "--out", merged, ok=False)
    assert r.returncode == 2 and "--force" in r.stderr

    wd = tmp_path / "search"
    r = run("search", "--base", base, "--vector", v0, "--vector", v1, "--eval", f"notes={corpus}",
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
def test_user_mistakes_give_one_line_errors(tmp_path, tiny_pool, corpus, args, message):
    from optimer_lib.checkpoints.vectors import extract_vector, save_vector

    base, (t0,) = tiny_pool("llama", 1)
    save_vector(extract_vector(base, t0, name="v"), tmp_path / "v.safetensors")
    fmt = {"base": base, "tmp": tmp_path, "corpus": corpus}
    r = run(*[a.format(**fmt) for a in args], ok=False)
    assert r.returncode == 2, r.stderr
    _, sep, said = r.stderr.partition("error: ")
    assert sep and "Traceback" not in r.stderr, r.stderr
    assert message in said, r.stderr
