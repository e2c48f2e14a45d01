"""The notebook Arena: two anonymous merges answer one prompt, you vote, and the best estimate is chatted with,
sent to Tune or exported, from its buttons or from code.

    from workbench.arena_widget import ArenaWidget      # also: from workbench.widgets import ArenaWidget
    w = ArenaWidget(session); w                         # a cell's last value shows it
    w.ask("What is 12 + 35?"); w.vote("right")          # what "ask both" and "B is better" do
    w.chat_best("What is 12 + 35?")                     # "chat with best": a conversation with the best estimate
    w.export_best("arena-best", gguf="f16")             # "export best": <workdir>/exports/arena-best (+ a GGUF file)

Votes, pairs and the best estimate are :class:`workbench.arena.ArenaRun`'s; generation is
:func:`workbench.chatting.stream_reply` / ``stream_many`` on the pool's engine; the export is ``session.export``
(and :func:`optimer_lib.checkpoints.gguf_export.add_gguf_to_export`, as the Export tab). Needs the ``arena`` extra.
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence

import ipywidgets as widgets

from optimer_lib.checkpoints.gguf_export import DTYPES, add_gguf_to_export
from optimer_lib.engine import MergeState
from workbench.arena import ArenaRun, fmt_weights
from workbench.chatting import GenSettings, Message, stream_reply
from workbench.session import ExportResult, Session, TuneResult
from workbench.widget_parts import Component, pane_html
from workbench.workspace import WorkbenchError

NO_GGUF = "no"


class ArenaWidget(Component):
    """The Chat tab's Arena in a notebook: two anonymous merges answer one prompt; vote; the next pair answers.

    :meth:`ask` sends a prompt to both (replies in ``panes``), :meth:`vote` ("left", "right", "tie") records a
    vote in the arena study (``storage``/``study``: default ``arena.db`` in the workdir; resumed if it exists)
    and asks the next pair the same prompt. The best estimate (``best_weights``, at the arena's instruction
    weight): :meth:`chat_best` talks with it (``chat_pane``; the conversation restarts when the best changes),
    :meth:`to_tune` makes it the session's Tune merge, :meth:`export_best` writes it under ``exports/``.
    """

    def __init__(self, session: Session, *, storage: str | None = None, study: str = "arena", sampler: str = "gp",
                 seed: int = 0, settings: GenSettings | None = None, export_name: str = "arena-best") -> None:
        self.session, self.settings = session, settings or GenSettings()
        self.run = ArenaRun.open(session, storage, study, sampler, seed)
        self.panes = [widgets.HTML(layout={"width": "50%"}) for _ in range(2)]
        self.prompt = widgets.Text(placeholder="one prompt, answered by both", layout={"width": "60%"})
        self.send_button = widgets.Button(description="ask both", button_style="primary")
        self.send_button.on_click(lambda _b: self._guard(lambda: self.ask(self.prompt.value)))
        self.vote_buttons = {c: widgets.Button(description=d) for c, d in
                             (("left", "A is better"), ("tie", "tie"), ("right", "B is better"))}
        for choice, button in self.vote_buttons.items():
            button.on_click(lambda _b, c=choice: self._guard(lambda: self.vote(c)))
        self.tune_button = widgets.Button(description="best to Tune")
        self.tune_button.on_click(lambda _b: self._guard(self.to_tune))
        self.best_label, self.status = widgets.HTML(), widgets.HTML()
        # the best estimate: a conversation with it, and an export
        self.chat_history: list[Message] = []
        self._chat_state: MergeState | None = None  # the merge chat_history was held with
        self.chat_pane = widgets.HTML()
        self.chat_prompt = widgets.Text(placeholder="a prompt for the best estimate", layout={"width": "60%"})
        self.chat_button = widgets.Button(description="chat with best")
        self.chat_button.on_click(lambda _b: self._guard(lambda: self.chat_best(self.chat_prompt.value)))
        self.export_name = widgets.Text(value=export_name, description="exports/", layout={"width": "260px"})
        self.export_gguf = widgets.Dropdown(options=[NO_GGUF, *DTYPES], value=NO_GGUF, description="+ GGUF",
                                            layout={"width": "160px"})
        self.export_overwrite = widgets.Checkbox(value=False, description="replace")
        self.export_button = widgets.Button(description="export best")
        self.export_button.on_click(lambda _b: self._guard(lambda: self.export_best(
            self.export_name.value, overwrite=self.export_overwrite.value, gguf=self.export_gguf.value)))
        self.widget = widgets.VBox([widgets.HBox(self.panes), widgets.HBox([self.prompt, self.send_button]),
                                    widgets.HBox([*self.vote_buttons.values(), self.tune_button]), self.best_label,
                                    self.chat_pane, widgets.HBox([self.chat_prompt, self.chat_button]),
                                    widgets.HBox([self.export_name, self.export_gguf, self.export_overwrite,
                                                  self.export_button]), self.status])
        self._render()
        self._render_chat()

    @property
    def best_weights(self) -> dict[str, float] | None:
        """The arena's current best estimate (None before the first decisive vote)."""
        return self.run.best_weights

    def ask(self, prompt: str) -> list[str]:
        """Both merges answer ``prompt`` (generated at the same time); returns the two replies (A, B)."""
        if not (prompt or "").strip():
            raise WorkbenchError("type a prompt first")
        shown = 0.0
        for hist in self.run.ask(self.session, prompt, self.settings):
            if time.perf_counter() - shown > 0.2:
                self._render(hist)
                shown = time.perf_counter()
        self._render()
        return [h[-1]["content"] for h in self.run.histories]

    def vote(self, choice: str) -> list[str]:
        """Record ``choice`` on the pair shown; the next pair answers the last prompt; returns its replies."""
        if not self.run.prompt:
            raise WorkbenchError("ask both merges a prompt first")
        self.run.vote(choice)
        self.status.value = html.escape(f"vote recorded ({self.run.revealed})")
        return self.ask(self.run.prompt)

    def _best(self) -> dict[str, float]:
        best = self.best_weights
        if best is None:
            raise WorkbenchError("no best merge yet: vote on a pair first")
        return best

    def to_tune(self) -> TuneResult:
        """Make the best estimate the session's Tune merge and score it."""
        return self.session.apply(self._best(), self.run.instruction_weight)

    def chat_best(self, prompt: str) -> str:
        """Send ``prompt`` to the best estimate (streamed into ``chat_pane``); returns its reply.

        The conversation goes on across calls while the best estimate stays the same merge, and starts afresh
        once a vote changes it. Generation settings are the arena's.
        """
        prompt = (prompt or "").strip()
        if not prompt:
            raise WorkbenchError("type a prompt first")
        state = self.session.shared.engine.state(self._best(), self.run.instruction_weight)
        if state != self._chat_state:
            self.chat_history, self._chat_state = [], state
        before = list(self.chat_history)
        turn: list[Message] = [{"role": "user", "content": prompt}, {"role": "assistant", "content": ""}]
        shown = 0.0
        for text in stream_reply(self.session.shared.engine, state, before, prompt, self.settings):
            turn[-1] = {"role": "assistant", "content": text}
            if time.perf_counter() - shown > 0.2:
                self._render_chat([*before, *turn])
                shown = time.perf_counter()
        self.chat_history = [*before, *turn]
        self._render_chat()
        return turn[-1]["content"]

    def export_best(self, name: str = "arena-best", *, overwrite: bool = False,
                    gguf: str | None = None) -> ExportResult:
        """Write the best estimate to ``<workdir>/exports/<name>`` (HF checkpoint, model card, mergekit YAML).

        It goes through the session's Tune merge, as "best to Tune" does (scored, so the card's scores are its
        own): the Tune merge is the best estimate afterwards. ``gguf`` ("f32", "f16", "bf16", "q8_0") also writes
        ``<name>-<gguf>.gguf`` into the folder. The status line names what was written.
        """
        if gguf not in (None, "", NO_GGUF) and gguf not in DTYPES:
            raise WorkbenchError(f"unknown GGUF type {gguf!r}: choose one of {', '.join(DTYPES)} (or none)")
        folder = self.session.workspace.exports_dir / (name or "").strip()
        if (name or "").strip() and folder.exists() and not overwrite:  # before scoring, and in the widget's words
            raise WorkbenchError(f"exports/{folder.name} exists: tick 'replace' (overwrite=True) or choose another "
                                 "name")
        self.to_tune()
        res = self.session.export(name, overwrite)
        line = f"exported the best estimate to {res.path}"
        if gguf not in (None, "", NO_GGUF):
            try:
                g = add_gguf_to_export(res.path, dtype=gguf, overwrite=True)
            except Exception as exc:  # the HF export stands; say why the GGUF file is missing
                raise WorkbenchError(f"{line}, but not as GGUF: {exc}") from exc
            line += f" and {g.path.name} ({g.dtype}, {g.bytes / 1e6:.1f} MB)"
        self.status.value = html.escape(line)
        return res

    def _render(self, histories: Sequence[list[Message]] | None = None) -> None:
        for side, pane, hist in zip("AB", self.panes, histories or self.run.histories, strict=True):
            pane.value = pane_html(hist, f"<b>{side}</b>")
        self.best_label.value = html.escape(self.run.summary()).replace("**", "")

    def _render_chat(self, history: Sequence[Message] | None = None) -> None:
        st = self._chat_state
        head = "best estimate" + (f" ({fmt_weights(st.weight_map)})" if st is not None else "")
        self.chat_pane.value = pane_html(self.chat_history if history is None else history,
                                         f"<b>{html.escape(head)}</b>")
