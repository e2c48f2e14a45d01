"""The arena behind the Chat tab's Arena mode and the notebook :class:`workbench.arena_widget.ArenaWidget`.

    from workbench.arena import ArenaRun
    run = ArenaRun.open(session)                         # <workdir>/arena.db, study "arena" (created or resumed)
    for a, b in run.ask(session, "What is 12 + 35?"):    # two anonymous merges answer at once, streamed
        ...
    run.vote("left")                                     # "left" | "right" | "tie": the next pair is drawn
    run.best_weights                                     # the current best estimate (None before a vote)

A thin shell over :class:`optimer_lib.search.arena.Arena`: it keeps what one browser tab (or notebook) is
looking at -- the pair, the two conversations, the last prompt -- in ``session.ui["arena"]``; the votes live
in the study storage, so several people (any session, any process on the same storage) vote on one study
and a reload resumes it. Both merges answer with the same instruction weight and generation settings.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from optimer_lib.search.arena import Arena, Candidate, Pair
from workbench.chatting import GenSettings, Message, stream_many
from workbench.session import Session
from workbench.text import counted

KEY = "arena"  # the Session.ui slot holding this tab's ArenaRun
DEFAULT_STUDY = "arena"


def default_storage(session: Session) -> str:
    """The arena's own SQLite file in the workdir (kept apart from the Search tab's studies)."""
    return f"sqlite:///{session.workspace.workdir / 'arena.db'}"


def fmt_weights(weights: dict[str, float]) -> str:
    return ", ".join(f"{n} {w:.2f}" for n, w in weights.items())


@dataclass
class ArenaRun:
    """One viewer's place in an arena study: the pair shown, the two conversations and the last prompt."""

    arena: Arena
    pair: Pair
    instruction_weight: float
    storage: str
    sampler: str = "gp"
    histories: list[list[Message]] = field(default_factory=lambda: [[], []])
    prompt: str = ""
    revealed: str = ""  # what the last vote's pair was (shown after voting, never before)

    @classmethod
    def open(cls, session: Session, storage: str | None = None, study: str = DEFAULT_STUDY, sampler: str = "gp",
             seed: int = 0, instruction_weight: float | None = None) -> ArenaRun:
        """Open (create or resume) ``study`` over the session's pool and make it the session's arena."""
        storage = (storage or "").strip() or default_storage(session)
        if session.shared.instruction is None:  # nothing to weigh: the slider's value is moot
            instruction_weight = 0.0
        elif instruction_weight is None:
            instruction_weight = 1.0
        arena = Arena.open(session.names, storage=storage, study_name=(study or DEFAULT_STUDY).strip(),
                           sampler=sampler, seed=int(seed))
        run = cls(arena, arena.pair(), float(instruction_weight), storage, sampler)
        session.ui[KEY] = run
        return run

    @staticmethod
    def of(session: Session) -> ArenaRun | None:
        """The session's open arena, if any."""
        return session.ui.get(KEY)

    def ask(self, session: Session, prompt: str, settings: GenSettings | None = None) -> Iterator[list[list[Message]]]:
        """Send ``prompt`` to both merges; yields both conversations as the replies stream in (in parallel)."""
        prompt = (prompt or "").strip()
        if not prompt:
            return
        self.prompt = prompt
        engine = session.shared.engine
        states = [engine.state(c.weights, self.instruction_weight) for c in (self.pair.left, self.pair.right)]
        before = [list(h) for h in self.histories]
        for h in self.histories:
            h += [{"role": "user", "content": prompt}, {"role": "assistant", "content": ""}]
        yield self.histories
        for texts in stream_many(engine, states, before, prompt, settings or GenSettings()):
            for h, text in zip(self.histories, texts, strict=True):
                h[-1] = {"role": "assistant", "content": text}
            yield self.histories

    def vote(self, choice: str, voter: str = "") -> Pair:
        """Record ``choice`` ("left", "right", "tie") on the pair shown; the next pair starts fresh conversations."""
        old = self.pair
        self.pair = self.arena.vote(old, choice, voter=voter)
        self.revealed = f"A was {fmt_weights(old.left.weights)}; B was {fmt_weights(old.right.weights)}"
        self.histories = [[], []]
        return self.pair

    def refresh(self) -> Pair:
        """The storage's current pair (another voter may have moved it); a changed pair starts afresh."""
        pair = self.arena.pair()
        if pair != self.pair:
            self.pair, self.histories = pair, [[], []]
        return pair

    @property
    def best(self) -> Candidate | None:
        return self.arena.best()

    @property
    def best_weights(self) -> dict[str, float] | None:
        best = self.best
        return None if best is None else dict(best.weights)

    def summary(self) -> str:
        """One Markdown line: votes so far and the best estimate."""
        votes, best = self.arena.votes, self.best
        ties = sum(v["choice"] == "tie" for v in votes)
        head = f"**{counted(len(votes), 'vote')}** ({counted(ties, 'tie')}) in study `{self.arena.raw.study_name}`"
        return head + (f"; best so far: {fmt_weights(best.weights)}" if best else "; no best yet: vote once")
