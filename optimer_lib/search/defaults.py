"""Search defaults, in one place: named profiles that the CLI, the library, the workbench and the widgets read.

    from optimer_lib.search.defaults import BATCH, INTERACTIVE
    SearchConfig()                 # BATCH: the paper's protocol (100 trials, 100 docs/set, top-3 re-scored at 300)
    INTERACTIVE.trials             # 20: the workbench's and the notebook widgets' smaller, deliberate defaults

``BATCH`` is for unattended searches (``optimer search``, :class:`optimer_lib.search.study.SearchConfig`);
``INTERACTIVE`` for searches a person watches live in the workbench or a notebook, where a result within a minute
or two matters more than the last digit (fewer trials, smaller dev subsets, no re-scoring).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SearchProfile:
    """Default search settings; every field has the meaning of the SearchConfig field of the same name."""

    trials: int
    sampler: str
    seed: int
    bounds: str            # "lo:hi" for every vector (the CLI's --bounds syntax)
    search_limit: int | None
    rescore_limit: int | None
    top_k: int
    seq_len: int
    batch_size: int
    record_metrics: str
    pruner: str
    instruction_weight: float = 0.0


BATCH = SearchProfile(trials=100, sampler="tpe", seed=0, bounds="0:1", search_limit=100, rescore_limit=300, top_k=3,
                      seq_len=128, batch_size=16, record_metrics="all", pruner="none")
INTERACTIVE = SearchProfile(trials=20, sampler="tpe", seed=0, bounds="0:1", search_limit=32, rescore_limit=100,
                            top_k=0, seq_len=128, batch_size=16, record_metrics="all", pruner="none")
PROFILES = {"batch": BATCH, "interactive": INTERACTIVE}
