"""What a serving request sees of the decode engine: sampling settings in, a stream of tokens out.

Everything a client can observe of a request is here: the released token ids (each one charged
before it is put on the stream), whether a token came from the public model alone (only when the
operator enables public continuation after the budget runs out), and why the stream ended. The
drawn set, the mixing weights and the released distribution never appear.
"""

from __future__ import annotations

import asyncio
import math
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Literal

__all__ = ["FinishReason", "SamplingParams", "Stream", "Token"]

# "stop": end of sequence or a stop sequence; "length": max_tokens or the model's context;
# "budget": the shared privacy budget (or this request's reservation of it) ran out;
# "cancelled": the client went away; "error": the engine failed (data-independent message)
FinishReason = Literal["stop", "length", "budget", "cancelled", "error"]


@dataclass(frozen=True)
class SamplingParams:
    """How a request samples. max_tokens >= 1; temperature > 0 (1: the mechanism's distribution
    itself); top_p in (0, 1]; top_k >= 0 (0: off). Stop sequences act on the text and live in the
    server. Only the defaults (temperature 1, top_p 1, top_k 0) are covered by the privacy
    guarantee (``covered``): the others act on each draw's mixture (M1), a different mechanism
    (docs/privacy.md section 8b), and a ``Decoder`` refuses them unless built for an experiment.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if not (isinstance(self.max_tokens, int) and self.max_tokens >= 1):
            raise ValueError("max_tokens must be an integer >= 1")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError("temperature must be > 0")
        if not (0 < self.top_p <= 1):
            raise ValueError("top_p must lie in (0, 1]")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError("top_k must be an integer >= 0")

    @property
    def covered(self) -> bool:
        """Whether the guarantee covers tokens sampled this way: the distribution as released."""
        return self.temperature == 1.0 and self.top_p == 1.0 and self.top_k == 0


@dataclass(frozen=True)
class Token:
    id: int
    public_only: bool = False  # sampled from the public model alone (after the budget ran out)


_END = object()


class Stream:
    """A request's tokens, produced by the engine's thread and consumed by one reader: blocking
    iteration, or ``async for`` when the stream was made with the reader's event loop (the
    engine then hands each item over with ``loop.call_soon_threadsafe``, no thread per reader).
    ``finish_reason`` is set when the stream ends; ``cancel()`` (client gone) makes the engine
    drop the request at its next step."""

    def __init__(self, prompt_tokens: int, loop: asyncio.AbstractEventLoop | None = None):
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: FinishReason | None = None
        self.error: str | None = None
        self._loop = loop
        self._q: queue.Queue | asyncio.Queue = asyncio.Queue() if loop is not None else queue.Queue()
        self._cancelled = threading.Event()
        self._done_lock = threading.Lock()
        self._callbacks: list = []

    def add_done_callback(self, fn) -> None:
        """Call ``fn()`` once the stream has ended (at once if it has; else in the engine's thread,
        after the last token was counted): what the engine charged is final then."""
        with self._done_lock:
            if self.finish_reason is None:
                self._callbacks.append(fn)
                return
        fn()

    # ---- engine side
    def _push(self, item: object) -> None:
        if self._loop is None:
            self._q.put(item)
        else:
            try:
                self._loop.call_soon_threadsafe(self._q.put_nowait, item)
            except RuntimeError:  # the reader's loop is closed: nobody is listening
                self._cancelled.set()

    def put(self, token: Token) -> None:
        self.completion_tokens += 1
        self._push(token)

    def finish(self, reason: FinishReason, error: str | None = None) -> None:
        with self._done_lock:
            if self.finish_reason is not None:
                return
            self.finish_reason, self.error = reason, error
            callbacks, self._callbacks = self._callbacks, []
        self._push(_END)
        for fn in callbacks:
            fn()

    # ---- client side
    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def __iter__(self) -> Iterator[Token]:
        if self._loop is not None:
            raise TypeError("this stream was made for an event loop: use `async for`")
        while True:
            item = self._q.get()
            if item is _END:
                return
            yield item

    async def __aiter__(self) -> AsyncIterator[Token]:
        if self._loop is None:
            raise TypeError("this stream was made without an event loop: iterate it blocking")
        while True:
            item = await self._q.get()
            if item is _END:
                return
            yield item
