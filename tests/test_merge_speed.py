"""Speed paths of the resident linear merge give the same weights as the plain path.

Chunking (``ResidentMerger.chunk_elems``) must equal the unchunked merge; incremental re-merges
(``rebuild_every``) must equal a fresh merge within a tolerance that bounds rounding drift.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from conftest import make_model, perturbed

from optimer_lib.checkpoints.vectors import DistributionVector, extract_vector
from optimer_lib.merging.methods import merge_state_dict
from optimer_lib.merging.resident import ResidentMerger

NAMES = ("ja", "zh", "math")


def _llama_pool():
    base = make_model("llama")
    vecs = [extract_vector(base, perturbed(base, 0.02, 10 + i), name=n) for i, n in enumerate(NAMES)]
    inst = extract_vector(base, perturbed(base, 0.02, 99), name="it")
    return base, vecs, inst


class _Big(torch.nn.Module):
    """Parameters larger than several chunks, one of odd size (last chunk shorter)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = torch.nn.Parameter(torch.randn(3000, generator=g).to(dtype))
        self.b = torch.nn.Parameter(torch.randn(64, 37, generator=g).to(dtype))
        self.c = torch.nn.Parameter(torch.randn(5, generator=g).to(dtype))


def _big_vectors(model: torch.nn.Module, k: int = 3) -> list[DistributionVector]:
    g = torch.Generator().manual_seed(1)
    return [DistributionVector(f"v{i}", {n: (torch.randn(p.shape, generator=g) * 0.01).to(p.dtype)
                                         for n, p in model.named_parameters()}, {"name": f"v{i}"})
            for i in range(k)]


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_equals_unchunked(dtype):
    weights = [{"v0": 0.3, "v1": -0.7, "v2": 0.05}, {"v0": 0.0, "v1": 1.2, "v2": 0.4}]
    results = []
    for chunk in (0, 100, 1024):
        model = _Big(dtype)
        merger = ResidentMerger(model, _big_vectors(model))
        merger.chunk_elems, merger.rebuild_every = chunk, 0
        out = []
        for w in weights:
            merger.set_weights(w)
            out.append(_state(model))
        results.append(out)
    for chunked in results[1:]:
        for got, ref in zip(chunked, results[0], strict=True):
            for k in ref:
                assert torch.allclose(got[k].float(), ref[k].float(), atol=1e-6, rtol=0), k
    # and the chunked merge is the merge: base + sum w_i d_i
    model = _Big(torch.float32)
    vecs = _big_vectors(model)
    base = _state(model)
    merger = ResidentMerger(model, vecs)
    merger.chunk_elems = 100
    merger.set_weights(weights[0])
    ref = merge_state_dict(base, vecs, weights[0])
    assert all(torch.allclose(model.state_dict()[k], ref[k], atol=1e-6, rtol=0) for k in ref)


def test_chunked_on_a_real_model_with_instruction():
    base, vecs, inst = _llama_pool()
    w = {"ja": 0.3, "zh": 0.6, "math": 0.1}
    plain, chunked = copy.deepcopy(base), copy.deepcopy(base)
    m0 = ResidentMerger(plain, vecs, instruction=inst, instruction_weight=0.5)
    m1 = ResidentMerger(chunked, vecs, instruction=inst, instruction_weight=0.5)
    m0.chunk_elems, m1.chunk_elems = 0, 64
    m0.set_weights(w)
    m1.set_weights(w)
    a, b = plain.state_dict(), chunked.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    out, inp = chunked.get_output_embeddings().weight, chunked.get_input_embeddings().weight
    assert out.data_ptr() == inp.data_ptr()  # still tied


