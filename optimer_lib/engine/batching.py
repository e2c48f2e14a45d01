"""Batched replies: requests for the same merge share one engine lease and one batched ``generate``.

    from optimer_lib.engine.batching import Sampling, batcher
    reply = batcher(engine).submit(state, prompt_ids, Sampling(48, temperature=0.8, top_p=0.95, seed=3))
    for piece in reply:          # text as it is decoded (TextStreamer's pieces); the row's error at the end
        print(piece, end="")
    reply.tokens                 # the ids it generated (an end-of-text token included)

Why: a chat reply of the tiny model costs a few hundred ms of CPU, nearly all of it per-step overhead that a batch
of 16 rows pays once, and with many users most replies ask for the same merge (the default panes). So the
:class:`ReplyBatcher` collects the requests for one :class:`MergeState` that arrive within ``window_s`` of the
first, or while that batch still waits for its lease, up to ``max_batch`` rows, and runs them as one
left-padded ``generate`` on one lease (priority INTERACTIVE: replies still overtake searches). Each row streams
to its own reader and stops on its own: at end-of-text, at its own ``max_new_tokens``, when its reader goes
away (:meth:`Reply.cancel`, or closing the iteration), or when its token choice fails; the batch goes on for
the others until every row has stopped. A batch that is running takes no new rows (its cache is built):
requests arriving then form the next batch, which fills up while it waits for a lease. Requests for other
states are other batches, running in parallel up to the engine's ``concurrency``.

Sampling is per row (:mod:`optimer_lib.engine.sampling`): a reply is the same whether it ran alone or in a
batch. A reader is woken with new text at most every ``stream_every_s`` (100 ms), or every ``busy_stream_every_s``
(250 ms) when its batch has more than ``busy_rows`` (4) rows: a batch that large means several users chat at once,
and each wake becomes a streamed update the web app handles under the interpreter lock (measured under 20 chat
clients: 22.6-22.9 updates per request at 100 ms, 12.3-12.8 at 250 ms, and 8-15% more requests per second).
``batcher(engine)`` is the engine's shared batcher; ``OPTIMER_CHAT_BATCH`` (rows, default 16; 1 = one reply per
lease), ``OPTIMER_CHAT_WINDOW_MS`` (default 25), ``OPTIMER_CHAT_STREAM_MS`` (default 100) and
``OPTIMER_CHAT_BUSY_STREAM_MS`` (default 250) set its limits when it is first made.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList, TextStreamer
from transformers.generation.streamers import BaseStreamer

from optimer_lib.engine.engine import INTERACTIVE, MergeEngine
from optimer_lib.engine.priority import compute_thread
from optimer_lib.engine.sampling import RowSampler, Sampling
from optimer_lib.engine.state import MergeState
from optimer_lib.errors import ConfigError
from optimer_lib.scoring.evaluate import max_positions

_LOCK = threading.Lock()  # guards making an engine's shared batcher
__all__ = ["BatcherStats", "Reply", "ReplyBatcher", "Sampling", "batcher", "generate_rows"]


class _Pieces(TextStreamer):
    """transformers' incremental decoding (whole words, flushed lines, CJK at once), collected instead of printed."""

    def __init__(self, tokenizer) -> None:
        super().__init__(tokenizer, skip_special_tokens=True)
        self.pieces: list[str] = []

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.pieces.append(text)

    def take(self) -> str:
        out, self.pieces = "".join(self.pieces), []
        return out


