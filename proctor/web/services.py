"""What the pages and the JSON API do, in one place: checks, authorisation and store calls.

Every function takes the acting user and raises WebError (a status and a message for the user) when the
request is refused, so a page and its /api/ twin cannot drift apart.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import re
import secrets
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from proctor.config import MAX_REQUEST_BYTES
from proctor.passwords import WeakPassword, check_strength, generate_password, hash_password_async
from proctor.roster import RosterError, parse_roster
from proctor.storage import validate
from proctor.storage.base import (REVIEW_STATES, Alert, Conflict, Exam, HeadRecord, InvalidData,
                                  NotFound, SessionEvent, Store, User)

logger = logging.getLogger(__name__)

# No 0/O, 1/I/L: join codes are read off a projector and typed by hand.
_CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"
JOIN_CODE_LENGTH = 8
MAX_NAME = 200
# Users per web roster import. Each new user costs an argon2 hash (~170 ms of CPU on the server's one hashing
# thread, which logins share): 250 take about 45 s, under a reverse proxy's usual 60 s timeout (deploy/nginx);
# a larger file would be cut off there and the page with the new passwords lost, although the users were
# made. Larger rosters: several files, or `proctor users import`, which prints each password as it goes.
MAX_IMPORT_ROWS = 250
MAX_NOTE = 2000
MAX_HEAD_BYTES = 64 * 1024 * 1024
TOO_LARGE_UPLOAD = (f"upload over the {MAX_REQUEST_BYTES // (1024 * 1024)} MB limit of a web request; add a larger "
                    f"head file on the server with `proctor heads add FILE`")
TOP_SCORES = 5


class WebError(Exception):
    """A refused request: `status` is the HTTP status, `message` is shown to the user as it is."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def bad(message: str) -> WebError:
    return WebError(400, message)


# ------------------------------------------------------------------------------------------- JSON shapes


def iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def user_json(user: User) -> dict[str, Any]:
    return {"id": user.id, "username": user.username, "full_name": user.full_name, "role": user.role,
            "active": user.active, "created_at": iso(user.created_at)}


def exam_json(exam: Exam, viewer: User, roster: Sequence[User] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"id": exam.id, "name": exam.name, "owner_id": exam.owner_id,
                           "allowed_heads": list(exam.allowed_heads), "state": exam.state,
                           "created_at": iso(exam.created_at), "started_at": iso(exam.started_at),
                           "ended_at": iso(exam.ended_at)}
    if viewer.role != "student":  # the code lets anyone with a login join; only staff hand it out
        out["join_code"] = exam.join_code
        if roster is not None:
            out["roster"] = [user_json(u) for u in roster]
    return out


def top_scores(scores: dict[str, float], n: int = TOP_SCORES) -> list[list[Any]]:
    return [[name, round(float(value), 4)] for name, value in
            sorted(scores.items(), key=lambda kv: kv[1], reverse=True)[:n]]


def alert_json(alert: Alert, student: User | None) -> dict[str, Any]:
    return {"id": alert.id, "exam_id": alert.exam_id, "student_id": alert.student_id,
            "username": student.username if student else None,
            "full_name": student.full_name if student else None,
            "opened_at": iso(alert.opened_at), "closed_at": iso(alert.closed_at), "verdict": alert.verdict,
            "program": alert.program, "top_scores": top_scores(alert.scores),
            "review_state": alert.review_state, "review_note": alert.review_note,
            "reviewer_id": alert.reviewer_id, "evidence_url": f"/api/alerts/{alert.id}/evidence"}


def event_json(event: SessionEvent, student: User | None) -> dict[str, Any]:
    return {"id": event.id, "exam_id": event.exam_id, "student_id": event.student_id,
            "username": student.username if student else None, "kind": event.kind, "at": iso(event.at),
            "detail": event.detail}


def head_json(head: HeadRecord) -> dict[str, Any]:
    return {"name": head.name, "program": head.program, "description": head.description,
            "threshold": head.threshold, "backbone_hash": head.backbone_hash, "metrics": head.metrics,
            "active": head.active, "created_at": iso(head.created_at), "size_bytes": len(head.weights)}


# ------------------------------------------------------------------------------------------------- users


def _check_password(password: str) -> None:
    try:
        check_strength(password)
    except WeakPassword as exc:
        raise bad(str(exc)) from None


