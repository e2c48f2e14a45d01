"""The Chat tab's Arena mode: two anonymous merges answer one prompt, the user votes, the next pair appears.

The pair comes from a preference study (:class:`workbench.arena.ArenaRun`, optuna-dashboard's preferential
GP sampler) kept in ``<workdir>/arena.db`` by default; the best estimate can go to Tune, to a chat pane or
to an export. Generation settings are the Chat tab's.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gradio as gr

from workbench.arena import DEFAULT_STUDY, ArenaRun, default_storage
from workbench.chatting import GenSettings
from workbench.session import Session
from workbench.tabs import Ctx, error_md
from workbench.text import counted

VOTES = {"arena-left": ("A is better", "left"), "arena-tie": ("Tie", "tie"), "arena-right": ("B is better", "right")}


class ArenaPanel:
    """Handles of the Arena mode; ``settings`` are the Chat tab's generation-setting components."""

    def __init__(self, ctx: Ctx, settings: list[Any]) -> None:
        self.ctx, self.settings = ctx, settings
        with gr.Row():
            self.storage = gr.Textbox(label="study storage (empty: arena.db in the workdir)", scale=3,
                                      placeholder="sqlite:///…/arena.db, postgresql://…", elem_id="arena-storage")
            self.study = gr.Textbox(DEFAULT_STUDY, label="study", scale=1, elem_id="arena-study")
            self.sampler = gr.Radio(["gp", "random"], value="gp", label="challengers", scale=1)
            self.instruction = gr.Slider(0, 1.5, value=1.0, step=0.05, label="instruction weight", scale=1)
            self.open = gr.Button("Open / resume", scale=1, elem_id="arena-open")
        with gr.Row():
            self.bots = [gr.Chatbot(height=320, label=side, elem_id=f"arena-{side.lower()}", feedback_options=None)
                         for side in ("A", "B")]
        with gr.Row():
            self.prompt = gr.Textbox(placeholder="one prompt, answered by both", show_label=False, scale=5,
                                     elem_id="arena-prompt")
            self.send = gr.Button("Ask both", variant="primary", scale=1, elem_id="arena-send")
        with gr.Row():
            self.buttons = {choice: gr.Button(label, elem_id=eid) for eid, (label, choice) in VOTES.items()}
        self.status = gr.Markdown(elem_id="arena-status")
        self.best = gr.Markdown(elem_id="arena-best")
        with gr.Row():
            self.to_tune = gr.Button("Send best to Tune", elem_id="arena-to-tune")
            self.chat_best = gr.Button("Chat with best", elem_id="arena-chat-best")
            self.export_name = gr.Textbox(placeholder="export folder name", show_label=False, scale=2,
                                          elem_id="arena-export-name")
            self.export = gr.Button("Export best", elem_id="arena-export")

        form = [ctx.state, self.storage, self.study, self.sampler, self.instruction]
        self.open.click(self.on_open, form, [*self.bots, self.status, self.best], concurrency_limit=None)
        for trigger in (self.send.click, self.prompt.submit):
            trigger(self.on_ask, [*form, self.prompt, *settings], [*self.bots, self.prompt, self.status, self.best],
                    concurrency_limit=None, show_progress="minimal")
        for choice, button in self.buttons.items():
            button.click(self._vote_fn(choice), [*form, *settings], [*self.bots, self.status, self.best],
                         concurrency_limit=None, show_progress="minimal")
        tune = ctx.tune
        if tune is None:  # a Chat tab built alone (tests) has no Tune tab to send to
            return
        self.to_tune.click(self.on_to_tune, [ctx.state], [*tune.outputs[:-1], self.status], concurrency_limit=None)
        self.export.click(self.on_export, [ctx.state, self.export_name], [*tune.outputs[:-1], self.status],
                          concurrency_limit=None)

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _run(session: Session, storage: str, study: str, sampler: str, iw: float) -> ArenaRun:
        """The session's arena for this form: the open one if it matches, else opened (or resumed) now."""
        run = ArenaRun.of(session)
        storage = (storage or "").strip() or default_storage(session)
        if run is None or (run.storage, run.arena.raw.study_name, run.sampler) != \
                (storage, (study or DEFAULT_STUDY).strip(), sampler):
            run = ArenaRun.open(session, storage, study, sampler, instruction_weight=float(iw))
        run.instruction_weight = float(iw) if session.shared.instruction is not None else 0.0
        return run

    @staticmethod
    def _settings(values: tuple[Any, ...]) -> GenSettings:
        max_new, max_prompt, temperature, top_p, greedy, seed = values
        return GenSettings(int(max_new), float(temperature), float(top_p), bool(greedy), int(max_prompt),
                           int(seed or 0))

    def best_weights(self, session: Session) -> dict[str, float]:
        run = ArenaRun.of(session)
        weights = run.best_weights if run else None
        if weights is None:
            raise ValueError("no best merge yet: vote on a pair first")
        return weights

    # -- events --------------------------------------------------------------------------------
    def on_open(self, session: Session, storage: str, study: str, sampler: str, iw: float) -> list[Any]:
        try:
            ArenaRun.of(session) and session.ui.pop("arena")
            run = self._run(session, storage, study, sampler, iw)
        except Exception as exc:
            return [gr.skip(), gr.skip(), error_md(exc), gr.skip()]
        return [[], [], f"opened; {counted(len(run.arena.votes), 'vote')} so far: ask both merges a prompt",
                run.summary()]

    def _stream(self, session: Session, run: ArenaRun, prompt: str, settings: GenSettings,
                note: str) -> Iterator[list[Any]]:
        for hist in run.ask(session, prompt, settings):
            yield [[dict(m) for m in hist[0]], [dict(m) for m in hist[1]], f"{note} generating…"]
        yield [run.histories[0], run.histories[1], note or "vote: which reply is better?"]

    def on_ask(self, session: Session, storage: str, study: str, sampler: str, iw: float, prompt: str,
               *settings: Any) -> Iterator[list[Any]]:
        if not (prompt or "").strip():
            yield [gr.skip(), gr.skip(), gr.skip(), "type a prompt first", gr.skip()]
            return
        try:
            run = self._run(session, storage, study, sampler, iw)
            run.refresh()
        except Exception as exc:
            yield [gr.skip(), gr.skip(), gr.skip(), error_md(exc), gr.skip()]
            return
        for a, b, status in self._stream(session, run, prompt, self._settings(settings), ""):
            yield [a, b, "", status, run.summary()]

    def _vote_fn(self, choice: str):
        def on_vote(session: Session, storage: str, study: str, sampler: str, iw: float,
                    *settings: Any) -> Iterator[list[Any]]:
            run = ArenaRun.of(session)
            if run is None or not run.prompt:
                yield [gr.skip(), gr.skip(), "ask both merges a prompt first", gr.skip()]
                return
            try:
                run.vote(choice)
            except Exception as exc:
                yield [gr.skip(), gr.skip(), error_md(exc), gr.skip()]
                return
            note = f"vote recorded ({run.revealed}). Next pair:"
            yield [[], [], note, run.summary()]
            for a, b, status in self._stream(session, run, run.prompt, self._settings(settings), note):
                yield [a, b, status, run.summary()]
        return on_vote

    def on_to_tune(self, session: Session) -> list[Any]:
        tune = self.ctx.tune
        try:
            out = tune.show(session, self.best_weights(session), ArenaRun.of(session).instruction_weight)
        except Exception as exc:
            return [*(gr.skip() for _ in tune.outputs[:-1]), error_md(exc)]
        return [*out[:-1], "the best merge is now in Tune"]

    def on_export(self, session: Session, name: str) -> list[Any]:
        tune = self.ctx.tune
        try:
            out = tune.show(session, self.best_weights(session), ArenaRun.of(session).instruction_weight)
            res = session.export(name or "")
        except Exception as exc:
            return [*(gr.skip() for _ in tune.outputs[:-1]), error_md(exc)]
        return [*out[:-1], f"best merge (now in Tune) saved to `{res.path}`"]
