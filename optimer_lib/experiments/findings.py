"""FINDINGS.md from committed result JSONs: every finding across seeds, with intervals and pre-stated criteria.

    optimer findings --results results/experiments --out FINDINGS.md     # renders; writes only to --out

    from optimer_lib.experiments.findings import summarise_results
    summary = summarise_results(Path("results/experiments"))   # reads config.json + seed-*/stages/*.json
    # rendering: optimer_lib.experiments.findings_report.render_findings(summary)

Input: a results directory as :func:`optimer_lib.experiments.run.run_experiments` writes it (``config.json`` and
``seed-<s>/stages/*.json``; ``--results`` copies exactly these). Nothing is re-run and nothing is read from the
checkout. Each criterion is stated before its number and can fail: a finding *holds* only when the whole 95%
interval (over test documents and seeds, :mod:`optimer_lib.experiments.stats`) lies on the claimed side; it
*does not hold* when the whole interval lies on the other side; otherwise it is *inconclusive*. A statistic
without documents (a cosine, a trial count, a cost ratio) is claimed "in every seed": it holds when every seed
lies on the claimed side and does not hold when any seed does not. Which rows are
compared (the best mixture, the α-ratio conversion) is chosen per seed on the dev objective only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from optimer_lib.experiments import docscores as ds
from optimer_lib.experiments import granularity as gr
from optimer_lib.experiments import stats as st
from optimer_lib.experiments.findings_data import Samples, dev_pick, fixed, load_results
from optimer_lib.experiments.regime_report import summarise_regime
from optimer_lib.experiments.report import PAPER_COST_RATIO, cost_ratios, ledger_of
from optimer_lib.experiments.stats import fmt_interval

COSINE_MAX, LINE_MIN_COS, LINE_T_TOL, GAIN_SHARE = 0.31, 0.9, 0.1, 0.1
# A verdict on fewer seeds than this is printed as provisional (the protocol asks for 3: CPT and search seed).
MIN_SEEDS = 3
MERGE_BASELINES = {"task_arithmetic": "baseline: task_arithmetic", "ties": "baseline: ties", "dare": "baseline: dare"}
IT_ROWS = ("base", "instruct (base + τ_IT)", "OptiMer", "OptiMer α + τ_IT (α searched without it)",
           "OptiMer + τ_IT (α searched with it)")
CRITERIA = {
    "1": "OptiMer's test objective minus the dev-chosen best data mixture's, and minus uniform averaging's: each "
         "95% interval lies below 0",
    "1b": "OptiMer minus each other merge method (task arithmetic, TIES, DARE; the same sampler, seeds and trial "
          "budget): each 95% interval lies below 0",
    "2": f"the largest |pairwise cosine| of the distribution vectors is at most {COSINE_MAX} in every seed",
    "3": f"at every intermediate checkpoint of the trajectory, cos(θ_k − θ_base, τ) >= {LINE_MIN_COS} and the "
         f"fitted t is within ±{LINE_T_TOL} of the fraction of training, in every seed",
    "4": f"with a tolerance of {GAIN_SHARE:.0%} of OptiMer's dev gain over the base, TPE comes within the tolerance "
         "of the best value either search found in fewer trials than the grid, in every seed (a grid that never "
         "gets there counts as one trial more than it ran; a grid whose best point is the base itself, α = 0, in "
         "every seed never sampled near the optimum, so the comparison cannot fail: inconclusive)",
    "5": "test objective of the mixture retrained with α as ratios (dev-chosen conversion) minus the uniform-ratio "
         "mixture at the same total tokens: the 95% interval lies below 0",
    "6": "for each objective, the pool's search for that objective beats the searches for the other objectives "
         "on it (test): every paired 95% interval lies below 0",
    "7": f"search cost (seconds) for the mixture search to reach its best dev objective over OptiMer's cost to "
         f"reach the same value: at least {PAPER_COST_RATIO:g}x in every budget mode and seed (never reached: 0x)",
    "it": "merging the instruction vector at weight 1 (the paper's recipe) raises chat-template QA accuracy: the "
          "95% interval of (with − without) lies above 0",
    "layers": gr.CRITERION,
}


_iv = fmt_interval


def _rng(iv: st.Interval, nd: int = 3, unit: str = "") -> str:
    return f"mean {iv.mean:.{nd}f}{unit}, range {iv.low:.{nd}f}{unit} to {iv.high:.{nd}f}{unit} over {iv.seeds} seed(s)"


# -- findings -------------------------------------------------------------------------------------------------
def _finding(verdicts: list[str], ours: str, **extra: Any) -> dict[str, Any]:
    return {"verdict": st.combine(verdicts), "verdicts": verdicts, "ours": ours, **extra}


def _f1(sm: Samples, terms: dict[str, float],
        costs: dict[str, dict[str, float]] | None = None) -> dict[str, Any] | None:
    mix = dev_pick(sm, "data mixture", "best")
    if not (sm.has(fixed("OptiMer")) and sm.has(fixed("baseline: uniform")) and sm.has(mix)):
        return None
    opt, uni, base = fixed("OptiMer"), fixed("baseline: uniform"), fixed("base")
    d_mix, d_uni = sm.diff(opt, mix, terms), sm.diff(opt, uni, terms)
    crit = st.Criterion("OptiMer − mixture", "below", 0.0), st.Criterion("OptiMer − uniform", "below", 0.0)
    chosen = sorted({mix(s) for s in sm.seeds})
    out = {"optimer": sm.value(opt, terms), "mixture": sm.value(mix, terms), "uniform": sm.value(uni, terms),
           "optimer_minus_mixture": d_mix, "optimer_minus_uniform": d_uni, "mixture_rows": chosen}
    text = (f"test objective: OptiMer {_iv(out['optimer'])}, best mixture {_iv(out['mixture'])} "
            f"({', '.join(chosen)}, chosen on dev per seed), uniform average {_iv(out['uniform'])}; "
            f"OptiMer − mixture {_iv(d_mix)}, OptiMer − uniform {_iv(d_uni)}")
    if sm.has(base):
        gain = sm.diff(base, mix, terms)
        r = sm.interval(lambda m: ds.recovery_of_means(terms, m), {"b": base, "o": opt, "x": mix}, terms)
        out.update(mixture_gain=gain, recovery=r)
        text += (f"; the mixture's gain over the base {_iv(gain)}, gain recovery R = (base − OptiMer) / "
                 f"(base − mixture) {_iv(r, 2)}" if gain.low > 0 else
                 f"; the mixture's gain over the base {_iv(gain)} does not lie above 0, so R is not reported")
    text += _budget_note(sm, terms, opt, chosen, costs or {})
    return _finding([crit[0].verdict(d_mix), crit[1].verdict(d_uni)], text, numbers=out)


def _budget_note(sm: Samples, terms: dict[str, float], opt: Callable[[int], str], chosen: list[str],
                 costs: dict[str, dict[str, float]]) -> str:
    """What each mixture search cost beside OptiMer (pool included), and OptiMer against the mixtures not chosen:
    a mixture search that cost less than OptiMer's and still leads is the comparison at a budget below OptiMer's."""
    if "optimer" not in costs:
        return ""
    parts = []
    for mode in sorted(k.removeprefix("mixture-") for k in costs if k.startswith("mixture-")):
        row, spent = f"data mixture ({mode}) best", costs[f"mixture-{mode}"]["first_model"]
        part = f"the {mode} mixture search cost {spent / 1e6:.2f}M forward-token equivalents"
        if row not in chosen and sm.has(fixed(row)):
            part += f", OptiMer − that mixture {_iv(sm.diff(opt, fixed(row), terms))}"
        parts.append(part)
    return (f". Budgets: OptiMer cost {costs['optimer']['first_model'] / 1e6:.2f}M forward-token equivalents with "
            "its pool's CPT runs; " + "; ".join(parts) if parts else "")


def _f1b(sm: Samples, terms: dict[str, float], per_seed: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    rows = {k: r for k, r in MERGE_BASELINES.items() if sm.has(fixed(r))}
    if not rows or not sm.has(fixed("OptiMer")):
        return None
    diffs = {k: sm.diff(fixed("OptiMer"), fixed(r), terms) for k, r in rows.items()}
    trials = budgets(per_seed)
    seeds = {k: sm.per_seed_diff(fixed("OptiMer"), fixed(r), terms) for k, r in rows.items()}
    text = "; ".join(f"OptiMer − {k} {_iv(d)} (per seed {', '.join(f'{v:.4f}' for v in seeds[k])}; "
                     f"{trials.get(k, '?')} trials)" for k, d in diffs.items())
    return _finding([st.Criterion(k, "below", 0.0).verdict(d) for k, d in diffs.items()],
                    text + f" (OptiMer's trials: {trials.get('optimer', '?')})", numbers=diffs)


def budgets(per_seed: dict[int, dict[str, Any]]) -> dict[str, str]:
    """Scored trials of each merge method, per seed ("100" when every seed scored 100, else "98–100"), with the
    trials that ran but were never scored (a run killed mid-trial and resumed) said apart: they cost no budget."""
    names = {"optimer": "optimer", "instruction": "instruction",
             **{k: f"baseline-{k}" for k in ("uniform", *MERGE_BASELINES)}}
    out = {}
    for k, stage in names.items():
        runs = [per_seed[s][stage] for s in per_seed if stage in per_seed[s]]
        ran = [r["trials"] for r in runs if r.get("trials") is not None]
        scored = [sum(v is not None for v in r["values"]) if "values" in r else r["trials"] for r in runs
                  if r.get("trials") is not None]
        if scored:
            out[k] = str(scored[0]) if min(scored) == max(scored) else f"{min(scored)}–{max(scored)}"
            unscored = sum(ran) - sum(scored)
            out[k] += f" (+{unscored} interrupted, never scored)" if unscored else ""
    return out


def _f2(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    seeds = [s for s in per_seed if per_seed[s].get("cosine", {}).get("off_diagonal")]
    cos = [per_seed[s]["cosine"]["off_diagonal"] for s in seeds]
    if not cos:
        return None
    worst = st.seed_range([max(abs(o["min"]), abs(o["max"])) for o in cos])
    lo, hi = min(o["min"] for o in cos), max(o["max"] for o in cos)
    return _finding([st.Criterion("largest |cosine|", "below", COSINE_MAX).every_seed(worst, inclusive=True)],
                    f"pairwise cosine {lo:.3f} to {hi:.3f} across seeds; largest |cosine| per seed: {_rng(worst)}",
                    numbers={"largest_abs": worst}, seeds=seeds)


def _f3(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    rows = {s: [r for r in per_seed[s]["linearity"]["rows"] if r.get("fraction", 1) < 1]
            for s in per_seed if "linearity" in per_seed[s]}
    rows = {s: r for s, r in rows.items() if r}
    if not rows:
        return None
    cos = st.seed_range([min(r["cosine"] for r in rs) for rs in rows.values()])
    dev = st.seed_range([max(abs(r["t"] - r["fraction"]) for r in rs) for rs in rows.values()])
    fr = sorted({round(r["fraction"], 3) for rs in rows.values() for r in rs})
    pts = "; ".join(f"at {f:.0%} of training: t " + ", ".join(f"{r['t']:.2f}" for rs in rows.values() for r in rs
                                                                 if round(r["fraction"], 3) == f)
                    + ", cos " + ", ".join(f"{r['cosine']:.3f}" for rs in rows.values() for r in rs
                                           if round(r["fraction"], 3) == f) for f in fr)
    text = f"{pts} (one value per seed); lowest cosine per seed: {_rng(cos)}; largest |t − fraction|: {_rng(dev, 2)}"
    return _finding([st.Criterion("cosine", "above", LINE_MIN_COS).every_seed(cos, inclusive=True),
                     st.Criterion("|t − fraction|", "below", LINE_T_TOL).every_seed(dev, inclusive=True)], text,
                    numbers={"min_cosine": cos, "max_t_deviation": dev}, seeds=list(rows))


def _f4(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    from optimer_lib.experiments.analysis import trials_to_reach

    margin, tols, shares, seeds, grid_at_base = [], [], [], [], 0
    for seed, stages in per_seed.items():
        if not {"grid", "landscape", "optimer"} <= set(stages) or "base_objective" not in stages["optimer"]:
            continue
        seeds.append(seed)
        tol = max(0.0, GAIN_SHARE * (stages["optimer"]["base_objective"] - stages["optimer"]["objective"]))
        runs = stages["grid"]["values"]
        best = min(v for vs in runs.values() for v in vs if v is not None and math.isfinite(v))
        n = {k: trials_to_reach(vs, best + tol) or len(vs) + 1 for k, vs in runs.items()}
        grid_best = min((v for v in runs["grid"] if v is not None and math.isfinite(v)), default=math.nan)
        grid_at_base += math.isclose(grid_best, stages["optimer"]["base_objective"], rel_tol=1e-9)
        margin.append(n["grid"] - n["tpe"])
        z = [v for row in stages["landscape"]["z"] for v in row]
        shares.append(sum(v <= min(z) + tol for v in z) / len(z))
        tols.append(tol)
    if not margin:
        return None
    m = st.seed_range(margin)
    text = (f"tolerance {_rng(st.seed_range(tols), 4)} (10% of OptiMer's dev gain over the base); trials grid − TPE "
            f"to come within it: {_rng(m, 1)}; share of the 2-D slice within the tolerance of its best: "
            f"{_rng(st.seed_range(shares), 2)}")
    if grid_at_base:  # what the margin then measures, said where it is read
        text += (f". The grid's best point is the base itself (α = 0) in {grid_at_base} of {len(seeds)} seed(s): no "
                 "point of its coarse grid lies near the optimum, so the margin measures what the grid's resolution "
                 "costs at this budget more than how sharp the landscape is; the share of the 2-D slice within the "
                 "tolerance is the direct measure of sharpness")
    verdict = st.Criterion("grid − TPE trials", "above", 0.0).every_seed(m)
    if grid_at_base == len(seeds):  # the stated exception: the comparison could not have gone the other way
        verdict = st.INCONCLUSIVE
    return _finding([verdict], text, numbers={"margin": m, "grid_best_is_base": grid_at_base}, seeds=seeds)


def _f5(sm: Samples, terms: dict[str, float]) -> dict[str, Any] | None:
    alpha, uni = dev_pick(sm, "α-ratio mixture"), dev_pick(sm, "data mixture (equal_total) uniform")
    if not (sm.has(alpha) and sm.has(uni)):
        return None
    d = sm.diff(alpha, uni, terms)
    text = (f"test objective: retrained with α ratios {_iv(sm.value(alpha, terms))} vs uniform ratios "
            f"{_iv(sm.value(uni, terms))} (same total tokens); difference {_iv(d)}")
    shown = {r for s in sm.seeds for r in sm.final[s]["rows"] if r.startswith("α-ratio mixture")}
    if len(shown) == 1:  # the "dev-chosen conversion" then chose nothing: say so where the number is read
        name = next(iter(shown)).removeprefix("α-ratio mixture ").strip("()")
        text += (f". Only one conversion was retrained ({name}): the others gave the same ratios, so no choice was "
                 "made on dev")
    return _finding([st.Criterion("α-ratio − uniform", "below", 0.0).verdict(d)], text, numbers={"difference": d})


def _f6(sm: Samples, cfg: dict[str, Any] | None = None) -> dict[str, Any] | None:
    cands = {sm.objective: "OptiMer"}
    if sm.seeds:
        cands.update({r.removeprefix("OptiMer re-optimised for "): r for r in sm.final[sm.seeds[0]]["rows"]
                      if r.startswith("OptiMer re-optimised for ")})
    if len(cands) < 2 or not all(sm.has(fixed(r)) and k in sm.terms for k, r in cands.items()):
        return None
    verdicts, parts, numbers = [], [], {}
    for k, own in cands.items():
        for other_k, other in cands.items():
            if other_k == k:
                continue
            d = sm.diff(fixed(own), fixed(other), sm.terms[k])
            numbers[f"{k}: {own} − {other}"] = d
            verdicts.append(st.Criterion(k, "below", 0.0).verdict(d))
            parts.append(f"on {k}: {k}-search − {other_k}-search {_iv(d)}")
    text = "; ".join(parts)
    main, reopt = (cfg or {}).get("trials"), (cfg or {}).get("reopt_trials")
    if main and reopt and main != reopt:  # unequal budgets, said where the numbers are read
        others = " and ".join(k for k in cands if k != sm.objective)
        text += (f". Budgets differ: the {sm.objective} search is OptiMer's ({main} trials), the {others} searches "
                 f"ran {reopt} each, so " + (f"the comparisons on {sm.objective} favour its search, and those on "
                 f"{others} are against theirs" if main > reopt else f"the comparisons on {others} favour their "
                 f"searches, and those on {sm.objective} are against its search"))
    return _finding(verdicts, text, numbers=numbers)


def _f7(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    ratios: dict[str, list[float]] = {}
    reverse: dict[str, list[float]] = {}
    seeds = []
    for seed, stages in per_seed.items():
        if "optimer" not in stages:
            continue
        for mode, r in cost_ratios(stages, ledger_of(stages)).items():
            ratios.setdefault(mode, []).append(r["seconds"]["ratio"] or 0.0)  # never reached: fails the criterion
            # the reverse race in compute: wall seconds carry a killed run's idle gap (seed 0: ~1.5 h mid-search)
            reverse.setdefault(mode, []).append(r["compute"].get("reverse_ratio") or math.nan)
            seeds += [] if seed in seeds else [seed]
    if not ratios:
        return None
    ivs = {m: st.seed_range(v) for m, v in ratios.items()}

    def mode_text(m: str, iv: st.Interval) -> str:
        never = sum(v == 0 for v in ratios[m])
        reached = [v for v in ratios[m] if v > 0]
        head = (f"OptiMer's search never reached the mixture's best dev objective in {never} of {len(ratios[m])} "
                "seed(s) (no ratio: the criterion fails there)" if never else "")
        if reached:
            head += ("; " if head else "") + f"ratio where reached {_rng(st.seed_range(reached), 1, 'x')}"
        rev = [v for v in reverse[m] if math.isfinite(v)]
        tail = (f"; the reverse race, the mixture search's compute (forward-token equivalents) to reach OptiMer's "
                f"best dev value over OptiMer's (its vector pool's training not charged): "
                f"{_rng(st.seed_range(rev), 1, 'x')}" + (f" ({len(rev)} of {len(reverse[m])} seed(s))"
                                                         if len(rev) < len(reverse[m]) else "") if rev else "")
        return f"({m}) {head}{tail}"

    text = "; ".join(mode_text(m, iv) for m, iv in ivs.items())
    return _finding([st.Criterion(m, "above", PAPER_COST_RATIO).every_seed(iv, inclusive=True)
                     for m, iv in ivs.items()], text, numbers=ivs, seeds=seeds)


def _instruction(sm: Samples, terms: dict[str, float]) -> dict[str, Any] | None:
    rows = [r for r in IT_ROWS if sm.has(fixed(r))]
    if "OptiMer + τ_IT (α searched with it)" not in rows or "OptiMer" not in rows:
        return None
    table, chat_q = {}, None
    for r in rows:
        f = sm.final[sm.seeds[0]]["rows"][r]["test_docs"]
        qa = sorted(f.get("correct", {}))
        chat_q = chat_q or sorted(f.get("chat_correct", {}))
        chat = sorted(f.get("chat_correct", {}))
        table[r] = {"objective": sm.value(fixed(r), terms),
                    **{f"acc:{q}": sm.value(fixed(r), {f"acc:{q}": -1.0}) for q in qa},
                    **{f"chat_acc:{q}": sm.value(fixed(r), {f"chat_acc:{q}": -1.0}) for q in chat}}
    with_it, without = fixed("OptiMer + τ_IT (α searched with it)"), fixed("OptiMer")
    d_obj = sm.diff(with_it, without, terms)
    verdicts, d_chat = [], {}
    for q in chat_q or []:
        d = sm.diff(without, with_it, {f"chat_acc:{q}": 1.0})  # accuracy(with) − accuracy(without)
        d_chat[q] = d
        verdicts.append(st.Criterion(f"chat accuracy {q}", "above", 0.0).verdict(d))
    text = (f"test objective with − without {_iv(d_obj)}"
            + (" (higher is worse: the recipe costs raw-text loss)" if d_obj.low > 0 else "") + "; "
            + "; ".join(f"chat-template accuracy on {q} with − without {_iv(d, 3)}" for q, d in d_chat.items()))
    for q in chat_q or []:  # how many items any model answered: at the floor, the criterion cannot show an effect
        counts = [sum(sm.final[s]["rows"][r]["test_docs"]["chat_correct"][q]) for r in rows for s in sm.seeds]
        items = len(sm.final[sm.seeds[0]]["rows"][rows[0]]["test_docs"]["chat_correct"][q])
        text += (f". Chat-template {q}: every model answers {min(counts)}–{max(counts)} of {items} items correctly "
                 "in every seed, near the floor at this scale, so this accuracy cannot show the recipe's effect either "
                 "way (not testable here)" if max(counts) <= 0.05 * items else "")
    return _finding(verdicts, text, numbers={"rows": table, "objective_difference": d_obj, "chat_difference": d_chat})


# Searches re-scored by run_search's two fidelities (top-k at the re-score limit, as OptiMer's) whose stage did not
# record it in its ledger (results before 2026-12-05): charged OptiMer's recorded re-scoring, the same work.
RESCORED_UNLEDGERED = ("task_arithmetic", "ties", "dare", "optimer-it")


# -- costs both ways ------------------------------------------------------------------------------------------
def cost_accounting(per_seed: dict[int, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Forward-token equivalents (``3·trained + evaluated``), mean over seeds, per method: ``search`` (its own
    trials and re-scoring), ``first_model`` (with the pool's CPT runs for merge methods: what the first model
    costs from scratch) and ``further_objective`` (another objective on the same pool: merging searches again,
    a mixture search trains again)."""
    acc: dict[str, list[dict[str, float]]] = {}
    for stages in per_seed.values():
        led = ledger_of(stages)
        pool = led.totals("pool")["compute"] if "pool" in led.methods() else 0.0
        rescore = sum(e.amount("compute") for e in led.of("optimer", ("rescore",)))
        for m in led.methods():
            if m == "pool":
                continue
            search = led.totals(m)["compute"]
            if m in RESCORED_UNLEDGERED and not led.of(m, ("rescore",)):  # re-scored like OptiMer, not recorded
                search += rescore
            merge = not m.startswith("mixture")
            acc.setdefault(m, []).append({"search": search, "pool": pool if merge else 0.0,
                                          "first_model": search + (pool if merge else 0.0),
                                          "further_objective": search})
    return {m: {k: float(np.mean([r[k] for r in rs])) for k in rs[0]} for m, rs in acc.items()}


