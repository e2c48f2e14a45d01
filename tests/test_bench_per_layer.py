"""bench/per_layer.py's table and summary helpers on hand-made runs (nothing evaluated); its trial-equivalents and
interval helpers live in optimer_lib.experiments.granularity (tests/test_granularity.py)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import per_layer  # noqa: E402

TERMS = {"loss:ja": 1.0, "acc:math": 1.0}  # (loss:ja − acc:math) / 2


def fake_run(g: str, s: str, seed: int, nll: float, values: list[float], grad_evals: int = 0) -> dict:
    """Two documents of 10 tokens each (loss nll/10 per token) and two math answers (one right)."""
    comps = {"nll:ja": [nll, nll + 2.0], "tok:ja": [10.0, 10.0], "acc:math": [1.0, 0.0]}
    return {"granularity": g, "sampler": s, "seed": seed, "values": values, "grad_evals": grad_evals,
            "best_weights": {"ja": 0.5} if g == "vector" else {"ja@embed": 0.5, "ja@head": 0.5},
            "dev": comps, "test": comps}


def test_summary_verdicts_and_table():
    saved = {"terms": TERMS, "charge": {"vector": 2.0, "layer-groups:2": 3.0}, "runs": [
        *(fake_run("vector", "tpe", s, 40.0, [3.0, 2.0]) for s in (0, 1)),
        *(fake_run("vector", "grad", s, 40.0, [2.0, 2.0], grad_evals=2) for s in (0, 1)),
        *(fake_run("layer-groups:2", "tpe", s, 44.0, [3.0, 2.5]) for s in (0, 1)),
        *(fake_run("layer-groups:2", "grad", s, 30.0, [3.0, 2.0, 1.0], grad_evals=2) for s in (0, 1))]}
    out = per_layer.summarise(saved, n_boot=200)
    cells, v = out["cells"], out["verdicts"]
    assert out["charge"] == 3.0  # the dearest measured gradient, charged to every granularity
    assert cells["vector grad"]["equivalents"] == [1 + 2 * 3.0] * 2  # first trial is its best, 2 gradients
    assert cells["layer-groups:2 grad"]["equivalents"] == [3 + 2 * 3.0] * 2 and cells["layer-groups:2 grad"][
        "weights"] == 2
    assert v["test layer-groups:2 − vector, grad"]["verdict"] == "holds"  # 30 < 40 on every document
    assert v["test layer-groups:2 − vector, tpe"]["verdict"] == "does not hold"  # 44 > 40
    ratio = v["equivalents layer-groups:2 grad / vector grad"]
    assert ratio["per_seed"] == [pytest.approx(9 / 7)] * 2 and ratio["verdict"] == "holds"  # 1.29 < 2
    assert v["equivalents layer-groups:2 grad / vector tpe"]["verdict"] == "does not hold"  # 9 / 2 = 4.5
    text = per_layer.table(out, base_test=2.5)
    assert "| layer-groups:2 | grad | 2 |" in text and "9.0 (9.0–9.0)" in text
    base = re.search(r"Base model \(α = 0\) test objective: ([0-9]+\.[0-9]+)", text)
    assert base is not None and float(base.group(1)) == 2.5
    assert "→ **holds**" in text and "→ **does not hold**" in text
