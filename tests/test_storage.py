"""Contract tests: every test runs against SQLite and against a real PostgreSQL server."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid

import numpy as np
import pytest
import simplejpeg
from safetensors.numpy import save as save_safetensors

from proctor.passwords import hash_password
from proctor.storage import open_store, sqlite_path
from proctor.storage.base import (
    Alert, Conflict, HeadRecord, InvalidData, NotFound, PurgeReport, SessionEvent, StoreError, StoreUnavailable,
    utcnow,
)

HASH = hash_password("correct horse battery")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/proctor.db"
    else:
        url = await request.getfixturevalue("postgres_server").new_database()
    s = await open_store(url)
    await s.migrate()
    yield s
    await s.close()


def jpeg(seed: int = 0, size: int = 16) -> bytes:
    pixels = np.full((size, size, 3), seed % 256, np.uint8)
    return simplejpeg.encode_jpeg(pixels, quality=90)


def jpeg_with_comment(text: bytes) -> bytes:
    """A valid JPEG carrying `text` in a COM segment, to look for its bytes on disk."""
    data = jpeg(3)
    return data[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + data[2:]


def head_file(out: int = 1, features: int = 1280, bias: int | None = None) -> bytes:
    return save_safetensors({"fc.weight": np.zeros((out, features), np.float32),
                             "fc.bias": np.zeros(out if bias is None else bias, np.float32)})


def head(name: str = "word", **changes) -> HeadRecord:
    fields = dict(name=name, program="Microsoft Word", description="", threshold=0.5, backbone_hash="b1",
                  metrics={"f1": 0.9}, active=True, weights=head_file(), created_at=utcnow())
    fields.update(changes)
    return HeadRecord(**fields)


def alert(exam_id: int, student_id: int, **changes) -> Alert:
    fields = dict(id=uuid.uuid4().hex, exam_id=exam_id, student_id=student_id, opened_at=utcnow(),
                  verdict="unrecognised", program=None, scores={"word": 0.12}, evidence=jpeg())
    fields.update(changes)
    return Alert(**fields)


async def setup_exam(store, heads=("word",)):
    teacher = await store.create_user("teacher1", "Ada Teacher", "teacher", HASH)
    student = await store.create_user("student1", "Bo Student", "student", HASH)
    for name in heads:
        await store.add_head(head(name))
    exam = await store.create_exam("Maths", teacher.id, list(heads), "JOIN42")
    await store.add_to_roster(exam.id, student.id)
    return teacher, student, exam


# migrations ------------------------------------------------------------------------------------------

async def test_migrate_twice_is_safe(store):
    assert await store.migrate() == []
    await store.ping()


# users -----------------------------------------------------------------------------------------------

async def test_users_roundtrip_and_unique_usernames(store):
    user = await store.create_user("alice", "Alice A", "teacher", HASH)
    assert (await store.get_user(user.id)) == user
    assert (await store.get_user_by_name("alice")).id == user.id
    assert user.active and user.role == "teacher" and user.created_at.tzinfo is not None
    with pytest.raises(Conflict, match="'alice' already exists"):
        await store.create_user("alice", "Other", "student", HASH)
    await store.create_user("bob", "", "student", HASH)
    assert [u.username for u in await store.list_users()] == ["alice", "bob"]
    assert [u.username for u in await store.list_users("student")] == ["bob"]


async def test_user_deactivation_and_password_change(store):
    user = await store.create_user("carol", "", "student", HASH)
    await store.set_user_active(user.id, False)
    assert not (await store.get_user(user.id)).active
    new_hash = hash_password("another long password")
    await store.set_password(user.id, new_hash)
    assert (await store.get_user(user.id)).password_hash == new_hash
    with pytest.raises(NotFound, match="no user with id 999"):
        await store.set_user_active(999, False)


async def test_logout_and_deactivation_move_the_session_epoch_on(store):
    user = await store.create_user("erin", "", "student", HASH)
    assert user.session_epoch == 0
    await store.end_sessions(user.id)
    assert (await store.get_user(user.id)).session_epoch == 1
    await store.set_user_active(user.id, True)  # activating ends nothing
    assert (await store.get_user(user.id)).session_epoch == 1
    await store.set_user_active(user.id, False)
    assert (await store.get_user(user.id)).session_epoch == 2
    await store.set_password(user.id, hash_password("a new long password"))
    assert [u.session_epoch for u in await store.list_users("student")] == [3]
    with pytest.raises(NotFound, match="no user with id 999"):
        await store.end_sessions(999)


@pytest.mark.parametrize("username, role, password_hash, message", [
    ("", "student", HASH, "invalid username"),
    ("has space", "student", HASH, "invalid username"),
    ("dave", "superuser", HASH, "invalid role 'superuser'"),
    ("dave", "student", "plaintext-password", "argon2 hash"),
])
async def test_bad_users_are_refused(store, username, role, password_hash, message):
    with pytest.raises(InvalidData, match=message):
        await store.create_user(username, "", role, password_hash)


async def test_a_refused_value_is_not_repeated_whole_in_the_error(store):
    with pytest.raises(InvalidData, match=r"invalid username 'x{20,}\.\.\. \(1000000 characters\)") as caught:
        await store.create_user("x" * 999_999 + " ", "", "student", HASH)
    assert len(str(caught.value)) < 300


async def test_unknown_users(store):
    with pytest.raises(NotFound, match="no user named 'ghost'"):
        await store.get_user_by_name("ghost")
    with pytest.raises(NotFound):
        await store.get_user(12345)


# exams -----------------------------------------------------------------------------------------------

async def test_exam_lifecycle_and_whitelist_fixed_at_start(store):
    teacher, student, exam = await setup_exam(store, heads=("word", "excel"))
    assert exam.state == "draft" and exam.allowed_heads == ("word", "excel") and exam.started_at is None
    exam = await store.set_exam_heads(exam.id, ["excel"])
    assert exam.allowed_heads == ("excel",)
    running = await store.set_exam_state(exam.id, "running")
    assert running.state == "running" and running.started_at is not None
    with pytest.raises(InvalidData, match="fixed once it starts"):
        await store.set_exam_heads(exam.id, ["word"])
    with pytest.raises(InvalidData, match="cannot become running"):
        await store.set_exam_state(exam.id, "running")
    ended = await store.set_exam_state(exam.id, "ended")
    assert ended.ended_at >= ended.started_at
    assert (await store.get_exam_by_code("JOIN42")).id == exam.id
    assert [e.id for e in await store.list_exams(owner_id=teacher.id, state="ended")] == [exam.id]
    assert await store.list_exams(state="running") == []


async def test_several_exams_run_at_once(store):
    teacher = await store.create_user("t", "", "teacher", HASH)
    await store.add_head(head("word"))
    exams = [await store.create_exam(f"E{i}", teacher.id, ["word"], f"CODE{i}") for i in range(3)]
    for exam in exams:
        await store.set_exam_state(exam.id, "running")
    assert len(await store.list_exams(state="running")) == 3


async def test_concurrent_start_only_one_wins(store):
    _, _, exam = await setup_exam(store)
    results = await asyncio.gather(*(store.set_exam_state(exam.id, "running") for _ in range(5)),
                                   return_exceptions=True)
    assert sum(1 for r in results if not isinstance(r, Exception)) == 1
    assert all(isinstance(r, InvalidData) for r in results if isinstance(r, Exception))


async def test_exam_errors(store):
    teacher = await store.create_user("t", "", "teacher", HASH)
    student = await store.create_user("s", "", "student", HASH)
    with pytest.raises(NotFound, match="no exam with id 77"):
        await store.get_exam(77)
    with pytest.raises(NotFound, match="no exam with join code"):
        await store.get_exam_by_code("NOPE")
    with pytest.raises(InvalidData, match="invalid head name 'not a head'"):
        await store.create_exam("E", teacher.id, ["not a head"], "C1")
    with pytest.raises(InvalidData, match="list a head twice"):
        await store.create_exam("E", teacher.id, ["word", "word"], "C1")
    with pytest.raises(InvalidData, match="not the string"):
        await store.create_exam("E", teacher.id, "word", "C1")
    with pytest.raises(InvalidData, match="only a teacher or admin"):
        await store.create_exam("E", student.id, [], "C1")
    with pytest.raises(NotFound, match="no user with id 999"):
        await store.create_exam("E", 999, [], "C1")
    await store.create_exam("E", teacher.id, [], "C1")
    with pytest.raises(Conflict, match="join code 'C1'"):
        await store.create_exam("F", teacher.id, [], "C1")
    with pytest.raises(InvalidData, match="exam state"):
        await store.set_exam_state(1, "paused")
    with pytest.raises(NotFound):
        await store.set_exam_state(404, "running")


async def test_roster(store):
    teacher, student, exam = await setup_exam(store)
    await store.add_to_roster(exam.id, student.id)  # twice is fine
    assert [u.username for u in await store.list_roster(exam.id)] == ["student1"]
    assert await store.is_on_roster(exam.id, student.id)
    assert [e.id for e in await store.list_exams_for_student(student.id)] == [exam.id]
    with pytest.raises(InvalidData, match="only students"):
        await store.add_to_roster(exam.id, teacher.id)
    with pytest.raises(NotFound, match="no exam"):
        await store.add_to_roster(999, student.id)
    await store.remove_from_roster(exam.id, student.id)
    assert not await store.is_on_roster(exam.id, student.id)
    with pytest.raises(NotFound, match="not on the roster"):
        await store.remove_from_roster(exam.id, student.id)


# heads -----------------------------------------------------------------------------------------------

async def test_heads_roundtrip_and_deactivation(store):
    stored = await store.add_head(head("word", metrics={"f1": 0.93, "n": 200}))
    assert stored.id is not None and stored.weights == head_file()
    got = await store.get_head("word")
    assert got.metrics == {"f1": 0.93, "n": 200} and got.threshold == 0.5 and got.active
    await store.add_head(head("excel", program="Excel"))
    await store.set_head_active("word", False)
    assert [h.name for h in await store.list_heads(active_only=True)] == ["excel"]
    assert [h.name for h in await store.list_heads()] == ["excel", "word"]
    with pytest.raises(Conflict, match="'excel' already exists"):
        await store.add_head(head("excel"))
    with pytest.raises(NotFound, match="no head named 'zzz'"):
        await store.set_head_active("zzz", True)


@pytest.mark.parametrize("weights, message", [
    (b"", "non-empty bytes"),
    (b"not a safetensors file at all", "not a readable safetensors"),
    (head_file(out=2, bias=3), r"'fc.bias' has shape \[3\], expected \[2\]"),
    (save_safetensors({"fc.weight": np.zeros(5, np.float32)}), r"shape \[5\], expected \[out, in\]"),
    (save_safetensors({"fc.bias": np.zeros(5, np.float32)}), "no '\\*weight' tensor"),
    (save_safetensors({"fc.weight": np.zeros((1, 4), np.int32)}), "dtype int32"),
    (save_safetensors({"fc.weight": np.full((1, 4), np.nan, np.float32)}), "NaN"),
])
async def test_bad_head_weights_are_refused(store, weights, message):
    with pytest.raises(InvalidData, match=message):
        await store.add_head(head("bad", weights=weights))
    assert await store.list_heads() == []


async def test_bad_head_fields(store):
    with pytest.raises(InvalidData, match="threshold"):
        await store.add_head(head("w", threshold=1.5))
    with pytest.raises(InvalidData, match="invalid head name"):
        await store.add_head(head("has space"))
    with pytest.raises(InvalidData, match="no time zone"):
        await store.add_head(head("w", created_at=dt.datetime(2026, 1, 1)))


# alerts ----------------------------------------------------------------------------------------------

async def test_alerts_roundtrip_idempotent_close_and_review(store):
    teacher, student, exam = await setup_exam(store)
    a = alert(exam.id, student.id, evidence=jpeg(7), scores={"word": 0.25})
    await store.add_alert(a)
    await store.add_alert(a)  # a retried write stores it once
    got = await store.get_alert(a.id)
    assert got.evidence == a.evidence and got.scores == {"word": 0.25} and got.review_state == "new"
    assert abs(got.opened_at - a.opened_at) < dt.timedelta(milliseconds=1)
    closed_at = utcnow()
    await store.close_alert(a.id, closed_at)
    await store.close_alert(a.id, closed_at + dt.timedelta(seconds=5))  # the first close time stays
    got = await store.get_alert(a.id)
    assert abs(got.closed_at - closed_at) < dt.timedelta(milliseconds=1)
    reviewed = await store.review_alert(a.id, "false_positive", "it was the calculator", teacher.id)
    assert (reviewed.review_state, reviewed.review_note, reviewed.reviewer_id) == (
        "false_positive", "it was the calculator", teacher.id)
    b = alert(exam.id, student.id, verdict="forbidden_program", program="Chrome")
    await store.add_alert(b)
    assert [x.id for x in await store.list_alerts(exam.id)] == [a.id, b.id]
    assert [x.id for x in await store.list_alerts(exam.id, review_state="new")] == [b.id]
    light = await store.list_alerts(exam.id, student_id=student.id, with_evidence=False)
    assert [x.evidence for x in light] == [b"", b""]


async def test_alert_evidence_is_replaced_by_the_full_size_copy(store):
    teacher, student, exam = await setup_exam(store)
    a = alert(exam.id, student.id, evidence=jpeg(7))
    await store.add_alert(a)
    await store.set_alert_evidence(a.id, jpeg(8))
    assert (await store.get_alert(a.id)).evidence == jpeg(8)
    with pytest.raises(InvalidData, match="corrupt JPEG"):
        await store.set_alert_evidence(a.id, b"\xff\xd8\xff\xe0garbage")
    with pytest.raises(NotFound, match="no alert"):
        await store.set_alert_evidence(uuid.uuid4().hex, jpeg(8))
    assert (await store.get_alert(a.id)).evidence == jpeg(8)


async def test_alert_errors(store):
    teacher, student, exam = await setup_exam(store)
    with pytest.raises(NotFound, match="no exam with id 999"):
        await store.add_alert(alert(999, student.id))
    with pytest.raises(NotFound, match="no user with id 999"):
        await store.add_alert(alert(exam.id, 999))
    with pytest.raises(InvalidData, match="not a JPEG"):
        await store.add_alert(alert(exam.id, student.id, evidence=b"GIF89a...."))
    with pytest.raises(InvalidData, match="corrupt JPEG"):
        await store.add_alert(alert(exam.id, student.id, evidence=b"\xff\xd8\xff\xe0garbage"))
    with pytest.raises(InvalidData, match="invalid alert id"):
        await store.add_alert(alert(exam.id, student.id, id="42"))
    with pytest.raises(InvalidData, match="invalid verdict"):
        await store.add_alert(alert(exam.id, student.id, verdict="maybe"))
    with pytest.raises(InvalidData, match="finite number"):
        await store.add_alert(alert(exam.id, student.id, scores={"word": float("nan")}))
    with pytest.raises(NotFound, match="no alert"):
        await store.close_alert(uuid.uuid4().hex, utcnow())
    with pytest.raises(NotFound, match="no exam"):
        await store.list_alerts(999)
    a = alert(exam.id, student.id)
    await store.add_alert(a)
    with pytest.raises(InvalidData, match="invalid review state"):
        await store.review_alert(a.id, "ignored", "", teacher.id)


# events, audit, samples ------------------------------------------------------------------------------

async def test_session_events(store):
    _, student, exam = await setup_exam(store)
    t0 = utcnow()
    events = [SessionEvent(exam.id, student.id, "connect", t0),
              SessionEvent(exam.id, student.id, "displays", t0 + dt.timedelta(seconds=1), {"count": 2}),
              SessionEvent(exam.id, student.id, "heartbeat_lost", t0 + dt.timedelta(seconds=2))]
    for event in events + events[:1]:  # the repeated one is a retried write
        await store.add_event(event)
    got = await store.list_events(exam.id, student_id=student.id)
    assert [(e.kind, e.detail) for e in got] == [("connect", {}), ("displays", {"count": 2}),
                                                 ("heartbeat_lost", {})]
    with pytest.raises(InvalidData, match="invalid event kind 'dance'"):
        await store.add_event(SessionEvent(exam.id, student.id, "dance", t0))
    with pytest.raises(NotFound, match="no exam with id 999"):
        await store.add_event(SessionEvent(999, student.id, "connect", t0))


async def test_audit_log(store):
    admin = await store.create_user("root1", "", "admin", HASH)
    await store.audit(admin.id, "login", "root1")
    await store.audit(None, "head_added", "word", {"by": "cli"})
    entries = await store.list_audit()
    assert [(e.action, e.actor_id, e.detail) for e in entries] == [("head_added", None, {"by": "cli"}),
                                                                   ("login", admin.id, {})]
    assert len(await store.list_audit(limit=1)) == 1
    with pytest.raises(NotFound, match="audit actor"):
        await store.audit(999, "login", "x")


async def test_samples(store):
    first = await store.add_sample("word", jpeg(1), "recorded")
    await store.add_sample("excel", jpeg(2), "false_positive")
    samples = await store.list_samples("word")
    assert [(s.id, s.jpeg, s.source) for s in samples] == [(first, jpeg(1), "recorded")]
    assert len(await store.list_samples()) == 2
    with pytest.raises(InvalidData, match="not a JPEG"):
        await store.add_sample("word", b"nope", "recorded")


async def test_sample_limit_holds_for_concurrent_writers(store):
    await store.add_sample("word", jpeg(0), "recorded", limit=5)
    # Twelve writers at once (on PostgreSQL over several pooled connections): exactly four more fit.
    results = await asyncio.gather(*(store.add_sample("word", jpeg(i), "recorded", limit=5) for i in range(1, 13)),
                                   return_exceptions=True)
    refused = [r for r in results if isinstance(r, Conflict)]
    assert len(refused) == 8 and "has 5 samples already" in str(refused[0])
    assert (await store.count_samples())["word"] == 5
    await store.add_sample("excel", jpeg(1), "recorded", limit=5)  # a limit is per label
    await store.add_sample("word", jpeg(20), "recorded")  # no limit given: none applies


# retention -------------------------------------------------------------------------------------------

async def test_purge_deletes_old_ended_exams_data_only(store):
    teacher, student, exam = await setup_exam(store)
    other = await store.create_exam("Still running", teacher.id, ["word"], "RUN1")
    for e in (exam, other):
        await store.set_exam_state(e.id, "running")
        await store.add_alert(alert(e.id, student.id))
        await store.add_event(SessionEvent(e.id, student.id, "connect", utcnow()))
        await store.add_sample("word", alert(e.id, student.id).evidence, "false_positive", exam_id=e.id)
    await store.add_sample("word", alert(exam.id, student.id).evidence, "recorded")  # a teacher's own screen
    await store.set_exam_state(exam.id, "ended")
    # Ended just now: not older than a day, nothing goes.
    assert (await store.purge(dt.timedelta(days=1))) == PurgeReport(alerts=0, events=0, exams=0, samples=0)
    await asyncio.sleep(0.01)
    report = await store.purge(dt.timedelta(milliseconds=1))
    assert (report.alerts, report.events, report.exams, report.samples) == (1, 1, 1, 1)
    # The alert-made copy of the purged exam's evidence went with it; the other exam's and the recorded stay.
    assert [(s.exam_id, s.source) for s in await store.list_samples()] == [
        (other.id, "false_positive"), (None, "recorded")]
    assert await store.delete_samples("word") == 2 and await store.count_samples() == {}
    assert await store.list_alerts(exam.id) == [] and await store.list_events(exam.id) == []
    assert len(await store.list_alerts(other.id)) == 1 and len(await store.list_events(other.id)) == 1
    assert (await store.get_exam(exam.id)).state == "ended"  # the exam record itself stays
    audit = await store.list_audit()
    assert audit[0].action == "data_deleted" and audit[0].detail["alerts"] == 1
    with pytest.raises(InvalidData, match="positive duration"):
        await store.purge(dt.timedelta(0))


async def test_purged_evidence_leaves_the_sqlite_file(tmp_path):
    """secure_delete + checkpoint: the JPEG bytes are gone from the database file and its WAL."""
    url = f"sqlite:///{tmp_path}/p.db"
    store = await open_store(url)
    await store.migrate()
    try:
        _, student, exam = await setup_exam(store)
        await store.set_exam_state(exam.id, "running")
        marker = b"PROCTOR-EVIDENCE-MARKER-" + uuid.uuid4().hex.encode()
        await store.add_alert(alert(exam.id, student.id, evidence=jpeg_with_comment(marker)))
        await store.set_exam_state(exam.id, "ended")
        await asyncio.sleep(0.01)
        assert (await store.purge(dt.timedelta(milliseconds=1))).alerts == 1
    finally:
        await store.close()
    path = sqlite_path(url)
    files = [p for p in path.parent.iterdir() if p.name.startswith(path.name)]
    assert files and not any(marker in p.read_bytes() for p in files)


# notifications ---------------------------------------------------------------------------------------

async def test_publish_reaches_subscribers(store):
    got: asyncio.Queue = asyncio.Queue()

    async def listener(channel, payload):
        await got.put((channel, payload))

    await store.subscribe(listener)
    await store.publish("presence", {"exam_id": 1, "student_id": 2, "online": True})
    channel, payload = await asyncio.wait_for(got.get(), 10)
    assert channel == "presence" and payload["student_id"] == 2 and payload["node"] == store.node_id
    await store.add_head(head("word"))  # head changes are announced by the store itself
    channel, payload = await asyncio.wait_for(got.get(), 10)
    assert (channel, payload["name"]) == ("heads", "word")
    with pytest.raises(InvalidData, match="invalid channel"):
        await store.publish("gossip", {})
    with pytest.raises(InvalidData, match="send ids, not data"):
        await store.publish("alert", {"blob": "x" * 5000})


@pytest.fixture
async def server_and_command(tmp_path, monkeypatch):
    """Two SQLite stores on one file, as the server process and a command's process; the server's listener
    puts what it hears in the queue (subscribe it with `await server.subscribe(listener)`)."""
    from proctor.storage import sqlite

    monkeypatch.setattr(sqlite, "NOTIFY_POLL_S", 0.05)
    url = f"sqlite:///{tmp_path}/n.db"
    server, command = await open_store(url), await open_store(url)
    await server.migrate()
    got: asyncio.Queue = asyncio.Queue()

    async def listener(channel, payload):
        await got.put((channel, payload))

    try:
        yield server, command, listener, got
    finally:
        await command.close()
        await server.close()


async def test_sqlite_notifications_cross_processes_through_the_table(server_and_command):
    """A command's process (nobody listens there) reaches the server's listeners; in-process ones stay direct."""
    server, command, listener, got = server_and_command
    await command.add_head(head("before"))  # published before the server listened: not replayed
    await server.subscribe(listener)
    await command.add_head(head("word"))
    await command.set_head_active("word", False)
    channel, payload = await asyncio.wait_for(got.get(), 10)
    assert (channel, payload["name"], payload["active"]) == ("heads", "word", True)
    assert payload["node"] == command.node_id
    channel, payload = await asyncio.wait_for(got.get(), 10)
    assert (channel, payload["name"], payload["active"]) == ("heads", "word", False)
    # The server's own notifications go straight to its listeners, once, and not through the table.
    await server.publish("presence", {"exam_id": 1, "student_id": 2, "state": "live"})
    channel, payload = await asyncio.wait_for(got.get(), 10)
    assert channel == "presence" and payload["node"] == server.node_id
    await asyncio.sleep(0.3)
    assert got.empty()
    async with server._connection() as c:
        assert [r["channel"] for r in await c.fetch("SELECT channel FROM notifications")] == ["heads"] * 3


async def test_sqlite_notifications_survive_an_unreadable_database(server_and_command, caplog):
    server, command, listener, got = server_and_command
    await server.subscribe(listener)
    async with server._connection() as c:  # the table gone: every poll fails until it is back
        await c.execute("ALTER TABLE notifications RENAME TO notifications_away")
    await asyncio.sleep(0.3)
    assert "cannot read notifications from other processes" in caplog.text
    async with server._connection() as c:
        await c.execute("ALTER TABLE notifications_away RENAME TO notifications")
    await command.add_head(head("word"))
    channel, payload = await asyncio.wait_for(got.get(), 10)
    assert (channel, payload["name"]) == ("heads", "word")
    assert caplog.text.count("cannot read notifications") == 1  # logged once per outage


async def test_sqlite_notifications_older_than_an_hour_are_deleted(tmp_path):
    store = await open_store(f"sqlite:///{tmp_path}/n.db")
    await store.migrate()
    try:
        old = store._ts(utcnow() - dt.timedelta(hours=2))
        async with store._connection() as c:
            await c.execute("INSERT INTO notifications (channel, payload, at) VALUES ('heads', '{}', ?)", old)
        await store.publish("heads", {"name": "word", "active": True})  # nobody listens: written
        async with store._connection() as c:
            rows = await c.fetch("SELECT payload FROM notifications")
        assert [json.loads(r["payload"])["name"] for r in rows] == ["word"]
    finally:
        await store.close()


# open_store ------------------------------------------------------------------------------------------

async def test_open_store_urls(tmp_path):
    store = await open_store(f"sqlite:///{tmp_path}/new/dir/db.sqlite")  # the parent dir is created
    await store.close()
    assert (tmp_path / "new/dir/db.sqlite").exists()
    with pytest.raises(InvalidData, match="unsupported database URL"):
        await open_store("mysql://x")
    with pytest.raises(InvalidData, match="names no file"):
        await open_store("sqlite:///")
    (tmp_path / "junk.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreUnavailable, match="not a usable SQLite database"):
        await open_store(f"sqlite:///{tmp_path}/junk.db")
    with pytest.raises(StoreUnavailable, match="cannot connect to PostgreSQL"):
        await open_store("postgresql://nobody@127.0.0.1:1/none")


async def test_database_from_a_newer_version_is_refused(store):
    async with store._connection() as c:  # as a newer proctor would have left it
        await c.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                        9999, "future", store._ts(utcnow()))
    with pytest.raises(StoreError, match=r"schema version\(s\) \[9999\].*newer version"):
        await store.migrate()


async def test_closed_store_says_so(tmp_path):
    store = await open_store(f"sqlite:///{tmp_path}/c.db")
    await store.migrate()
    await store.close()
    with pytest.raises(StoreError, match="the store is closed"):
        await store.list_users()
