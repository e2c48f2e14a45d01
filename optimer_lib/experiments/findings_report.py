"""FINDINGS.md from a results directory: the verdict table, each finding's criterion before its numbers, the CLI.

    optimer findings --results results/experiments --out FINDINGS.md     # writes only --out (cli_args.py)
    optimer findings --results results/experiments --out FINDINGS.md --readme README.md   # + the headline block

    from optimer_lib.experiments.findings_report import write_findings
    write_findings(Path("results/experiments"), Path("FINDINGS.md"))   # returns the summary as JSON

The numbers and verdicts come from :func:`optimer_lib.experiments.findings.summarise_results`; this module only
renders them, so the committed FINDINGS.md is a pure function of the committed JSONs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from optimer_lib.errors import ConfigError
from optimer_lib.experiments import granularity as gr
from optimer_lib.experiments import stats as st
from optimer_lib.experiments.findings import CRITERIA, MIN_SEEDS, summarise_results
from optimer_lib.experiments.findings import fmt_interval as _iv
from optimer_lib.experiments.regime_report import render_regime
from optimer_lib.experiments.report import PAPER
from optimer_lib.fileio import atomic_write_text

REGIME_ALONE = "results/regime/REGIME.md"  # `optimer findings --results results/regime --regime-only` writes it
REGIME_PLOT = "results/experiments/regime-map.svg"  # written by `optimer experiments --regime-map --results ...`
CLAIMS = {"1": PAPER[1], "1b": "OptiMer beats every other merge method searched with the same budget",
          **{str(i): PAPER[i] for i in range(2, 8)},
          "it": "the instruction vector merged at weight 1 gives a chat model (the paper's recipe)",
          "layers": gr.CLAIM}
OPTIONAL = ("layers",)  # beyond the paper: a row only once its stage has run


def render_findings(summary: dict[str, Any], *, command: str | None = None) -> str:
    """FINDINGS.md: protocol, a verdict table, then per finding its criterion (first), numbers and verdict."""
    cfg = summary["config"]
    seeds = summary["seeds"]
    command = command or ("optimer experiments --workdir runs/experiments --seeds "
                          + ",".join(map(str, summary["seeds_configured"])) + " --results results/experiments")
    b = summary["budgets"]
    lines = ["# Findings at our scale", "",
             f"Measured by `{command}` on the embedded world; rendered from the committed JSONs by `optimer findings "
             "--results results/experiments --out FINDINGS.md"
             + (f" --regime {summary['regime_dir']}" if summary.get("regime_dir") else "")
             + "`. Dev splits for every search and every selection, "
             f"test splits for the numbers (first {cfg.get('final_limit')} documents per distribution); objective "
             f"`{summary['objective']}`, lower is better. Seeds: {', '.join(map(str, seeds)) or 'none'} (each seed "
             "is the CPT seed and every search's sampler seed). Trials per merge method (TPE, one code path): "
             + ", ".join(f"{k} {v}" for k, v in b.items() if k != "uniform")
             + ("; uniform averaging is one point" if "uniform" in b else "")
             + f". Intervals: 95%, {st.INTERVAL_METHOD} (2000 resamples); a verdict reads the interval, never "
             "the point; a criterion on a statistic without documents (a cosine, a trial count, a cost ratio) must "
             "pass in every seed. Stage "
             "time per seed: " + ", ".join(f"seed {s} {m} min" + ("" if s in seeds else " (incomplete: not counted)")
                                           for s, m in summary["stage_minutes"].items()) + ".",
             ""]
    # Fewer seeds than the protocol's: every verdict says so where it is read (table and section).
    tag = f" (provisional: {len(seeds)} of {MIN_SEEDS} seeds)" if summary.get("provisional") else ""
    if tag:
        lines += [f"**Provisional: {len(seeds)} of the protocol's {MIN_SEEDS} seeds have run.** The intervals below "
                  "cover test documents and the seeds that ran; a verdict may change when the other seeds land.", ""]
    lines += ["| # | paper | criterion (stated before the number) | verdict |", "|---|---|---|---|"]
    for k, claim in CLAIMS.items():
        f = summary["findings"].get(k)
        if f is None and k in OPTIONAL:
            continue
        crit = CRITERIA[k].replace("|", "\\|")  # a literal | (as in |cosine|) would split the table cell
        lines.append(f"| {k} | {claim} | {crit} | {f['verdict'] + _tag(f, tag) if f else 'not measured'} |")
    lines.append("")
    for k, claim in CLAIMS.items():
        f = summary["findings"].get(k)
        if f is None:
            continue
        lines += [f"## {k}. {claim}", "", f"- Criterion: {CRITERIA[k]}.", f"- Ours: {f['ours']}.",
                  f"- Verdict: **{f['verdict']}**{_tag(f, tag)}" + (f" (criteria: {', '.join(f['verdicts'])})"
                                                                    if len(f["verdicts"]) > 1 else "") + ".", ""]
        if k == "it":
            lines += _it_table(f["numbers"]["rows"])
        if k == "layers":
            lines += gr.table_lines(f["numbers"])
    if summary["test_table"]:
        lines += ["## Test objective per method (mean [95% interval])", "", "| method | test objective |", "|---|---|",
                  *(f"| {r} | {_iv(iv)} |" for r, iv in summary["test_table"].items()), ""]
    if summary["costs"]:
        lines += ["## Compute, both ways (forward-token equivalents, mean over seeds)", "",
                  "Merge methods need the pool's CPT runs once; a data-mixture search trains for every objective. "
                  "Every searched merge method includes its top-k re-scoring (where a stage did not record it, "
                  "OptiMer's recorded re-scoring, the same work).", "",
                  "| method | search | first model (with the pool's CPT) | each further objective |",
                  "|---|---|---|---|"]
        order = sorted(summary["costs"], key=lambda m: (m != "optimer", m.startswith("mixture"), m))
        lines += [f"| {m} | {summary['costs'][m]['search']:,.0f} | {summary['costs'][m]['first_model']:,.0f} | "
                  f"{summary['costs'][m]['further_objective']:,.0f} |" for m in order]
        lines.append("")
    if summary["regime"] and summary.get("regime_dir"):  # the map's own results (its own seeds)
        d = summary["regime_dir"]
        reg = render_regime(summary["regime"], plot=f"{d}/regime-map.svg")
        lines += [*reg[:2], f"The map ran apart from the set above, with its own seeds; read from `{d}`.", "",
                  *reg[2:]]
    elif summary["regime"]:
        lines += render_regime(summary["regime"], plot=REGIME_PLOT)
    else:  # the map ran apart (its own seeds and results directory): say where it is
        lines += ["## Regime map", "", "Not in these results: the regime map (gain recovery R against the CPT/base "
                  f"token ratio) is rendered from its own results to [{REGIME_ALONE}]({REGIME_ALONE}).", ""]
    return "\n".join(lines)


def _tag(f: dict[str, Any], tag: str) -> str:
    """A finding's provisional tag: the set's, or from its own seeds where it lists them (a stage added later, which
    not every seed has run yet)."""
    own = f.get("seeds")
    if own is None:
        return tag
    return f" (provisional: {len(own)} of {MIN_SEEDS} seeds)" if len(own) < MIN_SEEDS else ""


def _it_table(rows: dict[str, dict[str, st.Interval]]) -> list[str]:
    cols = list(dict.fromkeys(c for r in rows.values() for c in r))
    return ["| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols),
            *(f"| {r} | " + " | ".join(_iv(v.get(c), 3) if c != "objective" else _iv(v.get(c)) for c in cols) + " |"
              for r, v in rows.items()), ""]


def to_json(x: Any) -> Any:
    """The summary as plain JSON (intervals as dicts)."""
    if isinstance(x, st.Interval):
        return x.to_json()
    if isinstance(x, dict):
        return {str(k): to_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_json(v) for v in x]
    return x


def write_regime_only(results: str | Path, out: str | Path, *, plot: str | Path | None = None) -> dict[str, Any]:
    """Only the regime map's section of ``results`` (e.g. ``results/regime``, which holds the map alone) to ``out``,
    linking ``plot`` relative to ``out``'s folder; ConfigError when ``results`` has no regime stages."""
    import os

    summary = summarise_results(results)
    if not summary["regime"]:
        raise ConfigError(f"{results} has no regime-map stages: run `optimer experiments --regime-map --results "
                          f"{results}` first")
    link = Path(os.path.relpath(Path(plot).resolve(), Path(out).resolve().parent)).as_posix() if plot else None
    cmd = f"optimer findings --results {results} --out {out} --regime-only" + (f" --regime-plot {plot}" if plot else "")
    seeds = ", ".join(map(str, summary["seeds_configured"]))
    text = "\n".join([f"# The regime map (seeds {seeds})", "",
                       f"Rendered from the committed JSONs in `{results}` by `{cmd}`.", "",
                       *render_regime(summary["regime"], plot=link)])
    atomic_write_text(Path(out), text.rstrip("\n") + "\n")
    return to_json(summary)


