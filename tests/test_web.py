"""Web app: sessions, CSRF, Origin, rate limits, authorisation of every /api/ route, pages and CSV export."""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import datetime as dt
import hashlib
import hmac
import io
import json
import time
import uuid
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import simplejpeg
from aiohttp import web

import proctor.web
from proctor.appkeys import CLASSIFIER_KEY, CONFIG_KEY, METRICS_KEY, STORE_KEY
from proctor.config import Config, ConfigError
from proctor.metrics import Metrics
from proctor.passwords import hash_password
from proctor.storage.base import Alert, SessionEvent, StoreUnavailable, User
from proctor.storage.sqlite import SqliteStore
from proctor.web import auth
from proctor.web import services as sv
from proctor.web.services import parse_head_file

from fakes import raw_http_status

PASSWORD = "correct-horse-battery"


def head_file(name: str, program: str, description: str = "", threshold: float = 0.5) -> bytes:
    """A real head file (proctor.models.heads format) with zero weights."""
    from proctor.models.backbone import BackboneSpec
    from proctor.models.heads import make_head
    from proctor.models.interface import Preprocessing

    spec = BackboneSpec(weights_hash="ab" * 32, preprocessing=Preprocessing())
    tensors = {"weight": np.zeros((1, 1280), dtype=np.float32), "bias": np.zeros((1,), dtype=np.float32)}
    head = make_head(name, program, "logistic", tensors, spec, threshold=threshold, description=description,
                     metrics={"f1": 0.97, "precision": 0.98})
    return head.to_bytes()


def jpeg_bytes(color: int = 128) -> bytes:
    return simplejpeg.encode_jpeg(np.full((36, 64, 3), color, dtype=np.uint8), quality=80)


class World:
    """Users, heads and one exam per teacher in a real SqliteStore."""

    async def build(self, store: SqliteStore) -> "World":
        self.store = store
        pw = hash_password(PASSWORD)
        self.admin = await store.create_user("admin1", "Ada Admin", "admin", pw)
        self.teacher_a = await store.create_user("teach-a", "Teacher A", "teacher", pw)
        self.teacher_b = await store.create_user("teach-b", "Teacher B", "teacher", pw)
        self.student_a = await store.create_user("stud-a", "Student A", "student", pw)
        self.student_b = await store.create_user("stud-b", "Student B", "student", pw)
        for name, program in (("vscode", "VS Code"), ("python_docs", "Python docs"), ("chat", "Chat")):
            await store.add_head(parse_head_file(head_file(name, program, f"{program} window")))
        self.exam_a = await store.create_exam("Algebra", self.teacher_a.id, ["vscode"], "AAAA2222")
        self.exam_b = await store.create_exam("Biology", self.teacher_b.id, ["vscode"], "BBBB3333")
        await store.add_to_roster(self.exam_a.id, self.student_a.id)
        await store.add_to_roster(self.exam_b.id, self.student_b.id)
        self.alert = Alert(id=uuid.uuid4().hex, exam_id=self.exam_a.id, student_id=self.student_a.id,
                           opened_at=dt.datetime.now(dt.timezone.utc), verdict="unrecognised", program=None,
                           scores={"vscode": 0.1, "chat": 0.05}, evidence=jpeg_bytes())
        await store.add_alert(self.alert)
        await store.add_event(SessionEvent(self.exam_a.id, self.student_a.id, "connect",
                                           dt.datetime.now(dt.timezone.utc), {"displays": 1}))
        return self


async def ws_probe(request: web.Request) -> web.StreamResponse:
    """Stands in for the lead's WebSocket handlers: the same two checks they make before upgrading."""
    if not auth.origin_allowed(request):
        raise auth.forbidden("WebSocket refused: Origin is not allowed")
    await auth.require_user(request)
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    await ws.close()
    return ws


@pytest.fixture
async def world(tmp_path):
    store = await SqliteStore.open(tmp_path / "p.db")
    await store.migrate()
    w = await World().build(store)
    yield w
    await store.close()


def make_app(world: World, tmp_path, config: Config | None = None, classifier=None) -> web.Application:
    """The web part alone, as create_app wires it, with the WebSocket probe route."""
    app = web.Application()
    app[CONFIG_KEY] = config or Config(data_dir=str(tmp_path), database_url=f"sqlite:///{tmp_path}/p.db")
    app[METRICS_KEY] = Metrics()
    app[STORE_KEY] = world.store
    if classifier is not None:
        app[CLASSIFIER_KEY] = classifier
    proctor.web.setup(app)
    app.router.add_get("/ws/probe", ws_probe)
    return app


@pytest.fixture
async def client(aiohttp_client, world, tmp_path):
    return await aiohttp_client(make_app(world, tmp_path))


async def login(client, username: str, password: str = PASSWORD) -> str:
    """Log in through the JSON API; returns the CSRF token (the cookie stays in the client's jar)."""
    resp = await client.post("/api/login", json={"username": username, "password": password})
    assert resp.status == 200, await resp.text()
    data = await resp.json()
    assert data["user"]["username"] == username
    return data["csrf_token"]


async def post(client, path: str, token: str, body=None, **kw):
    return await client.post(path, json=body if body is not None else {}, headers={"X-CSRF-Token": token}, **kw)


# ------------------------------------------------------------------------------------------ sessions


