"""Numbers and Markdown of the real-base cell (:mod:`optimer_lib.experiments.real_cell`) from its stage JSONs.

    from optimer_lib.experiments.real_cell_report import render_markdown, summarize
    summary = summarize(Path("results/smollm2"))      # reads config.json + stages/*.json, computes nothing else
    print(render_markdown(summary))

Per seed: the test objective (mean over corpora of the token-weighted loss) of base, uniform average, OptiMer,
each CPT model and the data mixture; the gap OptiMer − mixture; the gains over the base; the gain recovery
R = (base − OptiMer) / (base − mixture); the best α; the vectors' pairwise cosine. Across seeds: mean, sd and
range. Intervals: a paired bootstrap over test documents (the same resampled documents for every model and
seed, resampled within each corpus; the statistic is the seed mean), 95% percentile intervals, each side widened
by the seeds' Student-t half-width as the findings' are (:func:`optimer_lib.experiments.stats.widen_by_seeds`).
Verdicts follow the criteria in :data:`CRITERIA`, stated before any number and chosen so that they can fail.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from optimer_lib.experiments import stats as st

BOOTSTRAP = 2000
CRITERIA = {
    "optimer_vs_mixture": "OptiMer is ahead of the data mixture when the 95% interval (paired, over test documents "
                          "and seeds) of the seed-mean test gap (OptiMer − mixture) lies below 0 and every seed's gap "
                          "is below 0; the mixture is ahead when the interval lies above 0 and every seed's gap is "
                          "above 0; otherwise the comparison is inconclusive.",
    "optimer_vs_uniform": "OptiMer is ahead of uniform averaging under the same rule applied to (OptiMer − uniform).",
    "mixture_gain": "The mixture gains over the base when the interval of (base − mixture) lies above 0; the gain "
                    "recovery R is reported as meaningful only then (otherwise its denominator may be noise).",
}
ROWS = ("base", "uniform", "optimer", "mixture")
# What bootstrap() gives an interval of, from each row's objective (the seed mean in a draw, one seed's alone).
STATISTICS = {
    "gap_optimer_mixture": lambda m: m["optimer"] - m["mixture"],
    "gap_optimer_uniform": lambda m: m["optimer"] - m["uniform"],
    "gap_uniform_mixture": lambda m: m["uniform"] - m["mixture"],
    "gain_mixture": lambda m: m["base"] - m["mixture"],
    "gain_optimer": lambda m: m["base"] - m["optimer"],
    "recovery": lambda m: (m["base"] - m["optimer"]) / (m["base"] - m["mixture"]),
}


def _load(wd: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    cfg = json.loads((wd / "config.json").read_text())
    stages = {p.stem: json.loads(p.read_text()) for p in sorted((wd / "stages").glob("*.json"))}
    return cfg, stages


def _spread(values: list[float]) -> dict[str, float | None]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": None, "sd": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else None,
            "min": min(vals), "max": max(vals), "n": len(vals)}


def _interval(samples: np.ndarray) -> list[float | None]:
    """The 2.5 and 97.5 percentiles of the finite samples; ``[None, None]`` when none is finite (JSON-safe)."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return [None, None]
    return [float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))]