async def create_user(store: Store, actor: User, username: str, full_name: str, role: str,
                      password: str | None) -> tuple[User, str | None]:
    """Create a user; returns it and the generated password when none was given."""
    username = (username or "").strip()
    full_name = (full_name or "").strip()
    try:
        validate.username(username)
        validate.role(role)
        validate.full_name(full_name)
    except InvalidData as exc:
        raise bad(str(exc)) from None
    generated = None
    if password:
        _check_password(password)
    else:
        password = generated = generate_password()
    try:
        user = await store.create_user(username, full_name or username, role, await hash_password_async(password))
    except Conflict:
        raise WebError(409, f"username {username!r} is already taken") from None
    await store.audit(actor.id, "user.created", f"user:{user.id}", {"username": username, "role": role})
    return user, generated


async def get_user(store: Store, user_id: int) -> User:
    try:
        return await store.get_user(user_id)
    except NotFound:
        raise WebError(404, f"no user with id {user_id}") from None


async def set_user_active(store: Store, actor: User, user_id: int, active: bool) -> User:
    user = await get_user(store, user_id)
    if user.id == actor.id and not active:
        raise WebError(409, "you cannot deactivate your own account")
    await store.set_user_active(user_id, active)
    await store.audit(actor.id, "user.activated" if active else "user.deactivated", f"user:{user_id}",
                      {"username": user.username})
    return await store.get_user(user_id)


async def reset_password(store: Store, actor: User, user_id: int, password: str | None) -> tuple[User, str | None]:
    user = await get_user(store, user_id)
    generated = None
    if password:
        _check_password(password)
    else:
        password = generated = generate_password()
    await store.set_password(user_id, await hash_password_async(password))
    await store.audit(actor.id, "user.password_reset", f"user:{user_id}", {"username": user.username})
    return user, generated


@dataclass
class ImportResult:
    created: list[dict[str, Any]]
    skipped: list[str]


async def import_roster(store: Store, actor: User, text: str) -> ImportResult:
    """Create users from a roster CSV (proctor.roster's rules); usernames that exist already are skipped."""
    try:
        # A wrong 5 MB file is ~100,000 rows to check, about half a second: not on the event loop.
        rows = await asyncio.get_running_loop().run_in_executor(None, parse_roster, text, MAX_IMPORT_ROWS)
    except RosterError as exc:
        raise bad("roster CSV refused, nothing was imported: " + "; ".join(str(exc).splitlines())) from None
    created: list[dict[str, Any]] = []
    skipped: list[str] = []
    # "Ann" in a roster when "ann" exists is her, not a second account (see proctor.roster).
    existing = {u.username.lower() for u in await store.list_users()}
    for row in rows:
        if row.username.lower() in existing:
            skipped.append(row.username)
            continue
        try:
            user, generated = await create_user(store, actor, row.username, row.full_name, row.role, row.password)
        except WebError as exc:
            if exc.status == 409:
                skipped.append(row.username)
                continue
            raise
        created.append({"user": user_json(user), "password": generated})
    await store.audit(actor.id, "users.imported", "users", {"created": len(created), "skipped": len(skipped)})
    return ImportResult(created, skipped)


# ------------------------------------------------------------------------------------------------- exams


def new_join_code() -> str:
    return "".join(secrets.choice(_CODE_ALPHABET) for _ in range(JOIN_CODE_LENGTH))


async def _check_heads(store: Store, names: Iterable[str]) -> list[str]:
    names = list(dict.fromkeys(n.strip() for n in names if n and n.strip()))
    active = {h.name for h in await store.list_heads(active_only=True)}
    unknown = [n for n in names if n not in active]
    if unknown:
        raise bad(f"unknown or inactive head(s): {', '.join(unknown)}; pick from GET /api/heads")
    return names


async def _roster_users(store: Store, usernames: Iterable[str]) -> list[User]:
    users, missing, not_students = [], [], []
    for name in dict.fromkeys(u.strip() for u in usernames if u and u.strip()):
        try:
            user = await store.get_user_by_name(name)
        except NotFound:
            missing.append(name)
            continue
        if user.role != "student":
            not_students.append(name)
        else:
            users.append(user)
    if missing:
        raise bad(f"roster: no such user(s): {', '.join(missing)}")
    if not_students:
        raise bad(f"roster: not student account(s): {', '.join(not_students)}")
    return users


async def create_exam(store: Store, actor: User, name: str, allowed_heads: Sequence[str],
                      roster: Sequence[str]) -> Exam:
    name = (name or "").strip()
    if not name or len(name) > MAX_NAME:
        raise bad(f"exam name must be 1-{MAX_NAME} characters")
    heads = await _check_heads(store, allowed_heads)
    students = await _roster_users(store, roster)
    for _ in range(5):
        try:
            exam = await store.create_exam(name, actor.id, heads, new_join_code())
            break
        except Conflict:  # a join code collision: 31^8 codes, so a retry is plenty
            continue
    else:
        raise WebError(500, "could not find a free join code; try again")
    for student in students:
        await store.add_to_roster(exam.id, student.id)
    await store.audit(actor.id, "exam.created", f"exam:{exam.id}",
                      {"name": name, "allowed_heads": heads, "roster": len(students)})
    return exam


