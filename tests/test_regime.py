"""The regime map: the span residual on tensors with a known answer, the sizing of bases from token ratios, the
across-seed summary (R with its interval) on synthetic per-document scores, the plot, and the real-base point."""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from optimer_lib.checkpoints.vectors import DistributionVector
from optimer_lib.errors import ConfigError
from optimer_lib.experiments.analysis import span_residual
from optimer_lib.experiments.regime import RegimeConfig, cell_name, estimate_seconds
from optimer_lib.experiments.regime_report import (
    BASE,
    MIXTURE,
    OPTIMER,
    real_cell_point,
    regime_svg,
    render_regime,
    summarise_regime,
)

ROOT = Path(__file__).resolve().parents[1]


def _vec(name: str, **t: list) -> DistributionVector:
    return DistributionVector(name=name, tensors={k: torch.tensor(v, dtype=torch.float32) for k, v in t.items()})


def _shifted(base: dict[str, torch.Tensor], d: dict[str, list]) -> dict[str, torch.Tensor]:
    return {k: base[k] + torch.tensor(v) for k, v in d.items()}


BASE_STATE = {"w": torch.tensor([[0.5, -1.0], [2.0, 0.25]]), "v": torch.tensor([3.0, -2.0])}
# τ2 spans both tensors and is not orthogonal to τ1, so the fit needs the Gram matrix accumulated across tensors.
T1 = _vec("t1", w=[[1.0, 0.0], [0.0, 0.0]], v=[0.0, 0.0])
T2 = _vec("t2", w=[[1.0, 1.0], [0.0, 0.0]], v=[0.0, 1.0])


def test_span_residual_known_analytically():
    # d = 2 τ1 + 3 τ2 + 4 e, e = w[1,0] orthogonal to both: ||d||² = 5² + 3² + 4² + 3² = 59, residual = 4 / √59
    d = {"w": [[5.0, 3.0], [4.0, 0.0]], "v": [0.0, 3.0]}
    out = span_residual(BASE_STATE, _shifted(BASE_STATE, d), [T1, T2])
    assert out["residual"] == pytest.approx(4 / math.sqrt(59), rel=1e-9)
    assert out["shift_norm"] == pytest.approx(math.sqrt(59), rel=1e-9)
    assert out["coefficients"] == pytest.approx({"t1": 2.0, "t2": 3.0}, rel=1e-9)
    # inside the span: 0; orthogonal to it: 1
    inside = span_residual(BASE_STATE, _shifted(BASE_STATE, {"w": [[-1.0, 0.5], [0.0, 0.0]], "v": [0.0, 0.5]}),
                           [T1, T2])
    assert inside["residual"] == pytest.approx(0.0, abs=1e-7)
    assert inside["coefficients"] == pytest.approx({"t1": -1.5, "t2": 0.5}, rel=1e-9)
    outside = span_residual(BASE_STATE, _shifted(BASE_STATE, {"w": [[0.0, 0.0], [7.0, 1.0]], "v": [2.0, 0.0]}),
                            [T1, T2])
    assert outside["residual"] == pytest.approx(1.0, rel=1e-12)


def test_span_residual_with_parallel_vectors():
    """A singular Gram matrix (τ3 = 2 τ1) keeps the residual; the minimum-norm coefficients split the weight."""
    t3 = _vec("t3", w=[[2.0, 0.0], [0.0, 0.0]], v=[0.0, 0.0])
    d = {"w": [[5.0, 0.0], [0.0, 0.0]], "v": [12.0, 0.0]}  # 5 along τ1, 12 orthogonal: residual 12/13
    out = span_residual(BASE_STATE, _shifted(BASE_STATE, d), [T1, t3])
    assert out["residual"] == pytest.approx(12 / 13, rel=1e-9)
    assert out["coefficients"]["t1"] + 2 * out["coefficients"]["t3"] == pytest.approx(5.0, rel=1e-9)
    assert out["coefficients"]["t1"] == pytest.approx(1.0, rel=1e-9)  # min norm: c ∝ (1, 2)


