"""Samples from a live screen, training heads in the server, false-positive alerts sent back as samples."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import uuid

import aiohttp
import pytest

from fakes import screen
from proctor import protocol
from proctor.batching import decode
from proctor.config import Config
from proctor.models import training
from proctor.models.heads import head_to_record
from proctor.models.training import TrainOptions
from proctor.passwords import hash_password
from proctor.server import create_app
from proctor.storage import open_store
from proctor.storage.base import Alert, utcnow
from proctor.training_jobs import TRAINING_KEY, TRAINING_SETTINGS_KEY, TrainingSettings
from proctor.web import samples
from test_server_engine import colour_head, engine  # noqa: F401 (engine is a fixture)
from test_web_server import PASSWORD, origin, ws_status
from test_web_server import login as web_login
from test_web_browser import display  # noqa: F401 (a fixture)


def tiny(colour: str, seed: int) -> bytes:
    return screen(colour, width=160, height=90, seed=seed)


@pytest.fixture
async def users(store):
    pw = hash_password(PASSWORD)
    return {name: await store.create_user(name, name.title(), role, pw)
            for name, role in (("teach-a", "teacher"), ("teach-b", "teacher"), ("admin", "admin"),
                               ("stud", "student"))}


@pytest.fixture
def screens_dir(tmp_path):
    """A bundled screenshot set with one other program of 4 green screens, and one of the label itself."""
    for program, colour in (("other", "green"), ("redapp", "red")):
        folder = tmp_path / "screens" / program
        folder.mkdir(parents=True)
        for i in range(4):
            (folder / f"{i}.jpg").write_bytes(tiny(colour, 100 + i))
    return tmp_path / "screens"


@pytest.fixture
async def client(aiohttp_client, tmp_path, store, users, engine, screens_dir):
    config = Config(database_url=f"sqlite:///{tmp_path}/test.db", data_dir=str(tmp_path))
    app = create_app(config, store=store, classifier=engine)
    app[TRAINING_SETTINGS_KEY] = TrainingSettings(options=TrainOptions(copies=1), screens_dir=screens_dir)
    return await aiohttp_client(app)


async def login(client, username):
    """Log in as `username`, replacing whoever was logged in on this client."""
    client.session.cookie_jar.clear()
    return await web_login(client, username)


async def answer(ws, seq):
    """The server's answer (sample or error) about frame `seq`."""
    while True:
        message = await ws.receive_json(timeout=10)
        if message.get("seq") == seq:
            return message


# ------------------------------------------------------------------------------------------ recording


async def test_teacher_records_frames_and_bad_ones_are_refused(client, store, users, monkeypatch):
    monkeypatch.setattr(samples, "_MIN_INTERVAL_S", 0.0)
    await login(client, "teach-a")
    ws = await client.ws_connect("/ws/samples?label=redapp", headers={"Origin": origin(client)})
    config = await ws.receive_json(timeout=5)
    assert config["type"] == "config" and config["count"] == 0 and config["fps"] == samples.RECORD_FPS
    assert config["evidence_max_width"] == 0  # the page keeps no full-size frames while recording
    for seq in range(3):
        await ws.send_bytes(protocol.pack_frame(seq, 0.0, tiny("red", seq)))
        assert await answer(ws, seq) == {"type": "sample", "seq": seq, "count": seq + 1, "stored": True}
    # The same screen again is not stored twice.
    await ws.send_bytes(protocol.pack_frame(3, 0.0, tiny("red", 2)))
    assert (await answer(ws, 3))["stored"] is False
    await ws.send_bytes(protocol.pack_frame(4, 0.0, b"\xff\xd8 this is not a jpeg body"))
    bad = await answer(ws, 4)
    assert bad["type"] == "error" and bad["code"] == protocol.E_BAD_JPEG and bad["message"]
    await ws.send_bytes(b"short")
    assert (await ws.receive_json(timeout=5))["code"] == protocol.E_BAD_HEADER
    await ws.send_bytes(protocol.pack_frame(5, 0.0, b"\xff\xd8" + bytes(2_000_000)))
    assert (await answer(ws, 5))["code"] == protocol.E_FRAME_TOO_LARGE
    await ws.send_bytes(protocol.pack_frame(5, 0.0, tiny("red", 5), evidence=True))  # never asked for here
    assert (await answer(ws, 5))["code"] == protocol.E_UNEXPECTED_EVIDENCE
    # A window instead of the whole screen: frames are refused until the whole screen is shared.
    await ws.send_str(json.dumps({"type": "hello", "surface": "window"}))
    assert (await ws.receive_json(timeout=5))["code"] == protocol.E_NOT_SHARING_SCREEN
    await ws.send_bytes(protocol.pack_frame(6, 0.0, tiny("red", 6)))
    assert (await answer(ws, 6))["code"] == protocol.E_NOT_SHARING_SCREEN
    await ws.close()
    stored = await store.list_samples("redapp")
    assert len(stored) == 3 and {s.source for s in stored} == {"recorded"}
    for _ in range(50):  # the audit entry is written as the socket closes
        audit = [e for e in await store.list_audit() if e.action == "samples.recorded"]
        if audit:
            break
        await asyncio.sleep(0.02)
    assert audit[0].detail == {"stored": 3, "total": 3} and audit[0].actor_id == users["teach-a"].id
    counts = await (await client.get("/api/samples")).json()
    assert counts["labels"] == {"redapp": 3}