class Reply:
    """One request's row: iterate it for text pieces; ``tokens`` holds the ids generated so far.

    The iteration raises the row's error (after the text it produced) if its generation failed, and
    TimeoutError when nothing came for ``timeout_s``. Stopping the iteration early cancels the row.
    The batch's thread only appends token ids; the reader decodes them in its own thread and is woken at most
    every ``stream_every_s`` (and at the end): with 16 rows, waking 16 readers at every step would stall the
    generating thread on the interpreter lock.
    """

    def __init__(self, ids: Sequence[int], sampling: Sampling, tokenizer, timeout_s: float = 300.0,
                 stream_every_s: float = 0.1) -> None:
        self.ids = [int(i) for i in ids]
        self.sampling = sampling
        self.tokens: list[int] = []
        self.error: BaseException | None = None
        self.batch_size = 0  # rows of the batch that served it (0 until it starts)
        self.timeout_s, self.stream_every_s = timeout_s, stream_every_s
        self.tokenizer = tokenizer
        self._cond = threading.Condition()
        self._woken = 0.0
        self._cancelled = threading.Event()
        self._done = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Nobody reads this row any more: its generation stops at the next token (others go on)."""
        self._cancelled.set()

    def __iter__(self) -> Iterator[str]:
        decoder, seen = _Pieces(self.tokenizer), 0
        try:
            while True:
                with self._cond:
                    if not self._cond.wait_for(lambda n=seen: len(self.tokens) > n or self.finished, self.timeout_s):
                        raise TimeoutError(f"generation produced nothing for {self.timeout_s:g} s")
                    new, done = self.tokens[seen:], self.finished
                seen += len(new)
                for token in new:  # one at a time: the text never depends on how tokens were grouped
                    decoder.put(torch.tensor([token]))
                if done:
                    decoder.end()
                piece = decoder.take()
                if piece:
                    yield piece
                if done:
                    break
        finally:
            self.cancel()  # ended, failed or abandoned: never generate for it again
        if self.error is not None:
            raise self.error

    # -- called by the batch's thread ---------------------------------------------------------
    def _put(self, token: int) -> None:
        with self._cond:
            self.tokens.append(token)
            now = time.monotonic()
            if now - self._woken >= self.stream_every_s:
                self._woken = now
                self._cond.notify_all()

    def _end(self, error: BaseException | None = None) -> None:
        with self._cond:
            if self._done.is_set():
                return
            self.error = error
            self._done.set()
            self._cond.notify_all()


@dataclass
class BatcherStats:
    """Batches run, rows served and the largest batch since the batcher started."""

    batches: int = 0
    rows: int = 0
    largest: int = 0


class _Rows(BaseStreamer):
    """Hands each row its new token and ends rows at end-of-text or their own length."""

    def __init__(self, rows: Sequence[Reply], eos: Collection[int]) -> None:
        self.rows, self.eos = rows, set(eos)

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1:
            return  # the prompt, sent once before the first token
        for row, token in zip(self.rows, value.tolist(), strict=True):
            if row.finished:
                continue
            if row.cancelled:
                row._end()
                continue
            row._put(int(token))
            if token in self.eos or len(row.tokens) >= row.sampling.max_new_tokens:
                row._end()

    def end(self) -> None:
        for row in self.rows:
            row._end()


class _RowStop(StoppingCriteria):
    """A row is done when it ended (end-of-text, failure), its reader left or it has its own length.

    Called before :class:`_Rows` sees the step's token, so it checks length and reader itself: the batch stops
    on the step its last row is done, not one forward pass later."""

    def __init__(self, rows: Sequence[Reply], width: int) -> None:
        super().__init__()
        self.rows, self.width = rows, width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kw) -> torch.Tensor:
        n = input_ids.shape[1] - self.width
        return torch.tensor([r.finished or r.cancelled or n >= r.sampling.max_new_tokens for r in self.rows],
                            dtype=torch.bool, device=input_ids.device)


def _eos_ids(model: torch.nn.Module) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def generate_rows(model: torch.nn.Module, rows: Sequence[Reply], pad_id: int) -> None:
    """One left-padded ``generate`` for ``rows``, streaming each row's tokens to it (see the module docstring).

    Every row is ended when this returns; an exception of ``generate`` itself is raised (the caller ends the
    rows with it).
    """
    device = next(model.parameters()).device
    width = max(len(r.ids) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r.ids)) + r.ids for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in rows], dtype=torch.long,
                        device=device)
    sampler = RowSampler([r.sampling for r in rows], skip=lambda i: rows[i].finished or rows[i].cancelled,
                         on_error=lambda i, exc: rows[i]._end(exc))
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(r.sampling.max_new_tokens for r in rows),
                   do_sample=False, pad_token_id=pad_id, logits_processor=LogitsProcessorList([sampler]),
                   stopping_criteria=StoppingCriteriaList([_RowStop(rows, width)]),
                   streamer=_Rows(rows, _eos_ids(model)))


class _Batch:
    def __init__(self, state: MergeState) -> None:
        self.state = state
        self.rows: list[Reply] = []
        self.closed = False
        self.full = threading.Event()

    def length(self, extra: Reply | None = None) -> int:
        """Positions the batch's ``generate`` reaches (longest prompt + most new tokens), with ``extra`` in it."""
        rows = [*self.rows, *([extra] if extra else [])]
        return max(len(r.ids) for r in rows) + max(r.sampling.max_new_tokens for r in rows)