def test_the_default_plan_sweeps_two_orders_of_magnitude():
    p = RegimeConfig().plan()
    assert p["cpt_tokens"] == 51_200 >= 50_000  # 50 steps of 8 x 128 tokens
    assert [b["ratio"] for b in p["bases"]] == [0.3, 0.03, 0.003]
    # base tokens = cpt / ratio in whole 16 x 128 steps; the last 10% of them (whole steps) are the decay branch
    assert [b["tokens"] for b in p["bases"]] == [83 * 2048, 833 * 2048, 8333 * 2048]
    assert [b["decay_tokens"] for b in p["bases"]] == [8 * 2048, 83 * 2048, 833 * 2048]
    assert [b["stable_tokens"] for b in p["bases"]] == [153_600, 1_536_000, 15_360_000]
    assert p["stable_tokens"] == 15_360_000
    assert [round(b["actual_ratio"], 5) for b in p["bases"]] == [0.30120, 0.03001, 0.00300]
    assert p["bases"][0]["actual_ratio"] / p["bases"][-1]["actual_ratio"] > 100
    assert cell_name(0.003, 1e-3) == "regime-r0.003-lr0.001"
    nearest = RegimeConfig(ratios=(0.06,)).plan()["bases"][0]  # 25 / 0.06 = 416.7 steps; 10% of 417 = 41.7
    assert (nearest["tokens"], nearest["decay_tokens"]) == (417 * 2048, 42 * 2048)
    no_decay = RegimeConfig(decay=0.0).plan()["bases"]
    assert [b["stable_tokens"] for b in no_decay] == [b["tokens"] for b in no_decay]
    quick = RegimeConfig.quick().plan()
    assert quick["cpt_tokens"] == 4096 and [b["tokens"] for b in quick["bases"]] == [4 * 2048, 40 * 2048]
    assert [b["stable_tokens"] for b in quick["bases"]] == [3 * 2048, 36 * 2048] and quick["warmup_tokens"] == 4096


def test_the_plan_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as e:
        RegimeConfig(ratios=(0.5, 0.5, 2.0), cpt_tokens=100, decay=1.5, lrs=()).plan()
    msg = str(e.value)
    for part in ("cpt_tokens 100", "ratios [0.5, 0.5, 2.0]", "decay 1.5", "lrs"):
        assert part in msg
    with pytest.raises(ConfigError, match="ratio 0.3: .*warm-up"):
        RegimeConfig(warmup_tokens=200_000).plan()


def test_estimate_adds_pretraining_once_and_cells_per_seed():
    rc = RegimeConfig()
    e = estimate_seconds(rc, corpora=4, seeds=3, train_tokens_per_s=1000.0, trial_s=2.0, rescore_s=5.0, test_s=10.0)
    pretrain = (15_360_000 + (8 + 83 + 833) * 2048) / 1000
    cell = 2 * 4 * 51_200 / 1000 + 30 * 2.0 + 3 * 5.0 + 3 * 10.0
    assert e["pretrain"] == pytest.approx(pretrain) and e["cell"] == pytest.approx(cell)
    assert e["cells"] == 3 * 2 * 3 and e["total"] == pytest.approx(pretrain + 18 * cell)


# -- summary across seeds, from per-document scores ---------------------------------------------------------------
DOCS = {"ja": [10, 20, 30, 40], "code": [5, 15, 25, 35]}  # tokens per test document


def _docs(per_token: dict[str, float], noise: float) -> dict:
    """Test docs whose token-weighted loss per corpus is exactly ``per_token[c]`` (+ a zero-mean per-doc wiggle)."""
    nll = {c: [per_token[c] * t + noise * (-1) ** i * t for i, t in enumerate(ts)] for c, ts in DOCS.items()}
    return {"nll": nll, "correct": {}}


def cell_stage(seed: int, ratio: float, lr: float, base: float, optimer: float, mixture: float,
               residual: float = 0.5) -> dict:
    """A regime cell stage in the schema regime.regime_cell writes, every model's loss the same on both corpora."""
    rows = {BASE: base, OPTIMER: optimer, MIXTURE: mixture}
    return {"kind": "regime cell", "ratio": ratio, "actual_ratio": ratio * 1.001, "base_tokens": int(1000 / ratio),
            "cpt_tokens": 1000, "lr": lr, "seed": seed, "corpora": ["ja", "code"], "parameters": 123,
            "objective": "balanced", "terms": {"balanced": {"loss:ja": 1.0, "loss:code": 1.0}}, "doc_tokens": DOCS,
            "rows": {r: {"test_docs": _docs({"ja": v, "code": v}, 0.01 * seed)} for r, v in rows.items()},
            "residual": {"residual": residual}}


def _per_seed() -> dict[int, dict]:
    out = {}
    for s in (0, 1, 2):
        out[s] = {cell_name(0.3, 1e-3): cell_stage(s, 0.3, 1e-3, 4.0, 3.9, 3.8, residual=0.4 + 0.1 * s),
                  cell_name(0.003, 1e-3): cell_stage(s, 0.003, 1e-3, 4.0, 3.95, 4.0),   # no mixture gain
                  "regime-xs-en-only-lr0.001": {"size": "xs", "gap": 0.2},             # the old map: ignored
                  "optimer": {"weights": {}}}
    return out


