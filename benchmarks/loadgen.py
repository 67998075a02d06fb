"""Load generator: N simulated students stream JPEG screenshots over real WebSockets to one Proctor server.

It creates a teacher, N students and a running exam through the API (admin credentials), or reuses the
ones saved by an earlier run (--credentials), then every student streams frames at F frames/s, a share
of them with a changed screen. Per frame it measures the time from send to verdict (the server's ack that
the frame was judged; the judgement itself goes to teachers only), and it
reports offered and processed frames/s, latency percentiles, frames dropped by reason, errors, and the
server's CPU and memory read from its /metrics.

    python benchmarks/loadgen.py --url http://127.0.0.1:8080 --admin-user admin --students 1000 \
        --fps 0.2 --duration 60 --json benchmarks/results/loadgen-1000.json
    python benchmarks/loadgen.py ... --find-capacity --slo-p99-ms 1000 --plot capacity.png

The run is bounded: every phase has a deadline, the number of frames is capped, and it only ever talks
to the server given by --url.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import random
import resource
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Sequence
from urllib.parse import urlsplit

logger = logging.getLogger("loadgen")

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:  # run as a script from anywhere: proctor.protocol is the wire format
    sys.path.insert(0, str(_REPO))

from benchmarks.machine import describe as describe_machine, write_result  # noqa: E402
from proctor.protocol import E_REPLACED, pack_frame  # noqa: E402

# Bounds: a typo must not turn the load generator into a flood or a run that never ends.
MAX_STUDENTS = 20_000
MAX_FPS = 30.0
MAX_DURATION_S = 3600.0
MAX_FRAMES = 5_000_000
DEFAULT_IMAGES = "data/screens"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Drops that do not break the SLO: a newer frame of the same student superseded the older one.
ALLOWED_DROPS = frozenset({E_REPLACED})
# Frames left without an answer once the drain time is over.
UNANSWERED = "unanswered"
# The server counts a screen as unchanged under a mean grey difference of 2 (Config.change_threshold) on
# tiny thumbnails; changed frames are kept well above it so the server really classifies them.
MIN_CHANGE = 8.0
# Sent frames kept for evidence_request, as the student page keeps them (stream.js EVIDENCE_KEEP).
_EVIDENCE_KEEP = 3
_THUMB = (32, 18)


class LoadgenError(Exception):
    """A problem the user can fix (bad option, server refused a call); printed without a traceback."""


# --------------------------------------------------------------------------------------------- statistics


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) of already sorted values, interpolated linearly (numpy's default)."""
    if not sorted_values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q={q!r} must be 0..100")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def latency_summary(values_ms: Iterable[float]) -> dict[str, float | None]:
    """p50/p95/p99/max in milliseconds, rounded to 0.1 ms; None when there is no value."""
    ordered = sorted(values_ms)

    def r(v: float | None) -> float | None:
        return None if v is None else round(v, 1)

    return {"p50": r(percentile(ordered, 50)), "p95": r(percentile(ordered, 95)),
            "p99": r(percentile(ordered, 99)), "max": r(ordered[-1] if ordered else None)}


def slo_verdict(result: dict[str, Any], slo_p99_ms: float) -> tuple[bool, str]:
    """Did one run hold the SLO (p99 under the limit, no drops but `replaced`, no errors)? And why not."""
    p99 = result["latency_ms"]["p99"]
    if result["verdicts"] == 0 or p99 is None:
        return False, "no verdict received"
    bad_drops = {k: v for k, v in result["dropped"].items() if v and k not in ALLOWED_DROPS}
    if bad_drops:
        return False, "frames dropped: " + ", ".join(f"{k}={v}" for k, v in sorted(bad_drops.items()))
    if result["errors"]:
        return False, "errors: " + ", ".join(f"{k}={v}" for k, v in sorted(result["errors"].items()))
    if p99 > slo_p99_ms:
        return False, f"p99 {p99:.0f} ms > SLO {slo_p99_ms:.0f} ms"
    return True, f"p99 {p99:.0f} ms <= SLO {slo_p99_ms:.0f} ms"


# ------------------------------------------------------------------------------------------------ images


