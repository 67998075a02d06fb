"""PostgresStore: asyncpg pool for real deployments; nodes sharing the database hear each other's
alerts, presence and head changes through LISTEN/NOTIFY."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
from contextlib import asynccontextmanager
from functools import lru_cache
from typing import Any, AsyncIterator, Sequence

import asyncpg

from proctor.storage import validate as v
from proctor.storage.base import Conflict, InvalidData, NotFound, StoreError, StoreUnavailable
from proctor.storage.sql import Connection, Row, SqlStore, load_migrations

logger = logging.getLogger(__name__)

_CHANNEL_PREFIX = "proctor_"
# Any of these means the server is down, restarting or unreachable: the write may be retried later.
_UNAVAILABLE = (OSError, asyncio.TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                asyncpg.OperatorInterventionError, asyncpg.InsufficientResourcesError,
                # Passing states, worth retrying rather than dropping the write: a failover left this node on
                # a read-only standby, a lock timeout, a deadlock or serialization conflict (rolled back).
                asyncpg.ReadOnlySQLTransactionError, asyncpg.LockNotAvailableError,
                asyncpg.TransactionRollbackError)
_MIGRATION_LOCK = 0x70726F63  # "proc": one node migrates at a time


@lru_cache(maxsize=512)
def _placeholders(sql: str) -> str:
    """The shared SQL's `?` placeholders as PostgreSQL's $1, $2, ..."""
    counter = iter(range(1, 1000))
    return re.sub(r"\?", lambda _: f"${next(counter)}", sql)


def _count(status: str) -> int:
    """Rows changed, from a command status such as 'DELETE 5' or 'INSERT 0 1'."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


class _Conn:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return await self._conn.fetch(_placeholders(sql), *args)

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        return await self._conn.fetchrow(_placeholders(sql), *args)

    async def execute(self, sql: str, *args: Any) -> int:
        return _count(await self._conn.execute(_placeholders(sql), *args))