class ReplyBatcher:
    """Collects reply requests per merge state and serves each batch on one lease (see the module docstring)."""

    def __init__(self, engine: MergeEngine, *, window_s: float = 0.025, max_batch: int = 16,
                 max_running: int | None = None, priority: int = INTERACTIVE, timeout_s: float = 300.0,
                 stream_every_s: float = 0.1, busy_stream_every_s: float = 0.25, busy_rows: int = 4) -> None:
        running = engine.concurrency if max_running is None else int(max_running)
        if (int(max_batch) < 1 or not float(window_s) >= 0 or running < 1
                or not min(float(stream_every_s), float(busy_stream_every_s)) >= 0):
            raise ConfigError(f"reply batches need max_batch >= 1, window_s >= 0, max_running >= 1 and stream "
                              f"intervals >= 0, got {max_batch}, {window_s}, {max_running}, {stream_every_s}, "
                              f"{busy_stream_every_s}")
        self.engine = engine
        self.window_s, self.max_batch = float(window_s), int(max_batch)
        self.priority, self.timeout_s, self.stream_every_s = priority, float(timeout_s), float(stream_every_s)
        # never more often when busy than when not
        self.busy_stream_every_s = max(float(stream_every_s), float(busy_stream_every_s))
        self.busy_rows = int(busy_rows)
        tok = engine.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)
        self.vocab = engine.base.get_input_embeddings().num_embeddings
        self.positions = max_positions(engine.base)
        self._lock = threading.Lock()
        self._open: dict[MergeState, _Batch] = {}
        self._stats = BatcherStats()
        self.max_running = running
        self._running = threading.Semaphore(running)  # a waiting batch stays open: rows keep joining it

    def submit(self, state: MergeState, ids: Sequence[int], sampling: Sampling) -> Reply:
        """Queue one reply of the model merged as ``state`` to the prompt ``ids``; returns it at once."""
        ids = [int(i) for i in ids]
        if not ids or not all(0 <= i < self.vocab for i in ids) or sampling.max_new_tokens < 1:
            raise ConfigError(f"a reply needs 1+ prompt ids in [0, {self.vocab}) and max_new_tokens >= 1")
        reply = Reply(ids, sampling, self.engine.tokenizer, self.timeout_s, self.stream_every_s)
        with self._lock:
            batch = self._open.get(state)
            # a row whose prompt or length would take the batch past the model's positions starts another batch
            if (batch is None or batch.closed or len(batch.rows) >= self.max_batch
                    or (self.positions and batch.length(reply) > self.positions)):
                batch = self._open[state] = _Batch(state)
                threading.Thread(target=compute_thread(self._serve), args=(batch,), daemon=True,
                                 name="chat-generate").start()
            batch.rows.append(reply)
            if len(batch.rows) >= self.max_batch:
                batch.full.set()
        return reply

    def stats(self) -> BatcherStats:
        with self._lock:
            return BatcherStats(self._stats.batches, self._stats.rows, self._stats.largest)

    def _close(self, batch: _Batch) -> list[Reply]:
        """No more rows for ``batch``; its rows whose reader is still there."""
        with self._lock:
            batch.closed = True
            if self._open.get(batch.state) is batch:
                del self._open[batch.state]
            return [r for r in batch.rows if not r.cancelled]

    def _serve(self, batch: _Batch) -> None:
        batch.full.wait(self.window_s)  # company for the first request (a full batch goes at once)
        try:
            with self._running, self.engine.lease(batch.state, priority=self.priority) as lease:
                rows = self._close(batch)  # requests that came while the lease was awaited are in
                if rows:
                    with self._lock:
                        s = self._stats
                        s.batches, s.rows, s.largest = s.batches + 1, s.rows + len(rows), max(s.largest, len(rows))
                    every = self.busy_stream_every_s if len(rows) > self.busy_rows else self.stream_every_s
                    for r in rows:
                        r.batch_size, r.stream_every_s = len(rows), every
                    generate_rows(lease.model, rows, self.pad_id)
        except BaseException as exc:  # the lease or the forward pass failed: every row of the batch says so
            self._close(batch)
            for r in batch.rows:
                r._end(exc)
        finally:
            for r in batch.rows:
                r._end()


def batcher(engine: MergeEngine) -> ReplyBatcher:
    """The engine's shared :class:`ReplyBatcher` (made on first use, limits from the environment)."""
    with _LOCK:
        found = getattr(engine, "_reply_batcher", None)
        if found is None:
            try:
                rows = int(os.environ.get("OPTIMER_CHAT_BATCH", "16"))
                window = float(os.environ.get("OPTIMER_CHAT_WINDOW_MS", "25")) / 1000
                stream = float(os.environ.get("OPTIMER_CHAT_STREAM_MS", "100")) / 1000
                busy = float(os.environ.get("OPTIMER_CHAT_BUSY_STREAM_MS", "250")) / 1000
                running = os.environ.get("OPTIMER_CHAT_RUNNING")
                running = int(running) if running else None
            except ValueError as exc:
                raise ConfigError(f"OPTIMER_CHAT_BATCH and OPTIMER_CHAT_RUNNING must be integers, "
                                  f"OPTIMER_CHAT_WINDOW_MS, OPTIMER_CHAT_STREAM_MS and OPTIMER_CHAT_BUSY_STREAM_MS "
                                  f"numbers ({exc})") from None
            found = ReplyBatcher(engine, window_s=window, max_batch=rows, max_running=running, stream_every_s=stream,
                                 busy_stream_every_s=busy)
            engine._reply_batcher = found  # type: ignore[attr-defined]  # lives and dies with the engine
        return found

