"""The sampler registry: every way the search proposes the next merge weights, by name.

    from optimer_lib.search.samplers import SAMPLERS, make_sampler
    sampler = make_sampler("tpe", seed=0, bounds={"ja": (0, 1), "code": (0, 1)}, n_trials=100)

``tpe`` (Optuna's TPE, the paper's choice), ``gp`` (Gaussian process), ``cmaes`` (CMA-ES), ``random``,
``grid`` (k points per axis, k^d ≈ trials) and ``grad`` (TPE warm-started by projected gradient steps on α,
:mod:`optimer_lib.search.gradient`). Multi-objective searches have their own registry,
:data:`optimer_lib.search.pareto.PARETO_SAMPLERS`. Add a sampler by adding a factory here.
"""

from __future__ import annotations

from collections.abc import Callable

import optuna

from optimer_lib.errors import ConfigError, MissingDependencyError
from optimer_lib.search.gradient import grad_tpe

Bounds = dict[str, tuple[float, float]]
SamplerFactory = Callable[[int, Bounds, int], optuna.samplers.BaseSampler]


def resume_seed(seed: int, trials_so_far: int) -> int:
    """The sampler seed of a worker joining (or resuming) a study that already holds ``trials_so_far`` trials.

    A seeded sampler started afresh would replay its first draws; ``seed + trials_so_far`` avoided that for one
    worker but collided across workers (``--seed 0`` after 1 trial = ``--seed 1`` after 0). Hashing the pair
    keeps resumes deterministic and gives every (seed, trial count) its own stream.
    """
    import numpy as np

    return int(np.random.SeedSequence([int(seed), int(trials_so_far)]).generate_state(1)[0])


def startup_trials(n_trials: int) -> int:
    """Random start-up of ~n/5 (at most 10, the paper-scale default) before a model-based sampler kicks in."""
    return max(2, min(10, n_trials // 5))


def _tpe(seed: int, bounds: Bounds, n_trials: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=startup_trials(n_trials))


def _gp(seed: int, bounds: Bounds, n_trials: int) -> optuna.samplers.BaseSampler:
    # GPSampler imports scipy/torch lazily, i.e. mid-search; fail up front instead.
    for module in ("scipy", "torch"):
        try:
            __import__(module)
        except ImportError as exc:
            raise MissingDependencyError(f"sampler 'gp' needs {module}: pip install scipy torch "
                                         "(or choose --sampler tpe)") from exc
    return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup_trials(n_trials))


def _cmaes(seed: int, bounds: Bounds, n_trials: int) -> optuna.samplers.BaseSampler:
    try:
        import cmaes  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError("sampler 'cmaes' needs the cmaes package: pip install cmaes "
                                     "(or choose --sampler tpe)") from exc
    return optuna.samplers.CmaEsSampler(seed=seed)


def _random(seed: int, bounds: Bounds, n_trials: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)


class GridSearchSampler(optuna.samplers.GridSampler):
    """GridSampler whose exhaustion the trial loop checks (its own ``study.stop()`` only works inside
    ``study.optimize``, and raises in the ask/tell loop used here)."""

    def after_trial(self, study, trial, state, values) -> None:
        return None


def _grid(seed: int, bounds: Bounds, n_trials: int) -> optuna.samplers.BaseSampler:
    # k points per axis with k^d ≈ n_trials (at least the two end points).
    k = max(2, round(n_trials ** (1 / max(1, len(bounds)))))
    space = {n: [lo + (hi - lo) * i / (k - 1) for i in range(k)] for n, (lo, hi) in bounds.items()}
    return GridSearchSampler(space, seed=seed)


SAMPLERS: dict[str, SamplerFactory] = {"tpe": _tpe, "gp": _gp, "cmaes": _cmaes, "random": _random, "grid": _grid,
                                      "grad": grad_tpe}


def make_sampler(name: str, seed: int, bounds: Bounds, n_trials: int) -> optuna.samplers.BaseSampler:
    """Build a registered sampler; unknown names raise ConfigError listing the choices."""
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name](seed, bounds, n_trials)


def grid_exhausted(study: optuna.Study) -> bool:
    """Whether a grid search has tried every point (the trial loop's stop condition for ``grid``)."""
    return isinstance(study.sampler, optuna.samplers.GridSampler) and study.sampler.is_exhausted(study)