async def test_login_sets_httponly_lax_cookie_and_me_works(client):
    resp = await client.post("/api/login", json={"username": "teach-a", "password": PASSWORD})
    assert resp.status == 200
    cookie = resp.headers["Set-Cookie"]
    assert auth.COOKIE_NAME in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert "Secure" not in cookie  # plain http here; Secure is set under TLS (next test)
    me = await client.get("/api/me")
    assert (await me.json())["user"]["role"] == "teacher"


async def test_password_checks_are_timed_for_the_dashboard(client):
    checks = client.app[METRICS_KEY].password_check_seconds

    def count() -> float:
        return next(s.value for m in checks.collect() for s in m.samples if s.name.endswith("_count"))

    assert count() == 0
    assert (await client.post("/api/login", json={"username": "teach-a", "password": PASSWORD})).status == 200
    assert (await client.post("/api/login", json={"username": "nobody", "password": "nope-nope-nope"})).status == 401
    assert count() == 2  # good and bad logins alike: both wait for an argon2 check


async def test_wrong_password_and_unknown_user_get_the_same_401(client):
    r1 = await client.post("/api/login", json={"username": "teach-a", "password": "nope-nope-nope"})
    r2 = await client.post("/api/login", json={"username": "nobody", "password": "nope-nope-nope"})
    assert r1.status == r2.status == 401
    assert (await r1.json()) == (await r2.json()) == {"error": "wrong username or password"}


async def test_login_body_errors_are_clear(client):
    resp = await client.post("/api/login", data="username=x", headers={"Content-Type": "text/plain"})
    assert resp.status == 400 and "application/json" in (await resp.json())["error"]
    resp = await client.post("/api/login", json={"username": "teach-a"})
    assert resp.status == 400 and "'password'" in (await resp.json())["error"]


