"""The web app's login inside the real server (create_app): who may open which WebSocket, with which Origin."""

from __future__ import annotations

import asyncio
import io
import shutil
import ssl
import subprocess
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from fakes import FakeClassifier
from proctor.config import MAX_REQUEST_BYTES, Config
from proctor.passwords import hash_password
from proctor.storage.base import StoreUnavailable
from proctor.server import create_app
from proctor.web.services import parse_head_file
from test_web import head_file

PASSWORD = "correct-horse-battery"
MAKE_CERT = Path(__file__).resolve().parent.parent / "scripts" / "make-dev-cert"


@pytest.fixture
async def hall(store):
    pw = hash_password(PASSWORD)
    teacher_a = await store.create_user("teach-a", "Teacher A", "teacher", pw)
    await store.create_user("teach-b", "Teacher B", "teacher", pw)
    on_roster = await store.create_user("stud-in", "Student In", "student", pw)
    await store.create_user("stud-out", "Student Out", "student", pw)
    await store.add_head(parse_head_file(head_file("editor", "Code editor")))
    exam = await store.create_exam("Algebra", teacher_a.id, ["editor"], "JOINX2YZ")
    await store.add_to_roster(exam.id, on_roster.id)
    return await store.set_exam_state(exam.id, "running")


@pytest.fixture
async def client(aiohttp_client, tmp_path, store, hall):
    config = Config(database_url=f"sqlite:///{tmp_path}/test.db", data_dir=str(tmp_path))
    return await aiohttp_client(create_app(config, store=store, classifier=FakeClassifier()))


async def login(client, username):
    resp = await client.post("/api/login", json={"username": username, "password": PASSWORD})
    assert resp.status == 200, await resp.text()
    return (await resp.json())["csrf_token"]


def origin(client):
    return f"http://{client.server.host}:{client.server.port}"


async def ws_status(client, path, headers):
    """The HTTP status of a refused WebSocket handshake (101 when it was accepted)."""
    try:
        ws = await client.ws_connect(path, headers=headers)
    except aiohttp.WSServerHandshakeError as exc:
        return exc.status
    await ws.close()
    return 101


async def test_student_not_on_roster_cannot_stream(client, hall):
    await login(client, "stud-out")
    assert await ws_status(client, f"/ws/exams/{hall.id}/stream", {"Origin": origin(client)}) == 403


async def test_student_on_roster_streams(client, hall):
    await login(client, "stud-in")
    ws = await client.ws_connect(f"/ws/exams/{hall.id}/stream", headers={"Origin": origin(client)})
    assert (await ws.receive_json(timeout=5))["type"] == "config"
    await ws.close()


async def test_student_who_joins_with_code_may_stream(client, hall):
    token = await login(client, "stud-out")
    resp = await client.post("/api/exams/join", json={"code": "joinx2yz"}, headers={"X-CSRF-Token": token})
    assert resp.status == 200, await resp.text()
    ws = await client.ws_connect(f"/ws/exams/{hall.id}/stream", headers={"Origin": origin(client)})
    assert (await ws.receive_json(timeout=5))["type"] == "config"
    await ws.close()


async def test_forged_origin_is_refused_on_both_websockets(client, hall):
    await login(client, "stud-in")
    evil = {"Origin": "https://evil.example"}
    assert await ws_status(client, f"/ws/exams/{hall.id}/stream", evil) == 403
    assert await ws_status(client, f"/ws/exams/{hall.id}/stream", {}) == 403  # no Origin at all
    client.session.cookie_jar.clear()
    await login(client, "teach-a")
    assert await ws_status(client, f"/ws/exams/{hall.id}/live", evil) == 403
    assert await ws_status(client, f"/ws/exams/{hall.id}/live", {"Origin": origin(client)}) == 101


async def test_teacher_b_cannot_watch_teacher_a_exam(client, hall):
    await login(client, "teach-b")
    assert await ws_status(client, f"/ws/exams/{hall.id}/live", {"Origin": origin(client)}) == 403


async def test_websocket_without_login_is_401(client, hall):
    assert await ws_status(client, f"/ws/exams/{hall.id}/stream", {"Origin": origin(client)}) == 401


