"""Gradient of a dev-loss objective w.r.t. the merge weights α, projected descent, and the ``grad`` sampler.

    from optimer_lib.search.gradient import objective_gradient, projected_descent
    g = objective_gradient(pool.merger, pool.tokenizer, suite, objective, {"ja": 0.3, "zh": 0.2}, limit=100)
    g.value, g.grad        # the objective at α and dL/dα_i, e.g. {"ja": -0.41, "zh": 0.07}
    path = projected_descent(pool.merger, pool.tokenizer, suite, objective, {"ja": (0, 1), "zh": (0, 1)}, steps=5)
    [(p.weights, p.value) for p in path]     # the iterates; the last one is not evaluated (value None)

    optimer search --base DIR --vector ja.safetensors --vector zh.safetensors --objective balanced --sampler grad

The merged model is θ(α) = θ_base + Σ α_i τ_i (+ the instruction vector at its fixed weight), so by the chain
rule ∂L/∂α_i = ⟨∇_θ L, τ_i⟩: one forward and backward pass at α gives every partial derivative. Gradients
are accumulated over a dev set's batches into ``.grad`` of the merged parameters only (about one model of
gradients), then contracted with each vector tensor by tensor and freed before the next dev set.

Differentiable terms are ``loss:<set>`` and ``ppl:<set>`` (= exp(loss), chain rule) of a weighted metric list,
with the loss of :func:`optimer_lib.scoring.evaluate.mean_token_loss` (token-weighted mean NLL of the first ``limit``
documents, same tokenisation and batching). ``acc:<task>`` (exact match of greedy generations) is piecewise
constant in α, so its derivative is zero almost everywhere: it is left out of ``value`` and ``grad`` (listed in
``dropped``) while ``Σ|w|`` still counts its weight, so ``grad`` is the objective's own slope. An objective
with no loss/ppl term, a callable (lm-eval terms included), a non-linear merge method or a ``maximize`` search
raise ConfigError.

Per-layer-group weights (``name@group`` keys, :mod:`optimer_lib.merging.groups`): θ = θ_base + Σ_i Σ_g α_ig τ_i|g,
so ∂L/∂α_ig = ⟨∇_θ L, τ_i⟩ summed over group g's tensors only: the same single backward pass gives one partial
derivative per (vector, group). Pass ``name@group`` weights (or bounds) and the gradient is keyed the same way.

Sampler ``grad`` (:class:`GradientTPESampler`, registered in ``optimer_lib.search.study.SAMPLERS``): before the
first trial, ``run_search`` calls its :meth:`~GradientTPESampler.warm_start`, which runs
:func:`projected_descent` (Adam on α from the uniform average 1/K, projected onto the bounds) and enqueues the
iterates as the study's first trials (``study.enqueue_trial``, user attr ``grad_step``); multivariate TPE then
continues from them. Every iterate is scored again as a normal trial (all metrics, the full objective). Each
gradient evaluation costs about one forward plus one backward pass (``bench/sampler_efficiency.py`` measures
the ratio to a trial).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import optuna
import torch
import torch.nn.functional as F

from optimer_lib.errors import ConfigError
from optimer_lib.merging import groups
from optimer_lib.merging.merger import Merger
from optimer_lib.merging.resident import ResidentMerger
from optimer_lib.scoring.evaluate import EvalSuite, model_device, pad_token_id, scored_documents
from optimer_lib.scoring.objectives import HIGHER_IS_BETTER, LOWER_IS_BETTER, Objective
from optimer_lib.search import record

if TYPE_CHECKING:
    from optimer_lib.search.study import SearchConfig

log = logging.getLogger(__name__)
Bounds = Mapping[str, tuple[float, float]]
LINEAR_METHODS = ("optimer", "linear")
OPTIMIZERS = ("adam", "sgd")
WARM_START_ATTR = record.GRAD_WARM_START  # study user attr: what the gradient warm start did


def differentiable_terms(objective: Objective) -> tuple[dict[str, float], tuple[str, ...]]:
    """``(loss/ppl terms with non-zero weight, dropped acc terms)`` of a weighted objective.

    ConfigError for a callable objective or one without a differentiable term.
    """
    if objective.fn is not None:
        raise ConfigError(f"objective {objective.spec!r} is a callable (or has lm-eval terms), so its gradient "
                          "w.r.t. the merge weights is unknown: use a weighted list of loss:/ppl: metrics "
                          "(e.g. --objective 'loss:ja,loss:en=0.5') or another sampler (--sampler tpe)")
    diff = {k: w for k, w in objective.terms.items() if k.split(":", 1)[0] in LOWER_IS_BETTER and w}
    dropped = tuple(k for k in objective.terms if k.split(":", 1)[0] in HIGHER_IS_BETTER)
    if not diff:
        raise ConfigError(f"objective {objective.spec!r} has no differentiable term: acc:<task> (exact match of "
                          "generations) does not change smoothly with the weights; add a loss:<set> or ppl:<set> "
                          "term or use another sampler (--sampler tpe)")
    return diff, dropped


def resident_merger(merger: Merger) -> ResidentMerger:
    """The :class:`ResidentMerger` behind ``merger``: itself, or one it wraps (``_merger``/``inner``).

    ConfigError when there is none, when the wrapper exposes other weights, or when the merge method is
    not linear in the weights (the gradient formula needs θ = θ_base + Σ α_i τ_i).
    """
    found, chain = merger, [merger]
    while not isinstance(found, ResidentMerger) and found is not None and len(chain) < 5:
        found = getattr(found, "_merger", None) or getattr(found, "inner", None)
        chain.append(found)
    if not isinstance(found, ResidentMerger):
        raise ConfigError(f"the weight gradient needs the resident merger of a loaded pool "
                          f"(optimer_lib.merging.pool.open_pool), got {type(merger).__name__}: use --sampler tpe")
    if list(merger.names) != found.names:
        raise ConfigError(f"the search varies {list(merger.names)}, not the vector weights {found.names}: "
                          "the weight gradient covers plain per-vector weights only (use --sampler tpe)")
    for m in chain:
        method = getattr(m, "method", "optimer")
        if method not in LINEAR_METHODS:
            raise ConfigError(f"merge method {method!r} is not linear in the weights, so the weight gradient "
                              "does not apply: use --method optimer or another sampler (--sampler tpe)")
    return found


@dataclass
class ObjectiveGradient:
    """The objective's differentiable part at ``weights`` and its partial derivatives.

    ``value`` equals the objective when it has no acc terms (else those are missing from it, see
    ``dropped``); ``metrics`` holds ``loss:``/``ppl:`` of every dev set read; ``loss_grads`` maps each
    ``loss:<set>`` to its own dloss/dα.
    """

    weights: dict[str, float]
    value: float
    grad: dict[str, float]
    metrics: dict[str, float]
    loss_grads: dict[str, dict[str, float]]
    dropped: tuple[str, ...] = ()


def _batches(encoded: list[list[int]], batch_size: int, pad: int,
             device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(ids, attention mask, targets)`` per batch: right padding, targets shifted left, -100 where ignored."""
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start:start + batch_size]
        ids = torch.full((len(batch), len(batch[0])), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(batch):
            ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, :len(seq)] = 1
        target = torch.full_like(ids, -100)
        target[:, :-1] = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        yield ids.to(device), mask.to(device), target.to(device)


