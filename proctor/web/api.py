"""The JSON API under /api/: everything the pages do, for scripts and the load generator."""

from __future__ import annotations

import json
import logging
import secrets
import time
from typing import Any

from aiohttp import web

from proctor.appkeys import CLASSIFIER_KEY, METRICS_KEY, STORE_KEY
from proctor.passwords import hash_password, run_hashing, verify_password
from proctor.storage.base import Conflict, Exam, InvalidData, NotFound, Store, StoreUnavailable, User
from proctor.storage.validate import MAX_USERNAME
from proctor.web import services as sv
from proctor.web.auth import (WEB_STATE_KEY, client_address, csrf_token, log_out, require_user,
                              start_session)

logger = logging.getLogger(__name__)

routes = web.RouteTableDef()
MAX_JSON_BYTES = 1024 * 1024
_dummy_hash: str | None = None


def _unknown_user_hash() -> str:
    """A real argon2 hash to check when the username does not exist: the answer takes as long as for a
    real account, so response times do not tell which usernames exist."""
    global _dummy_hash
    if _dummy_hash is None:
        _dummy_hash = hash_password(secrets.token_urlsafe(16))
    return _dummy_hash


def _verify(password_hash: str | None, password: str) -> bool:
    """Blocking argon2 check (run in a thread); an unknown user costs the same and always fails."""
    if password_hash is None:
        verify_password(_unknown_user_hash(), password)
        return False
    return verify_password(password_hash, password)


def _store(request: web.Request) -> Store:
    return request.app[STORE_KEY]


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, default=str))


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


@web.middleware
async def api_error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """One error boundary for /api/: refusals and store errors become JSON, never a traceback."""
    if not request.path.startswith("/api/"):
        return await handler(request)
    try:
        return await handler(request)
    except sv.WebError as exc:
        return error_response(exc.status, exc.message)
    except NotFound as exc:
        return error_response(404, str(exc) or "not found")
    except Conflict as exc:
        return error_response(409, str(exc))
    except InvalidData as exc:
        return error_response(400, str(exc))
    except StoreUnavailable:
        logger.warning("store unavailable for %s %s", request.method, request.path)
        return error_response(503, "the database is unavailable; try again shortly")
    except web.HTTPException:
        raise
    except Exception:
        logger.exception("error in %s %s", request.method, request.path)
        return error_response(500, "internal error; the server log has the details")


