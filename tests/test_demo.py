"""``optimer demo --quick`` end to end on the embedded world (slow: a few minutes on 2 cores)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from optimer_lib.data import assets_dir

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (assets_dir() / "base").exists(), reason="assets/ not built")]


def test_quick_demo_runs_and_its_numbers_hold(tmp_path):
    wd = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "optimer_lib.cli", "demo", "--quick", "--workdir", str(wd)],
                       capture_output=True, text=True, timeout=1800, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((wd / "results.json").read_text())
    rows = res["rows"]
    assert set(rows) == {"base", "instruct (base + τ_IT)", "CPT ja alone", "CPT zh alone", "CPT math alone",
                         "CPT code alone", "uniform average", "OptiMer best"}
    # The paper's recipe by default: the search and the merges carry the instruction vector at weight 1.
    assert res["instruction_weight"] == 1.0 and json.loads((wd / "best.json").read_text())["study"] == "demo-it1"
    iw = {r: v["instruction_weight"] for r, v in rows.items()}
    assert iw["OptiMer best"] == iw["uniform average"] == iw["instruct (base + τ_IT)"] == 1.0
    assert iw["base"] == iw["CPT ja alone"] == 0.0
    best = json.loads((wd / "best.json").read_text())
    assert rows["OptiMer best"]["weights"] == pytest.approx(best["weights"])
    # Each CPT model is the best of all rows on its own distribution's dev loss: the vectors carry signal.
    for name in ("ja", "zh", "math", "code"):
        own = rows[f"CPT {name} alone"]["dev"][f"loss:{name}"]
        assert own < rows["base"]["dev"][f"loss:{name}"] - 0.05
    # The search beats the recipe's own fixed point, uniform α + τ_IT, on the objective it was searched for. (Neither
    # the base nor the instruct model is a fair reference: τ_IT costs raw-text loss, and at 20 trials the quick
    # search measured 4.044 against the instruct model's 4.015 on dev, so the recipe does not beat it here.)
    assert rows["OptiMer best"]["dev_objective"] < rows["uniform average"]["dev_objective"]
    assert rows["instruct (base + τ_IT)"]["dev_objective"] > rows["base"]["dev_objective"]  # τ_IT's raw-text cost
    assert (wd / "results.md").read_text().count("| OptiMer best + τ_IT |") == 2

    # The exported model is exactly the merge the table scored.
    from optimer_lib.checkpoints.models import load_model, load_tokenizer
    from optimer_lib.data import load_corpus
    from optimer_lib.scoring.evaluate import mean_token_loss

    model, tok = load_model(wd / "best-model"), load_tokenizer(wd / "best-model")
    loss = mean_token_loss(model, tok, load_corpus("en", "dev"), limit=res["table_limit"])
    assert math.isclose(loss, rows["OptiMer best"]["dev"]["loss:en"], rel_tol=1e-5)
    assert (wd / "best-model" / "mergekit.yaml").exists() and (wd / "best-model" / "README.md").exists()
    assert "instruct" in (wd / "best-model" / "mergekit.yaml").read_text()

    # Re-running is cheap: CPT runs, vectors and trials are reused.
    r2 = subprocess.run([sys.executable, "-m", "optimer_lib.cli", "demo", "--quick", "--workdir", str(wd)],
                        capture_output=True, text=True, timeout=1800)
    assert r2.returncode == 0, r2.stderr[-3000:]
    again = json.loads((wd / "results.json").read_text())
    assert again["rows"]["OptiMer best"]["weights"] == rows["OptiMer best"]["weights"]
    assert again["timings"]["cpt+vectors"] < 30