def test_incremental_equals_fresh_within_tolerance():
    base, vecs, inst = _llama_pool()
    inc_model, fresh_model = copy.deepcopy(base), copy.deepcopy(base)
    inc = ResidentMerger(inc_model, vecs, instruction=inst, instruction_weight=0.5)
    fresh = ResidentMerger(fresh_model, vecs, instruction=inst, instruction_weight=0.5)
    inc.chunk_elems, inc.rebuild_every = 50, 1000  # many incremental steps in a row: worst-case drift
    fresh.rebuild_every = 0
    rng = random.Random(0)
    w = {"ja": 0.3, "zh": 0.6, "math": 0.1}
    inc.set_weights(w)
    steps = 0
    for _ in range(200):  # slider moves: one weight (or the instruction) at a time
        who = rng.choice([*NAMES, "it"])
        iw = None
        if who == "it":
            iw = rng.uniform(0, 1)
        else:
            w = {**w, who: rng.uniform(-0.5, 1.5)}
        before = inc._since_rebuild
        inc.set_weights(w, instruction_weight=iw)
        steps += inc._since_rebuild == before + 1
        fresh.set_weights(w, instruction_weight=iw)
        a, b = inc_model.state_dict(), fresh_model.state_dict()
        assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=0) for k in a)
    assert steps == 200  # every update above took the incremental path
    inc.rebuild()
    a, b = inc_model.state_dict(), fresh_model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)


def test_incremental_rebuilds_and_falls_back():
    base, vecs, _ = _llama_pool()
    model = copy.deepcopy(base)
    merger = ResidentMerger(model, vecs)
    merger.rebuild_every = 3
    w = {"ja": 0.3, "zh": 0.6, "math": 0.1}
    merger.set_weights(w)
    assert merger._since_rebuild == 0  # the first merge is always fresh
    seen = []
    for i in range(8):
        w = {**w, "ja": 0.1 * i}
        merger.set_weights(w)
        seen.append(merger._since_rebuild)
    assert seen == [1, 2, 3, 0, 1, 2, 3, 0]  # a fresh merge every rebuild_every + 1 updates
    merger.set_weights({"ja": 0.9, "zh": 0.2, "math": 0.4})  # every weight changed: fresh is cheaper
    assert merger._since_rebuild == 0
    # through another method and reset, back to linear: still exact
    merger.method, merger.params = "ties", {"density": 0.5}
    merger.set_weights(w)
    merger.method, merger.params = "optimer", {}
    for ws in ({**w, "zh": 0.25}, {**w, "zh": 0.5}):
        merger.set_weights(ws)
        ref = merge_state_dict(base.state_dict(), vecs, ws)
        assert all(torch.allclose(model.state_dict()[k], ref[k], atol=1e-6, rtol=0) for k in ref)
    merger.reset()
    merger.set_weights({**w, "zh": 0.5})
    ref = merge_state_dict(base.state_dict(), vecs, {**w, "zh": 0.5})
    assert all(torch.allclose(model.state_dict()[k], ref[k], atol=1e-6, rtol=0) for k in ref)
    merger.set_weights(dict.fromkeys(NAMES, 0.0))  # all zero: the base, bit for bit
    assert all(torch.equal(model.state_dict()[k], base.state_dict()[k]) for k in ref)


def test_bf16_never_takes_the_incremental_path():
    model = _Big(torch.bfloat16)
    vecs = _big_vectors(model)
    ref_model = _Big(torch.bfloat16)
    merger, ref = ResidentMerger(model, vecs), ResidentMerger(ref_model, vecs)
    ref.rebuild_every = 0
    w = {"v0": 0.3, "v1": 0.2, "v2": 0.1}
    for x in (0.001, 0.002, 0.003):  # changes far below bf16 resolution of the parameters
        w = {**w, "v0": 0.3 + x}
        merger.set_weights(w)
        ref.set_weights(w)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref_model.parameters(), strict=True))


def test_default_chunking_follows_the_thread_count():
    model = _Big(torch.float32)
    merger = ResidentMerger(model, _big_vectors(model))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert len(merger._chunks(3 << 20)) == 3  # 1M-element chunks with one intra-op thread
        torch.set_num_threads(2)
        assert len(merger._chunks(3 << 20)) == 1  # whole tensors otherwise
        merger.chunk_elems = 1 << 20
        assert len(merger._chunks(3 << 20)) == 3  # an explicit size always applies
    finally:
        torch.set_num_threads(threads)