def bootstrap(per_seed: dict[int, dict[str, dict[str, Any]]], names: list[str], *, reps: int = BOOTSTRAP,
              seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap over test documents: ``per_seed[s][row][corpus] = {"nll": [...], "tokens": [...]}``.

    Each replicate draws, per corpus, as many documents as there are with replacement (one draw shared by every
    row and seed), recomputes every row's objective per seed and takes the seed mean. Returns the intervals of
    the gaps, the gains over the base and R.
    """
    rng = np.random.default_rng(seed)
    seeds = sorted(per_seed)
    obj = {row: np.zeros((len(seeds), reps)) for row in ROWS}
    full = {row: np.zeros(len(seeds)) for row in ROWS}  # every document: the point, per seed
    for c in names:
        n_docs = len(per_seed[seeds[0]]["base"][c]["nll"])
        idx = rng.integers(0, n_docs, size=(reps, n_docs))
        for si, s in enumerate(seeds):
            for row in ROWS:
                nll = np.asarray(per_seed[s][row][c]["nll"], dtype=float)
                tok = np.asarray(per_seed[s][row][c]["tokens"], dtype=float)
                obj[row][si] += nll[idx].sum(1) / np.maximum(tok[idx].sum(1), 1.0) / len(names)
                full[row][si] += nll.sum() / max(tok.sum(), 1.0) / len(names)
    out: dict[str, Any] = {"reps": reps}
    with np.errstate(divide="ignore", invalid="ignore"):
        for key, stat in STATISTICS.items():
            draws = stat({row: v.mean(0) for row, v in obj.items()})
            low, high = _interval(draws)
            point = float(stat({row: v.mean() for row, v in full.items()}))
            if low is not None and high is not None and math.isfinite(point):  # the seeds' spread, as the findings'
                low, high = st.widen_by_seeds(point, low, high, [stat({r: v[i] for r, v in full.items()})
                                                                 for i in range(len(seeds))])
            out[key] = [None, None] if low is None or not math.isfinite(low) else [low, high]
    return out


def _verdict(interval: list[float | None], per_seed: list[float], ahead: str, behind: str) -> str:
    lo, hi = interval
    if lo is None or hi is None:
        return "inconclusive"
    if hi < 0 and all(g < 0 for g in per_seed):
        return f"{ahead} ahead"
    if lo > 0 and all(g > 0 for g in per_seed):
        return f"{behind} ahead"
    return "inconclusive"


def summarize(wd: str | Path) -> dict[str, Any]:
    """The summary dict of a workdir (or a results copy) holding ``config.json`` and ``stages/``."""
    wd = Path(wd)
    cfg, st = _load(wd)
    names = [str(c).partition("=")[0] for c in cfg["corpora"]]
    base = st.get("base")
    seeds = [s for s in cfg["seeds"] if f"seed{s}-test" in st and base is not None]
    out: dict[str, Any] = {"config": cfg, "names": names, "criteria": CRITERIA, "seeds_done": seeds,
                           "seeds_pending": [s for s in cfg["seeds"] if s not in seeds],
                           "host": st.get("host", {}), "parameters": (base or {}).get("parameters"),
                           "model": ((base or {}).get("gguf") or {}).get("file") or str(cfg.get("base"))}
    order = ["host", "base"] + [f"seed{s}-{x}" for s in cfg["seeds"]
                                for x in (*(f"cpt-{n}" for n in names), "mixture", "vectors", "search", "test")]
    out["stages"] = {k: {"seconds": st[k].get("stage_seconds"), "peak_rss_gb": st[k].get("peak_rss_gb"),
                         "load_average": st[k].get("load_average")} for k in order if k in st}
    out["wall_seconds"] = round(sum(v["seconds"] or 0 for v in out["stages"].values()), 1)
    out["peak_rss_gb"] = max((v["peak_rss_gb"] or 0 for v in out["stages"].values()), default=None)
    per: dict[int, dict[str, Any]] = {}
    docs: dict[int, dict[str, dict[str, Any]]] = {}
    for s in seeds:
        p = f"seed{s}"
        rows = {"base": base["test"], **st[f"{p}-test"]["rows"]}
        docs[s] = rows
        test = {row: r["objective"] for row, r in rows.items()}
        losses = {row: {c: r[c]["loss"] for c in names} for row, r in rows.items()}
        search = st[f"{p}-search"]
        gain_mix, gain_opt = test["base"] - test["mixture"], test["base"] - test["optimer"]
        per[s] = {"test": test, "test_loss": losses, "gap_optimer_mixture": test["optimer"] - test["mixture"],
                  "gap_optimer_uniform": test["optimer"] - test["uniform"],
                  "gain_mixture": gain_mix, "gain_optimer": gain_opt,
                  "recovery": gain_opt / gain_mix if gain_mix != 0 else None,
                  "weights": search["weights"], "weights_tested": st[f"{p}-test"]["rows"]["optimer"]["weights"],
                  "dev": {"base": base["dev"]["objective"], "uniform": search["dev_uniform"],
                          "optimer": search["dev_objective"]},
                  "cosine": st[f"{p}-vectors"]["off_diagonal"], "norms": st[f"{p}-vectors"]["norms"],
                  "tokens": {**{f"cpt:{n}": st[f"{p}-cpt-{n}"]["tokens_trained"] for n in names},
                             "mixture": st[f"{p}-mixture"]["tokens_trained"]},
                  "train_tokens_per_second": {**{f"cpt:{n}": st[f"{p}-cpt-{n}"]["tokens_per_second"] for n in names},
                                              "mixture": st[f"{p}-mixture"]["tokens_per_second"]},
                  "search_seconds_per_trial": search.get("seconds_per_trial"), "trials": len(search["values"])}
    out["per_seed"] = {str(s): v for s, v in per.items()}
    if not per:
        return out
    keys = ("gap_optimer_mixture", "gap_optimer_uniform", "gain_mixture", "gain_optimer", "recovery")
    out["across_seeds"] = {
        "test": {row: _spread([per[s]["test"][row] for s in seeds]) for row in per[seeds[0]]["test"]},
        **{k: _spread([per[s][k] for s in seeds]) for k in keys},
        "cosine_mean": _spread([per[s]["cosine"].get("mean") for s in seeds])}
    boot = bootstrap(docs, names)
    out["bootstrap"] = boot
    out["verdicts"] = {
        "optimer_vs_mixture": _verdict(boot["gap_optimer_mixture"], [per[s]["gap_optimer_mixture"] for s in seeds],
                                       "OptiMer", "data mixture"),
        "optimer_vs_uniform": _verdict(boot["gap_optimer_uniform"], [per[s]["gap_optimer_uniform"] for s in seeds],
                                       "OptiMer", "uniform average"),
        "mixture_gain": "mixture gains over the base" if (boot["gain_mixture"][0] or 0) > 0 else
                        "mixture's gain over the base not clearly > 0: R is not meaningful"}
    return out


def _f(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _ci(iv: list[float | None], digits: int = 4) -> str:
    return f"[{_f(iv[0], digits)}, {_f(iv[1], digits)}]"


def render_markdown(summary: dict[str, Any]) -> str:
    """The cell as Markdown: setup, criteria, per-seed and across-seed table, intervals, verdicts, timings."""
    cfg, names, seeds = summary["config"], summary["names"], summary["seeds_done"]
    k = len(names)
    lines = [f"## Real pretrained base: {summary.get('model')} ({_f((summary.get('parameters') or 0) / 1e6, 1)}M "
             "parameters)", "",
             f"K = {k} CPT runs ({', '.join(names)}) of {cfg['tokens_per_run']:,} tokens each at lr {cfg['lr']:g} "
             f"({cfg['schedule']}, batch {cfg['batch_size']} x {cfg['seq_len']} tokens); data mixture: uniform ratios, "
             f"{cfg['tokens_per_run'] * k:,} tokens (equal total); OptiMer: TPE, {cfg['trials']} trials on the first "
             f"{cfg['dev_docs']} dev documents per corpus; test: the first {cfg['test_docs']} test documents per "
             f"corpus, the same for every model. Objective: mean over corpora of the token-weighted loss (nats, "
             f"lower is better). Seeds done: {', '.join(map(str, seeds)) or 'none'}"
             + (f" (pending: {', '.join(map(str, summary['seeds_pending']))})" if summary["seeds_pending"] else "")
             + f". Wall time of the stages: {summary['wall_seconds'] / 60:.1f} min on "
             f"{summary['host'].get('device', '?')}; peak RSS {_f(summary.get('peak_rss_gb'), 2)} GB.", "",
             "Criteria (fixed before the numbers):", ""]
    lines += [f"- {c}" for c in CRITERIA.values()]
    if not seeds:
        return "\n".join([*lines, "", "No seed has finished yet.", "", *_timings(summary)]) + "\n"
    per, acr, boot = summary["per_seed"], summary["across_seeds"], summary["bootstrap"]
    head = ["test objective", *[f"seed {s}" for s in seeds], "mean", "sd", "range"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    labels = {"base": "base", "uniform": f"uniform average (α = 1/{k})", "optimer": "OptiMer (TPE best on dev)",
              **{f"cpt:{n}": f"CPT {n} alone (α = e_{n})" for n in names},
              "mixture": f"data mixture ({k} x tokens, uniform ratios)"}
    for row, label in labels.items():
        sp = acr["test"][row]
        lines.append(f"| {label} | " + " | ".join(_f(per[str(s)]["test"][row]) for s in seeds)
                     + f" | {_f(sp['mean'])} | {_f(sp['sd'])} | {_f(sp['min'])}–{_f(sp['max'])} |")
    for key, label in (("gap_optimer_mixture", "OptiMer − mixture"), ("gap_optimer_uniform", "OptiMer − uniform"),
                       ("gain_mixture", "base − mixture (mixture's gain)"), ("gain_optimer", "base − OptiMer"),
                       ("recovery", "R = (base − OptiMer) / (base − mixture)")):
        sp = acr[key]
        lines.append(f"| **{label}** | " + " | ".join(_f(per[str(s)][key]) for s in seeds)
                     + f" | {_f(sp['mean'])} | {_f(sp['sd'])} | {_f(sp['min'])}–{_f(sp['max'])} |")
    lines += ["", f"95% intervals of the seed mean: paired bootstrap ({boot['reps']} resamples of the test documents), "
              "each side widened by the seeds' Student-t half-width:",
              f"OptiMer − mixture {_ci(boot['gap_optimer_mixture'])}, OptiMer − uniform "
              f"{_ci(boot['gap_optimer_uniform'])}, base − mixture {_ci(boot['gain_mixture'])}, base − OptiMer "
              f"{_ci(boot['gain_optimer'])}, R {_ci(boot['recovery'], 2)}.", "",
              "| seed | best α (dev) | dev objective: base / uniform / OptiMer | cosine(τ) | CPT tokens/s |",
              "|---|---|---|---|---|"]
    for s in seeds:
        p = per[str(s)]
        alpha = ", ".join(f"{n} {p['weights'][n]:.3f}" for n in names)
        cos = p["cosine"].get("mean")
        speed = ", ".join(f"{v:.0f}" for v in p["train_tokens_per_second"].values())
        lines.append(f"| {s} | {alpha} | {_f(p['dev']['base'])} / {_f(p['dev']['uniform'])} / "
                     f"{_f(p['dev']['optimer'])} | {_f(cos, 3)} | {speed} |")
    v = summary["verdicts"]
    lines += ["", f"Verdicts: OptiMer vs data mixture: **{v['optimer_vs_mixture']}**; OptiMer vs uniform average: "
              f"**{v['optimer_vs_uniform']}**; {v['mixture_gain']}.", "", *_timings(summary)]
    return "\n".join(lines) + "\n"


def _timings(summary: dict[str, Any]) -> list[str]:
    return ["| stage | seconds | peak RSS (GB) | load average (1 min) at its end |", "|---|---|---|---|",
            *(f"| {name} | {_f(t['seconds'], 1)} | {_f(t['peak_rss_gb'], 2)} | "
              f"{_f((t.get('load_average') or [None])[0], 1)} |" for name, t in summary["stages"].items())]
