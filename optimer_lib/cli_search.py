"""The search commands of the ``optimer`` CLI: ``optimer search`` (scalar, Pareto, warm-started) and ``optimer rerank``.

    optimer search --base assets/base --vector vectors/ja.safetensors --vector vectors/math.safetensors --trials 100
    optimer rerank --workdir runs/search --objective 'loss:ja=1,acc:math=2'

The parser lives in :mod:`optimer_lib.cli` (``build_parser``); these are the functions it dispatches to, split off so
that neither file grows past a readable size. Heavy imports stay inside the functions (the CLI starts fast).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from optimer_lib.errors import ConfigError, OptimerError


def cmd_search(a: argparse.Namespace) -> None:
    from optimer_lib.data import load_eval_suite
    from optimer_lib.merging.pool import open_pool
    from optimer_lib.scoring.objectives import parse_objective
    from optimer_lib.search.pruning import parse_fidelities
    from optimer_lib.search.specs import parse_bounds, parse_vector_spec
    from optimer_lib.search.study import SearchConfig, run_search

    fidelities = parse_fidelities(a.fidelities) if a.fidelities else None
    if a.objectives and (a.pruner != "none" or fidelities):
        raise ConfigError("--pruner/--fidelities work with one --objective, not a Pareto search (--objectives)")
    files = [parse_vector_spec(s)[0] for s in a.vector]
    suite = load_eval_suite(a.eval, a.split)
    objectives = [parse_objective(o, list(suite.texts), qa_names=list(suite.qa), maximize=a.maximize or None)
                  for o in a.objectives or [a.objective]]
    objective = objectives[0]
    bounds = parse_bounds(a.bounds) if a.bounds else None
    cfg = SearchConfig(trials=a.trials, sampler=a.sampler, seed=a.seed, bounds=bounds, storage=a.storage,
                       study_name=a.study, workdir=Path(a.workdir), search_limit=a.search_limit,
                       rescore_limit=a.rescore_limit, top_k=a.top_k, pruner=a.pruner,
                       fidelities=fidelities)
    inst, inst_w = parse_vector_spec(a.instruction) if a.instruction else (None, None)
    _check_best_json(Path(a.workdir), cfg.study_name, cfg.storage_url() or ":memory:", a.force,
                     archive=bool(a.warm_start_from))
    pool = open_pool(a.base, files, instruction=inst, allow_fingerprint_mismatch=a.allow_base_mismatch,
                     trust_remote_code=a.trust_remote_code)
    if inst:
        pool.merger.instruction_weight = 1.0 if inst_w is None else inst_w
    if a.objectives or a.warm_start_from:  # these validate their own settings (Pareto samplers differ)
        return _search_on_demand(a, pool, suite, objectives, cfg)
    cfg.check(pool.names)  # every settings problem (bound names included) before any trial
    res = run_search(pool.merger, pool.tokenizer, suite, objective, cfg)
    print(json.dumps({"best_weights": res.best_weights, "objective": res.best_value, "best_json": str(res.path)},
                     indent=2))


def _check_best_json(workdir: Path, study: str, storage: str, force: bool, *, archive: bool = False) -> None:
    """Refuse to let this search replace the best.json of another study unless ``--force``.

    With ``archive`` (a warm start: a new study seeded from the one in this workdir) the old file is
    kept as ``best-<its study>.json`` instead.
    """
    path = workdir / "best.json"
    if force or not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = None
    if isinstance(old, dict) and old.get("study") == study and old.get("storage") == storage:
        return  # the same study: re-running resumes it and refreshes its best.json
    whose = f"study {old.get('study')!r}" if isinstance(old, dict) else "an unreadable file"
    if archive and isinstance(old, dict):
        kept = workdir / f"best-{old.get('study')}.json"
        os.replace(path, kept)
        print(f"kept the previous best.json ({whose}) as {kept}", file=sys.stderr)
        return
    raise OptimerError(f"{path} holds the result of another search ({whose}): use another --workdir, the same "
                       "--study and --storage to resume that one, or --force to replace it")


def _search_on_demand(a: argparse.Namespace, pool, suite, objectives: list, cfg) -> None:
    """``search --objectives`` (Pareto search) and/or ``--warm-start-from STUDY`` (same storage)."""
    from optimer_lib.search import record
    from optimer_lib.search.pareto import run_pareto_search
    from optimer_lib.search.warmstart import seeded_bounds, warm_start_search, warm_start_study

    if not a.objectives:
        res = warm_start_search(pool.merger, pool.tokenizer, suite, objectives[0], cfg, a.warm_start_from)
        seeded = res.study.user_attrs[record.WARM_START]["seeded"]
        print(json.dumps({"best_weights": res.best_weights, "objective": res.best_value, "seeded": seeded,
                          "best_json": str(res.path)}, indent=2))
        return
    if a.warm_start_from:
        if cfg.storage_url() is None:
            raise ConfigError("--warm-start-from needs a persistent --storage, not ':memory:'")
        study = warm_start_study(a.warm_start_from, objectives, storage=cfg.storage_url(), study_name=cfg.study_name)
        cfg.bounds = cfg.bounds or seeded_bounds(study)
    res = run_pareto_search(pool.merger, pool.tokenizer, suite, objectives, cfg)
    front = [{"trial": p.number, "weights": p.weights, "values": p.values} for p in res.front]
    print(json.dumps({"objectives": res.objectives, "front": front, "pareto_json": str(res.path)}, indent=2))


def cmd_rerank(a: argparse.Namespace) -> None:
    from optimer_lib.search.rerank import rerank
    from optimer_lib.search.storage import workdir_storage

    storage = workdir_storage(a.workdir, a.storage)
    res = rerank(storage, a.objective, fidelity=a.fidelity, study_name=a.study)
    print(f"study {res.study.study_name!r} re-ranked for {res.objective!r} from stored metrics (no evaluation)")
    print(res.table(a.top))
    print("best weights: " + json.dumps({k: round(v, 6) for k, v in res.best_weights.items()}))
    print(f"objective: {res.best_value:.6g} (trial {res.best.number})")
    print("confidence: " + res.confidence.summary())
    from optimer_lib.fileio import atomic_write_json

    out = Path(a.workdir) / "rerank.json"
    atomic_write_json(out, res.to_dict())  # temp file + rename: never a half-written rerank.json
    print(f"wrote {out}")
