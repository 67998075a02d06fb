"""WriteBehind: bounded, ordered, retried through outages (including a real PostgreSQL restart)."""

from __future__ import annotations

import asyncio
import logging
import uuid

import pytest

from proctor.metrics import Metrics
from proctor.storage import open_store
from proctor.storage.base import InvalidData, SessionEvent, StoreUnavailable, utcnow
from proctor.storage.writer import WriteBehind, WriteQueueClosed, WriteQueueFull
from test_storage import alert, setup_exam


def value(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


class FlakyOps:
    """Operations that record themselves once they succeed, failing `failures` times first."""

    def __init__(self) -> None:
        self.done: list[int] = []
        self.attempts = 0

    def op(self, n: int, failures: int = 0, error: Exception | None = None):
        left = [failures]

        async def run() -> None:
            self.attempts += 1
            if left[0] > 0:
                left[0] -= 1
                raise error or StoreUnavailable("database down (test)")
            self.done.append(n)
        return run


async def test_full_queue_refuses_loudly(caplog):
    metrics = Metrics()
    writer = WriteBehind(store=None, metrics=metrics, maxsize=2)  # not started: nothing drains
    ops = FlakyOps()
    writer.submit(ops.op(1), "one")
    writer.submit(ops.op(2), "two")
    with caplog.at_level(logging.ERROR, logger="proctor.storage.writer"):
        for _ in range(3):
            with pytest.raises(WriteQueueFull, match="full \\(2 writes, 0 bytes waiting\\): three refused"):
                writer.submit(ops.op(3), "three")
    assert writer.refused == 3 and value(metrics, "proctor_store_writes_refused_total") == 3
    assert value(metrics, "proctor_store_write_queue_depth") == 2
    # Rate-limited: one loud line for the burst, not one per refusal.
    assert len([r for r in caplog.records if "FULL" in r.getMessage()]) == 1
    await writer.close(timeout=5)
    assert ops.done == [1, 2]


async def test_the_queue_is_bounded_in_bytes_and_keeps_room_for_alerts_over_presence_notices():
    # The database is down for long: alerts hold their evidence JPEGs, presence notices pile up.
    writer = WriteBehind(store=None, metrics=Metrics(), maxsize=10, max_bytes=10**6)  # not started: nothing drains
    ops = FlakyOps()
    for n in range(5):  # optional writes (presence notices for other nodes) take half the queue at most
        writer.submit(ops.op(n), "presence", optional=True)
    with pytest.raises(WriteQueueFull):
        writer.submit(ops.op(5), "presence", optional=True)
    for n in range(6, 11):  # alerts still have the rest
        writer.submit(ops.op(n), f"alert {n}")
    with pytest.raises(WriteQueueFull, match="10 writes, 0 bytes waiting"):
        writer.submit(ops.op(11), "alert 11")
    await writer.close(timeout=5)
    assert ops.done == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]

    writer = WriteBehind(store=None, metrics=Metrics(), maxsize=100, max_bytes=1000)  # bytes run out first
    ops = FlakyOps()
    writer.submit(ops.op(1), "alert 1", size=400)
    with pytest.raises(WriteQueueFull):
        writer.submit(ops.op(2), "presence", size=200, optional=True)  # over half of the bytes
    writer.submit(ops.op(3), "presence", size=100, optional=True)  # within half
    with pytest.raises(WriteQueueFull, match="2 writes, 500 bytes waiting"):
        writer.submit(ops.op(4), "alert 2", size=501)  # 1001 bytes: over the budget
    writer.submit(ops.op(5), "alert 3", size=500)  # exactly the budget
    assert writer.depth == 3 and writer.refused == 2
    await writer.close(timeout=5)
    assert ops.done == [1, 3, 5] and writer._bytes == 0


async def test_order_kept_and_nothing_lost_through_retries():
    metrics = Metrics()
    writer = WriteBehind(store=None, metrics=metrics, maxsize=1000, retry_initial_s=0.001, retry_max_s=0.01)
    writer.start()
    ops = FlakyOps()
    for n in range(50):
        writer.submit(ops.op(n, failures=3 if n % 10 == 0 else 0), f"op {n}")
    assert await writer.flush(timeout=10)
    assert ops.done == list(range(50))
    assert value(metrics, "proctor_store_errors_total") == 15  # 5 flaky ops x 3 failures
    assert value(metrics, "proctor_store_write_queue_depth") == 0
    await writer.close()


