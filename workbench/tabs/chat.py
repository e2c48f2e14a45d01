"""Chat tab: 2-4 panes side by side (base, a single CPT model, the Tune merge, the best merge...), one
prompt sent to all, replies streamed pane by pane; instruction models get the chat template.

The panes (how many, which model each, their histories) survive a page reload: :meth:`ChatTab.persist`
writes :func:`chat_snapshot` to a ``gr.BrowserState`` after every send, clear or model change, and
:func:`restore_chat` checks a saved snapshot against the pool before the next :meth:`ChatTab.refresh` shows it.

The "arena" mode (:mod:`workbench.tabs.arena`) shows two anonymous merges instead and learns from the user's votes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import gradio as gr

from workbench.chatting import MAX_NEW_TOKENS, MAX_PROMPT_TOKENS, GenSettings
from workbench.session import BASE, BASE_IT, BEST, TUNE, Session
from workbench.tabs import Ctx, error_md
from workbench.tabs.arena import ArenaPanel

PANES = 4
MODES = ["side by side", "arena"]
SNAPSHOT_VERSION = 1
RESTORE_KEY = "chat_restore"  # Session.ui slot: a checked snapshot waiting for the next refresh


def default_choices(choices: list[str]) -> list[str]:
    """Pane defaults: base (with instruction if there is one), Tune merge, best merge, first CPT model."""
    first_cpt = next((c for c in choices if c.startswith("CPT ")), choices[0])
    return [BASE_IT if BASE_IT in choices else BASE, TUNE, BEST, first_cpt]


def _text(content: Any) -> str:
    """A message's text: Gradio 6 hands chat content back as a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("content") or "")
    if isinstance(content, (list, tuple)):
        return "".join(_text(c) for c in content)
    return ""


def clean_history(history: Any) -> list[dict[str, str]]:
    """``history`` as plain ``{"role": "user"|"assistant", "content": str}`` messages (anything else dropped)."""
    out = []
    for m in history if isinstance(history, (list, tuple)) else []:
        if isinstance(m, dict) and m.get("role") in ("user", "assistant"):
            out.append({"role": str(m["role"]), "content": _text(m.get("content"))})
    return out


def chat_snapshot(n: Any, choices: Sequence[Any], histories: Sequence[Any]) -> dict[str, Any]:
    """What a browser keeps of the Chat tab: pane count, each pane's model and its history (JSON-able)."""
    return {"v": SNAPSHOT_VERSION, "n": int(n or 2), "choices": [c if isinstance(c, str) else None for c in choices],
            "histories": [clean_history(h) for h in histories]}


def restore_chat(session: Session, saved: Any) -> str:
    """Check a :func:`chat_snapshot` against the session's pool and queue it for the next refresh.

    Returns a note for the page ("" when all was restored): a pane whose model the pool no longer offers
    starts empty with the default model; a malformed or foreign snapshot is ignored.
    """
    if not saved:
        return ""
    if not isinstance(saved, dict) or saved.get("v") != SNAPSHOT_VERSION:
        return "saved chat panes are from another version of the workbench: not restored"
    choices_now = session.pane_choices()
    n = saved.get("n")
    n = n if isinstance(n, int) and 2 <= n <= PANES else 2
    choices = list(saved.get("choices") or [])[:PANES]
    histories = list(saved.get("histories") or [])[:PANES]
    choices += [None] * (PANES - len(choices))
    histories += [[]] * (PANES - len(histories))
    defaults = default_choices(choices_now)
    dropped = [c for c in choices if c and c not in choices_now]
    panes = [(c, clean_history(h)) if c in choices_now else (defaults[i], [])
             for i, (c, h) in enumerate(zip(choices, histories, strict=True))]
    session.ui[RESTORE_KEY] = {"n": n, "choices": [c for c, _ in panes], "histories": [h for _, h in panes]}
    return (f"chat pane model(s) {dropped} are not in this pool: those panes start afresh" if dropped else "")


