"""Storage: the Store protocol (base.py), its SQLite and PostgreSQL implementations, the write-behind queue."""

from __future__ import annotations

from pathlib import Path

from proctor.storage.base import InvalidData, Store


def sqlite_path(url: str) -> Path:
    """The file of a sqlite:/// URL: sqlite:///var/x.db is relative, sqlite:////abs/x.db absolute."""
    path = url[len("sqlite:///"):]
    if not path:
        raise InvalidData(f"database URL {url!r} names no file (example: sqlite:///var/proctor.db)")
    return Path(path)


async def open_store(url: str) -> Store:
    """Connect to the database a URL names; call `await store.migrate()` before use."""
    if url.startswith("sqlite:///"):
        from proctor.storage.sqlite import SqliteStore

        return await SqliteStore.open(sqlite_path(url))
    if url.startswith(("postgresql://", "postgres://")):
        from proctor.storage.postgres import PostgresStore

        return await PostgresStore.open(url)
    raise InvalidData(f"unsupported database URL {url!r}: use sqlite:///path/to/file.db or postgresql://...")


__all__ = ["open_store", "sqlite_path"]
