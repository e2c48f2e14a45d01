"""Per-layer-group against per-vector merge weights in the experiment set (issue 19): the stage and its finding.

    optimer experiments --workdir runs/experiments --seeds 0,1,2   # runs the ``granularity`` stage (cached) per seed

    from optimer_lib.experiments.granularity import run_granularity, equivalents
    out = run_granularity(pool.merger, pool.tokenizer, dev, test, objective,
                          {"vector": cfg_vector, "layer-groups:4": cfg_layers}, limit=300)
    out["rows"]["layer-groups:4"]["equivalents"]      # trial-equivalents that search took to reach its best

The stage searches one pool twice with the ``grad`` sampler (projected-gradient iterates enqueued as the first
trials, then TPE; :mod:`optimer_lib.search.gradient`): one α per vector, and one α per (vector, layer group)
(:mod:`optimer_lib.merging.groups`), each with the main OptiMer search's trial budget, seed and two-fidelity
re-scoring, so :func:`~optimer_lib.search.study.run_search` chooses each best on dev only. Each chosen merge is then
scored per document on the first ``limit`` documents of every dev and test set: the final stage's test documents,
so its base and data-mixture rows pair with these in the findings' bootstrap (R needs them).

Trial-equivalents to reach the best (:func:`equivalents`): trials, in order and at search fidelity, until the
best-so-far comes within :data:`TOL` (0.1 %) of the run's own best, plus every gradient evaluation of the warm start
at its measured price in trials (seconds per gradient evaluation / mean seconds per trial, :func:`price`). Both
granularities run the same forward and backward pass per gradient evaluation (a per-group partial sums the same
products into more buckets), so one price is charged to both: the dearer of the two measured (:func:`charge`),
which keeps wall-clock noise of a shared machine out of the ratio. The finding (:func:`finding`, rendered by
``optimer findings``) compares the two searches' test objectives with a paired bootstrap over documents and seeds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from optimer_lib.experiments import docscores as ds
from optimer_lib.experiments import stats as st
from optimer_lib.experiments.analysis import trials_to_reach
from optimer_lib.experiments.stats import fmt_interval as _iv
from optimer_lib.merging.groups import Granularity
from optimer_lib.search import record

if TYPE_CHECKING:
    from optimer_lib.experiments.findings_data import Samples
    from optimer_lib.search.study import SearchConfig

STAGE, VECTOR = "granularity", "vector"
TOL = 0.001        # "reached its best": within 0.1 % of the run's own best (search fidelity)
RATIO_LIMIT = 2.0  # issue 19: per-layer search may cost at most 2x per-vector search's trial-equivalents
CLAIM = ("per-layer-group weights, searched with the gradient sampler, give a better merge than one weight per "
         "vector at the same trial budget, for at most 2x the cost (beyond the paper: issue 19)")
CRITERION = ("per-layer-group minus per-vector test objective (both searched with the gradient sampler at OptiMer's "
             "trial budget and seed, chosen on dev): the 95% interval lies below 0; and per-layer-group search's "
             "trial-equivalents to reach its best (trials until within 0.1% of its own best, plus gradient "
             f"evaluations at their measured price in trials) are at most {RATIO_LIMIT:g}x per-vector's in every seed")
Components = Mapping[str, Sequence[float]]


# -- cost: trial-equivalents -------------------------------------------------------------------------------------
def equivalents(values: Sequence[float | None], grad_evals: int, charge: float, tol: float = TOL) -> float:
    """Trial-equivalents until the best-so-far of ``values`` (trial order, minimised; None for a failed trial) is
    within ``tol`` (relative) of the run's own best, plus ``grad_evals`` gradient evaluations at ``charge`` trials
    each; nan when no trial has a value."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan
    best = min(finite)
    return (trials_to_reach(values, best + tol * abs(best)) or len(values)) + grad_evals * charge


def price(row: Mapping[str, Any]) -> float:
    """One gradient evaluation's price in trials as ``row`` measured it (0 without gradient evaluations)."""
    trial = [s for s in row.get("trial_seconds", []) if s > 0]
    if not row.get("grad_evals") or not trial:
        return 0.0
    return float(row["gradient_seconds"]) / row["grad_evals"] / (sum(trial) / len(trial))


def charge(rows: Mapping[str, Mapping[str, Any]]) -> float:
    """The price charged to every row's gradient evaluations: the dearest measured (never understated)."""
    return max((price(r) for r in rows.values()), default=0.0)


# -- intervals over seeds and documents (also bench/per_layer.py) --------------------------------------------------
def stacked(per_seed: Sequence[Components]) -> dict[str, list[list[float]]]:
    """``{component: [[per document] per seed]}`` of per-seed components (every seed the same components)."""
    return {c: [list(comps[c]) for comps in per_seed] for c in per_seed[0]}


