"""The dynamic batcher: texts of concurrent requests gathered into model calls, results routed back.

A request's texts wait in one bounded FIFO queue. One task takes them out in batches: a batch leaves
when it holds `max_batch_size` texts, or when its oldest text has waited `max_wait_s`; while one batch
runs, the next gathers, so under load batches fill without waiting. The model runs in one worker
thread, off the event loop (onnxruntime spreads each call over the cores itself), and the `Predictor`
sorts each batch's texts by length so that similar lengths are padded together. Other work on the
model (an explanation) runs on the same thread through `run_alone`, between batches, never beside one.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Result = TypeVar("Result")
Value = TypeVar("Value")


class QueueFull(Exception):
    """The queue has no room for a request's texts now; the client should retry later."""


class ShuttingDown(Exception):
    """The batcher no longer takes requests."""


class DeadlineExceeded(Exception):
    """A request was not answered within its deadline; its texts left the queue."""


@dataclass(eq=False)
class _Piece:
    """Up to `max_batch_size` consecutive texts of one request; a request has one piece or more."""

    texts: Sequence[str]
    future: asyncio.Future
    enqueued: float
    withdrawn: bool = field(default=False)  # its request gave up before the piece ran
    running: bool = field(default=False)


@dataclass(frozen=True)
class BatchRecord:
    """What the batcher reports about each model call."""

    texts: int
    seconds: float


class Batcher(Generic[Result]):
    def __init__(
        self,
        predict: Callable[[list[str]], list[Result]],
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        on_batch: Callable[[BatchRecord], None] = lambda record: None,
    ) -> None:
        """Gather texts for `predict`, which maps a list of texts to one result per text.

        Args:
            predict: the model call; it runs in the batcher's worker thread.
            max_batch_size: most texts per batch (one call of `predict`).
            max_wait_s: longest time the oldest queued text waits for a batch to fill.
            max_queue: most texts waiting at once; beyond it `submit` raises `QueueFull`.
            on_batch: called on the event loop after each model call.
        """
        self.predict = predict
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.queued_texts = 0
        self._queue: deque[_Piece] = deque()
        self._arrived = asyncio.Event()
        self._closing = False
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nlprnn-model")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._dispatch(), name="nlprnn-batcher")

    async def classify(self, texts: Sequence[str], timeout_s: float) -> list[Result]:
        """One result per text, in order; raises QueueFull, ShuttingDown or DeadlineExceeded."""
        if self._closing:
            raise ShuttingDown
        if self.queued_texts + len(texts) > self.max_queue:
            raise QueueFull
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        pieces = [
            _Piece(texts[start : start + self.max_batch_size], loop.create_future(), now)
            for start in range(0, len(texts), self.max_batch_size)
        ]
        self._queue.extend(pieces)
        self.queued_texts += len(texts)
        self._arrived.set()
        try:
            parts = await asyncio.wait_for(asyncio.gather(*(piece.future for piece in pieces)), timeout_s)
        except asyncio.TimeoutError:
            for piece in pieces:
                self._withdraw(piece)
            raise DeadlineExceeded from None
        return [result for part in parts for result in part]

    async def run_alone(self, fn: Callable[..., Value], *args: object, cost: int, timeout_s: float) -> Value:
        """`fn(*args)` on the model's thread, after the batch running now and before the next one.

        It takes `cost` places in the queue from submission until it has finished (past its deadline
        too, as a call that has started cannot be stopped), so together with the queued texts it stays
        within `max_queue`; raises QueueFull, ShuttingDown or DeadlineExceeded like `classify`.
        """
        if self._closing:
            raise ShuttingDown
        if self.queued_texts + cost > self.max_queue:
            raise QueueFull
        loop = asyncio.get_running_loop()
        self.queued_texts += cost

        def release(_: Future) -> None:  # runs on the worker thread, or here when cancelled before it started
            try:
                loop.call_soon_threadsafe(self._release, cost)
            except RuntimeError:  # the loop has closed: nothing is counted any more
                pass

        job = self._worker.submit(fn, *args)
        job.add_done_callback(release)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(job), timeout_s)
        except asyncio.TimeoutError:  # a job that has not started is cancelled with its wrapper and frees its places
            raise DeadlineExceeded from None

    def _release(self, cost: int) -> None:
        self.queued_texts -= cost

    async def close(self) -> None:
        """Answer every queued text, then stop the worker; later requests get ShuttingDown."""
        self._closing = True
        self._arrived.set()
        if self._task is not None:
            await self._task
        self._worker.shutdown(wait=True)

    def _withdraw(self, piece: _Piece) -> None:
        """Take a piece out of the queue, or out of the batch gathering; a running one just finishes."""
        piece.future.cancel()
        if piece.withdrawn or piece.running:
            return
        piece.withdrawn = True
        self.queued_texts -= len(piece.texts)
        if piece in self._queue:
            self._queue.remove(piece)

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while (batch := await self._next_batch()) is not None:
            if not batch:  # every request in it gave up while it gathered
                continue
            texts = [text for piece in batch for text in piece.texts]
            started = time.monotonic()
            try:
                results = await loop.run_in_executor(self._worker, self.predict, texts)
            except Exception as err:  # a failed model call fails its requests, not the server
                for piece in batch:
                    if not piece.future.done():
                        piece.future.set_exception(err)
                continue
            self.on_batch(BatchRecord(len(texts), time.monotonic() - started))
            offset = 0
            for piece in batch:
                if not piece.future.done():  # a request past its deadline has given up on its result
                    piece.future.set_result(results[offset : offset + len(piece.texts)])
                offset += len(piece.texts)

    async def _next_batch(self) -> list[_Piece] | None:
        """The next batch to run, taken off the queue; None once closing and nothing is left."""
        while not self._queue:
            if self._closing:
                return None
            self._arrived.clear()
            await self._arrived.wait()
        batch: list[_Piece] = []
        size = 0
        leave_at = self._queue[0].enqueued + self.max_wait_s
        while size < self.max_batch_size:  # a full batch leaves at once, without waiting out max_wait_s
            if self._queue:
                if size + len(self._queue[0].texts) > self.max_batch_size:
                    break
                piece = self._queue.popleft()
                batch.append(piece)
                size += len(piece.texts)
                continue
            wait = leave_at - time.monotonic()
            if wait <= 0 or self._closing:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), wait)
            except asyncio.TimeoutError:
                break
        batch = [piece for piece in batch if not piece.withdrawn]
        for piece in batch:
            piece.running = True
            self.queued_texts -= len(piece.texts)
        return batch