class ChatTab:
    """Handles of the Chat tab."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.mode = gr.Radio(MODES, value=MODES[0], show_label=False, elem_id="chat-mode")
        with gr.Column() as self.panes_box:
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
        self.arena_box = gr.Column(visible=False)
        with gr.Accordion("generation settings", open=False):
            with gr.Row():
                self.max_new = gr.Slider(1, MAX_NEW_TOKENS, value=48, step=1, label="max new tokens",
                                         elem_id="chat-max-new")
                self.max_prompt = gr.Slider(16, MAX_PROMPT_TOKENS, value=256, step=16, label="max prompt tokens")
                self.temperature = gr.Slider(0, 2, value=0.8, step=0.05, label="temperature")
                self.top_p = gr.Slider(0.05, 1, value=0.95, step=0.05, label="top-p")
                self.greedy = gr.Checkbox(False, label="greedy")
                self.seed = gr.Number(0, precision=0, label="seed")
        with self.arena_box:  # filled after the settings exist (the arena generates with them)
            self.arena = ArenaPanel(ctx, [self.max_new, self.max_prompt, self.temperature, self.top_p, self.greedy,
                                          self.seed])
        self.status = gr.Markdown(elem_id="chat-status")
        # Panes restored from the browser (restore_chat) reach the page through a change of this State, not as
        # updates on every refresh: Gradio rebuilds a Chatbot for each update, even an empty one (~3 ms each).
        self.restored = gr.State(None)
        self.restored.change(self.on_restored, [self.restored], [self.n, *self.bots], show_progress="hidden",
                             concurrency_limit=None)
        self.outputs: list[Any] = [*self.models, self.restored]
        self.mode.change(lambda m: [gr.update(visible=m == MODES[0]), gr.update(visible=m == MODES[1])], self.mode,
                         [self.panes_box, self.arena_box], show_progress="hidden")

        self.changed = [self.n.change(lambda n: [gr.update(visible=i < int(n)) for i in range(PANES)], self.n,
                                      self.columns, show_progress="hidden")]
        inputs = [ctx.state, self.prompt, self.n, self.max_new, self.max_prompt, self.temperature, self.top_p,
                  self.greedy, self.seed, *self.models, *self.bots]
        for trigger, api in ((self.send.click, "chat"), (self.prompt.submit, None)):  # "chat": the public API
            self.changed.append(trigger(self.on_send, inputs, [*self.bots, self.prompt, self.status], api_name=api,
                                        concurrency_limit=None, show_progress="minimal"))
        self.changed.append(self.clear.click(lambda: [[] for _ in range(PANES)], None, self.bots,
                                             show_progress="hidden"))
        for model, bot in zip(self.models, self.bots, strict=True):  # another model: a fresh conversation
            self.changed.append(model.input(lambda: [], None, bot, show_progress="hidden"))
        # "Chat with best": the arena's best becomes the Tune merge, shown in pane 1 beside the base
        tune = ctx.tune
        if tune is not None:  # a Chat tab built alone (tests) has no Tune tab to send to
            self.changed.append(self.arena.chat_best.click(
                self.on_chat_best, [ctx.state], [*tune.outputs[:-1], self.mode, self.models[0], self.models[1],
                                                 self.bots[0], self.bots[1], self.arena.status, self.status],
                concurrency_limit=None))

    def persist(self, store: Any) -> None:
        """After every event that changes the panes (send, clear, model, pane count), save them to ``store``."""
        for dep in self.changed:
            dep.then(lambda n, *rest: chat_snapshot(n, rest[:PANES], rest[PANES:]), [self.n, *self.models,
                                                                                      *self.bots],
                     store, show_progress="hidden", concurrency_limit=None)

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
        # hidden panes go back unchanged: a gr.skip() makes Gradio build a new Chatbot at every streamed update
        hidden = [list(h or []) for h in rest[PANES + n:]]
        shown = [*histories, *hidden]
        for hist in session.chat(prompt, choices, histories, settings):
            shown = [*hist, *hidden]
            yield [*shown, "", "generating…"]
        yield [*shown, "", ""]

    def on_chat_best(self, session: Session) -> list[Any]:
        """The arena's best into Tune and pane 1, in side-by-side mode; the note goes to the chat's status line, which
        that mode shows (the arena's own is hidden there); a refusal stays on the arena's."""
        tune, keep = self.ctx.tune, [gr.skip()] * 5
        try:
            out = self.arena.on_to_tune(session)
            other = BASE_IT if session.shared.instruction is not None else BASE
        except Exception as exc:
            return [*(gr.skip() for _ in tune.outputs[:-1]), *keep, error_md(exc), gr.skip()]
        if out[-1].startswith("**error"):
            return [*out[:-1], *keep, out[-1], gr.skip()]
        return [*out[:-1], MODES[0], TUNE, other, [], [], "", "the best merge is in Tune and in pane 1: chat with it "
                "(both panes start a new conversation: their earlier ones were with other models)"]

    def refresh(self, session: Session) -> list[Any]:
        """Model choices of the pool; panes restored by :func:`restore_chat` get their models, and their pane count
        and histories through :meth:`on_restored`."""
        if not session.has_pool:
            return [*(gr.update(choices=[], value=None) for _ in self.models), gr.skip()]
        try:
            choices = session.pane_choices()
        except Exception:
            return [*(gr.update(choices=[], value=None) for _ in self.models), gr.skip()]
        saved = session.ui.pop(RESTORE_KEY, None)
        if saved is None:
            return [*(gr.update(choices=choices, value=v) for v in default_choices(choices)), gr.skip()]
        return [*(gr.update(choices=choices, value=v) for v in saved["choices"]),
                {"n": saved["n"], "histories": saved["histories"]}]

    def on_restored(self, saved: dict[str, Any] | None) -> list[Any]:
        """The pane count and histories of a restored chat (``refresh``'s last output), else nothing."""
        if not saved:
            return [gr.skip() for _ in [self.n, *self.bots]]
        return [gr.update(value=saved["n"]), *(gr.update(value=h) for h in saved["histories"])]
