"""Merge math on real tiny models (all archs) and on hand-made tensors; the resident merger; CLI specs."""

from __future__ import annotations

import copy
import random
import threading

import pytest
import torch
from conftest import make_model, perturbed

from optimer_lib.checkpoints.vectors import DistributionVector, extract_vector
from optimer_lib.errors import ConfigError
from optimer_lib.merging.methods import MERGE_METHODS, merge_state_dict, register_merge_method
from optimer_lib.merging.resident import ResidentMerger
from optimer_lib.search.specs import parse_bounds, parse_vector_spec

NAMES = ("ja", "zh", "math")


def _pool(arch: str):
    base = make_model(arch)
    tuned = [perturbed(base, 0.02, 10 + i) for i in range(len(NAMES))]
    vecs = [extract_vector(base, t, name=n) for n, t in zip(NAMES, tuned, strict=True)]
    return base, tuned, vecs


def _tied_ok(model) -> None:
    out, inp = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    if model.config.tie_word_embeddings:
        assert out.data_ptr() == inp.data_ptr()
    else:
        assert out.data_ptr() != inp.data_ptr()


def _expected(base, tuned, alphas):
    """theta_base + sum alpha_i (theta_i - theta_base), straight from the models' state dicts, in fp64."""
    sb = base.state_dict()
    sts = [t.state_dict() for t in tuned]
    return {k: sb[k].double() + sum(a * (st[k].double() - sb[k].double()) for a, st in zip(alphas, sts, strict=True))
            for k in sb}


def test_zero_one_hot_and_random_weights(arch):
    base, tuned, vecs = _pool(arch)
    sb = base.state_dict()
    zero = merge_state_dict(sb, vecs, dict.fromkeys(NAMES, 0.0))
    assert all(torch.equal(zero[k], sb[k]) for k in sb)
    one = merge_state_dict(sb, vecs, {"ja": 0.0, "zh": 1.0, "math": 0.0})
    st = tuned[1].state_dict()
    assert all(torch.allclose(one[k], st[k], atol=1e-6, rtol=0) for k in sb)
    alphas = [0.31, -0.2, 0.77]
    got = merge_state_dict(sb, vecs, dict(zip(NAMES, alphas, strict=True)))
    exp = _expected(base, tuned, alphas)
    assert set(got) == set(sb)
    assert all(torch.allclose(got[k].double(), exp[k], atol=1e-6, rtol=0) for k in sb)
    # The merged dict loads back into a model (tied aliases agree with their parameter).
    m = make_model(arch)
    m.load_state_dict(got)
    assert all(torch.allclose(m.state_dict()[k].double(), exp[k], atol=1e-6, rtol=0) for k in sb)


def test_resident_many_updates_equal_fresh_merge(arch):
    base, tuned, vecs = _pool(arch)
    model = copy.deepcopy(base)
    merger = ResidentMerger(model, vecs)
    ptrs = {k: p.data_ptr() for k, p in model.named_parameters()}
    rng = random.Random(0)
    for _ in range(50):
        merger.set_weights({n: rng.uniform(-0.5, 1.5) for n in NAMES})
    final = merger.weights
    fresh = merge_state_dict(base.state_dict(), vecs, final)
    exp = _expected(base, tuned, [final[n] for n in NAMES])
    for k, v in model.state_dict().items():
        assert torch.allclose(v, fresh[k], atol=1e-6, rtol=0)
        assert torch.allclose(v.double(), exp[k], atol=1e-6, rtol=0)
    _tied_ok(model)
    assert ptrs == {k: p.data_ptr() for k, p in model.named_parameters()}  # in place, no new tensors
    merger.set_weights({"ja": 0.0, "zh": 0.0, "math": 1.0})
    assert all(torch.allclose(v, tuned[2].state_dict()[k], atol=1e-6, rtol=0)
               for k, v in model.state_dict().items())
    merger.set_weights(dict.fromkeys(NAMES, 0.0))
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in model.state_dict().items())
    merger.set_weights({"ja": 0.4, "zh": 0.1, "math": 0.2})
    merger.reset()
    assert merger.weights == dict.fromkeys(NAMES, 0.0)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in model.state_dict().items())


