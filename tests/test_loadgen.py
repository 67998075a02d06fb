"""The load generator: statistics, frame plan, screens, options, capacity search, and real runs on loopback."""

from __future__ import annotations

import asyncio
import json
import random
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import simplejpeg
from aiohttp import WSMsgType, web
from fakes import FAKE_HEADS, FakeClassifier
from prometheus_client import CollectorRegistry, generate_latest
from safetensors.numpy import save as save_safetensors

from benchmarks import loadgen
from proctor.appkeys import STORE_KEY
from proctor.config import Config
from proctor.metrics import Metrics
from proctor.passwords import hash_password
from proctor.batching.decode import read_size
from proctor.protocol import E_OVERLOADED, E_REPLACED, unpack_frame
from proctor.server import create_app
from proctor.storage.base import HeadRecord, utcnow

# ------------------------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("q", [0, 25, 50, 95, 99, 100])
def test_percentile_matches_numpy(q: float) -> None:
    values = sorted(random.Random(3).uniform(0, 1000) for _ in range(1001))
    assert loadgen.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_of_nothing_is_none_and_q_is_checked() -> None:
    assert loadgen.percentile([], 50) is None
    assert loadgen.latency_summary([]) == {"p50": None, "p95": None, "p99": None, "max": None}
    with pytest.raises(ValueError, match="q=101"):
        loadgen.percentile([1.0], 101)


def test_latency_summary() -> None:
    summary = loadgen.latency_summary([float(v) for v in range(1, 101)])
    assert summary == {"p50": 50.5, "p95": 95.0, "p99": 99.0, "max": 100.0}


def _result(p99: float | None, dropped: dict | None = None, errors: dict | None = None, verdicts: int = 10,
            students: int = 1) -> dict[str, Any]:
    return {"students": students, "fps_per_student": 0.2, "changed_share": 0.2, "offered_fps": students * 0.2,
            "processed_fps": students * 0.2, "verdicts": verdicts,
            "latency_ms": {"p50": p99, "p95": p99, "p99": p99, "max": p99},
            "dropped": dropped or {}, "errors": errors or {}}


def test_slo_verdict() -> None:
    assert loadgen.slo_verdict(_result(900.0), 1000) == (True, "p99 900 ms <= SLO 1000 ms")
    assert loadgen.slo_verdict(_result(900.0, dropped={"replaced": 4}), 1000)[0] is True
    assert loadgen.slo_verdict(_result(1001.0), 1000) == (False, "p99 1001 ms > SLO 1000 ms")
    assert loadgen.slo_verdict(_result(10.0, dropped={"overloaded": 2}), 1000) == (
        False, "frames dropped: overloaded=2")
    assert loadgen.slo_verdict(_result(10.0, dropped={"unanswered": 1}), 1000)[0] is False
    assert loadgen.slo_verdict(_result(10.0, errors={"closed_1011": 1}), 1000) == (False, "errors: closed_1011=1")
    assert loadgen.slo_verdict(_result(None, verdicts=0), 1000) == (False, "no verdict received")


# ------------------------------------------------------------------------------------------ frame plan


def test_frame_plan_changes_the_requested_share() -> None:
    plan = loadgen.FramePlan(10, 0.2, random.Random(5))
    first, changed = plan.next()
    assert changed
    previous, changes = first, 0
    for _ in range(20_000):
        index, changed = plan.next()
        assert (index != previous) == changed  # a changed frame is always another image
        changes += changed
        previous = index
    assert 0.19 < changes / 20_000 < 0.21


@pytest.mark.parametrize("share, expected", [(0.0, False), (1.0, True)])
def test_frame_plan_extremes(share: float, expected: bool) -> None:
    plan = loadgen.FramePlan(2, share, random.Random(1))
    plan.next()
    assert {plan.next()[1] for _ in range(200)} == {expected}


def test_every_frame_changed_never_shows_a_recent_screen_again() -> None:
    # A screen shown again while it is still being classified gets that verdict (cached): not "changed".
    plan = loadgen.FramePlan(10, 1.0, random.Random(2))
    shown = [plan.next()[0] for _ in range(5_000)]
    assert all(len(set(shown[i:i + 5])) == 5 for i in range(len(shown) - 4))
    assert set(shown) == set(range(10))


def test_frame_plan_needs_two_images() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        loadgen.FramePlan(1, 0.2, random.Random(1))


# ----------------------------------------------------------------------------------------------- screens


