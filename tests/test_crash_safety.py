"""Crashes lose nothing: ``kill -9`` of a search, and writes interrupted half-way.

- A search killed with SIGKILL keeps every finished trial (each is committed to its SQLite study when
  told); re-running the same command resumes and ends with exactly ``--trials`` counted trials.
- A trial whose objective raises is recorded FAILED and the search goes on: here across a kill, and in
  process in ``tests/test_search.py::test_failing_trial_is_recorded_and_search_continues``.
- A writer interrupted half-way (vector, best.json, trained model) never leaves a loadable-but-wrong
  file under the final name. Exports: ``tests/test_export.py::test_failed_export_leaves_previous_intact``.
- Two processes asking for one stage result compute it once (the second waits, then reads it), and the lock of
  a process that died is taken over.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from conftest import make_model, make_tokenizer, perturbed
from optuna.trial import TrialState

from optimer_lib.checkpoints.vectors import extract_vector, load_vector, save_vector

ROOT = Path(__file__).resolve().parent.parent
TRIALS = 12

OBJECTIVE = '''
import time

CALLS = 0


def score(model, tokenizer):
    """Slow enough to be killed mid-search; every 4th call of a process fails."""
    global CALLS
    CALLS += 1
    time.sleep(0.3)
    if CALLS % 4 == 0:
        raise RuntimeError("objective failed on purpose")
    return float(sum(p.double().sum() for p in model.parameters()))
'''


def _finished(storage: str) -> dict[int, tuple[str, float | None, dict]]:
    """Counted trials: number -> (state, value, params) of COMPLETE and FAILED ones, except trials failed
    as ``interrupted`` (what a killed worker left running); {} while the study does not exist."""
    for _ in range(20):
        try:
            study = optuna.load_study(study_name="optimer", storage=storage)
            return {t.number: (t.state.name, t.value, dict(t.params)) for t in study.get_trials(deepcopy=False)
                    if t.state in (TrialState.COMPLETE, TrialState.FAIL) and not t.user_attrs.get("interrupted")}
        except KeyError:
            return {}
        except Exception:  # the writer holds the SQLite lock this instant
            time.sleep(0.1)
    raise AssertionError("could not read the study")


@pytest.mark.slow  # ~20 s of subprocess searches (make test-slow; CI runs it)
def test_kill_9_loses_no_trial_and_rerun_resumes_to_n(tmp_path):
    tok, base = make_tokenizer(), make_model("llama")
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    vecs = []
    for i, name in enumerate(("a", "b")):
        vecs.append(save_vector(extract_vector(base, perturbed(base, 0.02, seed=i), name=name),
                                tmp_path / f"{name}.safetensors"))
    (tmp_path / "obj.py").write_text(OBJECTIVE)
    (tmp_path / "notes.txt").write_text("\n\n".join(f"the quick brown fox {i}" for i in range(10)))
    wd = tmp_path / "search"
    cmd = [sys.executable, "-m", "optimer_lib.cli", "search", "--base", tmp_path / "base", "--vector", vecs[0],
           "--vector", vecs[1], "--eval", f"notes={tmp_path / 'notes.txt'}", "--objective",
           f"{tmp_path / 'obj.py'}:score", "--trials", TRIALS, "--sampler", "tpe", "--top-k", "0",
           "--search-limit", "2", "--workdir", wd]
    cmd = [str(c) for c in cmd]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPTIMER_DEBUG": "", "PYTHONPATH": str(ROOT)}
    storage = f"sqlite:///{wd.resolve() / 'optuna.db'}"

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    deadline = time.monotonic() + 180
    seen: dict = {}
    while time.monotonic() < deadline and proc.poll() is None:
        if (wd / "optuna.db").exists():
            seen = _finished(storage)
            if sum(s == "COMPLETE" for s, _, _ in seen.values()) >= 3:
                break
        time.sleep(0.2)
    assert proc.poll() is None, f"the search ended before it could be killed: {proc.communicate()[1][-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    after_kill = _finished(storage)
    assert all(after_kill[n] == seen[n] for n in seen), "a finished trial was lost or changed by the kill"
    assert len(after_kill) < TRIALS
    assert not (wd / "best.json").exists()

    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    final = _finished(storage)
    assert len(final) == TRIALS, final  # exactly N counted trials: COMPLETE + FAILED
    assert all(final[n] == after_kill[n] for n in after_kill), "the resumed run changed finished trials"
    study = optuna.load_study(study_name="optimer", storage=storage)
    uncounted = [t for t in study.trials if t.state == TrialState.RUNNING or t.user_attrs.get("interrupted")]
    assert len(uncounted) <= 1  # at most the trial the kill interrupted, never counted
    failed = [t for t in study.trials if t.state == TrialState.FAIL and not t.user_attrs.get("interrupted")]
    assert failed and all(t.user_attrs["error"] == "RuntimeError: objective failed on purpose" for t in failed)
    best = json.loads((wd / "best.json").read_text())
    assert best["trials"] == TRIALS and set(best["weights"]) == {"a", "b"}
    assert json.loads(r.stdout)["best_json"] == str(wd / "best.json")


# -- writes interrupted half-way ------------------------------------------------------------------------------
def _vector(seed: int = 1):
    base = make_model("llama")
    return extract_vector(base, perturbed(base, 0.02, seed=seed), name="v")


def _half_writer(real):
    """A writer that puts half of the real bytes where it was asked to write, then fails (disk full)."""
    def write(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise OSError(28, "No space left on device")
    return write


def test_interrupted_vector_write_leaves_nothing_loadable(tmp_path, monkeypatch):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", _half_writer(safetensors.torch.save_file))
    with pytest.raises(OSError, match="No space"):
        save_vector(_vector(), tmp_path / "v.safetensors")
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary


def test_interrupted_vector_overwrite_keeps_the_old_one(tmp_path, monkeypatch):
    import safetensors.torch

    old = _vector(1)
    path = save_vector(old, tmp_path / "v.safetensors")
    monkeypatch.setattr(safetensors.torch, "save_file", _half_writer(safetensors.torch.save_file))
    with pytest.raises(OSError, match="No space"):
        save_vector(_vector(2), path, overwrite=True)
    kept = load_vector(path)
    assert all(torch.equal(kept.tensors[k], old.tensors[k]) for k in old.tensors)
    assert [p.name for p in tmp_path.iterdir()] == ["v.safetensors"]


def test_interrupted_best_json_keeps_the_old_one(tmp_path, monkeypatch):
    from optimer_lib import fileio

    path = fileio.atomic_write_json(tmp_path / "best.json", {"weights": {"a": 0.1}, "objective": 1.0})

    class HalfFile:
        """A file that takes the first 10 characters, then finds the disk full."""

        def __init__(self, fd, *a, **k):
            self.fh = open(fd, *a, **k)  # noqa: SIM115 - closed in __exit__

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, text):
            self.fh.write(text[:10])
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileio.os, "fdopen", HalfFile)
    with pytest.raises(OSError, match="No space"):
        fileio.atomic_write_json(path, {"weights": {"a": 0.9}, "objective": 0.5})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"weights": {"a": 0.1}, "objective": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["best.json"]


def test_interrupted_final_save_of_a_training_run_resumes(tmp_path, monkeypatch):
    """A crash while the finished model is saved leaves the resume point, never a half model with training.json."""
    from optimer_lib.data import pack_tokens
    from optimer_lib.training import train

    tok = make_tokenizer()
    blocks = {"a": pack_tokens(["the quick brown fox jumps over the lazy dog"] * 40, tok, 16)}
    cfg = train.TrainConfig(tokens=8 * 4 * 16, lr=1e-2, batch_size=4, seq_len=16, device="cpu", checkpoint_every=3)
    ref = make_model("llama")
    train.train_model(ref, tok, blocks, {"a": 1.0}, tmp_path / "ref", cfg, progress=False)

    class Crash(Exception):
        pass

    real = tok.save_pretrained

    def crash(path, *a, **k):  # the model is already in the temporary folder, the tokenizer fails
        real(path, *a, **k)
        raise Crash("killed while saving")

    monkeypatch.setattr(tok, "save_pretrained", crash)
    out = tmp_path / "run"
    with pytest.raises(Crash):
        train.train_model(make_model("llama"), tok, blocks, {"a": 1.0}, out, cfg, progress=False)
    assert (out / "resume" / "state.pt").exists() and not (out / "training.json").exists()
    assert not (out / "model.safetensors").exists()  # nothing loadable under the final name
    train.check_out_dir(out)  # `optimer train` continues such a run without --force
    monkeypatch.setattr(tok, "save_pretrained", real)
    resumed = make_model("llama", seed=5)
    train.train_model(resumed, tok, blocks, {"a": 1.0}, out, cfg, progress=False)
    for (n, p), q in zip(ref.named_parameters(), resumed.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), n
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref", "run"]  # the temporary folder is gone


def test_a_stage_asked_for_twice_at_once_is_made_once_and_the_other_waits(tmp_path):
    import threading

    from optimer_lib.experiments.run import Experiments
    from optimer_lib.fileio import read_or_make_json

    made, waited, release = [], [], threading.Event()

    def slow() -> dict:
        made.append(1)
        release.wait(10)
        return {"value": 42}

    first = threading.Thread(target=lambda: read_or_make_json(tmp_path / "stages" / "x.json", slow))
    first.start()
    lock = tmp_path / "stages" / "x.json.lock"
    deadline = time.monotonic() + 10
    while not lock.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lock.read_text().split()[1] == str(os.getpid())  # held, with who holds it
    second: list = []
    t = threading.Thread(target=lambda: second.append(read_or_make_json(
        tmp_path / "stages" / "x.json", slow, waiting=waited.append, poll_s=0.05)))
    t.start()
    time.sleep(0.3)
    host = __import__("socket").gethostname()
    assert not second and waited == [f"process {os.getpid()} on {host} (lock file {lock})"]
    release.set()
    first.join(10), t.join(20)
    assert second == [{"value": 42}] and len(made) == 1 and not lock.exists()  # made once, read by the other
    stub = type("Stub", (), {"wd": tmp_path, "_run_stage": staticmethod(Experiments._run_stage)})()
    assert Experiments.stage(stub, "x", slow) == {"value": 42} and len(made) == 1  # a finished stage is read


def test_the_lock_of_a_process_that_died_is_taken_over_whatever_pid_it_names(tmp_path):
    """The lock is the kernel's (flock): a killed holder releases it, even when its pid now names a live process (a
    restarted container's entrypoint gets the same pid, here this very process)."""
    import socket

    from optimer_lib.fileio import read_or_make_json

    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
                               "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(60)",
                               str(tmp_path / "stage.json.lock")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    waited: list = []
    done: list = []
    import threading
    t = threading.Thread(target=lambda: done.append(read_or_make_json(tmp_path / "stage.json", lambda: {"ok": 1},
                                                                      waiting=waited.append, poll_s=0.05)))
    t.start()
    time.sleep(0.5)
    assert not done and waited  # held by a live process: waits
    (tmp_path / "stage.json.lock").write_text(f"{socket.gethostname()} {os.getpid()}")  # names a live pid: ours
    holder.kill()  # then dies: the kernel frees its lock, whatever pid the file names
    holder.wait()
    t.join(30)
    assert done == [{"ok": 1}] and json.loads((tmp_path / "stage.json").read_text()) == {"ok": 1}
    assert not (tmp_path / "stage.json.lock").exists()
