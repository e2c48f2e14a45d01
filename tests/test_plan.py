"""Capacity planning (``optimer plan``): sizes from headers, what fits, re-merge times, the refusal, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import require
from safetensors.torch import load_file

from optimer_lib.data import assets_dir
from optimer_lib.engine import machine as machinemod
from optimer_lib.engine.machine import GB, GiB, Machine
from optimer_lib.engine.plan import (
    HYPOTHETICAL_MACHINES,
    RUNTIME_BYTES,
    PlanError,
    hypothetical_plans,
    hypothetical_pool,
    make_plan,
    markdown_table,
    plan_pool,
    pool_size,
)
from optimer_lib.errors import OptimerError

OPTIMER = [sys.executable, "-m", "optimer_lib.cli"]
BASE = assets_dir() / "base"


def run_process(*args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPTIMER_DEBUG": ""}
    return subprocess.run([*OPTIMER, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


def llama_parameters(cfg: dict) -> int:
    """Parameters of a Llama config by hand: embedding (tied: once), per layer attention + MLP + 2 norms, final norm."""
    h, i, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
    lm_head = 0 if cfg["tie_word_embeddings"] else cfg["vocab_size"] * h
    return cfg["vocab_size"] * h + cfg["num_hidden_layers"] * layer + h + lm_head


def work(vocab: int, leases: int = 1, rows: int = 16, item: int = 4, copies: int = 1) -> int:
    """Runtime + per lease scoring at once: ``copies`` of the logits of ``rows`` sequences of 128 tokens (``item``
    bytes each) and one sequence's fp32 log-softmax, plus its fp32 copy when the logits are not fp32."""
    return RUNTIME_BYTES + leases * (copies * rows * item + (1 if item == 4 else 2) * 4) * 128 * vocab


def test_sizes_of_the_embedded_base_equal_the_hand_count():
    cfg = json.loads((BASE / "config.json").read_text())
    n = llama_parameters(cfg)
    assert n == 3_344_064  # 8192*192 + 4*(4*192*192 + 3*192*512 + 2*192) + 192
    size = pool_size(BASE)
    assert (size.parameters, size.base_stored_bytes, size.vocab_size) == (n, 4 * n, 8192)
    for dtype, item in (("float32", 4), ("bfloat16", 2), ("float16", 2)):
        plan = make_plan(size, Machine("m", "cpu", 10 * GB, bandwidth=10 * GB), dtype=dtype)
        assert (plan.base_bytes, plan.slot_bytes, plan.slots) == (item * n, item * n, 2)
        # 2 slots score at once, 16 rows a call: 16 × 4 + 4 bytes per token and vocab entry in fp32, 16 × 2 + 8 in bf16
        assert plan.work_bytes == work(8192, leases=2, item=item) == {4: 679_477_248, 2: 620_756_992}[item]
        assert plan.need_bytes == 3 * item * n + work(8192, leases=2, item=item)
        assert plan.slots_fit == (10 * GB - item * n - work(8192, leases=2, item=item)) // (item * n)
        assert plan.fits and plan.vectors_resident and not plan.base_on_host


def test_vector_bytes_and_remerge_times_by_hand(tiny_vectors):
    base, files = tiny_vectors(("v0", "v1"))
    stored = [sum(t.numel() * t.element_size() for t in load_file(f).values()) for f in files]
    p = plan_pool(base, files, device="cpu", dtype="float32", bandwidth=10 * GB, host_bytes=8 * GB)
    assert (p.vectors, p.vector_bytes) == (2, sum(stored))
    model = p.base_bytes
    # incremental: the changed vector once, the slot read and written once
    assert p.seconds_per_vector == pytest.approx((max(stored) + 2 * model) / (10 * GB))
    # full: base + every vector read, slot written
    assert p.seconds_full_merge == pytest.approx((model + sum(stored) + model) / (10 * GB))
    assert p.seconds_per_change == p.seconds_per_vector  # fp32 slots are updated incrementally
    bf16 = plan_pool(base, files, device="cpu", dtype="bfloat16", bandwidth=10 * GB, host_bytes=8 * GB)
    assert bf16.base_bytes * 2 == model and bf16.seconds_per_change == bf16.seconds_full_merge
    assert "fits" in p.table() and json.loads(json.dumps(p.to_dict()))["need_bytes"] == p.need_bytes