async def get_exam(store: Store, exam_id: int) -> Exam:
    try:
        return await store.get_exam(exam_id)
    except NotFound:
        raise WebError(404, f"no exam with id {exam_id}") from None


def check_staff(actor: User, exam: Exam) -> None:
    """Teachers see only their own exams; admins see all; students none of the staff views."""
    if actor.role == "admin":
        return
    if actor.role == "teacher" and exam.owner_id == actor.id:
        return
    if actor.role == "teacher":
        raise WebError(403, f"exam {exam.id} belongs to another teacher")
    raise WebError(403, "students cannot see the teacher's view of an exam")


async def exam_for_staff(store: Store, actor: User, exam_id: int) -> Exam:
    exam = await get_exam(store, exam_id)
    check_staff(actor, exam)
    return exam


async def exam_for_viewer(store: Store, actor: User, exam_id: int) -> Exam:
    """Staff rules for teachers and admins; students see exams they are on the roster of."""
    exam = await get_exam(store, exam_id)
    if actor.role == "student":
        if not await store.is_on_roster(exam.id, actor.id):
            raise WebError(403, f"you are not on the roster of exam {exam_id}; join it with its code")
    else:
        check_staff(actor, exam)
    return exam


async def list_exams(store: Store, actor: User) -> list[Exam]:
    if actor.role == "admin":
        return await store.list_exams()
    if actor.role == "teacher":
        return await store.list_exams(owner_id=actor.id)
    return await store.list_exams_for_student(actor.id)


async def set_exam_state(store: Store, actor: User, exam_id: int, state: str) -> Exam:
    exam = await exam_for_staff(store, actor, exam_id)
    detail: dict[str, Any] = {"name": exam.name}
    try:
        exam = await store.set_exam_state(exam_id, state)
    except InvalidData as exc:
        exam = await store.get_exam(exam_id)
        if not (state == "ended" and exam.state == "ended"):
            raise WebError(409, f"exam {exam_id} cannot go from {exam.state} to {state}: {exc}") from None
        # Ending it again is how a teacher retries an end whose notice or audit entry was lost: both again.
        detail["again"] = True
    # Every node closes the ended exam's student streams (close code 4000) when it hears this: sent before
    # the audit entry, so a failed audit write cannot leave screens shared into an exam that has ended.
    await store.publish("exam", {"id": exam_id, "state": state})
    await store.audit(actor.id, "exam.started" if state == "running" else "exam.ended", f"exam:{exam_id}", detail)
    return exam


async def join_exam(store: Store, actor: User, code: str) -> Exam:
    code = (code or "").strip().upper().replace(" ", "").replace("-", "")
    if actor.role != "student":
        raise WebError(403, "only students join exams with a code")
    try:
        exam = await store.get_exam_by_code(code)
    except NotFound:
        raise WebError(404, f"no exam has the join code {code!r}; check it with your teacher") from None
    if exam.state == "ended":
        raise WebError(409, f"exam {exam.name!r} has ended")
    if not await store.is_on_roster(exam.id, actor.id):
        await store.add_to_roster(exam.id, actor.id)
        await store.audit(actor.id, "exam.joined", f"exam:{exam.id}", {"code": code})
    return exam


async def _users_by_id(store: Store, ids: Iterable[int]) -> dict[int, User]:
    out: dict[int, User] = {}
    for user_id in set(ids):
        try:
            out[user_id] = await store.get_user(user_id)
        except NotFound:
            pass
    return out


async def list_alerts(store: Store, exam: Exam, student_id: int | None = None,
                      state: str | None = None) -> list[dict[str, Any]]:
    if state is not None and state not in REVIEW_STATES:
        raise bad(f"invalid state {state!r}: must be one of {', '.join(REVIEW_STATES)}")
    # The JSON has no evidence (it is served by its own audited route): 500 students' frames stay on disk.
    alerts = await store.list_alerts(exam.id, student_id=student_id, review_state=state, with_evidence=False)
    users = await _users_by_id(store, (a.student_id for a in alerts))
    return [alert_json(a, users.get(a.student_id)) for a in alerts]


async def list_events(store: Store, exam: Exam, student_id: int | None = None) -> list[dict[str, Any]]:
    events = await store.list_events(exam.id, student_id=student_id)
    users = await _users_by_id(store, (e.student_id for e in events))
    return [event_json(e, users.get(e.student_id)) for e in events]


