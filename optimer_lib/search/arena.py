"""Preference search (the "arena"): a person compares two merges side by side and votes; a preferential
Gaussian-process sampler (optuna-dashboard's ``PreferentialGPSampler``, Takeno et al. 2023) proposes the next one.

    from optimer_lib.search.arena import Arena
    arena = Arena.open(["ja", "zh", "math", "code"], storage="sqlite:///runs/arena.db", study_name="arena", seed=0)
    pair = arena.pair()                       # Pair(left=Candidate(number, weights), right=...), anonymous order
    pair = arena.vote(pair, "left")           # "left" | "right" | "tie"; returns the next pair
    arena.best()                              # Candidate: the current best estimate (None before any vote)
    arena.votes                               # every vote, ties included, from the storage (resumable)

Protocol (champion and challenger): the merge that won the last vote stays and a new challenger is asked from
the sampler; the loser is dominated for good. So the best estimate is the undominated merge with the most
wins -- optuna-dashboard's ``best_trials``. A tie is not a preference in optuna-dashboard (a preference is
``better > worse``): it is recorded as a study user attr (``arena:vote:*`` with ``choice="tie"``), the
challenger is retired (completed with no preference, so the sampler learns nothing from it) and a new one is
asked. Several people may vote on one study (any Optuna storage URL): each vote names the pair its voter saw,
so a vote on a pair someone else already decided is still recorded, and everyone continues from the
storage's current pair. Needs the ``arena`` extra: ``pip install 'optimer-workbench[arena]'``.
"""

from __future__ import annotations

import random
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from optimer_lib.errors import ConfigError, MissingDependencyError
from optimer_lib.search.storage import open_storage

CHOICES = ("left", "right", "tie")
SAMPLERS = ("gp", "random")
VOTE_PREFIX = "arena:vote:"
_LOCK = threading.Lock()  # asking a challenger is check-then-act: one at a time per process


@dataclass(frozen=True)
class Candidate:
    """One merge of the arena: its trial number in the study and its weights (one per vector)."""

    number: int
    weights: dict[str, float]


@dataclass(frozen=True)
class Pair:
    """The two merges a voter compares; which side holds the incumbent is random (the voter must not know)."""

    left: Candidate
    right: Candidate


def _preferential() -> Any:
    try:
        import botorch  # noqa: F401  (the GP sampler imports it lazily: fail here with the install hint)
        from optuna_dashboard import preferential
    except ImportError as exc:
        raise MissingDependencyError("the arena needs optuna-dashboard, botorch and gpytorch: "
                                     "pip install 'optimer-workbench[arena]'") from exc
    return preferential


def make_sampler(kind: str, seed: int) -> optuna.samplers.BaseSampler:
    """``gp``: optuna-dashboard's PreferentialGPSampler; ``random``: uniform challengers (the baseline)."""
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "gp":
        from optuna_dashboard.preferential.samplers.gp import PreferentialGPSampler

        return PreferentialGPSampler(seed=seed)
    raise ConfigError(f"unknown arena sampler {kind!r}; choose one of {', '.join(SAMPLERS)}")