async def test_recording_is_rate_limited_and_capped(client, store, monkeypatch):
    await login(client, "admin")
    ws = await client.ws_connect("/ws/samples?label=capped", headers={"Origin": origin(client)})
    await ws.receive_json(timeout=5)
    await ws.send_bytes(protocol.pack_frame(1, 0.0, tiny("red", 1)))
    assert (await answer(ws, 1))["stored"] is True
    await ws.send_bytes(protocol.pack_frame(2, 0.0, tiny("red", 2)))
    assert (await answer(ws, 2))["code"] == protocol.E_RATE_LIMITED
    await ws.close()
    monkeypatch.setattr(samples, "_MIN_INTERVAL_S", 0.0)
    monkeypatch.setattr(samples, "MAX_SAMPLES_PER_LABEL", 2)
    ws = await client.ws_connect("/ws/samples?label=capped", headers={"Origin": origin(client)})
    assert (await ws.receive_json(timeout=5))["count"] == 1
    await ws.send_bytes(protocol.pack_frame(3, 0.0, tiny("red", 3)))
    assert (await answer(ws, 3))["count"] == 2
    await ws.send_bytes(protocol.pack_frame(4, 0.0, tiny("red", 4)))
    refused = await answer(ws, 4)
    assert refused["code"] == samples.E_SAMPLE_LIMIT and "train it now" in refused["message"]
    await ws.close()
    assert len(await store.list_samples("capped")) == 2


async def test_the_cap_counts_every_recording_of_a_label(client, store, monkeypatch):
    # Two tabs recording one label each counted only their own frames: together they kept twice the cap.
    monkeypatch.setattr(samples, "_MIN_INTERVAL_S", 0.0)
    monkeypatch.setattr(samples, "MAX_SAMPLES_PER_LABEL", 3)
    await login(client, "admin")
    tabs = [await client.ws_connect("/ws/samples?label=shared", headers={"Origin": origin(client)})
            for _ in range(2)]
    for ws in tabs:
        assert (await ws.receive_json(timeout=5))["count"] == 0
    answers = []
    for seq in range(1, 4):
        for n, ws in enumerate(tabs):
            await ws.send_bytes(protocol.pack_frame(seq, 0.0, tiny("red", seq * 2 + n)))
            answers.append(await answer(ws, seq))
    for ws in tabs:
        await ws.close()
    assert sum(1 for a in answers if a.get("stored")) == 3
    assert [a["code"] for a in answers if a["type"] == "error"] == [samples.E_SAMPLE_LIMIT] * 3
    assert len(await store.list_samples("shared")) == 3


