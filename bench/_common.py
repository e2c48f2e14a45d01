"""What the benchmark scripts share: the quick demo pool, table helpers, a free port (bench/*.py import it).

    from _common import free_port, quantiles, quick_pool, within
    pool, dev, objective = quick_pool(Path("runs/quick"), threads=1)   # built and cached on first use

Benchmarks count "trials to reach" and "cost to reach" with the library's tested
``optimer_lib.experiments.analysis.trials_to_reach`` and ``optimer_lib.experiments.costs.cost_to_reach``;
``tests/test_bench.py`` checks these helpers and the scripts' tables.
"""

from __future__ import annotations

import json
import os
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


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def emit_json(result: dict[str, Any], path: Path | None) -> None:
    """Print a benchmark's result as JSON and, when ``path`` (``--json``) is given, also write it there."""
    text = json.dumps(result, indent=2, ensure_ascii=False)
    print(text)
    if path:
        path.write_text(text)


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


def proc_tree_memory(pid: int) -> dict[str, int]:
    """``{"anon": bytes, "file": bytes, "procs": n}``: RssAnon and RssFile of ``pid`` and all its descendants.

        proc_tree_memory(os.getpid())["anon"] / 2**30   # GiB of anonymous memory (Linux /proc only)

    RssAnon leaves out memory-mapped file pages (vectors read in place), which RssFile counts. A process
    that ends between listing and reading is skipped; {"anon": 0, "file": 0, "procs": 0} when ``pid`` is gone.
    """
    out = {"anon": 0, "file": 0, "procs": 0}
    todo, seen = [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            status = Path(f"/proc/{p}/status").read_text()
            for task in Path(f"/proc/{p}/task").iterdir():  # children are listed per thread
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        out["anon"] += int(fields.get("RssAnon", "0 kB").split()[0]) * 1024
        out["file"] += int(fields.get("RssFile", "0 kB").split()[0]) * 1024
        out["procs"] += 1
    return out


DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}


def safetensors_size(model_dir: Path) -> tuple[int, int]:
    """(parameters, bytes as stored) of every ``*.safetensors`` in ``model_dir``, read from the headers only.

        params, stored = safetensors_size(Path("runs/smollm2/base"))   # (134515008, 538060032)

    A tied lm_head stored once counts once, as the model holds it once.
    """
    import json
    import struct

    params = stored = 0
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, t in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for d in t["shape"]:
                count *= int(d)
            params += count
            stored += count * DTYPE_BYTES[t["dtype"]]
    return params, stored
