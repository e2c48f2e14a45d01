"""One merge engine per workspace: the base once, vectors memory-mapped, a few merged "slots", shared by all.

    from optimer_lib.engine import MergeEngine, MergeState, INTERACTIVE, SEARCH
    engine = MergeEngine.open("runs/demo/base", ["vectors/ja.safetensors", "vectors/code.safetensors"])
    with engine.lease({"ja": 0.3, "code": 0.1}) as lease:      # a slot merged to these weights, held
        out = lease.model.generate(...)                       # nobody re-merges it until the block ends
    engine.run({"ja": 0.3, "code": 0.1}, score_fn, key="dev8")  # a job on the merged model, result cached
    merger = engine.merger(priority=SEARCH)                   # a Merger for run_search: one lease per trial
    from optimer_lib.engine.batching import Sampling, batcher  # chat replies to one merge: one batched generate
    reply = batcher(engine).submit(engine.state({}, 1.0), prompt_ids, Sampling(48, temperature=0.8, seed=1))

Front ends (browser sessions, notebook widgets, searches, chat) hold weights and results, never models, so
memory is base + slots x model whatever the number of users (see :mod:`optimer_lib.engine.engine`).
"""

from optimer_lib.engine.engine import BACKGROUND, INTERACTIVE, SEARCH, Lease, MergeEngine
from optimer_lib.engine.merger import EngineMerger
from optimer_lib.engine.state import MergeState

__all__ = ["BACKGROUND", "INTERACTIVE", "SEARCH", "EngineMerger", "Lease", "MergeEngine", "MergeState"]