async def json_body(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_JSON_BYTES:
        raise sv.WebError(413, f"request body over {MAX_JSON_BYTES} bytes")
    if request.content_type != "application/json":
        raise sv.bad(f"send a JSON object with Content-Type: application/json (got {request.content_type!r})")
    try:
        data = await request.json()
        # A lone surrogate ("\ud800") parses but cannot be stored as text by either database.
        json.dumps(data, ensure_ascii=False).encode()
    except (ValueError, RecursionError, LookupError):  # also a body that is not UTF-8, or a bogus charset
        raise sv.bad("request body is not valid JSON (UTF-8, nested less deeply than 1,000 levels)") from None
    if not isinstance(data, dict):
        raise sv.bad("request body must be a JSON object")
    return data


def _str_field(data: dict[str, Any], name: str, required: bool = True) -> str:
    value = data.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise sv.bad(f"field {name!r} must be a non-empty string")
    return value


def _int_param(value: str | None, name: str) -> int | None:
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise sv.bad(f"{name} must be an integer id, got {value!r}") from None


# Ids are 64-bit integers in both databases: a larger one names nothing.
_MAX_ID = 2 ** 63 - 1


def path_id(request: web.Request, name: str = "id") -> int:
    raw = request.match_info[name]
    try:
        value = int(raw)
    except ValueError:
        raise sv.WebError(404, f"{name} {raw!r} is not a number") from None
    if not 0 <= value <= _MAX_ID:
        raise sv.WebError(404, f"no such {name}: {raw}")
    return value


# ------------------------------------------------------------------------------------------------ login


async def check_login(request: web.Request, username: str, password: str) -> User:
    """The user these credentials belong to; WebError 429 when rate-limited, 401 when wrong."""
    limiter = request.app[WEB_STATE_KEY].limiter
    address = client_address(request)
    wait, why = limiter.begin(username, address)
    if wait > 0:
        if why == "busy":  # a hall logging in at once through one address: nobody did anything wrong
            raise sv.WebError(429, f"many logins are in progress; try again in {int(wait) + 1} seconds")
        raise sv.WebError(429, f"too many failed logins; try again in {int(wait) + 1} seconds")
    outcome: bool | None = None  # neither right nor wrong when the database failed or the client went away
    try:
        user, ok = await _verify_login(request, username, password)
        outcome = ok
    finally:
        limiter.end(username, address, outcome)
    store = _store(request)
    if user is None or not ok:
        detail: dict[str, Any] = {"address": address}
        if len(username) > MAX_USERNAME:  # no account has such a name; the audit target has room for one
            detail["username_length"] = len(username)
        await store.audit(user.id if user else None, "login.failed", f"user:{username[:MAX_USERNAME]}", detail)
        raise sv.WebError(401, "wrong username or password")
    if not user.active:
        await store.audit(user.id, "login.refused", f"user:{user.id}", {"reason": "deactivated"})
        raise sv.WebError(403, "this account is deactivated; ask an administrator")
    await store.audit(user.id, "login", f"user:{user.id}", {"address": address})
    return user


async def _verify_login(request: web.Request, username: str, password: str) -> tuple[User | None, bool]:
    """(the account of that name or None, whether the password is right); an unknown name costs a hash too."""
    try:
        user: User | None = await _store(request).get_user_by_name(username)
    except NotFound:
        user = None
    started = time.perf_counter()
    ok = await run_hashing(_verify, user.password_hash if user else None, password)
    request.app[METRICS_KEY].password_check_seconds.observe(time.perf_counter() - started)
    return user, ok and user is not None


@routes.post("/api/login")
async def api_login(request: web.Request) -> web.Response:
    data = await json_body(request)
    user = await check_login(request, _str_field(data, "username"), _str_field(data, "password"))
    response = web.json_response({})
    session = start_session(request, response, user)
    response.text = json.dumps({"user": sv.user_json(user), "csrf_token": session.csrf})
    return response


@routes.post("/api/logout")
async def api_logout(request: web.Request) -> web.Response:
    user = await require_user(request)
    response = json_response({"ok": True})
    await log_out(request, response, user)
    return response


@routes.get("/api/me")
async def api_me(request: web.Request) -> web.Response:
    user = await require_user(request)
    return json_response({"user": sv.user_json(user), "csrf_token": csrf_token(request)})


# ------------------------------------------------------------------------------------------------ users


@routes.get("/api/users")
async def api_users(request: web.Request) -> web.Response:
    await require_user(request, "admin")
    role = request.query.get("role") or None
    return json_response({"users": [sv.user_json(u) for u in await _store(request).list_users(role)]})


@routes.post("/api/users")
async def api_create_user(request: web.Request) -> web.Response:
    actor = await require_user(request, "admin")
    data = await json_body(request)
    password = data.get("password")
    if password is not None and not isinstance(password, str):
        raise sv.bad("field 'password' must be a string")
    user, generated = await sv.create_user(_store(request), actor, _str_field(data, "username"),
                                           _str_field(data, "full_name", required=False),
                                           _str_field(data, "role"), password)
    return json_response({"user": sv.user_json(user), "password": generated}, status=201)


@routes.post("/api/users/import")
async def api_import_users(request: web.Request) -> web.Response:
    actor = await require_user(request, "admin")
    if request.content_length is not None and request.content_length > 5 * MAX_JSON_BYTES:
        raise sv.WebError(413, "roster CSV over 5 MB")
    try:
        text = (await request.read()).decode("utf-8-sig")
    except UnicodeDecodeError:
        raise sv.bad("roster CSV must be UTF-8 text") from None
    result = await sv.import_roster(_store(request), actor, text)
    return json_response({"created": result.created, "skipped": result.skipped}, status=201)


@routes.post("/api/users/{id}/deactivate")
async def api_deactivate_user(request: web.Request) -> web.Response:
    actor = await require_user(request, "admin")
    user = await sv.set_user_active(_store(request), actor, path_id(request), False)
    return json_response({"user": sv.user_json(user)})


@routes.post("/api/users/{id}/activate")
async def api_activate_user(request: web.Request) -> web.Response:
    actor = await require_user(request, "admin")
    user = await sv.set_user_active(_store(request), actor, path_id(request), True)
    return json_response({"user": sv.user_json(user)})


@routes.post("/api/users/{id}/password")
async def api_reset_password(request: web.Request) -> web.Response:
    actor = await require_user(request, "admin")
    data = await json_body(request) if request.body_exists else {}
    password = data.get("password")
    if password is not None and not isinstance(password, str):
        raise sv.bad("field 'password' must be a string")
    user, generated = await sv.reset_password(_store(request), actor, path_id(request), password)
    return json_response({"user": sv.user_json(user), "password": generated})


@routes.get("/api/audit")
async def api_audit(request: web.Request) -> web.Response:
    await require_user(request, "admin")
    limit = _int_param(request.query.get("limit"), "limit") or 200
    entries = await _store(request).list_audit(limit=max(1, min(limit, 5000)))
    return json_response({"entries": [{"id": e.id, "actor_id": e.actor_id, "action": e.action,
                                       "target": e.target, "detail": e.detail, "at": sv.iso(e.at)}
                                      for e in entries]})


# ------------------------------------------------------------------------------------------------ heads


@routes.get("/api/heads")
async def api_heads(request: web.Request) -> web.Response:
    await require_user(request, "admin", "teacher")
    active_only = request.query.get("active") in ("1", "true")
    heads = await _store(request).list_heads(active_only=active_only)
    return json_response({"heads": [sv.head_json(h) for h in heads]})


async def read_upload(request: web.Request) -> tuple[bytes, str]:
    """The uploaded file: the 'file' field of a multipart form, or the raw request body."""
    try:
        if request.content_type == "multipart/form-data":
            form = await request.post()
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise sv.bad("multipart upload needs a file in the field 'file'")
            return upload.file.read(sv.MAX_HEAD_BYTES + 1), upload.filename or "head file"
        return await request.read(), request.query.get("filename", "head file")
    except web.HTTPRequestEntityTooLarge:
        raise sv.WebError(413, sv.TOO_LARGE_UPLOAD) from None


@routes.post("/api/heads")
async def api_add_head(request: web.Request) -> web.Response:
    actor = await require_user(request, "admin")
    data, filename = await read_upload(request)
    head = await sv.add_head(_store(request), actor, data, filename, request.app.get(CLASSIFIER_KEY))
    return json_response({"head": sv.head_json(head)}, status=201)


@routes.post("/api/heads/{name}/activate")
async def api_activate_head(request: web.Request) -> web.Response:
    actor = await require_user(request, "admin")
    head = await sv.set_head_active(_store(request), actor, request.match_info["name"], True)
    return json_response({"head": sv.head_json(head)})


@routes.post("/api/heads/{name}/deactivate")
async def api_deactivate_head(request: web.Request) -> web.Response:
    actor = await require_user(request, "admin")
    head = await sv.set_head_active(_store(request), actor, request.match_info["name"], False)
    return json_response({"head": sv.head_json(head)})


# ------------------------------------------------------------------------------------------------ exams


@routes.post("/api/exams")
async def api_create_exam(request: web.Request) -> web.Response:
    actor = await require_user(request, "teacher", "admin")
    data = await json_body(request)
    heads, roster = data.get("allowed_heads", []), data.get("roster", [])
    for name, value in (("allowed_heads", heads), ("roster", roster)):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise sv.bad(f"field {name!r} must be a list of strings")
    store = _store(request)
    exam = await sv.create_exam(store, actor, _str_field(data, "name"), heads, roster)
    return json_response({"exam": sv.exam_json(exam, actor, await store.list_roster(exam.id))}, status=201)


@routes.get("/api/exams")
async def api_exams(request: web.Request) -> web.Response:
    actor = await require_user(request)
    exams = await sv.list_exams(_store(request), actor)
    return json_response({"exams": [sv.exam_json(e, actor) for e in exams]})


@routes.post("/api/exams/join")
async def api_join_exam(request: web.Request) -> web.Response:
    actor = await require_user(request, "student")
    data = await json_body(request)
    exam = await sv.join_exam(_store(request), actor, _str_field(data, "code"))
    return json_response({"exam": sv.exam_json(exam, actor)})


@routes.get("/api/exams/{id}")
async def api_exam(request: web.Request) -> web.Response:
    actor = await require_user(request)
    store = _store(request)
    exam = await sv.exam_for_viewer(store, actor, path_id(request))
    roster = await store.list_roster(exam.id) if actor.role != "student" else None
    return json_response({"exam": sv.exam_json(exam, actor, roster)})


@routes.post("/api/exams/{id}/{action:start|end}")
async def api_exam_state(request: web.Request) -> web.Response:
    actor = await require_user(request, "teacher", "admin")
    state = "running" if request.match_info["action"] == "start" else "ended"
    exam = await sv.set_exam_state(_store(request), actor, path_id(request), state)
    return json_response({"exam": sv.exam_json(exam, actor)})


async def _exam_alerts(request: web.Request) -> tuple[User, Exam, list[dict[str, Any]]]:
    """The staff member, their exam and its alerts filtered by ?student= and ?state= (list and CSV alike)."""
    actor = await require_user(request, "teacher", "admin")
    store = _store(request)
    exam = await sv.exam_for_staff(store, actor, path_id(request))
    alerts = await sv.list_alerts(store, exam, _int_param(request.query.get("student"), "student"),
                                  request.query.get("state") or None)
    return actor, exam, alerts


@routes.get("/api/exams/{id}/alerts")
async def api_exam_alerts(request: web.Request) -> web.Response:
    _, _, alerts = await _exam_alerts(request)
    return json_response({"alerts": alerts})


@routes.get("/api/exams/{id}/events")
async def api_exam_events(request: web.Request) -> web.Response:
    actor = await require_user(request, "teacher", "admin")
    store = _store(request)
    exam = await sv.exam_for_staff(store, actor, path_id(request))
    events = await sv.list_events(store, exam, _int_param(request.query.get("student"), "student"))
    return json_response({"events": events})


@routes.get("/api/exams/{id}/export.csv")
async def api_export_csv(request: web.Request) -> web.Response:
    actor, exam, alerts = await _exam_alerts(request)
    await _store(request).audit(actor.id, "alerts.exported", f"exam:{exam.id}", {"alerts": len(alerts)})
    return web.Response(text=sv.alerts_csv(alerts), content_type="text/csv", charset="utf-8",
                        headers={"Content-Disposition": f'attachment; filename="exam-{exam.id}-alerts.csv"'})


# ----------------------------------------------------------------------------------------------- alerts


@routes.get("/api/alerts/{id}")
async def api_alert(request: web.Request) -> web.Response:
    actor = await require_user(request, "teacher", "admin")
    store = _store(request)
    alert, _ = await sv.alert_for_staff(store, actor, request.match_info["id"])
    return json_response({"alert": await sv.alert_details(store, alert)})


@routes.get("/api/alerts/{id}/evidence")
async def api_evidence(request: web.Request) -> web.Response:
    actor = await require_user(request, "teacher", "admin")
    store = _store(request)
    alert, exam = await sv.alert_for_staff(store, actor, request.match_info["id"])
    await store.audit(actor.id, "evidence.viewed", f"alert:{alert.id}", {"exam_id": exam.id,
                                                                          "student_id": alert.student_id})
    return web.Response(body=alert.evidence, content_type="image/jpeg",
                        headers={"Cache-Control": "private, no-store"})


@routes.post("/api/alerts/{id}/review")
async def api_review(request: web.Request) -> web.Response:
    actor = await require_user(request, "teacher", "admin")
    data = await json_body(request)
    store = _store(request)
    alert = await sv.review_alert(store, actor, request.match_info["id"], _str_field(data, "state"),
                                  _str_field(data, "note", required=False))
    return json_response({"alert": await sv.alert_details(store, alert)})
