"""SqliteStore: the embedded default (one file, WAL mode, foreign keys on), for a single node.

One server process per file, but commands (`proctor heads add`, `proctor users deactivate`) run in
processes of their own. SQLite has no LISTEN/NOTIFY, so notifications cross processes through the
`notifications` table: a process where nobody listens (a command) writes what it publishes there, and a
process that listens (the server) reads the new rows every NOTIFY_POLL_S. Inside one process they are
dispatched directly.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import sqlite3
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

import aiosqlite

from proctor.storage.base import Conflict, InvalidData, NotFound, StoreError, StoreUnavailable, utcnow
from proctor.storage.sql import Connection, Row, SqlStore, load_migrations

logger = logging.getLogger(__name__)

_TS_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"  # fixed width, so text order is time order
# How often a listening process looks for notifications other processes left in the table, and how long
# rows are kept (a server that was down reads the state from the tables when it starts, not old rows).
NOTIFY_POLL_S = 1.0
NOTIFY_KEEP = dt.timedelta(hours=1)


class _Conn:
    """The shared Connection interface over one aiosqlite connection."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        async with self._db.execute(sql, args) as cursor:
            return list(await cursor.fetchall())

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        rows = await self.fetch(sql, *args)
        return rows[0] if rows else None

    async def execute(self, sql: str, *args: Any) -> int:
        async with self._db.execute(sql, args) as cursor:
            return cursor.rowcount


