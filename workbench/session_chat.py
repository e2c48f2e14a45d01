"""The Chat-tab half of a :class:`~workbench.session.Session`: which models a pane can show and the streamed replies
of all panes at once. Mixed into ``Session``; use it through a session:

    s.pane_choices()                                                   # ["base", "base + instruction", ...]
    for panes in s.chat("Hello", ["base", "Tune merge"]): ...          # streaming, all panes at once

A pane names a merge (:meth:`pane_state`); its reply is generated on one engine lease, batched with other
sessions' replies to the same merge (:mod:`optimer_lib.engine.batching`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from optimer_lib.engine import MergeState
from workbench.chatting import GenSettings, Message, stream_many
from workbench.workspace import SharedPool, WorkbenchError

TUNE = "Tune merge"
BEST = "best merge"
BASE = "base"
BASE_IT = "base + instruction"


class ChatMethods:
    """Chat methods of :class:`~workbench.session.Session` (the session members they read, declared here)."""

    shared: SharedPool
    names: list[str]
    state: MergeState
    preset: Callable[[str], dict[str, float]]  # Session's: the weights of a preset ("best")

    def pane_choices(self) -> list[str]:
        """Models a chat pane can show."""
        out = [BASE]
        if self.shared.instruction is not None:
            out.append(BASE_IT)
        return [*out, *(f"CPT {n}" for n in self.names), TUNE, BEST]

    def pane_state(self, choice: str) -> MergeState:
        """The merge a chat pane shows; Tune/best use Tune's instruction weight, Tune also its method."""
        zeros = dict.fromkeys(self.names, 0.0)
        engine, tune = self.shared.engine, self.state
        if choice == BASE:
            return engine.state(zeros)
        if choice == BASE_IT:
            return engine.state(zeros, 1.0)
        if choice.startswith("CPT ") and choice[4:] in self.names:
            return engine.state({**zeros, choice[4:]: 1.0})
        if choice == TUNE:
            return tune
        if choice == BEST:
            return engine.state(self.preset("best"), tune.instruction_weight)
        raise WorkbenchError(f"unknown chat model {choice!r}: choose one of {self.pane_choices()}")

    def pane_weights(self, choice: str) -> tuple[dict[str, float], float]:
        """``(weights, instruction weight)`` of a pane."""
        st = self.pane_state(choice)
        return st.weight_map, st.instruction_weight

    def chat(self, prompt: str, choices: Sequence[str], histories: Sequence[list[Message]] | None = None,
             settings: GenSettings | None = None) -> Iterator[list[list[Message]]]:
        """Send ``prompt`` to every pane at once; yields all panes' histories as replies stream in.

        Panes of different merges generate in parallel (up to the engine's concurrency), panes of the same merge
        in one batch with other sessions' replies to it (:mod:`optimer_lib.engine.batching`); each reply is
        generated on one engine lease (never a re-merge per token). A failing pane says why and never stops the
        others.
        """
        settings = settings or GenSettings()
        hist = [list(h) for h in (histories or [[] for _ in choices])]
        prompt = prompt.strip()
        if not prompt:
            raise WorkbenchError("type a prompt first")
        for h in hist:
            h.append({"role": "user", "content": prompt})
            h.append({"role": "assistant", "content": ""})
        yield hist
        live: list[tuple[int, MergeState]] = []
        for i, choice in enumerate(choices):
            try:
                live.append((i, self.pane_state(choice)))
            except Exception as exc:  # one failing pane must not hide the others
                hist[i][-1] = {"role": "assistant", "content": f"[{type(exc).__name__}: {exc}]"}
        if len(live) < len(choices):
            yield hist
        if not live:
            return
        replies = stream_many(self.shared.engine, [st for _, st in live], [hist[i][:-2] for i, _ in live], prompt,
                              settings)
        try:
            for texts in replies:
                for (i, _), text in zip(live, texts, strict=True):
                    hist[i][-1] = {"role": "assistant", "content": text}
                yield hist
        finally:
            replies.close()  # the reader left (a closed tab): every reply stops at its next token