def test_resident_instruction_and_other_methods():
    base, tuned, vecs = _pool("llama")
    it = extract_vector(base, perturbed(base, 0.02, 99), name="it")
    model = copy.deepcopy(base)
    merger = ResidentMerger(model, vecs, instruction=it, instruction_weight=0.5)
    w = {"ja": 0.3, "zh": 0.6, "math": 0.1}
    merger.set_weights(w)
    ref = merge_state_dict(base.state_dict(), vecs, w, instruction=it, instruction_weight=0.5)
    assert all(torch.allclose(v, ref[k], atol=1e-6, rtol=0) for k, v in model.state_dict().items())
    merger.set_weights(w, instruction_weight=0.0)
    assert merger.instruction_weight == 0.0
    ref = merge_state_dict(base.state_dict(), vecs, w)
    assert all(torch.allclose(v, ref[k], atol=1e-6, rtol=0) for k, v in model.state_dict().items())
    for method, params in (("ties", {"density": 0.5}), ("dare", {"density": 0.7, "seed": 3}), ("average", {})):
        m2 = copy.deepcopy(base)
        ResidentMerger(m2, vecs, method=method, instruction=it, **params).set_weights(w)
        ref = merge_state_dict(base.state_dict(), vecs, w, method=method, instruction=it, **params)
        assert all(torch.allclose(v, ref[k], atol=1e-6, rtol=0) for k, v in m2.state_dict().items()), method
        _tied_ok(m2)


def test_resident_bf16_close_to_fp32():
    base, tuned, vecs = _pool("llama")
    model = copy.deepcopy(base).to(torch.bfloat16)
    merger = ResidentMerger(model, vecs)
    w = {"ja": 0.3, "zh": 0.6, "math": 0.1}
    merger.set_weights(w)
    ref = merge_state_dict(base.state_dict(), vecs, w)
    for k, v in model.state_dict().items():
        assert v.dtype == torch.bfloat16
        assert torch.allclose(v.float(), ref[k], atol=1e-2, rtol=1e-2)
    _tied_ok(model)


def test_lock_blocks_remerge():
    base, _, vecs = _pool("llama")
    merger = ResidentMerger(copy.deepcopy(base), vecs)
    done = threading.Event()
    with merger.lock:
        th = threading.Thread(target=lambda: (merger.set_weights(dict.fromkeys(NAMES, 0.1)), done.set()))
        th.start()
        assert not done.wait(0.2)  # waits while a "generation" holds the lock
    th.join(5)
    assert done.is_set() and merger.weights["ja"] == 0.1


def test_merge_state_dict_validation_and_untouched():
    base, _, vecs = _pool("gpt2")
    sb = dict(base.state_dict())
    sb["steps"] = torch.tensor([7])
    with pytest.raises(ConfigError, match=r"missing: \['math'\], unknown: \['mth'\]"):
        merge_state_dict(sb, vecs, {"ja": 1, "zh": 1, "mth": 1})
    with pytest.raises(ConfigError, match="unknown merge method 'tie'.*average.*ties"):
        merge_state_dict(sb, vecs, dict.fromkeys(NAMES, 1.0), method="tie")
    with pytest.raises(ConfigError, match=r"no option\(s\) \['densty'\].*density"):
        merge_state_dict(sb, vecs, dict.fromkeys(NAMES, 1.0), method="ties", densty=0.3)
    with pytest.raises(ConfigError, match="density must be in"):
        merge_state_dict(sb, vecs, dict.fromkeys(NAMES, 1.0), method="dare", density=0.0)
    with pytest.raises(ConfigError, match=r"\['zh'\] are not finite"):
        merge_state_dict(sb, vecs, {"ja": 1, "zh": float("nan"), "math": 1})
    with pytest.raises(ConfigError, match="unique"):
        merge_state_dict(sb, [vecs[0], vecs[0]], {"ja": 1.0})
    one = DistributionVector("ja", {"transformer.ln_f.bias": vecs[0].tensors["transformer.ln_f.bias"]}, {})
    out = merge_state_dict(sb, [one], {"ja": 1.0})
    assert out["steps"] is sb["steps"] and out["transformer.wte.weight"] is sb["transformer.wte.weight"]
    assert not torch.equal(out["transformer.ln_f.bias"], sb["transformer.ln_f.bias"])