@pytest.mark.parametrize("name, machine, dtype, slots_fit, base_on_host, fits", [
    ("135M", "24 GiB CPU", "float32", 45, False, True),
    ("1.7B", "24 GiB CPU", "float32", 2, False, True),     # (24 GiB - 6.8 GB - 0.84 GB) // 6.8 GB
    ("1.7B", "24 GiB CPU", "bfloat16", 6, False, True),
    ("7B", "24 GiB CPU", "float32", 0, False, False),
    ("7B", "24 GiB CPU", "bfloat16", 0, False, False),
    ("7B", "80 GiB GPU", "float32", 2, False, True),
    ("7B", "80 GiB GPU", "bfloat16", 5, False, True),       # (80 GiB - 14 GB - 0.68 GB) // 14 GB
    ("27B", "80 GiB GPU", "bfloat16", 1, True, True),       # 54 GB base + 54 GB slot > 80 GiB: base on the host
    ("27B", "80 GiB GPU", "float32", 0, True, False),
])
def test_hypothetical_sizes_give_the_right_slot_counts(name, machine, dtype, slots_fit, base_on_host, fits):
    plans = {(p.pool, p.machine, p.dtype): p for p in hypothetical_plans()}
    assert len(plans) == 16
    p = plans[(name, machine, dtype)]
    assert (p.slots_fit, p.base_on_host, p.fits) == (slots_fit, base_on_host, fits)
    params = {"135M": 135e6, "1.7B": 1.7e9, "7B": 7e9, "27B": 27e9}[name]
    assert p.slot_bytes == int(params) * (4 if dtype == "float32" else 2)


def test_27b_bf16_on_an_80_gib_gpu_by_hand():
    p = next(p for p in hypothetical_plans() if (p.pool, p.machine, p.dtype) == ("27B", "80 GiB GPU", "bfloat16"))
    w = work(262_144, rows=2, item=2)  # two sequences of a 262k vocabulary in bf16 fill the 128 MiB chunk
    assert p.need_bytes == 54_000_000_000 + w  # one slot on the device, the base memory-mapped on the host
    assert p.slots_fit == (80 * GiB - w) // 54_000_000_000 == 1
    assert not p.vectors_resident  # 2 x 54 GB cannot sit beside the slot: streamed from host memory
    assert p.vectors_pinned  # 108 GB of page-locked copies <= 0.75 x 192 GiB of host memory
    # full re-merge: the base over PCIe from the page cache (12 GB/s), both vectors from pinned memory (24 GB/s),
    # the slot written on the device
    assert p.seconds_full_merge == pytest.approx(54e9 / 12e9 + 108e9 / 24e9 + 54e9 / 1500e9)
    table = markdown_table([p])
    assert "host (mmap)" in table and "pinned host" in table and "9.0 s" in table
    # without pinned memory (a machine whose pinned bandwidth is unknown) the vectors stream as they are: 13.5 s
    pageable = dataclasses.replace(HYPOTHETICAL_MACHINES[1], pinned_to_device=None)
    q = make_plan(hypothetical_pool(27e9, vectors=2, itemsize=2, vocab_size=262_144, name="27B"), pageable,
                  dtype="bfloat16")
    assert not q.vectors_pinned
    assert q.seconds_full_merge == pytest.approx(54e9 / 12e9 + 108e9 / 12e9 + 54e9 / 1500e9)
    assert "streamed from host" in markdown_table([q]) and "13.5 s" in markdown_table([q])
    assert "pinned in host memory" in p.table() and "24.0 GB/s pinned" in p.table()
    assert "streamed from host memory" in q.table() and "pinned" not in q.table()


