"""WriteBehind: the frame path hands alerts and session events to a bounded FIFO and never waits on the
database; one worker applies them in order and retries through database outages without losing any."""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from proctor.metrics import Metrics
from proctor.storage.base import Alert, SessionEvent, Store, StoreError, StoreUnavailable

logger = logging.getLogger(__name__)

WriteOp = Callable[[], Awaitable[None]]
# Errors that say "not now" rather than "never": the operation stays at the head of the queue.
_RETRYABLE = (StoreUnavailable, OSError, ConnectionError, asyncio.TimeoutError)
_LOG_EVERY_S = 5.0


class WriteQueueFull(Exception):
    """The write-behind queue holds `maxsize` operations or `max_bytes` already; this one was not accepted."""


class WriteQueueClosed(Exception):
    """The write-behind queue is closing or closed and accepts nothing more."""


@dataclass
class _Pending:
    op: WriteOp
    what: str
    size: int  # bytes the write holds in memory (an alert's evidence JPEG), 0 when small


class _RateLimitedLog:
    """Log at most once per interval, saying how many times it happened meanwhile."""

    def __init__(self, level: int, interval: float = _LOG_EVERY_S) -> None:
        self.level, self.interval = level, interval
        self._last = -interval
        self._suppressed = 0

    def __call__(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            self._suppressed += 1
            return
        extra = f" ({self._suppressed} more since the last message)" if self._suppressed else ""
        logger.log(self.level, message + extra, *args)
        self._last, self._suppressed = now, 0


class WriteBehind:
    """A bounded FIFO of store writes with one worker; accepted writes are applied in order, exactly
    as often as the store's idempotent writes make them (alerts by id, events by student and time)."""

    def __init__(self, store: Store, metrics: Metrics, maxsize: int = 10_000, max_bytes: int = 512 * 2**20, *,
                 retry_initial_s: float = 0.1, retry_max_s: float = 5.0) -> None:
        if maxsize < 1 or max_bytes < 1:
            raise ValueError(f"invalid write-behind maxsize={maxsize!r} or max_bytes={max_bytes!r}: must be >= 1")
        self.store, self.metrics, self.maxsize, self.max_bytes = store, metrics, maxsize, max_bytes
        self._bytes = 0  # held by the queued writes
        self.retry_initial_s, self.retry_max_s = retry_initial_s, retry_max_s
        self._queue: collections.deque[_Pending] = collections.deque()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._worker: asyncio.Task | None = None
        self._closing = False
        self.refused = 0   # submits refused because the queue was full
        self.rejected = 0  # accepted writes the store refused as invalid: logged, cannot ever succeed
        self.applied = 0
        self._log_full = _RateLimitedLog(logging.ERROR)
        self._log_retry = _RateLimitedLog(logging.WARNING)

    @property
    def depth(self) -> int:
        """Writes accepted and not yet applied (including one being retried)."""
        return len(self._queue)

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="store-write-behind")

    def submit(self, op: WriteOp, what: str = "write", size: int = 0, optional: bool = False) -> None:
        """Queue one write (a function that makes the coroutine, so it can be retried); returns at once.

        size: the bytes it holds (an evidence JPEG): through a long outage, memory is what runs out first.
        optional: a write whose loss costs little (a presence notice for other nodes, superseded by the
        next): refused once the queue is half full, so what is left stays for alerts and events.
        """
        if self._closing:
            raise WriteQueueClosed(f"store write queue is closed: {what} not accepted")
        share = 0.5 if optional else 1.0
        if len(self._queue) >= self.maxsize * share or self._bytes + size > self.max_bytes * share:
            self.refused += 1
            self.metrics.store_writes_refused.inc()
            self._log_full("store write queue FULL (%d writes holding %.0f MB waiting, database too slow or "
                           "down): refused %s", len(self._queue), self._bytes / 2**20, what)
            raise WriteQueueFull(f"store write queue is full ({len(self._queue)} writes, {self._bytes} bytes "
                                 f"waiting): {what} refused")
        self._queue.append(_Pending(op, what, size))
        self._bytes += size
        self.metrics.store_write_queue_depth.set(len(self._queue))
        self._idle.clear()
        self._wakeup.set()

    def add_alert(self, alert: Alert) -> None:
        self.submit(lambda: self.store.add_alert(alert), f"alert {alert.id}", len(alert.evidence))

    def close_alert(self, alert_id: str, closed_at: dt.datetime) -> None:
        self.submit(lambda: self.store.close_alert(alert_id, closed_at), f"close of alert {alert_id}")

    def add_event(self, event: SessionEvent) -> None:
        self.submit(lambda: self.store.add_event(event),
                    f"{event.kind} event of student {event.student_id} in exam {event.exam_id}")

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until every accepted write is applied; False when the timeout came first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def close(self, timeout: float = 10.0) -> None:
        """Stop accepting, apply what is queued (up to `timeout`), then stop the worker."""
        self._closing = True
        if self._worker is None:
            self.start()
        drained = await self.flush(timeout)
        if not drained:
            logger.error("store write queue closed with %d writes NOT applied (database unavailable for "
                         "%.0f s at shutdown); first: %s", len(self._queue), timeout,
                         self._queue[0].what if self._queue else "-")
        assert self._worker is not None
        self._worker.cancel()
        await asyncio.gather(self._worker, return_exceptions=True)

    async def _run(self) -> None:
        delay = self.retry_initial_s
        while True:
            if not self._queue:
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            pending = self._queue[0]
            try:
                await pending.op()
            except _RETRYABLE as exc:
                # The write stays at the head: later writes wait behind it, so order is kept.
                self.metrics.store_errors.inc()
                self._log_retry("store unavailable, %d writes held, retrying in %.1f s: %s",
                                len(self._queue), delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)
                continue
            except StoreError as exc:
                self.metrics.store_errors.inc()
                self.rejected += 1
                logger.error("store refused %s, dropped (it can never succeed): %s", pending.what, exc)
            except Exception:
                self.metrics.store_errors.inc()
                self.rejected += 1
                logger.exception("unexpected error writing %s, dropped", pending.what)
            else:
                self.applied += 1
                if delay != self.retry_initial_s:
                    logger.warning("store available again; %d writes waiting", len(self._queue) - 1)
            delay = self.retry_initial_s
            self._bytes -= self._queue.popleft().size
            self.metrics.store_write_queue_depth.set(len(self._queue))