def test_recovery_and_intervals_across_seeds():
    per = _per_seed()
    per[0][cell_name(0.3, 1e-3)]["stage_seconds"] = 90.0
    per[0]["optimer"]["stage_seconds"] = 600.0  # the main set's time is not the map's
    reg = summarise_regime(per)
    big, small = reg["cells"]
    assert (big["ratio"], small["ratio"]) == (0.3, 0.003)  # largest ratio first
    # base 4.0, OptiMer 3.9, mixture 3.8 in every seed: R = 0.1 / 0.2 exactly (the per-document wiggle sums to 0
    # per corpus and seed, but resampled documents move it, so the interval has width)
    assert big["recovery"]["mean"] == pytest.approx(0.5, rel=1e-9)
    assert big["recovery"]["low"] < 0.5 < big["recovery"]["high"] and big["recovery"]["seeds"] == 3
    assert big["gap"]["mean"] == pytest.approx(0.1) and big["gain"]["mean"] == pytest.approx(0.2)
    assert big["recovery_meaningful"] and big["seeds"] == [0, 1, 2]
    assert big["residual"] == pytest.approx({"mean": 0.5, "low": 0.4, "high": 0.6, "level": 1.0, "seeds": 3})
    assert small["gain"]["mean"] == pytest.approx(0.0, abs=1e-12) and not small["recovery_meaningful"]
    lines = "\n".join(render_regime(reg, plot="regime-map.svg"))
    assert "| 0.3 | 3,333 | 0.001 | 3 | 0.50 [" in lines
    assert "| 0.003 | 333,333 | 0.001 | 3 | not reported: the mixture's gain interval does not lie above 0 |" in lines
    assert "![R against the CPT/base token ratio](regime-map.svg)" in lines
    assert "Stage time (the first seed's includes pretraining the shared bases): seed 0 1.5 min." in lines
    assert summarise_regime({0: {"optimer": {}}}) == {} and render_regime({}) == []


def _ticks(root: ET.Element) -> list[str]:
    return [t.text for t in root.iter("{http://www.w3.org/2000/svg}text") if re.fullmatch(r"1e-?\d+", t.text or "")]


def test_the_plot_is_valid_svg_with_one_marker_per_finite_point():
    reg = summarise_regime(_per_seed())
    svg = regime_svg(reg)
    root = ET.fromstring(svg)  # well-formed XML
    ns = "{http://www.w3.org/2000/svg}"
    titles = [c.find(f"{ns}title").text for c in root.iter(f"{ns}circle") if c.find(f"{ns}title") is not None]
    assert len(titles) == 1 and titles[0].startswith("CPT lr 0.001: R 0.500 at 0.3")  # R=0/0 (nan) has no marker
    assert _ticks(root) == ["1e-3", "1e-2", "1e-1", "1e0"]  # decades of the log axis, the sweep's whole range


def test_the_smollm2_cell_is_a_point_at_the_far_end():
    """The committed real-base cell (results/smollm2-64k, three seeds) joins the map at ratio 65,536 / 2e12."""
    point = real_cell_point(ROOT / "results" / "smollm2-64k")
    assert point["ratio"] == pytest.approx(65_536 / 2e12) and point["lr"] == 1e-4 and point["seeds"] == [0, 1, 2]
    # its summary: base - OptiMer 0.5544 and base - mixture 0.6302 over the seeds (per-seed R 0.8995, 0.8768, 0.8636)
    assert point["recovery"]["mean"] == pytest.approx(0.5544 / 0.6302, abs=1e-3)
    assert point["recovery"]["low"] == pytest.approx(0.83, abs=0.01) and point["recovery_meaningful"]  # seeds too
    reg = summarise_regime({0: {**_per_seed()[0], "regime-real-smollm2-64k": point}})
    assert reg["real"] == [point]
    svg = regime_svg(reg)
    assert _ticks(ET.fromstring(svg)) == [f"1e{e}" for e in range(-8, 1)] and "SmolLM2-135M, lr 0.0001" in svg
    assert "| 3.3e-08 (SmolLM2-135M-Instruct.Q4_1.gguf, 2e+12 pretraining tokens) |" in "\n".join(render_regime(reg))
    assert real_cell_point(ROOT / "no-such-results") is None


