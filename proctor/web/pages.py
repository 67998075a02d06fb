"""HTML pages (aiohttp-jinja2): login, the student's share page, the teacher's dashboard and review, admin."""

from __future__ import annotations

import logging
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from proctor.appkeys import CLASSIFIER_KEY, CONFIG_KEY, STORE_KEY
from proctor.storage.base import InvalidData, NotFound, Store, StoreError, StoreUnavailable, User
from proctor.web import services as sv
from proctor.web.api import check_login, path_id, read_upload
from proctor.web.auth import csrf_token, current_user, log_out, require_user, start_session

logger = logging.getLogger(__name__)

routes = web.RouteTableDef()
_HOME = {"student": "/student", "teacher": "/teacher", "admin": "/admin"}


def _store(request: web.Request) -> Store:
    return request.app[STORE_KEY]


async def render(name: str, request: web.Request, context: dict[str, Any], status: int = 200) -> web.Response:
    """Render a template with the current user and the session's CSRF token (every form carries it)."""
    context = {"user": await current_user(request), "csrf_token": csrf_token(request), **context}
    return aiohttp_jinja2.render_template(name, request, context, status=status)


async def _form(request: web.Request) -> dict[str, str]:
    form = await request.post()
    return {k: v for k, v in form.items() if isinstance(v, str)}


def _safe_next(target: str | None, user: User) -> str:
    # Only local paths: an open redirect after login would hand phishing pages a trusted link. Browsers drop
    # tabs and newlines from a URL, so "/<tab>/evil.example" would become "//evil.example": no control
    # characters or spaces either.
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target \
            and not any(ord(c) <= 0x20 or ord(c) == 0x7f for c in target):
        return target
    return _HOME.get(user.role, "/")