def _write_jpegs(folder: Path, count: int, size: tuple[int, int] = (640, 360)) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        sub = folder / f"program{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        pixels = np.zeros((size[1], size[0], 3), np.uint8)
        pixels[:, : size[0] * (i + 1) // (count + 1)] = rng.integers(0, 256, 3, dtype=np.uint8)
        (sub / f"shot{i}.jpg").write_bytes(simplejpeg.encode_jpeg(pixels, quality=80))


def test_load_screens_reads_the_folder_and_scales(tmp_path: Path) -> None:
    _write_jpegs(tmp_path, 4, size=(1600, 900))
    (tmp_path / "program0" / "broken.jpg").write_bytes(b"not a jpeg")
    screens, source, synthetic = loadgen.load_screens(tmp_path, 10, 1280, seed=1)
    assert not synthetic and source == f"4 screenshots from {tmp_path}"
    assert {s.size for s in screens} == {(1280, 720)}


def test_load_screens_falls_back_to_synthetic_with_a_message(tmp_path: Path) -> None:
    screens, source, synthetic = loadgen.load_screens(tmp_path / "missing", 3, 640, seed=1)
    assert synthetic and len(screens) == 3 and screens[0].size == (640, 360)
    assert "missing not found" in source and "--images" in source
    _, source, synthetic = loadgen.load_screens(tmp_path, 3, 640, seed=1)
    assert synthetic and "has no readable" in source


def test_pool_frames_differ_enough_for_the_server_to_see_a_change(tmp_path: Path) -> None:
    _write_jpegs(tmp_path, 3)
    screens, _, _ = loadgen.load_screens(tmp_path, 3, 640, seed=1)
    pool = loadgen.build_pool(screens, 12, 70, seed=2)
    assert len(pool) == 12 and all(f.jpeg[:2] == b"\xff\xd8" and f.evidence is None for f in pool)
    for i in range(len(pool)):
        for k in range(i):
            assert loadgen.screen_difference(pool[i].jpeg, pool[k].jpeg) >= loadgen.MIN_CHANGE
    # Frames narrower than the screen, like the browser's: the full screen is kept for evidence.
    narrow = loadgen.build_pool(screens, 4, 70, seed=2, frame_width=320)
    assert {read_size(f.jpeg) for f in narrow} == {(320, 180)}
    assert {read_size(f.evidence) for f in narrow} == {(640, 360)}


def test_pool_refuses_what_it_cannot_make() -> None:
    screens = loadgen.synthetic_screens(1, 320, 180, seed=1)
    with pytest.raises(loadgen.LoadgenError, match="--pool 1"):
        loadgen.build_pool(screens, 1, 70, seed=1)
    with pytest.raises(loadgen.LoadgenError, match="differing by 300"):
        loadgen.build_pool(screens, 4, 70, seed=1, min_change=300)


# ----------------------------------------------------------------------------------------------- options

_ADMIN = ["--admin-user", "admin", "--admin-password", "a-long-password"]


@pytest.mark.parametrize("args, message", [
    (["--students", "0"], "--students 0 must be 1..20000"),
    (["--students", "20001"], "--students 20001"),
    (["--fps", "0"], "--fps 0.0 must be > 0"),
    (["--fps", "nan"], "--fps nan"),
    (["--fps", "31"], "--fps 31.0"),
    (["--duration", "0.5"], "--duration 0.5 must be 1..3600"),
    (["--duration", "7200"], "--duration 7200.0"),
    (["--changed", "1.5"], "--changed 1.5 must be 0..1"),
    (["--pool", "1"], "--pool 1 must be 2..1000"),
    (["--jpeg-quality", "0"], "--jpeg-quality 0"),
    (["--slo-p99-ms", "-1"], "--slo-p99-ms -1.0 must be > 0"),
    (["--url", "ftp://x"], "--url 'ftp://x' must look like http://host:port"),
    (["--url", "http://127.0.0.1:8080/api"], "without a path"),
    (["--url", "http://127.0.0.1:99999"], "invalid port"),
    (["--students", "20000", "--fps", "30", "--duration", "3600"], "over the cap"),
    (["--find-capacity", "--start-students", "500", "--max-students", "100"], "--max-students 100 must be 500"),
    (["--find-capacity", "--step-students", "0"], "--step-students 0"),
    (["--images", "/nonexistent/screens"], "--images /nonexistent/screens: folder not found"),
    (["--credentials", "/nonexistent/creds.json"], "--credentials /nonexistent/creds.json: file not found"),
])
def test_bad_options_are_refused_by_name(args: list[str], message: str) -> None:
    with pytest.raises(loadgen.LoadgenError) as excinfo:
        loadgen.parse_options(args + _ADMIN)
    assert message in str(excinfo.value)


def test_admin_credentials_or_a_credentials_file_are_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROCTOR_LOADGEN_ADMIN_PASSWORD", raising=False)
    with pytest.raises(loadgen.LoadgenError, match="--admin-user and --admin-password"):
        loadgen.parse_options(["--admin-user", "admin"])
    monkeypatch.setenv("PROCTOR_LOADGEN_ADMIN_PASSWORD", "from-the-environment")
    assert loadgen.parse_options(["--admin-user", "admin"]).admin_password == "from-the-environment"


def test_main_prints_the_error_without_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert loadgen.main(["--students", "-3"] + _ADMIN) == 2
    err = capsys.readouterr().err
    assert err.strip() == "loadgen: --students -3 must be 1..20000"


def test_options_defaults_and_plot_path(tmp_path: Path) -> None:
    opts = loadgen.parse_options(_ADMIN + ["--find-capacity", "--json", str(tmp_path / "cap.json")])
    assert opts.plot == tmp_path / "cap.png" and opts.peak_students == 2000
    opts = loadgen.parse_options(_ADMIN + ["--url", "http://127.0.0.1:9000/"])
    assert opts.url == "http://127.0.0.1:9000" and opts.changed == 0.2 and opts.plot is None


def test_backbone_json_is_read_and_checked(tmp_path: Path) -> None:
    good = tmp_path / "pipeline.json"
    good.write_text(json.dumps({"backbone_fps": 80.5, "pipeline_fps": 70.0}))
    assert loadgen.parse_options(_ADMIN + ["--backbone-json", str(good)]).backbone_fps == 80.5
    bad = tmp_path / "bad.json"
    for content, message in (("{}", "KeyError"), ("not json", "JSONDecodeError"),
                             ('{"backbone_fps": 0}', "backbone_fps 0 is not a positive number")):
        bad.write_text(content)
        with pytest.raises(loadgen.LoadgenError, match=f"--backbone-json {bad}: .*{message}"):
            loadgen.parse_options(_ADMIN + ["--backbone-json", str(bad)])


def test_credentials_file_roundtrip_and_errors(tmp_path: Path) -> None:
    creds = loadgen.Credentials(exam_id=3, students=[("s1", "pw1"), ("s2", "pw2")], server="http://h:1")
    path = tmp_path / "creds.json"
    creds.dump(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert loadgen.Credentials.load(path) == creds
    path.write_text('{"students": []}')
    with pytest.raises(loadgen.LoadgenError, match="not a file written by --save-credentials"):
        loadgen.Credentials.load(path)


# ------------------------------------------------------------------------------------- capacity search


async def test_find_capacity_reports_the_largest_step_that_held() -> None:
    seen = []

    async def fake_run(n: int) -> dict[str, Any]:
        seen.append(n)
        return _result(200.0 + n, students=n)  # p99 grows with load: 900 students -> 1100 ms

    report = await loadgen.find_capacity(fake_run, 100, 200, 2000, 1000.0)
    assert seen == [100, 300, 500, 700, 900]
    assert report["capacity_students"] == 700
    assert report["stopped_because"] == "900 students broke the SLO: p99 1100 ms > SLO 1000 ms"
    assert [s["slo_held"] for s in report["steps"]] == [True, True, True, True, False]


async def test_find_capacity_stops_on_drops_and_at_the_maximum() -> None:
    async def dropping(n: int) -> dict[str, Any]:
        return _result(10.0, dropped={"overloaded": 1} if n >= 30 else {"replaced": 3}, students=n)

    report = await loadgen.find_capacity(dropping, 10, 10, 100, 1000.0)
    assert report["capacity_students"] == 20 and "overloaded=1" in report["stopped_because"]

    async def fast(n: int) -> dict[str, Any]:
        return _result(10.0, students=n)

    report = await loadgen.find_capacity(fast, 10, 10, 30, 1000.0)
    assert report["capacity_students"] == 30 and len(report["steps"]) == 3
    assert "without breaking" in report["stopped_because"]

    async def broken(n: int) -> dict[str, Any]:
        return _result(5000.0, students=n)

    report = await loadgen.find_capacity(broken, 10, 10, 30, 1000.0)
    assert report["capacity_students"] is None and len(report["steps"]) == 1


async def test_capacity_plot_is_a_png(tmp_path: Path) -> None:
    async def fake_run(n: int) -> dict[str, Any]:
        return _result(100.0 * n / 10, students=n)

    report = await loadgen.find_capacity(fake_run, 10, 10, 200, 1000.0)
    path = tmp_path / "out" / "capacity.png"
    loadgen.plot_capacity(report, path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


# ------------------------------------------------------------------------------------------ server probe


def test_server_figures_from_two_scrapes() -> None:
    metrics = Metrics(CollectorRegistry())
    before = loadgen.parse_metrics(generate_latest(metrics.registry).decode())
    metrics.frames_received.inc(50)
    metrics.frames_classified.inc(30)
    metrics.frames_unchanged.inc(15)
    metrics.frames_dropped.labels("replaced").inc(5)
    for size in (4, 8):
        metrics.batch_size.observe(size)
    metrics.frame_latency_seconds.observe(0.1)
    metrics.frame_latency_seconds.observe(0.3)
    after = loadgen.parse_metrics(generate_latest(metrics.registry).decode())
    figures = loadgen.server_figures((0.0, before), (2.0, after), peak_rss=300 * 2**20)
    assert figures["frames_received"] == 50 and figures["frames_classified"] == 30
    assert figures["frames_unchanged"] == 15 and figures["frames_dropped"] == {"replaced": 5}
    assert figures["mean_batch_size"] == 6 and figures["mean_latency_ms"] == 200.0
    assert figures["peak_rss_mb"] == 300.0 and figures["rss_mb"] > 0
    assert figures["cpu_cores"] is not None and figures["cpu_cores"] >= 0
    assert loadgen.server_figures(None, (2.0, after), None) == {}


class _ScriptedSocket:
    """A client WebSocket stand-in: acknowledges every frame, records what was sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[float, Any]] = []
        self.answers: asyncio.Queue[Any] = asyncio.Queue()
        self.close_code = None

    async def send_bytes(self, data: bytes) -> None:
        header, _ = unpack_frame(data)
        self.sent.append((asyncio.get_running_loop().time(), "frame"))
        self.answers.put_nowait(type("Msg", (), {"type": WSMsgType.TEXT, "data": json.dumps(
            {"type": "ack", "seq": header.seq})})())

    async def send_json(self, data: dict) -> None:
        self.sent.append((asyncio.get_running_loop().time(), data["type"]))

    async def receive(self, timeout: float | None = None) -> Any:
        return await asyncio.wait_for(self.answers.get(), timeout)

    async def close(self) -> None:
        self.close_code = 1000


async def test_student_keeps_heartbeating_after_its_last_frame_until_the_end() -> None:
    student = loadgen.Student(0, "s", "pw", "http://127.0.0.1:9")
    student.server_config = {"type": "config", "heartbeat_s": 1.0}
    ws, tally = _ScriptedSocket(), loadgen.Tally()
    loop = asyncio.get_running_loop()
    start = loop.time()
    pool = [loadgen.PoolFrame(b"\xff\xd8one", None), loadgen.PoolFrame(b"\xff\xd8two", None)]
    try:  # one frame (period 10 s), run of 1.2 s: the heartbeat at 0.5 s comes after the last frame
        await student.stream(ws, pool, loadgen.FramePlan(2, 0.2, random.Random(1)), start, 10.0, start + 1.2,
                             1.0, tally)
    finally:
        await student.api.close()
    assert [kind for _, kind in ws.sent] == ["frame", "heartbeat"]
    assert 0.45 <= ws.sent[1][0] - start < 0.7
    assert tally.verdicts == 1 and tally.heartbeats == 1 and ws.close_code == 1000


# ------------------------------------------------------------------ a run against a protocol-exact fake


class FakeProctor:
    """The API and stream protocol loadgen speaks, with a scripted server: answers, drops or silence."""

    def __init__(self, answer_delay_s: float = 0.01, drop_every: int = 0, ignore_every: int = 0,
                 token: str | None = "tok", first_delay_s: float | None = None) -> None:
        self.metrics = Metrics(CollectorRegistry())
        self.users: dict[str, tuple[str, str]] = {"admin": ("a-long-password", "admin")}
        self.sessions: dict[str, str] = {}
        self.answer_delay_s = answer_delay_s
        # How long the first frame of each student takes (a server classifies every first frame).
        self.first_delay_s = answer_delay_s if first_delay_s is None else first_delay_s
        self.drop_every = drop_every
        self.ignore_every = ignore_every
        self.token = token
        self.roster: list[str] = []
        self.started = False
        self.origin = ""
        self.hellos = 0
        self.heartbeats = 0
        # Frame 2 of every student "opens an alert": the server asks for it again at full size.
        self.evidence_widths: list[int] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/login", self.login)
        app.router.add_post("/api/users", self.add_user)
        app.router.add_get("/api/heads", self.heads)
        app.router.add_post("/api/exams", self.add_exam)
        app.router.add_post("/api/exams/{id}/start", self.start)
        app.router.add_get("/ws/exams/{id}/stream", self.stream)
        app.router.add_get("/metrics", self.serve_metrics)
        return app

    def _user(self, request: web.Request, unsafe: bool = True) -> tuple[str, str]:
        token = request.cookies.get("session", "")
        if token not in self.sessions:
            raise web.HTTPUnauthorized(text="log in first")
        if unsafe and (request.headers.get("X-CSRF-Token") != token or request.headers.get("Origin") != self.origin):
            raise web.HTTPForbidden(text="csrf or origin")
        name = self.sessions[token]
        return name, self.users[name][1]

    async def login(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.users.get(body["username"], ("", ""))[0] != body["password"]:
            raise web.HTTPUnauthorized(text="bad password")
        token = secrets.token_hex(8)
        self.sessions[token] = body["username"]
        response = web.json_response({"user": {"username": body["username"]}, "csrf_token": token})
        response.set_cookie("session", token, httponly=True, samesite="Lax")
        return response

    async def add_user(self, request: web.Request) -> web.Response:
        assert self._user(request)[1] == "admin"
        body = await request.json()
        assert body["role"] in ("teacher", "student") and len(body["password"]) >= 10
        self.users[body["username"]] = (body["password"], body["role"])
        return web.json_response({"user": {"username": body["username"]}}, status=201)

    async def heads(self, request: web.Request) -> web.Response:
        self._user(request, unsafe=False)
        return web.json_response({"heads": [{"name": n, "program": n} for n in ("vscode", "terminal", "chat")]})

    async def add_exam(self, request: web.Request) -> web.Response:
        assert self._user(request)[1] == "teacher"
        body = await request.json()
        assert body["allowed_heads"] == ["vscode", "terminal"]
        self.roster = body["roster"]
        return web.json_response({"exam": {"id": 7, "join_code": "ABC123"}}, status=201)

    async def start(self, request: web.Request) -> web.Response:
        assert self._user(request)[1] == "teacher" and request.match_info["id"] == "7"
        self.started = True
        return web.json_response({"exam": {"id": 7, "state": "running"}})

    async def serve_metrics(self, request: web.Request) -> web.Response:
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            raise web.HTTPUnauthorized(text="token")
        return web.Response(body=generate_latest(self.metrics.registry), content_type="text/plain")

    async def stream(self, request: web.Request) -> web.WebSocketResponse:
        name, role = self._user(request, unsafe=False)
        if request.headers.get("Origin") != self.origin or role != "student" or name not in self.roster:
            raise web.HTTPForbidden()
        assert self.started
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        hello = await ws.receive_json()
        assert hello["type"] == "hello" and hello["surface"] == "monitor"
        self.hellos += 1
        await ws.send_json({"type": "config", "fps": 0.5, "max_width": 1280, "jpeg_quality": 0.7,
                            "heartbeat_s": 1.0})
        last = b""
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                assert json.loads(msg.data)["type"] == "heartbeat"
                self.heartbeats += 1
                await ws.send_json({"type": "heartbeat", "t": json.loads(msg.data)["t"]})
                continue
            assert msg.type == WSMsgType.BINARY
            header, jpeg = unpack_frame(msg.data)
            if header.evidence:
                assert header.seq == 2
                self.evidence_widths.append(read_size(jpeg)[0])
                continue
            self.metrics.frames_received.inc()
            if header.seq == 2:
                await ws.send_json({"type": "evidence_request", "seq": 2})
            if self.ignore_every and header.seq % self.ignore_every == 0:
                continue
            if self.drop_every and header.seq % self.drop_every == 0:
                await ws.send_json({"type": "error", "code": E_OVERLOADED, "message": "busy", "seq": header.seq})
                continue
            await asyncio.sleep(self.first_delay_s if header.seq == 1 else self.answer_delay_s)
            if bytes(jpeg) == last:
                self.metrics.frames_unchanged.inc()
            last = bytes(jpeg)
            await ws.send_json({"type": "ack", "seq": header.seq, "capture_ms": header.capture_ms})
        return ws


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


def _pipeline_json(tmp_path: Path, backbone_fps: float) -> Path:
    path = tmp_path / "pipeline.json"
    path.write_text(json.dumps({"backbone_fps": backbone_fps}))
    return path


def _options(url: str, tmp_path: Path, *extra: str) -> loadgen.Options:
    images = tmp_path / "screens"
    _write_jpegs(images, 3, (1280, 720))
    return loadgen.parse_options(["--url", url, "--images", str(images), "--pool", "6", "--max-width", "640",
                                  "--connect-timeout", "20", *_ADMIN, *extra])


async def test_first_frames_are_reported_apart_as_the_join_burst(tmp_path: Path) -> None:
    fake = FakeProctor(answer_delay_s=0.01, first_delay_s=0.4)
    runner, url = await _serve(fake.app())
    fake.origin = url
    try:
        opts = _options(url, tmp_path, "--students", "4", "--fps", "4", "--duration", "1.5")
        report = await loadgen.run(opts)
    finally:
        await runner.cleanup()
    assert report["latency_join_ms"]["p50"] >= 400  # every student's first frame, slow on purpose
    assert report["latency_ms"]["max"] < 300  # the steady state does not include them


async def test_warmup_frames_are_left_out_of_the_steady_state(tmp_path: Path) -> None:
    fake = FakeProctor(answer_delay_s=0.01)
    runner, url = await _serve(fake.app())
    fake.origin = url
    try:
        opts = _options(url, tmp_path, "--students", "2", "--fps", "4", "--duration", "2", "--warmup", "1")
        report = await loadgen.run(opts)
    finally:
        await runner.cleanup()
    assert report["warmup_s"] == 1.0
    # 2 students x 4 frames/s: the first second is 2 join frames + 6 warm-up frames, the rest steady.
    assert report["latency_warmup_ms"]["p50"] is not None and report["latency_ms"]["p50"] is not None
    with pytest.raises(loadgen.LoadgenError, match="--warmup 2.0 must be"):
        _options(url, tmp_path, "--duration", "2", "--warmup", "2")


async def test_measure_backbone_times_it_right_before_and_after_the_run(tmp_path: Path, monkeypatch) -> None:
    events = []

    class FakeTimer:
        def __init__(self, pool, seconds):
            assert seconds == 2.5 and pool
            self.fps = iter([100.0, 60.0])

        def measure(self):
            events.append("backbone")
            return next(self.fps)

    monkeypatch.setattr(loadgen, "BackboneTimer", FakeTimer)
    fake = FakeProctor(answer_delay_s=0.01)
    runner, url = await _serve(fake.app())
    fake.origin = url
    original = loadgen.run_once

    async def run_once(*args, **kwargs):
        events.append("run")
        return await original(*args, **kwargs)

    monkeypatch.setattr(loadgen, "run_once", run_once)
    try:
        opts = _options(url, tmp_path, "--students", "2", "--fps", "4", "--duration", "1", "--changed", "1",
                        "--measure-backbone", "2.5", "--backbone-json", str(_pipeline_json(tmp_path, 48.0)))
        report = await loadgen.run(opts)
    finally:
        await runner.cleanup()
    assert events == ["backbone", "run", "backbone"]
    assert report["backbone_fps"] == {"before": 100.0, "after": 60.0, "mean": 80.0}
    # The baseline timed around the run wins over the older --backbone-json figure.
    assert report["processed_vs_backbone"] == round(report["processed_fps"] / 80.0, 3)
    with pytest.raises(loadgen.LoadgenError, match="--measure-backbone -1.0 must be 0..120"):
        _options(url, tmp_path, "--measure-backbone", "-1")


async def test_run_against_fake_server_measures_every_frame(tmp_path: Path) -> None:
    fake = FakeProctor(answer_delay_s=0.02, drop_every=5)
    runner, url = await _serve(fake.app())
    fake.origin = url
    try:
        out = tmp_path / "result.json"
        opts = _options(url, tmp_path, "--students", "6", "--fps", "4", "--duration", "1.5", "--changed", "0.2",
                        "--metrics-token", "tok", "--json", str(out), "--save-credentials", str(tmp_path / "c.json"),
                        "--backbone-json", str(_pipeline_json(tmp_path, 48.0)))
        report = await loadgen.run(opts)
    finally:
        await runner.cleanup()
    assert fake.hellos == 6 and len(fake.roster) == 6
    # heartbeat_s 1: half a period after the first frame, then every second: one each in a 1.5 s run.
    assert fake.heartbeats == report["heartbeats_sent"] == 6
    assert report["frames_sent"] == 6 * 6  # 4 frames/s for 1.5 s, each student
    # Frames went at --max-width 640; the evidence asked for came at the screenshots' 1280.
    assert report["evidence_sent"] == 6 and fake.evidence_widths == [1280] * 6
    drops = sum(1 for seq in range(1, 7) if seq % 5 == 0) * 6
    assert report["dropped"] == {E_OVERLOADED: drops}
    assert report["verdicts"] == report["frames_sent"] - drops
    assert report["errors"] == {}
    # Unchanged frames repeat the previous bytes, which the fake counts as unchanged in its metrics.
    assert 0 < report["server"]["frames_unchanged"] < report["verdicts"]
    assert report["frames_sent_changed"] < report["frames_sent"]
    assert 20 <= report["latency_ms"]["p50"] <= report["latency_ms"]["p99"] <= report["latency_ms"]["max"] < 1000
    assert report["offered_fps"] == pytest.approx(24, rel=0.01)
    assert report["processed_vs_backbone"] == pytest.approx(report["processed_fps"] / 48.0, abs=0.001)
    assert report["server"]["frames_received"] == 36
    written = json.loads(out.read_text())
    for key in ("students", "fps_per_student", "offered_fps", "processed_fps", "latency_ms", "dropped", "errors"):
        assert key in written
    assert set(written["latency_ms"]) == {"p50", "p95", "p99", "max"}
    assert written["machine"]["cores"] >= 1 and written["students"] == 6
    assert loadgen.Credentials.load(tmp_path / "c.json").exam_id == 7


async def test_unanswered_frames_are_counted_and_the_run_stays_bounded(tmp_path: Path) -> None:
    fake = FakeProctor(ignore_every=2, token=None)
    runner, url = await _serve(fake.app())
    fake.origin = url
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        opts = _options(url, tmp_path, "--students", "2", "--fps", "2", "--duration", "1", "--drain", "0.5")
        report = await loadgen.run(opts)
    finally:
        await runner.cleanup()
    assert loop.time() - started < 10
    assert report["dropped"] == {loadgen.UNANSWERED: 2}  # seq 2 of each student was never answered
    assert report["verdicts"] == 2 and report["server"]["frames_received"] == 4
    assert loadgen.slo_verdict(report, 1000)[0] is False


async def test_wrong_admin_password_is_a_clear_error(tmp_path: Path) -> None:
    fake = FakeProctor()
    runner, url = await _serve(fake.app())
    fake.origin = url
    try:
        opts = _options(url, tmp_path, "--admin-password", "wrong-password")
        with pytest.raises(loadgen.LoadgenError, match="POST /api/login answered 401"):
            await loadgen.run(opts)
    finally:
        await runner.cleanup()


async def test_unreachable_server_is_a_clear_error(tmp_path: Path) -> None:
    runner, url = await _serve(web.Application())
    await runner.cleanup()  # nothing listens on that port any more
    with pytest.raises(loadgen.LoadgenError, match="cannot reach"):
        await loadgen.run(_options(url, tmp_path))


async def test_find_capacity_against_fake_server(tmp_path: Path) -> None:
    fake = FakeProctor(answer_delay_s=0.005)
    runner, url = await _serve(fake.app())
    fake.origin = url
    try:
        out = tmp_path / "cap.json"
        opts = _options(url, tmp_path, "--find-capacity", "--start-students", "2", "--step-students", "2",
                        "--max-students", "4", "--fps", "2", "--duration", "1", "--cooldown", "0",
                        "--metrics-token", "tok", "--json", str(out))
        report = await loadgen.run(opts)
    finally:
        await runner.cleanup()
    assert report["capacity_students"] == 4 and [s["students"] for s in report["steps"]] == [2, 4]
    assert report["best"]["students"] == 4
    assert (tmp_path / "cap.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads(out.read_text())["capacity_students"] == 4


# ------------------------------------------------------------------------------- end to end, real server

async def _add_heads(store: Any) -> None:
    """The fake classifier's heads, stored: exams may only whitelist heads the store knows."""
    weights = save_safetensors({"fc.weight": np.zeros((1, 1280), np.float32), "fc.bias": np.zeros(1, np.float32)})
    for info in FAKE_HEADS:
        await store.add_head(HeadRecord(name=info.name, program=info.program, description="", threshold=0.5,
                                        backbone_hash="test", metrics={}, active=True, weights=weights,
                                        created_at=utcnow()))


async def test_loadgen_end_to_end_through_the_api(tmp_path: Path) -> None:
    """Everything real but the model: loadgen creates teacher, students and exam through the API, then streams."""
    config = Config(database_url=f"sqlite:///{tmp_path}/proctor.db", data_dir=str(tmp_path), client_fps=2.0,
                    metrics_token="metrics-secret")
    classifier = FakeClassifier()
    app = create_app(config, classifier=classifier)
    runner, url = await _serve(app)
    try:
        await _add_heads(app[STORE_KEY])
        await app[STORE_KEY].create_user("lgadmin", "Loadgen admin", "admin", hash_password("admin-pass-123"))
        out = tmp_path / "e2e.json"
        opts = loadgen.parse_options([
            "--url", url, "--students", "20", "--fps", "2", "--duration", "3", "--changed", "0.2",
            "--admin-user", "lgadmin", "--admin-password", "admin-pass-123", "--metrics-token", "metrics-secret",
            "--images", str(_jpeg_dir(tmp_path)), "--pool", "8", "--json", str(out)])
        report = await loadgen.run(opts)
    finally:
        await runner.cleanup()
    assert report["errors"] == {}
    assert report["frames_sent"] == 20 * 6
    assert set(report["dropped"]) <= {E_REPLACED}
    assert report["verdicts"] + sum(report["dropped"].values()) == report["frames_sent"]
    assert report["server"]["frames_unchanged"] > 0  # unchanged screens reuse the last verdict
    assert report["latency_ms"]["p99"] < 1000
    server = report["server"]
    assert server["frames_received"] == report["frames_sent"]
    assert server["frames_classified"] + server["frames_unchanged"] + sum(server["frames_dropped"].values()) \
        == server["frames_received"]
    assert sum(classifier.batch_sizes) == server["frames_classified"] > 0
    assert server["cpu_cores"] is not None and server["rss_mb"] > 0
    assert json.loads(out.read_text())["students"] == 20


def _jpeg_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "screens"
    _write_jpegs(folder, 4)
    return folder


async def test_refused_stream_is_a_clear_error(tmp_path: Path) -> None:
    fake = FakeProctor()
    runner, url = await _serve(fake.app())
    fake.origin = url
    creds = tmp_path / "creds.json"
    loadgen.Credentials(exam_id=7, students=[("admin", "a-long-password")], server=url).dump(creds)
    try:  # the admin account is no student: the fake refuses its stream like the server does
        opts = _options(url, tmp_path, "--credentials", str(creds), "--students", "1")
        with pytest.raises(loadgen.LoadgenError, match="admin: stream of exam 7 refused with HTTP 403 "
                                                       r"\(Origin refused, or the student is not on"):
            await loadgen.run(opts)
    finally:
        await runner.cleanup()


async def test_credentials_for_another_server_or_too_few_students_are_refused(tmp_path: Path) -> None:
    creds = tmp_path / "creds.json"
    loadgen.Credentials(exam_id=7, students=[("s1", "pw")], server="http://10.0.0.9:8080").dump(creds)
    opts = _options("http://127.0.0.1:9", tmp_path, "--credentials", str(creds))
    with pytest.raises(loadgen.LoadgenError, match="was made for http://10.0.0.9:8080, not http://127.0.0.1:9"):
        await loadgen.run(opts)
    loadgen.Credentials(exam_id=7, students=[("s1", "pw")], server="http://127.0.0.1:9").dump(creds)
    with pytest.raises(loadgen.LoadgenError, match="has 1 students, 20 are needed"):
        await loadgen.run(opts)


async def test_login_storm_times_every_login_and_counts_refusals(tmp_path: Path) -> None:
    from benchmarks import login_storm

    fake = FakeProctor()
    fake.users.update({f"s{i}": (f"password-{i:03d}", "student") for i in range(6)})
    runner, url = await _serve(fake.app())
    fake.origin = url
    try:
        students = [(f"s{i}", f"password-{i:03d}") for i in range(5)] + [("s5", "a wrong password")]
        storm = await login_storm.login_storm(url, students, concurrency=2)
    finally:
        await runner.cleanup()
    assert (storm["logins"], storm["succeeded"], storm["error_count"]) == (6, 5, 1)
    assert "401" in storm["errors"][0] and storm["login_ms"]["p50"] > 0
    assert len(fake.sessions) == 5  # every good login really reached the server


async def test_login_storm_needs_enough_students_in_the_credentials(tmp_path: Path) -> None:
    from benchmarks import login_storm

    path = tmp_path / "creds.json"
    loadgen.Credentials(exam_id=1, students=[("s0", "p" * 12)] * 3, server="http://127.0.0.1:1").dump(path)
    args = login_storm.build_parser().parse_args(["--credentials", str(path), "--students", "2", "--logins", "2"])
    with pytest.raises(loadgen.LoadgenError, match="holds 3 students; --students 2 \\+ --logins 2 are needed"):
        await login_storm.run(args)