def _csv_cell(value: Any) -> str:
    text = "" if value is None else str(value)
    # Spreadsheets run cells starting with these as formulas (CSV injection through notes or names).
    if text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        text = "'" + text
    return text


CSV_COLUMNS = ("alert_id", "username", "full_name", "opened_at", "closed_at", "verdict", "program",
               "top_head", "top_score", "review_state", "review_note")


def alerts_csv(alerts: Sequence[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for a in alerts:
        top = a["top_scores"][0] if a["top_scores"] else [None, None]
        writer.writerow([_csv_cell(v) for v in (a["id"], a["username"], a["full_name"], a["opened_at"],
                                                 a["closed_at"], a["verdict"], a["program"], top[0], top[1],
                                                 a["review_state"], a["review_note"])])
    return out.getvalue()


# ------------------------------------------------------------------------------------------------ alerts


async def alert_for_staff(store: Store, actor: User, alert_id: str) -> tuple[Alert, Exam]:
    if not re.fullmatch(r"[0-9a-fA-F-]{1,64}", alert_id or ""):
        raise WebError(404, f"no alert with id {alert_id!r}")
    try:
        alert = await store.get_alert(alert_id)
    except NotFound:
        raise WebError(404, f"no alert with id {alert_id!r}") from None
    exam = await get_exam(store, alert.exam_id)
    if actor.role == "teacher" and exam.owner_id != actor.id:
        raise WebError(403, f"alert {alert_id} belongs to an exam of another teacher")
    if actor.role == "student":
        raise WebError(403, "students cannot see alerts")
    return alert, exam


async def alert_details(store: Store, alert: Alert) -> dict[str, Any]:
    users = await _users_by_id(store, [alert.student_id])
    return alert_json(alert, users.get(alert.student_id))


async def review_alert(store: Store, actor: User, alert_id: str, state: str, note: str) -> Alert:
    await alert_for_staff(store, actor, alert_id)
    if state not in ("reviewed", "false_positive"):
        raise bad(f"invalid review state {state!r}: must be reviewed or false_positive")
    note = (note or "").strip()
    if len(note) > MAX_NOTE:
        raise bad(f"review note longer than {MAX_NOTE} characters")
    alert = await store.review_alert(alert_id, state, note, actor.id)
    await store.audit(actor.id, "alert.reviewed", f"alert:{alert_id}", {"state": state})
    return alert


# ------------------------------------------------------------------------------------------------- heads


def parse_head_file(data: bytes, filename: str = "head file", classifier: Any = None) -> HeadRecord:
    """Check an uploaded head file with proctor.models.heads and turn it into a store record.

    When the running classifier offers `check_head(head) -> str | None` (the engine: can this server run
    the head's backbone?), a head it could not load is refused here rather than failing every node's reload.
    """
    if len(data) > MAX_HEAD_BYTES:
        raise bad(f"{filename}: {len(data)} bytes is over the {MAX_HEAD_BYTES}-byte limit for a head file")
    # Imported here: it brings torch, which only the admin's upload needs, not every page.
    from proctor.models.heads import HeadError, head_to_record, read_head_file

    try:
        head = read_head_file(data)
        record = head_to_record(head)
    except HeadError as exc:
        raise bad(f"{filename}: {str(exc).removeprefix('head file: ')}") from None
    except ValueError as exc:  # a malformed 'created' date in otherwise valid metadata
        raise bad(f"{filename}: {exc}") from None
    check = getattr(classifier, "check_head", None)
    problem = check(head) if check is not None else None
    if problem:
        raise bad(f"{filename}: {problem}")
    return record


async def add_head(store: Store, actor: User, data: bytes, filename: str, classifier: Any = None) -> HeadRecord:
    # Off the event loop: parsing imports torch on first use and check_head may load a backbone (seconds).
    record = await asyncio.get_running_loop().run_in_executor(None, parse_head_file, data, filename, classifier)
    try:
        head = await store.add_head(record)
    except Conflict:
        raise WebError(409, f"a head named {record.name!r} exists already; deactivate it and upload "
                            "under a new name") from None
    except InvalidData as exc:
        raise bad(f"{filename}: {exc}") from None
    # The store itself publishes on the "heads" channel, so every node reloads its heads.
    await store.audit(actor.id, "head.added", f"head:{head.name}", {"program": head.program})
    return head


async def set_head_active(store: Store, actor: User, name: str, active: bool) -> HeadRecord:
    try:
        await store.get_head(name)
    except NotFound:
        raise WebError(404, f"no head named {name!r}") from None
    await store.set_head_active(name, active)
    await store.audit(actor.id, "head.activated" if active else "head.deactivated", f"head:{name}", {})
    return await store.get_head(name)