class Arena:
    """A preferential study over merge weights; open one with :meth:`open` (creates or resumes)."""

    def __init__(self, study: Any, raw: optuna.Study, names: list[str], bounds: dict[str, tuple[float, float]],
                 seed: int, startup: int = 0) -> None:
        self.study, self.raw, self.names, self.bounds, self.seed = study, raw, names, bounds, seed
        self.startup = startup

    @classmethod
    def open(cls, names: Sequence[str], *, storage: str | None = None, study_name: str = "arena",
             bounds: Mapping[str, tuple[float, float]] | tuple[float, float] = (0.0, 1.0), sampler: str = "gp",
             seed: int = 0, startup: int | None = None) -> Arena:
        """Create the study ``study_name`` in ``storage`` (a URL, or None: in memory) or resume it.

        ``bounds``: one ``(lo, hi)`` for every vector or one per name (default [0, 1], as the search's).
        ``startup``: the first merges drawn uniformly (seeded by ``seed`` and the trial number) before the GP
        proposes (default 2 per vector; ``sampler="random"`` draws every merge so): the GP
        alone refines around its first pair and never explores (bench/arena.py: its merges stayed within
        0.01 of each other, so votes carried no information). A stored study must be an arena over the same
        vector names (else ConfigError naming both).
        """
        preferential = _preferential()
        names = list(names)
        if not names:
            raise ConfigError("the arena needs at least one vector in the pool")
        b = {n: tuple(bounds) for n in names} if isinstance(bounds, tuple) else dict(bounds)
        box = {n: (float(b.get(n, (0.0, 1.0))[0]), float(b.get(n, (0.0, 1.0))[1])) for n in names}
        bad = [n for n, (lo, hi) in box.items() if not lo < hi]
        if bad:
            raise ConfigError(f"arena bounds need lo < hi for {', '.join(bad)}")
        st = open_storage(storage) or optuna.storages.InMemoryStorage()
        smp = make_sampler(sampler, seed)
        try:
            study = preferential.create_study(n_generate=2, storage=st, sampler=smp, study_name=study_name,
                                              load_if_exists=True)
        except ValueError as exc:  # load_study: "The study is not a PreferentialStudy."
            raise ConfigError(f"study {study_name!r} in {storage} is not an arena study: choose another "
                              "study name") from exc
        raw = optuna.load_study(study_name=study_name, storage=st, sampler=smp)
        stored = study.user_attrs.get("arena:names")
        if stored is None:
            study.set_user_attr("arena:names", names)
            study.set_user_attr("arena:bounds", {n: list(v) for n, v in box.items()})
        elif list(stored) != names:
            raise ConfigError(f"arena study {study_name!r} votes over vectors {list(stored)} but this pool has "
                              f"{names}: choose another study name")
        else:
            box = {n: (float(v[0]), float(v[1])) for n, v in study.user_attrs["arena:bounds"].items()}
        startup = 2 * len(names) if startup is None else int(startup)
        # random challengers are all "startup" draws: keyed by (seed, trial number), so two voters' processes
        # never draw the same merge twice (two RandomSamplers with one seed would)
        return cls(study, raw, names, box, seed, startup if sampler == "gp" else sys.maxsize)

    # -- reading the storage ---------------------------------------------------------------------
    def _attrs(self) -> dict[str, Any]:
        return self.raw.user_attrs

    @property
    def votes(self) -> list[dict[str, Any]]:
        """Every vote in order: ``{"left", "right", "choice", "voter", "time"}`` (trial numbers), ties included."""
        return sorted((v for k, v in self._attrs().items() if k.startswith(VOTE_PREFIX)), key=lambda v: v["time"])

    def _candidate(self, t: FrozenTrial) -> Candidate:
        return Candidate(t.number, {n: float(t.params[n]) for n in self.names})

    def _standing(self) -> tuple[list[FrozenTrial], dict[int, int]]:
        """Active trials (not beaten, not retired), oldest first, and wins per trial number."""
        beaten, retired, wins = set(), set(), {}
        for v in self.votes:
            if v["choice"] == "tie":
                retired.add(v["retired"])
                continue
            better, worse = (v["left"], v["right"]) if v["choice"] == "left" else (v["right"], v["left"])
            beaten.add(worse)
            wins[better] = wins.get(better, 0) + 1
        trials = self.raw.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE))
        # another voter's ask creates its trial before it sets the params: skip such a trial until it has them
        return [t for t in trials if t.number not in beaten and t.number not in retired
                and all(n in t.params for n in self.names)], wins

    def best(self) -> Candidate | None:
        """The current best estimate: the unbeaten merge with the most wins (the newest on a tie); None
        before the first decisive vote."""
        active, wins = self._standing()
        won = [t for t in active if wins.get(t.number, 0) > 0]
        if not won:
            return None
        return self._candidate(max(won, key=lambda t: (wins[t.number], t.number)))

    # -- the pair --------------------------------------------------------------------------------
    def _ask(self) -> FrozenTrial:
        dists = {n: FloatDistribution(lo, hi) for n, (lo, hi) in self.bounds.items()}
        number = len(self.raw.get_trials(deepcopy=False))
        if number < self.startup:  # a uniform draw, reproducible from the seed and the trial number
            rng = random.Random(f"{self.seed}:{number}")
            self.study.enqueue_trial({n: rng.uniform(lo, hi) for n, (lo, hi) in self.bounds.items()})
        with warnings.catch_warnings():  # the first pair has no preference: "falling back to RandomSampler"
            warnings.simplefilter("ignore")
            trial = self.study.ask(dists)
        return self.raw.get_trials(deepcopy=False)[trial.number]

    def pair(self) -> Pair:
        """The pair to vote on now: the incumbent (most wins) and the newest challenger, asked if needed."""
        with _LOCK:
            active, wins = self._standing()
            while len(active) < 2:
                active.append(self._ask())
        champion = max(active, key=lambda t: (wins.get(t.number, 0), -t.number))
        challenger = max((t for t in active if t is not champion), key=lambda t: t.number)
        a, b = self._candidate(champion), self._candidate(challenger)
        flip = random.Random(self.seed * 1_000_003 + a.number * 1009 + b.number).random() < 0.5
        return Pair(b, a) if flip else Pair(a, b)

    def vote(self, pair: Pair, choice: str, voter: str = "") -> Pair:
        """Record ``choice`` ("left", "right" or "tie") on ``pair`` and return the next pair."""
        if choice not in CHOICES:
            raise ConfigError(f"unknown vote {choice!r}; choose one of {', '.join(CHOICES)}")
        numbers = {t.number for t in self.raw.get_trials(deepcopy=False)}
        if pair.left.number not in numbers or pair.right.number not in numbers or pair.left.number == pair.right.number:
            raise ConfigError(f"trials {pair.left.number} and {pair.right.number} are not a pair of this arena: "
                              "ask for the current pair")
        record: dict[str, Any] = {"left": pair.left.number, "right": pair.right.number, "choice": choice,
                                  "voter": str(voter), "time": time.time()}
        if choice == "tie":
            record["retired"] = max(pair.left.number, pair.right.number)  # the challenger
            self._complete(record["retired"])
        else:
            better, worse = (pair.left, pair.right) if choice == "left" else (pair.right, pair.left)
            trials = self.raw.get_trials(deepcopy=False)
            try:
                self.study.report_preference(trials[better.number], trials[worse.number])
            except optuna.exceptions.UpdateFinishedTrialError:
                # another voter completed one of them between optuna-dashboard's read and write; the preference
                # itself is stored first, so only finishing the trials is left
                for number in (better.number, worse.number):
                    self._complete(number)
        self.raw.set_user_attr(VOTE_PREFIX + uuid.uuid4().hex, record)
        return self.pair()

    def _complete(self, number: int) -> None:
        """Finish a retired trial (value 0, like optuna-dashboard's preferences) so it stays out of the pair."""
        trial = self.raw.get_trials(deepcopy=False)[number]
        if trial.state == TrialState.RUNNING:
            try:
                self.raw.tell(number, 0.0)
            except (ValueError, RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
                pass  # another voter finished it meanwhile
