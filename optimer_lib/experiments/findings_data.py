"""The inputs of FINDINGS.md: a results directory's JSONs, and the final stage's per-document scores as samples.

    from optimer_lib.experiments.findings_data import Samples, fixed, load_results
    cfg, per_seed = load_results("results/experiments")      # (config, {seed: {stage: json}})
    sm = Samples(per_seed)
    sm.diff(fixed("OptiMer"), fixed("baseline: ties"), sm.terms[sm.objective])   # paired interval over docs, seeds

Rows are named per seed (``row_of(seed) -> row``): :func:`fixed` for a row of that name in every seed,
:func:`dev_pick` for the row a seed's dev objective chose among several (never its test score).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from optimer_lib.errors import ConfigError
from optimer_lib.experiments import docscores as ds
from optimer_lib.experiments import stats as st
from optimer_lib.experiments.report import pick_on_dev
from optimer_lib.fileio import atomic_write_json


# -- results directory ----------------------------------------------------------------------------------------
def load_results(d: str | Path) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """``(config, {seed: {stage: json}})`` of a results (or work) directory."""
    d = Path(d)
    if not (d / "config.json").is_file():
        raise ConfigError(f"{d} has no config.json: point --results at a directory written by `optimer experiments`")
    cfg = json.loads((d / "config.json").read_text())
    per: dict[int, dict[str, Any]] = {}
    for s in cfg.get("seeds", []):
        folder = d / f"seed-{s}" / "stages"
        if folder.is_dir():
            per[int(s)] = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
    return cfg, per


def copy_results(wd: str | Path, dest: str | Path) -> None:
    """Copy the small JSONs (config, every seed's config and stages) of a workdir to ``dest``."""
    wd, dest = Path(wd), Path(dest)
    if dest.resolve() == wd.resolve():
        return
    dest.mkdir(parents=True, exist_ok=True)
    # Seeds run in different sessions (fresh workdirs) add up: keep the seeds already in dest that still have stages.
    cfg = json.loads((wd / "config.json").read_text())
    old = json.loads((dest / "config.json").read_text()) if (dest / "config.json").is_file() else {}
    kept = [s for s in old.get("seeds", []) if (dest / f"seed-{s}" / "stages").is_dir()]
    cfg["seeds"] = sorted({int(s) for s in [*kept, *cfg.get("seeds", [])]})
    atomic_write_json(dest / "config.json", cfg, indent=1)
    for seed_dir in sorted(wd.glob("seed-*")):
        (dest / seed_dir.name / "stages").mkdir(parents=True, exist_ok=True)
        if (seed_dir / "config.json").is_file():
            shutil.copyfile(seed_dir / "config.json", dest / seed_dir.name / "config.json")
        for f in sorted((seed_dir / "stages").glob("*.json")):
            shutil.copyfile(f, dest / seed_dir.name / "stages" / f.name)


# -- per-document samples -------------------------------------------------------------------------------------
class Samples:
    """Per-document components of the final rows, stacked over seeds: ``[seeds, documents]`` arrays."""

    def __init__(self, per_seed: dict[int, dict[str, Any]]) -> None:
        self.seeds = sorted(s for s, stages in per_seed.items() if "final" in stages)
        self.final = {s: per_seed[s]["final"] for s in self.seeds}
        first = self.final[self.seeds[0]] if self.seeds else {}
        self.objective = first.get("objective", "balanced")
        self.terms: dict[str, dict[str, float]] = first.get("terms", {})

    def with_rows(self, extra: dict[int, dict[str, Any]]) -> Samples:
        """The seeds of ``extra`` only, their final rows plus ``extra[seed]`` (rows another stage scored on the same
        test documents, e.g. the granularity stage's), so bootstraps pair them with the final rows."""
        return Samples({s: {"final": {**self.final[s], "rows": {**self.final[s]["rows"], **extra[s]}}}
                        for s in self.seeds if s in extra})

    def has(self, row_of: Callable[[int], str | None]) -> bool:
        return bool(self.seeds) and all((r := row_of(s)) is not None and r in self.final[s]["rows"]
                                        and "test_docs" in self.final[s]["rows"][r] for s in self.seeds)

    def stack(self, row_of: Callable[[int], str], comps: list[str]) -> dict[str, np.ndarray]:
        rows = []
        for s in self.seeds:
            f = self.final[s]
            c = ds.components(f["rows"][row_of(s)]["test_docs"], f["doc_tokens"])
            rows.append([c[k] for k in comps])
        arr = np.asarray(rows, dtype=float)  # [seeds, comps, docs]
        return {k: arr[:, i, :] for i, k in enumerate(comps)}

    def interval(self, stat: Callable[..., float], rows: dict[str, Callable[[int], str]],
                 terms: dict[str, float]) -> st.Interval:
        comps = ds.needed_components(terms)
        return st.bootstrap_methods(stat, {k: self.stack(f, comps) for k, f in rows.items()})

    def value(self, row_of: Callable[[int], str], terms: dict[str, float]) -> st.Interval:
        return self.interval(lambda m: ds.objective_of_means(terms, m["a"]), {"a": row_of}, terms)

    def per_seed_diff(self, a: Callable[[int], str], b: Callable[[int], str], terms: dict[str, float]) -> list[float]:
        """``objective(a) − objective(b)`` in each seed alone (every test document): what the interval's seed part
        is made of."""
        comps = ds.needed_components(terms)
        sa, sb = self.stack(a, comps), self.stack(b, comps)
        return [ds.objective_of_means(terms, {k: v[i].mean() for k, v in sa.items()})
                - ds.objective_of_means(terms, {k: v[i].mean() for k, v in sb.items()}) for i in range(len(self.seeds))]

    def diff(self, a: Callable[[int], str], b: Callable[[int], str], terms: dict[str, float]) -> st.Interval:
        return self.interval(lambda m: ds.objective_of_means(terms, m["a"]) - ds.objective_of_means(terms, m["b"]),
                             {"a": a, "b": b}, terms)


def fixed(row: str) -> Callable[[int], str]:
    """The row named ``row`` in every seed."""
    return lambda _s: row


def dev_pick(samples: Samples, prefix: str, suffix: str = "") -> Callable[[int], str | None]:
    """Per seed, among rows named ``prefix...suffix``, the one with the lowest dev objective (never test)."""
    def pick(s: int) -> str | None:
        rows = samples.final[s]["rows"]
        cands = [r for r in rows if r.startswith(prefix) and r.endswith(suffix)]
        if not cands:
            return None
        return pick_on_dev(cands, {r: rows[r]["dev_objectives"][samples.objective] for r in cands})
    return pick
