"""Property tests (hypothesis): spec parsers raise only ConfigError and round-trip; the vector reader raises
only VectorError on any bytes.

Examples are kept modest (the file runs in about 10 s); ``HYPOTHESIS_PROFILE=thorough`` runs 30x more,
random rather than derandomized.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from conftest import make_model, perturbed
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from optimer_lib.checkpoints.vectors import extract_vector, load_vector, save_vector
from optimer_lib.cli_models import _ratio_spec
from optimer_lib.errors import ConfigError, VectorError
from optimer_lib.scoring.objectives import parse_objective
from optimer_lib.search.specs import parse_bounds, parse_vector_spec

settings.register_profile("default", max_examples=100, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=3000, deadline=None, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# Text biased towards the characters the parsers split on.
SPECIAL = st.sampled_from(list("=,:.-+ _eE/\\\t\n0123456789") + ["nan", "inf", "loss:", "acc:", "ppl:", "1e309",
                                                                 "ja", "math", "\x00", ".py", "::"])
TEXT = st.one_of(st.text(max_size=60), st.lists(st.one_of(SPECIAL, st.text(max_size=3)), max_size=20).map("".join))
FINITE = st.floats(allow_nan=False, allow_infinity=False, width=64)
NAME = st.text(st.characters(exclude_characters="=,:\x00", exclude_categories=("Cs",)), min_size=1,
               max_size=12).map(str.strip).filter(bool)
AVAILABLE, QA = ["en", "ja", "math"], ["math"]


def _only_config_errors(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except ConfigError as exc:
        assert str(exc), "an error must say what to do"
        return None


@given(TEXT)
def test_parse_vector_spec_never_crashes(spec):
    out = _only_config_errors(parse_vector_spec, spec)
    if out is not None:  # vacuity: ok (a refusal is a valid outcome: _only_config_errors asserted its message)
        path, weight = out
        assert path and path == path.strip() and (weight is None or math.isfinite(weight))


@given(NAME.filter(lambda s: "=" not in s), st.one_of(st.none(), FINITE))
def test_parse_vector_spec_round_trips(path, weight):
    spec = path if weight is None else f"{path}={weight!r}"
    assert parse_vector_spec(spec) == (path, weight)


@given(TEXT)
def test_parse_bounds_never_crashes(spec):
    out = _only_config_errors(parse_bounds, spec)
    ranges = [] if out is None else (list(out.values()) if isinstance(out, dict) else [out])
    assert all(math.isfinite(lo) and math.isfinite(hi) and lo < hi for lo, hi in ranges)


@given(st.dictionaries(NAME, st.tuples(FINITE, FINITE).filter(lambda r: r[0] < r[1]), min_size=1, max_size=4),
       st.booleans())
def test_parse_bounds_round_trips(bounds, single):
    if single:
        lo, hi = next(iter(bounds.values()))
        assert parse_bounds(f"{lo!r}:{hi!r}") == (lo, hi)
    else:
        spec = ",".join(f"{n}={lo!r}:{hi!r}" for n, (lo, hi) in bounds.items())
        assert parse_bounds(spec) == bounds


@given(TEXT)
@settings(max_examples=80)
def test_parse_objective_never_crashes(spec):
    # Text that names an importable module would import it (a callable objective): keep fuzzing to names
    # that cannot exist, so no real module (say "antigravity") is ever imported by the fuzzer.
    head = spec.split(":", 1)[0].strip()
    assume(not head.isidentifier() or head in ("loss", "ppl", "acc") or head.startswith("zz"))
    assume(not any(c in spec for c in "/\\") and ".py" not in spec)
    out = _only_config_errors(parse_objective, spec, AVAILABLE, qa_names=QA)
    if out is not None:  # vacuity: ok (a refusal is a valid outcome: _only_config_errors asserted its message)
        assert out.terms and all(k.split(":")[0] in ("loss", "ppl", "acc") for k in out.terms)


METRIC = st.sampled_from([f"{k}:{n}" for k in ("loss", "ppl") for n in AVAILABLE] + ["acc:math"])


@given(st.dictionaries(METRIC, FINITE.filter(lambda w: w != 0 and abs(w) < 1e300), min_size=1, max_size=5))
def test_parse_objective_round_trips(terms):
    spec = ",".join(f"{k}={w!r}" for k, w in terms.items())
    obj = parse_objective(spec, AVAILABLE, qa_names=QA)
    assert obj.terms == terms
    assert parse_objective(obj.spec, AVAILABLE, qa_names=QA).terms == terms


@given(TEXT)
def test_ratio_spec_never_crashes(spec):
    out = _only_config_errors(_ratio_spec, spec)
    if isinstance(out, dict):
        assert all(n and n == n.strip() for n in out)


@given(st.dictionaries(NAME.filter(lambda s: not Path(s).exists()), FINITE, min_size=1, max_size=4))
def test_ratio_spec_round_trips(ratios):
    assert _ratio_spec(",".join(f"{n}={r!r}" for n, r in ratios.items())) == ratios


def test_ratio_spec_long_names_are_config_errors():
    with pytest.raises(ConfigError):
        _ratio_spec("x" * 5000 + "=oops")


# -- the vector reader ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vector_bytes(tmp_path_factory) -> bytes:
    base = make_model("llama")
    d = tmp_path_factory.mktemp("vec")
    return save_vector(extract_vector(base, perturbed(base, 0.02, 1), name="v"), d / "v.safetensors").read_bytes()


def _read(data: bytes, tmp: Path):
    p = tmp / "fuzzed.safetensors"
    p.write_bytes(data)
    try:
        return load_vector(p)
    except VectorError as exc:
        assert str(exc)
        return None


@given(st.binary(max_size=2048))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_load_vector_on_random_bytes(tmp_path, data):
    assert _read(data, tmp_path) is None


@given(st.data())
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_load_vector_on_truncated_and_damaged_files(tmp_path, vector_bytes, data):
    raw = bytearray(vector_bytes)
    cut = data.draw(st.integers(0, len(raw)), label="cut")
    if data.draw(st.booleans(), label="damage instead"):
        n = int.from_bytes(raw[:8], "little")  # damage the header, where a flip changes meaning, not a value
        for _ in range(data.draw(st.integers(1, 4), label="flips")):
            i = data.draw(st.integers(0, min(len(raw), 8 + n) - 1))
            raw[i] = data.draw(st.integers(0, 255))
        vec = _read(bytes(raw), tmp_path)
        if vec is not None:  # the damage kept a valid file: what loads is a valid, finite vector
            assert all(torch.isfinite(t).all() for t in vec.tensors.values() if t.is_floating_point())
        return
    vec = _read(bytes(raw[:cut]), tmp_path)
    assert (vec is None) == (cut < len(raw)), "a truncated file must never load"