def test_findings_cli_writes_the_plot_only_where_told(tmp_path):
    import argparse
    import json

    from optimer_lib.experiments.cli_args import add_findings_parser

    res = tmp_path / "results"
    (res / "config.json").parent.mkdir()
    (res / "config.json").write_text(json.dumps({"seeds": [0, 1, 2]}))
    per = _per_seed()
    per[0]["optimer"]["stage_seconds"], per[0][cell_name(0.3, 1e-3)]["stage_seconds"] = 60.0, 120.0
    for s, stages in per.items():
        (res / f"seed-{s}" / "stages").mkdir(parents=True)
        for name, v in stages.items():
            (res / f"seed-{s}" / "stages" / f"{name}.json").write_text(json.dumps(v))
    before = sorted(res.rglob("*"))
    parser = argparse.ArgumentParser()
    add_findings_parser(parser.add_subparsers())
    out, plot = tmp_path / "F.md", tmp_path / "plots" / "regime.svg"
    a = parser.parse_args(["findings", "--results", str(res), "--out", str(out), "--regime-plot", str(plot)])
    a.fn(a)
    assert sorted(res.rglob("*")) == before
    assert "| 0.3 | 3,333 | 0.001 | 3 | 0.50 [" in out.read_text()
    assert "results/experiments/regime-map.svg" in out.read_text()  # the committed plot, linked from FINDINGS.md
    assert "CPT lr 0.001: R 0.500" in plot.read_text()
    from optimer_lib.experiments.findings import summarise_results

    summary = summarise_results(res)  # the main set's stage time leaves the map's out; the map has its own
    assert summary["stage_minutes"][0] == 1.0 and summary["regime"]["stage_minutes"] == {0: 2.0}
    empty = tmp_path / "empty"
    (empty / "seed-0" / "stages").mkdir(parents=True)
    (empty / "config.json").write_text(json.dumps({"seeds": [0]}))
    a = parser.parse_args(["findings", "--results", str(empty), "--out", str(out), "--regime-plot", str(plot)])
    with pytest.raises(ConfigError, match="no regime-map stages"):
        a.fn(a)



def test_findings_regime_only_writes_the_section_with_a_relative_plot_link(tmp_path):
    """``optimer findings --regime-only``: results holding the map alone (results/regime) render to the regime
    section only, its plot linked relative to --out; results without regime stages are refused."""
    import argparse
    import json

    from optimer_lib.experiments.cli_args import add_findings_parser

    res = tmp_path / "results"
    res.mkdir()
    (res / "config.json").write_text(json.dumps({"seeds": [0, 1, 2]}))
    for s, stages in _per_seed().items():
        (res / f"seed-{s}" / "stages").mkdir(parents=True)
        for name, v in stages.items():
            if name != "optimer":  # the map alone: no main-set stage
                (res / f"seed-{s}" / "stages" / f"{name}.json").write_text(json.dumps(v))
    parser = argparse.ArgumentParser()
    add_findings_parser(parser.add_subparsers())
    out, plot = tmp_path / "docs" / "REGIME.md", tmp_path / "plots" / "regime.svg"
    a = parser.parse_args(["findings", "--results", str(res), "--out", str(out), "--regime-plot", str(plot),
                           "--regime-only"])
    a.fn(a)
    text = out.read_text()
    assert text.startswith("# The regime map (seeds 0, 1, 2)\n") and "Findings at our scale" not in text
    assert "| 0.3 | 3,333 | 0.001 | 3 | 0.50 [" in text and "not measured" not in text
    assert "![R against the CPT/base token ratio](../plots/regime.svg)" in text
    assert "CPT lr 0.001: R 0.500" in plot.read_text()
    empty = tmp_path / "empty"
    (empty / "seed-0" / "stages").mkdir(parents=True)
    (empty / "config.json").write_text(json.dumps({"seeds": [0]}))
    a = parser.parse_args(["findings", "--results", str(empty), "--out", str(tmp_path / "x.md"), "--regime-only"])
    with pytest.raises(ConfigError, match="no regime-map stages"):
        a.fn(a)
    assert not (tmp_path / "x.md").exists()


def test_findings_read_the_regime_map_from_its_own_results(tmp_path, monkeypatch):
    """``optimer findings --regime results/regime``: the main set's findings with the map that ran apart (its own
    seeds) as their last section, the plot linked inside that directory; without it, a pointer to the map."""
    import json
    from pathlib import Path

    from optimer_lib.cli import main

    main_set = Path(__file__).resolve().parent / "fixtures" / "experiments-tiny"
    monkeypatch.chdir(tmp_path)
    reg = Path("res") / "regime"
    reg.mkdir(parents=True)
    (reg / "config.json").write_text(json.dumps({"seeds": [0, 1, 2]}))
    for s, stages in _per_seed().items():
        (reg / f"seed-{s}" / "stages").mkdir(parents=True)
        for name, v in stages.items():
            if name != "optimer":
                (reg / f"seed-{s}" / "stages" / f"{name}.json").write_text(json.dumps(v))
    assert main(["findings", "--results", str(main_set), "--out", "F.md", "--regime", str(reg)]) == 0
    text = Path("F.md").read_text()
    assert "## Regime map: gain recovery R" in text and "read from `res/regime`" in text
    assert "| 0.3 | 3,333 | 0.001 | 3 | 0.50 [" in text  # the map's 3 seeds, not the main set's 2
    assert "![R against the CPT/base token ratio](res/regime/regime-map.svg)" in text
    assert text.startswith("# Findings at our scale") and "| 1 | " in text
    assert main(["findings", "--results", str(main_set), "--out", "G.md"]) == 0
    assert "Not in these results: the regime map" in Path("G.md").read_text()
