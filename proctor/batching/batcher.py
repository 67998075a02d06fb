"""DynamicBatcher: stacks frames of many sessions into one model batch.

No torch here: `prepare` (decode) and `infer` (the model) are plain callables run in
executors, so the batching rules are tested fast and exactly. `prepare` may be None when items
arrive ready for the model (the server decodes each frame once, on arrival, for change detection).

Rules:
- bounded queue, at most one pending frame per key (session): a newer frame replaces the
  queued one (latest frame wins) and the older frame's future fails with Replaced; a frame
  already decoded and waiting for the model is classified (dropping it would waste its decode
  and its place in the batch: under overload that halved the batches), so a session has at
  most one frame queued, one decoded and one in the model;
- a batch closes at max_batch frames, or max_wait after its first frame; while every worker is
  still busy with a batch the next one keeps filling, so batches grow under load;
- decode of the next batch overlaps inference of the current one; with `infer_workers` > 1 that
  many batches are in the model at once (the CPU engine runs one single-threaded batch per core);
- every future handed out is resolved or failed exactly once; frames whose future was
  cancelled (session gone) are skipped; outputs are checked against inputs in length, and an
  exception in place of a frame's result fails that frame alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Hashable, Sequence, TypeVar

from proctor.metrics import Metrics

logger = logging.getLogger(__name__)

T = TypeVar("T")  # what is submitted (JPEG bytes)
P = TypeVar("P")  # what prepare makes of it (decoded pixels)
R = TypeVar("R")  # one result per frame


class BatcherError(Exception):
    pass


class QueueFull(BatcherError):
    """The queue holds max_queue frames already: the frame is refused, nothing blocks."""


class Replaced(BatcherError):
    """A newer frame of the same session took this frame's place in the queue."""


class BatcherClosed(BatcherError):
    """The batcher is shutting down."""


@dataclass(eq=False)
class _Entry:
    key: Hashable
    item: Any
    future: asyncio.Future
    enqueued_at: float
    prepared: Any = None
    started_at: float = field(default=0.0)


