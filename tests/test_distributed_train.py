"""``optimer train`` under ``accelerate launch`` with 2 CPU processes (gloo): one run, one checkpoint.

    pytest -m slow tests/test_distributed_train.py      # ~20-30 s on 2 busy cores

accelerate's ``--cpu`` flag selects its single-process launcher (``--num_processes`` is then ignored),
so 2 CPU processes are launched with ``--multi_gpu`` (torchrun) and ``--device cpu``, which makes
optimer_lib.training.train build its Accelerator with ``cpu=True`` (gloo backend).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import free_port
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def test_two_process_cpu_training_writes_one_checkpoint(tmp_path: Path, tiny_pool):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.fail("accelerate is not installed: pip install accelerate (it is in the [test] extra)")
    base, _ = tiny_pool("llama", 0)
    corpus = tmp_path / "notes.txt"
    corpus.write_text("\n\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(60)))
    out = tmp_path / "cpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "optimer_lib.cli", "train",
         "--base", base, "--data", corpus, "--out", out, "--tokens", "512", "--batch-size", "4", "--seq-len", "16",
         "--lr", "0.01", "--device", "cpu"], capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((out / "training.json").read_text())
    assert info["processes"] == 2 and info["tokens_trained"] == 512  # global budget, split over 2 ranks
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "resume").exists() and not list(tmp_path.glob("cpt.*"))  # no temp or resume leftovers
    trained, start = load_file(out / "model.safetensors"), load_file(base / "model.safetensors")
    assert any(not torch.equal(trained[k], start[k]) for k in start)