@contextmanager
def _grad_on(merger: ResidentMerger) -> Iterator[None]:
    """Autograd on for the merged parameters only; every parameter's flag and ``.grad`` restored on exit."""
    params = list(merger.model.parameters())
    saved = [(p, p.requires_grad, p.grad) for p in params]
    wanted = {id(t.param) for t in merger._targets}
    try:
        for p in params:
            p.grad = None
            p.requires_grad_(id(p) in wanted)
        with torch.enable_grad():
            yield
    finally:
        for p, flag, grad in saved:
            p.requires_grad_(flag)
            p.grad = grad


_DOT_CHUNK = 1 << 24  # elements per dot product: bounds the fp32 copies of low-precision gradients and deltas


def _take_alpha_grad(merger: ResidentMerger, layout: Sequence[str] = ()) -> list[float]:
    """⟨∇_θ L, τ_i⟩ for every vector (with a ``layout`` of groups: for every vector then group, over the group's
    tensors; tensors in none of them are left out) from the accumulated ``.grad``, freeing each gradient after use.

    Dot products run on the model's device (fp32, fp64 for fp64 models), chunk by chunk, and are summed
    in fp64 there; one transfer at the end.
    """
    width = max(1, len(layout))
    sums: list[torch.Tensor | None] = [None] * (len(merger.names) * width)
    for t in merger._targets:
        g = t.param.grad
        if g is None:  # a tensor the loss does not reach
            continue
        t.param.grad = None
        group = groups.group_of(t.pos, layout) if layout else None
        if layout and group is None:
            continue
        col = layout.index(group) if group is not None else 0
        acc = torch.float64 if g.dtype == torch.float64 else torch.float32
        flat = g.reshape(-1)
        for i, d in enumerate(t.deltas):
            if d is None:
                continue
            k = i * width + col
            dflat = d.reshape(-1)
            for s in range(0, flat.numel(), _DOT_CHUNK):
                part = torch.dot(flat[s:s + _DOT_CHUNK].to(acc), dflat[s:s + _DOT_CHUNK].to(acc)).double()
                sums[k] = part if sums[k] is None else sums[k] + part.to(sums[k].device)  # (sharded models)
    return [0.0 if s is None else float(s) for s in sums]


