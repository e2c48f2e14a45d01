"""OptiMer: optimal distribution-vector merging for continual pre-training (arXiv 2603.28858).

The public API, one import away (each name is loaded on first use, so ``import optimer_lib`` stays cheap):

    from optimer_lib import open_pool, load_eval_suite, parse_objective, SearchConfig, run_search, export_merged
    pool = open_pool("assets/base", ["vectors/ja.safetensors", "vectors/math.safetensors"])
    suite = load_eval_suite(["en", "ja", "math"], "dev")
    objective = parse_objective("balanced", list(suite.texts), qa_names=list(suite.qa))
    result = run_search(pool.merger, pool.tokenizer, suite, objective, SearchConfig(trials=50, workdir="runs/s"))

Stages, lowest layer first (``docs/architecture.md``): checkpoints (models, vectors, GGUF import), training (CPT),
merging (methods, resident merger, pool, export), scoring (evaluate, objectives), search (Optuna study, re-rank,
Pareto, warm start), experiments (the paper's comparisons). Everything else lives in its module and is imported
from there (``optimer_lib.search.pareto.pareto_figure``...).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from optimer_lib.errors import (
    ConfigError,
    DataError,
    MissingDependencyError,
    ModelError,
    OptimerError,
    VectorError,
)

__version__ = "0.1.0"

# name -> module that defines it (loaded lazily by __getattr__ below)
_LAZY = {
    # data
    "assets_dir": "optimer_lib.data",
    "embedded_corpora": "optimer_lib.data",
    "load_corpus": "optimer_lib.data",
    "load_eval_suite": "optimer_lib.data",
    "EvalSuite": "optimer_lib.data",
    # checkpoints
    "load_model": "optimer_lib.checkpoints.models",
    "load_tokenizer": "optimer_lib.checkpoints.models",
    "DistributionVector": "optimer_lib.checkpoints.vectors",
    "extract_vector": "optimer_lib.checkpoints.vectors",
    "save_vector": "optimer_lib.checkpoints.vectors",
    "load_vector": "optimer_lib.checkpoints.vectors",
    "cosine_matrix": "optimer_lib.checkpoints.vectors",
    "extract_vector_streaming": "optimer_lib.checkpoints.streaming",
    "import_gguf": "optimer_lib.checkpoints.gguf_import",
    # training
    "TrainConfig": "optimer_lib.training.train",
    "train_cpt": "optimer_lib.training.train",
    # merging
    "Merger": "optimer_lib.merging.merger",
    "ResidentMerger": "optimer_lib.merging.resident",
    "merge_state_dict": "optimer_lib.merging.methods",
    "register_merge_method": "optimer_lib.merging.methods",
    "Pool": "optimer_lib.merging.pool",
    "open_pool": "optimer_lib.merging.pool",
    "export_merged": "optimer_lib.merging.export",
    "merge_streaming": "optimer_lib.merging.streamed",
    # scoring
    "evaluate_suite": "optimer_lib.scoring.evaluate",
    "parse_objective": "optimer_lib.scoring.objectives",
    # search
    "SearchConfig": "optimer_lib.search.study",
    "SearchResult": "optimer_lib.search.study",
    "run_search": "optimer_lib.search.study",
    "trial_table": "optimer_lib.search.study",
    "rerank": "optimer_lib.search.rerank",
    "run_pareto_search": "optimer_lib.search.pareto",
    "pareto_front": "optimer_lib.search.pareto",
    "warm_start_search": "optimer_lib.search.warmstart",
    # experiments and the demo
    "ExperimentConfig": "optimer_lib.experiments.run",
    "run_experiments": "optimer_lib.experiments.run",
    "DemoConfig": "optimer_lib.demo",
    "run_demo": "optimer_lib.demo",
}

__all__ = [  # the errors above, then every name of _LAZY (tests/test_public_api.py checks both agree)
    "ConfigError", "DataError", "MissingDependencyError", "ModelError", "OptimerError", "VectorError",
    "__version__", "assets_dir", "embedded_corpora", "load_corpus", "load_eval_suite", "EvalSuite", "load_model",
    "load_tokenizer", "DistributionVector", "extract_vector", "save_vector", "load_vector", "cosine_matrix",
    "extract_vector_streaming", "import_gguf", "TrainConfig", "train_cpt", "Merger", "ResidentMerger",
    "merge_state_dict", "register_merge_method", "Pool", "open_pool", "export_merged", "merge_streaming",
    "evaluate_suite", "parse_objective", "SearchConfig", "SearchResult", "run_search", "trial_table", "rerank",
    "run_pareto_search", "pareto_front", "warm_start_search", "ExperimentConfig", "run_experiments", "DemoConfig",
    "run_demo",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'optimer_lib' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ loads each on first use
    from optimer_lib.checkpoints.gguf_import import import_gguf
    from optimer_lib.checkpoints.models import load_model, load_tokenizer
    from optimer_lib.checkpoints.streaming import extract_vector_streaming
    from optimer_lib.checkpoints.vectors import (
        DistributionVector,
        cosine_matrix,
        extract_vector,
        load_vector,
        save_vector,
    )
    from optimer_lib.data import EvalSuite, assets_dir, embedded_corpora, load_corpus, load_eval_suite
    from optimer_lib.demo import DemoConfig, run_demo
    from optimer_lib.experiments.run import ExperimentConfig, run_experiments
    from optimer_lib.merging.export import export_merged
    from optimer_lib.merging.merger import Merger
    from optimer_lib.merging.methods import merge_state_dict, register_merge_method
    from optimer_lib.merging.pool import Pool, open_pool
    from optimer_lib.merging.resident import ResidentMerger
    from optimer_lib.merging.streamed import merge_streaming
    from optimer_lib.scoring.evaluate import evaluate_suite
    from optimer_lib.scoring.objectives import parse_objective
    from optimer_lib.search.pareto import pareto_front, run_pareto_search
    from optimer_lib.search.rerank import rerank
    from optimer_lib.search.study import SearchConfig, SearchResult, run_search, trial_table
    from optimer_lib.search.warmstart import warm_start_search
    from optimer_lib.training.train import TrainConfig, train_cpt