async def test_repeated_bad_frames_close_the_recording(client, store, monkeypatch):
    monkeypatch.setattr(samples, "_MIN_INTERVAL_S", 0.0)
    await login(client, "teach-a")
    ws = await client.ws_connect("/ws/samples?label=x", headers={"Origin": origin(client)})
    await ws.receive_json(timeout=5)
    for seq in range(samples._MAX_STRIKES):
        await ws.send_bytes(protocol.pack_frame(seq, 0.0, b"not a jpeg at all"))
    while (message := await ws.receive(timeout=5)).type == aiohttp.WSMsgType.TEXT:
        assert json.loads(message.data)["code"] == protocol.E_BAD_JPEG
    assert message.type == aiohttp.WSMsgType.CLOSE and ws.close_code == protocol.CLOSE_POLICY
    assert await store.list_samples() == []


async def test_recording_refuses_students_forged_origins_and_bad_labels(client, store):
    assert await ws_status(client, "/ws/samples?label=x", {"Origin": origin(client)}) == 401
    await login(client, "stud")
    assert await ws_status(client, "/ws/samples?label=x", {"Origin": origin(client)}) == 403
    await login(client, "teach-a")
    assert await ws_status(client, "/ws/samples?label=x", {"Origin": "https://evil.example"}) == 403
    assert await ws_status(client, "/ws/samples?label=x", {}) == 403
    assert await ws_status(client, "/ws/samples?label=bad%20name", {"Origin": origin(client)}) == 400
    assert await ws_status(client, "/ws/samples", {"Origin": origin(client)}) == 400
    assert await store.list_samples() == []


async def test_pages_link_and_render(client):
    await login(client, "teach-a")
    home = await (await client.get("/teacher")).text()
    assert 'href="/teacher/samples"' in home
    page = await client.get("/teacher/samples")
    assert page.status == 200 and 'src="/static/samples.js"' in await page.text()
    assert (await client.get("/static/samples.js")).status == 200
    await login(client, "stud")
    assert (await client.get("/teacher/samples")).status == 403


# ------------------------------------------------------------------------------------------- training


async def poll(client, job_id, timeout=60.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        job = (await (await client.get(f"/api/training/{job_id}")).json())["job"]
        if job["state"] in ("done", "failed"):
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"training job {job_id} did not finish: {job}")


async def test_training_job_registers_the_head_and_every_node_loads_it(client, store, engine):
    for i in range(10):
        await store.add_sample("redapp", tiny("red", i), "recorded")
    for i in range(3):
        await store.add_sample("other", tiny("green", 50 + i), "recorded")
    csrf = await login(client, "teach-a")
    assert (await client.post("/api/samples/redapp/train", json={})).status == 403  # no CSRF token
    resp = await client.post("/api/samples/redapp/train", json={"program": "Red App", "description": "red"},
                             headers={"X-CSRF-Token": csrf})
    assert resp.status == 202, await resp.text()
    job = (await resp.json())["job"]
    assert job["state"] in ("queued", "running") and job["positives"] == 10
    # 3 stored negatives are few: the 4 bundled screens of the other program are added, not the label's own.
    assert job["negatives"] == 7
    job = await poll(client, job["id"])
    assert job["state"] == "done", job
    assert job["metrics"]["recall"] == 1.0 and job["metrics"]["specificity"] == 1.0
    assert job["progress"]["stage"] == "done" and job["replaced"] is False and job["active"] is True
    head = await store.get_head("redapp")
    assert head.program == "Red App" and head.backbone_hash == engine.backbone.weights_hash
    for _ in range(100):
        ready = await (await client.get("/readyz")).json()
        if "redapp" in ready["heads"]:
            break
        await asyncio.sleep(0.05)
    assert "redapp" in ready["heads"]
    scores = engine.classify([decode.decode_rgb(tiny(c, 77), engine.frame_size) for c in ("red", "green")])
    column = [h.name for h in scores.heads].index("redapp")
    assert scores.values[0, column] > head.threshold > scores.values[1, column]

    # Retraining the same label replaces the head's weights under its name (exams keep naming it).
    # That changes every exam allowing the head, so a teacher may not; an admin may.
    await store.add_sample("redapp", tiny("red", 30), "false_positive")
    resp = await client.post("/api/samples/redapp/train", headers={"X-CSRF-Token": csrf})
    assert resp.status == 403 and "only an admin can retrain it" in (await resp.json())["error"]
    csrf = await login(client, "admin")
    resp = await client.post("/api/samples/redapp/train", headers={"X-CSRF-Token": csrf})
    job = await poll(client, (await resp.json())["job"]["id"])
    assert job["state"] == "done" and job["replaced"] is True and job["positives"] == 11
    assert job["program"] == "Red App"  # kept from the existing head
    assert [h.name for h in await store.list_heads()] == ["redapp"]
    actions = [e.action for e in await store.list_audit()]
    assert actions.count("head.training_started") == 2 and "head.trained" in actions and "head.retrained" in actions