def _loss_and_grad(merger: ResidentMerger, tokenizer: Any, texts: Sequence[str], *, limit: int | None,
                   seq_len: int, batch_size: int, layout: Sequence[str] = ()) -> tuple[float, list[float]]:
    """Token-weighted mean NLL of one dev set and its derivative w.r.t. each vector weight."""
    model = merger.model
    encoded = scored_documents(model, tokenizer, texts, seq_len, limit)
    count = sum(len(e) - 1 for e in encoded)  # the scored targets: every token but each document's first
    total = 0.0
    for ids, mask, target in _batches(encoded, batch_size, pad_token_id(tokenizer), model_device(model)):
        logits = model(input_ids=ids, attention_mask=mask).logits
        logits = logits if logits.dtype == torch.float64 else logits.float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                              reduction="sum")
        (nll / count).backward()  # accumulates d(mean loss)/dθ over the batches
        total += float(nll.detach())
    return total / count, _take_alpha_grad(merger, layout)


def objective_gradient(merger: Merger, tokenizer: Any, suite: EvalSuite, objective: Objective,
                       weights: Mapping[str, float] | None = None, *, limit: int | None = 100, seq_len: int = 128,
                       batch_size: int = 16, layout: Sequence[str] | None = None) -> ObjectiveGradient:
    """The objective's value and dL/dα at ``weights`` (None: the weights the merger holds).

    ``layout`` (group names, :mod:`optimer_lib.merging.groups`; default: the groups ``weights`` names) gives one
    derivative per ``name@group``; ``weights`` and ``grad`` are then keyed that way.

    ``merger`` is a :class:`ResidentMerger` (or a wrapper of one, see :func:`resident_merger`); it holds
    ``weights`` on return. Cost: one forward and one backward pass over the first ``limit`` documents of
    every dev set the objective reads.
    """
    terms, dropped = differentiable_terms(objective)
    resident = resident_merger(merger)
    sets = list(dict.fromkeys(k.split(":", 1)[1] for k in terms))
    missing = [s for s in sets if s not in suite.texts]
    if missing:
        raise ConfigError(f"objective {objective.spec!r} reads dev sets {missing} that the suite lacks "
                          f"(it has {sorted(suite.texts)})")
    layout = list(layout) if layout is not None else groups.groups_in(weights or {})
    names = groups.param_names(resident.names, layout)
    metrics: dict[str, float] = {}
    loss_grads: dict[str, dict[str, float]] = {}
    with resident.lock:
        if weights is not None:
            resident.set_weights(weights)
        at = groups.expand(resident.weights, resident.names, layout) if layout else resident.weights
        with _grad_on(resident):
            for s in sets:
                loss, dloss = _loss_and_grad(resident, tokenizer, suite.texts[s], limit=limit, seq_len=seq_len,
                                             batch_size=batch_size, layout=layout)
                metrics[f"loss:{s}"] = loss
                metrics[f"ppl:{s}"] = math.exp(min(loss, 700.0))  # as evaluate_suite: exp overflows past ~709
                loss_grads[f"loss:{s}"] = dict(zip(names, dloss, strict=True))
    scale = sum(abs(w) for w in objective.terms.values())
    value, grad = 0.0, dict.fromkeys(names, 0.0)
    for key, w in terms.items():
        kind, s = key.split(":", 1)
        slope = metrics[f"ppl:{s}"] if kind == "ppl" else 1.0  # d exp(l)/dl = exp(l)
        value += w * metrics[key] / scale
        for n in names:
            grad[n] += w * slope * loss_grads[f"loss:{s}"][n] / scale
    return ObjectiveGradient(weights=at, value=value, grad=grad, metrics=metrics, loss_grads=loss_grads,
                             dropped=dropped)


