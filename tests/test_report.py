"""The report: self-contained HTML with every figure, Markdown summary, FINDINGS.md, and the CLI."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from optimer_lib.cli import main
from optimer_lib.experiments.costs import CostEntry
from optimer_lib.experiments.report import PAPER, cost_ratios, ledger_of, summarise, write_all

NAMES = ["ja", "zh"]
METRICS = {"loss:ja": 3.0, "loss:zh": 3.2, "acc:math": 0.1}


def _row(kind: str, test: float, **objs: float) -> dict:
    return {"kind": kind, "dev": METRICS, "test": METRICS, "dev_objectives": {"balanced": test + 0.1, **objs},
            "test_objectives": {"balanced": test, **objs}}


def _trials(method: str, values: list[float], secs: float, trained: int = 0) -> list[dict]:
    return [CostEntry(method, tokens_trained=trained, tokens_evaluated=100, seconds=secs, objective=v).__dict__
            for v in values]


def _regime_cell() -> dict:
    """A regime-map cell (regime.regime_cell's schema): test losses base 4.0, OptiMer 3.9, mixture 3.8 (R = 0.5)."""
    def docs(loss: float) -> dict:
        return {"nll": {"ja": [loss * 10, loss * 20]}, "correct": {}}

    return {"kind": "regime cell", "ratio": 0.03, "actual_ratio": 0.03, "base_tokens": 33_000, "cpt_tokens": 1000,
            "lr": 1e-3, "seed": 0, "corpora": ["ja"], "parameters": 1000, "objective": "balanced",
            "terms": {"balanced": {"loss:ja": 1.0}}, "doc_tokens": {"ja": [10, 20]}, "residual": {"residual": 0.5},
            "rows": {"base": {"test_docs": docs(4.0)}, "OptiMer": {"test_docs": docs(3.9)},
                     "data mixture (equal total tokens)": {"test_docs": docs(3.8)}}}


def write_stages(d: Path) -> None:
    stages = {
        "pool": {"runs": {}, "costs": [CostEntry("pool", kind="train", tokens_trained=800, seconds=20).__dict__]},
        "optimer": {"weights": {"ja": 0.3, "zh": 0.1}, "values": [3.0, 2.5, 2.2, 2.4],
                    "costs": _trials("optimer", [3.0, 2.5, 2.2, 2.4], 1.0)},
        "mixture-equal_total": {"objective": 2.5, "best_ratios": {"ja": 0.6, "zh": 0.4},
                                "costs": _trials("mixture-equal_total", [2.7, 2.5], 40.0, 1600)},
        "mixture-per_run": {"objective": 2.9, "best_ratios": {"ja": 0.5, "zh": 0.5},
                            "costs": _trials("mixture-per_run", [3.1, 2.9, 3.0], 10.0, 400)},
        "baseline-ties": {"costs": _trials("ties", [2.9, 2.8], 1.5)},
        "cosine": {"names": NAMES, "matrix": [[1, 0.1], [0.1, 1]], "off_diagonal": {"min": 0.1, "max": 0.1,
                                                                                    "mean": 0.1}},
        "linearity": {"run": "ja", "rows": [{"fraction": 0.5, "t": 0.55, "cosine": 0.95, "residual": 0.3},
                                            {"fraction": 1.0, "t": 1.0, "cosine": 1.0, "residual": 0.0}]},
        "landscape": {"x": "ja", "y": "zh", "xs": [0, 0.5, 1], "ys": [0, 0.5, 1], "z": [[3, 2, 4]] * 3,
                      "within": 0.01, "share_within": 1 / 3},
        "grid": {"values": {"grid": [3.0, 2.9], "tpe": [3.0, 2.2]}, "target": 2.22, "within": 0.01,
                 "runs": {"grid": {"trials": 2, "trials_to_reach": None}, "tpe": {"trials": 2, "trials_to_reach": 2}}},
        "ratios": {"conversions": {"normalised": {"ja": 0.75, "zh": 0.25}, "token_weighted": {"ja": 0.75, "zh": 0.25}}},
        "final": {"objective": "balanced", "rows": {
            "OptiMer": _row("merge", 2.2, ja=2.9, math=3.0),
            "OptiMer re-optimised for ja": _row("merge", 2.4, ja=2.5, math=3.1),
            "OptiMer re-optimised for math": _row("merge", 2.5, ja=3.0, math=2.0),
            "baseline: uniform": _row("merge", 2.6),
            "data mixture (equal_total) best": _row("mixture", 2.3),
            "data mixture (equal_total) uniform ratios": _row("mixture", 2.45),
            "α-ratio mixture (normalised)": _row("mixture", 2.4)}},
        "regime-xs-en-only-lr0.001": {"size": "xs", "recipe": "en-only", "lr": 1e-3, "parameters": 1000, "gap": 0.2},
        "regime-r0.03-lr0.001": _regime_cell(),
    }
    (d / "stages").mkdir(parents=True)
    for name, payload in stages.items():
        (d / "stages" / f"{name}.json").write_text(json.dumps(payload))


def test_summary_numbers(tmp_path):
    write_stages(tmp_path)
    from optimer_lib.experiments.report import load_stages

    stages = load_stages(tmp_path)
    s = summarise(stages)
    f = s["findings"]
    assert set(f) == set(PAPER)
    assert all(f[i]["holds"] for i in range(1, 7))
    r = cost_ratios(stages, ledger_of(stages))
    # mixture (a) reaches its best 2.5 after 2 candidates = 80 s; OptiMer reaches 2.5 at its 2nd trial = 2 s
    assert r["equal_total"]["seconds"]["mixture"] == 80 and r["equal_total"]["seconds"]["optimer"] == 2
    assert r["equal_total"]["seconds"]["ratio"] == 40 and r["equal_total"]["seconds"]["ratio_with_pool"] == 80 / 22
    assert r["per_run"]["seconds"]["ratio"] == 20 / 2  # OptiMer's first trial (3.0) is not <= 2.9, its 2nd is
    assert r["equal_total"]["compute"]["mixture"] == 2 * (3 * 1600 + 100)
    assert not f[7]["holds"]  # 40x in mode (a) but only 10x in mode (b): below the paper's 15x
    assert "ratio 40x in seconds" in f[7]["ours"] and "ratio 10x in seconds" in f[7]["ours"]
    # the cell's R = (4.0 - 3.9) / (4.0 - 3.8); a stage of the old size x recipe map (no "kind") is not a cell
    assert [c["ratio"] for c in s["regime"]["cells"]] == [0.03]
    assert s["regime"]["cells"][0]["recovery"]["mean"] == pytest.approx(0.5)


def test_report_is_self_contained_with_every_figure(tmp_path):
    write_stages(tmp_path)
    t0 = time.perf_counter()
    summary = write_all(tmp_path)
    assert time.perf_counter() - t0 < 60
    html = (tmp_path / "report.html").read_text()
    assert not re.search(r"<script[^>]+src=", html)  # nothing fetched: every script is inline
    assert not re.search(r"<link[^>]+href=[\"']?https?:", html)
    assert len(summary["figures"]) == 10
    assert html.count('class="plotly-graph-div"') == len(summary["figures"])
    for title in summary["figures"]:
        assert title in html
    assert "Plotly.newPlot" in html and len(html) > 1_000_000  # the bundle is inlined once
    md = (tmp_path / "report.md").read_text()
    assert "| OptiMer | 2.3 | 2.2 |" in md and all(t in md for t in summary["figures"])
    # The summary is rendered as HTML (headings and tables), not dumped as preformatted text.
    assert "<pre>" not in html and "<h1>OptiMer experiments report</h1>" in html
    tables = sum(line.startswith("|---") for line in md.splitlines())
    assert "<td>OptiMer</td>" in html and html.count("<table>") == tables > 0
    findings = (tmp_path / "FINDINGS.md").read_text()
    for i in PAPER:
        assert f"## {i}." in findings
    assert "optimer experiments --workdir" in findings and "Regime map" in findings
    assert json.loads((tmp_path / "summary.json").read_text())["findings"]["1"]["holds"] is True
    assert len(json.loads((tmp_path / "costs.json").read_text())) == 12


def test_findings_say_when_a_finding_fails(tmp_path):
    write_stages(tmp_path)
    cos = tmp_path / "stages" / "cosine.json"
    cos.write_text(json.dumps({"names": NAMES, "matrix": [[1, 0.6], [0.6, 1]],
                               "off_diagonal": {"min": 0.6, "max": 0.6, "mean": 0.6}}))
    write_all(tmp_path)
    text = (tmp_path / "FINDINGS.md").read_text()
    section = text.split("## 2.")[1].split("## 3.")[0]
    assert "Holds at our scale: no" in section and "Likely reason" in section


def test_cli_report(tmp_path, capsys):
    write_stages(tmp_path)
    assert main(["report", str(tmp_path), "--findings", str(tmp_path / "F.md")]) == 0
    assert "10 figures" in capsys.readouterr().out and (tmp_path / "F.md").is_file()
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no stages/ folder" in capsys.readouterr().err


@pytest.mark.slow
def test_experiments_quick_smoke(tmp_path):
    """The whole quick experiment set on the real embedded assets (several minutes on 2 cores)."""
    from optimer_lib.data import assets_dir

    if not (assets_dir() / "base" / "config.json").exists():
        pytest.skip("embedded assets are not built")
    assert main(["experiments", "--quick", "--workdir", str(tmp_path / "exp")]) == 0
    html = (tmp_path / "exp" / "seed-0" / "report.html").read_text()
    assert html.count('class="plotly-graph-div"') >= 9
    assert (tmp_path / "exp" / "seed-0" / "stages" / "final.json").is_file()
    assert (tmp_path / "exp" / "FINDINGS.md").is_file()


@pytest.mark.slow
def test_regime_map_tiny(tmp_path):
    """The quick regime map end to end on the embedded assets: one stable pretraining run with a checkpoint and a
    decay branch per base, two cells (CPT runs, search, equal-token mixture, span residual, per-document test
    scores), R across seeds, FINDINGS.md's regime section and the plot."""
    from optimer_lib.data import assets_dir
    from optimer_lib.experiments.regime_report import MIXTURE
    from optimer_lib.experiments.run import ExperimentConfig, run_experiments

    if not (assets_dir() / "base" / "config.json").exists():
        pytest.skip("embedded assets are not built")
    cfg = ExperimentConfig.quick(tmp_path / "exp")
    cfg.corpora, cfg.eval_corpora = ("ja", "math"), ("en", "ja", "math")
    cfg.search_limit = cfg.rescore_limit = cfg.final_limit = 5
    summary = run_experiments(cfg, regime_map=True)
    wd = tmp_path / "exp"
    bases = json.loads((wd / "seed-0" / "stages" / "regime-bases.json").read_text())
    assert [b["tokens"] for b in bases["bases"]] == [8192, 81_920] and bases["shared_across_seeds"]
    root = wd / "regime-bases" / "h32-l1-i64"  # beside the seed folders
    branch = json.loads((root / "base-8192" / "training.json").read_text())
    assert branch["from"] == str(root / "stable-73728" / "trajectory" / "step-000003")  # 6,144 tokens in
    assert branch["tokens_trained"] == 2048 and branch["config"]["schedule"] == "cosine"
    cell = json.loads((wd / "seed-0" / "stages" / "regime-r0.5-lr0.001.json").read_text())
    assert set(cell["rows"]) == {"base", "OptiMer", MIXTURE}
    t = {r: v["test_objective"] for r, v in cell["rows"].items()}
    assert cell["gap"] == pytest.approx(t["OptiMer"] - t[MIXTURE])
    assert cell["recovery"] == pytest.approx((t["base"] - t["OptiMer"]) / (t["base"] - t[MIXTURE]))
    assert 0 <= cell["residual"]["residual"] <= 1 and cell["cpt_tokens"] == 4096 and cell["base_tokens"] == 8192
    reg = summary["findings_summary"]["regime"]
    assert [c["ratio"] for c in reg["cells"]] == [0.5, 0.05]
    assert reg["cells"][0]["recovery"]["mean"] == pytest.approx(cell["recovery"], rel=1e-6)  # R of the doc means
    assert "## Regime map: gain recovery R against the CPT/base token ratio" in (wd / "FINDINGS.md").read_text()
    assert (wd / "regime-map.svg").read_text().startswith("<svg") and (wd / "seed-0" / "regime-map.svg").is_file()
    assert "Regime map: gain recovery R against the CPT/base token ratio" in summary["figures"]


@pytest.mark.slow
def test_experiments_tiny_main_set(tmp_path):
    """Every main stage at toy sizes on the embedded assets (about a minute): stages, report, findings."""
    from optimer_lib.data import assets_dir
    from optimer_lib.experiments.run import ExperimentConfig, run_experiments

    if not (assets_dir() / "base" / "config.json").exists():
        pytest.skip("embedded assets are not built")
    cfg = ExperimentConfig.quick(tmp_path / "exp")
    cfg.corpora, cfg.eval_corpora, cfg.reopt_objectives = ("ja", "math"), ("en", "ja", "math"), ("ja",)
    cfg.cpt_tokens, cfg.trials, cfg.reopt_trials, cfg.grid_trials = 4096, 3, 2, 4
    cfg.landscape_points, cfg.mixture_candidates = 2, {"equal_total": 1, "per_run": 1}
    cfg.search_limit = cfg.rescore_limit = cfg.final_limit = 5
    summary = run_experiments(cfg)
    seed = tmp_path / "exp" / "seed-0"
    stages = {p.stem for p in (seed / "stages").glob("*.json")}
    assert {"pool", "optimer", "cosine", "linearity", "landscape", "grid", "ratios", "reopt", "instruction",
            "final"} <= stages
    assert set(summary["findings"]) == set(PAPER) and len(summary["figures"]) == 9
    assert {"1", "1b", "2", "3", "4", "5", "6", "7", "it"} <= set(summary["findings_summary"]["findings"])
    costs = json.loads((seed / "costs.json").read_text())
    assert {c["method"] for c in costs} >= {"pool", "optimer", "mixture-equal_total", "mixture-per_run", "ties"}
    rows = json.loads((seed / "stages" / "final.json").read_text())["rows"]
    assert {"OptiMer", "baseline: dare", "data mixture (per_run) best", "α-ratio mixture (normalised)",
            "OptiMer + τ_IT (α searched with it)"} <= set(rows)
    t0 = time.perf_counter()
    run_experiments(cfg)  # every stage cached: only the report is re-rendered
    assert time.perf_counter() - t0 < 30


def test_cost_finding_when_merging_never_reaches_the_mixture(tmp_path):
    """The ratio is undefined then; the reason says so and times the reverse race instead."""
    write_stages(tmp_path)
    from optimer_lib.experiments.report import load_stages

    stages = load_stages(tmp_path)
    stages["optimer"]["objective"] = 3.2
    stages["optimer"]["costs"] = _trials("optimer", [3.4, 3.2, 3.3], 1.0)  # never <= 2.5 nor <= 2.9
    f7 = summarise(stages)["findings"][7]
    assert not f7["holds"] and f7["ours"].count("OptiMer never reached it") == 2
    # mixture (a) is at 2.7 after its first 40 s candidate (<= 3.2); mixture (b) at 3.1 after 10 s (<= 3.2)
    assert "ratio is undefined" in f7["reason"] and "40 s (equal_total), 10 s (per_run)" in f7["reason"]
    # the reverse race in FINDINGS.md's terms: the mixture's seconds to reach OptiMer's best (3.2, at 2 s) over 2 s
    ratios = cost_ratios(stages, ledger_of(stages))
    assert ratios["equal_total"]["seconds"]["reverse_ratio"] == pytest.approx(40 / 2)
    assert ratios["per_run"]["seconds"]["reverse_ratio"] == pytest.approx(10 / 2)
    assert ratios["equal_total"]["seconds"]["ratio"] is None


def test_selection_reads_dev_only(tmp_path):
    """Two mixtures and two α-ratio mixtures whose test scores would flip the choice: the report picks on dev."""
    write_stages(tmp_path)
    from optimer_lib.experiments.report import load_stages

    stages = load_stages(tmp_path)
    rows = stages["final"]["rows"]
    # per_run: better on dev (2.0 < 2.4) but worse on test (2.6 > 2.3) than equal_total
    rows["data mixture (per_run) best"] = {**_row("mixture", 2.6), "dev_objectives": {"balanced": 2.0}}
    rows["α-ratio mixture (token_weighted)"] = {**_row("mixture", 2.0), "dev_objectives": {"balanced": 9.0}}
    f = summarise(stages)["findings"]
    assert "best mixture (data mixture (per_run) best) 2.6" in f[1]["ours"]  # dev's pick, though test prefers the other
    assert f[1]["holds"]  # OptiMer 2.2 beats the dev-chosen mixture's 2.6 on test
    assert "retrained with α ratios 2.4" in f[5]["ours"]  # normalised (dev 2.5), not token_weighted (test 2.0)
    del rows["data mixture (per_run) best"]["dev_objectives"]
    with pytest.raises(ValueError, match="no dev objective"):
        summarise(stages)