async def test_pages_and_api_are_served_by_the_real_app(client, hall):
    assert (await client.get("/login")).status == 200
    assert (await client.get("/static/stream.js")).status == 200
    await login(client, "teach-a")
    exams = (await (await client.get("/api/exams")).json())["exams"]
    assert [e["id"] for e in exams] == [hall.id]


async def test_ending_the_exam_closes_student_streams(client, hall):
    await login(client, "stud-in")
    ws = await client.ws_connect(f"/ws/exams/{hall.id}/stream", headers={"Origin": origin(client)})
    assert (await ws.receive_json(timeout=5))["type"] == "config"
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as other:
        base = f"http://{client.server.host}:{client.server.port}"
        resp = await other.post(base + "/api/login", json={"username": "teach-a", "password": PASSWORD})
        token = (await resp.json())["csrf_token"]
        resp = await other.post(base + f"/api/exams/{hall.id}/end", headers={"X-CSRF-Token": token})
        assert resp.status == 200, await resp.text()
    assert await close_code(ws) == 4000
    await ws.close()


async def test_an_exam_ends_for_the_students_even_when_its_audit_entry_cannot_be_written(client, hall, store,
                                                                                        monkeypatch):
    await login(client, "stud-in")
    ws = await client.ws_connect(f"/ws/exams/{hall.id}/stream", headers={"Origin": origin(client)})
    assert (await ws.receive_json(timeout=5))["type"] == "config"
    audit, failed = store.audit, []

    async def audit_down(actor_id, action, target, detail=None):
        if action == "exam.ended" and not failed:
            failed.append(action)
            raise StoreUnavailable("database is locked")
        return await audit(actor_id, action, target, detail)

    monkeypatch.setattr(store, "audit", audit_down)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as teacher:
        resp = await teacher.post(origin(client) + "/api/login", json={"username": "teach-a", "password": PASSWORD})
        token = (await resp.json())["csrf_token"]
        resp = await teacher.post(origin(client) + f"/api/exams/{hall.id}/end", headers={"X-CSRF-Token": token})
        assert resp.status == 503  # the teacher hears that something failed...
        assert await close_code(ws) == 4000  # ...but the exam has ended, and the screens stop being shared
        # Ending it again (the teacher's retry) is not a conflict: it says so once more, and is audited.
        resp = await teacher.post(origin(client) + f"/api/exams/{hall.id}/end", headers={"X-CSRF-Token": token})
        assert resp.status == 200 and (await resp.json())["exam"]["state"] == "ended"
    ended = [e for e in await store.list_audit() if e.action == "exam.ended"]
    assert [e.detail for e in ended] == [{"name": hall.name, "again": True}]
    await ws.close()


@pytest.mark.parametrize("lost", ["exam ended", "logged out"])
async def test_a_lost_notice_is_made_good_by_the_periodic_resync(client, hall, store, monkeypatch, lost):
    from proctor import server

    ws, _, code = await stream_and_lose_a_notice(client, hall, store, monkeypatch, lost)
    with pytest.raises(asyncio.TimeoutError):  # nothing closes it before the resync is due...
        await ws.receive(timeout=1.2)
    monkeypatch.setattr(server, "RESYNC_S", 0.0)
    assert await close_code(ws) == code  # ...and the next one does, with no notice at all
    await ws.close()


async def close_code(ws):
    """The close code the server sends, skipping the messages before it."""
    msg = await ws.receive(timeout=5)
    while msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):  # verdicts, heartbeats
        msg = await ws.receive(timeout=5)
    assert msg.type == aiohttp.WSMsgType.CLOSE, msg
    return msg.data


