"""The regime map's numbers across seeds, its Markdown table and its plot of R against the CPT/base token ratio.

    from optimer_lib.experiments.regime_report import render_regime, regime_svg, summarise_regime
    reg = summarise_regime({seed: stages})        # {seed: {stage name: json}}; only regime-* stages are read
    lines = render_regime(reg)                    # Markdown lines (FINDINGS.md, a seed's FINDINGS.md)
    write_plot(reg, Path("regime-map.svg"))       # regime_svg(reg): a small self-contained SVG

Per cell (ratio, CPT lr), from the per-document test scores of every seed that ran it: the gain recovery
R = (base − OptiMer) / (base − mixture), the gap OptiMer − mixture and the mixture's gain base − mixture, each
with a 95% interval over test documents and seeds (:func:`optimer_lib.experiments.stats
.bootstrap_methods`, the findings' intervals); R is reported only where the gain's interval lies above 0. Beside
them, the share of the mixture's shift outside span{τ_i} (:func:`optimer_lib.experiments.analysis.span_residual`),
mean and range over seeds. Real-base cells (:mod:`optimer_lib.experiments.real_cell`) join as points at their own
ratio, with the intervals their report computed. Everything returned is plain JSON (intervals as dicts).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from optimer_lib.experiments import docscores as ds
from optimer_lib.experiments import stats as st

BASE, OPTIMER, MIXTURE = "base", "OptiMer", "data mixture (equal total tokens)"
# Pretraining tokens of the real bases (their model cards): SmolLM2-135M was trained on 2T tokens (its Instruct
# variant, the GGUF the real cell imports, adds instruction tuning on top).
PRETRAINED_TOKENS = {"SmolLM2-135M": 2e12}
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")


def _stack(runs: list[dict[str, Any]], row: str, comps: list[str]) -> dict[str, np.ndarray]:
    per = [ds.components(r["rows"][row]["test_docs"], r["doc_tokens"]) for r in runs]
    return {k: np.asarray([p[k] for p in per], dtype=float) for k in comps}


def cell_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One cell across the seeds that ran it (its ``regime-r*-lr*`` stages): intervals, residual, sizes."""
    first = runs[0]
    terms = first["terms"][first["objective"]]
    comps = ds.needed_components(terms)
    samples = {"b": _stack(runs, BASE, comps), "o": _stack(runs, OPTIMER, comps), "x": _stack(runs, MIXTURE, comps)}

    def obj(m: Mapping[str, Mapping[str, float]], k: str) -> float:
        return ds.objective_of_means(terms, m[k])

    gain = st.bootstrap_methods(lambda m: obj(m, "b") - obj(m, "x"), samples)
    gap = st.bootstrap_methods(lambda m: obj(m, "o") - obj(m, "x"), samples)
    rec = st.bootstrap_methods(lambda m: ds.recovery_of_means(terms, m), samples)
    res = st.seed_range([r["residual"]["residual"] for r in runs])
    return {"ratio": first["ratio"], "actual_ratio": first["actual_ratio"], "base_tokens": first["base_tokens"],
            "cpt_tokens": first["cpt_tokens"], "lr": first["lr"], "parameters": first["parameters"],
            "corpora": first["corpora"], "seeds": sorted(r["seed"] for r in runs), "recovery": rec.to_json(),
            "recovery_meaningful": gain.low > 0, "gap": gap.to_json(), "gain": gain.to_json(),
            "residual": res.to_json(), "objective": first["objective"]}


