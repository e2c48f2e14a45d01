"""What the benchmark scripts share: the quick demo pool, table helpers, a free port (bench/*.py import it).

    from _common import free_port, quantiles, quick_pool, within
    pool, dev, objective = quick_pool(Path("runs/quick"), threads=1)   # built and cached on first use

Benchmarks count "trials to reach" and "cost to reach" with the library's tested
``optimer_lib.experiments.analysis.trials_to_reach`` and ``optimer_lib.experiments.costs.cost_to_reach``;
``tests/test_bench.py`` checks these helpers and the scripts' tables.
"""

from __future__ import annotations

import socket
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def within(target: float, tol: float) -> float:
    """The threshold ``target + tol * |target|``: a value at or below it is within ``tol`` (relative) of it."""
    return target + tol * abs(target)


def quantiles(xs: Sequence[float]) -> str:
    """``q1–q3`` of ``xs`` for a table cell (the value itself for one, ``–`` for none)."""
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{xs[0]}"
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return f"{q[0]:g}–{q[2]:g}"


def quick_pool(pool_dir: Path, threads: int | None) -> tuple[Any, Any, Any]:
    """(pool, dev suite, ``balanced`` objective) on the quick demo pool under ``pool_dir`` (built on first use)."""
    import optuna
    import torch

    if threads:
        torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from optimer_lib.data import assets_dir, load_eval_suite
    from optimer_lib.demo import DemoConfig, build_pool
    from optimer_lib.merging.pool import open_pool
    from optimer_lib.scoring.objectives import parse_objective

    paths, _ = build_pool(DemoConfig.quick(pool_dir))
    pool = open_pool(assets_dir() / "base", paths)
    dev = load_eval_suite(None, "dev")
    return pool, dev, parse_objective("balanced", list(dev.texts), qa_names=list(dev.qa))
