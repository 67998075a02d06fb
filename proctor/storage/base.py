"""The Store protocol and its records: everything the server remembers, one async contract.

Two implementations pass the same contract tests: sqlite.SqliteStore (embedded
default) and postgres.PostgresStore (real deployments, several nodes).
`open_store(url)` picks one from the database URL.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Literal, Protocol, Sequence

Role = Literal["admin", "teacher", "student"]
ROLES: tuple[str, ...] = ("admin", "teacher", "student")
ExamState = Literal["draft", "running", "ended"]
ReviewState = Literal["new", "reviewed", "false_positive"]
REVIEW_STATES: tuple[str, ...] = ("new", "reviewed", "false_positive")
# Session event kinds a teacher reads in a student's timeline.
EVENT_KINDS: tuple[str, ...] = (
    "connect", "disconnect", "heartbeat_lost", "sharing_started", "sharing_stopped", "displays",
)


class StoreError(Exception):
    """Base of every error the store raises on purpose; the message is safe to show a user."""


class NotFound(StoreError):
    pass


class Conflict(StoreError):
    """A uniqueness rule was broken (duplicate username, head name, ...)."""


class InvalidData(StoreError):
    """The data given cannot be stored as it is (wrong weight shape, corrupt evidence, bad state change)."""


class StoreUnavailable(StoreError):
    """The database cannot be reached now; the write-behind queue retries these."""


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass(frozen=True)
class User:
    id: int
    username: str
    full_name: str
    role: str
    active: bool
    password_hash: str
    created_at: dt.datetime
    # Goes up when the account's sessions end (logout, deactivation, a new password): cookies carry a
    # fingerprint of it, and sockets opened under an older one are closed.
    session_epoch: int = 0


@dataclass(frozen=True)
class Exam:
    id: int
    name: str
    owner_id: int
    allowed_heads: tuple[str, ...]
    state: str
    join_code: str
    created_at: dt.datetime
    started_at: dt.datetime | None = None
    ended_at: dt.datetime | None = None


@dataclass(frozen=True)
class HeadRecord:
    """A head as stored: metadata plus the head file's bytes (safetensors with JSON metadata)."""

    name: str
    program: str
    description: str
    threshold: float
    backbone_hash: str
    metrics: dict[str, Any]
    active: bool
    weights: bytes
    created_at: dt.datetime
    id: int | None = None


@dataclass(frozen=True)
class Alert:
    """An alert episode; `id` is a UUID hex made by the server so writes can be queued and retried."""

    id: str
    exam_id: int
    student_id: int
    opened_at: dt.datetime
    verdict: str  # "unrecognised" or "forbidden_program"
    program: str | None  # the forbidden program recognised, if any
    scores: dict[str, float]
    evidence: bytes  # the frame's original JPEG bytes
    closed_at: dt.datetime | None = None
    review_state: str = "new"
    review_note: str = ""
    reviewer_id: int | None = None


@dataclass(frozen=True)
class SessionEvent:
    exam_id: int
    student_id: int
    kind: str
    at: dt.datetime
    detail: dict[str, Any] = field(default_factory=dict)
    id: int | None = None


@dataclass(frozen=True)
class AuditEntry:
    actor_id: int | None
    action: str
    target: str
    detail: dict[str, Any]
    at: dt.datetime
    id: int | None = None


@dataclass(frozen=True)
class Sample:
    """A screenshot stored as a training example for a head (recorded from a live screen or a review)."""

    id: int
    label: str  # the head name it is a positive for
    jpeg: bytes
    source: str  # "recorded", "false_positive", ...
    created_at: dt.datetime
    exam_id: int | None = None  # the exam whose alert evidence it is (purged with it); None: recorded


@dataclass(frozen=True)
class PurgeReport:
    alerts: int
    events: int
    exams: int
    samples: int = 0  # training samples made from those exams' alert evidence


# Cross-node notifications: small payloads (ids), the data is read from the tables.
# channel is one of "alert", "alert_closed", "presence", "heads", "exam", "user" (validate.CHANNELS); the store
# adds "node" (its node_id) to every payload that has none, so a node can skip its own notifications.
Listener = Callable[[str, dict[str, Any]], Awaitable[None]]


