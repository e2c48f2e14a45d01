"""Streaming generation from the merge engine: prompt building, length caps, one worker per reply.

    from workbench.chatting import GenSettings, stream_reply
    state = engine.state({"ja": 0.3}, 1.0)
    for text_so_far in stream_reply(engine, state, history, "Hi!", GenSettings()):
        print(text_so_far)

The worker thread holds one engine lease (a slot merged to ``state``) for the whole generation and calls
``model.generate`` with a ``transformers.TextIteratorStreamer``; the caller only reads the stream, so
it may be a generator resumed on different threads (as Gradio does). A model with a non-zero
instruction weight and a tokenizer with a chat template gets the template (multi-turn); any other
model continues the raw prompt.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import StoppingCriteria

from optimer_lib.engine import INTERACTIVE, MergeEngine, MergeState
from optimer_lib.scoring.evaluate import max_positions

MAX_NEW_TOKENS = 256
MAX_PROMPT_TOKENS = 1024
MAX_CHARS_PER_TOKEN = 64  # longer than any token of a BPE vocabulary: trimming to this never changes kept tokens
Message = dict[str, str]


@dataclass
class GenSettings:
    """Generation settings; ``max_new_tokens`` and ``max_prompt_tokens`` are capped (see :meth:`capped`)."""

    max_new_tokens: int = 48
    temperature: float = 0.8
    top_p: float = 0.95
    greedy: bool = False
    max_prompt_tokens: int = 256
    seed: int = 0

    def capped(self, max_positions: int | None) -> GenSettings:
        """A copy within the hard caps and the model's context (prompt + new tokens <= positions)."""
        new = max(1, min(int(self.max_new_tokens), MAX_NEW_TOKENS))
        prompt = max(1, min(int(self.max_prompt_tokens), MAX_PROMPT_TOKENS))
        if max_positions:
            new = min(new, max(1, max_positions // 2))
            prompt = min(prompt, max(1, max_positions - new))
        return GenSettings(new, max(0.0, float(self.temperature)), min(1.0, max(0.01, float(self.top_p))),
                           bool(self.greedy), prompt, int(self.seed))


def uses_chat_template(tokenizer: Any, instruction_weight: float) -> bool:
    """Whether replies of a model with this instruction weight are formatted with the chat template."""
    return bool(instruction_weight) and bool(getattr(tokenizer, "chat_template", None))


def _text(content: Any) -> str:
    """A message's text: a string, or the list of ``{"type": "text", "text": ...}`` parts Gradio 6's Chatbot sends."""
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def _tail(history: Sequence[Message], prompt: str, chars: int) -> tuple[list[Message], str]:
    """The last ``chars`` characters of the conversation (prompt first, then history from the end)."""
    prompt = str(prompt)[-chars:]
    budget, kept = chars - len(prompt), []
    for m in reversed(history):
        if budget <= 0:
            break
        content = _text(m["content"])[-budget:]
        kept.append({"role": m["role"], "content": content})
        budget -= len(content)
    return kept[::-1], prompt


def prompt_ids(tokenizer: Any, history: Sequence[Message], prompt: str, chat: bool, max_tokens: int) -> list[int]:
    """Token ids for the model: the chat template over history + prompt, or the raw prompt after bos.

    Long inputs keep their *last* ``max_tokens`` tokens. Text beyond ``MAX_CHARS_PER_TOKEN`` characters per
    kept token is dropped before tokenising, so a megabyte pasted (or posted to the API) costs no more than
    a full prompt (tokenising 10 MB took 78 s of CPU).
    """
    history, prompt = _tail(history, prompt, max(1, int(max_tokens)) * MAX_CHARS_PER_TOKEN)
    if chat:
        msgs = [{"role": m["role"], "content": str(m["content"])} for m in history] + [
            {"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    else:
        ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        bos = getattr(tokenizer, "bos_token_id", None)
        ids = [bos, *ids] if bos is not None else ids
    return ids[-max_tokens:] if ids else [getattr(tokenizer, "eos_token_id", None) or 0]


class _StopOn(StoppingCriteria):
    """Stop generating once ``event`` is set (the reader went away)."""

    def __init__(self, event: threading.Event) -> None:
        super().__init__()
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kw: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def stream_reply(engine: MergeEngine, state: MergeState, history: Sequence[Message], prompt: str,
                 settings: GenSettings) -> Iterator[str]:
    """Yield the reply generated so far, growing, for the engine's model merged as ``state``.

    Raises the worker's exception (after the partial text) if generation fails.
    """
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    tokenizer = engine.tokenizer
    s = settings.capped(max_positions(engine.base))
    chat = uses_chat_template(tokenizer, state.instruction_weight)
    ids = prompt_ids(tokenizer, history, prompt, chat, s.max_prompt_tokens)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
    stop = threading.Event()
    failure: list[BaseException] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def work() -> None:
        try:
            with engine.lease(state, priority=INTERACTIVE) as lease:
                model = lease.model
                device = next(model.parameters()).device
                input_ids = torch.tensor([ids], dtype=torch.long, device=device)
                kwargs: dict[str, Any] = {"max_new_tokens": s.max_new_tokens, "pad_token_id": pad,
                                          "do_sample": not s.greedy and s.temperature > 0}
                if kwargs["do_sample"]:
                    torch.manual_seed(s.seed)
                    kwargs.update(temperature=s.temperature, top_p=s.top_p)
                model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                               stopping_criteria=StoppingCriteriaList([_StopOn(stop)]), **kwargs)
        except BaseException as exc:  # handed to the reader below
            failure.append(exc)
            streamer.end()

    worker = threading.Thread(target=work, daemon=True, name="chat-generate")
    worker.start()
    text = ""
    try:
        for piece in streamer:
            text += piece
            yield text
    except queue.Empty:
        stop.set()
        raise TimeoutError("generation produced nothing for 300 s") from None
    finally:
        stop.set()  # the reader is gone (or done): a still-running generate stops at the next token
    worker.join(timeout=5)
    if failure:
        raise failure[0]


def stream_many(engine: MergeEngine, states: Sequence[MergeState], histories: Sequence[Sequence[Message]],
                prompt: str, settings: GenSettings) -> Iterator[list[str]]:
    """Replies of several merges to one prompt, generated at the same time; yields all replies so far.

    Each reply is :func:`stream_reply` on its own thread and engine lease, so they run in parallel up to the
    engine's concurrency (the rest wait for a slot). A failing reply becomes ``"[Error: message]"`` and never
    stops the others. Closing the iterator stops every generation at its next token.
    """
    texts = [""] * len(states)
    updates: queue.Queue[tuple[int, str | None]] = queue.Queue()
    stop = threading.Event()

    def pump(i: int) -> None:
        replies = stream_reply(engine, states[i], histories[i], prompt, settings)
        try:
            for text in replies:
                updates.put((i, text))
                if stop.is_set():
                    break
        except Exception as exc:
            updates.put((i, f"{texts[i]}[{type(exc).__name__}: {exc}]"))
        finally:
            replies.close()  # its reader is gone: the generation stops at the next token
            updates.put((i, None))

    for i in range(len(states)):
        threading.Thread(target=pump, args=(i,), daemon=True, name=f"chat-many-{i}").start()
    running = len(states)
    try:
        while running:
            i, text = updates.get()
            if text is None:
                running -= 1
                continue
            texts[i] = text
            yield list(texts)
    finally:
        stop.set()
