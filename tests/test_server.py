"""The core path over real sockets: students stream frames, verdicts come back, teachers get alerts."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import aiohttp
import numpy as np
import pytest
import simplejpeg
from aiohttp import WSMsgType, web
from PIL import Image

from fakes import FakeClassifier, HeaderAuthenticator, add_fake_heads, many_scan_jpeg, raw_http_status, screen
from proctor import protocol, sessions
from proctor.appkeys import HUB_KEY, METRICS_KEY, WRITER_KEY
from proctor.batching import decode
from proctor.config import Config
from proctor.passwords import hash_password
from proctor.server import BATCHER_KEY, create_app


PASSWORD_HASH = hash_password("unused-in-these-tests")


@pytest.fixture
async def hall(store):
    """A teacher, three students and a running exam that allows only the code editor; student C is not enrolled."""
    teacher = await store.create_user("teacher", "Ana Teacher", "teacher", PASSWORD_HASH)
    other_teacher = await store.create_user("teacher2", "Bea Teacher", "teacher", PASSWORD_HASH)
    a = await store.create_user("alice", "Alice A", "student", PASSWORD_HASH)
    b = await store.create_user("bob", "Bob B", "student", PASSWORD_HASH)
    c = await store.create_user("carol", "Carol C", "student", PASSWORD_HASH)
    await add_fake_heads(store)
    exam = await store.create_exam("Algebra", teacher.id, ["editor"], "JOIN01")
    for s in (a, b):
        await store.add_to_roster(exam.id, s.id)
    exam = await store.set_exam_state(exam.id, "running")
    return dict(teacher=teacher, other_teacher=other_teacher, a=a, b=b, c=c, exam=exam)


def make_config(tmp_path, **changes):
    options = dict(database_url=f"sqlite:///{tmp_path}/test.db", data_dir=str(tmp_path), max_wait_ms=5.0,
                   client_fps=30.0, max_frame_bytes=400_000)
    options.update(changes)
    return Config(**options)


@pytest.fixture
def classifier():
    return FakeClassifier()


@pytest.fixture
async def server(store, classifier, tmp_path, aiohttp_client):
    async def start(**config_changes):
        app = create_app(make_config(tmp_path, **config_changes), store=store, classifier=classifier,
                         authenticator=HeaderAuthenticator(store))
        return await aiohttp_client(app)
    return start


def ws_headers(client, user):
    return {"X-Test-User": str(user.id), "Origin": f"http://{client.server.host}:{client.server.port}"}


async def connect_student(client, user, exam, hello=True):
    ws = await client.ws_connect(f"/ws/exams/{exam.id}/stream", headers=ws_headers(client, user))
    config = await ws.receive_json(timeout=5)
    assert config["type"] == "config"
    if hello:
        await ws.send_json({"type": "hello", "screen": {"width": 1280, "height": 720}, "displays": 1,
                            "surface": "monitor"})
    return ws


async def next_of(ws, kind, timeout=5.0):
    """Skip other messages until one of `kind` arrives."""
    while True:
        message = await ws.receive_json(timeout=timeout)
        if message["type"] == kind:
            return message


async def send_frame(ws, seq, jpeg):
    await ws.send_bytes(protocol.pack_frame(seq, 1000.0 + seq, jpeg))


async def close_code_of(ws, timeout=10.0):
    """Read until the server's close frame; its code (the client's own close_code comes later)."""
    while True:
        message = await ws.receive(timeout=timeout)
        if message.type == WSMsgType.CLOSE:
            return message.data
        if message.type in (WSMsgType.CLOSED, WSMsgType.ERROR):
            return ws.close_code


async def answers_for(ws, seqs, timeout=5.0):
    """Collect the verdict or error of every frame in seqs, whatever order they come in."""
    found = {}
    while len(found) < len(seqs):
        message = await ws.receive_json(timeout=timeout)
        if message.get("seq") in seqs and message["type"] in ("ack", "error"):
            found[message["seq"]] = message
    return [found[s] for s in seqs]


def judged(client, exam, user):
    """What the server made of the student's last judged frame, as its teachers would see it: the student
    itself only gets an ack. Read from the server's session, right after that frame's ack came."""
    session = next(s for s in client.server.app[HUB_KEY].streams(exam.id) if s.user.id == user.id)
    verdict = session._last_verdict
    status = "alert" if session.tracker.is_open else ("ok" if verdict.ok else "suspicious")
    return {"status": status, "program": verdict.program}


def unchanged_frames(client):
    """Frames the server found unchanged so far (the last verdict reused, the model not asked)."""
    return client.server.app[METRICS_KEY].frames_unchanged._value.get()


async def answer_for(ws, seq, timeout=5.0):
    while True:
        message = await ws.receive_json(timeout=timeout)
        if message.get("seq") == seq and message["type"] in ("ack", "error"):
            return message


@pytest.mark.parametrize("decode_threads", [0, 2])  # frames decoded on the event loop, or in threads
async def test_two_students_one_exam_teacher_gets_exactly_the_alerts(server, hall, classifier, decode_threads):
    client = await server(decode_threads=decode_threads)
    teacher = await client.ws_connect(f"/ws/exams/{hall['exam'].id}/live",
                                      headers=ws_headers(client, hall["teacher"]))
    snapshot = await teacher.receive_json(timeout=5)
    assert snapshot["type"] == "snapshot"
    assert {s["username"] for s in snapshot["students"]} == {"alice", "bob"}

    alice = await connect_student(client, hall["a"], hall["exam"])
    bob = await connect_student(client, hall["b"], hall["exam"])
    # Alice works in the allowed editor (green); Bob opens the chat (red) for three frames.
    for seq in range(3):
        await send_frame(alice, seq, screen("green", seed=seq))
        await send_frame(bob, seq, screen("red", seed=seq))
        va = await answer_for(alice, seq)
        assert judged(client, hall["exam"], hall["a"]) == {"status": "ok", "program": "Code editor"}
        vb = await answer_for(bob, seq)
        assert judged(client, hall["exam"], hall["b"]) == {"status": "suspicious" if seq == 0 else "alert",
                                                           "program": "Chat web app"}
        # Students hear only that the frame was judged: no status, program or scores to probe the model with.
        assert va == {"type": "ack", "seq": seq, "capture_ms": 1000.0 + seq} and vb["type"] == "ack"

    alert = await next_of(teacher, "alert")
    assert alert["alert"]["username"] == "bob"
    assert alert["alert"]["verdict"] == "forbidden_program"
    assert alert["alert"]["program"] == "Chat web app"
    assert alert["alert"]["thumbnail"].startswith("data:image/jpeg;base64,")
    assert alert["alert"]["top_scores"][0][0] == "chat"

    # Bob goes back to the editor: the episode closes; a single alert for the whole incident.
    await send_frame(bob, 3, screen("green", seed=9))
    await answer_for(bob, 3)
    assert judged(client, hall["exam"], hall["b"])["status"] == "ok"
    closed = await next_of(teacher, "alert_closed")
    assert closed["alert_id"] == alert["alert"]["id"]
    # Nothing else alert-like is pending for the teacher.
    extra = []
    try:
        while True:
            extra.append(await teacher.receive_json(timeout=0.3))
    except asyncio.TimeoutError:
        pass
    assert not [m for m in extra if m["type"] == "alert"]
    for ws in (alice, bob, teacher):
        await ws.close()


async def test_alert_is_stored_with_evidence_and_scores(server, hall, store):
    client = await server()
    bob = await connect_student(client, hall["b"], hall["exam"])
    frames = [screen("blue", seed=s) for s in range(2)]
    for seq, jpeg in enumerate(frames):
        await send_frame(bob, seq, jpeg)
        await answer_for(bob, seq)
    for _ in range(100):
        alerts = await store.list_alerts(hall["exam"].id)
        if alerts:
            break
        await asyncio.sleep(0.05)
    assert len(alerts) == 1
    assert alerts[0].evidence == frames[1]  # the frame's original bytes, as sent
    assert alerts[0].program == "Terminal" and alerts[0].verdict == "forbidden_program"
    assert set(alerts[0].scores) == {"editor", "chat", "terminal"}
    await bob.close()


async def stored_alerts(store, exam_id, count=1):
    for _ in range(100):
        alerts = await store.list_alerts(exam_id)
        if len(alerts) >= count:
            return alerts
        await asyncio.sleep(0.05)
    raise AssertionError(f"{count} alert(s) were not stored")


async def send_evidence(ws, seq, jpeg):
    await ws.send_bytes(protocol.pack_frame(seq, 1000.0 + seq, jpeg, evidence=True))


async def messages_until_verdict(ws, seq, timeout=5.0):
    """Every message up to and including the ack (or error) of frame `seq`."""
    seen = []
    while not seen or not (seen[-1].get("seq") == seq and seen[-1]["type"] in ("ack", "error")):
        seen.append(await ws.receive_json(timeout=timeout))
    return seen


def evidence_requests(messages):
    return [m for m in messages if m["type"] == "evidence_request"]


@pytest.mark.parametrize("decode_threads", [0, 2])
async def test_alert_asks_for_its_frame_at_full_size_and_stores_that_as_evidence(server, hall, store, decode_threads):
    client = await server(evidence_max_width=1920, max_frame_bytes=2_000_000, decode_threads=decode_threads)
    bob = await connect_student(client, hall["b"], hall["exam"])
    small = [screen("blue", 640, 360, seed=s) for s in range(2)]
    seen = []
    for seq, jpeg in enumerate(small):
        await send_frame(bob, seq, jpeg)
        seen += await messages_until_verdict(bob, seq)
    # The alert opens on frame 1 (two suspicious frames of three): that frame is asked for again.
    assert evidence_requests(seen) == [{"type": "evidence_request", "seq": 1}]
    (alert,) = await stored_alerts(store, hall["exam"].id)
    assert alert.evidence == small[1]  # the frame as classified, until the full-size copy comes
    full = screen("blue", 1920, 1080, seed=1)
    await send_evidence(bob, 1, full)
    for _ in range(100):
        if (await store.get_alert(alert.id)).evidence == full:
            break
        await asyncio.sleep(0.05)
    assert (await store.get_alert(alert.id)).evidence == full
    metrics = await (await client.get("/metrics")).text()
    assert evidence_counts(metrics) == {"requested": 1.0, "stored": 1.0, "refused": 0.0}
    # One request, one answer: the same evidence again is refused and the stream goes on.
    await send_evidence(bob, 1, full)
    error = await next_of(bob, "error")
    assert error["code"] == protocol.E_UNEXPECTED_EVIDENCE and error["seq"] == 1
    await send_frame(bob, 2, screen("blue", 640, 360, seed=2))
    assert (await answer_for(bob, 2))["type"] == "ack"
    await bob.close()


async def test_evidence_the_write_queue_refused_is_not_counted_as_stored(server, hall, store, monkeypatch):
    from proctor.storage.writer import WriteQueueFull

    client = await server(evidence_max_width=1920, max_frame_bytes=2_000_000)
    writer = client.server.app[WRITER_KEY]
    submit = writer.submit
    refused = []

    def full_for_evidence(op, what="write", size=0, optional=False):
        if what.startswith("full-size evidence"):
            refused.append(what)
            raise WriteQueueFull("store write queue is full")
        return submit(op, what, size, optional)

    monkeypatch.setattr(writer, "submit", full_for_evidence)
    bob = await connect_student(client, hall["b"], hall["exam"])
    seq = await alert_on(bob, range(3))
    await send_evidence(bob, seq, screen("blue", 1920, 1080, seed=seq))
    await until(lambda: refused)
    metrics = await (await client.get("/metrics")).text()
    assert evidence_counts(metrics)["stored"] == 0.0
    (alert,) = await stored_alerts(store, hall["exam"].id)
    assert alert.evidence != screen("blue", 1920, 1080, seed=seq)
    await bob.close()


async def test_alerts_tell_the_write_queue_their_size_and_presence_notices_are_optional(server, hall, monkeypatch):
    client = await server()
    writer = client.server.app[WRITER_KEY]
    submit, submitted = writer.submit, []

    def recording(op, what="write", size=0, optional=False):
        submitted.append((what.split()[0], size, optional))
        return submit(op, what, size, optional)

    monkeypatch.setattr(writer, "submit", recording)
    bob = await connect_student(client, hall["b"], hall["exam"])
    frames = [screen("blue", 640, 360, seed=seq) for seq in range(2)]
    for seq, jpeg in enumerate(frames):
        await send_frame(bob, seq, jpeg)
        await answer_for(bob, seq)
    # The evidence JPEG counts against the queue's bytes; a presence notice gives way when it fills.
    assert ("alert", len(frames[1]), False) in submitted and ("presence", 0, True) in submitted
    await bob.close()


async def alert_on(ws, seqs, colour="blue"):
    """Send narrow frames of `colour` until an alert opens; the seq the server asks evidence for."""
    seen = []
    for seq in seqs:
        await send_frame(ws, seq, screen(colour, 640, 360, seed=seq))
        seen += await messages_until_verdict(ws, seq)
    (request,) = evidence_requests(seen)
    return request["seq"]


def evidence_counts(metrics_text):
    return {result: float(line.rsplit(" ", 1)[1]) for result in ("requested", "stored", "refused")
            for line in metrics_text.splitlines()
            if line.startswith(f'proctor_evidence_copies_total{{result="{result}"}}')}


async def test_evidence_that_was_not_asked_for_or_is_bad_is_refused(server, hall, store):
    client = await server(evidence_max_width=1920, max_frame_bytes=2_000_000)
    bob = await connect_student(client, hall["b"], hall["exam"])
    await send_evidence(bob, 0, screen("blue", 1920, 1080))  # no alert yet
    assert (await answer_for(bob, 0))["code"] == protocol.E_UNEXPECTED_EVIDENCE
    assert await alert_on(bob, (1, 2)) == 2
    await send_evidence(bob, 1, screen("blue", 1920, 1080))  # not the frame asked for: the request stays
    assert (await answer_for(bob, 1))["code"] == protocol.E_UNEXPECTED_EVIDENCE
    await send_evidence(bob, 2, screen("blue", 320, 180))  # smaller than the frame it would replace
    assert (await answer_for(bob, 2))["code"] == protocol.E_UNEXPECTED_EVIDENCE
    full = screen("blue", 1920, 1080, seed=2)
    await send_evidence(bob, 2, full)  # one answer per request: the good copy now comes too late
    assert (await answer_for(bob, 2))["code"] == protocol.E_UNEXPECTED_EVIDENCE
    # The allowed editor closes the episode; a new one asks again, and a cut-short body is refused.
    await send_frame(bob, 3, screen("green", 640, 360, seed=3))
    await answer_for(bob, 3)
    assert judged(client, hall["exam"], hall["b"])["status"] == "ok"
    assert await alert_on(bob, (4, 5)) == 5
    full = screen("blue", 1920, 1080, seed=5)
    await send_evidence(bob, 5, full[:len(full) // 2])  # the header decodes, the body is cut short
    assert (await answer_for(bob, 5))["code"] == protocol.E_BAD_JPEG
    alerts = await stored_alerts(store, hall["exam"].id, count=2)
    assert [a.evidence for a in alerts] == [screen("blue", 640, 360, seed=s) for s in (2, 5)]
    await bob.send_bytes(bytes([protocol.PROTOCOL_VERSION, 0x80]) + bytes(14) + full)  # unknown flag
    assert (await next_of(bob, "error"))["code"] == protocol.E_BAD_HEADER
    metrics = await (await client.get("/metrics")).text()
    assert evidence_counts(metrics) == {"requested": 2.0, "stored": 0.0, "refused": 5.0}
    await bob.close()


async def test_evidence_showing_another_screen_is_refused(server, hall, store):
    """The page controls the full-size copy: a cheating one must not swap the evidence for an innocent picture."""
    client = await server(evidence_max_width=1920, max_frame_bytes=2_000_000)
    bob = await connect_student(client, hall["b"], hall["exam"])
    seen = []
    for seq in (1, 2):
        await send_frame(bob, seq, screen("blue", 640, 360, seed=seq))
        seen += await messages_until_verdict(bob, seq)
    assert [m["seq"] for m in evidence_requests(seen)] == [2]
    await send_evidence(bob, 2, screen("green", 1920, 1080, seed=2))  # the allowed editor, not frame 2
    error = await answer_for(bob, 2)
    assert error["code"] == protocol.E_UNEXPECTED_EVIDENCE and "does not show frame 2" in error["message"]
    (alert,) = await stored_alerts(store, hall["exam"].id)
    await asyncio.sleep(0.2)  # a wrongly accepted copy would be written by now
    assert (await store.get_alert(alert.id)).evidence == screen("blue", 640, 360, seed=2)
    await bob.close()


async def test_frames_as_wide_as_the_evidence_ask_for_nothing(server, hall, store):
    client = await server(evidence_max_width=1280)
    bob = await connect_student(client, hall["b"], hall["exam"])
    seen, statuses = [], []
    for seq in range(3):
        await send_frame(bob, seq, screen("blue", seed=seq))
        seen += await messages_until_verdict(bob, seq)
        statuses.append(judged(client, hall["exam"], hall["b"])["status"])
    await stored_alerts(store, hall["exam"].id)
    assert statuses == ["suspicious", "alert", "alert"]
    assert evidence_requests(seen) == []
    await bob.close()


async def test_unrecognised_screen_alerts_without_a_program(server, hall):
    client = await server()
    teacher = await client.ws_connect(f"/ws/exams/{hall['exam'].id}/live",
                                      headers=ws_headers(client, hall["teacher"]))
    await teacher.receive_json(timeout=5)
    grey = simplejpeg.encode_jpeg(np.full((720, 1280, 3), 128, np.uint8), colorspace="RGB")
    grey2 = simplejpeg.encode_jpeg(np.full((720, 1280, 3), 90, np.uint8), colorspace="RGB")
    alice = await connect_student(client, hall["a"], hall["exam"])
    for seq, jpeg in enumerate((grey, grey2)):
        await send_frame(alice, seq, jpeg)
        await answer_for(alice, seq)
    alert = await next_of(teacher, "alert")
    assert alert["alert"]["verdict"] == "unrecognised" and alert["alert"]["program"] is None
    await alice.close()
    await teacher.close()


async def test_frames_of_many_students_share_one_backbone_call(server, hall, store, classifier):
    classifier.delay_s = 0.2  # a busy model: frames pile up and must be batched together
    client = await server(max_wait_ms=50.0)
    students = [hall["a"], hall["b"]]
    for i in range(6):
        s = await store.create_user(f"s{i}", f"S {i}", "student", PASSWORD_HASH)
        await store.add_to_roster(hall["exam"].id, s.id)
        students.append(s)
    sockets = [await connect_student(client, s, hall["exam"]) for s in students]
    await asyncio.gather(*(send_frame(ws, 0, screen("green", seed=i)) for i, ws in enumerate(sockets)))
    answers = await asyncio.gather(*(answer_for(ws, 0) for ws in sockets))
    assert all(a["type"] == "ack" for a in answers)
    assert all(judged(client, hall["exam"], s)["status"] == "ok" for s in students)
    assert classifier.backbone_calls < len(sockets)
    assert max(classifier.batch_sizes) >= 2
    for ws in sockets:
        await ws.close()


async def test_a_changed_frame_is_decoded_once(server, hall, classifier, monkeypatch):
    decodes, thumbnails = [], []
    real_decode = decode.decode_rgb
    monkeypatch.setattr(decode, "decode_rgb", lambda jpeg, size: decodes.append(size) or real_decode(jpeg, size))
    monkeypatch.setattr(decode, "thumbnail", lambda jpeg: thumbnails.append(1))
    client = await server()
    alice = await connect_student(client, hall["a"], hall["exam"])
    await send_frame(alice, 0, screen("green"))
    first = await answer_for(alice, 0)
    await send_frame(alice, 1, screen("red", seed=1))
    second = await answer_for(alice, 1)
    assert first["type"] == second["type"] == "ack" and unchanged_frames(client) == 0
    # One decode per frame, at the model's size, serves change detection and the model.
    assert decodes == [classifier.frame_size] * 2 and thumbnails == []
    await alice.close()


async def test_with_heads_of_two_input_sizes_a_frame_is_decoded_at_each(server, hall, classifier, monkeypatch):
    decodes, given = [], []
    real_decode, real_classify = decode.decode_rgb, classifier.classify
    monkeypatch.setattr(decode, "decode_rgb", lambda jpeg, size: decodes.append(size) or real_decode(jpeg, size))
    # As an engine with an imported 400x225 head next to 320x180 ones (Engine.frame_sizes: frame_size first).
    monkeypatch.setattr(type(classifier), "frame_sizes", property(lambda self: (self.frame_size, (400, 225))),
                        raising=False)

    def classify(frames):
        given.extend(frames)
        return real_classify([frame[0] for frame in frames])

    monkeypatch.setattr(classifier, "classify", classify)
    client = await server()
    alice = await connect_student(client, hall["a"], hall["exam"])
    await send_frame(alice, 0, screen("green"))
    assert (await answer_for(alice, 0))["type"] == "ack"
    # Each size decoded from the JPEG, as each head was trained, not a resize of the other.
    assert decodes == [classifier.frame_size, (400, 225)]
    assert [f.shape for f in given[0]] == [(180, 320, 3), (225, 400, 3)]
    await alice.close()


async def test_unchanged_screen_reuses_the_verdict_without_the_model(server, hall, classifier):
    client = await server()
    alice = await connect_student(client, hall["a"], hall["exam"])
    pixels = np.random.default_rng(1).integers(0, 40, (720, 1280, 3), dtype=np.uint8)
    pixels[:, :, 1] = 200
    first = simplejpeg.encode_jpeg(pixels, quality=80, colorspace="RGB")
    recompressed = simplejpeg.encode_jpeg(pixels, quality=60, colorspace="RGB")
    await send_frame(alice, 0, first)
    await answer_for(alice, 0)
    assert unchanged_frames(client) == 0
    calls = classifier.backbone_calls
    await send_frame(alice, 1, first)  # identical bytes
    await send_frame(alice, 2, recompressed)  # same screen, other bytes
    await answer_for(alice, 1)
    await answer_for(alice, 2)
    assert unchanged_frames(client) == 2 and judged(client, hall["exam"], hall["a"])["status"] == "ok"
    assert classifier.backbone_calls == calls
    await send_frame(alice, 3, screen("red"))  # the screen really changed
    await answer_for(alice, 3)
    assert unchanged_frames(client) == 2
    assert classifier.backbone_calls == calls + 1
    await alice.close()


async def test_latest_frame_wins_over_the_socket(server, hall, classifier):
    classifier.delay_s = 0.6  # the window in which alice's next two frames must arrive
    # Batches of 2: while the model is busy and the next batch waits, a lone queued frame stays queued.
    client = await server(max_batch=2, max_wait_ms=0.0)
    alice = await connect_student(client, hall["a"], hall["exam"])
    bob = await connect_student(client, hall["b"], hall["exam"])
    batcher = client.server.app[BATCHER_KEY]
    await send_frame(alice, 0, screen("green", seed=0))  # taken by the (slow) model
    await until(lambda: batcher.taken == 1)
    await send_frame(bob, 0, screen("green", seed=5))  # staged, waiting for the model
    await until(lambda: batcher.taken == 2)
    await send_frame(alice, 1, screen("red", seed=1))  # queued ...
    await send_frame(alice, 2, screen("blue", seed=2))  # ... and replaced by this one
    answers = {}
    for _ in range(3):
        m = await next_of_types(alice, ("ack", "error"))
        answers[m["seq"]] = m
    assert answers[0]["type"] == "ack"
    assert answers[1] == {"type": "error", "code": "replaced", "seq": 1, "message": answers[1]["message"]}
    assert answers[2]["type"] == "ack"
    assert judged(client, hall["exam"], hall["a"])["program"] == "Terminal"  # frame 2, the last judged
    assert (await answer_for(bob, 0))["type"] == "ack"
    await alice.close()
    await bob.close()


async def until(condition, timeout_s: float = 5.0) -> None:
    """Wait for a condition of the server's state instead of guessing a delay (slow CI machines)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def next_of_types(ws, kinds):
    while True:
        m = await ws.receive_json(timeout=5)
        if m["type"] in kinds:
            return m


