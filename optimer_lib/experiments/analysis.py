"""Analyses of a vector pool: orthogonality, linearity of CPT, the α landscape, α -> ratios, re-optimisation.

    from optimer_lib.experiments.analysis import (alpha_to_ratios, landscape_grid, linearity, pairwise_cosine,
                                                  reoptimise, span_residual, trajectory_checkpoints, trials_to_reach)
    pairwise_cosine([ja, zh, math])                      # {"names", "matrix", "off_diagonal": {min, max, mean}}
    steps = trajectory_checkpoints("runs/cpt/ja")        # [(fraction of training, checkpoint dir), ...]
    linearity("assets/base", [p for _, p in steps], ja_vector, fractions=[f for f, _ in steps])
    span_residual("assets/base", "runs/mixture", [ja, zh])   # share of the mixture's shift outside span{τ}
    landscape_grid(pool.merger, tok, dev, objective, "ja", "zh", fixed=best_alpha, points=7)
    alpha_to_ratios({"ja": 0.3, "zh": 0.1}, tokens={"ja": 4e5, "zh": 8e5})   # token-weighted shares
    reoptimise(pool.merger, tok, dev, {"ja": obj_ja, "math": obj_math}, SearchConfig(trials=50, ...))

Linearity streams tensor by tensor (one checkpoint tensor in memory at a time; safetensors files are
read lazily): for each checkpoint θ_k it finds the t minimising ||θ_k − (θ_base + t τ)||, and reports t,
the relative residual ||θ_k − θ_base − t τ|| / ||θ_k − θ_base|| and cos(θ_k − θ_base, τ).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from optimer_lib.checkpoints.vectors import DistributionVector, cosine_matrix, norms, unique_tensors
from optimer_lib.errors import ConfigError
from optimer_lib.merging.merger import Merger

Source = str | os.PathLike | Mapping[str, torch.Tensor] | torch.nn.Module


def pairwise_cosine(vectors: Sequence[DistributionVector]) -> dict[str, Any]:
    """Cosine matrix, norms and the spread of the off-diagonal cosines."""
    names, cos = cosine_matrix(vectors)
    off = [float(cos[i, j]) for i in range(len(names)) for j in range(len(names)) if i < j]
    stats = {"min": min(off), "max": max(off), "mean": sum(off) / len(off)} if off else {}
    return {"names": names, "matrix": [[float(c) for c in row] for row in cos], "norms": norms(vectors),
            "off_diagonal": stats}


class _Reader:
    """Tensor-by-tensor access to a model: a module, a state dict, or an HF directory (lazy safetensors)."""

    def __init__(self, src: Source) -> None:
        self._state: Mapping[str, torch.Tensor] | None = None
        self._files: dict[str, Path] = {}
        if isinstance(src, torch.nn.Module):
            self._state = src.state_dict()
        elif isinstance(src, Mapping):
            self._state = src
        else:
            root = Path(src)
            index = root / "model.safetensors.index.json"
            if index.is_file():
                self._files = {k: root / f for k, f in json.loads(index.read_text())["weight_map"].items()}
            elif (root / "model.safetensors").is_file():
                from safetensors import safe_open

                with safe_open(str(root / "model.safetensors"), framework="pt") as f:
                    self._files = dict.fromkeys(f.keys(), root / "model.safetensors")
            else:  # other formats: load whole (renames handled by transformers)
                from optimer_lib.checkpoints.vectors import as_state

                self._state = as_state(root)

    def keys(self) -> list[str]:
        if self._state is not None:
            return list(unique_tensors(self._state)[0])
        return list(self._files)

    def __contains__(self, key: str) -> bool:
        return key in (self._state if self._state is not None else self._files)

    def get(self, key: str) -> torch.Tensor:
        if self._state is not None:
            return self._state[key].detach()
        from safetensors import safe_open

        with safe_open(str(self._files[key]), framework="pt") as f:
            return f.get_tensor(key)


def _reader(src: Source, keys: Sequence[str]) -> _Reader:
    """A reader holding every key; a directory whose file names differ (renamed keys) is loaded whole."""
    r = _Reader(src)
    if isinstance(src, (str, os.PathLike)) and any(k not in r for k in keys):
        from optimer_lib.checkpoints.vectors import as_state

        r = _Reader(as_state(src))
    return r


def linearity(base: Source, checkpoints: Sequence[Source], tau: DistributionVector | Source, *,
              fractions: Sequence[float] | None = None) -> list[dict[str, float]]:
    """For each checkpoint θ_k: best t, relative residual to the line θ_base + t τ, and cos(θ_k − θ_base, τ).

    ``tau`` is a vector or the run's final checkpoint (then τ = final − base). ``fractions`` (e.g. the
    share of training tokens at each checkpoint) are copied into the rows for comparison with t.
    """
    vec = tau if isinstance(tau, DistributionVector) else None
    b = _Reader(base)
    keys = list(vec.tensors) if vec is not None else [k for k in b.keys() if b.get(k).is_floating_point()]
    b = _reader(base, keys)
    final = None if vec is not None else _reader(tau, keys)  # type: ignore[arg-type]
    rows = []
    for i, ck in enumerate(checkpoints):
        c = _reader(ck, keys)
        missing = [k for k in keys if k not in c or k not in b]
        if missing:
            raise ConfigError(f"checkpoint {i} lacks tensors of the vector, e.g. {missing[:3]}: "
                              "use checkpoints of a run trained from this base")
        dd = dt = tt = 0.0
        for key in keys:
            base_t = b.get(key).double()
            d = (c.get(key).double() - base_t).reshape(-1)
            t_vec = (vec.tensors[key].double() if vec is not None else final.get(key).double() - base_t).reshape(-1)
            dd += float(d @ d)
            dt += float(d @ t_vec)
            tt += float(t_vec @ t_vec)
        if tt <= 0:
            raise ConfigError("τ is zero: the final checkpoint equals the base")
        t = dt / tt
        res = math.sqrt(max(dd - dt * dt / tt, 0.0))
        row = {"t": t, "residual": res / math.sqrt(dd) if dd > 0 else 0.0,
               "cosine": dt / math.sqrt(dd * tt) if dd > 0 else 0.0, "norm_ratio": math.sqrt(dd / tt)}
        if fractions is not None:
            row["fraction"] = float(fractions[i])
        rows.append(row)
    return rows


def span_residual(base: Source, model: Source, vectors: Sequence[DistributionVector]) -> dict[str, Any]:
    """How much of a model's shift d = θ_model − θ_base lies outside span{τ_i}: the least-squares fit
    d ≈ Σ c_i τ_i, from the K×K Gram matrix G_ij = <τ_i, τ_j> and b_i = <τ_i, d> accumulated tensor by tensor
    (float64; one tensor of each in memory at a time, the model is never flattened into one vector).

    Returns ``residual`` = ||d − Σ c_i τ_i|| / ||d|| (0: merging the τ_i with weights c could reproduce the shift
    exactly; 1: the shift is orthogonal to every τ_i), the ``coefficients`` c_i by vector name and ``shift_norm``
    ||d||. Only the vectors' tensors count; a singular G (parallel vectors) takes the minimum-norm solution.
    """
    import numpy as np

    keys = list(dict.fromkeys(k for v in vectors for k in v.tensors))
    b, m = _reader(base, keys), _reader(model, keys)
    k = len(vectors)
    gram, dots, dd = np.zeros((k, k)), np.zeros(k), 0.0
    for key in keys:
        base_t = b.get(key).double()
        d = (m.get(key).double() - base_t).reshape(-1)
        taus = torch.stack([v.tensors[key].double().reshape(-1) if key in v.tensors else torch.zeros_like(d)
                            for v in vectors])
        gram += (taus @ taus.T).numpy()
        dots += (taus @ d).numpy()
        dd += float(d @ d)
    c = np.linalg.lstsq(gram, dots, rcond=None)[0]
    res2 = max(dd - 2 * float(c @ dots) + float(c @ gram @ c), 0.0)
    return {"residual": math.sqrt(res2 / dd) if dd > 0 else 0.0, "shift_norm": math.sqrt(dd),
            "coefficients": {v.name: float(x) for v, x in zip(vectors, c, strict=True)}}


def trajectory_checkpoints(run_dir: str | os.PathLike) -> list[tuple[float, Path]]:
    """``[(fraction of the run's tokens, checkpoint dir)]`` of a run trained with ``trajectory=N``, final last."""
    run = Path(run_dir)
    total = json.loads((run / "training.json").read_text())["tokens_trained"]
    out = []
    for d in sorted((run / "trajectory").glob("step-*")):
        tokens = json.loads((d / "training.json").read_text())["tokens"]
        out.append((tokens / total, d))
    return out + [(1.0, run)]


def landscape_grid(merger: Merger, tokenizer: Any, suite: Any, objective: Any, x: str, y: str, *,
                   fixed: Mapping[str, float], points: int = 7, bounds: tuple[float, float] = (0.0, 1.0),
                   limit: int | None = 100, seq_len: int = 128, batch_size: int = 16,
                   within: float = 0.01) -> dict[str, Any]:
    """The objective on a ``points`` x ``points`` grid over α_x, α_y, others at ``fixed``.

    ``z[i][j]`` is the value at ``(xs[j], ys[i])``. Also reports the grid's best/worst and the share of
    grid points within ``within`` (relative) of the grid's best, a measure of how sharp the optimum is.
    """
    if x == y or x not in merger.names or y not in merger.names:
        raise ConfigError(f"landscape axes must be two different vectors of {merger.names}, got {x!r}, {y!r}")
    lo, hi = bounds
    grid = [lo + (hi - lo) * i / (points - 1) for i in range(points)]
    t0 = time.perf_counter()
    z = []
    for vy in grid:
        row = []
        for vx in grid:
            merger.set_weights({**dict(fixed), x: vx, y: vy})
            row.append(float(objective.evaluate(merger.model, tokenizer, suite, limit=limit, seq_len=seq_len,
                                                batch_size=batch_size)[0]))
        z.append(row)
    flat = [v for r in z for v in r]
    best = min(flat)
    near = sum(v <= best + within * abs(best) for v in flat) / len(flat)
    return {"x": x, "y": y, "xs": grid, "ys": grid, "z": z, "fixed": dict(fixed), "best": best, "worst": max(flat),
            "within": within, "share_within": near, "evals": len(flat), "seconds": time.perf_counter() - t0}


def trials_to_reach(values: Sequence[float | None], target: float) -> int | None:
    """1-based number of trials after which the best value so far is <= ``target`` (None: never)."""
    best = math.inf
    for i, v in enumerate(values, 1):
        if v is not None and math.isfinite(v):
            best = min(best, v)
        if best <= target:
            return i
    return None


def compare_searches(runs: Mapping[str, Sequence[float | None]], *, within: float = 0.01) -> dict[str, Any]:
    """Trials each search needed to come within ``within`` (relative) of the best value any of them found."""
    finite = [v for vs in runs.values() for v in vs if v is not None and math.isfinite(v)]
    best = min(finite)
    target = best + within * abs(best)
    return {"best": best, "target": target, "within": within,
            "runs": {k: {"trials": len(vs), "best": min((v for v in vs if v is not None), default=None),
                         "trials_to_reach": trials_to_reach(vs, target)} for k, vs in runs.items()}}


def alpha_to_ratios(alpha: Mapping[str, float], tokens: Mapping[str, float] | None = None) -> dict[str, float]:
    """Mixture shares from merge weights: α_i / Σα, or with ``tokens`` α_i T_i / Σ α_j T_j.

    Reading α as the fraction of a CPT run's effect kept (finding 3: α ≈ fraction of training), α_i T_i
    is the number of tokens of dataset i the merge "used"; with equal T_i both forms agree.
    """
    w = {n: max(0.0, float(a)) * (float(tokens[n]) if tokens is not None else 1.0) for n, a in alpha.items()}
    total = sum(w.values())
    if total <= 0:
        raise ConfigError(f"all weights are zero or negative ({dict(alpha)}): no mixture to read off")
    return {n: v / total for n, v in w.items()}


def ratio_conversions(alpha: Mapping[str, float], tokens: Mapping[str, float]) -> dict[str, Any]:
    """Both conversions plus the effective token counts α_i T_i and their sum (a retraining budget)."""
    effective = {n: max(0.0, float(a)) * float(tokens[n]) for n, a in alpha.items()}
    return {"normalised": alpha_to_ratios(alpha), "token_weighted": alpha_to_ratios(alpha, tokens),
            "effective_tokens": effective, "effective_total": sum(effective.values())}


def reoptimise(merger: Merger, tokenizer: Any, suite: Any, objectives: Mapping[str, Any], config: Any, *,
               eval_suites: Mapping[str, Any] | None = None, limit: int | None = None,
               progress: bool = False) -> dict[str, Any]:
    """Search the same pool once per objective; evaluate every result on every distribution.

    Each search is a study named ``reopt-<label>`` with its best.json in ``config.workdir/<label>``.
    ``eval_suites`` (e.g. ``{"dev": dev, "test": test}``, default ``{"dev": suite}``) are scored in full
    (all metrics, first ``limit`` items) at each result, and every objective's value is computed on them.
    """
    from optimer_lib.scoring.evaluate import evaluate_suite
    from optimer_lib.search.study import run_search

    eval_suites = dict(eval_suites or {"dev": suite})
    out: dict[str, Any] = {}
    for label, obj in objectives.items():
        cfg = replace(config, study_name=f"reopt-{label}", workdir=Path(config.workdir) / label)
        res = run_search(merger, tokenizer, suite, obj, cfg, progress=progress)
        merger.set_weights(res.best_weights)
        entry: dict[str, Any] = {"weights": res.best_weights, "objective": res.value_search, "spec": obj.spec}
        for split, s in eval_suites.items():
            metrics = evaluate_suite(merger.model, tokenizer, s, limit=limit, seq_len=config.seq_len,
                                     batch_size=config.batch_size)
            entry[split] = metrics
            entry[f"{split}_objectives"] = {k: float(o(metrics)) for k, o in objectives.items() if o.fn is None}
        out[label] = entry
    return out