def _thumbnail(jpeg: bytes) -> Any:
    """Grey 32x18 thumbnail as a float array, like the server's change detector looks at a frame."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as img:
        img.draft("L", (_THUMB[0] * 4, _THUMB[1] * 4))  # DCT-scaled decode: cheap
        small = img.convert("L").resize(_THUMB, Image.BILINEAR)
    return np.asarray(small, dtype=np.float32)


def screen_difference(a: bytes, b: bytes) -> float:
    """Mean absolute grey difference (0..255) between the thumbnails of two JPEGs."""
    import numpy as np

    return float(np.abs(_thumbnail(a) - _thumbnail(b)).mean())


def find_images(directory: Path) -> list[Path]:
    """Screenshots under `directory` (any depth), sorted so a run is reproducible."""
    return sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _spread(items: Sequence[Path], count: int) -> list[Path]:
    """`count` items evenly spaced over the sorted list, so every program of the data set is represented."""
    if len(items) <= count:
        return list(items)
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


def synthetic_screens(count: int, width: int, height: int, seed: int) -> list[Any]:
    """Desktop-like images (title bars, panels, text lines) for when no real screenshot is at hand."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    screens = []
    for _ in range(count):
        img = Image.new("RGB", (width, height), tuple(rng.randrange(30, 230) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(rng.randrange(2, 5)):  # windows
            x0, y0 = rng.randrange(0, width // 2), rng.randrange(0, height // 2)
            x1, y1 = x0 + rng.randrange(width // 4, width // 2), y0 + rng.randrange(height // 4, height // 2)
            draw.rectangle((x0, y0, x1, y1), fill=tuple(rng.randrange(200, 256) for _ in range(3)))
            draw.rectangle((x0, y0, x1, y0 + 24), fill=tuple(rng.randrange(0, 120) for _ in range(3)))
            for line in range(y0 + 34, y1 - 10, 16):
                draw.text((x0 + 8, line), "".join(rng.choice("abcdefgh ijklmnop(){};=") for _ in range(40)),
                          fill=(20, 20, 20))
        screens.append(img)
    return screens


def load_screens(directory: Path | None, count: int, max_width: int,
                 seed: int) -> tuple[list[Any], str, bool]:
    """Up to `count` RGB PIL images scaled to `max_width`, where they came from, and whether synthetic."""
    from PIL import Image, UnidentifiedImageError

    paths = _spread(find_images(directory), count) if directory is not None and directory.is_dir() else []
    screens = []
    for path in paths:
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            logger.warning("skipping %s: not a readable image (%s)", path, exc)
            continue
        if img.width > max_width:
            img = img.resize((max_width, round(img.height * max_width / img.width)), Image.LANCZOS)
        screens.append(img)
    if screens:
        return screens, f"{len(screens)} screenshots from {directory}", False
    where = "not found" if directory is None or not directory.is_dir() else "has no readable .jpg/.png"
    message = (f"screenshot folder {directory} {where}: using {count} synthetic screens instead "
               f"(frame sizes and decode costs differ from real screens; pass --images DIR)")
    return synthetic_screens(count, max_width, max_width * 9 // 16, seed), message, True


@dataclasses.dataclass(frozen=True)
class PoolFrame:
    """One pre-encoded screen: the frame to classify, and the same screen wider for an evidence_request."""

    jpeg: bytes
    evidence: bytes | None  # None when the screen is no wider than the frame


def build_pool(screens: Sequence[Any], size: int, quality: int, seed: int, min_change: float = MIN_CHANGE,
               frame_width: int | None = None) -> list[PoolFrame]:
    """Pre-encoded screens, each differing from every other one by at least `min_change` grey levels.

    Every screenshot is used as is, then perturbed (a window-sized block moved in) until the pool is full.
    Frames are scaled to `frame_width` (like the browser's canvas); the unscaled screen is the evidence.
    Encoding happens once here so that sending a frame costs nothing but the socket write.
    """
    import numpy as np
    from PIL import ImageDraw

    from proctor.batching.decode import page_jpeg

    if size < 2:
        raise LoadgenError(f"--pool {size} is too small: changed frames need at least 2 different images")
    rng = random.Random(seed)
    pool: list[PoolFrame] = []
    thumbs: list[Any] = []
    attempts = 0
    while len(pool) < size and attempts < size * 4:
        base = screens[attempts % len(screens)]
        img = base
        if attempts >= len(screens):  # perturbed copy: a block of about a tenth of the screen
            img = base.copy()
            w, h = img.width // 3, img.height // 3
            x, y = rng.randrange(0, img.width - w), rng.randrange(0, img.height - h)
            ImageDraw.Draw(img).rectangle((x, y, x + w, y + h), fill=tuple(rng.randrange(0, 256) for _ in range(3)))
        attempts += 1
        pixels = np.asarray(img)
        jpeg = page_jpeg(pixels, frame_width or img.width, quality / 100)
        thumb = _thumbnail(jpeg)
        if all(float(abs(thumb - t).mean()) >= min_change for t in thumbs):
            narrower = frame_width is not None and img.width > frame_width
            pool.append(PoolFrame(jpeg, page_jpeg(pixels, img.width, quality / 100) if narrower else None))
            thumbs.append(thumb)
    if len(pool) < 2:
        raise LoadgenError(f"could not make 2 screens differing by {min_change} grey levels from "
                           f"{len(screens)} images: give more varied screenshots with --images")
    return pool


class FramePlan:
    """Which pool image a student sends next: the same bytes (unchanged) or another one (changed).

    A changed screen is none of the student's last RECENT screens either: the server rightly reuses the
    verdict of a screen shown again while it is still being classified, or just was, and "every frame
    changed" must mean that change detection never helps.
    """

    RECENT = 4

    def __init__(self, pool_size: int, changed_share: float, rng: random.Random) -> None:
        if pool_size < 2:
            raise ValueError("a frame plan needs at least 2 images")
        self.pool_size = pool_size
        self.changed_share = changed_share
        self._rng = rng
        self.current: int | None = None
        # With a tiny pool only the current screen is avoided.
        self._recent: collections.deque[int] = collections.deque(maxlen=min(self.RECENT, pool_size - 1))

    def next(self) -> tuple[int, bool]:
        """(pool index, changed): the first frame is always a new screen."""
        if self.current is None:
            self.current = self._rng.randrange(self.pool_size)
            self._recent.append(self.current)
            return self.current, True
        if self._rng.random() < self.changed_share:
            fresh = [i for i in range(self.pool_size) if i not in self._recent]
            self.current = self._rng.choice(fresh)
            self._recent.append(self.current)
            return self.current, True
        return self.current, False


# ------------------------------------------------------------------------------------------------ options


@dataclasses.dataclass(frozen=True)
class Options:
    url: str
    students: int
    fps: float
    duration_s: float
    warmup_s: float
    changed: float
    images: Path | None
    images_given: bool
    pool: int
    max_width: int
    evidence_max_width: int
    jpeg_quality: int
    admin_user: str | None
    admin_password: str | None
    credentials: Path | None
    save_credentials: Path | None
    metrics_token: str | None
    json_path: Path | None
    find_capacity: bool
    slo_p99_ms: float
    start_students: int
    step_students: int
    max_students: int
    plot: Path | None
    drain_s: float
    connect_timeout_s: float
    cooldown_s: float
    seed: int
    heads: tuple[str, ...]
    backbone_fps: float | None = None
    measure_backbone_s: float = 0.0

    @property
    def origin(self) -> str:
        return self.url

    @property
    def peak_students(self) -> int:
        return self.max_students if self.find_capacity else self.students


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="loadgen", description="Simulate N students streaming screens to one Proctor server.",
        epilog="Admin credentials may also come from PROCTOR_LOADGEN_ADMIN_USER / PROCTOR_LOADGEN_ADMIN_PASSWORD.")
    p.add_argument("--url", default="http://127.0.0.1:8080",
                   help="the server, scheme://host:port; nothing else is ever contacted (default %(default)s)")
    p.add_argument("--students", type=int, default=20, help="simulated students (default %(default)s)")
    p.add_argument("--fps", type=float, default=0.2, help="frames per second per student (default %(default)s)")
    p.add_argument("--warmup", type=float, default=0.0, dest="warmup_s",
                   help="seconds at the start whose frames are left out of latency_ms (reported as "
                        "latency_warmup_ms): the steady state after a whole hall has joined (default 0)")
    p.add_argument("--duration", type=float, default=30.0, dest="duration_s",
                   help="seconds of streaming per run (default %(default)s)")
    p.add_argument("--changed", type=float, default=0.2,
                   help="share of frames whose screen changed, 0..1 (default %(default)s)")
    p.add_argument("--images", default=None,
                   help=f"folder of screenshots, searched recursively (default {DEFAULT_IMAGES})")
    p.add_argument("--pool", type=int, default=48, help="distinct pre-encoded screens (default %(default)s)")
    p.add_argument("--max-width", type=int, default=640,
                   help="frame width, like the browser with the server's default (default %(default)s)")
    p.add_argument("--evidence-max-width", type=int, default=1280,
                   help="width of the copy sent when the server asks for an alert's evidence; the captured "
                        "screenshots are at most 1280 wide (default %(default)s)")
    p.add_argument("--jpeg-quality", type=int, default=70, help="JPEG quality 1..100 (default %(default)s)")
    p.add_argument("--admin-user", default=os.environ.get("PROCTOR_LOADGEN_ADMIN_USER"))
    p.add_argument("--admin-password", default=os.environ.get("PROCTOR_LOADGEN_ADMIN_PASSWORD"))
    p.add_argument("--credentials", default=None,
                   help="JSON written by --save-credentials: reuse its exam and students instead of creating them")
    p.add_argument("--save-credentials", default=None,
                   help="write the created exam and students' passwords here (mode 600) for later runs")
    p.add_argument("--metrics-token", default=os.environ.get("PROCTOR_METRICS_TOKEN"),
                   help="bearer token of the server's /metrics (default: env PROCTOR_METRICS_TOKEN)")
    p.add_argument("--heads", default="", help="comma-separated whitelist (default: the first 2 of /api/heads)")
    p.add_argument("--json", default=None, dest="json_path", help="write the figures as JSON here")
    p.add_argument("--find-capacity", action="store_true",
                   help="step the number of students up until the SLO breaks; report the largest that held")
    p.add_argument("--slo-p99-ms", type=float, default=1000.0,
                   help="SLO: p99 frame-to-verdict latency limit in ms (default %(default)s)")
    p.add_argument("--start-students", type=int, default=100, help="--find-capacity: first step")
    p.add_argument("--step-students", type=int, default=100, help="--find-capacity: increment")
    p.add_argument("--max-students", type=int, default=2000, help="--find-capacity: last step at most")
    p.add_argument("--plot", default=None, help="--find-capacity: PNG plot path (default: next to --json)")
    p.add_argument("--drain", type=float, default=10.0, dest="drain_s",
                   help="seconds to wait for outstanding verdicts after sending stops (default %(default)s)")
    p.add_argument("--connect-timeout", type=float, default=60.0, dest="connect_timeout_s",
                   help="seconds for all students to connect (default %(default)s)")
    p.add_argument("--cooldown", type=float, default=3.0, dest="cooldown_s",
                   help="--find-capacity: seconds of rest between steps (default %(default)s)")
    p.add_argument("--backbone-json", default=None,
                   help="JSON of benchmarks/pipeline.py on the same machine: report processed frames/s as a "
                        "share of its backbone_fps (run with --changed 1 to compare)")
    p.add_argument("--measure-backbone", type=float, default=0.0, dest="measure_backbone_s", metavar="SECONDS",
                   help="right before and right after every run, time the backbone alone in this process for "
                        "SECONDS per layout, as benchmarks/pipeline.py does, and report processed frames/s as a "
                        "share of the mean (only meaningful on the server's machine, which must be otherwise idle; "
                        "a shared machine's speed drifts too much for a baseline measured at another time)")
    p.add_argument("--seed", type=int, default=1, help="random seed of the frame plans (default %(default)s)")
    return p


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LoadgenError(f"--url {url!r} must look like http://host:port")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise LoadgenError(f"--url {url!r} must be the server's origin only, without a path")
    try:
        parts.port
    except ValueError:
        raise LoadgenError(f"--url {url!r} has an invalid port") from None
    return f"{parts.scheme}://{parts.netloc}"


def parse_options(argv: Sequence[str] | None = None) -> Options:
    """Parse and check the command line; every refusal names the value."""
    a = build_parser().parse_args(argv)

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise LoadgenError(message)

    url = _check_url(a.url)
    need(1 <= a.students <= MAX_STUDENTS, f"--students {a.students} must be 1..{MAX_STUDENTS}")
    need(math.isfinite(a.fps) and 0 < a.fps <= MAX_FPS, f"--fps {a.fps} must be > 0 and <= {MAX_FPS}")
    need(math.isfinite(a.warmup_s) and 0 <= a.warmup_s < a.duration_s,
         f"--warmup {a.warmup_s} must be 0 or more and shorter than --duration {a.duration_s}")
    need(math.isfinite(a.duration_s) and 1 <= a.duration_s <= MAX_DURATION_S,
         f"--duration {a.duration_s} must be 1..{MAX_DURATION_S:.0f} seconds")
    need(math.isfinite(a.changed) and 0 <= a.changed <= 1, f"--changed {a.changed} must be 0..1")
    need(2 <= a.pool <= 1000, f"--pool {a.pool} must be 2..1000")
    need(160 <= a.max_width <= 7680, f"--max-width {a.max_width} must be 160..7680")
    need(160 <= a.evidence_max_width <= 7680, f"--evidence-max-width {a.evidence_max_width} must be 160..7680")
    need(1 <= a.jpeg_quality <= 100, f"--jpeg-quality {a.jpeg_quality} must be 1..100")
    need(math.isfinite(a.slo_p99_ms) and a.slo_p99_ms > 0, f"--slo-p99-ms {a.slo_p99_ms} must be > 0")
    need(math.isfinite(a.drain_s) and 0 <= a.drain_s <= 600, f"--drain {a.drain_s} must be 0..600 seconds")
    need(math.isfinite(a.connect_timeout_s) and 1 <= a.connect_timeout_s <= 3600,
         f"--connect-timeout {a.connect_timeout_s} must be 1..3600 seconds")
    need(math.isfinite(a.cooldown_s) and 0 <= a.cooldown_s <= 600, f"--cooldown {a.cooldown_s} must be 0..600")
    if a.find_capacity:
        need(1 <= a.start_students <= MAX_STUDENTS, f"--start-students {a.start_students} must be 1..{MAX_STUDENTS}")
        need(1 <= a.step_students <= MAX_STUDENTS, f"--step-students {a.step_students} must be 1..{MAX_STUDENTS}")
        need(a.start_students <= a.max_students <= MAX_STUDENTS,
             f"--max-students {a.max_students} must be {a.start_students} (--start-students)..{MAX_STUDENTS}")
    peak = a.max_students if a.find_capacity else a.students
    frames = peak * a.fps * a.duration_s
    need(frames <= MAX_FRAMES, f"{peak} students x {a.fps} frames/s x {a.duration_s} s = {frames:.0f} frames "
                               f"per run is over the cap of {MAX_FRAMES}")
    need(math.isfinite(a.measure_backbone_s) and 0 <= a.measure_backbone_s <= 120,
         f"--measure-backbone {a.measure_backbone_s} must be 0..120 seconds")
    credentials = Path(a.credentials) if a.credentials else None
    need(credentials is None or credentials.is_file(), f"--credentials {a.credentials}: file not found")
    need(credentials is not None or (bool(a.admin_user) and bool(a.admin_password)),
         "give --admin-user and --admin-password (or PROCTOR_LOADGEN_ADMIN_USER/_PASSWORD) to create the "
         "test users and exam, or --credentials FILE from an earlier --save-credentials")
    images = Path(a.images if a.images is not None else DEFAULT_IMAGES)
    if a.images is None and not images.is_absolute() and not images.exists():
        images = _REPO / DEFAULT_IMAGES
    need(a.images is None or images.is_dir(), f"--images {a.images}: folder not found")
    heads = tuple(h.strip() for h in a.heads.split(",") if h.strip())
    backbone_fps = read_backbone_fps(Path(a.backbone_json)) if a.backbone_json else None
    json_path = Path(a.json_path) if a.json_path else None
    plot = Path(a.plot) if a.plot else None
    if a.find_capacity and plot is None:
        plot = json_path.with_suffix(".png") if json_path is not None else Path("capacity.png")
    return Options(
        url=url, students=a.students, fps=a.fps, duration_s=a.duration_s, warmup_s=a.warmup_s, changed=a.changed, images=images,
        images_given=a.images is not None, pool=a.pool, max_width=a.max_width,
        evidence_max_width=a.evidence_max_width, jpeg_quality=a.jpeg_quality,
        admin_user=a.admin_user, admin_password=a.admin_password, credentials=credentials,
        save_credentials=Path(a.save_credentials) if a.save_credentials else None,
        metrics_token=a.metrics_token or None, json_path=json_path, find_capacity=a.find_capacity,
        slo_p99_ms=a.slo_p99_ms, start_students=a.start_students, step_students=a.step_students,
        max_students=a.max_students, plot=plot, drain_s=a.drain_s, connect_timeout_s=a.connect_timeout_s,
        cooldown_s=a.cooldown_s, seed=a.seed, heads=heads, backbone_fps=backbone_fps,
        measure_backbone_s=a.measure_backbone_s)


def read_backbone_fps(path: Path) -> float:
    """backbone_fps from a benchmarks/pipeline.py JSON file."""
    try:
        value = json.loads(path.read_text())["backbone_fps"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LoadgenError(f"--backbone-json {path}: not a benchmarks/pipeline.py result "
                           f"({type(exc).__name__}: {exc})") from None
    if not isinstance(value, (int, float)) or not value > 0:
        raise LoadgenError(f"--backbone-json {path}: backbone_fps {value!r} is not a positive number")
    return float(value)


# ------------------------------------------------------------------------------------------ HTTP client


def _new_session(timeout_s: float = 60.0) -> Any:
    import aiohttp

    # unsafe=True: keep cookies of a server addressed by IP (127.0.0.1), which aiohttp refuses by default.
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                 timeout=aiohttp.ClientTimeout(total=timeout_s))


class ApiClient:
    """One logged-in user of the JSON API: session cookie, CSRF token, the server's own Origin."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.session = _new_session()
        self.csrf = ""

    async def close(self) -> None:
        await self.session.close()

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        import aiohttp

        headers = {"Origin": self.base_url}
        if method != "GET":
            headers["X-CSRF-Token"] = self.csrf
        try:
            async with self.session.request(method, self.base_url + path, json=body, headers=headers,
                                            allow_redirects=False) as resp:
                text = await resp.text()
                if resp.status >= 300:
                    raise LoadgenError(f"{method} {path} answered {resp.status}: {text[:300]}")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise LoadgenError(f"{method} {path}: cannot reach {self.base_url} ({exc or type(exc).__name__})") from None
        try:
            data = json.loads(text) if text else {}
        except ValueError:
            raise LoadgenError(f"{method} {path} answered something that is not JSON: {text[:200]!r}") from None
        if not isinstance(data, dict):
            raise LoadgenError(f"{method} {path} answered {type(data).__name__}, expected a JSON object")
        return data

    async def login(self, username: str, password: str) -> dict[str, Any]:
        data = await self.call("POST", "/api/login", {"username": username, "password": password})
        self.csrf = str(data.get("csrf_token", ""))
        return data


async def _gather_bounded(factories: Sequence[Callable[[], Awaitable[Any]]], limit: int) -> list[Any]:
    """Run coroutine factories with at most `limit` at a time; the first failure cancels the rest."""
    sem = asyncio.Semaphore(limit)

    async def one(factory: Callable[[], Awaitable[Any]]) -> Any:
        async with sem:
            return await factory()

    tasks = [asyncio.ensure_future(one(f)) for f in factories]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclasses.dataclass
class Credentials:
    exam_id: int
    students: list[tuple[str, str]]
    server: str

    def dump(self, path: Path) -> None:
        data = {"server": self.server, "exam_id": self.exam_id,
                "students": [{"username": u, "password": p} for u, p in self.students]}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # passwords: owner only
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)

    @classmethod
    def load(cls, path: Path) -> "Credentials":
        try:
            data = json.loads(path.read_text())
            students = [(str(s["username"]), str(s["password"])) for s in data["students"]]
            return cls(exam_id=int(data["exam_id"]), students=students, server=str(data.get("server", "")))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LoadgenError(f"--credentials {path}: not a file written by --save-credentials ({exc})") from None


async def provision(opts: Options, count: int) -> Credentials:
    """Create a teacher, `count` students and a running exam with a 2-head whitelist, through the API."""
    run_id = secrets.token_hex(3)
    admin = ApiClient(opts.url)
    teacher = ApiClient(opts.url)
    try:
        await admin.login(opts.admin_user or "", opts.admin_password or "")
        teacher_name, teacher_pw = f"lg{run_id}t", secrets.token_urlsafe(15)
        await admin.call("POST", "/api/users", {"username": teacher_name, "full_name": "Loadgen teacher",
                                                "role": "teacher", "password": teacher_pw})
        students = [(f"lg{run_id}s{i:05d}", secrets.token_urlsafe(15)) for i in range(count)]
        logger.info("creating %d students (the server hashes each password: this takes a while)", count)
        await _gather_bounded([
            (lambda u=u, p=p, i=i: admin.call("POST", "/api/users", {
                "username": u, "full_name": f"Loadgen student {i}", "role": "student", "password": p}))
            for i, (u, p) in enumerate(students)], limit=4)
        await teacher.login(teacher_name, teacher_pw)
        heads = list(opts.heads)
        if not heads:
            listed = (await teacher.call("GET", "/api/heads")).get("heads", [])
            heads = [str(h["name"]) for h in listed[:2] if isinstance(h, dict) and "name" in h]
            if not heads:
                raise LoadgenError(f"{opts.url} has no heads: load some first (proctor heads ...)")
        exam = (await teacher.call("POST", "/api/exams", {
            "name": f"loadgen {run_id}", "allowed_heads": heads, "roster": [u for u, _ in students]}))
        try:
            exam_id = int(exam["exam"]["id"])
        except (KeyError, TypeError, ValueError):
            raise LoadgenError(f"POST /api/exams answered without exam.id: {str(exam)[:200]}") from None
        await teacher.call("POST", f"/api/exams/{exam_id}/start")
        logger.info("exam %d running with whitelist %s", exam_id, ", ".join(heads))
        return Credentials(exam_id=exam_id, students=students, server=opts.url)
    finally:
        await admin.close()
        await teacher.close()


# ------------------------------------------------------------------------------------------ server probe


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text format -> {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def _total(metrics: dict, name: str, **labels: str) -> float | None:
    """Sum of a sample over every label set that matches `labels`; None when the server lacks it."""
    found = [v for (n, ls), v in metrics.items()
             if n == name and all(dict(ls).get(k) == val for k, val in labels.items())]
    return sum(found) if found else None


class ServerProbe:
    """Reads the server's /metrics: CPU seconds and resident memory, plus its own frame counters."""

    def __init__(self, base_url: str, token: str | None) -> None:
        self.url = base_url + "/metrics"
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.session = _new_session(timeout_s=10.0)
        self.problem: str | None = None
        self.peak_rss: float | None = None

    async def close(self) -> None:
        await self.session.close()

    async def scrape(self) -> tuple[float, dict] | None:
        import aiohttp

        try:
            async with self.session.get(self.url, headers=self.headers, allow_redirects=False) as resp:
                text = await resp.text()
                if resp.status != 200:
                    hint = " (pass --metrics-token)" if resp.status in (401, 403) else ""
                    self.problem = f"GET /metrics answered {resp.status}{hint}"
                    return None
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self.problem = f"GET /metrics failed: {exc or type(exc).__name__}"
            return None
        try:
            metrics = parse_metrics(text)
        except ValueError as exc:
            self.problem = f"/metrics is not Prometheus text format: {exc}"
            return None
        rss = _total(metrics, "process_resident_memory_bytes")
        if rss is not None:
            self.peak_rss = max(rss, self.peak_rss or 0.0)
        return asyncio.get_running_loop().time(), metrics

    async def sample_until(self, stop: asyncio.Event, every_s: float = 2.0) -> None:
        """Scrape now and then during the run, for the peak resident memory."""
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)
            if not stop.is_set():
                await self.scrape()


def server_figures(before: tuple[float, dict] | None, after: tuple[float, dict] | None,
                   peak_rss: float | None) -> dict[str, Any]:
    """What the server did between two scrapes: CPU, memory, and its own frame counters."""
    if before is None or after is None:
        return {}
    (t0, m0), (t1, m1) = before, after
    wall = max(t1 - t0, 1e-9)

    def delta(name: str, **labels: str) -> float | None:
        a, b = _total(m0, name, **labels), _total(m1, name, **labels)
        return None if a is None or b is None else b - a

    cpu = delta("process_cpu_seconds_total")
    batches, batch_frames = delta("proctor_batch_size_count"), delta("proctor_batch_size_sum")
    lat_n, lat_sum = delta("proctor_frame_latency_seconds_count"), delta("proctor_frame_latency_seconds_sum")
    reasons = {dict(ls).get("reason") for n, ls in m1 if n == "proctor_frames_dropped_total"} - {None}
    dropped = {reason: delta("proctor_frames_dropped_total", reason=reason) for reason in sorted(reasons)}
    rss = _total(m1, "process_resident_memory_bytes")
    return {
        "cpu_cores": None if cpu is None else round(cpu / wall, 3),
        "cpu_percent_of_one_core": None if cpu is None else round(100 * cpu / wall, 1),
        "rss_mb": None if rss is None else round(rss / 2**20, 1),
        "peak_rss_mb": None if peak_rss is None else round(peak_rss / 2**20, 1),
        "frames_received": delta("proctor_frames_received_total"),
        "frames_classified": delta("proctor_frames_classified_total"),
        "frames_unchanged": delta("proctor_frames_unchanged_total"),
        "frames_dropped": {k: v for k, v in dropped.items() if v},
        "mean_batch_size": round(batch_frames / batches, 2) if batches else None,
        "mean_latency_ms": round(1000 * lat_sum / lat_n, 1) if lat_n else None,
    }


# -------------------------------------------------------------------------------------------- the run


class Tally:
    """Everything measured in one run, shared by all student tasks (one event loop: no locks)."""

    def __init__(self) -> None:
        self.latencies_ms: list[float] = []
        self.changed_latencies_ms: list[float] = []
        self.join_latencies_ms: list[float] = []
        self.warmup_latencies_ms: list[float] = []
        self.measure_from = 0.0  # loop time: frames sent earlier are warm-up
        self.send_lag_ms: list[float] = []
        self.sent = 0
        self.sent_changed = 0
        self.heartbeats = 0
        self.evidence_sent = 0
        self.verdicts = 0
        self.dropped: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.last_answer: float | None = None


_HANDSHAKE_HINTS = {
    401: "the session was not accepted: log in failed or expired",
    403: "Origin refused, or the student is not on the exam's roster",
    404: "no such exam",
    409: "the exam is not running",
}


class Student:
    """One simulated student: its own HTTP session (cookie), its WebSocket, its outstanding frames."""

    def __init__(self, index: int, username: str, password: str, base_url: str) -> None:
        self.index = index
        self.username = username
        self.password = password
        self.api = ApiClient(base_url)
        self.logged_in = False
        self.server_config: dict[str, Any] = {}

    async def login(self) -> None:
        if not self.logged_in:
            await self.api.login(self.username, self.password)
            self.logged_in = True

    async def connect(self, exam_id: int) -> Any:
        """Open the stream, say hello and wait for the server's config; returns the WebSocket."""
        import aiohttp

        url = f"{self.api.base_url}/ws/exams/{exam_id}/stream"
        try:
            ws = await self.api.session.ws_connect(url, origin=self.api.base_url, autoping=True,
                                                   max_msg_size=1 << 20)
        except aiohttp.WSServerHandshakeError as exc:
            hint = _HANDSHAKE_HINTS.get(exc.status, exc.message)
            raise LoadgenError(f"{self.username}: stream of exam {exam_id} refused with HTTP {exc.status} "
                               f"({hint})") from None
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise LoadgenError(f"{self.username}: cannot open the stream ({exc or type(exc).__name__})") from None
        await ws.send_json({"type": "hello", "screen": {"width": 1280, "height": 720}, "displays": 1,
                            "surface": "monitor", "client": "proctor-loadgen"})
        try:
            msg = await ws.receive(timeout=30)
            data = json.loads(msg.data) if msg.type == aiohttp.WSMsgType.TEXT else {}
        except (asyncio.TimeoutError, ValueError) as exc:
            await ws.close()
            raise LoadgenError(f"{self.username}: no config message from the server "
                               f"({type(exc).__name__})") from None
        if data.get("type") != "config":
            await ws.close()
            got = str(data)[:200] if data else f"{msg.type.name} {msg.data!r} (close code {ws.close_code})"
            raise LoadgenError(f"{self.username}: expected the config message, got {got}")
        self.server_config = data
        return ws

    async def stream(self, ws: Any, pool: Sequence[PoolFrame], plan: FramePlan, first_at: float, period: float,
                     stop_at: float, drain_s: float, tally: Tally) -> None:
        """Send frames on schedule until `stop_at`, read verdicts, then wait for the outstanding ones."""
        loop = asyncio.get_running_loop()
        pending: dict[int, tuple[float, bool, bool]] = {}  # seq -> (sent at, changed, first frame)
        # Like the browser, the last few frames stay at hand at full size for an evidence_request.
        recent: collections.OrderedDict[int, PoolFrame] = collections.OrderedDict()
        done_sending = asyncio.Event()
        reader = asyncio.ensure_future(self._read(ws, pending, recent, done_sending, tally))
        beat = asyncio.ensure_future(self._heartbeat(ws, first_at, stop_at, tally))
        seq = 0
        try:
            at = first_at
            while at < stop_at and not reader.done():
                delay = at - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                tally.send_lag_ms.append(max(0.0, loop.time() - at) * 1000)
                index, changed = plan.next()
                seq += 1
                pending[seq] = (loop.time(), changed, seq == 1)
                tally.sent += 1
                tally.sent_changed += changed
                recent[seq] = pool[index]
                if len(recent) > _EVIDENCE_KEEP:
                    recent.popitem(last=False)
                await ws.send_bytes(pack_frame(seq, time.time() * 1000.0, pool[index].jpeg))
                at += period
            if not reader.done():
                await beat  # heartbeats go on until the end of the run, after the last frame
        except ConnectionResetError:
            tally.errors["send_failed"] += 1
        finally:
            done_sending.set()
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionResetError):
                await beat
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(reader), timeout=drain_s if pending else 0.01)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            tally.dropped[UNANSWERED] += len(pending)
            pending.clear()
            await ws.close()

    async def _heartbeat(self, ws: Any, first_at: float, stop_at: float, tally: Tally) -> None:
        """Heartbeats every heartbeat_s of the server's config, like the browser: part of the real load."""
        period = max(1.0, float(self.server_config.get("heartbeat_s") or 5.0))
        loop = asyncio.get_running_loop()
        at = first_at + period / 2  # between frames, not on top of them
        while at < stop_at:
            await asyncio.sleep(max(0.0, at - loop.time()))
            await ws.send_json({"type": "heartbeat", "t": time.time() * 1000.0})
            tally.heartbeats += 1
            at += period

    async def _read(self, ws: Any, pending: dict[int, tuple[float, bool, bool]], recent: dict[int, PoolFrame],
                    done_sending: asyncio.Event, tally: Tally) -> None:
        """Match answers to frames until sending stopped and nothing is outstanding, or the socket closed."""
        import aiohttp

        loop = asyncio.get_running_loop()
        while not (done_sending.is_set() and not pending):
            # No timeout: that is a timer set and cancelled per message, CPU the server lacks when both share a
            # machine. When nothing more comes, stream() stops waiting after its drain time and cancels this.
            msg = await ws.receive()
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                tally.errors[f"closed_{ws.close_code}"] += 1
                return
            if msg.type == aiohttp.WSMsgType.ERROR:
                tally.errors["socket_error"] += 1
                return
            if msg.type != aiohttp.WSMsgType.TEXT:
                tally.errors["unexpected_binary"] += 1
                continue
            try:
                data = json.loads(msg.data)
            except ValueError:
                tally.errors["bad_json_from_server"] += 1
                continue
            kind = data.get("type")
            seq = data.get("seq")
            if kind == "ack" and seq in pending:
                sent_at, changed, first = pending.pop(seq)
                now = loop.time()
                ms = (now - sent_at) * 1000.0
                if first:
                    # A student's first frame is always classified (the server has no screen to compare
                    # it with): the join burst is reported apart from the steady state.
                    tally.join_latencies_ms.append(ms)
                elif sent_at < tally.measure_from:
                    tally.warmup_latencies_ms.append(ms)
                else:
                    tally.latencies_ms.append(ms)
                    if changed:
                        tally.changed_latencies_ms.append(ms)
                tally.verdicts += 1
                tally.last_answer = now
            elif kind == "error" and seq in pending:
                pending.pop(seq)
                tally.dropped[str(data.get("code"))] += 1
                tally.last_answer = loop.time()
            elif kind == "error":
                tally.errors[str(data.get("code"))] += 1
            elif kind == "evidence_request" and seq in recent and recent[seq].evidence is not None:
                await ws.send_bytes(pack_frame(seq, time.time() * 1000.0, recent[seq].evidence, evidence=True))
                tally.evidence_sent += 1
            # config updates, heartbeats and answers to unknown seqs need nothing


def _ensure_file_limit(sockets: int) -> None:
    """Each student holds a socket; raise the soft open-files limit when the default (often 1024) is short."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = sockets + 256
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < need:
            raise LoadgenError(f"{sockets} students need about {need} open files, the limit is {hard}: "
                               f"raise it (ulimit -n) or simulate fewer students")


async def run_once(opts: Options, students: Sequence[Student], exam_id: int, pool: Sequence[bytes],
                   probe: ServerProbe | None) -> dict[str, Any]:
    """One measured run with the given students: connect, stream for opts.duration_s, drain, report."""
    loop = asyncio.get_running_loop()
    _ensure_file_limit(len(students))
    tally = Tally()
    await _gather_bounded([s.login for s in students], limit=8)

    async def connect(s: Student) -> Any:
        return await s.connect(exam_id)

    try:
        sockets = await asyncio.wait_for(
            _gather_bounded([lambda s=s: connect(s) for s in students], limit=64), opts.connect_timeout_s)
    except asyncio.TimeoutError:
        raise LoadgenError(f"{len(students)} students did not all connect within --connect-timeout "
                           f"{opts.connect_timeout_s:.0f} s") from None
    server_fps = students[0].server_config.get("fps")
    if isinstance(server_fps, (int, float)) and opts.fps > 2 * server_fps:
        # The server's token bucket allows twice the rate it asks for; beyond that frames are refused.
        logger.warning("--fps %s is over twice the %s frames/s the server asks for: expect rate_limited "
                       "drops (start the server with a higher --client-fps for this benchmark)", opts.fps,
                       server_fps)
    before = await probe.scrape() if probe else None
    stop_sampling = asyncio.Event()
    sampler = asyncio.ensure_future(probe.sample_until(stop_sampling)) if probe else None
    period = 1.0 / opts.fps
    # Spread the first frames evenly over one period so the students do not all send in the same millisecond.
    t0 = loop.time() + 0.1
    stop_at = t0 + opts.duration_s
    tally.measure_from = t0 + opts.warmup_s
    cpu0 = time.process_time()
    rng = random.Random(opts.seed)
    tasks = [asyncio.ensure_future(s.stream(ws, pool, FramePlan(len(pool), opts.changed,
                                                                random.Random(rng.random())),
                                            t0 + period * i / len(students) + rng.uniform(0, period / len(students)),
                                            period, stop_at, opts.drain_s, tally))
             for i, (s, ws) in enumerate(zip(students, sockets))]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), opts.duration_s + opts.drain_s + 30)
    except asyncio.TimeoutError:
        tally.errors["run_timeout"] += 1
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        stop_sampling.set()
        if sampler is not None:
            await sampler
    after = await probe.scrape() if probe else None
    wall = loop.time() - t0
    client_cpu = time.process_time() - cpu0
    answered_window = max(opts.duration_s, (tally.last_answer or t0) - t0)
    lag = latency_summary(tally.send_lag_ms)
    return {
        "students": len(students),
        "fps_per_student": opts.fps,
        "changed_share": opts.changed,
        "duration_s": opts.duration_s,
        "offered_fps": round(tally.sent / opts.duration_s, 2),
        "processed_fps": round(tally.verdicts / answered_window, 2),
        "latency_ms": latency_summary(tally.latencies_ms),
        "latency_changed_ms": latency_summary(tally.changed_latencies_ms),
        # Every student's first frame, all sent within the first frame period: the exam-start burst.
        "latency_join_ms": latency_summary(tally.join_latencies_ms),
        "warmup_s": opts.warmup_s,
        "latency_warmup_ms": latency_summary(tally.warmup_latencies_ms),
        "frames_sent": tally.sent,
        "frames_sent_changed": tally.sent_changed,
        "verdicts": tally.verdicts,
        "heartbeats_sent": tally.heartbeats,
        "evidence_sent": tally.evidence_sent,
        "dropped": dict(sorted((k, v) for k, v in tally.dropped.items() if v)),
        "errors": dict(sorted(tally.errors.items())),
        "processed_vs_backbone": (round(tally.verdicts / answered_window / opts.backbone_fps, 3)
                                  if opts.backbone_fps else None),
        "server": server_figures(before, after, probe.peak_rss if probe else None),
        "server_metrics_problem": probe.problem if probe else None,
        # If the generator itself falls behind its schedule, the latencies above understate the server.
        "loadgen": {"cpu_cores": round(client_cpu / max(wall, 1e-9), 3), "send_lag_ms": lag},
    }


def print_result(r: dict[str, Any], out: Any = sys.stdout) -> None:
    lat = r["latency_ms"]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    print(f"{r['students']} students x {r['fps_per_student']} frames/s ({r['changed_share']:.0%} changed), "
          f"{r['duration_s']:.0f} s: offered {r['offered_fps']:.1f} frames/s, processed {r['processed_fps']:.1f}; "
          f"latency ms p50 {ms(lat['p50'])} p95 {ms(lat['p95'])} p99 {ms(lat['p99'])} max {ms(lat['max'])}",
          file=out)
    join = r.get("latency_join_ms")
    if join and join.get("p50") is not None:
        print(f"  first frame of each student (join burst, always classified): latency ms p50 {ms(join['p50'])} "
              f"p99 {ms(join['p99'])} max {ms(join['max'])}", file=out)
    unchanged = (r.get("server") or {}).get("frames_unchanged")
    reused = "" if unchanged is None else f" ({unchanged:.0f} of the server's: screen unchanged)"
    print(f"  sent {r['frames_sent']}, verdicts {r['verdicts']}{reused}, "
          f"dropped {r['dropped'] or 0}, errors {r['errors'] or 0}, evidence copies sent {r['evidence_sent']}",
          file=out)
    if r.get("processed_vs_backbone") is not None:
        timed = r.get("backbone_fps")
        where = (f"timed in this process just before and after: {timed['before']} / {timed['after']} frames/s"
                 if timed else "of benchmarks/pipeline.py")
        print(f"  processed = {r['processed_vs_backbone']:.2f} x the backbone-only rate ({where})", file=out)
    s = r["server"]
    if s:
        print(f"  server: {s['cpu_cores']} cores busy, RSS {s['rss_mb']} MB (peak {s['peak_rss_mb']}), "
              f"mean batch {s['mean_batch_size']}, classified {s['frames_classified']}, "
              f"unchanged {s['frames_unchanged']}", file=out)
    elif r.get("server_metrics_problem"):
        print(f"  server figures unavailable: {r['server_metrics_problem']}", file=out)
    print(f"  loadgen used {r['loadgen']['cpu_cores']} cores; send lag p99 {ms(r['loadgen']['send_lag_ms']['p99'])} ms",
          file=out)


# ---------------------------------------------------------------------------------------- capacity search


async def find_capacity(run_step: Callable[[int], Awaitable[dict[str, Any]]], start: int, step: int,
                        maximum: int, slo_p99_ms: float) -> dict[str, Any]:
    """Run start, start+step, ... students until a run breaks the SLO; the largest that held is the capacity."""
    steps = []
    capacity = None
    stopped = f"reached --max-students {maximum} without breaking the SLO"
    n = start
    while n <= maximum:
        result = await run_step(n)
        ok, why = slo_verdict(result, slo_p99_ms)
        steps.append({**result, "slo_held": ok, "slo_reason": why})
        logger.info("%d students: %s (%s)", n, "SLO held" if ok else "SLO broken", why)
        if not ok:
            stopped = f"{n} students broke the SLO: {why}"
            break
        capacity = n
        n += step
    return {"slo_p99_ms": slo_p99_ms, "capacity_students": capacity, "stopped_because": stopped, "steps": steps}


def plot_capacity(report: dict[str, Any], path: Path) -> None:
    """Latency percentiles and processed frames/s against students, with the SLO and the capacity marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = report["steps"]
    xs = [s["students"] for s in steps]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for key, style in (("p50", "o-"), ("p95", "s-"), ("p99", "^-"), ("max", "x:")):
        ax1.plot(xs, [s["latency_ms"][key] if s["latency_ms"][key] is not None else float("nan") for s in steps],
                 style, label=key)
    ax1.axhline(report["slo_p99_ms"], color="red", linestyle="--", label=f"SLO p99 {report['slo_p99_ms']:.0f} ms")
    ax1.set_ylabel("frame-to-verdict latency (ms)")
    ax1.set_yscale("log")
    ax1.legend(loc="upper left")
    ax1.grid(True, which="both", alpha=0.3)
    ax2.plot(xs, [s["offered_fps"] for s in steps], "o--", label="offered")
    ax2.plot(xs, [s["processed_fps"] for s in steps], "o-", label="processed")
    ax2.set_ylabel("frames/s")
    ax2.set_xlabel("simulated students")
    ax2.legend(loc="upper left")
    ax2.grid(True, alpha=0.3)
    if report["capacity_students"] is not None:
        for ax in (ax1, ax2):
            ax.axvline(report["capacity_students"], color="green", alpha=0.5)
    first = steps[0] if steps else {"fps_per_student": "?", "changed_share": 0}
    fig.suptitle(f"Proctor capacity: {first['fps_per_student']} frames/s per student, "
                 f"{first['changed_share']:.0%} changed; capacity {report['capacity_students']} students")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -------------------------------------------------------------------------------------------------- main


class BackboneTimer:
    """The backbone alone in this process, timed as benchmarks/pipeline.py times it, on the pool's frames."""

    def __init__(self, pool: Sequence[PoolFrame], seconds: float) -> None:
        # Heavy imports only when asked: the generator itself needs no model.
        from benchmarks.pipeline import backbone_engines, time_backbone
        from proctor.batching.decode import decode_rgb
        from proctor.config import Config

        self._time = time_backbone
        self.seconds = seconds
        self._engines = backbone_engines(Config(data_dir=str(_REPO / "var")))  # pipeline.py's baseline layouts
        size = self._engines[0].frame_size
        self._frames = [decode_rgb(frame.jpeg, size) for frame in pool]
        while len(self._frames) < 32:
            self._frames += self._frames

    def measure(self) -> float:
        return max(self._time(engine, self._frames, 32, self.seconds) for engine in self._engines)


async def _between_backbone_runs(timer: BackboneTimer | None, run: Callable[[], Awaitable[dict[str, Any]]]
                                 ) -> dict[str, Any]:
    """`run()`, with the backbone timed right before and right after it when a timer is given."""
    if timer is None:
        return await run()
    before = await asyncio.to_thread(timer.measure)
    result = await run()
    after = await asyncio.to_thread(timer.measure)
    mean = (before + after) / 2
    return {**result, "backbone_fps": {"before": round(before, 1), "after": round(after, 1), "mean": round(mean, 1)},
            "processed_vs_backbone": round(result["processed_fps"] / mean, 3)}


async def run(opts: Options) -> dict[str, Any]:
    """The whole benchmark as one coroutine (tests call this): prepare, run (or search), write JSON."""
    screens, source, synthetic = load_screens(opts.images, opts.pool, max(opts.max_width, opts.evidence_max_width),
                                              opts.seed)
    if synthetic:
        print(f"loadgen: {source}", file=sys.stderr)
    pool = build_pool(screens, opts.pool, opts.jpeg_quality, opts.seed, frame_width=opts.max_width)
    del screens
    sizes = sorted(len(frame.jpeg) for frame in pool)
    logger.info("%s; %d distinct frames, median %.0f KB", source, len(pool), sizes[len(sizes) // 2] / 1024)

    if opts.credentials is not None:
        creds = Credentials.load(opts.credentials)
        if creds.server and creds.server != opts.url:
            raise LoadgenError(f"--credentials {opts.credentials} was made for {creds.server}, not {opts.url}")
        if len(creds.students) < opts.peak_students:
            raise LoadgenError(f"--credentials {opts.credentials} has {len(creds.students)} students, "
                               f"{opts.peak_students} are needed")
    else:
        creds = await provision(opts, opts.peak_students)
        if opts.save_credentials is not None:
            creds.dump(opts.save_credentials)
    students = [Student(i, u, p, opts.url) for i, (u, p) in enumerate(creds.students[:opts.peak_students])]
    timer = BackboneTimer(pool, opts.measure_backbone_s) if opts.measure_backbone_s > 0 else None
    probe = ServerProbe(opts.url, opts.metrics_token)
    try:
        if opts.find_capacity:
            async def step(n: int) -> dict[str, Any]:
                result = await _between_backbone_runs(
                    timer, lambda: run_once(opts, students[:n], creds.exam_id, pool, probe))
                print_result(result)
                await asyncio.sleep(opts.cooldown_s)  # let the server drain before the next step
                return result

            report = await find_capacity(step, opts.start_students, opts.step_students, opts.max_students,
                                         opts.slo_p99_ms)
            held = [s for s in report["steps"] if s["slo_held"]]
            report["best"] = held[-1] if held else None
            print(f"capacity: {report['capacity_students']} students ({report['stopped_because']})")
            if opts.plot is not None and report["steps"]:
                plot_capacity(report, opts.plot)
                print(f"plot written to {opts.plot}")
        else:
            report = await _between_backbone_runs(
                timer, lambda: run_once(opts, students, creds.exam_id, pool, probe))
            print_result(report)
    finally:
        await probe.close()
        await asyncio.gather(*(s.api.close() for s in students))
    report = {**report, "images": source, "frame_kb_median": round(sizes[len(sizes) // 2] / 1024, 1),
              "machine": describe_machine(), "server_url": opts.url,
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if opts.json_path is not None:
        write_result(opts.json_path, report)
        print(f"figures written to {opts.json_path}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        opts = parse_options(argv)
        try:
            import uvloop
            loop_factory = uvloop.new_event_loop
        except ImportError:
            loop_factory = None
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(run(opts))
    except LoadgenError as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
