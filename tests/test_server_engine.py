"""The server with the real model engine (a small seeded backbone): heads from the store, hot reload."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from fakes import HeaderAuthenticator, screen
from proctor import protocol
from proctor.batching import decode
from proctor.config import Config
from proctor.models.engine import Engine
from proctor.models.heads import head_to_record, make_head
from proctor.passwords import hash_password
from proctor.server import create_app
from test_server import judged, unchanged_frames


def colour_head(engine: Engine, name: str, program: str, positive: str, negative: str):
    """A real logistic head on the engine's backbone that separates two colours of screen."""
    size = engine.frame_size
    pos = engine.features([decode.decode_rgb(screen(positive, seed=s), size) for s in range(4)]).mean(0)
    neg = engine.features([decode.decode_rgb(screen(negative, seed=s), size) for s in range(4)]).mean(0)
    direction = (pos - neg) / (np.linalg.norm(pos - neg) ** 2)
    weight = (8.0 * direction).astype(np.float32)[None, :]
    bias = np.array([-8.0 * float(direction @ (pos + neg) / 2)], np.float32)
    return make_head(name, program, "logistic", {"weight": weight, "bias": bias}, engine.backbone)


@pytest.fixture(scope="module")
def engine():
    return Engine.random(seed=3, width=64, height=36, runtime="torch")


async def test_real_engine_classifies_streamed_frames_and_reloads_heads(store, engine, tmp_path, aiohttp_client):
    chat = colour_head(engine, "chat", "Chat web app", "red", "green")
    editor = colour_head(engine, "editor", "Code editor", "green", "red")
    await store.add_head(head_to_record(chat))
    await store.add_head(head_to_record(editor))
    teacher = await store.create_user("t", "T", "teacher", hash_password("pw-unused-here"))
    student = await store.create_user("s", "S", "student", teacher.password_hash)
    exam = await store.create_exam("Physics", teacher.id, ["editor"], "PHYS01")
    await store.add_to_roster(exam.id, student.id)
    await store.set_exam_state(exam.id, "running")
    # Only the chat head is active at start; the editor head arrives while the server runs.
    await store.set_head_active("editor", False)

    config = Config(database_url=f"sqlite:///{tmp_path}/test.db", data_dir=str(tmp_path), client_fps=30.0,
                    max_wait_ms=5.0)
    client = await aiohttp_client(create_app(config, store=store, classifier=engine,
                                             authenticator=HeaderAuthenticator(store)))
    assert [h.name for h in engine.heads] == ["chat"]
    calls_before = engine.backbone_calls
    headers = {"X-Test-User": str(student.id), "Origin": f"http://{client.server.host}:{client.server.port}"}
    ws = await client.ws_connect(f"/ws/exams/{exam.id}/stream", headers=headers)
    assert (await ws.receive_json(timeout=5))["type"] == "config"

    async def verdict(seq, jpeg):
        await ws.send_bytes(protocol.pack_frame(seq, 0.0, jpeg))
        while True:
            message = await ws.receive_json(timeout=10)
            if message.get("seq") == seq and message["type"] in ("ack", "error"):
                return message

    red = await verdict(1, screen("red", seed=11))
    assert red["type"] == "ack"
    assert judged(client, exam, student) == {"status": "suspicious", "program": "Chat web app"}
    await verdict(2, screen("green", seed=12))
    assert judged(client, exam, student)["status"] != "ok"  # the allowed editor head is not loaded yet

    await store.set_head_active("editor", True)
    await store.publish("heads", {"name": "editor"})
    for _ in range(100):
        if len(engine.heads) == 2:
            break
        await asyncio.sleep(0.05)
    assert sorted(h.name for h in engine.heads) == ["chat", "editor"]
    ready = await (await client.get("/readyz")).json()
    assert sorted(ready["heads"]) == ["chat", "editor"]

    unchanged = unchanged_frames(client)
    await verdict(3, screen("green", seed=13))
    # The same-looking screen as frame 2, but the head set changed: classified again, not reused.
    assert unchanged_frames(client) == unchanged
    assert judged(client, exam, student) == {"status": "ok", "program": "Code editor"}
    # Two heads now, still one backbone pass per batch.
    assert engine.backbone_calls - calls_before == 3
    await ws.close()