# -- summary and rendering ------------------------------------------------------------------------------------
def summarise_results(d: str | Path, regime: str | Path | None = None) -> dict[str, Any]:
    """Every finding's criterion, numbers and verdict from a results directory (JSON-able via :func:`to_json`);
    ``regime``: a results directory holding the regime map alone (e.g. ``results/regime``, run with its own seeds)
    to read the map from instead of ``d``."""
    cfg, per_seed = load_results(d)
    sm = Samples(per_seed)
    terms = sm.terms.get(sm.objective, {})
    f: dict[str, Any] = {}
    costs = cost_accounting(per_seed)
    for key, fn in (("1", lambda: _f1(sm, terms, costs)), ("1b", lambda: _f1b(sm, terms, per_seed)),
                    ("2", lambda: _f2(per_seed)), ("3", lambda: _f3(per_seed)), ("4", lambda: _f4(per_seed)),
                    ("5", lambda: _f5(sm, terms)), ("6", lambda: _f6(sm, cfg)), ("7", lambda: _f7(per_seed)),
                    ("it", lambda: _instruction(sm, terms)),
                    ("layers", lambda: gr.finding(sm, per_seed, terms, dev_pick(sm, "data mixture", "best")))):
        if terms or key in ("2", "3", "4", "7"):
            out = fn()
            if out is not None:
                f[key] = out
    table = {}
    if sm.seeds and terms:
        for r in sm.final[sm.seeds[0]]["rows"]:
            if sm.has(fixed(r)):
                table[r] = sm.value(fixed(r), terms)
    return {"config": cfg, "seeds": sm.seeds, "seeds_configured": cfg.get("seeds", []), "objective": sm.objective,
            "provisional": len(sm.seeds) < MIN_SEEDS,
            "findings": f, "test_table": table, "budgets": budgets(per_seed), "costs": costs,
            "regime": summarise_regime(load_results(regime)[1] if regime is not None else per_seed),
            "regime_dir": None if regime is None else Path(regime).as_posix(),
            "stage_minutes": {s: round(sum(v.get("stage_seconds") or 0 for k, v in stages.items()  # regime: its own
                                           if not k.startswith("regime-")) / 60, 1)
                              for s, stages in per_seed.items()}}


