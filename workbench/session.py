"""The UI-agnostic controller behind one browser tab (or one notebook): Tune, Search, Chat, Export.

    from workbench.workspace import Workspace
    from workbench.session import Session
    s = Session(Workspace("runs/demo"))
    r = s.apply({"ja": 0.3, "zh": 0.1, "math": 0.2, "code": 0.1})   # merge (engine slot) + score
    r.metrics, r.merge_s, r.score_s                                    # {"loss:ja": ...}, seconds
    s.apply(s.tune.weights, method="ties", params={"density": 0.2})    # any registered merge method
    with s.merged() as model: ...                                      # the Tune merge, lent for the block
    run = s.start_search(SearchSpec(trials=20))                        # background thread
    for panes in s.chat("Hello", ["base", "Tune merge"]): ...          # streaming, all panes at once
    s.export("my-merge")                                               # HF dir + card + YAML, and a zip
    res = s.rerank("loss:ja=1,acc:math=2")                             # the watched study, from storage
    s.apply(s.reranked_best())                                         # its best stored trial into Tune
    s.start_pareto(SearchSpec(objectives=("ppl:ja", "acc:math"), trials=20))   # background, like a search
    front = s.show_front(storage, study)                               # the Pareto front the UI shows
    s.apply(s.front_weights(front[0].number))                          # a picked front point into Tune

A session holds weights and results, never a model: every merged model comes from the workspace pool's
:class:`~optimer_lib.engine.MergeEngine`, lent for one job (a score, a chat reply, a search trial) at a
time. So memory does not grow with sessions, one session's sliders never change what another chats with
(a lease is exclusive), and a slider move waits at most one trial of a running search.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from optimer_lib.engine import BACKGROUND, INTERACTIVE, MergeState
from optimer_lib.errors import ConfigError
from optimer_lib.merging import groups
from optimer_lib.merging.export import export_merged
from optimer_lib.scoring.objectives import LMEVAL
from optimer_lib.scoring.tune_config import TuneScoring
from optimer_lib.scoring.uncertainty import Interval
from optimer_lib.search.rerank import RerankResult
from workbench.searching import ParetoRun, SearchRun, best_params, checked_spec, load_study
from workbench.session_chat import BASE, BASE_IT, BEST, TUNE, ChatMethods
from workbench.session_studies import StudyMethods
from workbench.tuning import TuneUpdate, cached_update, last_update, score_stream, tuning_key
from workbench.workspace import SharedPool, WorkbenchError, Workspace

# the pane names live with the chat methods; importers keep reading them here
__all__ = ["BASE", "BASE_IT", "BEST", "TUNE", "ExportResult", "Session", "TuneResult", "TuneView"]



@dataclass
class TuneResult:
    """Scores of one merge: metrics at ``limit`` documents per dev set and where the time went.

    ``cached`` results were computed earlier for the same merge (by any session) and cost nothing now;
    ``intervals`` are 95% bootstrap intervals over the scored documents (``"objective"`` included).
    """

    weights: dict[str, float]
    instruction_weight: float
    metrics: dict[str, float]
    objective: float | None
    merge_s: float
    score_s: float
    limit: int
    method: str = "optimer"
    params: dict[str, object] = field(default_factory=dict)
    cached: bool = False
    waited_s: float = 0.0
    intervals: dict[str, Interval] = field(default_factory=dict)
    lmeval_s: dict[str, float] = field(default_factory=dict)  # seconds per lm-eval metric (not when cached)

    @classmethod
    def of(cls, u: TuneUpdate, limit: int | None) -> TuneResult:
        st = u.state
        return cls(st.weight_map, st.instruction_weight, dict(u.metrics), u.objective, u.merge_s, u.score_s,
                   limit, st.method, st.param_map, u.cached, u.waited_s, dict(u.intervals), dict(u.lmeval_s))


@dataclass(frozen=True)
class TuneView:
    """What the Tune tab currently merges (a read-only view of the session's state)."""

    weights: dict[str, float]
    instruction_weight: float
    method: str
    params: dict[str, object]


@dataclass
class ExportResult:
    path: Path
    zip_path: Path
    card: str


@dataclass
class Session(ChatMethods, StudyMethods):
    """Per-browser state over a :class:`Workspace`: weights, results and runs; models come from the engine.

    ``tune_limit`` documents (``qa_limit`` QA pairs) per dev set are scored on each Tune change, unless
    :meth:`set_scoring` chose another scoring set (which sets, documents, sequence length, batch size).
    """

    workspace: Workspace
    tune_limit: int = 8
    qa_limit: int = 8
    seq_len: int = 128
    search: SearchRun | None = None
    watched: tuple[str, str] | None = None  # (storage URL, study name) shown on the Search tab
    last: TuneResult | None = None
    pareto: ParetoRun | None = None  # this session's multi-objective search
    front_shown: tuple[str, str, tuple[str, ...] | None] | None = None  # (storage, study, specs) of the front
    reranked: RerankResult | None = None
    ui: dict = field(default_factory=dict)  # free slot for a front end's per-session caches
    # Weak: between requests only the workspace holds its pool, so a pool replaced from another session (or tab)
    # is freed at once, engine and slots included, instead of living on in every idle session until it reloads.
    _pool_ref: weakref.ref[SharedPool] | None = field(default=None, repr=False)
    _engine_ref: weakref.ref[Any] | None = field(default=None, repr=False)
    _stale: bool = field(default=False, repr=False)  # moved to another engine's pool: the page must reload
    _state: MergeState | None = field(default=None, repr=False)
    _scoring: TuneScoring | None = field(default=None, repr=False)
    _moves: int = field(default=0, repr=False)  # bumped by every Tune move: an older scoring stops

    def __deepcopy__(self, memo: dict) -> Session:
        return self  # a handle on live runs: Gradio's State deep-copies initial values, never copy these

    # -- pool ----------------------------------------------------------------------------------
    @property
    def shared(self) -> SharedPool:
        """The session's pool: the workspace's on first use. When another session replaced it (Pool tab), the
        session moves to the new pool: silently when only the dev suite changed (same engine, weights kept);
        when the vectors changed, every call raises WorkbenchError asking for a reload (this page's sliders show
        the old vectors) until the page reloads or picks a pool (:meth:`use_pool`)."""
        held = self._held()
        if held is None:  # first use, or replaced and freed
            replaced, engine = self._pool_ref is not None, self._engine()
            held = self.use_pool()
            self._stale = replaced and held.engine is not engine
        if self._stale:
            raise WorkbenchError("the pool was changed in another session or tab: reload this page (in a notebook: "
                                 "session.use_pool()) to see its vectors (your Tune weights were for the old pool)")
        return held

    @property
    def has_pool(self) -> bool:
        return self._held() is not None or self.workspace.has_pool()

    def _held(self) -> SharedPool | None:
        return self._pool_ref() if self._pool_ref is not None else None

    def _engine(self) -> Any:
        return self._engine_ref() if self._engine_ref is not None else None

    def use_pool(self, shared: SharedPool | None = None) -> SharedPool:
        """Switch to ``shared`` (default: the workspace's current pool); resets the Tune weights unless only the
        dev suite changed (same engine: :meth:`Workspace.add_eval` / :meth:`Workspace.remove_eval`). Dev sets the
        new suite lacks leave the Tune scoring set (none left: every set; the rest of the scoring set is kept)."""
        shared = shared or self.workspace.pool()
        self._stale = False
        if shared is not self._held():
            if shared.engine is not self._engine():
                self._state = None
            self._pool_ref, self._engine_ref, self.last = weakref.ref(shared), weakref.ref(shared.engine), None
            sc, have = self._scoring, set(shared.suite.names())
            if sc is not None and sc.sets and not set(sc.sets) <= have:
                self._scoring = replace(sc, sets=tuple(n for n in sc.sets if n in have) or None)
        return shared

    @property
    def names(self) -> list[str]:
        return self.shared.names

    def group_layout(self, granularity: str) -> list[str]:
        """The pool model's layer groups at ``granularity`` ("vector": [], "layer-groups:G": embed, G block slices,
        head; :mod:`optimer_lib.merging.groups`); WorkbenchError when the model has fewer blocks than G."""
        try:
            return groups.layout(self.shared.engine, granularity)
        except ConfigError as exc:
            raise WorkbenchError(str(exc)) from exc

    @property
    def layers(self) -> int:
        """Transformer blocks of the pool's model."""
        return groups.n_layers(groups.state_names(self.shared.engine))

    @property
    def state(self) -> MergeState:
        """The Tune merge as a :class:`MergeState` (all zeros, no instruction, linear until first applied)."""
        if self._state is None:
            self._state = self.shared.engine.state({})
        return self._state

    @property
    def tune(self) -> TuneView:
        """The weights, instruction weight and merge method the Tune tab holds (exported by :meth:`export`)."""
        st = self.state
        return TuneView(st.weight_map, st.instruction_weight, st.method, st.param_map)

    @contextmanager
    def merged(self, weights: Mapping[str, float] | None = None, instruction_weight: float | None = None, *,
               exact: bool = False) -> Iterator[Any]:
        """A model merged like Tune (or with ``weights``), lent by the engine for the block only."""
        state = self.state if weights is None else self._state_for(weights, instruction_weight)
        with self.shared.engine.lease(state, priority=INTERACTIVE, exact=exact) as lease:
            yield lease.model

    # -- tune ----------------------------------------------------------------------------------
    @property
    def scoring(self) -> TuneScoring:
        """What a Tune move scores (default: ``tune_limit`` documents, ``qa_limit`` QA items of every dev set)."""
        if self._scoring is not None:
            return self._scoring
        return TuneScoring(docs=self.tune_limit, qa_items=self.qa_limit, seq_len=self.seq_len)

    def set_scoring(self, sets: Sequence[str] | None = None, docs: int | None = 8, qa_items: int | None = 8,
                    seq_len: int = 128, batch_size: int = 16, lmeval: Sequence[str] = ()) -> TuneScoring:
        """Choose the Tune scoring set (checked against the pool's dev suite); returns it.

        ``lmeval``: lm-eval terms ``SOURCE[:METRIC]`` scored after the dev sets; a task YAML (or folder) must lie
        in the workdir (it can run code), a bare name is a task shipped with lm-eval (its data in the local cache).
        """
        self._scoring = self.scoring_for(sets, docs, qa_items, seq_len, batch_size, lmeval)
        return self._scoring

    def scoring_for(self, sets: Sequence[str] | None = None, docs: int | None = 8, qa_items: int | None = 8,
                    seq_len: int = 128, batch_size: int = 16, lmeval: Sequence[str] = ()) -> TuneScoring:
        """The scoring set :meth:`set_scoring` would choose, checked but not chosen (for a cost preview)."""
        try:
            terms = tuple(checked_spec(f"{LMEVAL}:{t.strip().removeprefix(LMEVAL + ':')}", self.workspace.workdir)
                          for t in lmeval if t.strip())
            sc = TuneScoring(tuple(sets) if sets else None, docs, qa_items, seq_len, batch_size, lmeval=terms)
            sc.check(self.shared.suite)
        except ConfigError as exc:
            raise WorkbenchError(str(exc)) from exc
        return sc

    def scoring_cost(self, scoring: TuneScoring | None = None) -> str:
        """One line: tokens and forward FLOPs of one scoring (``scoring`` or the Tune one) on this pool."""
        sh = self.shared
        sc = scoring or self.scoring

        def line() -> str:
            n = sum(p.numel() for p in sh.model.parameters())
            tasks = [t.key.split(":")[1] for t in sc.lmeval_terms()]
            more = (f" + lm-eval {', '.join(tasks)} on {sc.docs or 'all'} documents each (timed when scored)"
                    if tasks else "")
            return str(sc.cost(sh.tokenizer, sh.suite, n, model=sh.model)) + more

        return sh.per_suite("cost", sc, line)  # tokenising the set is most of a page load's work

    def _state_for(self, weights: Mapping[str, float], instruction_weight: float | None = None,
                   method: str | None = None, params: Mapping[str, object] | None = None) -> MergeState:
        cur = self.state
        iw = cur.instruction_weight if instruction_weight is None else float(instruction_weight)
        method = method or cur.method
        if params is None:  # a new method starts from its own defaults; the same method keeps its options
            params = cur.param_map if method == cur.method else {}
        try:
            return self.shared.engine.state(weights, iw, method=method, params=params)  # missing names: 0
        except ConfigError as exc:
            raise WorkbenchError(str(exc)) from exc

    @property
    def moves(self) -> int:
        """Tune moves made so far (a chart drawn for an older count is stale: a newer move draws its own)."""
        return self._moves

    def set_tune(self, weights: Mapping[str, float], instruction_weight: float | None = None, *,
                 method: str | None = None, params: Mapping[str, object] | None = None) -> MergeState:
        """Make this the Tune merge without scoring it (a restored page must not wait for a score); checked."""
        self._state = self._state_for(weights, instruction_weight, method, params)
        self._moves += 1  # a scoring still running for an older merge is no longer wanted
        return self._state

    def score_stream(self, weights: Mapping[str, float], instruction_weight: float | None = None, *,
                     method: str | None = None, params: Mapping[str, object] | None = None,
                     confirm: bool = False) -> Iterator[TuneUpdate]:
        """Make ``weights`` the Tune merge; yield its estimate, partial and final scores (:mod:`workbench.tuning`).

        A newer move (of this session) cancels this one's scoring between batches. ``confirm`` scores every
        document of the chosen dev sets instead of the Tune subset.
        """
        state = self._state_for(weights, instruction_weight, method, params)
        self._state = state
        self._moves += 1  # now, not at the first next(): the move counts from the moment it is asked
        move = self._moves
        scoring = self.scoring.full() if confirm else self.scoring
        return self._streamed(score_stream(self.shared, state, scoring, should_stop=lambda: self._moves != move),
                              scoring)

    def _streamed(self, updates: Iterator[TuneUpdate], scoring: TuneScoring) -> Iterator[TuneUpdate]:
        for update in updates:
            if update.phase == "final":
                self.last = TuneResult.of(update, scoring.docs)
            yield update

    def apply(self, weights: Mapping[str, float], instruction_weight: float | None = None, *,
              method: str | None = None, params: Mapping[str, object] | None = None,
              confirm: bool = False) -> TuneResult:
        """Make ``weights`` (missing names get 0) the Tune merge and score it (the last of :meth:`score_stream`).

        ``method``/``params`` switch the merge method (any of ``optimer_lib.merging.methods.MERGE_METHODS``);
        omitted, the current ones stay. A merge scored before (by any session) is answered from the cache.
        Raises WorkbenchError if a newer move of this session cancelled it.
        """
        last = last_update(self.score_stream(weights, instruction_weight, method=method, params=params,
                                             confirm=confirm))
        if last is None or last.phase != "final":
            raise WorkbenchError("this Tune move was overtaken by a newer one before its score was complete")
        return self.last

    def cached_result(self) -> TuneResult | None:
        """The Tune merge's score if any session computed it already (costs nothing), else None."""
        hit = cached_update(self.shared, self.state, self.scoring)
        return None if hit is None else TuneResult.of(hit, self.scoring.docs)

    def prefetch(self) -> None:
        """Score the Tune merge in the background (after users' requests, before search trials)."""
        self._in_background(self.state, self.scoring, "prefetch")

    def warm(self) -> None:
        """Start scoring, in the background, what a first page of this pool shows: the Tune merge and the base and
        average reference bars (cached by the pool's engine, so every later session finds them)."""
        iw = self.tune.instruction_weight
        self.prefetch()
        for kind in ("base", "average"):
            self.reference(kind, iw, wait=False)

    def preset(self, name: str) -> dict[str, float]:
        """Weights of a preset: ``zeros``, ``average`` (1/K each) or ``best`` (of the last search)."""
        if name == "zeros":
            return dict.fromkeys(self.names, 0.0)
        if name == "average":
            return dict.fromkeys(self.names, 1.0 / len(self.names))
        if name == "best":
            best = self.best_weights()
            if best is None and self.watched is not None and (st := load_study(*self.watched)) is not None \
                    and len(st.directions) > 1:
                raise WorkbenchError(f"study {st.study_name!r} is multi-objective and has no single best: pick a "
                                     "point of its Pareto front (Search tab) instead")
            if best is None:
                raise WorkbenchError("no search result yet: run a search (Search tab, or SearchRunner.start() in a "
                                     "notebook) or watch a study first")
            return best
        raise WorkbenchError(f"unknown preset {name!r}: choose zeros, average or best")

    def best_weights(self) -> dict[str, float] | None:
        """Best α of the watched study (this session's last search unless another study was chosen).

        When the watched study is this session's own finished search, its re-scored best is used.
        """
        run = self.search
        if self.watched is None:
            return None
        if (run is not None and run.result is not None and (run.storage, run.study_name) == self.watched
                and run.ran_on(self.shared)):
            return dict(run.result.best_weights)
        return best_params(load_study(*self.watched), self.names)

    def reference(self, kind: str, instruction_weight: float = 0.0, wait: bool = True) -> dict[str, float] | None:
        """Metrics of ``base`` / ``average`` / ``best`` on the Tune scoring set (cached by the pool's engine).

        References use the linear merge whatever the Tune method. ``wait=False`` never scores in the caller's
        thread: it returns the cached metrics, or None after starting their computation in the background (a UI
        shows them on its next refresh).
        """
        state = self._reference_state(kind, instruction_weight)
        if state is None:
            return None
        scoring = self.scoring
        hit = self.shared.engine.cached(state, tuning_key(self.shared, scoring))
        if hit is not None:
            return dict(hit[0])
        if not wait:
            self._in_background(state, scoring, "reference")
            return None
        return self._compute_reference(state, scoring, INTERACTIVE)  # the caller waits for it

    def references_pending(self, instruction_weight: float = 0.0) -> bool:
        """Whether a reference of :meth:`reference` that exists (``best`` needs a search) is not scored yet on the
        Tune scoring set; a UI that drew a chart without it redraws when this turns False."""
        key = tuning_key(self.shared, self.scoring)
        states = (self._reference_state(k, instruction_weight) for k in ("base", "average", "best"))
        return any(s is not None and self.shared.engine.cached(s, key) is None for s in states)

    def _reference_state(self, kind: str, instruction_weight: float) -> MergeState | None:
        """The linear merge a reference bar scores; None when ``kind`` has no weights (``best`` before a search)."""
        try:
            ws = self.preset({"base": "zeros"}.get(kind, kind))
        except WorkbenchError:
            return None
        return self.shared.engine.state(ws, float(instruction_weight))

    def _in_background(self, state: MergeState, scoring: TuneScoring, name: str) -> None:
        """Score ``state`` in a background thread unless any session of the pool already does."""
        shared, key = self.shared, (state, scoring)
        if not shared.claim(key):
            return

        def run() -> None:
            try:
                self._compute_reference(state, scoring, shared=shared)  # the pool that holds the claim
            finally:
                shared.release(key)

        try:
            threading.Thread(target=run, daemon=True, name=name).start()  # it waits: leased_map's threads score
        except BaseException:  # no thread, no score: the next request may try again
            shared.release(key)
            raise

    def _compute_reference(self, state: MergeState, scoring: TuneScoring, priority: int = BACKGROUND, *,
                           shared: SharedPool | None = None) -> dict[str, float] | None:
        last = last_update(score_stream(shared or self.shared, state, scoring, priority=priority))
        return dict(last.metrics) if last is not None and last.phase == "final" else None

    # -- export --------------------------------------------------------------------------------
    def export(self, name: str, overwrite: bool = False) -> ExportResult:
        """Write the current Tune merge to ``<workdir>/exports/<name>`` and zip it into a temp folder."""
        name = name.strip()
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise WorkbenchError(f"bad export name {name!r}: use a plain folder name such as my-merge")
        sh, st = self.shared, self.state
        out = self.workspace.exports_dir / name
        if out.exists() and not overwrite:  # said here in the tab's words (the library's names the CLI's --force)
            raise WorkbenchError(f"exports/{name} already exists: choose another name, or tick \"replace an existing "
                                 "export\" (overwrite=True)")
        scores = {f"dev {k} (first {self.tune_limit})": v for k, v in (self.last.metrics if self.last else {}).items()}
        # exact: base + Σ α τ merged afresh, without the rounding drift of incremental slider updates
        with self.merged(exact=True) as model:
            path = export_merged(model, sh.tokenizer, out, base_path=str(sh.base_dir), vectors=sh.vectors,
                                 weights=st.weight_map, instruction=sh.instruction,
                                 instruction_weight=st.instruction_weight if sh.instruction else None,
                                 scores=scores, overwrite=overwrite, method=st.method,
                                 method_params=st.param_map)
        tmp = Path(tempfile.mkdtemp(prefix="optimer-export-"))
        zip_path = Path(shutil.make_archive(str(tmp / name), "zip", root_dir=path.parent, base_dir=path.name))
        return ExportResult(path, zip_path, (path / "README.md").read_text())

    def close(self) -> None:
        """Stop this session's searches (Gradio calls this when the tab goes away); it holds no model."""
        self.stop_search()
        self.stop_pareto()
