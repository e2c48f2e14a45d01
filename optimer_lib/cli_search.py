"""The search and planning commands of the ``optimer`` CLI: ``search`` (scalar, Pareto, warm-started), ``rerank``,
``plan``, ``workbench`` (which refuses a pool that cannot fit), and the ``--device``/``--dtype`` flags and check
every command that loads a model shares.

    optimer search --base assets/base --vector vectors/ja.safetensors --vector vectors/math.safetensors --trials 100
    optimer rerank --workdir runs/search --objective 'loss:ja=1,acc:math=2'
    optimer plan --base assets/base --vector vectors/ja.safetensors --device cpu --dtype bfloat16

The parser lives in :mod:`optimer_lib.cli` (``build_parser``); these are the functions it dispatches to, split off so
that neither file grows past a readable size. Heavy imports stay inside the functions (the CLI starts fast).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from optimer_lib.errors import ConfigError, OptimerError, Problems

KEEP = (None, "auto", "keep")  # --dtype of merge/extract: keep the checkpoint's dtype


def add_compute_args(p: argparse.ArgumentParser, *, device: str | None = "cpu", dtype_help: str | None = None,
                      dtype: bool = True, base_on: bool = False) -> None:
    """``--device`` and ``--dtype``, the same flags wherever a model is loaded (checked by ``compute_args``), and
    with ``base_on`` the ``--base-on`` of commands that keep a base beside merged models."""
    p.add_argument("--device", default=device, help=f"where models are loaded and computed: cpu, cuda, cuda:N or auto "
                   f"(CUDA when present; default {device or 'cpu'})")
    if dtype:
        p.add_argument("--dtype", default=None, help=dtype_help or "float32, bfloat16 or float16 (default auto: "
                       "bfloat16 on CUDA, float32 on CPU)")
    if base_on:
        p.add_argument("--base-on", default="auto", choices=("auto", "host", "device"), help="where the base model "
                       "stays: host (memory-mapped in host memory, merges stream it to the device), device (beside "
                       "the merged models) or auto (default: host when a GPU cannot hold base + slots, as optimer plan "
                       "shows)")


def cmd_workbench(a: argparse.Namespace) -> None:
    from workbench.app import launch, parse_auth  # gradio is an optional dependency: import it only here

    device, dtype = compute_args(a)
    slots = getattr(a, "slots", None)
    if slots is not None and slots < 1:
        raise ConfigError(f"--slots must be at least 1 (got {slots}): one merged model is the least the engine needs")
    tune_slots = getattr(a, "tune_slots", None)  # None: build_app's default
    if tune_slots is not None and tune_slots < 1:
        raise ConfigError(f"--tune-slots must be at least 1 (got {tune_slots})")
    if a.threads is not None and a.threads < 1:
        raise ConfigError(f"--threads must be at least 1 (got {a.threads}); leave it out for the default")
    check_port_free(a.host, a.port)
    base_on = getattr(a, "base_on", "auto")
    from optimer_lib.checkpoints.models import resolve_device
    from optimer_lib.engine.host_base import default_slots

    # refuse a pool that cannot fit, before loading it, with the slots the engine will hold (2 on a CPU, 1 on a GPU)
    given = pool_from_flags(a)
    check_workbench_pool(a.workdir, device, dtype, slots or default_slots(resolve_device(device)), base_on,
                         manifest=given)
    if given:
        save_workbench_pool(a.workdir, given)
    auth_spec = a.auth or os.environ.get("OPTIMER_AUTH") or None
    extra = {"auth": parse_auth(auth_spec)} if auth_spec else {}
    if a.host not in ("127.0.0.1", "localhost", "::1") and not auth_spec:
        print(f"warning: listening on {a.host} without --auth: anyone who reaches this port can use the workbench "
              "and its files", file=sys.stderr, flush=True)
    extra["announce"] = (f"OptiMer workbench on http://{a.host}:{a.port} (workdir {a.workdir}"
                         + (", login required" if auth_spec else "") + "); Ctrl-C stops it")
    if dtype != "float32":  # build_app's default; passed only when it differs
        extra["dtype"] = dtype
    if slots:
        extra["slots"] = slots
    if base_on != "auto":
        extra["base_on"] = base_on
    if tune_slots is not None:
        extra["tune_slots"] = tune_slots
    if getattr(a, "heap", "fast") != "fast":
        extra["heap"] = a.heap
    launch(a.workdir, host=a.host, port=a.port, share=a.share, device=device, threads=a.threads, **extra)


def check_port_free(host: str, port: int) -> None:
    """Refuse (ConfigError) a port outside 1-65535 or one another program listens on, before the pool loads."""
    import socket

    if not 0 < port < 65536:
        raise ConfigError(f"--port must be between 1 and 65535 (got {port})")
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        import errno

        why = "another program uses that port" if exc.errno == errno.EADDRINUSE else str(exc)
        raise ConfigError(f"cannot listen on {host}:{port}: {why}; choose another --port") from exc


def pool_from_flags(a: argparse.Namespace) -> dict | None:
    """The pool named by ``--base``/``--vector``/``--instruction`` (absolute paths, each checked), or None."""
    base, vectors, inst = getattr(a, "base", None), getattr(a, "vector", None) or [], getattr(a, "instruction", None)
    if not (base or vectors or inst):
        return None
    if not base or not vectors:
        raise ConfigError("--base and --vector go together: name the base checkpoint and each vector file "
                          "(e.g. --base runs/smollm2/base --vector ja.safetensors --vector code.safetensors)")
    problems = Problems()
    check_pool_paths(problems, base, [*vectors, *([inst] if inst else [])])
    problems.raise_any()
    return {"base": str(Path(base).resolve()), "vectors": [str(Path(v).resolve()) for v in vectors],
            "instruction": str(Path(inst).resolve()) if inst else None}


def check_pool_paths(problems: Problems, base: str, vectors: list[str]) -> None:
    """Into ``problems``: a ``base`` that is not a checkpoint folder, each of ``vectors`` that is not a vector file
    (missing, or not a vector's format); headers only, nothing loads."""
    from optimer_lib.checkpoints.models import check_checkpoint_dir
    from optimer_lib.checkpoints.vectors import vector_files

    problems.check(check_checkpoint_dir, base)
    for v in vectors:
        problems.check(vector_files, v)


def save_workbench_pool(workdir: Path, pool: dict) -> None:
    """Write ``pool`` as the workdir's workbench.json (its dev sets kept), saying what it replaced."""
    from workbench.workspace import MANIFEST, Workspace

    ws = Workspace(workdir)  # makes the folder
    old = ws.manifest() if (ws.workdir / MANIFEST).is_file() else None
    path = ws.write_manifest(pool["base"], pool["vectors"], pool["instruction"], (old or {}).get("eval"))
    was = f", replacing its pool of {len(old.get('vectors') or [])} vector(s) on {old.get('base')}" if old else ""
    print(f"pool: {len(pool['vectors'])} vector(s) on {pool['base']} (saved in {path}{was})", flush=True)


def compute_args(a: argparse.Namespace, *, keep: bool = False) -> tuple[str, str | None]:
    """``(device, dtype name)`` from ``--device``/``--dtype``, checked before any model loads (one-line errors for an
    unknown name or an absent CUDA device). ``dtype`` None/"auto" is bfloat16 on CUDA, float32 on CPU; with
    ``keep`` (merge, vector extract) it stays None: the checkpoint's own dtype."""
    from optimer_lib.engine.machine import DTYPE_NAMES, resolve_compute

    dtype = getattr(a, "dtype", None)
    dev, dt = resolve_compute(getattr(a, "device", None) or "cpu", None if dtype in KEEP else dtype)
    return str(dev), (None if keep and dtype in KEEP else DTYPE_NAMES[dt])


def cmd_plan(a: argparse.Namespace) -> None:
    """``optimer plan``: what the pool needs on this device (or ``--sizes``: the hypothetical-model table)."""
    from optimer_lib.engine.machine import GB
    from optimer_lib.engine.plan import hypothetical_plans, markdown_table, plan_pool
    from optimer_lib.search.specs import parse_vector_spec

    bandwidth = None if a.bandwidth is None else a.bandwidth * GB
    if a.bandwidth is not None and not a.bandwidth > 0:
        raise ConfigError(f"--bandwidth must be a positive number of GB/s, got {a.bandwidth}")
    if a.sizes:
        plans = hypothetical_plans(slots=a.slots)
        print(json.dumps([p.to_dict() for p in plans], indent=2) if a.json else markdown_table(plans))
        return
    if not a.base:
        raise ConfigError("optimer plan needs --base DIR (and each --vector FILE), or --sizes for the table of "
                          "hypothetical models")
    device, dtype = compute_args(a)
    inst = parse_vector_spec(a.instruction)[0] if a.instruction else None
    plan = plan_pool(a.base, [parse_vector_spec(v)[0] for v in a.vector or []], instruction=inst, device=device,
                     dtype=dtype, slots=a.slots, bandwidth=bandwidth, base_on=getattr(a, "base_on", None))
    print(json.dumps(plan.to_dict(), indent=2) if a.json else plan.table())


def check_workbench_pool(workdir: Path, device: str, dtype: str, slots: int = 1, base_on: str = "auto",
                         manifest: dict | None = None) -> None:
    """Refuse (PlanError, one line) a workbench whose pool (``manifest``, else the workdir's) cannot fit base (unless
    ``base_on`` keeps it on the host) + ``slots`` slots on ``device``; no pool yet: ok."""
    from optimer_lib.engine.plan import plan_pool
    from workbench.workspace import Workspace

    m = manifest or (Workspace(workdir, device=device, dtype=dtype).manifest() if Path(workdir).is_dir() else None)
    if not m or not m.get("base") or not m.get("vectors"):
        return  # the Pool tab builds or chooses one; the engine checks again when it opens it

    def full(p: str) -> Path:
        return Path(p) if Path(p).is_absolute() else Path(workdir).resolve() / p

    plan = plan_pool(full(m["base"]), [full(v) for v in m["vectors"]],
                     instruction=full(m["instruction"]) if m.get("instruction") else None, device=device,
                     dtype=dtype, slots=slots, seconds=0.05, base_on=base_on)
    plan.check()


def cmd_search(a: argparse.Namespace) -> None:
    from optimer_lib.data import load_eval_suite
    from optimer_lib.engine.host_base import pool_base_on
    from optimer_lib.merging.pool import open_pool
    from optimer_lib.scoring.objectives import parse_objective
    from optimer_lib.search.pruning import parse_fidelities
    from optimer_lib.search.samples import read_sample_prompts
    from optimer_lib.search.specs import parse_bounds, parse_vector_spec
    from optimer_lib.search.study import SearchConfig, run_search

    problems = getattr(a, "problems", None) or Problems()  # every flag mistake at once, before any model loads
    fidelities = problems.check(parse_fidelities, a.fidelities) if a.fidelities else None
    if a.objectives and (a.pruner != "none" or fidelities):
        problems.errors.append(ConfigError("--pruner/--fidelities work with one --objective, not a Pareto search "
                                           "(--objectives)"))
    files = [spec[0] for spec in (problems.check(parse_vector_spec, s) for s in a.vector) if spec]
    check_pool_paths(problems, a.base, files)
    suite = problems.check(load_eval_suite, a.eval, a.split)
    objectives = [problems.check(parse_objective, o, list(suite.texts), qa_names=list(suite.qa),
                                 maximize=a.maximize or None) for o in a.objectives or [a.objective]] if suite else []
    bounds = problems.check(parse_bounds, a.bounds) if a.bounds else None
    prompts = problems.check(read_sample_prompts, a.sample_prompts)
    cfg = SearchConfig(trials=a.trials, sampler=a.sampler, seed=a.seed, bounds=bounds, storage=a.storage,
                       study_name=a.study, workdir=Path(a.workdir), search_limit=a.search_limit,
                       rescore_limit=a.rescore_limit, top_k=a.top_k, pruner=a.pruner,
                       fidelities=fidelities, time_budget=a.time_budget, granularity=a.granularity,
                       sample_prompts=prompts or (), sample_tokens=a.sample_tokens)
    # trials, sampler, --time-budget, granularity, limits...: those need no pool, so they are reported now
    from optimer_lib.search.pareto import PARETO_SAMPLERS
    from optimer_lib.search.samplers import SAMPLERS

    samplers = PARETO_SAMPLERS if a.objectives else SAMPLERS  # a Pareto search has its own samplers
    problems.errors += [ConfigError(m) for m in cfg.setting_problems(samplers)]
    compute = problems.check(compute_args, a)
    inst, inst_w = (problems.check(parse_vector_spec, a.instruction) or (None, None)) if a.instruction \
        else (None, None)
    problems.raise_any()
    assert compute is not None and suite is not None  # both checked just above
    device, dtype = compute
    objective = objectives[0]
    budget = cfg.budget_seconds()
    if not a.estimate_only:
        _check_best_json(Path(a.workdir), cfg.study_name, cfg.storage_url() or ":memory:", a.force,
                         archive=bool(a.warm_start_from))
    base_on = pool_base_on(getattr(a, "base_on", None), a.base, files, inst, device=device, dtype=dtype, slots=1)
    pool = open_pool(a.base, files, instruction=inst, device=device, dtype=dtype, base_on=base_on,
                     allow_fingerprint_mismatch=a.allow_base_mismatch, trust_remote_code=a.trust_remote_code)
    if inst:
        pool.merger.instruction_weight = 1.0 if inst_w is None else inst_w
    if not (a.objectives or a.warm_start_from):
        cfg.check(pool.names)  # every settings problem (bound names included) before any trial
    _print_estimate(pool, suite, objectives, cfg, budget, measure_callables=a.estimate_only)
    if a.estimate_only:
        return None
    if a.objectives or a.warm_start_from:  # these validate their own settings (Pareto samplers differ)
        return _search_on_demand(a, pool, suite, objectives, cfg)
    res = run_search(pool.merger, pool.tokenizer, suite, objective, cfg)
    if res.stopped:
        done = res.study.user_attrs["stopped"]["trials"]
        print(f"stopped for the time budget after {res.new_trials} new trial(s) ({done} of {cfg.trials} in the "
              "study; no re-scoring): re-run the same command to continue", file=sys.stderr)
    elif res.interrupted:
        print(f"interrupted after {res.new_trials} new trial(s); best.json holds the best finished one (no "
              "re-scoring)", file=sys.stderr)
    _print_result({"best_weights": res.best_weights, "objective": res.best_value, "best_json": str(res.path),
                   **({"stopped": res.stopped} if res.stopped else {})}, res.interrupted)


def _print_estimate(pool, suite, objectives: list, cfg, budget: float | None, *,
                    measure_callables: bool = False) -> None:
    """The estimated time per trial and for the whole search, on stderr (stdout stays the JSON result).

    A callable objective (``file.py:fn``, lm-eval tasks) is not timed before a search unless asked
    (``measure_callables``: ``--estimate-only``): its cost is not dev tokens, and timing it would run it
    several times (an lm-eval task for minutes) before the first trial.
    """
    from optimer_lib.search.cost import estimate_search_cost, trials_done

    callables = [o.spec for o in objectives if o.fn is not None]
    if callables and not measure_callables:
        print(f"cost estimate skipped: objective {callables[0]} is a callable, timed only by its trials "
              "(--estimate-only times it)", file=sys.stderr, flush=True)
        return
    done = 0 if measure_callables else trials_done(cfg)  # --estimate-only prices the whole search
    if done >= cfg.trials:
        print(f"the study already has its {cfg.trials} trials: nothing to run (raise --trials to search on)",
              file=sys.stderr, flush=True)
        return
    cost = estimate_search_cost(pool.merger, pool.tokenizer, suite, objectives, cfg, trials=cfg.trials - done)
    resumed = f"resuming: {done} of {cfg.trials} trials are done; " if done else ""
    print(f"{resumed}{cost.summary(budget)} (measured in {cost.calibration_seconds:.1f} s on "
          f"{next(pool.model.parameters()).device})", file=sys.stderr, flush=True)


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
    from optimer_lib.search.trials import counted
    from optimer_lib.search.warmstart import seeded_bounds, warm_start_search, warm_start_study

    if not a.objectives:
        res = warm_start_search(pool.merger, pool.tokenizer, suite, objectives[0], cfg, a.warm_start_from)
        seeded = res.study.user_attrs[record.WARM_START]["seeded"]
        _print_result({"best_weights": res.best_weights, "objective": res.best_value, "seeded": seeded,
                       "best_json": str(res.path)}, res.interrupted)
        return
    if a.warm_start_from:
        if cfg.storage_url() is None:
            raise ConfigError("--warm-start-from needs a persistent --storage, not ':memory:'")
        study = warm_start_study(a.warm_start_from, objectives, storage=cfg.storage_url(), study_name=cfg.study_name)
        cfg.bounds = cfg.bounds or seeded_bounds(study)
    res = run_pareto_search(pool.merger, pool.tokenizer, suite, objectives, cfg)
    if res.stopped:
        print(f"stopped for the time budget after {res.new_trials} new trial(s) ({counted(res.study)} of "
              f"{cfg.trials} in the study): re-run the same command to continue", file=sys.stderr)
    front = [{"trial": p.number, "weights": p.weights, "values": p.values} for p in res.front]
    _print_result({"objectives": res.objectives, "front": front, "pareto_json": str(res.path),
                   **({"stopped": res.stopped} if res.stopped else {})}, res.interrupted)


def _print_result(payload: dict, interrupted: bool) -> None:
    """A search's result as JSON on stdout. An interrupted search says so there, then exits as any Ctrl-C does
    (main: exit 130, "re-run the same command to continue"; the finished trials and the result file are kept)."""
    print(json.dumps({**payload, **({"interrupted": True} if interrupted else {})}, indent=2))
    if interrupted:
        raise KeyboardInterrupt


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
