"""The Store contract written once in SQL common to SQLite and PostgreSQL, over a small driver interface.

sqlite.SqliteStore and postgres.PostgresStore supply connections (with their errors already mapped to
the base.py exceptions), timestamp conversion, migrations and notifications; everything else is here,
so both pass the same contract tests by construction.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import re
import uuid
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from importlib import resources
from typing import Any, Mapping, Protocol, Sequence

from proctor.storage import validate as v
from proctor.storage.base import (
    Alert, AuditEntry, Conflict, Exam, HeadRecord, InvalidData, Listener, NotFound, PurgeReport, Sample,
    SessionEvent, StoreError, User, utcnow,
)

logger = logging.getLogger(__name__)

Row = Mapping[str, Any]
_MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class Connection(Protocol):
    """What the shared SQL needs from a driver connection; `?` placeholders in every statement."""

    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...
    async def fetchrow(self, sql: str, *args: Any) -> Row | None: ...
    async def execute(self, sql: str, *args: Any) -> int:
        """Run a statement; returns the number of rows it changed."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations(dialect: str) -> list[Migration]:
    """The migration files shipped for a dialect, in version order; a misnamed file is an error."""
    folder = resources.files("proctor.storage") / "migrations" / dialect
    found: list[Migration] = []
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _MIGRATION_FILE.match(entry.name)
        if match is None:
            raise StoreError(f"migration file {entry.name!r} is not named NNNN_name.sql")
        found.append(Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise StoreError(f"two {dialect} migrations share a version number: {versions}")
    return found


class SqlStore:
    """Every Store method, in SQL that SQLite (3.35+) and PostgreSQL both accept."""

    dialect = ""

    def __init__(self) -> None:
        # Every notification carries the node it came from, so a node can skip what it published itself.
        self.node_id = uuid.uuid4().hex
        self._listeners: list[Listener] = []
        self._dispatch_tasks: set[asyncio.Task] = set()
        self._closed = False

    def _check_open(self) -> None:
        # Not StoreUnavailable: a closed store never comes back, so the write-behind queue must not wait.
        if self._closed:
            raise StoreError("the store is closed")

    # driver hooks --------------------------------------------------------------------------------

    def _connection(self) -> AbstractAsyncContextManager[Connection]:
        raise NotImplementedError

    def _transaction(self) -> AbstractAsyncContextManager[Connection]:
        raise NotImplementedError

    async def _lock_name(self, c: Connection, name: str) -> None:
        """Hold a lock on `name` until the transaction ends: writers of the same name run one after another."""
        raise NotImplementedError

    def _ts(self, value: dt.datetime | None) -> Any:
        """A datetime as the driver stores it."""
        raise NotImplementedError

    def _dt(self, raw: Any) -> dt.datetime | None:
        """A stored timestamp back to an aware UTC datetime."""
        raise NotImplementedError

    async def _notify(self, channel: str, text: str) -> None:
        raise NotImplementedError

    async def _applied_versions(self) -> set[int]:
        """Migration versions recorded in the database (empty when it was never initialised)."""
        raise NotImplementedError

    async def pending_migrations(self) -> list[int]:
        """Versions migrate() would apply now; commands other than init refuse to run while any remain."""
        done = await self._applied_versions()
        return [m.version for m in load_migrations(self.dialect) if m.version not in done]

    # rows to records -----------------------------------------------------------------------------

    def _user(self, r: Row) -> User:
        return User(id=r["id"], username=r["username"], full_name=r["full_name"], role=r["role"],
                    active=bool(r["active"]), password_hash=r["password_hash"],
                    created_at=self._dt(r["created_at"]), session_epoch=int(r["session_epoch"]))

    def _exam(self, r: Row) -> Exam:
        return Exam(id=r["id"], name=r["name"], owner_id=r["owner_id"],
                    allowed_heads=tuple(json.loads(r["allowed_heads"])), state=r["state"],
                    join_code=r["join_code"], created_at=self._dt(r["created_at"]),
                    started_at=self._dt(r["started_at"]), ended_at=self._dt(r["ended_at"]))

    def _head(self, r: Row) -> HeadRecord:
        return HeadRecord(name=r["name"], program=r["program"], description=r["description"],
                          threshold=float(r["threshold"]), backbone_hash=r["backbone_hash"],
                          metrics=json.loads(r["metrics"]), active=bool(r["active"]),
                          weights=bytes(r["weights"]), created_at=self._dt(r["created_at"]), id=r["id"])

    def _alert(self, r: Row) -> Alert:
        evidence = r["evidence"] if "evidence" in r.keys() else b""
        return Alert(id=r["id"], exam_id=r["exam_id"], student_id=r["student_id"],
                     opened_at=self._dt(r["opened_at"]), verdict=r["verdict"], program=r["program"],
                     scores=json.loads(r["scores"]), evidence=bytes(evidence),
                     closed_at=self._dt(r["closed_at"]), review_state=r["review_state"],
                     review_note=r["review_note"], reviewer_id=r["reviewer_id"])

    def _event(self, r: Row) -> SessionEvent:
        return SessionEvent(exam_id=r["exam_id"], student_id=r["student_id"], kind=r["kind"],
                            at=self._dt(r["at"]), detail=json.loads(r["detail"]), id=r["id"])

    # users ---------------------------------------------------------------------------------------

    async def create_user(self, username: str, full_name: str, role: str, password_hash: str) -> User:
        v.username(username)
        v.full_name(full_name)
        v.role(role)
        v.password_hash(password_hash)
        try:
            async with self._connection() as c:
                row = await c.fetchrow(
                    "INSERT INTO users (username, full_name, role, active, password_hash, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?) RETURNING *",
                    username, full_name, role, True, password_hash, self._ts(utcnow()))
        except Conflict:
            raise Conflict(f"username {username!r} already exists") from None
        return self._user(row)

    async def get_user(self, user_id: int) -> User:
        async with self._connection() as c:
            row = await c.fetchrow("SELECT * FROM users WHERE id = ?", _int("user id", user_id))
        if row is None:
            raise NotFound(f"no user with id {user_id}")
        return self._user(row)

    async def get_user_by_name(self, username: str) -> User:
        async with self._connection() as c:
            row = await c.fetchrow("SELECT * FROM users WHERE username = ?", str(username))
        if row is None:
            raise NotFound(f"no user named {username!r}")
        return self._user(row)

    async def list_users(self, role: str | None = None) -> list[User]:
        async with self._connection() as c:
            if role is None:
                rows = await c.fetch("SELECT * FROM users ORDER BY username")
            else:
                rows = await c.fetch("SELECT * FROM users WHERE role = ? ORDER BY username", v.role(role))
        return [self._user(r) for r in rows]

    async def set_user_active(self, user_id: int, active: bool) -> None:
        async with self._connection() as c:
            changed = await c.execute("UPDATE users SET active = ?, session_epoch = session_epoch + ? WHERE id = ?",
                                      bool(active), 0 if active else 1, _int("user id", user_id))
        if not changed:
            raise NotFound(f"no user with id {user_id}")
        # Running servers close a deactivated account's open streams (also when deactivated from the CLI).
        await self.publish("user", {"id": int(user_id), "active": bool(active)})

    async def end_sessions(self, user_id: int) -> None:
        async with self._connection() as c:
            changed = await c.execute("UPDATE users SET session_epoch = session_epoch + 1 WHERE id = ?",
                                      _int("user id", user_id))
        if not changed:
            raise NotFound(f"no user with id {user_id}")
        # Running servers close the account's open sockets: they were opened by the sessions that ended.
        await self.publish("user", {"id": int(user_id), "logged_out": True})

    async def set_password(self, user_id: int, password_hash: str) -> None:
        v.password_hash(password_hash)
        async with self._connection() as c:
            changed = await c.execute("UPDATE users SET password_hash = ?, session_epoch = session_epoch + 1 "
                                      "WHERE id = ?", password_hash, _int("user id", user_id))
        if not changed:
            raise NotFound(f"no user with id {user_id}")
        # Running servers close the account's open sockets and forget its failed logins.
        await self.publish("user", {"id": int(user_id), "password_reset": True})

    # exams ---------------------------------------------------------------------------------------

    async def create_exam(self, name: str, owner_id: int, allowed_heads: Sequence[str],
                          join_code: str) -> Exam:
        v.text("exam name", name, max_length=200)
        heads = v.head_names(allowed_heads)
        v.text("join code", join_code, max_length=64)
        try:
            async with self._connection() as c:
                owner = await c.fetchrow("SELECT role FROM users WHERE id = ?", _int("owner id", owner_id))
                if owner is None:
                    raise NotFound(f"no user with id {owner_id} to own exam {name!r}")
                if owner["role"] not in ("teacher", "admin"):
                    raise InvalidData(f"user {owner_id} is a {owner['role']}: only a teacher or admin "
                                      "owns exams")
                row = await c.fetchrow(
                    "INSERT INTO exams (name, owner_id, allowed_heads, state, join_code, created_at) "
                    "VALUES (?, ?, ?, 'draft', ?, ?) RETURNING *",
                    name, owner_id, json.dumps(heads), join_code, self._ts(utcnow()))
        except Conflict:
            raise Conflict(f"join code {join_code!r} is already used by another exam") from None
        return self._exam(row)

    async def get_exam(self, exam_id: int) -> Exam:
        async with self._connection() as c:
            row = await c.fetchrow("SELECT * FROM exams WHERE id = ?", _int("exam id", exam_id))
        if row is None:
            raise NotFound(f"no exam with id {exam_id}")
        return self._exam(row)

    async def get_exam_by_code(self, join_code: str) -> Exam:
        async with self._connection() as c:
            row = await c.fetchrow("SELECT * FROM exams WHERE join_code = ?", str(join_code))
        if row is None:
            raise NotFound(f"no exam with join code {join_code!r}")
        return self._exam(row)

    async def list_exams(self, owner_id: int | None = None, state: str | None = None) -> list[Exam]:
        where, args = [], []
        if owner_id is not None:
            where.append("owner_id = ?")
            args.append(_int("owner id", owner_id))
        if state is not None:
            where.append("state = ?")
            args.append(v.choice("exam state", state, ("draft", "running", "ended")))
        sql = "SELECT * FROM exams" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id"
        async with self._connection() as c:
            rows = await c.fetch(sql, *args)
        return [self._exam(r) for r in rows]

    async def set_exam_heads(self, exam_id: int, allowed_heads: Sequence[str]) -> Exam:
        heads = v.head_names(allowed_heads)
        async with self._connection() as c:
            row = await c.fetchrow("UPDATE exams SET allowed_heads = ? WHERE id = ? AND state = 'draft' "
                                   "RETURNING *", json.dumps(heads), _int("exam id", exam_id))
        if row is None:
            exam = await self.get_exam(exam_id)
            raise InvalidData(f"exam {exam_id} is {exam.state}: the allowed heads are fixed once it starts")
        return self._exam(row)

    async def set_exam_state(self, exam_id: int, state: str) -> Exam:
        v.choice("exam state", state, ("running", "ended"))
        before = "draft" if state == "running" else "running"
        column = "started_at" if state == "running" else "ended_at"
        # The state guard in WHERE makes the change atomic: two nodes cannot both start one exam.
        async with self._connection() as c:
            row = await c.fetchrow(f"UPDATE exams SET state = ?, {column} = ? WHERE id = ? AND state = ? "
                                   "RETURNING *", state, self._ts(utcnow()), _int("exam id", exam_id), before)
        if row is None:
            exam = await self.get_exam(exam_id)
            raise InvalidData(f"exam {exam_id} is {exam.state}: it cannot become {state} "
                              "(draft -> running -> ended only)")
        return self._exam(row)

    async def add_to_roster(self, exam_id: int, user_id: int) -> None:
        await self.get_exam(exam_id)
        user = await self.get_user(user_id)
        if user.role != "student":
            raise InvalidData(f"user {user.username!r} is a {user.role}: only students join a roster")
        async with self._connection() as c:
            await c.execute("INSERT INTO roster (exam_id, user_id) VALUES (?, ?) "
                            "ON CONFLICT (exam_id, user_id) DO NOTHING", exam_id, user_id)

    async def remove_from_roster(self, exam_id: int, user_id: int) -> None:
        async with self._connection() as c:
            changed = await c.execute("DELETE FROM roster WHERE exam_id = ? AND user_id = ?",
                                      _int("exam id", exam_id), _int("user id", user_id))
        if not changed:
            await self.get_exam(exam_id)
            raise NotFound(f"user {user_id} is not on the roster of exam {exam_id}")

    async def list_roster(self, exam_id: int) -> list[User]:
        await self.get_exam(exam_id)
        async with self._connection() as c:
            rows = await c.fetch("SELECT u.* FROM users u JOIN roster r ON r.user_id = u.id "
                                 "WHERE r.exam_id = ? ORDER BY u.username", exam_id)
        return [self._user(r) for r in rows]

    async def is_on_roster(self, exam_id: int, user_id: int) -> bool:
        async with self._connection() as c:
            row = await c.fetchrow("SELECT 1 AS x FROM roster WHERE exam_id = ? AND user_id = ?",
                                   _int("exam id", exam_id), _int("user id", user_id))
        return row is not None

    async def list_exams_for_student(self, user_id: int) -> list[Exam]:
        async with self._connection() as c:
            rows = await c.fetch("SELECT e.* FROM exams e JOIN roster r ON r.exam_id = e.id "
                                 "WHERE r.user_id = ? ORDER BY e.id", _int("user id", user_id))
        return [self._exam(r) for r in rows]

    # heads ---------------------------------------------------------------------------------------

    async def add_head(self, head: HeadRecord) -> HeadRecord:
        metrics, created = _checked_head(head)
        try:
            async with self._connection() as c:
                row = await c.fetchrow(
                    "INSERT INTO heads (name, program, description, threshold, backbone_hash, metrics, "
                    "active, weights, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING *",
                    head.name, head.program, head.description, float(head.threshold), head.backbone_hash,
                    metrics, bool(head.active), bytes(head.weights), self._ts(created))
        except Conflict:
            raise Conflict(f"a head named {head.name!r} already exists") from None
        await self.publish("heads", {"name": head.name, "active": bool(head.active)})
        return self._head(row)

    async def replace_head(self, head: HeadRecord) -> HeadRecord:
        """A retrained head under an existing name: new weights, threshold and metrics; active flag kept."""
        metrics, created = _checked_head(head)
        async with self._connection() as c:
            row = await c.fetchrow(
                "UPDATE heads SET program = ?, description = ?, threshold = ?, backbone_hash = ?, metrics = ?, "
                "weights = ?, created_at = ? WHERE name = ? RETURNING *",
                head.program, head.description, float(head.threshold), head.backbone_hash, metrics,
                bytes(head.weights), self._ts(created), head.name)
        if row is None:
            raise NotFound(f"no head named {head.name!r}")
        await self.publish("heads", {"name": head.name, "active": bool(row["active"])})
        return self._head(row)

    async def get_head(self, name: str) -> HeadRecord:
        async with self._connection() as c:
            row = await c.fetchrow("SELECT * FROM heads WHERE name = ?", str(name))
        if row is None:
            raise NotFound(f"no head named {name!r}")
        return self._head(row)

    async def list_heads(self, active_only: bool = False) -> list[HeadRecord]:
        sql = "SELECT * FROM heads" + (" WHERE active = ?" if active_only else "") + " ORDER BY name"
        async with self._connection() as c:
            rows = await c.fetch(sql, *([True] if active_only else []))
        return [self._head(r) for r in rows]

    async def set_head_active(self, name: str, active: bool) -> None:
        async with self._connection() as c:
            changed = await c.execute("UPDATE heads SET active = ? WHERE name = ?", bool(active), str(name))
        if not changed:
            raise NotFound(f"no head named {name!r}")
        await self.publish("heads", {"name": name, "active": bool(active)})

    # alerts --------------------------------------------------------------------------------------

    async def _explain_missing(self, exam_id: int, student_id: int) -> NotFound:
        """Which reference of an alert or event is missing (the driver's error does not say)."""
        async with self._connection() as c:
            if await c.fetchrow("SELECT 1 AS x FROM exams WHERE id = ?", exam_id) is None:
                return NotFound(f"no exam with id {exam_id}")
            if await c.fetchrow("SELECT 1 AS x FROM users WHERE id = ?", student_id) is None:
                return NotFound(f"no user with id {student_id}")
        return NotFound(f"exam {exam_id} or user {student_id} does not exist")

    async def add_alert(self, alert: Alert) -> None:
        """Insert-or-ignore by id, so a retried write stores the alert once."""
        v.alert_id(alert.id)
        v.choice("verdict", alert.verdict, v.ALERT_VERDICTS)
        scores = v.scores(alert.scores)
        evidence = v.jpeg(f"evidence of alert {alert.id}", alert.evidence)
        opened = v.timestamp("opened_at", alert.opened_at)
        closed = None if alert.closed_at is None else v.timestamp("closed_at", alert.closed_at)
        v.review_state(alert.review_state)
        exam_id, student_id = _int("exam id", alert.exam_id), _int("student id", alert.student_id)
        try:
            async with self._connection() as c:
                await c.execute(
                    "INSERT INTO alerts (id, exam_id, student_id, opened_at, closed_at, verdict, program, "
                    "scores, evidence, review_state, review_note, reviewer_id) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                    alert.id, exam_id, student_id, self._ts(opened), self._ts(closed), alert.verdict,
                    alert.program, scores, evidence, alert.review_state, alert.review_note,
                    alert.reviewer_id)
        except NotFound:
            raise await self._explain_missing(exam_id, student_id) from None

    async def close_alert(self, alert_id: str, closed_at: dt.datetime) -> None:
        """Idempotent: the first close time is kept."""
        closed = v.timestamp("closed_at", closed_at)
        async with self._connection() as c:
            changed = await c.execute("UPDATE alerts SET closed_at = ? WHERE id = ? AND closed_at IS NULL",
                                      self._ts(closed), str(alert_id))
        if not changed:
            await self.get_alert(alert_id, with_evidence=False)  # NotFound when it does not exist

    async def set_alert_evidence(self, alert_id: str, evidence: bytes) -> None:
        """Replace an alert's evidence with the full-size copy of the same frame the student's page sent."""
        evidence = v.jpeg(f"evidence of alert {alert_id}", evidence)
        async with self._connection() as c:
            changed = await c.execute("UPDATE alerts SET evidence = ? WHERE id = ?", evidence, str(alert_id))
        if not changed:
            raise NotFound(f"no alert with id {alert_id}")

    async def get_alert(self, alert_id: str, with_evidence: bool = True) -> Alert:
        async with self._connection() as c:
            row = await c.fetchrow(f"SELECT {_alert_columns(with_evidence)} FROM alerts WHERE id = ?",
                                   str(alert_id))
        if row is None:
            raise NotFound(f"no alert with id {alert_id!r}")
        return self._alert(row)

    async def list_alerts(self, exam_id: int, student_id: int | None = None,
                          review_state: str | None = None, with_evidence: bool = True) -> list[Alert]:
        """Oldest first. with_evidence=False leaves `evidence` empty: lists for pages stay small."""
        await self.get_exam(exam_id)
        where, args = ["exam_id = ?"], [exam_id]
        if student_id is not None:
            where.append("student_id = ?")
            args.append(_int("student id", student_id))
        if review_state is not None:
            where.append("review_state = ?")
            args.append(v.review_state(review_state))
        async with self._connection() as c:
            rows = await c.fetch(f"SELECT {_alert_columns(with_evidence)} FROM alerts "
                                 f"WHERE {' AND '.join(where)} ORDER BY opened_at, id", *args)
        return [self._alert(r) for r in rows]

    async def review_alert(self, alert_id: str, state: str, note: str, reviewer_id: int) -> Alert:
        v.review_state(state)
        v.text("review note", note, max_length=10_000, allow_empty=True)
        await self.get_user(reviewer_id)
        async with self._connection() as c:
            row = await c.fetchrow("UPDATE alerts SET review_state = ?, review_note = ?, reviewer_id = ? "
                                   "WHERE id = ? RETURNING *", state, note, reviewer_id, str(alert_id))
        if row is None:
            raise NotFound(f"no alert with id {alert_id!r}")
        return self._alert(row)

    # session events and audit log ----------------------------------------------------------------

    async def add_event(self, event: SessionEvent) -> None:
        """Insert-or-ignore on (exam, student, kind, time), so a retried write stores the event once."""
        v.event_kind(event.kind)
        detail = v.to_json("event detail", event.detail)
        at = v.timestamp("event time", event.at)
        exam_id, student_id = _int("exam id", event.exam_id), _int("student id", event.student_id)
        try:
            async with self._connection() as c:
                await c.execute("INSERT INTO session_events (exam_id, student_id, kind, at, detail) "
                                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (exam_id, student_id, kind, at) DO NOTHING",
                                exam_id, student_id, event.kind, self._ts(at), detail)
        except NotFound:
            raise await self._explain_missing(exam_id, student_id) from None

    async def list_events(self, exam_id: int, student_id: int | None = None) -> list[SessionEvent]:
        await self.get_exam(exam_id)
        sql, args = "SELECT * FROM session_events WHERE exam_id = ?", [exam_id]
        if student_id is not None:
            sql += " AND student_id = ?"
            args.append(_int("student id", student_id))
        async with self._connection() as c:
            rows = await c.fetch(sql + " ORDER BY at, id", *args)
        return [self._event(r) for r in rows]

    async def audit(self, actor_id: int | None, action: str, target: str,
                    detail: dict[str, Any] | None = None) -> None:
        await _audit(self, None, actor_id, action, target, detail)

    async def list_audit(self, limit: int = 200) -> list[AuditEntry]:
        """Newest first."""
        if not isinstance(limit, int) or not 1 <= limit <= 100_000:
            raise InvalidData(f"invalid audit limit {limit!r}: must be 1..100000")
        async with self._connection() as c:
            rows = await c.fetch("SELECT * FROM audit_log ORDER BY id DESC LIMIT ?", limit)
        return [AuditEntry(actor_id=r["actor_id"], action=r["action"], target=r["target"],
                           detail=json.loads(r["detail"]), at=self._dt(r["at"]), id=r["id"]) for r in rows]

    # training samples ----------------------------------------------------------------------------

    async def add_sample(self, label: str, jpeg: bytes, source: str, exam_id: int | None = None,
                         limit: int | None = None) -> int:
        v.head_name(label)
        data = v.jpeg(f"sample for {label!r}", jpeg)
        v.text("sample source", source, max_length=64)
        exam = None if exam_id is None else _int("exam id", exam_id)
        async with self._transaction() as c:
            if limit is not None:
                # Counted in the transaction that inserts, one writer per label at a time: two recording tabs
                # (or nodes) each counting for itself would keep twice the limit.
                await self._lock_name(c, f"samples:{label}")
                row = await c.fetchrow("SELECT COUNT(*) AS n FROM samples WHERE label = ?", label)
                if int(row["n"]) >= limit:
                    raise Conflict(f"head {label!r} has {int(row['n'])} samples already, the most kept per head "
                                   f"({limit}); train it now")
            row = await c.fetchrow("INSERT INTO samples (label, jpeg, source, created_at, exam_id) "
                                   "VALUES (?, ?, ?, ?, ?) RETURNING id", label, data, source, self._ts(utcnow()), exam)
        return int(row["id"])

    async def delete_samples(self, label: str) -> int:
        v.head_name(label)
        async with self._connection() as c:
            deleted = await c.execute("DELETE FROM samples WHERE label = ?", label)
        if deleted:
            await self._reclaim(("samples",))
        return deleted

    async def count_samples(self) -> dict[str, int]:
        async with self._connection() as c:
            rows = await c.fetch("SELECT label, COUNT(*) AS n FROM samples GROUP BY label ORDER BY label")
        return {r["label"]: int(r["n"]) for r in rows}

    async def list_samples(self, label: str | None = None) -> list[Sample]:
        async with self._connection() as c:
            if label is None:
                rows = await c.fetch("SELECT * FROM samples ORDER BY id")
            else:
                rows = await c.fetch("SELECT * FROM samples WHERE label = ? ORDER BY id", str(label))
        return [Sample(id=r["id"], label=r["label"], jpeg=bytes(r["jpeg"]), source=r["source"],
                       created_at=self._dt(r["created_at"]), exam_id=r["exam_id"]) for r in rows]

    # retention -----------------------------------------------------------------------------------

    async def purge(self, older_than: dt.timedelta) -> PurgeReport:
        """Delete alerts (with their evidence) and events of exams ended before now - older_than; the
        exam rows stay, marked purged, and the audit log records what was deleted."""
        if not isinstance(older_than, dt.timedelta) or older_than.total_seconds() <= 0:
            raise InvalidData(f"invalid purge age {older_than!r}: must be a positive duration")
        now = utcnow()
        cutoff = self._ts(now - older_than)
        ended = "SELECT id FROM exams WHERE state = 'ended' AND ended_at < ?"
        async with self._transaction() as c:
            alerts = await c.execute(f"DELETE FROM alerts WHERE exam_id IN ({ended})", cutoff)
            events = await c.execute(f"DELETE FROM session_events WHERE exam_id IN ({ended})", cutoff)
            # Samples a teacher made from those exams' alerts are copies of the same students' screens.
            samples = await c.execute(f"DELETE FROM samples WHERE exam_id IN ({ended})", cutoff)
            exams = await c.execute("UPDATE exams SET purged_at = ? WHERE state = 'ended' AND ended_at < ? "
                                    "AND purged_at IS NULL", self._ts(now), cutoff)
            report = PurgeReport(alerts=alerts, events=events, exams=exams, samples=samples)
            await _audit(self, c, None, "data_deleted", "purge",
                         {"older_than_seconds": older_than.total_seconds(), "alerts": alerts,
                          "events": events, "exams": exams, "samples": samples})
        if alerts or events or samples:
            await self._reclaim(("alerts", "session_events", "samples"))
        return report

    async def _reclaim(self, tables: Sequence[str]) -> None:
        """Make rows deleted from `tables` unreadable on disk too (driver-specific)."""

    # cross-node notifications --------------------------------------------------------------------

    async def publish(self, channel: str, payload: dict[str, Any]) -> None:
        """Tell every node's subscribers (this one included); a payload without "node" gets this store's
        node_id. Alerts, presence and exams are published by their callers after the write; head and user
        (de)activations by the store itself, so changes made from the command line reach running servers."""
        v.channel(channel)
        text = v.to_json(f"{channel} notification", {"node": self.node_id, **payload})
        if len(text.encode()) > v.MAX_NOTIFY_BYTES:
            raise InvalidData(f"{channel} notification is {len(text)} bytes: send ids, not data "
                              f"(at most {v.MAX_NOTIFY_BYTES})")
        await self._notify(channel, text)

    async def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def unsubscribe(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _dispatch(self, channel: str, text: str) -> None:
        """Run every listener in its own task: a slow or failing listener cannot hold up the others."""
        try:
            payload = json.loads(text)
        except ValueError:
            logger.error("ignored a %s notification that is not JSON: %.200r", channel, text)
            return
        for listener in list(self._listeners):
            task = asyncio.get_running_loop().create_task(_call(listener, channel, payload))
            self._dispatch_tasks.add(task)
            task.add_done_callback(self._dispatch_tasks.discard)

    async def _cancel_dispatch(self) -> None:
        for task in list(self._dispatch_tasks):
            task.cancel()
        await asyncio.gather(*self._dispatch_tasks, return_exceptions=True)


async def _call(listener: Listener, channel: str, payload: dict[str, Any]) -> None:
    try:
        await listener(channel, payload)
    except Exception:
        logger.exception("listener %r failed on a %s notification", listener, channel)


async def _audit(store: SqlStore, c: Connection | None, actor_id: int | None, action: str, target: str,
                 detail: dict[str, Any] | None) -> None:
    v.text("audit action", action, max_length=64)
    v.text("audit target", target, max_length=500, allow_empty=True)
    text = v.to_json("audit detail", detail or {})
    sql = "INSERT INTO audit_log (actor_id, action, target, detail, at) VALUES (?, ?, ?, ?, ?)"
    args = (None if actor_id is None else _int("actor id", actor_id), action, target, text,
            store._ts(utcnow()))
    try:
        if c is not None:
            await c.execute(sql, *args)
        else:
            async with store._connection() as conn:
                await conn.execute(sql, *args)
    except NotFound:
        raise NotFound(f"no user with id {actor_id} (audit actor)") from None


def _alert_columns(with_evidence: bool) -> str:
    columns = ("id, exam_id, student_id, opened_at, closed_at, verdict, program, scores, review_state, "
               "review_note, reviewer_id")
    return columns + (", evidence" if with_evidence else "")


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidData(f"invalid {name} {value!r}: must be an integer")
    # SQLite raises OverflowError (not a store error) past 64 bits; PostgreSQL's DataError maps to InvalidData.
    if not -2**63 <= value < 2**63:
        raise InvalidData(f"invalid {name} {value}: out of range")
    return value


def _checked_head(head: HeadRecord) -> tuple[Any, Any]:
    """Validate a head record; (metrics as JSON, created_at) ready for the INSERT or UPDATE."""
    v.head_name(head.name)
    v.text("head program", head.program, max_length=200)
    v.text("head description", head.description, max_length=2000, allow_empty=True)
    v.text("backbone hash", head.backbone_hash, max_length=200)
    v.threshold(head.threshold)
    metrics = v.to_json("head metrics", head.metrics)
    v.head_weights(head.weights)
    return metrics, v.timestamp("created_at", head.created_at)