def project(weights: Mapping[str, float], bounds: Bounds) -> dict[str, float]:
    """``weights`` clipped into the per-vector ``bounds`` (the Euclidean projection onto the box)."""
    return {n: min(max(float(weights[n]), float(lo)), float(hi)) for n, (lo, hi) in bounds.items()}


def default_start(bounds: Bounds) -> dict[str, float]:
    """The uniform average (1/K per vector, the model-soup point; every group of a vector too) in the bounds."""
    k = len({groups.split_key(n)[0] for n in bounds})
    return project(dict.fromkeys(bounds, 1.0 / max(1, k)), bounds)


@dataclass
class DescentPoint:
    """One iterate of :func:`projected_descent`; ``value``/``grad`` are None for the final, unevaluated one."""

    weights: dict[str, float]
    value: float | None = None
    grad: dict[str, float] | None = None
    seconds: float = 0.0  # wall time of its gradient evaluation
    metrics: dict[str, float] = field(default_factory=dict)


def _check_descent(names: Sequence[str], bounds: Bounds, start: Mapping[str, float] | None, steps: int, lr: float,
                   optimizer: str) -> None:
    problems = []
    if sorted(bounds) != sorted(names):
        problems.append(f"bounds name {sorted(bounds)}, the merger's vectors are {sorted(names)}")
    if start is not None and sorted(start) != sorted(names):
        problems.append(f"start names {sorted(start)}, the merger's vectors are {sorted(names)}")
    bad = [n for n, (lo, hi) in bounds.items() if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi)]
    if bad:
        problems.append(f"bounds of {bad} need finite lo < hi")
    if steps < 1:
        problems.append(f"steps must be >= 1, got {steps}")
    if not (math.isfinite(lr) and lr > 0):
        problems.append(f"lr must be a positive number, got {lr}")
    if optimizer not in OPTIMIZERS:
        problems.append(f"unknown optimizer {optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    if problems:
        raise ConfigError("bad gradient descent settings: " + "; ".join(problems))


def projected_descent(merger: Merger, tokenizer: Any, suite: EvalSuite, objective: Objective, bounds: Bounds, *,
                      steps: int = 5, lr: float = 0.1, start: Mapping[str, float] | None = None,
                      optimizer: str = "adam", limit: int | None = 100, seq_len: int = 128, batch_size: int = 16,
                      callback: Callable[[DescentPoint], None] | None = None) -> list[DescentPoint]:
    """Minimise the objective over α in the box ``bounds`` with ``steps`` gradient evaluations.

    Returns the iterates in order: the evaluated ones (``value``, ``grad`` set; the first is ``start``,
    default :func:`default_start`), then the final point (not evaluated). ``optimizer="adam"`` (default)
    moves α_i by about ``lr · (hi_i − lo_i)`` per step whatever the gradient's scale; ``"sgd"`` is plain
    projected gradient descent, α ← clip(α − lr·∇L). A step that made the value worse is taken back: the next
    one leaves from the best point so far with half the step (fresh Adam moments). Stops early when the
    projected step no longer moves α (a corner or a flat point). ``callback(point)`` after each evaluation.
    ``bounds`` keyed ``name@group`` descend on per-layer-group weights (one per vector and group).
    """
    names = groups.param_names(merger.names, groups.groups_in(bounds))
    _check_descent(names, bounds, start, steps, lr, optimizer)
    differentiable_terms(objective)
    b1, b2, eps = 0.9, 0.999, 1e-12
    x = project(start if start is not None else default_start(bounds), bounds)
    path: list[DescentPoint] = []
    best: DescentPoint | None = None
    m, v, t, rate = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0), 0, float(lr)
    for k in range(steps):
        t0 = time.perf_counter()
        g = objective_gradient(merger, tokenizer, suite, objective, x, limit=limit, seq_len=seq_len,
                               batch_size=batch_size)
        point = DescentPoint(dict(x), g.value, dict(g.grad), time.perf_counter() - t0, dict(g.metrics))
        path.append(point)
        log.info("gradient step %d: value %.6g at %s, grad %s", k, g.value, x, g.grad)
        if callback is not None:
            callback(point)
        if best is None or point.value <= best.value:
            best = point
        else:  # uphill: leave again from the best point with a shorter step
            rate *= 0.5
            m, v, t = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0), 0
        assert best.grad is not None
        if optimizer == "adam":
            t += 1
            for n in names:
                m[n] = b1 * m[n] + (1 - b1) * best.grad[n]
                v[n] = b2 * v[n] + (1 - b2) * best.grad[n] ** 2
            move = {n: rate * (bounds[n][1] - bounds[n][0]) * (m[n] / (1 - b1 ** t))
                    / (math.sqrt(v[n] / (1 - b2 ** t)) + eps) for n in names}
        else:
            move = {n: rate * best.grad[n] for n in names}
        x = project({n: best.weights[n] - move[n] for n in names}, bounds)
        if all(abs(x[n] - best.weights[n]) <= 1e-12 for n in names):
            log.info("gradient descent stopped after %d evaluations: the projected step is zero", k + 1)
            return path
    path.append(DescentPoint(x))
    return path