# The README's headline table: these final-stage rows, in this order, under these labels (absent rows are left out).
HEADLINE = (("base", "base"), ("baseline: uniform", "uniform average of the CPT models"),
            ("baseline: task_arithmetic", "task arithmetic (searched, same budget)"),
            ("baseline: ties", "TIES (searched, same budget)"), ("baseline: dare", "DARE (searched, same budget)"),
            ("OptiMer", "**OptiMer** (TPE search of α)"),
            ("OptiMer + τ_IT (α searched with it)", "OptiMer + instruction vector (the paper's recipe)"),
            ("data mixture (per_run) best", "data mixture, one CPT run's tokens per candidate"),
            ("data mixture (equal_total) best", "data mixture, equal total tokens"),
            ("α-ratio mixture (normalised)", "data mixture retrained with OptiMer's α as ratios"))
README_START, README_END = "<!-- headline-table: start -->", "<!-- headline-table: end -->"


def render_headline(summary: dict[str, Any]) -> str:
    """The README's headline table: test objective per method, mean and 95% interval over seeds and documents."""
    seeds = summary["seeds"]
    table = summary["test_table"]
    note = (f"Test objective `{summary['objective']}` (lower is better), mean [95% interval over "
            f"{len(seeds)} seed(s) ({', '.join(map(str, seeds))}) and the test documents]; every choice made on dev. "
            + (f"**Provisional: {len(seeds)} of {MIN_SEEDS} seeds.** " if summary.get("provisional") else "")
            + "Differences between rows are paired over the same documents and seeds: their intervals are in "
            "FINDINGS.md. Rendered by `optimer findings --results results/experiments --out FINDINGS.md "
            "--readme README.md --regime results/regime`.")
    rows = [f"| {label} | {_iv(table[row])} |" for row, label in HEADLINE if row in table]
    return "\n".join([README_START, note, "", "| model | test objective |", "|---|---|", *rows, README_END])


def replace_headline(readme: str, block: str) -> str:
    """``readme`` with the text between the headline markers (markers included) replaced by ``block``."""
    start, end = readme.find(README_START), readme.find(README_END)
    if start < 0 or end < start:
        raise ConfigError(f"the README has no headline block: put the lines {README_START!r} and {README_END!r} "
                          "where the table goes")
    return readme[:start] + block + readme[end + len(README_END):]


def write_findings(results: str | Path, *outs: str | Path, command: str | None = None,
                   readme: str | Path | None = None, regime: str | Path | None = None) -> dict[str, Any]:
    """Render the findings of ``results`` and write them to each of ``outs`` (explicit paths only); with
    ``readme``, also replace that file's headline block (:func:`render_headline`); with ``regime``, read the regime
    map from that results directory (see :func:`~optimer_lib.experiments.findings.summarise_results`)."""
    summary = summarise_results(results, regime=regime)
    text = render_findings(summary, command=command)
    if readme is not None:  # checked before anything is written: a README without markers changes nothing
        new_readme = replace_headline(Path(readme).read_text(), render_headline(summary))
    for out in outs:
        atomic_write_text(Path(out), text)
    if readme is not None:
        atomic_write_text(Path(readme), new_readme)
    return to_json(summary)