@web.middleware
async def page_error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Refusals and store errors on pages become a readable error page with the same status."""
    if request.path.startswith(("/api/", "/ws/", "/static/")):
        return await handler(request)
    try:
        return await handler(request)
    except sv.WebError as exc:
        return await _error_page(request, exc.status, exc.message)
    except web.HTTPForbidden as exc:
        return await _error_page(request, 403, exc.text or "forbidden")
    except web.HTTPBadRequest as exc:
        return await _error_page(request, 400, exc.text or "bad request")
    except web.HTTPNotFound:
        return await _error_page(request, 404, f"no page at {request.path}")
    except NotFound as exc:
        return await _error_page(request, 404, str(exc) or "not found")
    except InvalidData as exc:
        return await _error_page(request, 400, str(exc))
    except StoreUnavailable:
        # The teacher sees why and can reload, not a bare 500.
        logger.warning("store unavailable for %s %s", request.method, request.path)
        return await _error_page(request, 503, "the database is unavailable; reload this page shortly")


async def _error_page(request: web.Request, status: int, message: str) -> web.Response:
    try:
        user = await current_user(request)
    except StoreError:  # the error being shown may be the database's own
        user = None
    context = {"user": user, "csrf_token": csrf_token(request), "status": status, "message": message}
    return aiohttp_jinja2.render_template("error.html", request, context, status=status)


# ------------------------------------------------------------------------------------------------ login


@routes.get("/")
async def home(request: web.Request) -> web.Response:
    user = await current_user(request)
    raise web.HTTPFound(_HOME[user.role] if user else "/login")


@routes.get("/login")
async def login_page(request: web.Request) -> web.Response:
    user = await current_user(request)
    if user is not None:
        raise web.HTTPFound(_safe_next(request.query.get("next"), user))
    return await render("login.html", request, {"next": request.query.get("next", "")})


@routes.post("/login")
async def login_submit(request: web.Request) -> web.Response:
    form = await _form(request)
    username, password = form.get("username", "").strip(), form.get("password", "")
    try:
        if not username or not password:
            raise sv.bad("enter your username and password")
        user = await check_login(request, username, password)
    except sv.WebError as exc:
        return await render("login.html", request, {"error": exc.message, "username": username,
                                              "next": form.get("next", "")}, status=exc.status)
    response = web.HTTPFound(_safe_next(form.get("next"), user))
    start_session(request, response, user)
    raise response


@routes.post("/logout")
async def logout(request: web.Request) -> web.Response:
    response = web.HTTPFound("/login")
    await log_out(request, response, await current_user(request))
    raise response


# ---------------------------------------------------------------------------------------------- student


@routes.get("/student")
async def student_home(request: web.Request) -> web.Response:
    user = await require_user(request, "student")
    exams = await _store(request).list_exams_for_student(user.id)
    return await render("student_home.html", request, {"exams": [e for e in exams if e.state != "ended"]})


@routes.post("/student/join")
async def student_join(request: web.Request) -> web.Response:
    user = await require_user(request, "student")
    form = await _form(request)
    try:
        exam = await sv.join_exam(_store(request), user, form.get("code", ""))
    except sv.WebError as exc:
        exams = await _store(request).list_exams_for_student(user.id)
        return await render("student_home.html", request, {"exams": [e for e in exams if e.state != "ended"],
                                                     "error": exc.message, "code": form.get("code", "")},
                      status=exc.status)
    raise web.HTTPFound(f"/student/exams/{exam.id}")


@routes.get("/student/exams/{id}")
async def student_exam(request: web.Request) -> web.Response:
    user = await require_user(request, "student")
    exam = await sv.exam_for_viewer(_store(request), user, path_id(request))
    config = request.app[CONFIG_KEY]
    return await render("student_exam.html", request, {"exam": exam, "fps": config.client_fps})


# ---------------------------------------------------------------------------------------------- teacher


@routes.get("/teacher")
async def teacher_home(request: web.Request) -> web.Response:
    user = await require_user(request, "teacher", "admin")
    exams = await sv.list_exams(_store(request), user)
    return await render("teacher_home.html", request, {"exams": exams})


async def _new_exam_context(store: Store, **extra: Any) -> dict[str, Any]:
    heads = await store.list_heads(active_only=True)
    students = await store.list_users("student")
    return {"heads": heads, "students": [s for s in students if s.active], **extra}


@routes.get("/teacher/exams/new")
async def new_exam_page(request: web.Request) -> web.Response:
    await require_user(request, "teacher", "admin")
    return await render("exam_new.html", request, await _new_exam_context(_store(request), form={}, picked=[]))


@routes.post("/teacher/exams")
async def create_exam_submit(request: web.Request) -> web.Response:
    user = await require_user(request, "teacher", "admin")
    form = await request.post()
    heads = [v for v in form.getall("allowed_heads", []) if isinstance(v, str)]
    roster_text = form.get("roster", "")
    roster = [p for p in str(roster_text).replace(",", "\n").split() if p]
    name = str(form.get("name", ""))
    store = _store(request)
    try:
        exam = await sv.create_exam(store, user, name, heads, roster)
    except sv.WebError as exc:
        context = await _new_exam_context(store, form={"name": name, "roster": roster_text}, picked=heads,
                                          error=exc.message)
        return await render("exam_new.html", request, context, status=exc.status)
    raise web.HTTPFound(f"/teacher/exams/{exam.id}")


@routes.get("/teacher/exams/{id}")
async def exam_dashboard(request: web.Request) -> web.Response:
    user = await require_user(request, "teacher", "admin")
    store = _store(request)
    exam = await sv.exam_for_staff(store, user, path_id(request))
    heads = {h.name: h for h in await store.list_heads()}
    roster = await store.list_roster(exam.id)
    return await render("dashboard.html", request, {"exam": exam, "heads": heads, "roster": roster})


async def _set_state(request: web.Request, state: str) -> web.Response:
    user = await require_user(request, "teacher", "admin")
    exam = await sv.set_exam_state(_store(request), user, path_id(request), state)
    raise web.HTTPFound(f"/teacher/exams/{exam.id}" + ("/review" if state == "ended" else ""))


@routes.post("/teacher/exams/{id}/start")
async def start_exam(request: web.Request) -> web.Response:
    return await _set_state(request, "running")


@routes.post("/teacher/exams/{id}/end")
async def end_exam(request: web.Request) -> web.Response:
    return await _set_state(request, "ended")


@routes.get("/teacher/exams/{id}/review")
async def review_page(request: web.Request) -> web.Response:
    user = await require_user(request, "teacher", "admin")
    store = _store(request)
    exam = await sv.exam_for_staff(store, user, path_id(request))
    unreviewed = request.query.get("unreviewed") == "1"
    alerts = await sv.list_alerts(store, exam, state="new" if unreviewed else None)
    events = await sv.list_events(store, exam)
    roster = await store.list_roster(exam.id)
    students: dict[int, dict[str, Any]] = {u.id: {"user": u, "items": [], "alerts": 0} for u in roster}
    for a in alerts:
        entry = students.setdefault(a["student_id"], {"user": None, "items": [], "alerts": 0})
        entry["items"].append({"at": a["opened_at"], "alert": a})
        entry["alerts"] += 1
    if not unreviewed:
        for e in events:
            entry = students.setdefault(e["student_id"], {"user": None, "items": [], "alerts": 0})
            entry["items"].append({"at": e["at"], "event": e})
    for entry in students.values():
        entry["items"].sort(key=lambda item: item["at"] or "")
    ordered = sorted(students.values(), key=lambda s: (-s["alerts"], s["user"].username if s["user"] else ""))
    return await render("review.html", request, {"exam": exam, "students": ordered, "unreviewed": unreviewed,
                                           "total": len(alerts),
                                           "active_heads": await store.list_heads(active_only=True)})


@routes.post("/teacher/alerts/{id}/review")
async def review_submit(request: web.Request) -> web.Response:
    user = await require_user(request, "teacher", "admin")
    form = await _form(request)
    alert = await sv.review_alert(_store(request), user, request.match_info["id"], form.get("state", ""),
                                  form.get("note", ""))
    back = f"/teacher/exams/{alert.exam_id}/review"
    if form.get("unreviewed") == "1":
        back += "?unreviewed=1"
    raise web.HTTPFound(back + f"#alert-{alert.id}")


# ------------------------------------------------------------------------------------------------ admin


async def _admin_users(request: web.Request, status: int = 200, **extra: Any) -> web.Response:
    users = await _store(request).list_users()
    return await render("admin_users.html", request, {"users": users, "roles": ("student", "teacher", "admin"),
                                                **extra}, status=status)


@routes.get("/admin")
async def admin_home(request: web.Request) -> web.Response:
    await require_user(request, "admin")
    return await _admin_users(request)


@routes.post("/admin/users")
async def admin_add_user(request: web.Request) -> web.Response:
    actor = await require_user(request, "admin")
    form = await _form(request)
    try:
        user, generated = await sv.create_user(_store(request), actor, form.get("username", ""),
                                               form.get("full_name", ""), form.get("role", ""),
                                               form.get("password") or None)
    except sv.WebError as exc:
        return await _admin_users(request, exc.status, error=exc.message, form=form)
    notice = f"Created {user.username}." + (f" Their password is: {generated}" if generated else "")
    return await _admin_users(request, notice=notice)


@routes.post("/admin/users/import")
async def admin_import(request: web.Request) -> web.Response:
    actor = await require_user(request, "admin")
    try:
        data, _ = await read_upload(request)
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise sv.bad("roster CSV must be UTF-8 text") from None
        result = await sv.import_roster(_store(request), actor, text)
    except sv.WebError as exc:
        return await _admin_users(request, exc.status, error=exc.message)
    return await _admin_users(request, notice=f"Imported {len(result.created)} user(s); "
                                              f"{len(result.skipped)} existed already.",
                              created=result.created)


@routes.post("/admin/users/{id}/{action:activate|deactivate|password}")
async def admin_user_action(request: web.Request) -> web.Response:
    actor = await require_user(request, "admin")
    action = request.match_info["action"]
    store = _store(request)
    try:
        if action == "password":
            user, generated = await sv.reset_password(store, actor, path_id(request), None)
            notice = f"New password for {user.username}: {generated}"
        else:
            user = await sv.set_user_active(store, actor, path_id(request), action == "activate")
            notice = f"{user.username} is now {'active' if user.active else 'deactivated'}."
    except sv.WebError as exc:
        return await _admin_users(request, exc.status, error=exc.message)
    return await _admin_users(request, notice=notice)


async def _admin_heads(request: web.Request, status: int = 200, **extra: Any) -> web.Response:
    heads = await _store(request).list_heads()
    return await render("admin_heads.html", request, {"heads": heads, **extra}, status=status)


@routes.get("/admin/heads")
async def admin_heads(request: web.Request) -> web.Response:
    await require_user(request, "admin")
    return await _admin_heads(request)


@routes.post("/admin/heads")
async def admin_upload_head(request: web.Request) -> web.Response:
    actor = await require_user(request, "admin")
    try:
        data, filename = await read_upload(request)
        head = await sv.add_head(_store(request), actor, data, filename, request.app.get(CLASSIFIER_KEY))
    except sv.WebError as exc:
        return await _admin_heads(request, exc.status, error=exc.message)
    return await _admin_heads(request, notice=f"Head {head.name} ({head.program}) added and active.")


@routes.post("/admin/heads/{name}/{action:activate|deactivate}")
async def admin_head_action(request: web.Request) -> web.Response:
    actor = await require_user(request, "admin")
    active = request.match_info["action"] == "activate"
    try:
        head = await sv.set_head_active(_store(request), actor, request.match_info["name"], active)
    except sv.WebError as exc:
        return await _admin_heads(request, exc.status, error=exc.message)
    return await _admin_heads(request, notice=f"Head {head.name} is now {'active' if active else 'inactive'}.")


@routes.get("/admin/audit")
async def admin_audit(request: web.Request) -> web.Response:
    await require_user(request, "admin")
    store = _store(request)
    entries = await store.list_audit(limit=500)
    users = {u.id: u.username for u in await store.list_users()}
    return await render("admin_audit.html", request, {"entries": entries, "users": users})
