"""Two server processes on loopback sharing one PostgreSQL: alerts, presence and heads cross nodes."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from fakes import screen
from node_main import ENGINE_SEED
from proctor import protocol
from proctor.models.engine import Engine
from proctor.models.heads import head_to_record
from proctor.passwords import hash_password
from proctor.storage import open_store
from test_server_engine import colour_head

pytestmark = pytest.mark.postgres
HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_ready(session: aiohttp.ClientSession, base: str, process: subprocess.Popen) -> None:
    for _ in range(300):
        if process.poll() is not None:
            raise AssertionError(f"node {base} exited with {process.returncode}")
        try:
            async with session.get(base + "/readyz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"node {base} never became ready")


async def heads_of(session, base):
    async with session.get(base + "/readyz") as response:
        return sorted((await response.json())["heads"])


async def test_alert_from_node_b_reaches_teacher_on_node_a(postgres_url, tmp_path):
    store = await open_store(postgres_url)
    await store.migrate()
    engine = Engine.random(seed=ENGINE_SEED, width=64, height=36, runtime="torch")
    await store.add_head(head_to_record(colour_head(engine, "chat", "Chat web app", "red", "green")))
    await store.add_head(head_to_record(colour_head(engine, "editor", "Code editor", "green", "red")))
    teacher = await store.create_user("teacher", "T", "teacher", hash_password("pw-unused-here"))
    student = await store.create_user("student", "S", "student", teacher.password_hash)
    exam = await store.create_exam("Chemistry", teacher.id, ["editor"], "CHEM01")
    await store.add_to_roster(exam.id, student.id)
    await store.set_exam_state(exam.id, "running")

    ports = [free_port(), free_port()]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    logs = [open(tmp_path / f"node{i}.log", "wb") for i in range(2)]
    nodes = [subprocess.Popen([sys.executable, str(HERE / "node_main.py"), str(port), postgres_url,
                               str(tmp_path / f"node{i}")], env=env, stdout=subprocess.DEVNULL, stderr=log)
             for i, (port, log) in enumerate(zip(ports, logs))]
    a, b = (f"http://127.0.0.1:{port}" for port in ports)
    try:
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, a, nodes[0])
            await wait_ready(session, b, nodes[1])
            teacher_ws = await session.ws_connect(f"{a}/ws/exams/{exam.id}/live",
                                                  headers={"X-Test-User": str(teacher.id), "Origin": a})
            assert (await teacher_ws.receive_json(timeout=5))["type"] == "snapshot"
            student_ws = await session.ws_connect(f"{b}/ws/exams/{exam.id}/stream",
                                                  headers={"X-Test-User": str(student.id), "Origin": b})
            assert (await student_ws.receive_json(timeout=5))["type"] == "config"

            async def teacher_gets(kind):
                while True:
                    message = await teacher_ws.receive_json(timeout=10)
                    if message["type"] == kind:
                        return message

            presence = await teacher_gets("presence")
            assert presence["username"] == "student" and presence["state"] == "live"
            for seq in range(2):
                # One at a time: a frame sent while the previous one is queued would replace it.
                await student_ws.send_bytes(protocol.pack_frame(seq, 0.0, screen("red", seed=seq)))
                while (await student_ws.receive_json(timeout=10)).get("seq") != seq:
                    pass
            alert = await teacher_gets("alert")
            assert alert["alert"]["program"] == "Chat web app"
            assert alert["alert"]["username"] == "student"
            assert alert["alert"]["thumbnail"].startswith("data:image/jpeg;base64,")

            # A head deactivated through one node's store is dropped by every node, without restart.
            await store.set_head_active("chat", False)
            await store.publish("heads", {"name": "chat"})
            for _ in range(100):
                if await heads_of(session, a) == await heads_of(session, b) == ["editor"]:
                    break
                await asyncio.sleep(0.1)
            assert await heads_of(session, a) == ["editor"]
            assert await heads_of(session, b) == ["editor"]
            await student_ws.close()
            await teacher_ws.close()
    finally:
        for node in nodes:
            node.terminate()
        for node in nodes:
            node.wait(timeout=20)
        for log in logs:
            log.close()
        await store.close()