def test_a_model_that_transforms_its_logits_after_the_head_is_planned_with_a_batchs_logits(tmp_path):
    """The scorer holds a chunk of sequences' logits (scoring.row_logits) unless the model transforms them after the
    head (Gemma 2's soft-capping...): then the whole batch's, and the plan counts them."""
    base = tmp_path / "base"
    base.mkdir()
    for f in BASE.iterdir():
        if f.is_file():
            (base / f.name).symlink_to(f)
    (base / "config.json").unlink()
    cfg = json.loads((BASE / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "final_logit_softcapping": 30.0}))
    plain, capped = pool_size(BASE), pool_size(base)
    assert plain.head_split and not capped.head_split
    machine = Machine("m", "cpu", 10 * GB, bandwidth=10 * GB)
    assert make_plan(capped, machine, dtype="float32").work_bytes == work(8192, leases=2, rows=16, copies=2)
    assert make_plan(plain, machine, dtype="float32").work_bytes == work(8192, leases=2, rows=16)  # 32 fit a call
    smol = hypothetical_pool(135e6, vocab_size=49_152)  # 5 sequences' logits per call
    assert make_plan(smol, machine, dtype="float32").work_bytes == work(49_152, leases=2, rows=5)
    capped_smol = dataclasses.replace(smol, head_split=False)
    assert make_plan(capped_smol, machine, dtype="float32").work_bytes == work(49_152, leases=2, rows=16, copies=2)


def test_refusal_names_sizes_and_fixes():
    size = pool_size(BASE)
    n = size.parameters
    machine = Machine("small", "cpu", 600_000_000, bandwidth=10 * GB)
    p = make_plan(size, machine, dtype="float32", slots=2)
    assert not p.fits and p.slots_fit == 0
    with pytest.raises(PlanError) as err:
        p.check()
    msg = str(err.value)
    assert msg == ("the base (13 MB) plus 2 slots (27 MB) and 679 MB of working memory need 720 MB but this machine "
                   "has 600 MB free: use --dtype bfloat16, --slots 1, or a larger machine")
    assert p.need_bytes == 3 * 4 * n + work(8192, leases=2)
    assert "\n" not in msg
    # bf16 and one slot: no fix left but a larger machine
    one = make_plan(size, Machine("smaller", "cpu", 590_000_000, bandwidth=10 * GB), dtype="bfloat16", slots=1)
    assert one.need_bytes == 2 * 2 * n + work(8192, item=2)
    assert str(one.problems[0]).endswith("need 592 MB but this machine has 590 MB free: use a larger machine")
    gpu = make_plan(size, Machine("gpu", "cuda:0", 64 * GB, 100_000_000, 1000 * GB, 12 * GB), dtype="bfloat16")
    assert gpu.problems[0].endswith("use --device cpu or a GPU with more memory (the engine runs on one GPU: it "
                                    "does not split a model across several)")


def test_injected_host_memory_reaches_the_plan(tiny_vectors):
    base, files = tiny_vectors(("v0",))
    with pytest.raises(PlanError, match="but this machine has 100 MB free"):
        plan_pool(base, files, device="cpu", host_bytes=100_000_000, bandwidth=GB).check()


def test_host_memory_without_psutil(monkeypatch):
    with_psutil = machinemod.available_host_memory()
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil -> ImportError: /proc/meminfo is read
    without = machinemod.available_host_memory()
    assert without > 0 and abs(without - with_psutil) < 0.2 * with_psutil  # both are MemAvailable, moments apart


def test_measured_bandwidth_is_plausible():
    bw = machinemod.measure_bandwidth("cpu", seconds=0.02, mib=16)
    assert math.isfinite(bw) and 0.1 * GB < bw < 10_000 * GB


