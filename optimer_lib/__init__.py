"""OptiMer: optimal distribution-vector merging for continual pre-training.

Reference implementation of arXiv 2603.28858. The pipeline, one module per stage:

- :mod:`optimer_lib.data` — corpora (embedded tiny world or user files);
- :mod:`optimer_lib.training.train` — continual pre-training (one dataset, or a data mixture);
- :mod:`optimer_lib.checkpoints.vectors` — distribution vectors tau = theta_tuned - theta_base;
- :mod:`optimer_lib.merging.methods` — merge methods and the in-place resident merger, export;
- :mod:`optimer_lib.scoring.evaluate` — perplexity and exact-match accuracy;
- :mod:`optimer_lib.search.study` — objectives and the Optuna search over merge weights.
"""

from optimer_lib.errors import (
    ConfigError,
    DataError,
    MissingDependencyError,
    ModelError,
    OptimerError,
    VectorError,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataError",
    "MissingDependencyError",
    "ModelError",
    "OptimerError",
    "VectorError",
    "__version__",
]
