"""The experiment set's granularity stage (per-layer-group vs per-vector weights, issue 19): trial-equivalents, the
stage on a tiny pool, its place in the set, and its finding in FINDINGS.md from made-up stage JSONs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_gradient import SUITE, _merger

from optimer_lib.experiments import granularity as gr
from optimer_lib.experiments.findings import CRITERIA, summarise_results
from optimer_lib.experiments.findings_report import render_findings, write_findings
from optimer_lib.scoring.evaluate import EvalSuite, evaluate_suite
from optimer_lib.scoring.objectives import Objective
from optimer_lib.search.gradient import default_steps
from optimer_lib.search.study import SearchConfig

LOSS = {"loss:ja": 1.0, "acc:math": 1.0}  # (loss:ja − acc:math) / 2


# -- trial-equivalents and intervals -------------------------------------------------------------------------------
def test_equivalents_count_trials_to_within_tol_of_own_best_plus_gradients():
    values = [4.0, 3.5, 3.1, 3.1005, 3.0999, 3.0998]
    # best 3.0998; within 0.1 %: <= 3.1029, first reached at trial 3 (3.1)
    assert gr.equivalents(values, 0, 0.0) == 3
    assert gr.equivalents(values, 5, 2.5) == pytest.approx(3 + 12.5)
    assert gr.equivalents(values, 0, 0.0, tol=0.0) == 6
    assert gr.equivalents([3.0], 2, 1.0) == 3
    assert gr.equivalents([None, 3.2, None, 3.0], 1, 2.0) == 4 + 2.0  # a failed trial still counts as a trial
    assert math.isnan(gr.equivalents([None], 1, 1.0))


def test_one_gradient_price_the_dearest_measured():
    rows = {"vector": {"grad_evals": 2, "gradient_seconds": 3.0, "trial_seconds": [1.0, 2.0]},  # 1.5 / 1.5 = 1.0
            "layer-groups:4": {"grad_evals": 4, "gradient_seconds": 12.0, "trial_seconds": [1.5]},  # 3 / 1.5 = 2.0
            "tpe": {"grad_evals": 0, "gradient_seconds": 0.0, "trial_seconds": [1.0]}}
    assert gr.price(rows["vector"]) == pytest.approx(1.0) and gr.price(rows["tpe"]) == 0.0
    assert gr.charge(rows) == pytest.approx(2.0)


def test_objective_interval_is_the_objective_of_pooled_means():
    seeds = [{"nll:ja": [30.0, 32.0], "tok:ja": [10.0, 10.0], "acc:math": [1.0, 0.0]},
             {"nll:ja": [34.0, 36.0], "tok:ja": [10.0, 10.0], "acc:math": [1.0, 0.0]}]
    iv = gr.objective_interval(LOSS, seeds, n_boot=200)
    # loss:ja = mean nll / mean tokens = (30 + 32 + 34 + 36)/4 / 10 = 3.3; acc = 0.5 -> (3.3 − 0.5) / 2 = 1.4
    assert iv.mean == pytest.approx(1.4) and iv.low <= 1.4 <= iv.high and iv.seeds == 2
    assert gr.stacked(seeds)["nll:ja"] == [[30.0, 32.0], [34.0, 36.0]]
    worse = [{**s, "nll:ja": [x + 8.0 for x in s["nll:ja"]]} for s in seeds]
    d = gr.difference_interval(LOSS, seeds, worse, n_boot=200)
    # every document 0.8 nats per token worse: (−0.8) / 2 = −0.4 in every draw, a point interval
    assert d.mean == pytest.approx(-0.4) and d.low == pytest.approx(-0.4) and d.high == pytest.approx(-0.4)


# -- the stage -----------------------------------------------------------------------------------------------------
def test_stage_on_a_tiny_pool(tiny_tokenizer, tmp_path):
    """Two grad searches (3 vectors; 2-block model, layer-groups:2 = 4 groups) with one budget; the dev-chosen best
    of each scored per document on dev and test (another suite), counted in trial-equivalents."""
    merger = _merger("llama", tiny_tokenizer, torch.float32)
    test = EvalSuite(texts={"en": [t.upper() for t in SUITE.texts["en"]][:5], "code": SUITE.texts["code"]},
                     qa=SUITE.qa)
    obj = Objective(terms={"loss:en": 1.0, "loss:code": 1.0, "acc:math": 1.0})
    kw = {"trials": 6, "seed": 0, "search_limit": 3, "rescore_limit": None, "top_k": 2, "sampler": "grad"}
    cfgs = {g: SearchConfig(granularity=g, workdir=tmp_path / g.replace(":", "-"), study_name=g, **kw)
            for g in ("vector", "layer-groups:2")}
    out = gr.run_granularity(merger, tiny_tokenizer, SUITE, test, obj, cfgs, limit=None)
    rows = out["rows"]
    assert list(rows) == ["vector", "layer-groups:2"] and out["limit"] is None
    assert rows["vector"]["n_weights"] == 3 and rows["layer-groups:2"]["n_weights"] == 3 * 4
    assert out["doc_tokens"]["en"] and len(out["doc_tokens"]["en"]) == 5 and len(out["dev_doc_tokens"]["en"]) == 7
    price = max(r["gradient_seconds"] / r["grad_evals"] / (sum(r["trial_seconds"]) / len(r["trial_seconds"]))
                for r in rows.values())
    assert out["charge"] == pytest.approx(price) and price > 0
    for g, r in rows.items():
        assert r["trials"] == r["trial_budget"] == 6 and len(r["values"]) == 6 and r["sampler"] == "grad"
        assert r["grad_evals"] == default_steps(6) == 2
        # the dev choice of the two-fidelity search (its best.json), re-scored on every dev document
        assert r["weights"] == json.loads((cfgs[g].workdir / "best.json").read_text())["weights"]
        assert r["objective"] == r["values"][r["best_trial"]]
        assert r["dev_objective"] == pytest.approx(r["objective_rescored"], rel=1e-5)
        merger.set_weights(r["weights"])
        assert r["test_objective"] == pytest.approx(obj(evaluate_suite(merger.model, tiny_tokenizer, test)), rel=1e-5)
        assert [len(x) for x in r["test_docs"]["nll"].values()] == [5, 3]
        assert len(r["test_docs"]["correct"]["math"]) == 1
        best = min(r["values"])
        reached = next(i for i in range(1, 7) if min(r["values"][:i]) <= best * 1.001)
        assert r["equivalents"] == pytest.approx(reached + 2 * price)


def test_the_set_runs_the_stage_after_final_with_the_main_searchs_budget(monkeypatch, tmp_path):
    from optimer_lib.experiments import run as run_mod

    cfg = run_mod.seed_config(run_mod.ExperimentConfig.quick(tmp_path), 0)
    exp = run_mod.Experiments(cfg)
    names: list[str] = []
    monkeypatch.setattr(run_mod.Experiments, "stage", lambda self, name, fn: names.append(name) or {})
    exp.run_main()
    assert names[-2:] == ["final", "granularity"] and cfg.granularity_groups == 4
    exp.cfg.granularity_groups, names[:] = 0, []
    exp.run_main()
    assert "granularity" not in names
    exp.cfg.granularity_groups = 4
    seen: dict = {}
    monkeypatch.setattr(gr, "run_granularity", lambda *a, **k: seen.update(args=a, kw=k) or {})
    monkeypatch.setattr(run_mod, "load_eval_suite", lambda corpora, split: f"{split} {','.join(corpora)}")
    exp.__dict__.update(pool=SimpleNamespace(merger="m", tokenizer="t"), dev="dev", objective="obj")
    exp.granularity_stage()
    cfgs, main = seen["args"][5], exp.search_config("optimer", cfg.trials)
    assert list(cfgs) == ["vector", "layer-groups:4"] and seen["kw"] == {"limit": cfg.final_limit}
    assert seen["args"][3] == "test en,ja,zh,math,code"
    for g, c in cfgs.items():
        assert (c.sampler, c.granularity, c.trials, c.seed) == ("grad", g, cfg.trials, cfg.seed)
        assert (c.search_limit, c.rescore_limit, c.top_k) == (main.search_limit, main.rescore_limit, main.top_k)
    assert len({c.workdir for c in cfgs.values()}) == 2


# -- the finding -----------------------------------------------------------------------------------------------------
TOKENS = {"en": [10, 10]}


def _docs(nll: list[float]) -> dict:
    return {"nll": {"en": list(nll)}, "correct": {}}


def _grad_row(nll: list[float], values: list[float], gradient_seconds: float, n_weights: int) -> dict:
    return {"n_weights": n_weights, "values": values, "grad_evals": 2, "gradient_seconds": gradient_seconds,
            "trial_seconds": [1.0] * len(values), "dev_docs": _docs([x - 1.0 for x in nll]), "test_docs": _docs(nll)}


def _results(tmp_path: Path, *, layers_nll=(33.0, 37.0), layers_values=None, mixture_nll=(28.0, 32.0),
             granularity_seeds=(0, 1, 2)) -> Path:
    """Three seeds; seed s adds s nats to every document of every row (one token-weighted loss shift, 0.1·s)."""
    d = tmp_path / "results"
    (d).mkdir()
    (d / "config.json").write_text(json.dumps({"seeds": [0, 1, 2], "final_limit": 2}))
    for s in (0, 1, 2):
        stages = d / f"seed-{s}" / "stages"
        stages.mkdir(parents=True)

        def row(nll, dev, s=s):
            return {"test_docs": _docs([x + s for x in nll]), "dev_objectives": {"balanced": dev}}

        final = {"objective": "balanced", "terms": {"balanced": {"loss:en": 1.0}}, "doc_tokens": TOKENS, "rows": {
            "base": row((38.0, 42.0), 4.0), "OptiMer": row((37.0, 41.0), 3.9),
            "data mixture (equal_total) best": row(mixture_nll, 3.0),
            "data mixture (per_run) best": row((20.0, 24.0), 3.5)}}  # better on test, worse on dev: never chosen
        (stages / "final.json").write_text(json.dumps(final))
        (stages / "optimer.json").write_text(json.dumps({"values": [5.0, 3.0, 3.0, 2.0], "weights": {"a": 0.1}}))
        if s in granularity_seeds:
            vec = _grad_row([36.0 + s, 40.0 + s], [5.0, 4.0, 3.0, 3.5], 2.0, 4)  # price 1.0
            lay = _grad_row([x + s for x in layers_nll], layers_values or [5.0, 4.0, 3.5, 2.9, 3.0, 2.8], 3.0, 24)
            stage = {"doc_tokens": TOKENS, "dev_doc_tokens": TOKENS, "rows": {"vector": vec, "layer-groups:4": lay}}
            (stages / "granularity.json").write_text(json.dumps(stage))
    return d


def test_finding_holds_with_every_number_computed_here(tmp_path):
    res = _results(tmp_path)
    f = summarise_results(res)["findings"]["layers"]
    n = f["numbers"]
    # test loss per token: base 4.0, mixture 3.0, vector 3.8, layers 3.5 (+0.1 per seed index): shifts cancel
    assert n["difference"].mean == pytest.approx(-0.3) and n["difference"].high == pytest.approx(-0.3)
    assert n["rows"]["vector"]["test"].mean == pytest.approx(3.8 + 0.1)
    assert n["rows"]["vector"]["dev"].mean == pytest.approx(3.7 + 0.1)  # dev documents: 1 nat lower each
    assert n["mixture_gain"].mean == pytest.approx(1.0) and n["mixture_gain"].low == pytest.approx(1.0)
    assert n["rows"]["vector"]["recovery"].mean == pytest.approx(0.2)  # (4.0 − 3.8) / (4.0 − 3.0)
    assert n["rows"]["layer-groups:4"]["recovery"].mean == pytest.approx(0.5)
    # one price, the dearer: layers 3.0 s / 2 evals / 1 s = 1.5 trials. vector: best 3.0 at trial 3 -> 3 + 2*1.5;
    # layers: best 2.8 at trial 6 -> 6 + 3 = 9; ratio 1.5 <= 2
    assert n["rows"]["vector"]["equivalents"] == [6.0] * 3 and n["rows"]["layer-groups:4"]["equivalents"] == [9.0] * 3
    assert n["ratio"].high == pytest.approx(1.5)
    assert n["rows"]["OptiMer"]["equivalents"] == [4.0] * 3  # TPE: best 2.0 at trial 4, no gradients
    assert f["verdicts"] == ["holds", "holds"] and f["verdict"] == "holds" and f["seeds"] == [0, 1, 2]
    text = render_findings(summarise_results(res))
    assert "| layers | per-layer-group weights" in text and "| holds |" in text and "provisional" not in text
    section = text.split("\n## layers. ")[1]
    assert section.index("- Criterion: ") < section.index("- Ours: ") < section.index("- Verdict: **holds**")
    assert CRITERIA["layers"] in section.split("- Ours: ")[0]
    assert "| layer-groups:4, grad | 24 | 3.5000 [" in section and "| 0.50 [0.50, 0.50] | 9.0 (9.0–9.0) |" in section
    assert "| per vector, grad | 4 |" in section and "| OptiMer (per vector, TPE) | 1 | n/a |" in section
    json.dumps(write_findings(res, tmp_path / "F.md"))  # intervals became plain dicts


@pytest.mark.parametrize(("kw", "verdicts"), [
    ({"layers_nll": (37.0, 41.0)}, ["does not hold", "holds"]),  # layers 3.9 > vector 3.8 on every document
    ({"layers_values": [5.0] * 11 + [2.8]}, ["holds", "does not hold"]),  # 12 + 3 = 15 vs 6: 2.5x in every seed
    ({"layers_values": [5.0] * 8 + [2.8]}, ["holds", "holds"]),  # 9 + 3 = 12 vs 6: exactly 2x passes "at most 2x"
])
def test_finding_fails_when_its_criterion_does(tmp_path, kw, verdicts):
    f = summarise_results(_results(tmp_path, **kw))["findings"]["layers"]
    assert f["verdicts"] == verdicts and f["verdict"] == ("holds" if verdicts == ["holds"] * 2 else "does not hold")


def test_no_recovery_without_a_mixture_gain_and_provisional_on_fewer_seeds(tmp_path):
    res = _results(tmp_path, mixture_nll=(38.0, 42.0), granularity_seeds=(0, 1))  # mixture == base on test
    summary = summarise_results(res)
    f = summary["findings"]["layers"]
    assert "recovery" not in f["numbers"]["rows"]["vector"] and "so R is not reported" in f["ours"]
    assert f["seeds"] == [0, 1] and not summary["provisional"]  # the set has 3 seeds; this stage 2 so far
    text = render_findings(summary)
    assert text.count("(provisional: 2 of 3 seeds)") == 2  # its table row and its section, nothing else
    assert "- Verdict: **holds** (provisional: 2 of 3 seeds)" in text


def test_no_row_before_the_stage_runs(tmp_path):
    res = _results(tmp_path, granularity_seeds=())
    summary = summarise_results(res)
    assert "layers" not in summary["findings"] and "| layers |" not in render_findings(summary)
