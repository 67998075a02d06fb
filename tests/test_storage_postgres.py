"""PostgreSQL only: notifications between nodes (two stores on one database) and outages."""

from __future__ import annotations

import asyncio

import pytest

from proctor.storage import open_store
from proctor.storage.base import InvalidData, StoreUnavailable
from test_storage import alert, head, jpeg, setup_exam

pytestmark = pytest.mark.postgres


async def received(queue: asyncio.Queue, channel: str, timeout: float = 10.0) -> dict:
    """The next notification on `channel` (others are skipped)."""
    async def wait() -> dict:
        while True:
            got_channel, payload = await queue.get()
            if got_channel == channel:
                return payload
    return await asyncio.wait_for(wait(), timeout)


async def listening_store(url: str) -> tuple[object, asyncio.Queue]:
    store = await open_store(url)
    queue: asyncio.Queue = asyncio.Queue()

    async def listener(channel: str, payload: dict) -> None:
        await queue.put((channel, payload))
    await store.subscribe(listener)
    return store, queue


async def test_two_nodes_hear_each_other(postgres_server):
    url = await postgres_server.new_database()
    node_a = await open_store(url)
    await node_a.migrate()
    node_b, heard_by_b = await listening_store(url)
    try:
        _, student, exam = await setup_exam(node_a)  # adds head "word" on node A
        assert (await received(heard_by_b, "heads"))["name"] == "word"
        a = alert(exam.id, student.id)
        await node_a.add_alert(a)  # as a session does: write, then tell the other nodes
        await node_a.publish("alert", {"id": a.id, "exam_id": exam.id, "node": "hub-a"})
        payload = await received(heard_by_b, "alert")
        assert payload == {"id": a.id, "exam_id": exam.id, "node": "hub-a"}  # the caller's node id is kept
        assert (await node_b.get_alert(payload["id"])).evidence == a.evidence  # B reads it by id
        await node_a.publish("exam", {"id": exam.id, "state": "ended"})
        assert (await received(heard_by_b, "exam")) == {"id": exam.id, "state": "ended", "node": node_a.node_id}
        await node_a.publish("presence", {"exam_id": exam.id, "student_id": student.id, "online": False})
        assert (await received(heard_by_b, "presence"))["online"] is False
        await node_a.set_head_active("word", False)
        assert (await received(heard_by_b, "heads")) == {"name": "word", "active": False,
                                                         "node": node_a.node_id}
    finally:
        await node_a.close()
        await node_b.close()


async def test_listener_reconnects_after_restart_and_asks_for_a_reload(postgres_server):
    url = await postgres_server.new_database()
    node_a = await open_store(url)
    await node_a.migrate()
    node_b, heard_by_b = await listening_store(url)
    try:
        await asyncio.to_thread(postgres_server.stop)
        with pytest.raises(StoreUnavailable, match="PostgreSQL unavailable"):
            await node_a.ping()
        await asyncio.to_thread(postgres_server.start)
        # Notifications sent while B was cut off are lost, so B is told to reload its heads.
        assert (await received(heard_by_b, "heads", timeout=30)) == {"reload": True, "node": None}
        # ...and to check the exams and accounts it holds sockets for (ended or deactivated meanwhile).
        assert (await received(heard_by_b, "exam")) == {"resync": True, "node": None}
        assert (await received(heard_by_b, "user")) == {"resync": True, "node": None}
        await node_a.add_head(head("after-restart"))
        assert (await received(heard_by_b, "heads"))["name"] == "after-restart"
    finally:
        if not (postgres_server.data / "postmaster.pid").exists():
            await asyncio.to_thread(postgres_server.start)
        await node_a.close()
        await node_b.close()


async def test_unreachable_or_refusing_server(postgres_server):
    with pytest.raises(StoreUnavailable, match="refused the connection"):
        await open_store(postgres_server.dsn("no_such_database"))


def files_containing(root, marker: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and marker in p.read_bytes()]


async def test_purged_evidence_leaves_the_table_files(postgres_server):
    """VACUUM FULL after the purge: the JPEG bytes are gone from the table files (the WAL is not checked)."""
    import datetime as dt
    import uuid

    from test_storage import jpeg_with_comment

    url = await postgres_server.new_database()
    store = await open_store(url)
    await store.migrate()
    try:
        _, student, exam = await setup_exam(store)
        await store.set_exam_state(exam.id, "running")
        marker = b"PROCTOR-EVIDENCE-MARKER-" + uuid.uuid4().hex.encode()
        await store.add_alert(alert(exam.id, student.id, evidence=jpeg_with_comment(marker)))
        async with store._connection() as c:
            await c.execute("CHECKPOINT")
        tables = postgres_server.data / "base"
        assert files_containing(tables, marker)  # the check below can see it when it is there
        await store.set_exam_state(exam.id, "ended")
        await asyncio.sleep(0.01)
        assert (await store.purge(dt.timedelta(milliseconds=1))).alerts == 1
        async with store._connection() as c:
            await c.execute("CHECKPOINT")
        assert files_containing(tables, marker) == []
    finally:
        await store.close()


@pytest.mark.parametrize("error", ["ReadOnlySQLTransactionError", "LockNotAvailableError", "DeadlockDetectedError"])
def test_passing_postgres_states_are_unavailable_so_writes_wait_instead_of_being_dropped(error):
    # Before: after a failover to a read-only standby (or a lock timeout, a deadlock) the write-behind
    # queue saw an unexpected error and dropped the write; StoreUnavailable keeps it until the database is back.
    import asyncpg

    from proctor.storage.postgres import _mapped_errors

    with pytest.raises(StoreUnavailable, match=error):
        with _mapped_errors():
            raise getattr(asyncpg, error)("cannot execute INSERT in a read-only transaction")


async def test_an_argument_the_driver_refuses_is_invalid_data_not_an_outage(postgres_server):
    # asyncpg refuses some arguments itself, before the query reaches the server. That is bad data, not an
    # outage: taken for one, such a write would be retried for ever at the head of the write-behind queue.
    store = await open_store(await postgres_server.new_database())
    try:
        with pytest.raises(InvalidData, match="invalid input for query argument"):
            async with store._connection() as c:
                await c.fetchrow("SELECT ?::bigint AS x", "not a number")
    finally:
        await store.close()


async def test_sample_limit_holds_whatever_isolation_the_database_defaults_to(postgres_server):
    """A DBA may set default_transaction_isolation: the store names READ COMMITTED, which its locks rely on."""
    url = await postgres_server.new_database()
    store = await open_store(url + "?default_transaction_isolation=repeatable%20read")
    try:
        await store.migrate()
        async with store._connection() as c:  # the setting did reach the server
            assert (await c.fetchrow("SHOW default_transaction_isolation"))[0] == "repeatable read"
        await store.add_sample("word", jpeg(0), "recorded", limit=5)
        results = await asyncio.gather(*(store.add_sample("word", jpeg(i), "recorded", limit=5)
                                         for i in range(1, 13)), return_exceptions=True)
        assert sum(isinstance(r, int) for r in results) == 4
        assert (await store.count_samples())["word"] == 5
    finally:
        await store.close()