async def admin_post(client, path, body=None):
    """POST as a freshly created admin from a second cookie jar; returns the response's status."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as other:
        base = origin(client)
        resp = await other.post(base + "/api/login", json={"username": "admin-1", "password": PASSWORD})
        token = (await resp.json())["csrf_token"]
        resp = await other.post(base + path, json=body or {}, headers={"X-CSRF-Token": token})
        return resp.status


@pytest.mark.parametrize("username, socket, first, action, body, code, reconnect", [
    # Deactivated while streaming: the stream ends now, not at the next reconnect.
    ("stud-in", "stream", "config", "deactivate", None, 4003, (401, 403)),
    # The page's login ended with the old password: the stream ends now, and a reconnect is refused.
    ("stud-in", "stream", "config", "password", {"password": "a-new-passphrase!"}, 4004, (401,)),
    # Otherwise a deactivated teacher would go on receiving the hall's alerts and evidence thumbnails.
    ("teach-a", "live", "snapshot", "deactivate", None, 4003, (401, 403)),
])
async def test_deactivation_or_password_reset_closes_the_accounts_open_sockets(client, hall, store, username, socket,
                                                                               first, action, body, code, reconnect):
    await store.create_user("admin-1", "Admin", "admin", hash_password(PASSWORD))
    user = await store.get_user_by_name(username)
    await login(client, username)
    path = f"/ws/exams/{hall.id}/{socket}"
    ws = await client.ws_connect(path, headers={"Origin": origin(client)})
    assert (await ws.receive_json(timeout=5))["type"] == first
    assert await admin_post(client, f"/api/users/{user.id}/{action}", body) == 200
    assert await close_code(ws) == code
    await ws.close()
    assert await ws_status(client, path, {"Origin": origin(client)}) in reconnect


async def test_logging_out_on_one_device_ends_the_sessions_and_sockets_of_the_others(client, hall):
    await login(client, "stud-in")
    path = f"/ws/exams/{hall.id}/stream"
    ws = await client.ws_connect(path, headers={"Origin": origin(client)})
    assert (await ws.receive_json(timeout=5))["type"] == "config"
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as laptop:
        resp = await laptop.post(origin(client) + "/api/login", json={"username": "stud-in", "password": PASSWORD})
        token = (await resp.json())["csrf_token"]
        resp = await laptop.post(origin(client) + "/api/logout", headers={"X-CSRF-Token": token})
        assert resp.status == 200, await resp.text()
    assert await close_code(ws) == 4005
    await ws.close()
    # This device's cookie ended with the logout elsewhere: no reconnecting with it.
    assert await ws_status(client, path, {"Origin": origin(client)}) == 401
    assert (await client.get("/api/me")).status == 401


@pytest.mark.parametrize("lost", ["exam ended", "account deactivated", "password reset", "logged out"])
async def test_after_lost_notifications_a_resync_closes_what_the_database_says_is_over(client, hall, store,
                                                                                       monkeypatch, lost):
    # PostgreSQL's LISTEN connection was down while another node ended the exam or deactivated the
    # account: the notification never came. On reconnecting, the store asks for a resync.
    ws, channel, code = await stream_and_lose_a_notice(client, hall, store, monkeypatch, lost)
    await store.publish(channel, {"resync": True, "node": None})
    assert await close_code(ws) == code
    await ws.close()


async def stream_and_lose_a_notice(client, hall, store, monkeypatch, lost):
    """A student streams; then the exam ends or the account's sessions end without the notice reaching the
    node. Returns (the stream, the notice's channel, the close code the stream should get)."""
    await login(client, "stud-in")
    ws = await client.ws_connect(f"/ws/exams/{hall.id}/stream", headers={"Origin": origin(client)})
    assert (await ws.receive_json(timeout=5))["type"] == "config"
    publish = store.publish

    async def lost_publish(channel, payload):
        return None

    monkeypatch.setattr(store, "publish", lost_publish)
    if lost == "exam ended":
        await store.set_exam_state(hall.id, "ended")
        channel, code = "exam", 4000
    elif lost == "account deactivated":
        await store.set_user_active((await store.get_user_by_name("stud-in")).id, False)
        channel, code = "user", 4003
    elif lost == "password reset":
        await store.set_password((await store.get_user_by_name("stud-in")).id, hash_password("a-new-passphrase!"))
        channel, code = "user", 4004
    else:
        await store.end_sessions((await store.get_user_by_name("stud-in")).id)
        channel, code = "user", 4005
    monkeypatch.setattr(store, "publish", publish)
    return ws, channel, code


async def test_deactivating_a_student_from_the_command_line_closes_their_stream(client, hall, sqlite_url,
                                                                                 monkeypatch, capsys):
    # With SQLite the command runs in a process of its own: its notification crosses through the database.
    from proctor import cli
    from proctor.storage import sqlite

    monkeypatch.setattr(sqlite, "NOTIFY_POLL_S", 0.05)
    await login(client, "stud-in")
    ws = await client.ws_connect(f"/ws/exams/{hall.id}/stream", headers={"Origin": origin(client)})
    assert (await ws.receive_json(timeout=5))["type"] == "config"
    code = await asyncio.to_thread(cli.main, ["users", "deactivate", "stud-in", "--database-url", sqlite_url])
    assert code == 0, capsys.readouterr().err
    assert await close_code(ws) == 4003
    await ws.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
async def test_over_tls_the_cookie_is_secure_and_wss_origin_is_checked(tmp_path, store, hall):
    out = tmp_path / "tls"
    subprocess.run([str(MAKE_CERT), str(out)], check=True, capture_output=True, timeout=60)
    config = Config(database_url=f"sqlite:///{tmp_path}/test.db", data_dir=str(tmp_path),
                    tls_cert=str(out / "cert.pem"), tls_key=str(out / "key.pem"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    runner = web.AppRunner(create_app(config, store=store, classifier=FakeClassifier()))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    base = f"https://localhost:{port}"
    client_ctx = ssl.create_default_context(cafile=str(out / "cert.pem"))
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ctx)) as session:
            resp = await session.post(base + "/api/login", json={"username": "stud-in", "password": PASSWORD})
            assert resp.status == 200
            cookie = resp.headers["Set-Cookie"]
            assert "Secure" in cookie and "HttpOnly" in cookie
            assert "Strict-Transport-Security" in resp.headers
            ws = await session.ws_connect(f"wss://localhost:{port}/ws/exams/{hall.id}/stream",
                                          headers={"Origin": base})
            assert (await ws.receive_json(timeout=5))["type"] == "config"
            await ws.close()
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await session.ws_connect(f"wss://localhost:{port}/ws/exams/{hall.id}/stream",
                                         headers={"Origin": f"http://localhost:{port}"})
            assert info.value.status == 403  # http:// is another origin than https://
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("trusted, secure", [((), False), (("127.0.0.1",), True)])
async def test_forwarded_https_counts_only_from_a_trusted_proxy(aiohttp_client, tmp_path, store, hall,
                                                               trusted, secure):
    config = Config(database_url=f"sqlite:///{tmp_path}/test.db", data_dir=str(tmp_path), trusted_proxies=trusted)
    client = await aiohttp_client(create_app(config, store=store, classifier=FakeClassifier()))
    resp = await client.post("/api/login", json={"username": "stud-in", "password": PASSWORD},
                             headers={"X-Forwarded-Proto": "https", "X-Forwarded-For": "10.9.8.7"})
    assert resp.status == 200
    assert ("Secure" in resp.headers["Set-Cookie"]) is secure
    host = f"{client.server.host}:{client.server.port}"
    # Behind the proxy the browser's Origin is https://...; directly it is http://...
    # (A Secure cookie is not sent over the test's plain http: hand it over as the proxy would.)
    cookie = resp.cookies["proctor_session"].value
    status = await ws_status(client, f"/ws/exams/{hall.id}/stream",
                             {"Origin": f"https://{host}", "X-Forwarded-Proto": "https",
                              "Cookie": f"proctor_session={cookie}"})
    assert status == (101 if secure else 403)


async def test_a_head_upload_over_the_request_limit_is_refused_with_the_way_out(client, store):
    await store.create_user("admin-2", "Admin", "admin", hash_password(PASSWORD))
    token = await login(client, "admin-2")
    too_big = b"\0" * (MAX_REQUEST_BYTES + 1024)
    resp = await client.post("/api/heads?filename=big.safetensors", data=io.BytesIO(too_big),
                             headers={"X-CSRF-Token": token, "Content-Type": "application/octet-stream"})
    assert resp.status == 413 and "proctor heads add" in (await resp.json())["error"]
    # The admin page's form: refused before the CSRF field could even be read, with the same advice.
    form = aiohttp.FormData()
    form.add_field("csrf_token", token)
    form.add_field("file", io.BytesIO(too_big), filename="big.safetensors", content_type="application/octet-stream")
    resp = await client.post("/admin/heads", data=form)
    assert resp.status == 413 and "proctor heads add" in await resp.text()
    assert [h.name for h in await store.list_heads()] == ["editor"]