@pytest.mark.parametrize("who, outcome", [("teach-a", "failed"), ("admin", "done")])
async def test_a_head_registered_elsewhere_while_training_is_replaced_only_by_an_admin(client, store, monkeypatch,
                                                                                      who, outcome):
    import dataclasses

    for i in range(10):
        await store.add_sample("redapp", tiny("red", i), "recorded")
    for i in range(3):
        await store.add_sample("other", tiny("green", 50 + i), "recorded")
    add_head = store.add_head

    async def registered_meanwhile(record):  # another node's job for the same new label got there first
        await add_head(dataclasses.replace(record, program="Their Red App"))
        return await add_head(record)

    monkeypatch.setattr(store, "add_head", registered_meanwhile)
    csrf = await login(client, who)
    resp = await client.post("/api/samples/redapp/train", json={"program": "Red App"}, headers={"X-CSRF-Token": csrf})
    assert resp.status == 202, await resp.text()
    job = await poll(client, (await resp.json())["job"]["id"])
    assert job["state"] == outcome, job
    if outcome == "failed":  # before: "a head named 'redapp' already exists", for admins too
        assert "only an admin can replace it" in job["error"]
        assert (await store.get_head("redapp")).program == "Their Red App"
    else:
        assert job["replaced"] is True and (await store.get_head("redapp")).program == "Red App"


async def test_training_refusals(client, store, users):
    csrf = await login(client, "teach-a")
    headers = {"X-CSRF-Token": csrf}
    for i in range(4):
        await store.add_sample("few", tiny("red", i), "recorded")
    resp = await client.post("/api/samples/few/train", headers=headers)
    assert resp.status == 400
    assert "has 4 sample(s); training needs at least 10: record 6 more" in (await resp.json())["error"]
    resp = await client.post("/api/samples/bad%20name/train", headers=headers)
    assert resp.status == 400 and "invalid head name" in (await resp.json())["error"]
    resp = await client.post("/api/samples/few/train", json={"program": 5}, headers=headers)
    assert resp.status == 400 and "'program'" in (await resp.json())["error"]
    resp = await client.get("/api/training/nope")
    assert resp.status == 404 and "no training job" in (await resp.json())["error"]
    await login(client, "stud")
    assert (await client.get("/api/samples")).status == 403


