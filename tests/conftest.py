"""Shared fixtures. A migrated SQLite store per test (`store`, at `sqlite_url`); PostgreSQL: one throw-away
server per test session, a fresh database per test."""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from proctor.storage import open_store


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    """The database URL of the `store` fixture, for a Config that must name the same database."""
    return f"sqlite:///{tmp_path}/test.db"


@pytest.fixture
async def store(sqlite_url):
    """A migrated SQLite store; test files with other stores (test_storage's backends) define their own."""
    s = await open_store(sqlite_url)
    await s.migrate()
    yield s
    await s.close()


def _postgres_bindir() -> Path | None:
    """Debian puts initdb/pg_ctl under /usr/lib/postgresql/<version>/bin, not on PATH; newest first.
    PROCTOR_POSTGRES_BINDIR names another folder (and only that one is tried)."""
    if os.environ.get("PROCTOR_POSTGRES_BINDIR"):
        path = Path(os.environ["PROCTOR_POSTGRES_BINDIR"])
        return path if os.access(path / "initdb", os.X_OK) and os.access(path / "pg_ctl", os.X_OK) else None
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
                        if Path(p).parent.name.isdigit() else 0, reverse=True)
    which = shutil.which("pg_ctl")
    if which:
        candidates.append(str(Path(which).parent))
    for path in candidates:
        if os.access(Path(path) / "initdb", os.X_OK) and os.access(Path(path) / "pg_ctl", os.X_OK):
            return Path(path)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """A PostgreSQL server in a temporary directory on a loopback port, trust auth, for tests only."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="proctor-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = _free_port()
        # initdb refuses to run as root: run the server as the `postgres` user when we are root.
        self._as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as_user:
            shutil.chown(self.root, "postgres", "postgres")
        self._names = itertools.count(1)

    def _run(self, *argv: str) -> None:
        result = subprocess.run([*self._as_user, *argv], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{argv[0]} failed ({result.returncode}): {result.stderr.strip()}\n{log}")

    def init(self) -> None:
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "--no-sync", "-E", "UTF8", "--locale=C")
        self.start()

    def start(self) -> None:
        # Durability settings off: a test server that dies loses nothing anyone needs, and tests run faster.
        options = (f"-p {self.port} -h 127.0.0.1 -k {self.root} -c fsync=off -c synchronous_commit=off "
                   "-c full_page_writes=off -c max_connections=200")
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                  "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    async def new_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        import asyncpg

        name = f"test_{os.getpid()}_{next(self._names)}"
        conn = await asyncpg.connect(self.dsn())
        try:
            # PostgreSQL 15+ copies the template through the WAL by default: a file copy is ~3x faster here.
            strategy = " STRATEGY = FILE_COPY" if conn.get_server_version().major >= 15 else ""
            await conn.execute(f'CREATE DATABASE "{name}"{strategy}')
        finally:
            await conn.close()
        return self.dsn(name)

    def destroy(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server; skipped (visibly) when its binaries are missing, unless CI requires it."""
    bindir = _postgres_bindir()
    if bindir is None:
        reason = ("PostgreSQL binaries (initdb, pg_ctl) not found under /usr/lib/postgresql/*/bin, on PATH "
                  "or in PROCTOR_POSTGRES_BINDIR: apt-get install postgresql")
        if os.environ.get("PROCTOR_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PROCTOR_REQUIRE_POSTGRES=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    server = PostgresServer(bindir)
    try:
        server.init()
        yield server
    finally:
        server.destroy()


@pytest.fixture
async def postgres_url(postgres_server: PostgresServer) -> str:
    """The URL of a new, empty database on the session's server."""
    return await postgres_server.new_database()