def test_dare_seeds_differ_per_tensor():
    a = DistributionVector("a", {"x": torch.ones(1000), "y": torch.ones(1000)}, {})
    base = {"x": torch.zeros(1000), "y": torch.zeros(1000)}
    out = merge_state_dict(base, [a], {"a": 1.0}, method="dare", density=0.5, seed=1)
    again = merge_state_dict(base, [a], {"a": 1.0}, method="dare", density=0.5, seed=1)
    assert torch.equal(out["x"], again["x"]) and not torch.equal(out["x"], out["y"])


# --- pure methods on hand-made tensors -------------------------------------------------------------

B = torch.zeros(4)
D1 = torch.tensor([1.0, -2.0, 3.0, 0.5])
D2 = torch.tensor([-3.0, 1.0, 1.5, -0.1])


def test_linear_average_task_arithmetic():
    lin = MERGE_METHODS["optimer"]
    assert MERGE_METHODS["linear"] is lin
    assert torch.allclose(lin(B + 1, [D1, D2], [0.5, 2.0]), 1 + 0.5 * D1 + 2.0 * D2)
    assert torch.allclose(MERGE_METHODS["average"](B + 1, [D1, D2], [9.0, 9.0]), 1 + (D1 + D2) / 2)
    assert torch.allclose(MERGE_METHODS["task_arithmetic"](B, [D1, D2], [9.0, 9.0], lam=0.3), 0.3 * (D1 + D2))
    bf = lin(B.bfloat16(), [D1.bfloat16()], [1.0])
    assert bf.dtype == torch.bfloat16


def test_ties_trim_breaks_magnitude_ties_by_index_whatever_the_device():
    """TIES keeps the top-k magnitudes; entries tied with the k-th are kept lowest index first (``topk``'s own
    choice among ties is the CPU's or CUDA's, and bf16 deltas tie often), so every device trims alike."""
    from optimer_lib.merging.methods import _trim

    d = torch.tensor([0.5, -0.5, 0.25, 0.5, 1.0, -0.125], dtype=torch.bfloat16)
    assert _trim(d, 0.5).tolist() == [0.5, -0.5, 0.0, 0.0, 1.0, 0.0]
    g = torch.Generator().manual_seed(0)
    sign = torch.randint(0, 2, (4096,), generator=g).float() * 2 - 1
    d = (sign * torch.randint(1, 5, (4096,), generator=g) / 4).to(torch.bfloat16)  # 8 values, none 0: ties everywhere
    for density in (0.01, 0.3, 0.9):
        kept = _trim(d, density) != 0
        k = int(density * d.numel())
        assert int(kept.sum()) == k
        kth = d.abs().topk(k).values[-1]
        assert bool((d.abs()[~kept] <= kth).all()) and bool((d.abs()[kept] >= kth).all())
        tied = (d.abs() == kth).nonzero().flatten()
        n_tied_kept = int(kept[tied].sum())
        assert bool(kept[tied[:n_tied_kept]].all()) and not bool(kept[tied[n_tied_kept:]].any())  # lowest first


