"""The base kept memory-mapped on the host (issue 15): the mapped loader, slots built on a device tensor by tensor,
the engine's ``base_on`` (same merges as a device base, exact after many changes), what it saves in process memory
(measured in subprocesses from /proc/self/status), and the ``--base-on`` flag of the CLI."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_model, make_tokenizer, perturbed

from optimer_lib.checkpoints.mapped import copy_to, file_backed_bytes, load_model_mapped
from optimer_lib.checkpoints.models import load_model
from optimer_lib.checkpoints.vectors import extract_vector, load_vector, save_vector
from optimer_lib.engine import MergeEngine
from optimer_lib.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.tensor([[1, 5, 9, 42, 7, 3, 100, 2]])


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_the_mapped_loader_gives_load_models_logits_and_keeps_ties(tiny_pool):
    base_dir, _ = tiny_pool("llama", 0)
    ref = load_model(base_dir)
    model, info = load_model_mapped(base_dir)
    assert torch.equal(_logits(model), _logits(ref))  # fp32: bit for bit, rotary tables included
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq)
    params = sum(p.numel() * 4 for p in model.parameters())  # parameters() lists the tied tensor once
    assert info.mapped_bytes == params and info.note == "" and info.total_bytes > params  # + the rotary buffers
    converted, conv = load_model_mapped(base_dir, dtype="bfloat16")
    assert conv.mapped_bytes == 0 and "--dtype float32 keeps it mapped" in conv.note
    assert converted.dtype == torch.bfloat16


def test_copy_to_builds_a_tied_copy_tensor_by_tensor(tiny_pool):
    base_dir, _ = tiny_pool("llama", 0)
    base, _ = load_model_mapped(base_dir)
    slot = copy_to(base, "cpu")
    assert slot.lm_head.weight is slot.model.embed_tokens.weight  # one id in the memo: still one tensor
    assert torch.equal(_logits(slot), _logits(base))
    base_ptrs = {t.untyped_storage().data_ptr() for t in [*base.parameters(), *base.buffers()]}
    assert not base_ptrs & {t.untyped_storage().data_ptr() for t in [*slot.parameters(), *slot.buffers()]}
    with torch.no_grad():
        slot.model.embed_tokens.weight.add_(1.0)
    assert not torch.equal(_logits(slot), _logits(base))  # the copy is its own memory


def _engines(tiny_vectors, **kw) -> dict[str, MergeEngine]:
    base_dir, files = tiny_vectors(names=("v0", "v1", "v2"))
    vecs, inst = files[:-1], files[-1]
    return {mode: MergeEngine.open(base_dir, vecs, instruction=inst, base_on=mode, **kw) for mode in ("host", "device")}


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_host_base_engine_merges_bit_for_bit_as_a_device_base_engine(tiny_vectors):
    engines = _engines(tiny_vectors, max_slots=1)
    host = engines["host"]
    requests = [({"v0": 0.4}, 1.0, "optimer", {}), ({"v0": 0.4, "v1": -0.3}, 1.0, "optimer", {}),
                ({"v0": 0.7, "v1": -0.3}, 0.5, "optimer", {}), ({"v0": 0.4, "v1": 0.9}, 1.0, "ties", {"density": 0.5}),
                ({"v0": 0.4, "v1": 0.9}, 1.0, "dare", {"density": 0.5, "seed": 3}), ({"v1": 0.2}, 0.0, "optimer", {})]
    for weights, iw, method, params in requests:
        got = {}
        for mode, engine in engines.items():
            with engine.lease(weights, iw, method=method, params=params) as lease:
                got[mode] = _state(lease.model)
        assert got["host"].keys() == got["device"].keys()
        for k in got["host"]:
            assert torch.equal(got["host"][k], got["device"][k]), (method, k)
    st = host.stats()
    assert (st.base_on, engines["device"].stats().base_on) == ("host", "device")
    assert st.bytes_base_mapped == sum(p.numel() * 4 for p in host.base.parameters())  # every weight file-backed
    with host.lease({"v1": 0.1}) as lease:  # the slot is its own memory; the base is never written
        slot_ptrs = {p.untyped_storage().data_ptr() for p in lease.model.parameters()}
    assert not slot_ptrs & {p.untyped_storage().data_ptr() for p in host.base.parameters()}
    assert torch.equal(_logits(host.base), _logits(load_model(host.base.name_or_path)))


def test_a_host_base_engine_stays_exact_after_many_changes(tiny_vectors):
    engine = _engines(tiny_vectors, max_slots=2)["host"]
    rng, ws, worst = random.Random(7), {n: 0.0 for n in engine.names}, 0.0
    for i in range(300):
        for name in rng.sample(engine.names, rng.choice((1, 2))):
            ws[name] = rng.uniform(-1.0, 2.0)
        state = engine.state(ws, 1.0 if i % 5 else rng.uniform(0, 1.5))
        with engine.lease(state) as lease:
            if i % 30 == 29:
                exact = engine.exact(state)
                for k, v in lease.model.state_dict().items():
                    if v.is_floating_point() and k in exact:
                        ref = exact[k].float()
                        worst = max(worst, float((v - ref).abs().max() / ref.abs().max().clamp_min(1e-30)))
    assert engine.stats().merges == 300 and 0 < worst <= 1e-6, worst  # > 0: incremental updates did run


def test_a_wrong_base_on_is_a_config_error(tiny_vectors):
    base_dir, files = tiny_vectors(names=("v0", "v1"))
    model, vecs = load_model(base_dir), [load_vector(f) for f in files]
    with pytest.raises(ConfigError, match="base_on .* must be auto, host or device, got 'gpu'"):
        MergeEngine(model, None, vecs, base_on="gpu")
    with pytest.raises(ConfigError, match="got 'cuda'"):
        MergeEngine.open(base_dir, files, base_on="cuda")
    meta = load_model(base_dir).to("meta")  # a base that is on another device than the host is not copied back
    with pytest.raises(ConfigError, match="load it on the CPU"):
        MergeEngine(meta, None, vecs, base_on="host", device="cpu")
    assert MergeEngine(model, None, vecs).base_on == "device"  # CPU, automatic: the base stays where it is
    from optimer_lib.merging.pool import open_pool  # the search pool decides nothing itself: it says who does

    with pytest.raises(ConfigError, match="for the automatic choice, pass optimer_lib.engine.host_base.pool_base_on"):
        open_pool(base_dir, files, base_on=None)


def test_the_base_on_flag_reaches_the_search_the_workbench_and_the_plan(tmp_path, tiny_vectors, monkeypatch, optimer):
    from optimer_lib.merging import pool as poolmod

    base_dir, files = tiny_vectors(names=("v0", "v1"))
    corpus = tmp_path / "notes.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 8)
    opened = []
    real = poolmod.open_pool

    def spy(*args, **kw):
        pool = real(*args, **kw)
        opened.append((kw["base_on"], pool))
        return pool

    monkeypatch.setattr(poolmod, "open_pool", spy)
    r = optimer("search", "--base", base_dir, "--vector", files[0], "--vector", files[1], "--eval", f"notes={corpus}",
                "--objective", "loss:notes", "--trials", 2, "--search-limit", 2, "--workdir", tmp_path / "s",
                "--sampler", "random", "--base-on", "host")
    (mode, pool), = opened
    assert mode == "host" and json.loads(r.stdout)["objective"] > 0
    mapped, total = file_backed_bytes(t.base for t in pool.merger._targets)
    assert mapped == total > 0  # the merger reads the memory-mapped base (a device-mode pool clones it: 0 mapped)...
    assert file_backed_bytes(pool.model.parameters())[0] == 0  # ...and merges into a copy in process memory
    assert optimer("search", "--base", base_dir, "--vector", files[0], "--base-on", "gpu", ok=False).returncode == 2

    pytest.importorskip("gradio", reason="gradio is an optional dependency (pip install -e '.[workbench]')")
    from workbench import app
    from workbench.workspace import Workspace

    seen: dict = {}
    monkeypatch.setattr(app, "launch", lambda workdir, **kw: seen.update(kw))
    optimer("workbench", "--workdir", tmp_path / "wb", "--base-on", "host")
    assert seen["base_on"] == "host"
    ws = Workspace(tmp_path / "wb", base_on="host")
    ws.set_pool(base_dir, files, None)
    assert ws.pool().engine.base_on == "host" and ws.pool().engine.stats().bytes_base_mapped > 0

    plan = json.loads(optimer("plan", "--base", base_dir, "--vector", files[0], "--device", "cpu", "--bandwidth", 10,
                              "--base-on", "host", "--json").stdout)
    auto = json.loads(optimer("plan", "--base", base_dir, "--vector", files[0], "--device", "cpu", "--bandwidth", 10,
                              "--json").stdout)
    assert (plan["base_on_host"], auto["base_on_host"]) == (True, False)  # CPU, automatic: the engine's "device"
    assert plan["need_bytes"] == auto["need_bytes"] - auto["base_bytes"]


# ---- the automatic choice on a GPU, with torch.cuda's memory queries faked (no GPU needed) ----------------------
def _fake_gpu(monkeypatch, free: int, reserved: int = 0, allocated: int = 0) -> None:
    """A visible ``cuda:0`` whose driver reports ``free`` bytes and whose caching allocator holds ``reserved``
    bytes, ``allocated`` of them in use (only memory queries work: nothing may be put on it)."""
    for name, fn in {"is_available": lambda: True, "device_count": lambda: 1, "current_device": lambda: 0,
                     "mem_get_info": lambda device=None: (free, 80 * 2**30),
                     "memory_reserved": lambda device=None: reserved,
                     "memory_allocated": lambda device=None: allocated}.items():
        monkeypatch.setattr(torch.cuda, name, fn)


def test_automatic_base_on_is_the_plans_choice_and_counts_the_allocators_cache_as_free(tiny_vectors, monkeypatch):
    from optimer_lib.engine.host_base import pool_base_on
    from optimer_lib.engine.plan import plan_pool, pool_size, work_bytes

    base_dir, files = tiny_vectors(names=("v0", "v1"))
    size = pool_size(base_dir, files)
    need = size.parameters * 2 * 2 + work_bytes(size.vocab_size, itemsize=2)  # bf16 base + one slot + working memory

    def both(free: int, reserved: int = 0, allocated: int = 0) -> tuple[str, str]:
        _fake_gpu(monkeypatch, free, reserved, allocated)
        plan = plan_pool(base_dir, files, device="cuda:0", dtype="bfloat16", bandwidth=1e9, host_to_device=1e9,
                         pinned_to_device=1e9)
        return pool_base_on(None, base_dir, files, device="cuda", dtype="bfloat16"), \
            "host" if plan.base_on_host else "device"

    assert both(need) == ("device", "device")  # base + slot + work fit exactly
    assert both(need - 1) == ("host", "host")
    # 1 kB short by the driver's count, but torch holds 3 kB of freed blocks it will reuse: the base fits
    assert both(need - 1000, reserved=5000, allocated=2000) == ("device", "device")
    assert both(need - 1000, reserved=2000, allocated=2000) == ("host", "host")  # held and in use: it does not
    assert pool_base_on("device", base_dir, files, device="cuda") == "device"  # asked: no measuring


def test_a_bare_cuda_device_is_the_tensors_device_and_auto_dtype_is_the_gpus(tiny_vectors, monkeypatch):
    from optimer_lib.engine.host_base import place_base

    base_dir, files = tiny_vectors(names=("v0", "v1"))
    model = load_model(base_dir)
    _fake_gpu(monkeypatch, free=1000)  # far too small: the base stays on the host
    mode, dev, kept, slots = place_base(model, None, "cuda", None)
    # cuda:0, as the slots' tensors will be: a base already on cuda:0 compares equal to it and is not moved
    assert (mode, dev, kept, slots) == ("host", torch.device("cuda", 0), model, 1)
    # dtype "auto" for a GPU is bfloat16 even though the host base is loaded on the CPU (whose auto is float32)
    engine = MergeEngine.open(base_dir, files, device="cuda", dtype="auto", base_on="host", vectors_on="host")
    assert (engine.dtype, engine.device, next(engine.base.parameters()).device.type) == \
        (torch.bfloat16, torch.device("cuda", 0), "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA device is visible: use device='cpu'"):
        place_base(model, "host", "cuda", None)


# ---- process memory, measured in fresh processes -------------------------------------------------------------
PROBE = r"""
import json, sys, torch
from pathlib import Path
from optimer_lib.engine.heap import configure_heap
configure_heap("lean")  # freed blocks leave the process at once (--heap lean): a steady baseline
from optimer_lib.checkpoints.mapped import load_model_mapped
from optimer_lib.engine import MergeEngine
from optimer_lib.merging.pool import open_pool