class PostgresStore(SqlStore):
    dialect = "postgres"

    def __init__(self, pool: asyncpg.Pool, dsn: str) -> None:
        super().__init__()
        self._pool = pool
        self._dsn = dsn
        self._listen_task: asyncio.Task | None = None
        self._listening = asyncio.Event()

    @classmethod
    async def open(cls, dsn: str, min_size: int = 1, max_size: int = 10) -> "PostgresStore":
        try:
            pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size, timeout=10,
                                             command_timeout=60)
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"cannot connect to PostgreSQL at {_redact(dsn)}: {exc}") from None
        except asyncpg.PostgresError as exc:  # wrong password, unknown database, ...
            raise StoreUnavailable(f"PostgreSQL at {_redact(dsn)} refused the connection: {exc}") from None
        return cls(pool, dsn)

    async def close(self) -> None:
        self._closed = True
        if self._listen_task is not None:
            self._listen_task.cancel()
            await asyncio.gather(self._listen_task, return_exceptions=True)
        await self._cancel_dispatch()
        await self._pool.close()

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Connection]:
        self._check_open()
        with _mapped_errors():
            async with self._pool.acquire() as conn:
                yield _Conn(conn)

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Connection]:
        self._check_open()
        with _mapped_errors():
            async with self._pool.acquire() as conn:
                # Named, not the database's default_transaction_isolation: the store's transactions are written
                # for READ COMMITTED (a sample count taken after waiting on its lock must see the writes that
                # lock waited for; under REPEATABLE READ its snapshot predates the wait and the cap leaks).
                async with conn.transaction(isolation="read_committed"):
                    yield _Conn(conn)

    async def _lock_name(self, c: Connection, name: str) -> None:
        # Released at commit or rollback; hashtext's 32 bits may let two names share a lock (they then wait
        # for each other, which costs a moment, never correctness).
        await c.fetch("SELECT pg_advisory_xact_lock(hashtext(?))", name)

    def _ts(self, value: dt.datetime | None) -> Any:
        return value

    def _dt(self, raw: Any) -> dt.datetime | None:
        return None if raw is None else raw.astimezone(dt.timezone.utc)

    async def ping(self) -> None:
        async with self._connection() as c:
            await c.fetch("SELECT 1")

    async def migrate(self) -> list[int]:
        migrations = load_migrations("postgres")
        applied_now: list[int] = []
        with _mapped_errors():
            async with self._pool.acquire() as conn:
                async with conn.transaction():
                    # Several nodes may start at once: the lock makes them migrate one after another.
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
                    await conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY "
                                       "KEY, name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL)")
                    done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
                    known = {m.version for m in migrations}
                    if done - known:
                        raise StoreError(f"database has schema version(s) {sorted(done - known)} that this "
                                         "proctor does not know: it was made by a newer version")
                    for m in migrations:
                        if m.version in done:
                            continue
                        logger.info("applying PostgreSQL migration %04d_%s", m.version, m.name)
                        try:
                            await conn.execute(m.sql)
                        except asyncpg.PostgresError as exc:
                            if isinstance(exc, _UNAVAILABLE):
                                raise
                            raise StoreError(f"PostgreSQL migration {m.version:04d}_{m.name} failed: "
                                             f"{exc}") from None
                        await conn.execute("INSERT INTO schema_migrations VALUES ($1, $2, now())",
                                           m.version, m.name)
                        applied_now.append(m.version)
        return applied_now

    async def _applied_versions(self) -> set[int]:
        async with self._connection() as c:
            if (await c.fetchrow("SELECT to_regclass('schema_migrations') AS t"))["t"] is None:
                return set()
            return {r["version"] for r in await c.fetch("SELECT version FROM schema_migrations")}

    async def _reclaim(self, tables: Sequence[str]) -> None:
        # DELETE only marks rows dead; VACUUM FULL rewrites the tables so purged evidence leaves the disk.
        # It locks each table briefly: the write-behind queue holds alerts and events meanwhile.
        with _mapped_errors():
            async with self._pool.acquire() as conn:
                for table in tables:
                    # Far longer than command_timeout: a big table takes a while to rewrite.
                    await conn.execute(f"VACUUM FULL {table}", timeout=3600)

    # notifications -------------------------------------------------------------------------------

    async def _notify(self, channel: str, text: str) -> None:
        async with self._connection() as c:
            await c.execute("SELECT pg_notify(?, ?)", _CHANNEL_PREFIX + channel, text)

    async def subscribe(self, listener: Any) -> None:
        """Add a listener; the first one starts the LISTEN connection (waits briefly for it)."""
        await super().subscribe(listener)
        if self._listen_task is None:
            self._listen_task = asyncio.get_running_loop().create_task(self._listen_forever())
            try:
                await asyncio.wait_for(asyncio.shield(self._listening.wait()), timeout=10)
            except asyncio.TimeoutError:
                logger.error("LISTEN connection to PostgreSQL not up yet; still trying in the background")

    @property
    def listening(self) -> bool:
        """True while the LISTEN connection is up."""
        return self._listening.is_set()

    def _on_notification(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        self._dispatch(channel[len(_CHANNEL_PREFIX):], payload)

    async def _listen_forever(self) -> None:
        """Hold a dedicated LISTEN connection; reconnect with backoff whenever it is lost."""
        delay = 0.2
        first = True
        while not self._closed:
            lost = asyncio.Event()
            conn = None
            try:
                conn = await asyncpg.connect(self._dsn, timeout=10)
                conn.add_termination_listener(lambda _c: lost.set())
                for channel in v.CHANNELS:
                    await conn.add_listener(_CHANNEL_PREFIX + channel, self._on_notification)
                self._listening.set()
                delay = 0.2
                if not first:
                    logger.warning("LISTEN connection to PostgreSQL restored")
                    # Notifications sent while it was down are lost: subscribers reload their heads and check
                    # the exams and accounts they hold sockets for (ended, deactivated meanwhile).
                    self._dispatch("heads", '{"reload": true, "node": null}')
                    self._dispatch("exam", '{"resync": true, "node": null}')
                    self._dispatch("user", '{"resync": true, "node": null}')
                first = False
                while not lost.is_set():
                    # The termination listener is not called when the socket just dies: probe it.
                    try:
                        await asyncio.wait_for(lost.wait(), timeout=2.0)
                    except asyncio.TimeoutError:
                        if conn.is_closed():
                            break
                        await conn.execute("SELECT 1", timeout=5)
            except asyncio.CancelledError:
                raise
            except (*_UNAVAILABLE, asyncpg.PostgresError) as exc:
                if self._listening.is_set() or first:
                    logger.error("LISTEN connection to PostgreSQL lost: %s; reconnecting", exc)
            except Exception:
                # Whatever happened, cross-node events must keep flowing: log it and reconnect.
                logger.exception("LISTEN connection to PostgreSQL failed; reconnecting")
            finally:
                self._listening.clear()
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            if self._closed:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def _redact(dsn: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", dsn)


class _mapped_errors:
    """Turn asyncpg errors into the store's exceptions."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or isinstance(exc, StoreError):
            return False
        if isinstance(exc, asyncpg.UniqueViolationError):
            raise Conflict(f"already exists ({exc.detail or exc})") from None
        if isinstance(exc, asyncpg.ForeignKeyViolationError):
            raise NotFound("a referenced exam, user or head does not exist") from None
        if isinstance(exc, (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError)):
            raise InvalidData(f"refused by the database: {exc}") from None
        if isinstance(exc, _UNAVAILABLE):
            raise StoreUnavailable(f"PostgreSQL unavailable: {type(exc).__name__}: {exc}") from None
        return False