def objective_interval(terms: Mapping[str, float], per_seed: Sequence[Components], n_boot: int = 2000) -> st.Interval:
    """The objective (``Objective.terms``) of per-seed per-document components, with its 95 % interval (over
    documents and seeds, :func:`optimer_lib.experiments.stats.bootstrap`)."""
    return st.bootstrap_methods(lambda m: ds.objective_of_means(terms, m["x"]), {"x": stacked(per_seed)},
                                n_boot=n_boot)


def difference_interval(terms: Mapping[str, float], a: Sequence[Components], b: Sequence[Components],
                        n_boot: int = 2000) -> st.Interval:
    """objective(a) − objective(b), paired over seeds (by position) and documents."""
    return st.bootstrap_methods(lambda m: ds.objective_of_means(terms, m["a"]) - ds.objective_of_means(terms, m["b"]),
                                {"a": stacked(a), "b": stacked(b)}, n_boot=n_boot)


# -- the stage ---------------------------------------------------------------------------------------------------
def _scored(merger: Any, tokenizer: Any, suite: Any, limit: int | None) -> tuple[dict[str, Any], dict[str, Any]]:
    docs = ds.score_documents(merger.model, tokenizer, suite, limit=limit)
    return docs, docs.pop("tokens")


def run_granularity(merger: Any, tokenizer: Any, dev: Any, test: Any, objective: Any,
                    configs: Mapping[str, SearchConfig], *, limit: int | None) -> dict[str, Any]:
    """Run (or resume) one search per ``configs`` entry (keyed by its granularity, ``"vector"`` among them), score
    each dev-chosen best per document on ``dev`` and ``test`` (first ``limit`` items), and return the stage JSON:
    ``rows[granularity]`` with the weights, dev values, trial values and times, gradient evaluations, per-document
    ``dev_docs`` / ``test_docs`` and ``equivalents``; ``doc_tokens`` / ``dev_doc_tokens`` once for all rows."""
    from optimer_lib.search.study import run_search  # here: FINDINGS.md rendering needs no search stack

    rows: dict[str, dict[str, Any]] = {}
    tokens: dict[str, Any] = {}
    for spec, cfg in configs.items():
        t0 = time.perf_counter()
        res = run_search(merger, tokenizer, dev, objective, cfg, progress=False)
        seconds = time.perf_counter() - t0
        trials = sorted(res.study.get_trials(deepcopy=False), key=lambda t: t.number)
        warm = res.study.user_attrs.get(record.GRAD_WARM_START, {})
        merger.set_weights(res.best_weights)
        dev_docs, tokens["dev"] = _scored(merger, tokenizer, dev, limit)
        test_docs, tokens["test"] = _scored(merger, tokenizer, test, limit)
        rows[spec] = {
            "granularity": Granularity.parse(spec).spec, "weights": res.best_weights,
            "n_weights": len(res.best_weights),
            "objective": res.value_search, "objective_rescored": res.best_value, "best_trial": res.best_trial,
            "dev_objective": float(objective(ds.metrics_of(dev_docs, tokens["dev"]))),
            "test_objective": float(objective(ds.metrics_of(test_docs, tokens["test"]))),
            "values": [t.value if t.state.name == "COMPLETE" else None for t in trials],
            "trial_seconds": [t.duration.total_seconds() for t in trials
                              if t.state.name == "COMPLETE" and t.duration is not None],
            "grad_evals": int(warm.get("evaluations", 0)), "gradient_seconds": float(warm.get("seconds", 0.0)),
            "trials": len(trials), "trial_budget": cfg.trials, "sampler": cfg.sampler, "seed": cfg.seed,
            "search_seconds": round(seconds, 2), "dev_docs": dev_docs, "test_docs": test_docs}
    price_all = charge(rows)
    for r in rows.values():
        r["equivalents"] = equivalents(r["values"], r["grad_evals"], price_all)
    return {"objective": objective.spec, "terms": dict(objective.terms), "limit": limit, "charge": price_all,
            "doc_tokens": tokens["test"], "dev_doc_tokens": tokens["dev"], "rows": rows}


# -- the finding -------------------------------------------------------------------------------------------------
def _rng(iv: st.Interval, nd: int = 1, unit: str = "") -> str:
    return f"mean {iv.mean:.{nd}f}{unit}, range {iv.low:.{nd}f}{unit} to {iv.high:.{nd}f}{unit}"