def rss():
    f = dict(l.split(":", 1) for l in Path("/proc/self/status").read_text().splitlines() if ":" in l)
    return {k: int(f[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile", "RssShmem")}

what, mode, base, tiny, vecs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
load_model_mapped(tiny)  # imports and first-load caches, before the baseline
before = rss()
if what == "loader":
    model, info = load_model_mapped(base)
    sum(float(p.sum()) for p in model.parameters())  # touch every page
elif what == "engine":
    engine = MergeEngine.open(base, vecs, base_on=mode, max_slots=2)
    for w in ({"v0": 0.3}, {"v1": 0.2}):
        with engine.lease(w):
            pass
    assert engine.stats().slots == 2
else:
    pool = open_pool(base, vecs, base_on=mode)
    pool.merger.set_weights({"v0": 0.3, "v1": 0.2})
after = rss()
print(json.dumps({"anon": after["RssAnon"] - before["RssAnon"],
                  "file": after["RssFile"] + after["RssShmem"] - before["RssFile"] - before["RssShmem"]}))
"""


@pytest.fixture(scope="module")
def mid_pool(tmp_path_factory) -> tuple[Path, Path, list[Path], int]:
    """(base dir, tiny base dir, two vector files, bytes of the base): a ~48 MB fp32 Llama, tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("mid")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1024, num_hidden_layers=3,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=128,
                      tie_word_embeddings=True)
    base = LlamaForCausalLM(cfg).eval()
    base.save_pretrained(root / "base")
    make_model("llama").save_pretrained(root / "tiny")
    make_tokenizer().save_pretrained(root / "base")
    files = [save_vector(extract_vector(base, perturbed(base, 0.01, seed=i), name=f"v{i}"), root / f"v{i}.safetensors")
             for i in range(2)]
    return root / "base", root / "tiny", files, sum(p.numel() * 4 for p in base.parameters())


def _probe(mid_pool, *runs: tuple[str, str]) -> list[dict[str, int]]:
    """Run the probes at once (each in its own process: freed memory would blur the next measurement)."""
    base, tiny, files, _ = mid_pool
    procs = [subprocess.Popen([sys.executable, "-c", PROBE, what, mode, str(base), str(tiny), *map(str, files)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for what, mode in runs]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr[-2000:]
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def test_a_mapped_base_is_page_cache_not_process_memory(mid_pool):
    (loaded,) = _probe(mid_pool, ("loader", "host"))
    model = mid_pool[3]
    assert loaded["anon"] < 0.15 * model, (loaded, model)  # the 48 MB are not process memory...
    assert loaded["file"] > 0.9 * model, (loaded, model)   # ...but file pages, once touched


@pytest.mark.slow
def test_a_host_base_costs_no_process_memory_in_the_engine_and_saves_a_model_in_a_search(mid_pool):
    engine, pool_host, pool_device = _probe(mid_pool, ("engine", "host"), ("pool", "host"), ("pool", "device"))
    model = mid_pool[3]
    assert 1.7 * model < engine["anon"] < 2.35 * model, (engine, model)  # two slots, no base
    assert engine["file"] > 0.9 * model, (engine, model)  # the base (and the vectors read) are file pages
    assert pool_host["anon"] < 1.35 * model, (pool_host, model)  # the merged copy only
    assert pool_device["anon"] - pool_host["anon"] > 0.7 * model, (pool_device, pool_host, model)