async def test_one_job_at_a_time_and_shutdown_cancels_it(aiohttp_client, tmp_path, store, users, engine,
                                                          monkeypatch):
    started, release = threading.Event(), threading.Event()
    real = training.train_head
    options_used = []

    def slow_train_head(*args, progress=None, **kwargs):
        options_used.append(kwargs["options"])
        started.set()
        while not release.wait(0.01):
            progress("features", 0, 1)  # raises once the server shuts down
        return real(*args, progress=progress, **kwargs)

    monkeypatch.setattr(training, "train_head", slow_train_head)
    for i in range(10):
        await store.add_sample("redapp", tiny("red", i), "recorded")
        await store.add_sample("other", tiny("green", i + 20), "recorded")
    config = Config(database_url=f"sqlite:///{tmp_path}/test.db", data_dir=str(tmp_path), client_max_width=800,
                    client_jpeg_quality=0.6)
    app = create_app(config, store=store, classifier=engine)
    app[TRAINING_SETTINGS_KEY] = TrainingSettings(options=TrainOptions(copies=0), screens_dir=None)
    client = await aiohttp_client(app)
    csrf = await login(client, "admin")
    # Two requests at once: exactly one starts.
    both = await asyncio.gather(*(client.post(f"/api/samples/{label}/train", headers={"X-CSRF-Token": csrf})
                                  for label in ("redapp", "other")))
    assert sorted(r.status for r in both) == [202, 409]
    (job,) = [(await r.json())["job"] for r in both if r.status == 202]
    assert await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
    # The head learns from frames as this server gets them.
    assert (options_used[0].client_width, options_used[0].client_quality, options_used[0].copies) == (800, 0.6, 0)
    again = await client.post("/api/samples/other/train", headers={"X-CSRF-Token": csrf})
    assert again.status == 409
    assert f"already running (head {job['label']!r}, job {job['id']})" in (await again.json())["error"]
    jobs = app[TRAINING_KEY]
    await client.close()  # shutdown: the job is cancelled and its thread joined
    assert jobs.get(job["id"]).state == "failed" and "shut down" in jobs.get(job["id"]).error
    assert not release.is_set()


async def test_training_needs_a_model_that_can_train(aiohttp_client, tmp_path, store, users):
    from fakes import FakeClassifier

    config = Config(database_url=f"sqlite:///{tmp_path}/test.db", data_dir=str(tmp_path))
    client = await aiohttp_client(create_app(config, store=store, classifier=FakeClassifier()))
    csrf = await login(client, "teach-a")
    resp = await client.post("/api/samples/redapp/train", headers={"X-CSRF-Token": csrf})
    assert resp.status == 503 and "cannot train" in (await resp.json())["error"]


# ------------------------------------------------------------------------------ false positive -> sample


@pytest.fixture
async def alert(store, users, engine):
    await store.add_head(head_to_record(colour_head(engine, "editor", "Code editor", "green", "red")))
    exam = await store.create_exam("Physics", users["teach-a"].id, [], "PHYS01")
    await store.add_to_roster(exam.id, users["stud"].id)
    record = Alert(id=uuid.uuid4().hex, exam_id=exam.id, student_id=users["stud"].id, opened_at=utcnow(),
                   verdict="unrecognised", program=None, scores={"editor": 0.2}, evidence=tiny("green", 9))
    await store.add_alert(record)
    return record


async def test_false_positive_alert_becomes_a_sample(client, store, alert):
    csrf = await login(client, "teach-b")
    resp = await client.post(f"/api/alerts/{alert.id}/sample", json={"label": "editor"},
                             headers={"X-CSRF-Token": csrf})
    assert resp.status == 403 and "another teacher" in (await resp.json())["error"]
    csrf = await login(client, "teach-a")
    headers = {"X-CSRF-Token": csrf}
    resp = await client.post(f"/api/alerts/{alert.id}/sample", json={"label": "nosuchhead"}, headers=headers)
    assert resp.status == 400 and "no active head named 'nosuchhead'" in (await resp.json())["error"]
    resp = await client.post(f"/api/alerts/{alert.id}/sample", json={}, headers=headers)
    assert resp.status == 400 and "'label'" in (await resp.json())["error"]
    assert await store.list_samples() == []
    resp = await client.post(f"/api/alerts/{alert.id}/sample", json={"label": "editor"}, headers=headers)
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    assert body["label"] == "editor" and body["alert"]["review_state"] == "false_positive"
    (sample,) = await store.list_samples("editor")
    assert sample.jpeg == alert.evidence and sample.source == "false_positive"
    assert sample.exam_id == alert.exam_id  # a student's screen: purged with the exam's alerts
    assert (await store.get_alert(alert.id)).review_state == "false_positive"
    assert any(e.action == "alert.sampled" for e in await store.list_audit())