class Store(Protocol):
    # Stamped as "node" on every notification this store publishes, so a node can skip its own.
    node_id: str

    async def close(self) -> None: ...

    async def migrate(self) -> list[int]:
        """Apply pending migrations in order; returns the versions applied now (empty when up to date)."""

    async def pending_migrations(self) -> list[int]:
        """Versions migrate() would apply now (all of them on a database never initialised)."""

    async def ping(self) -> None:
        """Raise StoreUnavailable when the database cannot be reached."""

    # users
    async def create_user(self, username: str, full_name: str, role: str, password_hash: str) -> User: ...
    async def get_user(self, user_id: int) -> User: ...
    async def get_user_by_name(self, username: str) -> User: ...
    async def list_users(self, role: str | None = None) -> list[User]: ...
    async def set_user_active(self, user_id: int, active: bool) -> None:
        """Deactivating also ends the account's sessions: reactivating it does not revive old cookies."""
    async def end_sessions(self, user_id: int) -> None:
        """Every session cookie of the account stops working, on every device and node (logout)."""
    async def set_password(self, user_id: int, password_hash: str) -> None: ...

    # exams
    async def create_exam(self, name: str, owner_id: int, allowed_heads: Sequence[str],
                          join_code: str) -> Exam: ...
    async def get_exam(self, exam_id: int) -> Exam: ...
    async def get_exam_by_code(self, join_code: str) -> Exam: ...
    async def list_exams(self, owner_id: int | None = None, state: str | None = None) -> list[Exam]: ...
    async def set_exam_heads(self, exam_id: int, allowed_heads: Sequence[str]) -> Exam:
        """Only while the exam is a draft: the whitelist is fixed when the exam starts."""
    async def set_exam_state(self, exam_id: int, state: str) -> Exam:
        """draft -> running -> ended only; sets started_at / ended_at."""
    async def add_to_roster(self, exam_id: int, user_id: int) -> None: ...
    async def remove_from_roster(self, exam_id: int, user_id: int) -> None: ...
    async def list_roster(self, exam_id: int) -> list[User]: ...
    async def is_on_roster(self, exam_id: int, user_id: int) -> bool: ...
    async def list_exams_for_student(self, user_id: int) -> list[Exam]: ...

    # heads
    async def add_head(self, head: HeadRecord) -> HeadRecord: ...
    async def replace_head(self, head: HeadRecord) -> HeadRecord:
        """New weights, threshold, metrics, program, description for an existing name; `active` is kept."""
    async def get_head(self, name: str) -> HeadRecord: ...
    async def list_heads(self, active_only: bool = False) -> list[HeadRecord]: ...
    async def set_head_active(self, name: str, active: bool) -> None: ...

    # alerts (written through the write-behind queue on the frame path; idempotent by id)
    async def add_alert(self, alert: Alert) -> None: ...
    async def close_alert(self, alert_id: str, closed_at: dt.datetime) -> None: ...
    async def set_alert_evidence(self, alert_id: str, evidence: bytes) -> None:
        """The full-size copy of the alert's frame replaces the small one it was classified from."""
    async def get_alert(self, alert_id: str, with_evidence: bool = True) -> Alert: ...
    async def list_alerts(self, exam_id: int, student_id: int | None = None,
                          review_state: str | None = None, with_evidence: bool = True) -> list[Alert]:
        """Oldest first; with_evidence=False leaves each `evidence` empty (b"") to keep lists light."""
    async def review_alert(self, alert_id: str, state: str, note: str, reviewer_id: int) -> Alert: ...

    # session events and audit log
    async def add_event(self, event: SessionEvent) -> None: ...
    async def list_events(self, exam_id: int, student_id: int | None = None) -> list[SessionEvent]: ...
    async def audit(self, actor_id: int | None, action: str, target: str,
                    detail: dict[str, Any] | None = None) -> None: ...
    async def list_audit(self, limit: int = 200) -> list[AuditEntry]: ...

    # training samples
    async def add_sample(self, label: str, jpeg: bytes, source: str, exam_id: int | None = None,
                         limit: int | None = None) -> int:
        """Store a sample; with `limit`, Conflict when the label has that many already (checked atomically)."""
    async def list_samples(self, label: str | None = None) -> list[Sample]: ...
    async def count_samples(self) -> dict[str, int]:
        """Samples per label, without reading their JPEGs."""
    async def delete_samples(self, label: str) -> int:
        """Delete every sample of a label; how many there were."""

    # retention
    async def purge(self, older_than: dt.timedelta) -> PurgeReport:
        """Delete evidence, alerts, events and alert-made samples of exams ended more than `older_than` ago."""

    # cross-node notifications
    async def publish(self, channel: str, payload: dict[str, Any]) -> None: ...
    async def subscribe(self, listener: Listener) -> None: ...
    async def unsubscribe(self, listener: Listener) -> None: ...