def raw_post(path: str, content_type: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: localhost\r\nContent-Type: " + content_type +
            b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n" + extra + b"Connection: close\r\n\r\n" + body)


@pytest.mark.parametrize("path, content_type, body", [
    ("/login", b"multipart/form-data", b"--x\r\n"),  # no boundary
    ("/login", b"application/x-www-form-urlencoded", b"username=\xff&password=x"),  # not UTF-8
    ("/login", b"application/x-www-form-urlencoded; charset=bogus", b"username=a&password=b"),
    ("/api/login", b"application/json", b"[" * 100_000),  # nested past the parser's recursion limit
    ("/api/login", b"application/json; charset=bogus", b"{}"),
    ("/api/login", b"application/json", b'{"username": "\\ud800", "password": "x"}'),  # a lone surrogate
])
async def test_malformed_bodies_are_a_400_not_a_500(client, path, content_type, body, caplog):
    # Before: each of these raised out of the handler, a 500 with a traceback in the log, without logging in.
    assert await raw_http_status(client, raw_post(path, content_type, body)) == 400
    assert "Traceback" not in caplog.text and "Error handling request" not in caplog.text


async def test_token_headers_that_are_not_utf8_are_refused_not_a_500(client, world):
    token = await login(client, "teach-a")
    cookie = "; ".join(f"{c.key}={c.value}" for c in client.session.cookie_jar)
    body = json.dumps({"name": "x"}).encode()
    request = raw_post(f"/api/exams/{world.exam_a.id}/start", b"application/json", body,
                       b"Cookie: " + cookie.encode() + b"\r\nX-CSRF-Token: \xff\xfe" + token.encode()[2:] + b"\r\n")
    assert await raw_http_status(client, request) == 403


async def test_pages_answer_404_past_64_bit_ids_and_503_while_the_database_is_down(client, world, monkeypatch):
    await login(client, "teach-a")
    resp = await client.get("/teacher/exams/99999999999999999999")
    assert resp.status == 404 and "no such id" in await resp.text()

    async def down(*args, **kwargs):
        raise StoreUnavailable("connection refused")

    # The page's own query fails, and so does reading the logged-in user for the error page's header.
    monkeypatch.setattr(world.store, "get_exam", down)
    monkeypatch.setattr(world.store, "get_user", down)
    resp = await client.get(f"/teacher/exams/{world.exam_a.id}")
    assert resp.status == 503 and "database is unavailable" in await resp.text()


async def test_failed_logins_are_rate_limited_per_account(client):
    for _ in range(5):
        resp = await client.post("/api/login", json={"username": "stud-a", "password": "wrong-password!"})
        assert resp.status == 401
    resp = await client.post("/api/login", json={"username": "stud-a", "password": PASSWORD})
    assert resp.status == 429
    assert "too many failed logins" in (await resp.json())["error"]
    # Other accounts from the same address are not locked out by one account's failures.
    assert (await client.post("/api/login", json={"username": "stud-b", "password": PASSWORD})).status == 200


def test_limiter_per_address_and_window():
    now = [0.0]
    limiter = auth.LoginLimiter(per_account=3, per_address=4, window_s=60, clock=lambda: now[0])
    for i in range(4):
        assert limiter.begin(f"user{i}", "10.0.0.1") == (0, "")
        limiter.end(f"user{i}", "10.0.0.1", False)
    assert limiter.wait("someone-else", "10.0.0.1")[0] == pytest.approx(60)
    assert limiter.wait("someone-else", "10.0.0.2")[0] == 0
    now[0] = 61
    assert limiter.wait("someone-else", "10.0.0.1")[0] == 0


def test_limiter_memory_stays_small_under_a_spray_of_huge_usernames():
    limiter = auth.LoginLimiter(per_address=1000)
    for i in range(20):
        name = f"{i}-" + "x" * 1_000_000
        assert limiter.begin(name, "10.0.0.1") == (0, "")
        limiter.end(name, "10.0.0.1", False)
    assert sum(len(key) for key in limiter._failures) < 2_000


async def test_a_megabyte_username_is_a_wrong_login_and_is_audited(client, world):
    resp = await client.post("/api/login", json={"username": "a" * 1_000_000, "password": "not-the-password"})
    assert resp.status == 401, await resp.text()
    assert len(await resp.read()) < 1_000
    failed = [e for e in await world.store.list_audit() if e.action == "login.failed"]
    assert failed[-1].target == "user:" + "a" * 64 and failed[-1].detail["username_length"] == 1_000_000


async def test_simultaneous_logins_cannot_slip_past_the_account_limit(client):
    async def attempt() -> int:
        return (await client.post("/api/login", json={"username": "stud-a", "password": "wrong-password!"})).status

    # Every attempt counts from its start: a burst gets 5 password checks, not 12.
    statuses = await asyncio.gather(*(attempt() for _ in range(12)))
    assert sorted(statuses) == [401] * 5 + [429] * 7


def test_limiter_counts_logins_in_progress_and_caps_them_per_address():
    now = [0.0]
    limiter = auth.LoginLimiter(per_account=2, per_address=10, pending_per_address=3, window_s=60,
                                clock=lambda: now[0])
    assert limiter.begin("a", "10.0.0.1") == limiter.begin("a", "10.0.0.1") == (0, "")
    assert limiter.begin("a", "10.0.0.1") == (5.0, "busy")  # two in progress fill the account's budget
    limiter.end("a", "10.0.0.1", None)  # the database failed: neither a failure nor a success
    assert limiter.begin("a", "10.0.0.1") == (0, "")
    assert limiter.begin("b", "10.0.0.1") == (0, "")  # three in progress from this address now
    assert limiter.begin("c", "10.0.0.1") == (5.0, "busy")
    assert limiter.begin("c", "10.0.0.2") == (0, "")
    for name, address in (("a", "10.0.0.1"), ("a", "10.0.0.1"), ("b", "10.0.0.1"), ("c", "10.0.0.2")):
        limiter.end(name, address, False)
    assert limiter.wait("a", "10.0.0.3")[0] == pytest.approx(60)  # two failures lock "a"
    assert limiter.wait("a", "10.0.0.3")[1] == "failures"
    assert limiter.wait("b", "10.0.0.1")[0] == 0
    limiter.clear("A")  # usernames are case-insensitive here, as at login
    assert limiter.wait("a", "10.0.0.3")[0] == 0


async def test_password_reset_lifts_a_lock_out_and_the_new_password_works(client, world):
    for _ in range(5):
        assert (await client.post("/api/login", json={"username": "stud-a", "password": "wrong!!"})).status == 401
    assert (await client.post("/api/login", json={"username": "stud-a", "password": PASSWORD})).status == 429
    token = await login(client, "admin1")
    new_password = "a-brand-new-passphrase"
    resp = await post(client, f"/api/users/{world.student_a.id}/password", token, {"password": new_password})
    assert resp.status == 200, await resp.text()
    # The reset reaches the limiter as a store notification, in a task of its own.
    for _ in range(100):
        resp = await client.post("/api/login", json={"username": "stud-a", "password": new_password})
        if resp.status != 429:
            break
        await asyncio.sleep(0.02)
    assert resp.status == 200, await resp.text()


async def test_deactivated_user_cannot_log_in(client, world):
    token = await login(client, "admin1")
    resp = await post(client, f"/api/users/{world.student_a.id}/deactivate", token)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["user"]["active"] is False
    resp = await client.post("/api/login", json={"username": "stud-a", "password": PASSWORD})
    assert resp.status == 403 and "deactivated" in (await resp.json())["error"]


async def test_session_cookie_of_deactivated_user_stops_working(client, world):
    await login(client, "stud-a")
    await world.store.set_user_active(world.student_a.id, False)
    resp = await client.get("/api/me")
    assert resp.status == 401


async def test_password_reset_ends_old_sessions(client, world):
    await login(client, "stud-a")
    await world.store.set_password(world.student_a.id, hash_password("another-password-1"))
    assert (await client.get("/api/me")).status == 401


def test_forged_or_expired_cookie_is_refused():
    codec = auth.SessionCodec(b"k" * 32)
    good = codec.encode(auth.Session(user_id=1, csrf="t", expires=time.time() + 60))
    assert codec.decode(good).user_id == 1
    payload, mac = good.split(".")
    forged = auth._b64(json.dumps({"u": 2, "c": "t", "e": int(time.time()) + 60, "p": ""}).encode())
    assert codec.decode(forged + "." + mac) is None
    assert auth.SessionCodec(b"x" * 32).decode(good) is None
    assert codec.decode(codec.encode(auth.Session(user_id=1, csrf="t", expires=time.time() - 1))) is None
    assert codec.decode("garbage") is None


def test_secret_key_is_created_once_and_reused(tmp_path):
    key = auth.load_secret_key(None, str(tmp_path))
    assert len(key) >= 32
    assert auth.load_secret_key(None, str(tmp_path)) == key
    assert (tmp_path / "secret_key").stat().st_mode & 0o077 == 0
    assert auth.load_secret_key("configured-key-16+", str(tmp_path)) == b"configured-key-16+"
    with pytest.raises(ConfigError, match="secret_key"):
        auth.load_secret_key("short", str(tmp_path))


async def test_logout_clears_cookie(client):
    token = await login(client, "teach-a")
    resp = await post(client, "/api/logout", token)
    assert resp.status == 200
    assert (await client.get("/api/me")).status == 401


async def test_a_copy_of_the_cookie_stops_working_at_logout_and_a_new_login_works(client):
    token = await login(client, "teach-a")
    copied = {c.key: c.value for c in client.session.cookie_jar}
    assert (await post(client, "/api/logout", token)).status == 200
    assert (await client.get("/api/me", cookies=copied)).status == 401
    await login(client, "teach-a")
    assert (await client.get("/api/me")).status == 200


async def test_reactivating_an_account_does_not_revive_its_old_cookies(client, world):
    await login(client, "stud-a")
    copied = {c.key: c.value for c in client.session.cookie_jar}
    await world.store.set_user_active(world.student_a.id, False)
    await world.store.set_user_active(world.student_a.id, True)
    client.session.cookie_jar.clear()
    assert (await client.get("/api/me", cookies=copied)).status == 401


def test_an_account_that_never_logged_out_keeps_the_cookies_signed_before_the_session_epoch():
    # Upgrading to the epoch must not log out a hall mid-exam: epoch 0 signs what the old fingerprint signed.
    codec = auth.SessionCodec(b"k" * 32)
    user = User(1, "u", "", "student", True, "$argon2id$v=19$m=65536,t=3,p=4$abc$def", None)
    old = hmac.new(b"k" * 32, b"pw:" + user.password_hash.encode(), hashlib.sha256).hexdigest()[:16]
    assert codec.session_fingerprint(user) == old
    assert codec.session_fingerprint(dataclasses.replace(user, session_epoch=1)) != old


# --------------------------------------------------------------------------------------------- CSRF


async def test_api_post_without_csrf_header_is_refused(client):
    await login(client, "teach-a")
    resp = await client.post("/api/exams", json={"name": "X", "allowed_heads": [], "roster": []})
    assert resp.status == 403
    assert "CSRF" in (await resp.json())["error"]


async def test_form_without_csrf_token_is_refused(client):
    await login(client, "teach-a")
    resp = await client.post("/teacher/exams", data={"name": "No token"}, allow_redirects=False)
    assert resp.status == 403
    assert "CSRF token" in await resp.text()
    resp = await client.post("/teacher/exams", data={"name": "Bad token", "csrf_token": "forged"},
                             allow_redirects=False)
    assert resp.status == 403


async def test_login_form_needs_the_token_from_the_login_page(client):
    resp = await client.post("/login", data={"username": "teach-a", "password": PASSWORD}, allow_redirects=False)
    assert resp.status == 403
    page = await client.get("/login")
    token = _csrf_from(await page.text())
    resp = await client.post("/login", data={"username": "teach-a", "password": PASSWORD, "csrf_token": token},
                             allow_redirects=False)
    assert resp.status == 302 and resp.headers["Location"] == "/teacher"


async def test_foreign_origin_on_unsafe_request_is_refused(client):
    token = await login(client, "teach-a")
    resp = await client.post("/api/exams", json={"name": "X"}, headers={"X-CSRF-Token": token,
                                                                        "Origin": "https://evil.example"})
    assert resp.status == 403 and "Origin" in (await resp.json())["error"]


def _csrf_from(html: str) -> str:
    marker = 'name="csrf_token" value="'
    start = html.index(marker) + len(marker)
    return html[start:html.index('"', start)]


# -------------------------------------------------------------------------------------- WebSocket checks


async def test_websocket_with_forged_origin_is_refused(client):
    await login(client, "teach-a")
    host = f"http://{client.server.host}:{client.server.port}"
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect("/ws/probe", headers={"Origin": "https://evil.example"})
    assert info.value.status == 403
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect("/ws/probe")  # no Origin at all
    assert info.value.status == 403
    ws = await client.ws_connect("/ws/probe", headers={"Origin": host})
    await ws.close()


async def test_websocket_without_session_is_401(client):
    host = f"http://{client.server.host}:{client.server.port}"
    resp = await client.get("/ws/probe", headers={"Origin": host, "Connection": "Upgrade", "Upgrade": "websocket",
                                                  "Sec-WebSocket-Version": "13",
                                                  "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    assert resp.status == 401
    assert "not logged in" in (await resp.json())["error"]


async def test_allowed_origins_from_config(aiohttp_client, world, tmp_path):
    config = Config(data_dir=str(tmp_path), allowed_origins=("https://proctor.school.example",))
    c = await aiohttp_client(make_app(world, tmp_path, config=config))
    await login(c, "teach-a")
    ws = await c.ws_connect("/ws/probe", headers={"Origin": "https://proctor.school.example"})
    await ws.close()
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:  # only the configured one
        await c.ws_connect("/ws/probe", headers={"Origin": "https://other.school.example"})
    assert info.value.status == 403


# ------------------------------------------------------------------------------------------ authorisation


async def test_unauthenticated_api_is_401_everywhere(client, world):
    for path in ("/api/me", "/api/exams", "/api/heads", "/api/users", f"/api/exams/{world.exam_a.id}",
                 f"/api/alerts/{world.alert.id}", f"/api/alerts/{world.alert.id}/evidence",
                 f"/api/exams/{world.exam_a.id}/export.csv"):
        resp = await client.get(path)
        assert resp.status == 401, path
        assert "not logged in" in (await resp.json())["error"]


async def test_teacher_b_cannot_read_teacher_a_evidence_alerts_or_exam(client, world):
    token = await login(client, "teach-b")
    for path in (f"/api/alerts/{world.alert.id}/evidence", f"/api/alerts/{world.alert.id}",
                 f"/api/exams/{world.exam_a.id}", f"/api/exams/{world.exam_a.id}/alerts",
                 f"/api/exams/{world.exam_a.id}/events", f"/api/exams/{world.exam_a.id}/export.csv"):
        resp = await client.get(path)
        assert resp.status == 403, path
        assert "another teacher" in (await resp.json())["error"]
    resp = await post(client, f"/api/alerts/{world.alert.id}/review", token, {"state": "reviewed", "note": "x"})
    assert resp.status == 403
    resp = await post(client, f"/api/exams/{world.exam_a.id}/start", token)
    assert resp.status == 403
    exams = (await (await client.get("/api/exams")).json())["exams"]
    assert [e["name"] for e in exams] == ["Biology"]
    # Pages too.
    resp = await client.get(f"/teacher/exams/{world.exam_a.id}")
    assert resp.status == 403 and "another teacher" in await resp.text()


async def test_teacher_a_reads_evidence_and_it_is_audited(client, world):
    await login(client, "teach-a")
    resp = await client.get(f"/api/alerts/{world.alert.id}/evidence")
    assert resp.status == 200 and resp.content_type == "image/jpeg"
    assert await resp.read() == world.alert.evidence
    audit = await world.store.list_audit()
    assert any(e.action == "evidence.viewed" and e.target == f"alert:{world.alert.id}" for e in audit)


async def test_admin_sees_everything(client, world):
    await login(client, "admin1")
    exams = (await (await client.get("/api/exams")).json())["exams"]
    assert {e["name"] for e in exams} == {"Algebra", "Biology"}
    assert (await client.get(f"/api/alerts/{world.alert.id}/evidence")).status == 200


async def test_student_sees_only_enrolled_exams_and_no_staff_views(client, world):
    await login(client, "stud-b")
    exams = (await (await client.get("/api/exams")).json())["exams"]
    assert [e["name"] for e in exams] == ["Biology"] and "join_code" not in exams[0]
    resp = await client.get(f"/api/exams/{world.exam_a.id}")
    assert resp.status == 403 and "not on the roster" in (await resp.json())["error"]
    for path in (f"/api/alerts/{world.alert.id}/evidence", f"/api/exams/{world.exam_b.id}/alerts",
                 "/api/users", "/api/heads"):
        resp = await client.get(path)
        assert resp.status == 403, path
        assert "role" in (await resp.json())["error"] or "students" in (await resp.json())["error"]
    resp = await client.get(f"/student/exams/{world.exam_a.id}")
    assert resp.status == 403


async def test_teacher_cannot_use_admin_api(client, world):
    token = await login(client, "teach-a")
    resp = await post(client, "/api/users", token, {"username": "x", "role": "admin"})
    assert resp.status == 403
    assert (await resp.json())["error"] == "this needs the role admin; you are logged in as a teacher"
    teacher_b = world.teacher_b.id
    for path in (f"/api/users/{teacher_b}/deactivate", f"/api/users/{teacher_b}/activate",
                 f"/api/users/{teacher_b}/password", "/api/users/import", "/api/heads",
                 "/api/heads/vscode/deactivate", "/api/heads/vscode/activate"):
        resp = await post(client, path, token)
        assert resp.status == 403, path
        assert "needs the role admin" in (await resp.json())["error"], path
    for path in ("/api/users", "/api/audit"):
        assert (await client.get(path)).status == 403, path


async def test_unknown_ids_are_404_with_the_id_named(client):
    await login(client, "admin1")
    assert (await (await client.get("/api/exams/9999")).json())["error"] == "no exam with id 9999"
    resp = await client.get("/api/alerts/deadbeef/evidence")
    assert resp.status == 404 and "deadbeef" in (await resp.json())["error"]
    assert (await client.get("/api/exams/abc")).status == 404


# ---------------------------------------------------------------------------------------------- exams


async def test_teacher_creates_starts_and_ends_an_exam(client, world):
    token = await login(client, "teach-a")
    resp = await post(client, "/api/exams", token, {"name": "Physics", "allowed_heads": ["vscode", "python_docs"],
                                                    "roster": ["stud-a", "stud-b"]})
    assert resp.status == 201, await resp.text()
    exam = (await resp.json())["exam"]
    assert exam["state"] == "draft" and len(exam["join_code"]) == 8
    assert [u["username"] for u in exam["roster"]] == ["stud-a", "stud-b"]
    resp = await post(client, f"/api/exams/{exam['id']}/start", token)
    assert (await resp.json())["exam"]["state"] == "running"
    resp = await post(client, f"/api/exams/{exam['id']}/start", token)
    assert resp.status == 409 and "cannot go from running to running" in (await resp.json())["error"]
    resp = await post(client, f"/api/exams/{exam['id']}/end", token)
    assert (await resp.json())["exam"]["state"] == "ended"
    actions = [e.action for e in await world.store.list_audit()]
    assert "exam.started" in actions and "exam.ended" in actions


async def test_create_exam_bad_input_names_the_value(client, world):
    token = await login(client, "teach-a")
    cases = [({"name": "", "allowed_heads": [], "roster": []}, "'name'"),
             ({"name": "X", "allowed_heads": ["nope"], "roster": []}, "nope"),
             ({"name": "X", "allowed_heads": [], "roster": ["ghost"]}, "ghost"),
             ({"name": "X", "allowed_heads": [], "roster": ["teach-b"]}, "not student"),
             ({"name": "X", "allowed_heads": "vscode", "roster": []}, "list of strings")]
    for body, expected in cases:
        resp = await post(client, "/api/exams", token, body)
        assert resp.status == 400, body
        assert expected in (await resp.json())["error"], body


async def test_student_joins_with_code(client, world):
    token = await login(client, "stud-b")
    resp = await post(client, "/api/exams/join", token, {"code": "aaaa-2222"})
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["exam"]["id"] == world.exam_a.id
    assert await world.store.is_on_roster(world.exam_a.id, world.student_b.id)
    resp = await post(client, "/api/exams/join", token, {"code": "ZZZZ9999"})
    assert resp.status == 404 and "ZZZZ9999" in (await resp.json())["error"]


async def test_alert_list_review_and_csv_export(client, world):
    token = await login(client, "teach-a")
    alerts = (await (await client.get(f"/api/exams/{world.exam_a.id}/alerts?state=new")).json())["alerts"]
    assert [a["id"] for a in alerts] == [world.alert.id]
    assert alerts[0]["top_scores"][0] == ["vscode", 0.1] and alerts[0]["username"] == "stud-a"
    resp = await client.get(f"/api/exams/{world.exam_a.id}/alerts?state=bogus")
    assert resp.status == 400 and "bogus" in (await resp.json())["error"]
    resp = await post(client, f"/api/alerts/{world.alert.id}/review", token, {"state": "maybe", "note": ""})
    assert resp.status == 400 and "maybe" in (await resp.json())["error"]
    resp = await post(client, f"/api/alerts/{world.alert.id}/review", token,
                      {"state": "reviewed", "note": "=HYPERLINK(\"x\") talked to student"})
    assert (await resp.json())["alert"]["review_state"] == "reviewed"
    resp = await client.get(f"/api/exams/{world.exam_a.id}/export.csv")
    assert resp.status == 200 and resp.content_type == "text/csv"
    rows = list(csv.DictReader(io.StringIO(await resp.text())))
    assert len(rows) == 1 and rows[0]["alert_id"] == world.alert.id and rows[0]["review_state"] == "reviewed"
    assert rows[0]["review_note"].startswith("'=")  # no formula injection into spreadsheets
    events = (await (await client.get(f"/api/exams/{world.exam_a.id}/events")).json())["events"]
    assert events[0]["kind"] == "connect" and events[0]["username"] == "stud-a"


# ---------------------------------------------------------------------------------------------- admin


async def test_admin_user_management(client, world):
    token = await login(client, "admin1")
    resp = await post(client, "/api/users", token, {"username": "new.teacher", "full_name": "New", "role": "teacher"})
    assert resp.status == 201
    data = await resp.json()
    assert data["user"]["role"] == "teacher" and len(data["password"]) >= 16
    resp = await post(client, "/api/users", token, {"username": "new.teacher", "role": "teacher"})
    assert resp.status == 409 and "new.teacher" in (await resp.json())["error"]
    resp = await post(client, "/api/users", token, {"username": "x y", "role": "teacher"})
    assert resp.status == 400 and "x y" in (await resp.json())["error"]
    resp = await post(client, "/api/users", token, {"username": "weak", "role": "student", "password": "short"})
    assert resp.status == 400 and "too short" in (await resp.json())["error"]
    resp = await post(client, f"/api/users/{world.admin.id}/deactivate", token)
    assert resp.status == 409
    resp = await post(client, f"/api/users/{world.student_a.id}/password", token)
    new_password = (await resp.json())["password"]
    client.session.cookie_jar.clear()
    await login(client, "stud-a", new_password)


async def test_roster_import(client, world):
    token = await login(client, "admin1")
    body = "username,full_name\nnew1,First New\nnew2,Second New\nstud-a,Existing\n"
    resp = await client.post("/api/users/import", data=body, headers={"X-CSRF-Token": token,
                                                                      "Content-Type": "text/csv"})
    assert resp.status == 201, await resp.text()
    data = await resp.json()
    assert [c["user"]["username"] for c in data["created"]] == ["new1", "new2"] and data["skipped"] == ["stud-a"]
    bad = "username,role\nok1,student\nbad name,student\nok2,wizard\n"
    resp = await client.post("/api/users/import", data=bad, headers={"X-CSRF-Token": token,
                                                                     "Content-Type": "text/csv"})
    err = (await resp.json())["error"]
    assert resp.status == 400 and "line 3" in err and "line 4" in err and "wizard" in err
    assert "ok1" not in {u.username for u in await world.store.list_users()}
    resp = await client.post("/api/users/import", data="name\nx\n", headers={"X-CSRF-Token": token})
    assert resp.status == 400 and "'username' column" in (await resp.json())["error"]
    # A misspelt column was ignored before (every full name silently empty): now refused, like the CLI's.
    resp = await client.post("/api/users/import", data="username,fullname\nok3,Ok Three\n",
                             headers={"X-CSRF-Token": token})
    assert resp.status == 400 and "unknown column(s) 'fullname'" in (await resp.json())["error"]
    # Each new user costs an argon2 hash on the server: a huge file is refused before any is made.
    huge = "username\n" + "".join(f"u{i}\n" for i in range(sv.MAX_IMPORT_ROWS + 1))
    resp = await client.post("/api/users/import", data=huge, headers={"X-CSRF-Token": token})
    assert resp.status == 400 and f"at most {sv.MAX_IMPORT_ROWS} per import" in (await resp.json())["error"]
    assert "u0" not in {u.username for u in await world.store.list_users()}
    resp = await client.post("/api/users/import", data="password,username\nCorrect-Horse-42,new3\n",
                             headers={"X-CSRF-Token": token})
    assert resp.status == 201 and (await resp.json())["created"][0]["password"] is None
    # "New3" is new3, not a second account next to her.
    resp = await client.post("/api/users/import", data="username\nNew3\n", headers={"X-CSRF-Token": token})
    assert resp.status == 201 and (await resp.json())["skipped"] == ["New3"]
    client.session.cookie_jar.clear()
    await login(client, "new3", "Correct-Horse-42")


async def test_heads_upload_activate_deactivate(client, world):
    token = await login(client, "admin1")
    received = []

    async def listener(channel, payload):
        received.append((channel, payload))

    await world.store.subscribe(listener)
    resp = await client.post("/api/heads?filename=word.safetensors", data=head_file("word", "Word", "MS Word"),
                             headers={"X-CSRF-Token": token, "Content-Type": "application/octet-stream"})
    assert resp.status == 201, await resp.text()
    assert (await resp.json())["head"]["metrics"]["f1"] == 0.97
    resp = await post(client, "/api/heads/word/deactivate", token)
    assert (await resp.json())["head"]["active"] is False
    heads = {h["name"]: h for h in (await (await client.get("/api/heads")).json())["heads"]}
    assert heads["word"]["active"] is False
    assert any(ch == "heads" and p.get("name") == "word" for ch, p in received)
    resp = await client.post("/api/heads", data=b"not a head file at all",
                             headers={"X-CSRF-Token": token, "Content-Type": "application/octet-stream"})
    assert resp.status == 400 and "safetensors" in (await resp.json())["error"]
    resp = await post(client, "/api/heads/nope/activate", token)
    assert resp.status == 404 and "nope" in (await resp.json())["error"]
    actions = [e.action for e in await world.store.list_audit()]
    assert "head.added" in actions and "head.deactivated" in actions


# ---------------------------------------------------------------------------------------------- pages


async def test_pages_redirect_to_login_and_render_per_role(client, world):
    resp = await client.get("/teacher", allow_redirects=False)
    assert resp.status == 302 and resp.headers["Location"].startswith("/login?next=")
    await login(client, "teach-a")
    for path in ("/teacher", "/teacher/exams/new", f"/teacher/exams/{world.exam_a.id}",
                 f"/teacher/exams/{world.exam_a.id}/review", f"/teacher/exams/{world.exam_a.id}/review?unreviewed=1"):
        resp = await client.get(path)
        assert resp.status == 200, path
        html = await resp.text()
        assert "https://" not in html.replace("https:", "") and "cdn" not in html.lower(), path
    assert (await client.get("/admin")).status == 403
    csp = resp.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    assert resp.headers["X-Frame-Options"] == "DENY"


async def test_admin_pages_render(client, world):
    await login(client, "admin1")
    for path in ("/admin", "/admin/heads", "/admin/audit"):
        resp = await client.get(path)
        assert resp.status == 200, path
    html = await (await client.get("/admin/heads")).text()
    assert "VS Code window" in html and "f1" in html


async def test_student_page_has_consent_and_stream_module(client, world):
    await login(client, "stud-a")
    html = await (await client.get(f"/student/exams/{world.exam_a.id}")).text()
    assert "what is captured" in html and "Share screen" in html and "/static/student.js" in html
    js = await client.get("/static/stream.js")
    assert js.status == 200 and "getDisplayMedia" in await js.text()


async def test_open_redirect_after_login_is_refused(client):
    page = await client.get("/login")
    token = _csrf_from(await page.text())
    resp = await client.post("/login", data={"username": "teach-a", "password": PASSWORD, "csrf_token": token,
                                             "next": "//evil.example/x"}, allow_redirects=False)
    assert resp.headers["Location"] == "/teacher"
    # A browser strips the tab and reads "//evil.example/x": a host, not a path.
    for target, expected in (("/\t/evil.example/x", "/teacher"), ("/\n/evil.example/x", "/teacher"),
                             ("/ /evil.example/x", "/teacher"), ("/teacher/exams/new?x=1", "/teacher/exams/new?x=1")):
        client.session.cookie_jar.clear()
        token = _csrf_from(await (await client.get("/login")).text())
        resp = await client.post("/login", data={"username": "teach-a", "password": PASSWORD, "csrf_token": token,
                                                 "next": target}, allow_redirects=False)
        assert resp.status == 302 and resp.headers["Location"] == expected, target


async def test_page_form_creates_exam(client, world):
    await login(client, "teach-a")
    token = _csrf_from(await (await client.get("/teacher/exams/new")).text())
    resp = await client.post("/teacher/exams", data=[("csrf_token", token), ("name", "Chemistry"),
                                                     ("allowed_heads", "vscode"), ("allowed_heads", "chat"),
                                                     ("roster", "stud-a, stud-b")], allow_redirects=False)
    assert resp.status == 302, await resp.text()
    exams = await world.store.list_exams(owner_id=world.teacher_a.id)
    chem = next(e for e in exams if e.name == "Chemistry")
    assert set(chem.allowed_heads) == {"vscode", "chat"}
    assert {u.username for u in await world.store.list_roster(chem.id)} == {"stud-a", "stud-b"}
    resp = await client.post("/teacher/exams", data=[("csrf_token", token), ("name", "Bad"), ("roster", "ghost")])
    assert resp.status == 400 and "ghost" in await resp.text()


async def test_admin_forms_add_user_import_and_upload_head(client, world):
    await login(client, "admin1")
    token = _csrf_from(await (await client.get("/admin")).text())
    resp = await client.post("/admin/users", data={"csrf_token": token, "username": "formuser",
                                                   "full_name": "Form User", "role": "student", "password": ""})
    html = await resp.text()
    assert resp.status == 200 and "Created formuser. Their password is:" in html
    form = aiohttp.FormData()
    form.add_field("csrf_token", token)
    form.add_field("file", b"username,full_name\ncsv1,From CSV\n", filename="roster.csv", content_type="text/csv")
    resp = await client.post("/admin/users/import", data=form)
    assert resp.status == 200 and "Imported 1 user(s)" in await resp.text()
    form = aiohttp.FormData()
    form.add_field("csrf_token", token)
    form.add_field("file", head_file("excel", "Excel", "Spreadsheet"), filename="excel.safetensors")
    resp = await client.post("/admin/heads", data=form)
    assert resp.status == 200 and "Head excel (Excel) added" in await resp.text()
    form = aiohttp.FormData()  # the same upload without the token is refused
    form.add_field("file", head_file("word", "Word"), filename="word.safetensors")
    resp = await client.post("/admin/heads", data=form)
    assert resp.status == 403
    resp = await client.post("/admin/heads/excel/deactivate", data={"csrf_token": token})
    assert "Head excel is now inactive" in await resp.text()


async def test_review_form_and_logout_form(client, world):
    await login(client, "teach-a")
    page = await client.get(f"/teacher/exams/{world.exam_a.id}/review")
    token = _csrf_from(await page.text())
    resp = await client.post(f"/teacher/alerts/{world.alert.id}/review",
                             data={"csrf_token": token, "state": "false_positive", "note": "glare"},
                             allow_redirects=False)
    assert resp.status == 302 and resp.headers["Location"].endswith(f"/review#alert-{world.alert.id}")
    assert (await world.store.get_alert(world.alert.id)).review_state == "false_positive"
    copied = {c.key: c.value for c in client.session.cookie_jar}
    resp = await client.post("/logout", data={"csrf_token": token}, allow_redirects=False)
    assert resp.status == 302 and resp.headers["Location"] == "/login"
    assert (await client.get("/api/me")).status == 401
    assert (await client.get("/api/me", cookies=copied)).status == 401  # the page's logout ends it too


async def test_head_the_running_engine_cannot_load_is_refused_at_upload(aiohttp_client, world, tmp_path):
    class Checker:
        def check_head(self, head):
            return f"head {head.name!r} was made for another backbone"

    client = await aiohttp_client(make_app(world, tmp_path, classifier=Checker()))
    token = await login(client, "admin1")
    resp = await client.post("/api/heads?filename=odd.safetensors", data=head_file("odd", "Odd"),
                             headers={"X-CSRF-Token": token, "Content-Type": "application/octet-stream"})
    assert resp.status == 400
    assert (await resp.json())["error"] == "odd.safetensors: head 'odd' was made for another backbone"
    assert "odd" not in {h.name for h in await world.store.list_heads()}


def test_openapi_file_lists_every_api_route_and_nothing_else(tmp_path):
    yaml = pytest.importorskip("yaml")
    spec = yaml.safe_load((Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml").read_text())
    documented = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}
    app = web.Application()
    app[CONFIG_KEY] = Config(data_dir=str(tmp_path))
    proctor.web.setup(app)
    served = set()
    for route in app.router.routes():
        path = route.resource.canonical if route.resource else ""
        if not path.startswith("/api/") or route.method == "HEAD":
            continue
        if "{action}" in path:  # one handler for start|end, activate|deactivate
            pattern = route.resource.get_info()["pattern"].pattern
            for action in pattern.split("(?P<action>")[1].split(")")[0].split("|"):
                served.add((route.method, path.replace("{action}", action)))
        else:
            served.add((route.method, path))
    assert documented == served


async def test_alert_lists_do_not_read_the_evidence_of_every_alert(client, world, monkeypatch):
    asked = []
    real = world.store.list_alerts

    async def spy(*args, **kwargs):
        asked.append(kwargs.get("with_evidence", True))
        return await real(*args, **kwargs)

    monkeypatch.setattr(world.store, "list_alerts", spy)
    await login(client, "teach-a")
    resp = await client.get(f"/api/exams/{world.exam_a.id}/alerts")
    assert resp.status == 200
    assert [a["id"] for a in (await resp.json())["alerts"]] == [world.alert.id]
    assert (await client.get(f"/api/exams/{world.exam_a.id}/export.csv")).status == 200
    assert (await client.get(f"/teacher/exams/{world.exam_a.id}/review")).status == 200
    assert asked == [False, False, False]


async def test_head_upload_is_checked_off_the_event_loop(aiohttp_client, world, tmp_path):
    import threading

    threads = []

    class Checker:
        def check_head(self, head):
            threads.append(threading.current_thread())  # the engine may load a backbone here: seconds
            return None

    client = await aiohttp_client(make_app(world, tmp_path, classifier=Checker()))
    token = await login(client, "admin1")
    resp = await client.post("/api/heads?filename=new.safetensors", data=head_file("newhead", "New"),
                             headers={"X-CSRF-Token": token, "Content-Type": "application/octet-stream"})
    assert resp.status == 201, await resp.text()
    assert len(threads) == 1 and threads[0] is not threading.current_thread()


async def test_ids_past_64_bits_are_a_clear_error(client, world):
    await login(client, "teach-a")
    resp = await client.get(f"/api/exams/{10**30}")
    assert resp.status == 404  # as on the WebSocket handshake: no exam has that id
    assert (await resp.json())["error"] == f"no such id: {10**30}"