async def test_connection_errors_are_retried_too():
    writer = WriteBehind(store=None, metrics=Metrics(), retry_initial_s=0.001)
    writer.start()
    ops = FlakyOps()
    writer.submit(ops.op(1, failures=2, error=ConnectionResetError("reset")))
    writer.submit(ops.op(2, failures=1, error=asyncio.TimeoutError()))
    await writer.close(timeout=5)
    assert ops.done == [1, 2] and ops.attempts == 5


async def test_invalid_write_is_logged_and_the_rest_goes_on(caplog):
    writer = WriteBehind(store=None, metrics=Metrics(), retry_initial_s=0.001)
    writer.start()
    ops = FlakyOps()
    with caplog.at_level(logging.ERROR, logger="proctor.storage.writer"):
        writer.submit(ops.op(1))
        writer.submit(ops.op(2, failures=99, error=InvalidData("corrupt evidence")), "bad alert")
        writer.submit(ops.op(3))
        await writer.close(timeout=5)
    assert ops.done == [1, 3] and writer.rejected == 1
    assert any("bad alert" in r.getMessage() and "corrupt evidence" in r.getMessage() for r in caplog.records)


async def test_close_drains_then_refuses():
    writer = WriteBehind(store=None, metrics=Metrics())
    writer.start()
    ops = FlakyOps()
    slow = asyncio.Event()

    async def waits() -> None:
        await slow.wait()
        ops.done.append(0)
    writer.submit(waits)
    writer.submit(ops.op(1))
    closing = asyncio.create_task(writer.close(timeout=5))
    await asyncio.sleep(0.05)
    with pytest.raises(WriteQueueClosed):
        writer.submit(ops.op(2))
    slow.set()
    await closing
    assert ops.done == [0, 1]


async def test_close_gives_up_after_timeout_and_says_so(caplog):
    writer = WriteBehind(store=None, metrics=Metrics(), retry_initial_s=0.01, retry_max_s=0.01)
    writer.start()
    ops = FlakyOps()
    writer.submit(ops.op(1, failures=10_000), "doomed")
    with caplog.at_level(logging.ERROR, logger="proctor.storage.writer"):
        await writer.close(timeout=0.2)
    assert any("1 writes NOT applied" in r.getMessage() for r in caplog.records)


async def test_with_sqlite_store(tmp_path):
    store = await open_store(f"sqlite:///{tmp_path}/w.db")
    await store.migrate()
    _, student, exam = await setup_exam(store)
    writer = WriteBehind(store, Metrics())
    writer.start()
    alerts = [alert(exam.id, student.id) for _ in range(20)]
    for a in alerts:
        writer.add_alert(a)
        writer.close_alert(a.id, utcnow())
    writer.add_event(SessionEvent(exam.id, student.id, "connect", utcnow()))
    await writer.close()
    stored = await store.list_alerts(exam.id, with_evidence=False)
    assert sorted(a.id for a in stored) == sorted(a.id for a in alerts)
    assert all(a.closed_at is not None for a in stored)
    assert len(await store.list_events(exam.id)) == 1
    await store.close()


@pytest.mark.postgres
async def test_postgres_stopped_mid_stream_loses_nothing(postgres_server):
    store = await open_store(await postgres_server.new_database())
    await store.migrate()
    _, student, exam = await setup_exam(store)
    metrics = Metrics()
    writer = WriteBehind(store, metrics, retry_initial_s=0.05, retry_max_s=0.5)
    writer.start()
    ids: list[str] = []
    try:
        for n in range(150):
            if n == 50:
                await asyncio.to_thread(postgres_server.stop)
            if n == 100:
                assert writer.depth > 0  # the outage really held writes back
                await asyncio.to_thread(postgres_server.start)
            a = alert(exam.id, student.id, id=uuid.uuid4().hex)
            writer.add_alert(a)  # never blocks, database up or down
            writer.add_event(SessionEvent(exam.id, student.id, "heartbeat_lost", utcnow(), {"n": n}))
            ids.append(a.id)
            await asyncio.sleep(0.005 if n < 50 else 0.01)
        assert await writer.flush(timeout=60), f"{writer.depth} writes still queued"
    finally:
        if not (postgres_server.data / "postmaster.pid").exists():
            await asyncio.to_thread(postgres_server.start)
        await writer.close(timeout=10)
    stored = await store.list_alerts(exam.id, with_evidence=False)
    assert sorted(a.id for a in stored) == sorted(ids)
    events = await store.list_events(exam.id)
    assert [e.detail["n"] for e in events] == list(range(150))
    assert value(metrics, "proctor_store_errors_total") > 0
    await store.close()
