"""The Search-tab half of a :class:`~workbench.session.Session`: background searches, re-ranking a stored study,
Pareto searches and fronts. Mixed into ``Session``; use it through a session:

    run = s.start_search(SearchSpec(trials=20))                        # background thread, watched by the tab
    res = s.rerank("loss:ja=1,acc:math=2")                             # the watched study, from storage
    s.apply(s.reranked_best())                                         # its best stored trial into Tune
    s.start_pareto(SearchSpec(objectives=("ppl:ja", "acc:math"), trials=20))
    front = s.show_front(storage, study)                               # the Pareto front the UI shows
    s.apply(s.front_weights(front[0].number))                          # a picked front point into Tune

These methods read and write only the session's study handles (``search``, ``watched``, ``pareto``,
``front_shown``, ``reranked``); they evaluate nothing in the caller's thread.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import optuna

from optimer_lib.search.pareto import ParetoPoint, pareto_front
from optimer_lib.search.rerank import RerankResult, rerank, resolve_objective
from workbench.searching import ParetoRun, SearchRun, SearchSpec, checked_spec, load_study
from workbench.workspace import SharedPool, WorkbenchError, Workspace


class StudyMethods:
    """Search, re-rank and Pareto methods of :class:`~workbench.session.Session` (its fields, declared here)."""

    workspace: Workspace
    search: SearchRun | None
    watched: tuple[str, str] | None
    pareto: ParetoRun | None
    front_shown: tuple[str, str, tuple[str, ...] | None] | None
    reranked: RerankResult | None
    shared: SharedPool
    names: list[str]

    # -- search --------------------------------------------------------------------------------
    def start_search(self, spec: SearchSpec) -> SearchRun:
        """Start a search in the background (one per session); it is also what the Search tab watches."""
        if self.search is not None and self.search.running:
            raise WorkbenchError(f"search {self.search.study_name!r} is still running: stop it first")
        run = SearchRun(self.shared, spec, self.workspace.storage_url, self.workspace.workdir)
        self.search = run.start()
        self.watched = (run.storage, run.study_name)
        return run

    def estimate_search(self, spec: SearchSpec) -> str:
        """One line: what a search with ``spec`` would cost here (per trial, in total, within its time budget)."""
        run = SearchRun(self.shared, spec, self.workspace.storage_url, self.workspace.workdir)
        return run.estimate()

    def stop_search(self) -> None:
        if self.search is not None:
            self.search.stop()

    # -- objectives on demand ------------------------------------------------------------------
    def _study(self, storage: str | None, study: str | None) -> tuple[str, optuna.Study]:
        """``(storage, study)``: the named study (workbench storage by default), else the watched one."""
        if not study:
            if self.watched is None:
                raise WorkbenchError("no study chosen: run a search or pick a study in the storage first")
            storage, study = self.watched
        storage = storage or self.workspace.storage_url
        found = load_study(storage, study)
        if found is None:
            raise WorkbenchError(f"no study {study!r} in {storage}")
        return storage, found

    def rerank(self, spec: str, storage: str | None = None, study: str | None = None,
               fidelity: str | int | None = None) -> RerankResult:
        """Rank every stored trial of a study (default: the watched one) for ``spec``; evaluates nothing."""
        _, st = self._study(storage, study)
        if not spec.strip():
            raise WorkbenchError("type an objective to re-rank for, e.g. loss:ja=1,acc:math=2")
        self.reranked = rerank(st, checked_spec(spec, self.workspace.workdir), fidelity=fidelity)
        return self.reranked

    def reranked_best(self) -> dict[str, float]:
        """Weights of the best trial of the last :meth:`rerank`, checked against the pool."""
        if self.reranked is None:
            raise WorkbenchError("nothing re-ranked yet: type an objective and press Re-rank")
        best = self.reranked.best
        return self._pool_weights(best.weights, f"trial {best.number} of study {self.reranked.study.study_name!r}")

    def _pool_weights(self, params: Mapping[str, float], what: str) -> dict[str, float]:
        if set(params) != set(self.names):
            raise WorkbenchError(f"{what} has weights for {sorted(params)} but the pool has {self.names}: "
                                 "it was searched on another pool")
        return {n: float(params[n]) for n in self.names}

    def start_pareto(self, spec: SearchSpec) -> ParetoRun:
        """Start a multi-objective search in the background (one per session); its front is then shown."""
        if self.pareto is not None and self.pareto.running:
            raise WorkbenchError(f"Pareto search {self.pareto.study_name!r} is still running: stop it first")
        run = ParetoRun(self.shared, spec, self.workspace.storage_url, self.workspace.workdir)
        self.pareto = run.start()
        self.front_shown = (run.storage, run.study_name, None)
        return run

    def stop_pareto(self) -> None:
        if self.pareto is not None:
            self.pareto.stop()

    def show_front(self, storage: str | None = None, study: str | None = None,
                   objectives: Sequence[str] | None = None) -> list[ParetoPoint]:
        """The Pareto front of a study, made the one points are picked from.

        Without ``objectives`` (None or only blanks) a multi-objective study's own values are used; 2–3 specs
        recompute them from the stored metrics of any study (no evaluation).
        """
        storage, st = self._study(storage, study)
        specs = [s.strip() for s in objectives or () if s.strip()] or None
        if specs is None and len(st.directions) < 2:
            raise WorkbenchError(f"study {st.study_name!r} has one objective: give 2 or 3 objectives for its front")
        if specs is not None:
            if not 2 <= len(specs) <= 3:
                raise WorkbenchError(f"give 2 or 3 objectives for a Pareto front (got {len(specs)})")
            specs = [resolve_objective(st, checked_spec(s, self.workspace.workdir)).spec for s in specs]
        front = pareto_front(st, specs)
        self.front_shown = (storage, st.study_name, None if specs is None else tuple(specs))
        return front

    def front_weights(self, number: int) -> dict[str, float]:
        """Weights of trial ``number`` of the study whose front is shown (checked against the pool)."""
        if self.front_shown is None:
            raise WorkbenchError("no Pareto front shown yet: run a Pareto search or compute a study's front")
        storage, name, _ = self.front_shown
        _, st = self._study(storage, name)
        trial = next((t for t in st.get_trials(deepcopy=False) if t.number == int(number)), None)
        if trial is None or trial.state != optuna.trial.TrialState.COMPLETE:
            raise WorkbenchError(f"study {name!r} has no complete trial {number}")
        return self._pool_weights(trial.params, f"trial {number} of study {name!r}")