def default_steps(n_trials: int) -> int:
    """Gradient evaluations of the ``grad`` sampler for a study of ``n_trials``: about n/5, 2 to 8."""
    return max(2, min(8, n_trials // 5))


class GradientTPESampler(optuna.samplers.TPESampler):
    """Multivariate TPE whose study starts with projected-gradient iterates: the ``grad`` sampler.

    Use it through ``run_search`` (``optimer search --sampler grad``), which calls :meth:`warm_start` once the
    study is open; asked for a trial without that (another search loop) it raises ConfigError rather than
    silently acting as plain TPE. ``steps``, ``lr`` and ``optimizer`` go to :func:`projected_descent`.
    """

    def __init__(self, *, seed: int | None = None, n_startup_trials: int = 10, steps: int = 5, lr: float = 0.1,
                 optimizer: str = "adam") -> None:
        super().__init__(seed=seed, multivariate=True, n_startup_trials=n_startup_trials)
        self.steps, self.lr, self.optimizer = int(steps), float(lr), optimizer
        self.path: list[DescentPoint] = []
        self._ready = False

    def warm_start(self, study: optuna.Study, merger: Merger, tokenizer: Any, suite: EvalSuite, objective: Objective,
                   config: SearchConfig, bounds: Bounds) -> list[DescentPoint]:
        """Check the search suits gradients (ConfigError if not); on a study without trials run the descent
        at ``config.search_limit`` and enqueue its distinct iterates (at most ``config.trials``).

        Returns the descent path (empty when the study already had trials: a resumed or warm-started search).
        """
        _, dropped = differentiable_terms(objective)
        resident_merger(merger)
        if config.direction != "minimize":
            raise ConfigError("sampler 'grad' minimises the objective: use direction 'minimize' (or --sampler tpe)")
        if dropped:
            log.warning("sampler 'grad': %s are not differentiable (piecewise constant in the weights); the "
                        "gradient steps follow the rest of the objective, trials score all of it", list(dropped))
        self._ready = True
        if study.trials or WARM_START_ATTR in study.user_attrs:
            return []
        t0 = time.perf_counter()
        path = projected_descent(merger, tokenizer, suite, objective, bounds, steps=self.steps, lr=self.lr,
                                 optimizer=self.optimizer, limit=config.search_limit, seq_len=config.seq_len,
                                 batch_size=config.batch_size)
        seen: set[tuple[float, ...]] = set()
        for k, point in enumerate(path):
            key = tuple(round(point.weights[n], 12) for n in bounds)
            if key in seen or len(seen) >= config.trials:
                continue
            seen.add(key)
            attrs: dict[str, Any] = {record.GRAD_STEP: k}
            if point.value is not None:
                attrs[record.GRAD_VALUE] = point.value
            study.enqueue_trial(dict(point.weights), user_attrs=attrs, skip_if_exists=True)
        study.set_user_attr(WARM_START_ATTR, {
            "evaluations": sum(p.value is not None for p in path), "enqueued": len(seen), "lr": self.lr,
            "optimizer": self.optimizer, "seconds": time.perf_counter() - t0, "dropped": list(dropped),
            "limit": config.search_limit})
        self.path = path
        return path

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if not self._ready:
            raise ConfigError("sampler 'grad' needs a merge-weight search (optimer search / run_search), which "
                              "computes its gradient points before the first trial: choose --sampler tpe here")
        super().before_trial(study, trial)


def grad_tpe(seed: int, bounds: Bounds, n_trials: int, *, steps: int | None = None, lr: float = 0.1,
             optimizer: str = "adam") -> GradientTPESampler:
    """The ``grad`` entry of ``search.study.SAMPLERS``: TPE seeded with :func:`default_steps` gradient points."""
    return GradientTPESampler(seed=seed, n_startup_trials=max(2, min(10, n_trials // 5)),
                              steps=default_steps(n_trials) if steps is None else steps, lr=lr, optimizer=optimizer)