async def test_only_admins_delete_a_labels_samples(client, store, alert):
    await store.add_sample("editor", tiny("green", 3), source="recorded")
    await store.add_sample("other", tiny("red", 3), source="recorded")
    csrf = await login(client, "teach-a")
    resp = await client.delete("/api/samples/editor", headers={"X-CSRF-Token": csrf})
    assert resp.status == 403
    csrf = await login(client, "admin")
    resp = await client.delete("/api/samples/editor", headers={"X-CSRF-Token": csrf})
    assert resp.status == 200 and (await resp.json()) == {"label": "editor", "deleted": 1}
    assert await store.count_samples() == {"other": 1}
    assert any(e.action == "samples.deleted" and e.detail == {"deleted": 1} for e in await store.list_audit())


async def test_review_page_form_sends_a_sample_and_admin_may_too(client, store, alert):
    await login(client, "teach-a")
    page = await (await client.get(f"/teacher/exams/{alert.exam_id}/review")).text()
    assert f'action="/teacher/alerts/{alert.id}/sample"' in page and '<option value="editor">' in page
    dashboard = await (await client.get(f"/teacher/exams/{alert.exam_id}")).text()
    assert 'id="ad-sample"' in dashboard and 'src="/static/alert_sample.js"' in dashboard
    csrf = await login(client, "admin")
    resp = await client.post(f"/teacher/alerts/{alert.id}/sample", allow_redirects=False,
                             data={"csrf_token": csrf, "label": "editor", "unreviewed": "1"})
    assert resp.status == 302
    assert resp.headers["Location"] == f"/teacher/exams/{alert.exam_id}/review?unreviewed=1#alert-{alert.id}"
    assert len(await store.list_samples("editor")) == 1


# ------------------------------------------------------------------------------------ store: replace_head


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_replace_head_and_count_samples(backend, tmp_path, request, engine):
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path}/replace.db"
    else:
        url = await request.getfixturevalue("postgres_server").new_database()
    s = await open_store(url)
    try:
        await s.migrate()
        heard = []

        async def listener(channel, payload):
            heard.append((channel, payload.get("name")))

        await s.subscribe(listener)
        old = head_to_record(colour_head(engine, "editor", "Code editor", "green", "red"))
        await s.add_head(old)
        await s.set_head_active("editor", False)
        new = head_to_record(colour_head(engine, "editor", "Editor 2", "red", "green"))
        stored = await s.replace_head(new)
        assert stored.program == "Editor 2" and stored.weights == new.weights and stored.active is False
        assert (await s.get_head("editor")).weights == new.weights
        with pytest.raises(Exception, match="no head named 'missing'"):
            await s.replace_head(head_to_record(colour_head(engine, "missing", "M", "red", "green")))
        for _ in range(100):
            if heard.count(("heads", "editor")) >= 3:
                break
            await asyncio.sleep(0.02)
        assert heard.count(("heads", "editor")) == 3  # add, deactivate, replace
        assert await s.count_samples() == {}
        for label, n in (("b", 2), ("a", 1)):
            for i in range(n):
                await s.add_sample(label, tiny("red", i), "recorded")
        assert await s.count_samples() == {"a": 1, "b": 2}
        await s.unsubscribe(listener)
    finally:
        await s.close()


async def test_negatives_are_spread_over_labels_capped_and_never_a_positive(store, monkeypatch):
    from proctor import training_jobs

    monkeypatch.setattr(training_jobs, "MAX_NEGATIVES", 4)
    positive = tiny("red", 1)
    await store.add_sample("a", positive, "false_positive")  # the same screen sent under two labels
    for i in range(5):
        await store.add_sample("a", tiny("green", i), "recorded")
        await store.add_sample("b", tiny("blue", i), "recorded")
    counts = await store.count_samples()
    negatives = await training_jobs._negatives(store, {**counts, "self": 1}, "self", {training_jobs._sha(positive)})
    assert len(negatives) == 4 and positive not in negatives
    blue = {tiny("blue", i) for i in range(5)}
    assert sum(n in blue for n in negatives) == 2  # each other label gets its share
    assert negatives == await training_jobs._negatives(store, counts, "self", {training_jobs._sha(positive)})