def test_ties_by_hand():
    ties = MERGE_METHODS["ties"]
    # weighted sum [-2,-1,4.5,0.4] elects [-,-,+,+]; agreeing entries: d1 at 1,2,3; d2 at 0,2.
    assert torch.allclose(ties(B, [D1, D2], [1.0, 1.0], density=1.0), torch.tensor([-3.0, -2.0, 2.25, 0.5]))
    assert torch.allclose(ties(B, [D1, D2], [1.0, 1.0], density=1.0, normalize=False),
                          torch.tensor([-3.0, -2.0, 4.5, 0.5]))
    # density 0.5 keeps d1 -> [0,-2,3,0], d2 -> [-3,0,1.5,0]; entry 3 has no survivor.
    assert torch.allclose(ties(B, [D1, D2], [1.0, 1.0], density=0.5), torch.tensor([-3.0, -2.0, 2.25, 0.0]))
    assert torch.allclose(ties(B, [D1, D2], [1.0, 1.0], density=0.5, lam=2.0),
                          torch.tensor([-6.0, -4.0, 4.5, 0.0]))
    # weights [2,1]: weighted d1 [2,-4,6,1]; sum [-1,-3,7.5,0.9]; divisors [1,2,3,2].
    assert torch.allclose(ties(B + 1, [D1, D2], [2.0, 1.0], density=1.0), 1 + torch.tensor([-3.0, -2.0, 2.5, 0.5]))


def test_dare():
    dare, lin = MERGE_METHODS["dare"], MERGE_METHODS["optimer"]
    assert torch.equal(dare(B, [D1, D2], [0.3, 0.7], density=1.0), lin(B, [D1, D2], [0.3, 0.7]))
    d = torch.ones(20000)
    out = dare(torch.zeros(20000), [d], [1.0], density=0.25, seed=0)
    assert set(out.unique().tolist()) <= {0.0, 4.0}  # dropped, or rescaled by 1/density
    assert abs(float(out.mean()) - 1.0) < 0.05
    assert torch.equal(out, dare(torch.zeros(20000), [d], [1.0], density=0.25, seed=0))
    assert not torch.equal(out, dare(torch.zeros(20000), [d], [1.0], density=0.25, seed=1))


def test_methods_are_pure():
    base, d1, d2 = B + 1, D1.clone(), D2.clone()
    for name, fn in MERGE_METHODS.items():
        params = {"seed": 0, "density": 0.5} if name == "dare" else {}
        out = fn(base, [d1, d2], [0.5, 0.5], **params)
        assert out is not base and out.data_ptr() != base.data_ptr(), name
        assert torch.equal(base, B + 1) and torch.equal(d1, D1) and torch.equal(d2, D2), name


def test_register_merge_method():
    @register_merge_method("first_only")
    def first_only(base, deltas, weights):
        return base + deltas[0]

    try:
        out = merge_state_dict({"w": torch.zeros(2)}, [DistributionVector("a", {"w": torch.ones(2)}, {})],
                               {"a": 0.0}, method="first_only")
        assert torch.equal(out["w"], torch.ones(2))
    finally:
        del MERGE_METHODS["first_only"]


# --- CLI specs ------------------------------------------------------------------------------------

def test_parse_vector_spec():
    assert parse_vector_spec("path/ja.safetensors=0.3") == ("path/ja.safetensors", 0.3)
    assert parse_vector_spec("ja.safetensors") == ("ja.safetensors", None)
    assert parse_vector_spec("ja.safetensors=-1e-2") == ("ja.safetensors", -0.01)
    for bad, msg in (("=", "file is missing"), ("a=b=c", "one '='"), ("x=abc", "not a number"),
                     ("x=nan", "finite"), ("x=", "not a number"), ("=0.3", "file is missing")):
        with pytest.raises(ConfigError, match=msg) as e:
            parse_vector_spec(bad)
        assert "ja.safetensors=0.3" in str(e.value)


def test_parse_bounds():
    assert parse_bounds("0:1") == (0.0, 1.0)
    assert parse_bounds("-0.5:1.5") == (-0.5, 1.5)
    assert parse_bounds("ja=0:1.5, zh=0:1") == {"ja": (0.0, 1.5), "zh": (0.0, 1.0)}
    for bad in ("1:0", "0:0", "0-1", "a:b", "0:1:2", "ja=0:1,ja=0:2", "ja=0:1,0:1", "=0:1", "0:inf", ""):
        with pytest.raises(ConfigError, match="bounds"):
            parse_bounds(bad)
