"""Every file the project writes ends with the mode a plain ``open`` gives under the user's umask.

mkstemp/mkdtemp create private (0600/0700) temporaries and safetensors >= 0.8 writes its files 0600; renamed
into place as they are, a merged model would be unreadable to colleagues on a shared machine. Each test runs
under umask 0o027 (so the wanted modes, 0640 for files and 0750 for folders, differ from both the private
modes and the usual 0644/0755) and walks everything the command wrote.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from conftest import make_model, make_tokenizer

from optimer_lib.cli import main
from optimer_lib.fileio import atomic_write_json, atomic_write_text, current_umask, normal_permissions

UMASK = 0o027
FILE, FOLDER = 0o666 & ~UMASK, 0o777 & ~UMASK


@pytest.fixture
def umask():
    old = os.umask(UMASK)
    try:
        yield UMASK
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, str]:
    """Every path under ``root`` (itself included) whose mode differs from what ``open``/``mkdir`` give."""
    wrong = {}
    for p in [root, *root.rglob("*")]:
        st = p.lstat()
        want = FOLDER if stat.S_ISDIR(st.st_mode) else FILE
        if stat.S_IMODE(st.st_mode) != want:
            wrong[str(p.relative_to(root.parent))] = f"{stat.S_IMODE(st.st_mode):o} (want {want:o})"
    return wrong


@pytest.fixture
def pool_dirs(tmp_path, tiny_pool):
    base, tuned = tiny_pool("llama", 2)  # saved under the default umask: the commands must not copy modes
    return base, tuned


def test_umask_is_read_without_changing_it(umask):
    assert current_umask() == UMASK
    assert os.umask(UMASK) == UMASK  # still set: reading it did not disturb it


def test_json_and_text_writes(tmp_path, umask):
    for path in (atomic_write_json(tmp_path / "out" / "best.json", {"a": 1}),
                 atomic_write_text(tmp_path / "out" / "FINDINGS.md", "# findings\n")):
        assert stat.S_IMODE(path.stat().st_mode) == FILE, path
    assert modes(tmp_path / "out") == {}


@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streaming"])
def test_vector_save_and_merge_export(tmp_path, pool_dirs, umask, streaming):
    base, tuned = pool_dirs
    flag = "--streaming" if streaming else "--no-streaming"
    for i, d in enumerate(tuned):
        assert main(["vector", "extract", "--base", str(base), "--tuned", str(d), "--name", f"v{i}",
                     "--out", str(tmp_path / "vectors" / f"v{i}.safetensors"), flag]) == 0
    assert modes(tmp_path / "vectors") == {}
    assert main(["merge", "--base", str(base), "--vector", f"{tmp_path / 'vectors' / 'v0.safetensors'}=0.3",
                 "--vector", f"{tmp_path / 'vectors' / 'v1.safetensors'}=0.2",
                 "--out", str(tmp_path / "merged"), flag]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert modes(tmp_path / "merged") == {}
    # --force replaces it and the replacement is as readable
    assert main(["merge", "--base", str(base), "--vector", f"{tmp_path / 'vectors' / 'v0.safetensors'}=0.1",
                 "--out", str(tmp_path / "merged"), "--force", flag]) == 0
    assert modes(tmp_path / "merged") == {}


def test_sharded_streaming_vector_folder(tmp_path, pool_dirs, umask):
    base, tuned = pool_dirs
    out = tmp_path / "vec"
    assert main(["vector", "extract", "--base", str(base), "--tuned", str(tuned[0]), "--out", str(out),
                 "--streaming", "--shard-size", "4KB"]) == 0
    assert out.is_dir() and len(list(out.glob("*.safetensors"))) > 1
    assert modes(out) == {}


def test_gguf_import(tmp_path, umask):
    from test_gguf_import import write_llama_gguf

    from optimer_lib.checkpoints.gguf_import import import_gguf

    src = write_llama_gguf(tmp_path / "tiny.gguf", make_model("llama"), make_tokenizer())
    res = import_gguf(src, tmp_path / "imported")
    assert (res.path / "model.safetensors").is_file()
    assert modes(res.path) == {}


def test_training_output_and_resume_point(tmp_path, pool_dirs, umask):
    base, _ = pool_dirs
    text = tmp_path / "notes.txt"
    text.write_text("\n\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(200)))
    out = tmp_path / "cpt"
    assert main(["train", "--base", str(base), "--data", str(text), "--out", str(out), "--tokens", "2048",
                 "--batch-size", "4", "--seq-len", "16", "--device", "cpu", "--trajectory", "1"]) == 0
    assert (out / "model.safetensors").is_file() and (out / "training.json").is_file()
    assert modes(out) == {}


def test_resume_point_is_readable(tmp_path, umask):
    import torch

    from optimer_lib.training.train import TrainConfig, _save_resume

    model = make_model("llama")
    opt = torch.optim.AdamW(model.parameters())
    _save_resume(model, opt, torch.Generator(), TrainConfig(), {"x": 1.0}, 1, {"x": 1}, tmp_path / "run" / "resume")
    assert (tmp_path / "run" / "resume" / "model.safetensors").is_file()
    assert modes(tmp_path / "run") == {}


def test_normal_permissions_keeps_executables_and_skips_links(tmp_path):
    old = os.umask(0o002)
    try:
        d = tmp_path / "tree"
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "w").write_text("x")
        (d / "run.sh").write_text("#!/bin/sh\n")
        for p, m in ((d, 0o700), (d / "sub", 0o700), (d / "sub" / "w", 0o600), (d / "run.sh", 0o700)):
            os.chmod(p, m)
        target = tmp_path / "elsewhere"
        target.write_text("y")
        os.chmod(target, 0o600)
        (d / "link").symlink_to(target)
        normal_permissions(d)
    finally:
        os.umask(old)
    got = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (d, d / "sub", d / "sub" / "w", d / "run.sh")}
    assert got == {"tree": 0o775, "sub": 0o775, "w": 0o664, "run.sh": 0o775}
    assert stat.S_IMODE(target.stat().st_mode) == 0o600  # a link's target outside the tree is not touched
