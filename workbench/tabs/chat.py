"""Chat tab: 2-4 panes side by side (base, a single CPT model, the Tune merge, the best merge...), one
prompt sent to all, replies streamed pane by pane; instruction models get the chat template.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gradio as gr

from workbench.chatting import MAX_NEW_TOKENS, MAX_PROMPT_TOKENS, GenSettings
from workbench.session import BASE, BASE_IT, BEST, TUNE, Session
from workbench.tabs import Ctx

PANES = 4


def default_choices(choices: list[str]) -> list[str]:
    """Pane defaults: base (with instruction if there is one), Tune merge, best merge, first CPT model."""
    first_cpt = next((c for c in choices if c.startswith("CPT ")), choices[0])
    return [BASE_IT if BASE_IT in choices else BASE, TUNE, BEST, first_cpt]


class ChatTab:
    """Handles of the Chat tab."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.n = gr.Radio([2, 3, 4], value=2, label="panes", elem_id="chat-panes")
        self.columns, self.models, self.bots = [], [], []
        with gr.Row():
            for i in range(PANES):
                with gr.Column(visible=i < 2, min_width=220) as col:
                    self.models.append(gr.Dropdown([], label=f"model {i + 1}", elem_id=f"chat-model-{i}"))
                    self.bots.append(gr.Chatbot(height=360, elem_id=f"chat-{i}", show_label=False,
                                                feedback_options=None))
                self.columns.append(col)
        with gr.Row():
            self.prompt = gr.Textbox(placeholder="one prompt, sent to every pane", show_label=False, scale=5,
                                     elem_id="chat-prompt")
            self.send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
            self.clear = gr.Button("Clear", scale=1, elem_id="chat-clear")
        with gr.Accordion("generation settings", open=False):
            with gr.Row():
                self.max_new = gr.Slider(1, MAX_NEW_TOKENS, value=48, step=1, label="max new tokens",
                                         elem_id="chat-max-new")
                self.max_prompt = gr.Slider(16, MAX_PROMPT_TOKENS, value=256, step=16, label="max prompt tokens")
                self.temperature = gr.Slider(0, 2, value=0.8, step=0.05, label="temperature")
                self.top_p = gr.Slider(0.05, 1, value=0.95, step=0.05, label="top-p")
                self.greedy = gr.Checkbox(False, label="greedy")
                self.seed = gr.Number(0, precision=0, label="seed")
        self.status = gr.Markdown(elem_id="chat-status")
        self.outputs: list[Any] = list(self.models)

        self.n.change(lambda n: [gr.update(visible=i < int(n)) for i in range(PANES)], self.n, self.columns,
                      show_progress="hidden")
        inputs = [ctx.state, self.prompt, self.n, self.max_new, self.max_prompt, self.temperature, self.top_p,
                  self.greedy, self.seed, *self.models, *self.bots]
        for trigger in (self.send.click, self.prompt.submit):
            trigger(self.on_send, inputs, [*self.bots, self.prompt, self.status], concurrency_limit=None,
                    show_progress="minimal")
        self.clear.click(lambda: [[] for _ in range(PANES)], None, self.bots, show_progress="hidden")
        for model, bot in zip(self.models, self.bots, strict=True):
            model.input(lambda: [], None, bot, show_progress="hidden")  # another model: a fresh conversation

    def on_send(self, session: Session, prompt: str, n: int, max_new: float, max_prompt: float,
                temperature: float, top_p: float, greedy: bool, seed: float, *rest: Any) -> Iterator[list[Any]]:
        n = int(n)
        choices, histories = list(rest[:PANES])[:n], [list(h or []) for h in rest[PANES:]][:n]
        settings = GenSettings(int(max_new), float(temperature), float(top_p), bool(greedy), int(max_prompt),
                               int(seed or 0))
        if not (prompt or "").strip():
            yield [*(gr.skip() for _ in range(PANES)), gr.skip(), "type a prompt first"]
            return
        if any(not c for c in choices):
            yield [*(gr.skip() for _ in range(PANES)), gr.skip(), "choose a model for every pane"]
            return
        for hist in session.chat(prompt, choices, histories, settings):
            yield [*hist, *(gr.skip() for _ in range(PANES - n)), "", "generating…"]
        yield [*(gr.skip() for _ in range(PANES)), "", ""]

    def refresh(self, session: Session) -> list[Any]:
        if not session.has_pool:
            return [gr.update(choices=[], value=None) for _ in self.models]
        try:
            choices = session.pane_choices()
        except Exception:
            return [gr.update(choices=[], value=None) for _ in self.models]
        return [gr.update(choices=choices, value=v) for v in default_choices(choices)]