def test_unknown_device_and_missing_cuda_are_one_line_errors():
    with pytest.raises(OptimerError, match="unknown dtype"):
        machinemod.resolve_compute("cpu", "int8")
    if not torch.cuda.is_available():
        with pytest.raises(machinemod.ConfigError, match="no CUDA device is visible"):
            machinemod.resolve_compute("cuda", None)


def test_plan_command_as_a_process():
    """The real entry point: the plan on stdout and exit 0; a bad flag is one line on stderr and exit 2."""
    r = run_process("plan", "--base", BASE, "--device", "cpu", "--bandwidth", "10", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert (got["parameters"], got["base_bytes"], got["slots"], got["fits"]) == (3_344_064, 13_376_256, 2, True)
    assert got["bandwidth"] == 10 * GB and got["need_bytes"] == 3 * 13_376_256 + work(8192, leases=2)
    r = run_process("plan", "--base", BASE, "--dtype", "int8")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "unknown dtype 'int8'" in r.stderr and r.stdout == ""


def test_plan_command_sizes_table_and_bad_flags(optimer):
    r = optimer("plan", "--sizes")
    assert r.stdout.count("\n| ") == 16  # one row per (model, machine, dtype)
    assert "| 27B | 80 GiB GPU | bfloat16 | 54.0 GB | 54.0 GB | 1 (1) | host (mmap) |" in r.stdout
    assert len(json.loads(optimer("plan", "--sizes", "--json").stdout)) == 16
    table = optimer("plan", "--base", BASE, "--device", "cpu", "--bandwidth", "10", "--dtype", "bf16").stdout
    assert "3.3M parameters" in table and "cpu (this machine), bfloat16" in table and "verdict         fits" in table
    for bad, said in ((["--slots", "0"], "--slots must be at least 1"), (["--bandwidth", "-1"], "--bandwidth must"),
                      (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--dtype", "x"], "CUDA"
                       if not torch.cuda.is_available() else "unknown dtype")):
        r = optimer("plan", "--base", BASE, "--device", "cpu", *bad, ok=False)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
        assert said in r.stderr, r.stderr
    r = optimer("plan", ok=False)
    assert r.returncode == 2 and "--base DIR" in r.stderr


def test_workbench_refuses_a_pool_that_cannot_fit(tmp_path, tiny_vectors, monkeypatch, capsys):
    require("gradio")
    from optimer_lib.cli import main
    from workbench import app

    base, files = tiny_vectors(("v0", "v1"))
    (tmp_path / "wb").mkdir()
    (tmp_path / "wb" / "workbench.json").write_text(json.dumps({"base": str(base), "vectors": [str(f) for f in files]}))
    launched = []
    monkeypatch.setattr(app, "launch", lambda workdir, **kw: launched.append(kw))
    monkeypatch.setattr(machinemod, "available_host_memory", lambda: 50_000_000)
    assert main(["workbench", "--workdir", str(tmp_path / "wb")]) == 2
    err = capsys.readouterr().err
    assert not launched and err.startswith("error: the base (") and "this machine has 50 MB free" in err
    monkeypatch.setattr(machinemod, "available_host_memory", lambda: 8 * GiB)
    assert main(["workbench", "--workdir", str(tmp_path / "wb"), "--dtype", "bfloat16"]) == 0
    assert launched and launched[-1]["dtype"] == "bfloat16" and launched[-1]["device"] == "cpu"


def test_workbench_without_a_pool_starts(tmp_path, monkeypatch):
    require("gradio")
    from optimer_lib.cli import main
    from workbench import app

    monkeypatch.setattr(app, "launch", lambda workdir, **kw: None)
    monkeypatch.setattr(machinemod, "available_host_memory", lambda: 1)  # nothing to plan: the Pool tab builds one
    assert main(["workbench", "--workdir", str(Path(tmp_path) / "empty")]) == 0