async def test_full_queue_answers_overloaded(server, hall, store, classifier):
    classifier.delay_s = 0.5
    client = await server(queue_size=1, max_batch=1, max_wait_ms=0.0)
    students = []
    for i in range(6):
        s = await store.create_user(f"q{i}", f"Q {i}", "student", PASSWORD_HASH)
        await store.add_to_roster(hall["exam"].id, s.id)
        students.append(await connect_student(client, s, hall["exam"]))
    for i, ws in enumerate(students):
        await send_frame(ws, 0, screen("green", seed=i))
        await asyncio.sleep(0.05)
    answers = await asyncio.gather(*(answer_for(ws, 0) for ws in students))
    codes = [a.get("code") for a in answers if a["type"] == "error"]
    assert "overloaded" in codes
    assert any(a["type"] == "ack" for a in answers)
    for ws in students:
        await ws.close()


async def test_bad_input_gets_clear_errors_and_the_session_goes_on(server, hall):
    client = await server()
    alice = await connect_student(client, hall["a"], hall["exam"])
    good = screen("green")
    await send_frame(alice, 1, b"\xff\xd8 this is not really a jpeg")
    assert (await answer_for(alice, 1))["code"] == "bad_jpeg"
    await send_frame(alice, 2, good[: len(good) // 2])  # truncated: header fine, data cut
    assert (await answer_for(alice, 2))["code"] == "bad_jpeg"
    await send_frame(alice, 3, b"GIF89a" + b"\x00" * 100)
    assert (await answer_for(alice, 3))["code"] == "bad_jpeg"
    await send_frame(alice, 5, many_scan_jpeg(640, 360))  # valid, but thousands of scans: refused undecoded
    answer = await answer_for(alice, 5)
    assert answer["code"] == "bad_jpeg" and "2647 scans" in answer["message"]
    await alice.send_bytes(b"\x01\x02")
    assert (await next_of(alice, "error"))["code"] == "bad_header"
    await alice.send_str("{not json")
    assert (await next_of(alice, "error"))["code"] == "bad_json"
    await alice.send_str(json.dumps({"type": "launch_missiles"}))
    assert (await next_of(alice, "error"))["code"] == "bad_message"
    await alice.send_str(json.dumps([1, 2, 3]))
    assert (await next_of(alice, "error"))["code"] == "bad_message"
    await send_frame(alice, 4, good)
    assert (await answer_for(alice, 4))["type"] == "ack"
    await alice.close()


async def test_oversize_frame_refused_and_huge_message_closes(server, hall):
    client = await server(max_frame_bytes=50_000)
    alice = await connect_student(client, hall["a"], hall["exam"])
    await send_frame(alice, 1, b"\xff\xd8" + b"\x00" * 60_000)
    answer = await answer_for(alice, 1)
    assert answer["code"] == "frame_too_large" and "50000" in answer["message"]
    await send_frame(alice, 2, screen("green", 320, 180))
    assert (await answer_for(alice, 2))["type"] == "ack"
    # Past twice the frame limit the message is not read into memory: closed with 1009 (too big).
    await alice.send_bytes(b"\x00" * 300_000)
    assert await close_code_of(alice) == protocol.CLOSE_TOO_BIG


async def test_fifty_megabyte_message_is_cut_off_and_the_server_goes_on(server, hall):
    client = await server(metrics_token=None)
    alice = await connect_student(client, hall["a"], hall["exam"])
    try:
        await alice.send_bytes(b"\x00" * (50 * 1024 * 1024))
        code = await close_code_of(alice)
    except ConnectionError:
        code = None  # the server hung up before the client finished writing: also refused
    assert code in (protocol.CLOSE_TOO_BIG, None)
    for _ in range(100):  # the server's handler finishes a moment after the client sees the close
        text = await (await client.get("/metrics")).text()
        if 'proctor_websocket_errors_total{code="message_too_big"} 1.0' in text:
            break
        await asyncio.sleep(0.05)
    assert 'proctor_websocket_errors_total{code="message_too_big"} 1.0' in text
    bob = await connect_student(client, hall["b"], hall["exam"])
    await send_frame(bob, 1, screen("green"))
    assert (await answer_for(bob, 1))["type"] == "ack"
    await bob.close()


async def test_decompression_bomb_refused_before_decoding(server, hall):
    client = await server()
    alice = await connect_student(client, hall["a"], hall["exam"])
    data = bytearray(simplejpeg.encode_jpeg(np.zeros((16, 16, 3), np.uint8), colorspace="RGB"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = (30000).to_bytes(2, "big") + (30000).to_bytes(2, "big")
    await send_frame(alice, 7, bytes(data))
    answer = await answer_for(alice, 7)
    assert answer["code"] == "too_many_pixels" and "30000x30000" in answer["message"]
    await alice.close()


async def test_flood_of_bad_messages_closes_with_policy_violation(server, hall):
    client = await server()
    alice = await connect_student(client, hall["a"], hall["exam"])
    for _ in range(25):
        await alice.send_str("garbage")
    assert await close_code_of(alice) == protocol.CLOSE_POLICY


async def test_client_faster_than_its_rate_is_throttled(server, hall):
    client = await server(client_fps=1.0)
    alice = await connect_student(client, hall["a"], hall["exam"])
    for seq in range(8):
        await send_frame(alice, seq, screen("green", seed=seq))
    answers = await answers_for(alice, list(range(8)))
    limited = [a for a in answers if a.get("code") == "rate_limited"]
    assert 3 <= len(limited) <= 5  # a burst of 4 is allowed, the rest is throttled
    await alice.close()


async def test_a_backlog_sent_at_once_after_a_stall_is_throttled_not_taken_for_a_slow_client(server, hall):
    client = await server(client_fps=1.0)
    alice = await connect_student(client, hall["a"], hall["exam"])
    frame = protocol.pack_frame(1, 0.0, b"x")
    # A page's frames held back by a stall arrive together; the server reads them without a pause between.
    await asyncio.gather(*(alice.send_bytes(frame) for _ in range(400)))
    answers = [await alice.receive_json(timeout=5) for _ in range(400)]
    assert sum(a.get("code") == "rate_limited" for a in answers) >= 390
    # Before: 400 answers queued before the writer ran, past its 256: closed as a client too slow to read.
    metrics = client.server.app[METRICS_KEY]
    assert metrics.websocket_errors.labels("slow_client")._value.get() == 0 and not alice.closed
    await alice.close()


async def test_a_flood_of_frames_over_the_rate_closes_the_stream(server, hall):
    # Each refused frame costs the event loop a little; without a bound one student could keep it busy.
    client = await server(client_fps=1.0)
    alice = await connect_student(client, hall["a"], hall["exam"])
    closing = asyncio.ensure_future(close_code_of(alice))  # reads every answer: not a slow client
    frame = protocol.pack_frame(1, 0.0, b"x")  # refused for the rate before its JPEG is looked at
    for _ in range(sessions._THROTTLED_LIMIT + 10):
        await alice.send_bytes(frame)
    assert await closing == protocol.CLOSE_POLICY
    metrics = client.server.app[METRICS_KEY]
    assert metrics.websocket_errors.labels("slow_client")._value.get() == 0
    assert metrics.frames_dropped.labels("rate_limited")._value.get() >= sessions._THROTTLED_LIMIT


async def test_window_share_refused(server, hall):
    client = await server()
    alice = await connect_student(client, hall["a"], hall["exam"], hello=False)
    await alice.send_json({"type": "hello", "displays": 1, "surface": "window"})
    assert (await next_of(alice, "error"))["code"] == "not_whole_screen"
    await send_frame(alice, 1, screen("green"))
    assert (await answer_for(alice, 1))["code"] == "not_whole_screen"
    await alice.close()


async def test_teacher_sees_presence_and_displays(server, hall):
    client = await server()
    teacher = await client.ws_connect(f"/ws/exams/{hall['exam'].id}/live",
                                      headers=ws_headers(client, hall["teacher"]))
    await teacher.receive_json(timeout=5)
    alice = await connect_student(client, hall["a"], hall["exam"], hello=False)
    assert (await next_of(teacher, "presence"))["state"] == "live"
    await alice.send_json({"type": "hello", "displays": 2, "extended": True, "surface": "monitor"})
    p = await next_of(teacher, "presence")
    assert p["displays"] == 2 and p["username"] == "alice"
    await alice.send_json({"type": "sharing", "state": "stopped"})
    assert (await next_of(teacher, "presence"))["state"] == "not_sharing"
    await alice.close()
    assert (await next_of(teacher, "presence"))["state"] == "disconnected"
    await teacher.close()


async def test_hello_stores_only_the_screen_size_and_only_when_it_changes(server, hall, store):
    client = await server()
    alice = await connect_student(client, hall["a"], hall["exam"], hello=False)
    padded = {"width": 1920, "height": 1080, "junk": "\U0001f600" * 3000}  # ~48 kB once stored as JSON
    for _ in range(3):  # a page repeating its hello
        await alice.send_str(json.dumps({"type": "hello", "screen": padded, "displays": 1}, ensure_ascii=False))
        await alice.send_json({"type": "heartbeat", "t": 1})
        await next_of(alice, "heartbeat")
    await alice.send_json({"type": "hello", "screen": {"width": "wide"}})
    assert (await next_of(alice, "error"))["code"] == "bad_message"
    await alice.close()
    assert await client.server.app[WRITER_KEY].flush(5)
    events = [e for e in await store.list_events(hall["exam"].id) if e.kind == "displays"]
    assert [e.detail["screen"] for e in events] == [{"width": 1920, "height": 1080}]


@pytest.mark.parametrize("who,origin,status", [
    (None, "self", 401),          # not logged in
    ("a", "http://evil.example", 403),  # forged Origin
    ("a", None, 403),             # no Origin at all
    ("c", "self", 403),           # not on the roster
    ("teacher", "self", 403),     # teachers do not stream
])
async def test_stream_handshake_refusals(server, hall, who, origin, status):
    client = await server()
    headers = {}
    if who is not None:
        headers["X-Test-User"] = str(hall[who].id)
    if origin is not None:
        headers["Origin"] = f"http://{client.server.host}:{client.server.port}" if origin == "self" else origin
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect(f"/ws/exams/{hall['exam'].id}/stream", headers=headers)
    assert info.value.status == status


async def test_stream_refused_when_exam_not_running(server, hall, store):
    await store.set_exam_state(hall["exam"].id, "ended")
    client = await server()
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect(f"/ws/exams/{hall['exam'].id}/stream", headers=ws_headers(client, hall["a"]))
    assert info.value.status == 409


async def test_other_teacher_cannot_watch_the_exam(server, hall):
    client = await server()
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect(f"/ws/exams/{hall['exam'].id}/live",
                                headers=ws_headers(client, hall["other_teacher"]))
    assert info.value.status == 403


async def test_reconnect_replaces_the_old_stream(server, hall):
    client = await server()
    first = await connect_student(client, hall["a"], hall["exam"])
    second = await connect_student(client, hall["a"], hall["exam"])
    assert await close_code_of(first) == protocol.CLOSE_REPLACED_BY_NEW_CONNECTION
    await send_frame(second, 1, screen("green"))
    assert (await answer_for(second, 1))["type"] == "ack"
    await second.close()


async def test_metrics_health_and_readiness(server, hall):
    client = await server(metrics_token="s3cret")
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200 and (await ready.json())["status"] == "ready"
    assert (await client.get("/metrics")).status == 401
    assert (await client.get("/metrics", headers={"Authorization": "Bearer wrong"})).status == 401
    # Header bytes that are not UTF-8: a refusal, not a 500 (they reach the handler as surrogates).
    request = b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n"
    assert await raw_http_status(client, request) == 401
    alice = await connect_student(client, hall["a"], hall["exam"])
    await send_frame(alice, 0, screen("green"))
    await answer_for(alice, 0)
    await send_frame(alice, 1, b"junk")
    await answer_for(alice, 1)
    text = await (await client.get("/metrics", headers={"Authorization": "Bearer s3cret"})).text()
    assert "proctor_frames_received_total 2.0" in text
    assert "proctor_frames_classified_total 1.0" in text
    assert 'proctor_frames_dropped_total{reason="bad_jpeg"} 1.0' in text
    assert "proctor_active_streams 1.0" in text
    await alice.close()


@pytest.mark.parametrize("trusted", [True, False])
async def test_forwarded_headers_only_from_trusted_proxies(server, hall, trusted):
    client = await server(trusted_proxies=("127.0.0.1",) if trusted else ())
    host = f"{client.server.host}:{client.server.port}"
    headers = {"X-Test-User": str(hall["a"].id), "Origin": f"https://{host}",
               "X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"}
    if trusted:
        ws = await client.ws_connect(f"/ws/exams/{hall['exam'].id}/stream", headers=headers)
        assert (await ws.receive_json(timeout=5))["type"] == "config"
        await ws.close()
    else:
        # Anyone can send these headers: from an untrusted address the https Origin is foreign.
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await client.ws_connect(f"/ws/exams/{hall['exam'].id}/stream", headers=headers)
        assert info.value.status == 403


class FakeGpuClassifier(FakeClassifier):
    """Says it runs on CUDA and decodes JPEG batches itself, like Engine.classify_jpegs on a GPU."""

    device = SimpleNamespace(type="cuda")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.jpeg_batches = []

    def classify_jpegs(self, jpegs):
        self.jpeg_batches.append(len(jpegs))
        if any(REJECT_MARK in j for j in jpegs):
            raise RuntimeError("nvJPEG: unsupported JPEG")  # as a device decoder fails a whole batch
        return self.classify([decode.decode_rgb(j, self.frame_size) for j in jpegs])


REJECT_MARK = b"device decoder rejects this"


def with_comment(jpeg: bytes, text: bytes) -> bytes:
    """The same JPEG with a COM segment after SOI: valid for libjpeg-turbo."""
    return jpeg[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + jpeg[2:]


async def test_gpu_decoding_batches_jpegs_and_falls_back_to_the_cpu(store, hall, tmp_path, aiohttp_client):
    classifier = FakeGpuClassifier()
    app = create_app(make_config(tmp_path, decode_device="gpu", max_wait_ms=100.0), store=store,
                     classifier=classifier, authenticator=HeaderAuthenticator(store))
    client = await aiohttp_client(app)
    alice = await connect_student(client, hall["a"], hall["exam"])
    bob = await connect_student(client, hall["b"], hall["exam"])
    await asyncio.gather(send_frame(alice, 1, screen("green")),
                         send_frame(bob, 1, with_comment(screen("blue"), REJECT_MARK)))
    a, b = await answer_for(alice, 1), await answer_for(bob, 1)
    # The device decoder refused the batch; the server decoded it on the CPU and both got verdicts.
    assert classifier.jpeg_batches == [2]
    assert a["type"] == b["type"] == "ack"
    assert judged(client, hall["exam"], hall["a"])["status"] == "ok"
    assert judged(client, hall["exam"], hall["b"])["program"] == "Terminal"
    await alice.close()
    await bob.close()


async def test_gpu_decoding_without_a_gpu_model_refuses_to_start(store, tmp_path):
    app = create_app(make_config(tmp_path, decode_device="gpu"), store=store, classifier=FakeClassifier(),
                     authenticator=HeaderAuthenticator(store))
    runner = web.AppRunner(app)
    with pytest.raises(RuntimeError, match="decode_device=gpu needs the model on a CUDA device"):
        await runner.setup()
    await runner.cleanup()

async def test_alert_thumbnail_comes_from_the_decoded_frame(server, hall, classifier, monkeypatch):
    # The frame that opens an alert went through the model: its pixels make the thumbnail, the
    # evidence JPEG is not decoded a second time.
    monkeypatch.setattr(decode, "evidence_thumbnail", lambda jpeg: pytest.fail("evidence decoded again"))
    client = await server()
    teacher = await client.ws_connect(f"/ws/exams/{hall['exam'].id}/live",
                                      headers=ws_headers(client, hall["teacher"]))
    assert (await teacher.receive_json(timeout=5))["type"] == "snapshot"
    bob = await connect_student(client, hall["b"], hall["exam"])
    other_red = np.zeros((720, 1280, 3), np.uint8)
    other_red[:, :, 0] = 200
    other_red[:, :640, 0] = 120  # a visibly different red screen: not "unchanged"
    for seq, frame in enumerate((screen("red"), simplejpeg.encode_jpeg(other_red, colorspace="RGB"))):
        await send_frame(bob, seq, frame)
        answer = await answer_for(bob, seq)
        assert answer["type"] == "ack" and unchanged_frames(client) == 0
    thumbnail = (await next_of(teacher, "alert"))["alert"]["thumbnail"]
    data = base64.b64decode(thumbnail.removeprefix("data:image/jpeg;base64,"))
    assert decode.read_size(data) == classifier.frame_size
    await bob.close()
    await teacher.close()


async def test_an_alert_closed_while_its_thumbnail_is_made_reaches_teachers_after_its_opening(server, hall,
                                                                                              monkeypatch):
    release = asyncio.Event()
    alert_thumbnail = sessions.alert_thumbnail

    async def slow_thumbnail(*args):
        await release.wait()
        return await alert_thumbnail(*args)

    monkeypatch.setattr(sessions, "alert_thumbnail", slow_thumbnail)
    client = await server()
    teacher = await client.ws_connect(f"/ws/exams/{hall['exam'].id}/live",
                                      headers=ws_headers(client, hall["teacher"]))
    assert (await teacher.receive_json(timeout=5))["type"] == "snapshot"
    bob = await connect_student(client, hall["b"], hall["exam"])

    def half_dark(colour):  # another screen of the same colour: not "unchanged"
        pixels = simplejpeg.decode_jpeg(screen(colour), colorspace="RGB").copy()
        pixels[:, :640] //= 2
        return simplejpeg.encode_jpeg(pixels, quality=70, colorspace="RGB")

    await send_frame(bob, 0, screen("red"))
    await answer_for(bob, 0)
    assert judged(client, hall["exam"], hall["b"])["status"] == "suspicious"
    await send_frame(bob, 1, half_dark("red"))  # opens the alert; its thumbnail is held up
    await asyncio.sleep(0.3)
    for seq, frame in ((2, screen("green")), (3, half_dark("green"))):  # two allowed screens close it
        await send_frame(bob, seq, frame)
        assert (await answer_for(bob, seq))["type"] == "ack"
    release.set()
    kinds = []
    while "alert_closed" not in kinds:
        kinds.append((await teacher.receive_json(timeout=5))["type"])
    # Before: the close went out first, the dashboard ignored it, and then showed the alert open for good.
    assert "alert" in kinds and kinds.index("alert") < kinds.index("alert_closed")
    await bob.close()
    await teacher.close()


async def test_another_nodes_alert_closed_while_it_is_relayed_reaches_teachers_after_its_opening(
        server, hall, store, monkeypatch):
    from proctor import server as server_module
    from proctor.storage.base import Alert, utcnow

    relay = server_module._relay_alert

    async def slow_relay(app, payload):  # reading the alert and making its thumbnail take a while
        await asyncio.sleep(0.3)
        await relay(app, payload)

    monkeypatch.setattr(server_module, "_relay_alert", slow_relay)
    client = await server()
    teacher = await client.ws_connect(f"/ws/exams/{hall['exam'].id}/live",
                                      headers=ws_headers(client, hall["teacher"]))
    assert (await teacher.receive_json(timeout=5))["type"] == "snapshot"
    # Another node's student: its alert opened and closed at once (the notices of a drained write queue).
    alert = Alert(id="c" * 32, exam_id=hall["exam"].id, student_id=hall["b"].id, opened_at=utcnow(),
                  verdict="unrecognised", program=None, scores={"chat": 0.9}, evidence=screen("red", 320, 180))
    await store.add_alert(alert)
    await store.publish("alert", {"id": alert.id, "exam_id": alert.exam_id, "node": "another-node"})
    await store.publish("alert_closed", {"alert_id": alert.id, "exam_id": alert.exam_id, "student_id": hall["b"].id,
                                         "closed_at": utcnow().isoformat(), "node": "another-node"})
    kinds = []
    while "alert_closed" not in kinds:
        kinds.append((await teacher.receive_json(timeout=5))["type"])
    # Before: the close went out while the opening was still being read, and the dashboard kept it open.
    assert "alert" in kinds and kinds.index("alert") < kinds.index("alert_closed")
    await teacher.close()


async def test_alert_thumbnail_of_evidence_that_does_not_decode_is_empty():
    from proctor.sessions import alert_thumbnail

    # Before: the cross-node relay raised and the teachers of that node never saw the alert.
    with ThreadPoolExecutor(1) as pool:
        for executor in (None, pool):
            assert await alert_thumbnail(b"\xff\xd8\xff\xe0" + b"\x00" * 64, executor) == b""
            thumb = await alert_thumbnail(screen("red"), executor)
            assert thumb[:2] == b"\xff\xd8"


@pytest.mark.parametrize("decode_threads, loop_max_bytes, loop_max_pixels, progressive, decoded_in", [
    (0, 256 * 1024, 1280 * 800, False, "MainThread"),
    # Frames costly to decode go to the thread even then, so no client holds the loop for long: too many
    # bytes, too many pixels, progressive.
    (0, 1000, 1280 * 800, False, "decode"),
    (0, 256 * 1024, 320 * 180, False, "decode"),
    (0, 256 * 1024, 1280 * 800, True, "decode"),
    (2, 256 * 1024, 1280 * 800, False, "decode"),
])
async def test_frames_are_decoded_where_decode_threads_says(server, hall, monkeypatch, decode_threads, loop_max_bytes,
                                                            loop_max_pixels, progressive, decoded_in):
    monkeypatch.setattr(sessions, "LOOP_DECODE_MAX_BYTES", loop_max_bytes)
    monkeypatch.setattr(sessions, "LOOP_DECODE_MAX_PIXELS", loop_max_pixels)
    threads = []
    real = decode.decode_with_thumbnail

    def recording(jpeg, size):
        threads.append(threading.current_thread().name)
        return real(jpeg, size)

    monkeypatch.setattr(decode, "decode_with_thumbnail", recording)
    client = await server(decode_threads=decode_threads)
    alice = await connect_student(client, hall["a"], hall["exam"])
    for seq, colour in enumerate(("green", "red", "green")):
        frame = screen(colour, 640, 360, seed=seq)  # 60-75 kB, like a page's frames
        if progressive:
            out = io.BytesIO()
            Image.open(io.BytesIO(frame)).save(out, "JPEG", quality=70, progressive=True)
            frame = out.getvalue()
            assert decode.is_progressive(frame)
        assert 1000 < len(frame) <= 256 * 1024  # under the real limit, over the test's small one
        await send_frame(alice, seq, frame)
        assert (await answer_for(alice, seq))["type"] == "ack"
    await alice.close()
    assert len(threads) == 3 and all(name.startswith(decoded_in) for name in threads), threads


def test_auto_decode_threads_follow_the_model_and_the_cores(tmp_path, monkeypatch):
    from proctor.server import decode_threads

    def OnDevice(kind):  # noqa: N802 (reads like the engine it stands for)
        return SimpleNamespace(device=SimpleNamespace(type=kind))

    cores = {0, 1}
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: cores)
    auto = make_config(tmp_path, decode_threads=-1)
    assert decode_threads(auto, FakeClassifier()) == 0  # no device: a CPU model
    assert decode_threads(auto, OnDevice("cpu")) == 0
    assert decode_threads(auto, OnDevice("cuda")) == 2  # a GPU model outruns one event loop's decoding
    cores = set(range(16))
    assert decode_threads(auto, OnDevice("cpu")) == 2
    assert decode_threads(make_config(tmp_path, decode_threads=0), OnDevice("cuda")) == 0  # as configured
    assert decode_threads(make_config(tmp_path, decode_threads=3), OnDevice("cpu")) == 3


async def test_outbox_of_a_client_that_stops_reading_closes_its_socket():
    from proctor.metrics import Metrics
    from proctor.sessions import Outbox

    class StuckSocket:
        closed = False
        close_args = None

        async def send_json(self, message):
            await asyncio.Event().wait()  # the client never reads

        async def close(self, code, message):
            self.close_args = (code, message)
            self.closed = True

    ws = StuckSocket()
    metrics = Metrics()
    outbox = Outbox(ws, metrics, limit=3)
    for i in range(5):  # one is taken by the stuck writer, three fill the queue, the fifth overflows
        outbox.send({"type": "ack", "seq": i})
        await asyncio.sleep(0)
    assert outbox.overflowed
    await outbox.close()
    assert ws.close_args == (protocol.CLOSE_POLICY, b"client too slow")
    assert metrics.websocket_errors.labels("slow_client")._value.get() == 1


async def test_a_client_that_never_takes_the_close_does_not_hold_its_session_for_good(monkeypatch):
    from proctor.metrics import Metrics
    from proctor.sessions import Outbox

    class DeadSocket:
        closed = False

        async def send_json(self, message):
            await asyncio.Event().wait()  # the client never reads...

        async def close(self, code, message):
            await asyncio.Event().wait()  # ...so aiohttp's close waits for the drain without end

    monkeypatch.setattr(sessions, "CLOSE_WAIT_S", 0.05)
    outbox = Outbox(DeadSocket(), Metrics(), limit=1)
    for i in range(3):
        outbox.send({"type": "ack", "seq": i})
        await asyncio.sleep(0)
    assert outbox.overflowed
    # Before: close() awaited the socket's close for ever, so the session was never detached from its exam.
    await asyncio.wait_for(outbox.close(), 5)


async def test_a_live_view_that_stops_reading_is_cut_off_and_leaves_its_room(server, hall, store, monkeypatch):
    import socket

    monkeypatch.setattr(sessions, "CLOSE_WAIT_S", 0.3)
    client = await server()
    hub = client.server.app[HUB_KEY]
    exam = hall["exam"]
    # A teacher's laptop gone to sleep with its connection still up: it neither reads nor sends.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (client.server.host, client.server.port))
    headers = ws_headers(client, hall["teacher"])
    await loop.sock_sendall(sock, (
        f"GET /ws/exams/{exam.id}/live HTTP/1.1\r\nHost: {client.server.host}:{client.server.port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
        f"X-Test-User: {headers['X-Test-User']}\r\nOrigin: {headers['Origin']}\r\n\r\n").encode())
    assert b" 101 " in await loop.sock_recv(sock, 256)
    await until(lambda: exam.id in hub._rooms and hub._rooms[exam.id].teachers)
    slow = client.server.app[METRICS_KEY].websocket_errors.labels("slow_client")
    student = await store.create_user("verbose", "V" * 200, "student", PASSWORD_HASH)  # bigger messages
    for i in range(100_000):  # presence changes until the kernel's buffers and then the view's queue are full
        hub.set_presence(exam.id, student, "live" if i % 2 else "stale")
        if i % 100 == 0:
            await asyncio.sleep(0.001)
            if slow._value.get():
                break
    assert slow._value.get() == 1
    # Before: the close waited on a drain that never came, and the handler on a socket that never speaks.
    await until(lambda: not hub._rooms[exam.id].teachers, timeout_s=10)
    sock.close()


async def test_a_room_made_by_another_nodes_presence_goes_at_the_next_resync_after_a_lost_end(server, hall, store):
    from proctor.server import _resync

    client = await server()
    hub = client.server.app[HUB_KEY]
    exam = hall["exam"]
    hub.set_presence(exam.id, hall["a"], "live", from_node="another-node")  # no socket here, only the notice
    await store.set_exam_state(exam.id, "ended")  # and the end's notice never came
    await _resync(client.server.app, "exam")
    # Before: the resync looked only at exams with sockets here, and the room stayed until a restart.
    assert exam.id not in hub._rooms


async def test_presence_notices_the_write_queue_refused_are_sent_again_at_their_latest_state(hall):
    from proctor.metrics import Metrics

    sent, accept = [], [False]

    def publish(channel, payload):
        if accept[0]:
            sent.append((payload["student_id"], payload["state"]))
        return accept[0]

    hub = sessions.Hub(Metrics(), node_id="n", publish=publish)
    exam = hall["exam"]
    hub.set_presence(exam.id, hall["a"], "live")  # the database is down and the queue half full: refused
    hub.set_presence(exam.id, hall["a"], "disconnected")  # refused too
    hub.set_presence(exam.id, hall["b"], "live")
    hub.set_presence(exam.id, hall["b"], "live", from_node="other")  # b is on another node now: its say
    accept[0] = True
    hub.republish_presence()
    # Before: other nodes never heard a was gone, and showed the student live for good.
    assert sent == [(hall["a"].id, "disconnected")]
    hub.republish_presence()
    assert len(sent) == 1  # sent once


async def test_the_resync_closes_only_sockets_older_than_the_account_it_read(hall):
    import dataclasses

    from proctor.metrics import Metrics

    class Socket:
        closed = False
        code = None

        async def close(self, code, message):
            self.code, self.closed = code, True

    hub = sessions.Hub(Metrics(), node_id="n")
    user = hall["a"]
    before_logout, after_login, before_reset = Socket(), Socket(), Socket()
    with hub.user_socket(dataclasses.replace(user, session_epoch=3), before_logout), \
            hub.user_socket(dataclasses.replace(user, session_epoch=5), after_login), \
            hub.user_socket(dataclasses.replace(user, session_epoch=2, password_hash="old"), before_reset):
        # The account as a resync read it: logged out since the first socket opened; the second socket came
        # with a login after that read, so it must stay.
        await hub.close_ended_sessions(dataclasses.replace(user, session_epoch=4))
    assert before_logout.code == protocol.CLOSE_LOGGED_OUT and before_reset.code == protocol.CLOSE_PASSWORD_RESET
    assert not after_login.closed


async def test_a_stream_opened_as_its_exam_ends_is_closed_and_brings_no_room_back(server, hall):
    from proctor.appkeys import HUB_KEY

    client = await server()
    hub = client.server.app[HUB_KEY]
    # This node heard of the end while the handshake (which read the exam as running) was under way.
    await hub.end_exam(hall["exam"].id, protocol.CLOSE_EXAM_ENDED, "the exam has ended")
    ws = await client.ws_connect(f"/ws/exams/{hall['exam'].id}/stream", headers=ws_headers(client, hall["a"]))
    assert await close_code_of(ws, timeout=5) == protocol.CLOSE_EXAM_ENDED
    assert hall["exam"].id not in hub._rooms


async def test_a_whole_hall_going_stale_at_once_does_not_close_the_teachers_live_view(server, hall, store):
    from proctor.appkeys import HUB_KEY

    client = await server()
    hub = client.server.app[HUB_KEY]
    exam = hall["exam"]
    # The teacher opens the live view before the hall joins with the exam's code: its roster is nearly empty.
    teacher = await client.ws_connect(f"/ws/exams/{exam.id}/live", headers=ws_headers(client, hall["teacher"]))
    assert (await teacher.receive_json(timeout=5))["type"] == "snapshot"
    students = [await store.create_user(f"s{i:03d}", f"Student {i}", "student", PASSWORD_HASH) for i in range(400)]
    for student in students:
        await store.add_to_roster(exam.id, student.id)
        hub.set_presence(exam.id, student, "live")
    assert len([await next_of(teacher, "presence") for _ in students]) == 400
    # One housekeeping tick after the hall's network dropped: every student's presence changes at once.
    for student in students:
        hub.set_presence(exam.id, student, "stale")
    seen = [await next_of(teacher, "presence") for _ in students]
    assert {m["student_id"] for m in seen} == {s.id for s in students} and {m["state"] for m in seen} == {"stale"}
    assert not teacher.closed
    await teacher.close()


async def test_shutdown_closes_streams_and_live_views_with_going_away_at_once(server, hall):
    client = await server()
    student = await connect_student(client, hall["a"], hall["exam"])
    teacher = await client.ws_connect(f"/ws/exams/{hall['exam'].id}/live",
                                      headers=ws_headers(client, hall["teacher"]))
    assert (await teacher.receive_json(timeout=5))["type"] == "snapshot"
    # Before: the handlers kept running until aiohttp's 60 s shutdown timeout cancelled them.
    closing = asyncio.create_task(client.server.close())
    assert await close_code_of(student, timeout=5) == protocol.CLOSE_GOING_AWAY
    assert await close_code_of(teacher, timeout=5) == protocol.CLOSE_GOING_AWAY
    await asyncio.wait_for(closing, 10)


async def test_handshake_while_the_database_is_down_is_a_503(server, hall, store, monkeypatch):
    from proctor.storage.base import StoreUnavailable

    client = await server()

    async def down(*args, **kwargs):
        raise StoreUnavailable("connection refused")

    monkeypatch.setattr(store, "get_exam", down)
    for path, user in (("stream", hall["a"]), ("live", hall["teacher"])):
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await client.ws_connect(f"/ws/exams/{hall['exam'].id}/{path}", headers=ws_headers(client, user))
        assert info.value.status == 503, path


async def test_live_view_that_fails_after_the_handshake_closes_with_1011(server, hall, store, monkeypatch, caplog):
    client = await server()

    async def broken(exam_id):
        raise RuntimeError("a bug")

    monkeypatch.setattr(store, "list_roster", broken)
    teacher = await client.ws_connect(f"/ws/exams/{hall['exam'].id}/live",
                                      headers=ws_headers(client, hall["teacher"]))
    assert await close_code_of(teacher, timeout=5) == protocol.CLOSE_INTERNAL
    assert "live view of exam" in caplog.text


async def test_a_flood_of_control_messages_is_refused_and_closes_the_stream(server, hall, store):
    client = await server()
    alice = await connect_student(client, hall["a"], hall["exam"], hello=False)
    # Before: every hello was answered and queued a "displays" event in the write queue all students share.
    for i in range(60):
        await alice.send_json({"type": "hello", "displays": 1 + i % 2, "surface": "monitor"})
    assert await close_code_of(alice) == protocol.CLOSE_POLICY
    assert await client.server.app[WRITER_KEY].flush(5)
    displays = [e for e in await store.list_events(hall["exam"].id) if e.kind == "displays"]
    assert 1 <= len(displays) <= 12


async def test_exam_id_past_64_bits_is_not_found(server, hall):
    client = await server()
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect(f"/ws/exams/{10**30}/stream", headers=ws_headers(client, hall["a"]))
    assert info.value.status == 404  # before: SQLite's OverflowError, a 500 and a traceback


async def test_head_reloads_close_together_end_with_the_latest_head_set(store, tmp_path):
    import threading

    from proctor.appkeys import CLASSIFIER_KEY, STORE_KEY
    from proctor.server import reload_heads
    from fakes import FAKE_HEADS

    class SlowFirstLoad(FakeClassifier):
        def __init__(self):
            super().__init__()
            self.release = threading.Event()
            self.calls = 0
            self.applied = []

        def set_heads(self, records, strict=True):
            self.calls += 1
            if self.calls == 1:
                self.release.wait(5)  # the first reload is slow to build its heads
            self.applied.append(sorted(r.name for r in records))

    await add_fake_heads(store, FAKE_HEADS[:1])
    classifier = SlowFirstLoad()
    app = create_app(make_config(tmp_path), store=store, classifier=classifier,
                     authenticator=HeaderAuthenticator(store))
    app[STORE_KEY], app[CLASSIFIER_KEY] = store, classifier
    first = asyncio.create_task(reload_heads(app))
    await asyncio.sleep(0.1)
    await add_fake_heads(store, FAKE_HEADS[1:])
    second = asyncio.create_task(reload_heads(app))
    await asyncio.sleep(0.2)
    classifier.release.set()
    await asyncio.gather(first, second)
    # Before: the second reload applied the new set, then the slow first one put the old set back.
    assert classifier.applied[-1] == sorted(h.name for h in FAKE_HEADS)


async def test_an_ended_exam_is_forgotten_once_its_last_socket_closes(server, hall, store):
    from proctor.appkeys import HUB_KEY

    client = await server()
    hub = client.server.app[HUB_KEY]
    alice = await connect_student(client, hall["a"], hall["exam"])
    teacher = await client.ws_connect(f"/ws/exams/{hall['exam'].id}/live",
                                      headers=ws_headers(client, hall["teacher"]))
    assert (await teacher.receive_json(timeout=5))["type"] == "snapshot"
    await store.set_exam_state(hall["exam"].id, "ended")
    await store.publish("exam", {"id": hall["exam"].id, "state": "ended"})
    assert await close_code_of(alice) == protocol.CLOSE_EXAM_ENDED
    # The teacher still sees the students leave.
    assert (await next_of(teacher, "presence"))["state"] == "disconnected"
    assert hall["exam"].id in hub._rooms
    await teacher.close()
    for _ in range(100):
        if hall["exam"].id not in hub._rooms:
            break
        await asyncio.sleep(0.02)
    # Before: every exam's room (presence of each student) stayed in memory until the server restarted.
    assert hall["exam"].id not in hub._rooms
    # Another node's late "disconnected" notice must not bring the room back for good, nor its alert
    # notices (its streams' alerts closing at the end).
    hub.set_presence(hall["exam"].id, hall["b"], "disconnected", from_node="another-node")
    hub.alert_closed(hall["exam"].id, hall["b"].id, "a" * 32, "2026-11-30T12:00:00+00:00")
    hub.alert_opened(hall["exam"].id, hall["b"], {"id": "b" * 32, "opened_at": "", "verdict": "", "program": ""})
    assert hall["exam"].id not in hub._rooms
    # A teacher looking back at the ended exam: its room goes with the last socket.
    teacher = await client.ws_connect(f"/ws/exams/{hall['exam'].id}/live",
                                      headers=ws_headers(client, hall["teacher"]))
    assert (await teacher.receive_json(timeout=5))["type"] == "snapshot"
    assert hall["exam"].id in hub._rooms
    await teacher.close()
    await until(lambda: hall["exam"].id not in hub._rooms)


async def test_gpu_memory_gauge_follows_the_model(store, hall, tmp_path, aiohttp_client):
    classifier = FakeClassifier()
    classifier.device_memory_bytes = lambda: 123_456_789  # as Engine reports on CUDA
    app = create_app(make_config(tmp_path), store=store, classifier=classifier,
                     authenticator=HeaderAuthenticator(store))
    client = await aiohttp_client(app)
    for _ in range(40):
        text = await (await client.get("/metrics")).text()
        if "proctor_gpu_memory_bytes 1.23456789e+08" in text:
            break
        await asyncio.sleep(0.1)
    assert "proctor_gpu_memory_bytes 1.23456789e+08" in text


async def test_same_screen_while_the_first_is_classified_waits_for_its_verdict(server, hall, classifier):
    classifier.delay_s = 0.3  # the first frame is still in the model when the second arrives
    client = await server()
    alice = await connect_student(client, hall["a"], hall["exam"])
    pixels = np.random.default_rng(3).integers(0, 40, (720, 1280, 3), dtype=np.uint8)
    pixels[:, :, 1] = 200
    await send_frame(alice, 1, simplejpeg.encode_jpeg(pixels, quality=80, colorspace="RGB"))
    await asyncio.sleep(0.05)
    await send_frame(alice, 2, simplejpeg.encode_jpeg(pixels, quality=60, colorspace="RGB"))
    first, second = await answers_for(alice, [1, 2])
    assert first["type"] == second["type"] == "ack"
    # The second reused the first's verdict: one frame unchanged, one through the model.
    assert unchanged_frames(client) == 1 and judged(client, hall["exam"], hall["a"])["status"] == "ok"
    assert classifier.backbone_calls == 1  # the join burst does not classify the same screen twice
    await alice.close()


async def test_served_app_keeps_start_up_objects_out_of_full_collections(store, classifier, tmp_path,
                                                                          aiohttp_client):
    """`proctor serve` freezes what start-up made (a full GC pass over it stops the loop for ~170 ms), and the
    app gives it back to normal collection when it stops."""
    import gc

    from proctor.server import serving_app

    assert gc.get_freeze_count() == 0
    app = serving_app(make_config(tmp_path), store=store, classifier=classifier,
                      authenticator=HeaderAuthenticator(store))
    client = await aiohttp_client(app)
    assert gc.get_freeze_count() > 1000
    assert (await client.get("/readyz")).status == 200
    await client.close()
    assert gc.get_freeze_count() == 0