def finding(sm: Samples, per_seed: Mapping[int, Mapping[str, Any]], terms: dict[str, float],
            mixture: Callable[[int], str | None]) -> dict[str, Any] | None:
    """The per-layer vs per-vector finding over the seeds with both a ``final`` and a ``granularity`` stage (None
    without any). ``sm`` holds the final stages' per-document rows; ``mixture(seed)`` names the dev-chosen best
    data-mixture row of that seed (R is reported only where the mixture's gain over the base lies above 0)."""
    seeds = [s for s in sm.seeds if STAGE in per_seed[s]]
    skipped = [s for s in seeds if per_seed[s][STAGE]["doc_tokens"] != sm.final[s]["doc_tokens"]]
    seeds = [s for s in seeds if s not in skipped]  # other test documents than the final stage's: nothing to pair
    if not seeds:
        return None
    stages = {s: per_seed[s][STAGE] for s in seeds}
    layers = next(k for k in stages[seeds[0]]["rows"] if k != VECTOR)
    specs = (VECTOR, layers)
    sub = sm.with_rows({s: {f"{STAGE} {k}": stages[s]["rows"][k] for k in specs} for s in seeds})

    def row(k: str) -> Callable[[int], str]:
        return lambda _s: k if k in ("base", "OptiMer") else f"{STAGE} {k}"

    n: dict[str, Any] = {"seeds": seeds, "layers": layers, "rows": {}}
    for k in specs:
        runs = [stages[s]["rows"][k] for s in seeds]
        eq = [equivalents(r["values"], r["grad_evals"], charge(stages[s]["rows"])) for s, r in zip(seeds, runs,
                                                                                                  strict=True)]
        n["rows"][k] = {"weights": runs[0]["n_weights"], "test": sub.value(row(k), terms),
                        "dev": objective_interval(terms, [ds.components(r["dev_docs"], stages[s]["dev_doc_tokens"])
                                                          for s, r in zip(seeds, runs, strict=True)]),
                        "equivalents": eq, "equivalents_range": st.seed_range(eq)}
    if sub.has(row("OptiMer")) and all("values" in per_seed[s].get("optimer", {}) for s in seeds):
        eq = [equivalents(per_seed[s]["optimer"]["values"], 0, 0.0) for s in seeds]
        n["rows"]["OptiMer"] = {"weights": len(per_seed[seeds[0]]["optimer"]["weights"]),
                                "test": sub.value(row("OptiMer"), terms), "dev": None, "equivalents": eq,
                                "equivalents_range": st.seed_range(eq)}
    diff = sub.diff(row(layers), row(VECTOR), terms)
    ratio = st.seed_range([a / b for a, b in zip(n["rows"][layers]["equivalents"], n["rows"][VECTOR]["equivalents"],
                                                  strict=True)])
    n.update(difference=diff, ratio=ratio, charge=st.seed_range([charge(stages[s]["rows"]) for s in seeds]))
    verdicts = [st.Criterion("per-layer − per-vector", "below", 0.0).verdict(diff),
                st.Criterion("trial-equivalents ratio", "below", RATIO_LIMIT).every_seed(ratio, inclusive=True)]
    v, lay = n["rows"][VECTOR], n["rows"][layers]
    text = (f"test objective: per vector ({v['weights']} weights) {_iv(v['test'])}, {layers} ({lay['weights']} "
            f"weights) {_iv(lay['test'])}; dev: {_iv(v['dev'])} and {_iv(lay['dev'])}; {layers} − vector on test "
            f"{_iv(diff)}; trial-equivalents to reach the best: per vector {_rng(v['equivalents_range'])}, {layers} "
            f"{_rng(lay['equivalents_range'])}, ratio per seed {_rng(ratio, 2, 'x')} (a gradient evaluation charged "
            f"{_rng(n['charge'], 2)} trials)")
    mix = {s: mixture(s) for s in seeds}
    if sub.has(row("base")) and all(mix.values()):
        def pick(s: int) -> str:  # the dev-chosen mixture of each seed
            return str(mix[s])

        gain = sub.diff(row("base"), pick, terms)
        n["mixture_gain"] = gain
        if gain.low > 0:
            for k in specs:
                n["rows"][k]["recovery"] = sub.interval(lambda m: ds.recovery_of_means(terms, m),
                                                        {"b": row("base"), "o": row(k), "x": pick}, terms)
            text += (f"; the mixture's gain over the base {_iv(gain)}, R = (base − merge) / (base − mixture): per "
                     f"vector {_iv(v['recovery'], 2)}, {layers} {_iv(lay['recovery'], 2)}")
        else:
            text += f"; the mixture's gain over the base {_iv(gain)} does not lie above 0, so R is not reported"
    else:
        text += "; no base or data-mixture row in the final stage, so R is not reported"
    if skipped:
        text += f"; seed(s) {', '.join(map(str, skipped))} left out: their stage scored other test documents"
    return {"verdict": st.combine(verdicts), "verdicts": verdicts, "ours": text, "seeds": seeds, "numbers": n}


def table_lines(n: Mapping[str, Any]) -> list[str]:
    """The finding's numbers as a Markdown table (one row per search), for FINDINGS.md."""
    names = {VECTOR: "per vector, grad", n["layers"]: f"{n['layers']}, grad", "OptiMer": "OptiMer (per vector, TPE)"}
    out = ["| search | weights | dev objective | test objective | R (share of the mixture's gain) | "
           "trial-equivalents to its best (mean, range) |", "|---|---|---|---|---|---|"]
    for k, r in n["rows"].items():
        eq = r["equivalents_range"]
        out.append(f"| {names[k]} | {r['weights']} | {_iv(r['dev'])} | {_iv(r['test'])} | "
                   f"{_iv(r.get('recovery'), 2)} | {eq.mean:.1f} ({eq.low:.1f}–{eq.high:.1f}) |")
    return [*out, ""]