def summarise_regime(per_seed: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """``{"cells": [...], "real": [...], "bases": {...}}`` (largest ratio first), or ``{}`` without regime stages."""
    groups: dict[str, list[dict[str, Any]]] = {}
    real: dict[str, dict[str, Any]] = {}
    bases: dict[str, Any] = {}
    for s in sorted(per_seed):
        for name, v in per_seed[s].items():
            kind = v.get("kind") if name.startswith("regime-") and isinstance(v, dict) else None
            if kind == "regime cell":
                groups.setdefault(name, []).append(v)
            elif kind == "regime real cell":
                real.setdefault(name, v)
            elif kind == "regime bases" and not bases:
                bases = {k: v[k] for k in ("parameters", "size", "recipe", "plan", "stable", "base_seed")}
                bases["epochs"] = {b["ratio"]: b["epochs"] for b in v["bases"]}
    if not groups and not real:
        return {}
    cells = sorted((cell_summary(runs) for runs in groups.values()), key=lambda c: (-c["ratio"], c["lr"]))
    minutes = {s: round(sum(v.get("stage_seconds") or 0 for k, v in per_seed[s].items() if k.startswith("regime-")
                            and isinstance(v, dict) and v.get("kind") in ("regime cell", "regime bases")) / 60, 1)
               for s in sorted(per_seed)}
    return {"cells": cells, "real": sorted(real.values(), key=lambda r: -r["ratio"]), "bases": bases,
            "stage_minutes": {s: m for s, m in minutes.items() if m}}


def real_cell_point(d: Path) -> dict[str, Any] | None:
    """A real-base cell's results folder as one point of the map (None when it has no finished seed or its base's
    pretraining tokens are unknown): ratio = CPT tokens per run / the base's pretraining tokens."""
    from optimer_lib.experiments.real_cell_report import summarize

    if not (d / "config.json").is_file():
        return None
    s = summarize(d)
    known = [k for k in PRETRAINED_TOKENS if k in str(s.get("model"))]
    if not s.get("bootstrap") or not known:
        return None
    acr, boot, cfg = s["across_seeds"], s["bootstrap"], s["config"]

    def iv(point: float | None, key: str) -> dict[str, float]:
        lo, hi = (math.nan if x is None else x for x in boot[key])
        return st.Interval(math.nan if point is None else point, lo, hi, 0.95, len(s["seeds_done"])).to_json()

    g_opt, g_mix = acr["gain_optimer"]["mean"], acr["gain_mixture"]["mean"]
    return {"kind": "regime real cell", "source": str(d), "name": known[0], "model": s["model"],
            "parameters": s["parameters"],
            "pretrain_tokens": PRETRAINED_TOKENS[known[0]], "cpt_tokens": cfg["tokens_per_run"],
            "ratio": cfg["tokens_per_run"] / PRETRAINED_TOKENS[known[0]], "lr": cfg["lr"], "corpora": s["names"],
            "seeds": s["seeds_done"], "recovery": iv(g_opt / g_mix if g_mix else None, "recovery"),
            "recovery_meaningful": (boot["gain_mixture"][0] or 0) > 0, "gap": iv(acr["gap_optimer_mixture"]["mean"],
                                                                                 "gap_optimer_mixture"),
            "gain": iv(g_mix, "gain_mixture"), "objective": "mean token loss over " + ", ".join(s["names"])}


def _fmt(d: Mapping[str, float], nd: int = 4) -> str:
    return st.fmt_interval(st.Interval(d["mean"], d["low"], d["high"], d.get("level", 0.95), d.get("seeds", 1)), nd)


def _r(c: Mapping[str, Any]) -> str:
    if c["recovery_meaningful"]:
        return _fmt(c["recovery"], 2)
    return "not reported: the mixture's gain interval does not lie above 0"


def render_regime(reg: Mapping[str, Any], *, plot: str | None = None) -> list[str]:
    """The regime section: what was swept, a table per cell (and real-base cell), the plot's link if given."""
    if not reg:
        return []
    b = reg.get("bases") or {}
    lines = ["## Regime map: gain recovery R against the CPT/base token ratio", ""]
    if b:
        p = b["plan"]
        lines += [f"One base size ({b['parameters']:,} parameters), pretrained once (seed {b['base_seed']}): a "
                  f"constant-lr run of {b['stable']['tokens']:,} tokens ({b['stable']['tokens_per_second']:,.0f} "
                  "tokens/s), checkpointed at each base's stable length, each checkpoint annealed by a short decay "
                  "branch; the bases are shared by every seed (a seed = CPT data order and search sampler seed). Each "
                  f"CPT run trains {p['cpt_tokens']:,} tokens, so the ratio moves by pretraining the base longer. Per "
                  "cell: K CPT runs → vectors, an OptiMer (TPE) search on dev, a data mixture at equal total tokens "
                  "(uniform ratios), all scored per test document.", ""]
    lines += ["R = (base − OptiMer) / (base − mixture), the share of the mixture's gain merging recovers (1: all of "
              "it; above 1: merging beats the mixture), with the gap OptiMer − mixture (test objective, negative: "
              "merging better) and the mixture's own gain; 95% intervals, " + st.INTERVAL_METHOD
              + ". R is reported only where the gain's interval lies above 0. Outside span: "
              "||d − Σ c_i τ_i|| / ||d|| for the mixture's shift d = θ_mix − θ_base (least squares; mean and range "
              "over seeds): the part of what the mixture learned that no merge of these vectors can express.", "",
              "| CPT/base tokens per run | base tokens | CPT lr | seeds | R | OptiMer − mixture | mixture's gain | "
              "shift outside span{τ} |", "|---|---|---|---|---|---|---|---|"]
    for c in reg["cells"]:
        r = c["residual"]
        lines.append(f"| {c['actual_ratio']:.3g} | {c['base_tokens']:,} | {c['lr']:g} | {len(c['seeds'])} | {_r(c)} | "
                     f"{_fmt(c['gap'])} | {_fmt(c['gain'])} | {r['mean']:.3f} ({r['low']:.3f}–{r['high']:.3f}) |")
    for c in reg["real"]:
        lines.append(f"| {c['ratio']:.2g} ({c['model']}, {c['pretrain_tokens']:.0e} pretraining tokens) | "
                     f"{c['pretrain_tokens']:.0e} | {c['lr']:g} | {len(c['seeds'])} | {_r(c)} | {_fmt(c['gap'])} | "
                     f"{_fmt(c['gain'])} | not measured |")
    if reg["real"]:
        lines += ["", "Real-base rows: " + "; ".join(
            f"{c['source']} ({c['objective']}, {c['cpt_tokens']:,} CPT tokens per run; intervals over its test "
            "documents, resampled within each corpus, and its seeds)" for c in reg["real"])
            + ". They share the ratio axis but not the setting: another model (a quantised instruct checkpoint), "
            "another objective and number of vectors, fewer test documents; read them as separate points, not as "
            "the continuation of the rows above."]
    if reg.get("stage_minutes"):
        lines += ["", "Stage time (the first seed's includes pretraining the shared bases): " + ", ".join(
            f"seed {s} {m} min" for s, m in reg["stage_minutes"].items()) + "."]
    if plot:
        lines += ["", f"![R against the CPT/base token ratio]({plot})"]
    return [*lines, ""]


def _points(reg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Plot points: (x, R, low, high, series, filled) for every cell and real cell with a finite R."""
    out = []
    lrs = sorted({c["lr"] for c in reg.get("cells", [])})
    for c in [*reg.get("cells", []), *reg.get("real", [])]:
        r = c["recovery"]
        if not math.isfinite(r["mean"]):
            continue
        real = c.get("kind") == "regime real cell"
        out.append({"x": c["ratio"] if real else c["actual_ratio"], "y": r["mean"], "low": r["low"], "high": r["high"],
                    "series": f"{c['name']}, lr {c['lr']:g}" if real else f"CPT lr {c['lr']:g}",
                    "colour": "#000000" if real else COLOURS[lrs.index(c["lr"]) % len(COLOURS)],
                    "filled": c["recovery_meaningful"]})
    return out


def regime_svg(reg: Mapping[str, Any], width: int = 680, height: int = 400) -> str:
    """A small self-contained SVG: R (y) against the CPT/base token ratio (x, log scale), 95% intervals as bars,
    hollow markers where the mixture's gain interval includes 0 (R not meaningful), dashed lines at R = 0 and 1."""
    pts = _points(reg)
    xs = [c.get("actual_ratio", c["ratio"]) for c in [*reg.get("cells", []), *reg.get("real", [])]] or [1e-3, 1.0]
    lo_x, hi_x = math.floor(math.log10(min(xs))), math.ceil(math.log10(max(xs)))
    hi_x += hi_x == lo_x
    ys = [v for p in pts for v in (p["y"], p["low"], p["high"]) if math.isfinite(v)] + [0.0, 1.0]
    pad = 0.08 * (max(ys) - min(ys))
    lo_y, hi_y = min(ys) - pad, max(ys) + pad
    left, right, top, bottom = 60, width - 180, 20, height - 50

    def px(x: float) -> float:
        return left + (math.log10(x) - lo_x) / (hi_x - lo_x) * (right - left)

    def py(y: float) -> float:
        return bottom - (y - lo_y) / (hi_y - lo_y) * (bottom - top)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           'font-size="11">', f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<path d="M{left},{top}V{bottom}H{right}" stroke="black" fill="none"/>']
    step = max(1, (hi_x - lo_x) // 8)
    for e in range(lo_x, hi_x + 1, step):
        out.append(f'<line x1="{px(10.0 ** e):.1f}" y1="{bottom}" x2="{px(10.0 ** e):.1f}" y2="{bottom + 4}" '
                   f'stroke="black"/><text x="{px(10.0 ** e):.1f}" y="{bottom + 16}" text-anchor="middle">1e{e}</text>')
    raw = (hi_y - lo_y) / 5  # y ticks at a round step (1, 2 or 5 x 10^k)
    tick = min((m * 10.0 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda t: abs(t - raw))
    nd = max(0, -math.floor(math.log10(tick)))
    for y in np.arange(math.ceil(lo_y / tick) * tick, hi_y, tick):
        out.append(f'<text x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.{nd}f}</text>')
    for ref in (0.0, 1.0):
        out.append(f'<line x1="{left}" y1="{py(ref):.1f}" x2="{right}" y2="{py(ref):.1f}" stroke="#888" '
                   f'stroke-dasharray="4 3"/><text x="{right - 4}" y="{py(ref) - 4:.1f}" text-anchor="end" '
                   f'fill="#666">R = {ref:g}</text>')
    for p in pts:
        x, c = px(p["x"]), p["colour"]
        if math.isfinite(p["low"]) and math.isfinite(p["high"]):
            out.append(f'<line x1="{x:.1f}" y1="{py(p["low"]):.1f}" x2="{x:.1f}" y2="{py(p["high"]):.1f}" '
                       f'stroke="{c}"/>')
        out.append(f'<circle cx="{x:.1f}" cy="{py(p["y"]):.1f}" r="4" stroke="{c}" '
                   f'fill="{c if p["filled"] else "white"}"><title>{escape(p["series"])}: R {p["y"]:.3f} at '
                   f'{p["x"]:.3g}</title></circle>')
    for i, (name, colour) in enumerate(dict.fromkeys((p["series"], p["colour"]) for p in pts)):
        y = top + 10 + 16 * i
        out.append(f'<circle cx="{right + 16}" cy="{y}" r="4" fill="{colour}"/><text x="{right + 26}" y="{y + 4}">'
                   f'{escape(name)}</text>')
    out += [f'<text x="{(left + right) / 2:.0f}" y="{height - 12}" text-anchor="middle">CPT tokens per run / base '
            'pretraining tokens (log)</text>',
            f'<text transform="translate(14,{(top + bottom) / 2:.0f}) rotate(-90)" text-anchor="middle">R = (base − '
            'OptiMer) / (base − mixture)</text>', "</svg>"]
    return "\n".join(out) + "\n"


def write_plot(reg: Mapping[str, Any], *paths: Path) -> None:
    """:func:`regime_svg` written to each of ``paths`` (explicit paths only)."""
    from optimer_lib.fileio import atomic_write_text

    for p in paths:
        atomic_write_text(Path(p), regime_svg(reg))


def figure(reg: Mapping[str, Any]) -> Any:
    """The same plot as a plotly figure (the per-seed report.html)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for series in dict.fromkeys(p["series"] for p in _points(reg)):
        pts = [p for p in _points(reg) if p["series"] == series]
        fig.add_scatter(x=[p["x"] for p in pts], y=[p["y"] for p in pts], mode="markers", name=series,
                        error_y={"type": "data", "symmetric": False, "array": [p["high"] - p["y"] for p in pts],
                                 "arrayminus": [p["y"] - p["low"] for p in pts]})
    fig.update_xaxes(type="log", title="CPT tokens per run / base pretraining tokens")
    fig.update_yaxes(title="R = (base − OptiMer) / (base − mixture)")
    return fig
