"""The ``optimer`` command: a thin shell over the library (see ``optimer --help``).

    optimer demo [--workdir DIR] [--quick]
    optimer train --base DIR --data NAME_OR_PATH --out DIR [--tokens N] [--lr X] ...
    optimer vector extract --base DIR --tuned DIR --out FILE.safetensors [--name NAME]
    optimer vector info FILE ...
    optimer merge --base DIR --vector FILE=WEIGHT [...] [--method NAME] --out DIR
    optimer search --base DIR --vector FILE ... --objective SPEC --trials N [--sampler tpe|gp|cmaes|random|grid]
                   [--storage URL] [--study NAME] [--workdir DIR]

User mistakes print ``error: <what to do>`` and exit with status 2; ``OPTIMER_DEBUG=1`` also
prints the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from optimer_lib.errors import ConfigError, OptimerError


def _ratio_spec(spec: str) -> str | dict[str, float]:
    """``ja`` or ``ja=0.5,math=0.5`` (a data mixture)."""
    if "=" not in spec or Path(spec).exists():
        return spec
    out = {}
    for part in spec.split(","):
        name, _, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError as exc:
            raise ConfigError(f"bad --data {spec!r}: use NAME or NAME=RATIO,NAME=RATIO (e.g. ja=0.5,math=0.5)") from exc
    return out


def cmd_demo(a: argparse.Namespace) -> None:
    from optimer_lib.demo import DemoConfig, run_demo

    cfg = DemoConfig.quick(a.workdir or Path("runs/quick")) if a.quick else DemoConfig(workdir=a.workdir or
                                                                                       Path("runs/demo"))
    if a.trials:
        cfg.trials = a.trials
    run_demo(cfg)


def cmd_train(a: argparse.Namespace) -> None:
    from optimer_lib.train import TrainConfig, train_cpt

    cfg = TrainConfig(tokens=a.tokens, lr=a.lr, batch_size=a.batch_size, seq_len=a.seq_len, schedule=a.schedule,
                      seed=a.seed, device=a.device, trajectory=a.trajectory)
    res = train_cpt(a.base, _ratio_spec(a.data), a.out, cfg, split=a.split)
    print(f"saved {res.out_dir} ({res.tokens:,} tokens, final loss {res.final_loss:.3f}, {res.seconds:.0f} s)")


def cmd_vector_extract(a: argparse.Namespace) -> None:
    from optimer_lib.vectors import extract_vector, save_vector

    tokens = None
    info = Path(a.tuned) / "training.json"
    if info.exists():
        tokens = json.loads(info.read_text()).get("tokens_trained")
    if Path(a.out).exists() and not a.force:
        raise OptimerError(f"{a.out} exists: use --force to overwrite it")
    vec = extract_vector(a.base, a.tuned, name=a.name or Path(a.tuned).name, source=str(a.tuned),
                         tokens_trained=tokens)
    path = save_vector(vec, a.out, overwrite=a.force)
    print(f"saved {path} (vector {vec.name!r}, norm {vec.norm():.4f}, {len(vec.tensors)} tensors)")


def cmd_vector_info(a: argparse.Namespace) -> None:
    from optimer_lib.vectors import format_info, load_vector

    print(format_info([load_vector(p) for p in a.files]))


def cmd_merge(a: argparse.Namespace) -> None:
    from optimer_lib.export import export_merged
    from optimer_lib.merge import check_method_params, parse_vector_spec
    from optimer_lib.pool import open_pool

    specs = [parse_vector_spec(s) for s in a.vector]
    missing = [f for f, w in specs if w is None and a.method not in ("average",)]
    if missing:
        raise ConfigError(f"--vector {missing[0]} has no weight: write FILE=WEIGHT (e.g. {missing[0]}=0.3)")
    params = _params(a.param)
    check_method_params(a.method, params)
    inst, inst_w = parse_vector_spec(a.instruction) if a.instruction else (None, None)
    if Path(a.out).exists() and not a.force:
        raise OptimerError(f"{a.out} already exists: choose another --out or use --force to replace it")
    pool = open_pool(a.base, [f for f, _ in specs], instruction=inst,
                     allow_fingerprint_mismatch=a.allow_base_mismatch)
    weights = {v.name: (w if w is not None else 1.0) for v, (_, w) in zip(pool.vectors, specs, strict=True)}
    merger = pool.merger
    merger.method, merger.params = a.method, params
    merger.set_weights(weights, instruction_weight=inst_w if inst_w is not None else (1.0 if inst else 0.0))
    out = export_merged(pool.model, pool.tokenizer, a.out, base_path=str(a.base), vectors=pool.vectors,
                        weights=weights, method=a.method, instruction=pool.instruction,
                        instruction_weight=inst_w, method_params=params, overwrite=a.force)
    print(f"saved merged model to {out}")


def _params(items: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in items or []:
        k, sep, v = item.partition("=")
        if not sep:
            raise ConfigError(f"bad --param {item!r}: use NAME=VALUE (e.g. --param density=0.5)")
        try:
            out[k] = int(v) if v.lstrip("-").isdigit() else float(v)
        except ValueError as exc:
            raise ConfigError(f"bad --param {item!r}: the value must be a number") from exc
    return out


def cmd_search(a: argparse.Namespace) -> None:
    from optimer_lib.data import load_eval_suite
    from optimer_lib.merge import parse_bounds, parse_vector_spec
    from optimer_lib.objectives import parse_objective
    from optimer_lib.pool import open_pool
    from optimer_lib.search import SearchConfig, run_search

    files = [parse_vector_spec(s)[0] for s in a.vector]
    suite = load_eval_suite(a.eval, a.split)
    objective = parse_objective(a.objective, list(suite.texts), qa_names=list(suite.qa))
    bounds = parse_bounds(a.bounds) if a.bounds else None
    cfg = SearchConfig(trials=a.trials, sampler=a.sampler, seed=a.seed, bounds=bounds, storage=a.storage,
                       study_name=a.study, workdir=Path(a.workdir), search_limit=a.search_limit,
                       rescore_limit=a.rescore_limit, top_k=a.top_k, direction="minimize")
    inst, inst_w = parse_vector_spec(a.instruction) if a.instruction else (None, None)
    pool = open_pool(a.base, files, instruction=inst, allow_fingerprint_mismatch=a.allow_base_mismatch)
    if inst:
        pool.merger.instruction_weight = 1.0 if inst_w is None else inst_w
    cfg.resolved_bounds(pool.names)  # validate bound names before any trial
    res = run_search(pool.merger, pool.tokenizer, suite, objective, cfg)
    print(json.dumps({"best_weights": res.best_weights, "objective": res.best_value, "best_json": str(res.path)},
                     indent=2))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="optimer", description="OptiMer: search distribution-vector merge weights "
                                "instead of data-mixture ratios (arXiv 2603.28858).")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="the whole pipeline on the embedded tiny world")
    d.add_argument("--workdir", type=Path)
    d.add_argument("--quick", action="store_true", help="a few-minute version")
    d.add_argument("--trials", type=int, help="override the number of search trials")
    d.set_defaults(fn=cmd_demo)

    t = sub.add_parser("train", help="continual pre-training on one dataset or a mixture")
    t.add_argument("--base", required=True, help="base checkpoint directory")
    t.add_argument("--data", required=True, help="embedded corpus name, a .txt/.jsonl file, or NAME=R,NAME=R")
    t.add_argument("--out", required=True)
    t.add_argument("--tokens", type=int, default=400_000)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--seq-len", type=int, default=128)
    t.add_argument("--schedule", default="cosine", choices=["cosine", "constant"])
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto")
    t.add_argument("--trajectory", type=int, default=0, help="save N checkpoints along the run")
    t.add_argument("--split", default="train", help="split of an embedded corpus (default train)")
    t.set_defaults(fn=cmd_train)

    v = sub.add_parser("vector", help="distribution vectors").add_subparsers(dest="vcmd", required=True)
    ve = v.add_parser("extract", help="tau = tuned - base, saved as .safetensors")
    ve.add_argument("--base", required=True)
    ve.add_argument("--tuned", required=True)
    ve.add_argument("--out", required=True)
    ve.add_argument("--name", help="vector name (default: the tuned directory's name)")
    ve.add_argument("--force", action="store_true", help="overwrite --out")
    ve.set_defaults(fn=cmd_vector_extract)
    vi = v.add_parser("info", help="norms and pairwise cosine similarities")
    vi.add_argument("files", nargs="+")
    vi.set_defaults(fn=cmd_vector_info)

    m = sub.add_parser("merge", help="merge vectors into the base and export an HF checkpoint")
    m.add_argument("--base", required=True)
    m.add_argument("--vector", action="append", required=True, metavar="FILE=WEIGHT")
    m.add_argument("--instruction", metavar="FILE[=WEIGHT]", help="instruction vector (default weight 1)")
    m.add_argument("--method", default="optimer", help="optimer (default), average, task_arithmetic, ties, dare")
    m.add_argument("--param", action="append", metavar="NAME=VALUE", help="method parameter, e.g. density=0.5")
    m.add_argument("--out", required=True)
    m.add_argument("--force", action="store_true", help="replace an existing --out")
    m.add_argument("--allow-base-mismatch", action="store_true", help="skip the base fingerprint check")
    m.set_defaults(fn=cmd_merge)

    s = sub.add_parser("search", help="Optuna search of merge weights on dev sets")
    s.add_argument("--base", required=True)
    s.add_argument("--vector", action="append", required=True, metavar="FILE")
    s.add_argument("--instruction", metavar="FILE[=WEIGHT]", help="instruction vector at a fixed weight")
    s.add_argument("--objective", default="balanced", help="preset, weighted metrics, or module:function")
    s.add_argument("--trials", type=int, default=100, help="total trials of the study (resumes up to N)")
    s.add_argument("--sampler", default="tpe")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--bounds", help="0:1 for all, or NAME=LO:HI,...")
    s.add_argument("--storage", help="Optuna storage URL (default sqlite in --workdir)")
    s.add_argument("--study", default="optimer")
    s.add_argument("--workdir", default="runs/search")
    s.add_argument("--eval", nargs="+", help="dev corpora (default: all embedded)")
    s.add_argument("--split", default="dev")
    s.add_argument("--search-limit", type=int, default=100, help="samples per distribution per trial")
    s.add_argument("--rescore-limit", type=int, default=300, help="samples for the top-k re-score")
    s.add_argument("--top-k", type=int, default=3)
    s.add_argument("--allow-base-mismatch", action="store_true")
    s.set_defaults(fn=cmd_search)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard "Loading weights" bars: noise next to our own progress
    try:
        args.fn(args)
    except OptimerError as exc:
        if os.environ.get("OPTIMER_DEBUG"):
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; re-run the same command to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
