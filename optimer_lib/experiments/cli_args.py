"""Command-line pieces of the experiment set, light to import (the work is imported when a command runs).

    from optimer_lib.experiments.cli_args import add_experiments_args, add_findings_parser, apply_experiments_args
    add_experiments_args(experiments_parser)          # --seeds 0,1,2 --results DIR
    cfg = apply_experiments_args(cfg, args)           # an ExperimentConfig with those seeds and results
    add_findings_parser(subparsers)                   # optimer findings --results DIR --out FILE [--regime-plot SVG]
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

from optimer_lib.errors import ConfigError


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> ``(0, 1, 2)``; anything else is a ConfigError naming the flag."""
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError as exc:
        raise ConfigError(f"bad --seeds {text!r}: use comma-separated integers (e.g. 0,1,2)") from exc
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"bad --seeds {text!r}: give at least one seed, none repeated (e.g. 0,1,2)")
    return seeds


def add_experiments_args(parser: argparse.ArgumentParser) -> None:
    """``--seeds`` and ``--results`` on the ``optimer experiments`` parser."""
    parser.add_argument("--seeds", help="comma-separated seeds, each the CPT and sampler seed of one full run "
                        "(default 0,1,2; 0 with --quick); more seeds can be added to a workdir later")
    parser.add_argument("--results", type=Path, help="also copy the small JSONs (config, seed-*/stages) here, "
                        "e.g. results/experiments to commit them; nothing is copied without it")


def apply_experiments_args(cfg: Any, a: argparse.Namespace) -> Any:
    """``cfg`` with the parsed ``--seeds`` / ``--results`` (each only when given)."""
    changes: dict[str, Any] = {}
    if getattr(a, "seeds", None):
        changes["seeds"] = parse_seeds(a.seeds)
    if getattr(a, "results", None):
        changes["results"] = Path(a.results)
    return replace(cfg, **changes) if changes else cfg


def add_findings_parser(sub: Any) -> None:
    """``optimer findings --results DIR --out FILE`` on an argparse subparsers object."""
    p = sub.add_parser("findings", help="render FINDINGS.md from a results directory of `optimer experiments`")
    p.add_argument("--results", type=Path, required=True, help="directory with config.json and seed-*/stages/")
    p.add_argument("--out", type=Path, required=True, help="file to write (e.g. FINDINGS.md); nothing else is written "
                   "but --regime-plot")
    p.add_argument("--regime-plot", type=Path, help="also write the regime map's plot (R against the CPT/base token "
                   "ratio, SVG) here, e.g. results/experiments/regime-map.svg")
    p.add_argument("--readme", type=Path, help="also replace the headline table between the markers "
                   "'<!-- headline-table: start -->' and '<!-- headline-table: end -->' in this file (e.g. README.md)")
    p.add_argument("--regime", type=Path, help="read the regime map from this results directory (e.g. "
                   "results/regime, where it runs with its own seeds) instead of --results")
    p.add_argument("--regime-only", action="store_true", help="write only the regime map's section to --out (for "
                   "results holding the regime map alone, e.g. results/regime); its plot link points at --regime-plot")
    p.set_defaults(fn=cmd_findings, writes=(("out", "--out", "file"), ("regime_plot", "--regime-plot", "file"),
                                       ("readme", "--readme", "file")))


def cmd_findings(a: argparse.Namespace) -> None:
    from optimer_lib.experiments.findings_report import write_findings, write_regime_only

    if getattr(a, "regime_only", False):
        summary = write_regime_only(a.results, a.out, plot=getattr(a, "regime_plot", None))
    else:
        summary = write_findings(a.results, a.out, readme=getattr(a, "readme", None), regime=getattr(a, "regime", None))
    print(f"wrote {a.out}" + (f" and the headline table of {a.readme}" if getattr(a, "readme", None) else "")
          + f" from {a.results}")
    if getattr(a, "regime_plot", None):
        from optimer_lib.experiments.regime_report import write_plot

        if not summary["regime"]:
            raise ConfigError(f"{a.results} has no regime-map stages: nothing to plot for --regime-plot")
        write_plot(summary["regime"], a.regime_plot)
        print(f"wrote {a.regime_plot}")