# ------------------------------------------------------------------------------------------- in Chromium


@pytest.fixture
async def browser_server(tmp_path, store, users, engine, alert):
    """The real app with the seeded engine on a loopback port: 10 samples of 'redapp', others of 'other'."""
    from aiohttp import web

    from test_web_browser import _free_port

    for i in range(10):
        await store.add_sample("redapp", tiny("red", i), "recorded")
        await store.add_sample("other", tiny("green", 40 + i), "recorded")
    config = Config(database_url=f"sqlite:///{tmp_path}/test.db", data_dir=str(tmp_path))
    app = create_app(config, store=store, classifier=engine)
    app[TRAINING_SETTINGS_KEY] = TrainingSettings(options=TrainOptions(copies=0), screens_dir=None)
    runner = web.AppRunner(app)
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.mark.browser
async def test_record_train_and_send_an_alert_in_chromium(display, browser_server, store, alert, tmp_path):
    from playwright.async_api import async_playwright

    from test_web_browser import CHROMIUM, CHROMIUM_ARGS, _login, _shot, _until

    base = browser_server
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=False, args=CHROMIUM_ARGS,
                                          env={**os.environ, "DISPLAY": display}, timeout=60_000)
        try:
            page = await (await browser.new_context(viewport={"width": 1366, "height": 680})).new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await _login(page, base, "teach-a")
            await page.click("text=Record samples")
            await page.wait_for_url("**/teacher/samples")
            assert await page.is_disabled("#share") and await page.is_disabled("#train")
            # A new label: share the screen; its frames arrive and the live count goes up.
            await page.fill("#label", "newapp")
            await page.click("#share")
            await page.wait_for_selector("#status[data-state=sharing]", timeout=20_000)
            await _until(page, "() => Number(document.getElementById('count').dataset.count) >= 1")
            await page.click("#stop")
            await page.wait_for_selector("#status[data-state=stopped]")
            recorded = await store.list_samples("newapp")
            assert len(recorded) >= 1 and recorded[0].jpeg.startswith(b"\xff\xd8")
            assert await page.is_disabled("#train")  # fewer than 10 samples

            # A label with 10 samples: train it and follow the job to the end.
            await page.fill("#label", "redapp")
            await page.fill("#program", "Red App")
            await _until(page, "() => document.getElementById('count').dataset.count === '10'")
            await page.click("#train")
            await page.wait_for_selector("#train-status[data-state=done]", timeout=60_000)
            assert "Head redapp trained and loaded" in await page.inner_text("#train-status")
            assert "recall" in await page.inner_text("#train-metrics")
            assert (await store.get_head("redapp")).program == "Red App"
            await _shot(page, "record-samples.png", tmp_path)

            # The dashboard's alert dialog: false positive, it showed the code editor.
            await page.goto(f"{base}/teacher/exams/{alert.exam_id}")
            await page.click(f"#alerts li[data-alert-id='{alert.id}']")
            await page.select_option("#ad-sample-label", "editor")
            await page.click("#ad-sample-send")
            await page.wait_for_selector("#ad-sample-result[data-saved=editor]")
            assert [s.source for s in await store.list_samples("editor")] == ["false_positive"]
            assert errors == []
        finally:
            await browser.close()


async def test_shutdown_closes_an_open_recording_at_once(client):
    await login(client, "teach-a")
    ws = await client.ws_connect("/ws/samples?label=redapp", headers={"Origin": origin(client)})
    assert (await ws.receive_json(timeout=5))["type"] == "config"
    closing = asyncio.create_task(client.server.close())
    # Before: the recording stayed open until aiohttp's 60 s shutdown timeout cancelled its handler.
    message = await ws.receive(timeout=5)
    assert message.type == aiohttp.WSMsgType.CLOSE and message.data == protocol.CLOSE_GOING_AWAY
    await asyncio.wait_for(closing, 10)