class SqliteStore(SqlStore):
    dialect = "sqlite"

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        super().__init__()
        self._db = db
        self.path = path
        # One connection for the whole process: the lock keeps one coroutine's transaction from
        # swallowing another's statements.
        self._lock = asyncio.Lock()
        self._poller: asyncio.Task | None = None

    @classmethod
    async def open(cls, path: str | Path) -> "SqliteStore":
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = await aiosqlite.connect(str(path), isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnavailable(f"cannot open SQLite database {str(path)!r}: {exc}") from None
        db.row_factory = aiosqlite.Row
        try:
            for pragma in ("journal_mode = WAL", "foreign_keys = ON", "busy_timeout = 5000",
                           "synchronous = NORMAL",
                           # Deleted rows (purged evidence) are overwritten with zeros, not left in free pages.
                           "secure_delete = ON"):
                await db.execute(f"PRAGMA {pragma}")
        except sqlite3.DatabaseError as exc:
            await db.close()
            raise StoreUnavailable(f"{str(path)!r} is not a usable SQLite database: {exc}") from None
        return cls(db, path)

    async def close(self) -> None:
        self._closed = True
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None
        await self._cancel_dispatch()
        async with self._lock:
            await self._db.close()

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Connection]:
        self._check_open()
        async with self._lock:
            with _mapped_errors():
                yield _Conn(self._db)

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Connection]:
        self._check_open()
        async with self._lock:
            with _mapped_errors():
                await self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield _Conn(self._db)
                except BaseException:
                    await self._db.execute("ROLLBACK")
                    raise
                await self._db.execute("COMMIT")

    async def _lock_name(self, c: Connection, name: str) -> None:
        pass  # BEGIN IMMEDIATE took the database's one write lock already

    def _ts(self, value: dt.datetime | None) -> Any:
        return None if value is None else value.astimezone(dt.timezone.utc).strftime(_TS_FORMAT)

    def _dt(self, raw: Any) -> dt.datetime | None:
        if raw is None:
            return None
        return dt.datetime.strptime(raw, _TS_FORMAT).replace(tzinfo=dt.timezone.utc)

    async def ping(self) -> None:
        async with self._connection() as c:
            await c.fetch("SELECT 1")

    async def migrate(self) -> list[int]:
        migrations = load_migrations("sqlite")
        applied_now: list[int] = []
        async with self._lock:
            with _mapped_errors():
                await self._db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY "
                                       "KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)")
                async with self._db.execute("SELECT version FROM schema_migrations") as cursor:
                    done = {row[0] for row in await cursor.fetchall()}
                _check_not_newer(done, migrations, self.path)
                for m in migrations:
                    if m.version in done:
                        continue
                    logger.info("applying SQLite migration %04d_%s to %s", m.version, m.name, self.path)
                    # One script, one transaction: a failing migration leaves no half-made schema.
                    stamp = self._ts(dt.datetime.now(dt.timezone.utc))
                    script = (f"BEGIN IMMEDIATE;\n{m.sql}\n;INSERT INTO schema_migrations VALUES "
                              f"({m.version}, '{m.name}', '{stamp}');\nCOMMIT;")
                    try:
                        await self._db.executescript(script)
                    except sqlite3.Error as exc:
                        if self._db.in_transaction:
                            await self._db.execute("ROLLBACK")
                        raise StoreError(f"SQLite migration {m.version:04d}_{m.name} failed: {exc}") from None
                    applied_now.append(m.version)
        return applied_now

    async def _applied_versions(self) -> set[int]:
        async with self._connection() as c:
            if await c.fetchrow("SELECT name FROM sqlite_master WHERE type = 'table' "
                                "AND name = 'schema_migrations'") is None:
                return set()
            return {r["version"] for r in await c.fetch("SELECT version FROM schema_migrations")}

    async def _notify(self, channel: str, text: str) -> None:
        if self._listeners:
            self._dispatch(channel, text)
            return
        # Nobody here listens (a command's process): leave it for the server process.
        now = utcnow()
        async with self._transaction() as c:
            await c.execute("INSERT INTO notifications (channel, payload, at) VALUES (?, ?, ?)",
                            channel, text, self._ts(now))
            await c.execute("DELETE FROM notifications WHERE at < ?", self._ts(now - NOTIFY_KEEP))

    async def subscribe(self, listener: Any) -> None:
        """Add a listener; the first one starts reading what other processes publish from now on."""
        await super().subscribe(listener)
        if self._poller is None:
            async with self._connection() as c:
                row = await c.fetchrow("SELECT COALESCE(MAX(id), 0) AS last FROM notifications")
            last = int(row["last"]) if row is not None else 0
            self._poller = asyncio.get_running_loop().create_task(self._poll_notifications(last))

    async def _poll_notifications(self, last: int) -> None:
        failing = False
        while True:
            await asyncio.sleep(NOTIFY_POLL_S)
            try:
                async with self._connection() as c:
                    rows = await c.fetch("SELECT id, channel, payload FROM notifications WHERE id > ? ORDER BY id",
                                         last)
            except Exception as exc:  # a dead or broken database must not end the polling for good
                if not failing:  # once per outage, not every second
                    logger.warning("cannot read notifications from other processes (retrying): %s", exc)
                failing = True
                continue
            if failing:
                logger.warning("reading notifications from other processes again")
                failing = False
            for row in rows:
                last = int(row["id"])
                self._dispatch(row["channel"], row["payload"])

    async def _reclaim(self, tables: Sequence[str]) -> None:
        # secure_delete zeroed the pages; the checkpoint moves them from the WAL into the file and
        # truncates the WAL, so no copy of the deleted rows is left behind.
        async with self._connection() as c:
            await c.fetch("PRAGMA wal_checkpoint(TRUNCATE)")


def _check_not_newer(done: set[int], migrations: list, where: Any) -> None:
    known = {m.version for m in migrations}
    newer = sorted(done - known)
    if newer:
        raise StoreError(f"database {where} has schema version(s) {newer} that this proctor does not know: "
                         "it was made by a newer version")


class _mapped_errors:
    """Turn sqlite3 errors into the store's exceptions, with messages a user can act on."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or isinstance(exc, StoreError) or not isinstance(exc, sqlite3.Error):
            return False
        message = str(exc)
        if isinstance(exc, sqlite3.IntegrityError):
            if "UNIQUE" in message or "PRIMARY KEY" in message:
                raise Conflict(f"already exists ({message})") from None
            if "FOREIGN KEY" in message:
                raise NotFound("a referenced exam, user or head does not exist") from None
            raise InvalidData(f"refused by the database: {message}") from None
        if isinstance(exc, sqlite3.OperationalError) and (
                "locked" in message or "unable to open" in message or "disk I/O" in message
                or "readonly" in message or "full" in message):
            raise StoreUnavailable(f"SQLite database unavailable: {message}") from None
        if isinstance(exc, (sqlite3.InterfaceError, sqlite3.ProgrammingError)) and "closed" in message:
            raise StoreUnavailable(f"SQLite database closed: {message}") from None
        return False