class DynamicBatcher(Generic[T, P, R]):
    def __init__(self, *, prepare: Callable[[T], P] | None, infer: Callable[[list[P]], Sequence[R]],
                 decode_executor: Executor, infer_executor: Executor, max_batch: int,
                 max_wait_s: float, max_queue: int, decode_chunks: int = 2, infer_workers: int = 1,
                 metrics: Metrics | None = None) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0 or infer_workers < 1:
            raise ValueError("max_batch, max_queue and infer_workers must be >= 1 and max_wait_s >= 0")
        self._prepare = prepare
        self._infer = infer
        self._decode_executor = decode_executor
        self._infer_executor = infer_executor
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._decode_chunks = max(1, decode_chunks)
        # Batches in the model at once; infer_executor needs at least this many threads.
        self.infer_workers = infer_workers
        self._metrics = metrics
        # Insertion-ordered: replacing a key's frame keeps its place, so no session jumps the line.
        self._pending: dict[Hashable, _Entry] = {}
        self._arrived = asyncio.Event()
        self._stage: asyncio.Queue[list[_Entry]] = asyncio.Queue(maxsize=1)
        self._stage_taken = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        # Entries taken from the queue and not yet answered (decoding, staged or in the model).
        self._in_flight: set[_Entry] = set()
        self._closed = False
        self.batches_run = 0

    @property
    def depth(self) -> int:
        return len(self._pending)

    @property
    def taken(self) -> int:
        """Frames taken from the queue and not answered yet (being prepared, staged or in the model)."""
        return len(self._in_flight)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._collect_loop(), name="batcher-collect")]
        self._tasks += [asyncio.create_task(self._infer_loop(), name=f"batcher-infer-{i}")
                        for i in range(self.infer_workers)]

    async def close(self) -> None:
        """Stop, fail every frame still waiting with BatcherClosed, and await the loops."""
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._tasks = []
        for entry in [*self._pending.values(), *self._in_flight]:
            _fail(entry, BatcherClosed("server is shutting down"))
        self._pending.clear()
        self._in_flight.clear()
        self._update_depth()

    def submit(self, key: Hashable, item: T) -> asyncio.Future:
        """Queue a frame and return its future at once; raises QueueFull or BatcherClosed."""
        if self._closed:
            raise BatcherClosed("server is shutting down")
        loop = asyncio.get_running_loop()
        previous = self._pending.get(key)
        if previous is None and len(self._pending) >= self.max_queue:
            raise QueueFull(f"{len(self._pending)} frames are queued (limit {self.max_queue})")
        entry = _Entry(key, item, loop.create_future(), loop.time())
        if previous is not None:
            _fail(previous, Replaced("a newer frame of this session replaced it"))
        self._pending[key] = entry
        self._update_depth()
        self._arrived.set()
        return entry.future

    # -- stage 1: collect a batch and decode it -------------------------------------------------

    async def _collect_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wait_for_batch(loop)
            batch = self._take()
            if not batch:
                continue
            await self._decode(batch, loop)
            self._in_flight.difference_update(entry for entry in batch if entry.future.done())
            batch = [entry for entry in batch if not entry.future.done()]
            if batch:
                await self._stage.put(batch)

    async def _wait_for_batch(self, loop: asyncio.AbstractEventLoop) -> None:
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        first = next(iter(self._pending.values()))
        deadline = first.enqueued_at + self.max_wait_s
        while len(self._pending) < self.max_batch:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                break
        # The model is still busy with a decoded batch: keep filling instead of closing a small one.
        while self._stage.full() and len(self._pending) < self.max_batch:
            self._arrived.clear()
            self._stage_taken.clear()
            waiters = [asyncio.ensure_future(self._arrived.wait()),
                       asyncio.ensure_future(self._stage_taken.wait())]
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()

    def _take(self) -> list[_Entry]:
        batch: list[_Entry] = []
        while self._pending and len(batch) < self.max_batch:
            key = next(iter(self._pending))
            entry = self._pending.pop(key)
            if entry.future.done():  # cancelled: the session went away
                continue
            batch.append(entry)
            self._in_flight.add(entry)
        self._update_depth()
        return batch

    async def _decode(self, batch: list[_Entry], loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for entry in batch:
            entry.started_at = now
            if self._metrics is not None:
                self._metrics.queue_wait_seconds.observe(now - entry.enqueued_at)
        if self._prepare is None:  # ready as submitted: no hop through the decode threads
            for entry in batch:
                entry.prepared = entry.item
            return
        size = -(-len(batch) // self._decode_chunks)
        chunks = [batch[i:i + size] for i in range(0, len(batch), size)]
        await asyncio.gather(*(loop.run_in_executor(self._decode_executor, self._decode_chunk, chunk)
                               for chunk in chunks))
        for entry in batch:
            if isinstance(entry.prepared, BaseException):
                _fail(entry, entry.prepared)
                self._in_flight.discard(entry)

    def _decode_chunk(self, chunk: list[_Entry]) -> None:
        # Runs in a decode thread: only touches the entries' `prepared` slots, never the futures.
        for entry in chunk:
            started = time.perf_counter()
            try:
                entry.prepared = self._prepare(entry.item)
            except Exception as exc:  # a bad frame fails alone, the batch goes on
                entry.prepared = exc
            if self._metrics is not None:
                self._metrics.decode_seconds.observe(time.perf_counter() - started)

    # -- stage 2: run the model -----------------------------------------------------------------

    async def _infer_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._stage.get()
            self._stage_taken.set()
            self._in_flight.difference_update(entry for entry in batch if entry.future.done())
            batch = [entry for entry in batch if not entry.future.done()]
            if not batch:
                continue
            started = loop.time()
            try:
                results = await loop.run_in_executor(self._infer_executor, self._infer,
                                                     [entry.prepared for entry in batch])
                if len(results) != len(batch):
                    raise BatcherError(f"model returned {len(results)} results for {len(batch)} frames")
            except Exception as exc:
                logger.exception("inference failed for a batch of %d frames", len(batch))
                for entry in batch:
                    _fail(entry, exc)
                self._in_flight.difference_update(batch)
                continue
            finally:
                for entry in batch:
                    entry.prepared = None  # free the pixels now, not when the future is collected
            # (On cancellation the entries stay in flight: close() fails them.)
            self._in_flight.difference_update(batch)
            self.batches_run += 1
            if self._metrics is not None:
                self._metrics.batch_size.observe(len(batch))
                self._metrics.inference_seconds.observe(loop.time() - started)
                self._metrics.frames_classified.inc(len(batch))
            for entry, result in zip(batch, results):
                if isinstance(result, BaseException):  # infer may fail single frames of a batch
                    _fail(entry, result)
                elif not entry.future.done():
                    entry.future.set_result(result)

    def _update_depth(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.set(len(self._pending))


def _fail(entry: _Entry, exc: BaseException) -> None:
    if not entry.future.done():
        entry.future.set_exception(exc)
        # The session may be gone and never look: mark the exception as retrieved.
        entry.future.exception()
