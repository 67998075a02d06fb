"""Training samples: recording a live screen (/ws/samples), training a head from them, alerts sent as samples.

Frames come over a WebSocket rather than one HTTP POST each: the page reuses the student page's
ScreenStreamer (stream.js) as it is, one connection carries a whole recording at ~1 frame/s without a
request, cookie and CSRF check per frame, and the server answers each frame with the running count.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import numpy as np
from aiohttp import WSMsgType, web

from proctor import protocol
from proctor.appkeys import CONFIG_KEY, HUB_KEY, STORE_KEY
from proctor.batching import decode
from proctor.server import refuse, ws_user
from proctor.sessions import close_ws
from proctor.storage import validate
from proctor.storage.base import Conflict, InvalidData, Store, StoreError, User
from proctor.training_jobs import TRAINING_KEY, JobRefused
from proctor.web import services as sv
from proctor.web.api import json_body, json_response
from proctor.web.auth import require_user

logger = logging.getLogger(__name__)

routes = web.RouteTableDef()

MAX_SAMPLES_PER_LABEL = 2000
RECORD_FPS = 1.0
# Frames closer than this (mean grey level, 0..255, on 32x18 thumbnails) to the last stored one are not
# stored again: a teacher reading one page for a minute would otherwise add 60 copies of one screen.
UNCHANGED_DISTANCE = 0.5
_MIN_INTERVAL_S = 0.5 / RECORD_FPS  # the server's rate limit: twice the requested rate
_MAX_STRIKES = 10  # bad frames before the socket is closed
_STAFF = ("teacher", "admin")
E_SAMPLE_LIMIT = "sample_limit"


def _store(request: web.Request) -> Store:
    return request.app[STORE_KEY]


def check_label(label: str | None) -> str:
    """A label is the name of the head it trains (a new one or an existing one)."""
    try:
        return validate.head_name(label or "")
    except InvalidData as exc:
        raise sv.bad(str(exc)) from None


# ------------------------------------------------------------------------------------------- recording


class _Recorder:
    """One recording connection: checks each frame like the student stream does, stores it, answers the count."""

    def __init__(self, request: web.Request, ws: web.WebSocketResponse, user: User, label: str, count: int):
        self.app = request.app
        self.ws = ws
        self.user = user
        self.label = label
        self.count = count
        self.stored = 0
        self.strikes = 0
        self.whole_screen = True
        self._last_at = -1e9
        self._last_thumb: np.ndarray | None = None

    async def send(self, message: dict[str, Any]) -> None:
        if not self.ws.closed:
            await self.ws.send_str(json.dumps(message))

    async def error(self, code: str, message: str, seq: int | None = None, strike: bool = False) -> None:
        await self.send(protocol.error_message(code, message, seq))
        if strike:
            self.strikes += 1
            if self.strikes >= _MAX_STRIKES:
                await close_ws(self.ws, protocol.CLOSE_POLICY, "too many bad frames")

    async def run(self) -> None:
        config = self.app[CONFIG_KEY]
        # evidence_max_width 0: recording never asks for full-size copies, so the page keeps none.
        await self.send({"type": "config", "fps": RECORD_FPS, "max_width": config.client_max_width,
                         "evidence_max_width": 0, "jpeg_quality": config.client_jpeg_quality, "heartbeat_s": 5,
                         "label": self.label, "count": self.count, "limit": MAX_SAMPLES_PER_LABEL})
        async for msg in self.ws:
            if msg.type == WSMsgType.BINARY:
                await self.on_frame(msg.data)
            elif msg.type == WSMsgType.TEXT:
                await self.on_text(msg.data)

    async def on_text(self, text: str) -> None:
        try:
            message = protocol.parse_control(text)
        except protocol.ProtocolError as exc:
            await self.error(exc.code, exc.message, strike=True)
            return
        if message["type"] == "heartbeat":
            await self.send({"type": "heartbeat", "t": message.get("t")})
        elif message["type"] == "hello":
            surface = message.get("surface") or "monitor"
            self.whole_screen = surface == "monitor"
            if not self.whole_screen:
                await self.error(protocol.E_NOT_SHARING_SCREEN, f"share your whole screen, not a {surface}: "
                                 "heads see whole screens, so samples must be whole screens too")

    async def on_frame(self, data: bytes) -> None:
        config = self.app[CONFIG_KEY]
        loop = asyncio.get_running_loop()
        try:
            header, view = protocol.unpack_frame(data)
        except protocol.ProtocolError as exc:
            await self.error(exc.code, exc.message, strike=True)
            return
        seq = header.seq
        if header.evidence:
            await self.error(protocol.E_UNEXPECTED_EVIDENCE, "recording samples never asks for evidence", seq,
                             strike=True)
            return
        if len(view) > config.max_frame_bytes:
            await self.error(protocol.E_FRAME_TOO_LARGE, f"frame of {len(view)} bytes is over the limit of "
                             f"{config.max_frame_bytes}", seq, strike=True)
            return
        if not self.whole_screen:
            await self.error(protocol.E_NOT_SHARING_SCREEN, "share your whole screen, not a window or tab", seq)
            return
        now = loop.time()
        if now - self._last_at < _MIN_INTERVAL_S:
            await self.error(protocol.E_RATE_LIMITED, f"sending faster than {RECORD_FPS:g} frame(s)/s", seq)
            return
        self._last_at = now
        if self.count >= MAX_SAMPLES_PER_LABEL:
            await self.error(E_SAMPLE_LIMIT, f"head {self.label!r} has {self.count} samples, the most kept per "
                             f"head ({MAX_SAMPLES_PER_LABEL}); train it now", seq)
            return
        jpeg = bytes(view)
        try:
            decode.check_size(jpeg, config.max_frame_pixels)
            # The thumbnail decodes the whole image (at 1/8 scale): a corrupt body is refused here, not later.
            thumb = await loop.run_in_executor(None, decode.thumbnail, jpeg)
        except decode.TooManyPixels as exc:
            await self.error(protocol.E_TOO_MANY_PIXELS, str(exc), seq, strike=True)
            return
        except decode.DecodeError as exc:
            await self.error(protocol.E_BAD_JPEG, str(exc), seq, strike=True)
            return
        if self._last_thumb is not None and \
                decode.thumbnail_distance(thumb, self._last_thumb) < UNCHANGED_DISTANCE:
            await self.send({"type": "sample", "seq": seq, "count": self.count, "stored": False,
                             "reason": "unchanged screen"})
            return
        try:
            await self.app[STORE_KEY].add_sample(self.label, jpeg, source="recorded", limit=MAX_SAMPLES_PER_LABEL)
        except InvalidData as exc:
            await self.error(protocol.E_BAD_JPEG, str(exc), seq, strike=True)
            return
        except Conflict as exc:  # other recordings (tabs, teachers, nodes) of this label filled it meanwhile
            self.count = MAX_SAMPLES_PER_LABEL
            await self.error(E_SAMPLE_LIMIT, str(exc), seq)
            return
        self._last_thumb = thumb
        self.count += 1
        self.stored += 1
        await self.send({"type": "sample", "seq": seq, "count": self.count, "stored": True})


_RECORDINGS = web.AppKey("sample_recordings", set)


def setup(app: web.Application) -> None:
    """The routes, and closing open recordings at shutdown."""
    app[_RECORDINGS] = set()
    app.on_shutdown.append(_close_recordings)
    app.router.add_routes(routes)


async def _close_recordings(app: web.Application) -> None:
    # aiohttp waits (60 s) for running handlers before cleanup; a recording ends only when its socket does.
    await asyncio.gather(*(close_ws(ws, protocol.CLOSE_GOING_AWAY, "server shutting down")
                           for ws in list(app[_RECORDINGS])))


@routes.get("/ws/samples")
async def samples_socket(request: web.Request) -> web.StreamResponse:
    """A teacher's or admin's screen recorded as positive samples of `?label=`."""
    user = await ws_user(request)
    if user.role not in _STAFF:
        raise refuse(web.HTTPForbidden, "only teachers and admins record samples")
    try:
        label = validate.head_name(request.query.get("label", ""))
    except InvalidData as exc:
        raise refuse(web.HTTPBadRequest, str(exc)) from None
    store = _store(request)
    count = (await store.count_samples()).get(label, 0)
    config = request.app[CONFIG_KEY]
    ws = web.WebSocketResponse(max_msg_size=2 * config.max_frame_bytes + protocol.HEADER_SIZE, heartbeat=30.0,
                               compress=False)
    await ws.prepare(request)
    recorder = _Recorder(request, ws, user, label, count)
    recordings = request.app[_RECORDINGS]
    recordings.add(ws)
    try:
        with request.app[HUB_KEY].user_socket(user, ws):
            await recorder.run()
    except Exception:
        logger.exception("recording samples of %s by %s failed", label, user.username)
        await close_ws(ws, protocol.CLOSE_INTERNAL, "internal error")
    finally:
        recordings.discard(ws)
        if recorder.stored:
            # One audit entry per recording, not per frame; a database outage must not hide the socket's end.
            try:
                await asyncio.shield(store.audit(user.id, "samples.recorded", f"head:{label}",
                                                 {"stored": recorder.stored, "total": recorder.count}))
            except StoreError:
                logger.exception("could not audit the %d samples of %s recorded by %s", recorder.stored, label,
                                 user.username)
    return ws


# ------------------------------------------------------------------------------------------ JSON API


@routes.get("/api/samples")
async def api_samples(request: web.Request) -> web.Response:
    await require_user(request, *_STAFF)
    return json_response({"labels": await _store(request).count_samples(), "limit": MAX_SAMPLES_PER_LABEL})


@routes.delete("/api/samples/{label}")
async def api_delete_samples(request: web.Request) -> web.Response:
    """Forget every sample of a label (a recording of the wrong screen, or a label's samples no longer
    wanted); heads trained from them keep what they learnt."""
    actor = await require_user(request, "admin")
    label = check_label(request.match_info["label"])
    store = _store(request)
    deleted = await store.delete_samples(label)
    await store.audit(actor.id, "samples.deleted", f"head:{label}", {"deleted": deleted})
    return json_response({"label": label, "deleted": deleted})


@routes.post("/api/samples/{label}/train")
async def api_train(request: web.Request) -> web.Response:
    actor = await require_user(request, *_STAFF)
    label = check_label(request.match_info["label"])
    data = await json_body(request) if request.body_exists else {}
    fields = {}
    for name in ("program", "description"):
        value = data.get(name, "")
        if not isinstance(value, str):
            raise sv.bad(f"field {name!r} must be a string")
        fields[name] = value
    try:
        job = await request.app[TRAINING_KEY].start(label, actor.id, **fields,
                                                     may_replace=actor.role == "admin")
    except JobRefused as exc:
        raise sv.WebError(exc.status, exc.message) from None
    return json_response({"job": job.to_json()}, status=202)


@routes.get("/api/training/{job_id}")
async def api_training_job(request: web.Request) -> web.Response:
    await require_user(request, *_STAFF)
    return json_response({"job": request.app[TRAINING_KEY].get(request.match_info["job_id"]).to_json()})


async def alert_to_sample(store: Store, actor: User, alert_id: str, label: str) -> dict[str, Any]:
    """Store a false-positive alert's evidence as a positive sample of the head of the program it really showed."""
    alert, _ = await sv.alert_for_staff(store, actor, alert_id)
    label = check_label(label)
    heads = {h.name for h in await store.list_heads(active_only=True)}
    if label not in heads:
        raise sv.bad(f"no active head named {label!r}: pick one of {', '.join(sorted(heads)) or 'none'}")
    try:
        sample_id = await store.add_sample(label, alert.evidence, source="false_positive", exam_id=alert.exam_id,
                                           limit=MAX_SAMPLES_PER_LABEL)
    except Conflict as exc:
        raise sv.WebError(409, str(exc)) from None
    if alert.review_state == "new":
        alert = await store.review_alert(alert.id, "false_positive", alert.review_note or f"it showed {label}",
                                         actor.id)
    await store.audit(actor.id, "alert.sampled", f"alert:{alert.id}", {"head": label, "sample": sample_id})
    return {"sample_id": sample_id, "label": label, "alert": await sv.alert_details(store, alert)}


@routes.post("/api/alerts/{id}/sample")
async def api_alert_sample(request: web.Request) -> web.Response:
    actor = await require_user(request, *_STAFF)
    data = await json_body(request)
    label = data.get("label")
    if not isinstance(label, str):
        raise sv.bad("field 'label' must be the name of the head of the program the screen showed")
    result = await alert_to_sample(_store(request), actor, request.match_info["id"], label)
    return json_response(result, status=201)


# ---------------------------------------------------------------------------------------------- pages


@routes.get("/teacher/samples")
async def samples_page(request: web.Request) -> web.Response:
    from proctor.web.pages import render

    await require_user(request, *_STAFF)
    store = _store(request)
    heads = await store.list_heads()
    running = request.app[TRAINING_KEY].running
    return await render("samples.html", request, {
        "heads": heads, "programs": {h.name: h.program for h in heads}, "counts": await store.count_samples(),
        "limit": MAX_SAMPLES_PER_LABEL, "min_positives": request.app[TRAINING_KEY].settings.min_positives,
        "running": running.to_json() if running else None})


@routes.post("/teacher/alerts/{id}/sample")
async def alert_sample_form(request: web.Request) -> web.Response:
    """The review page's form (works without JavaScript): back to the alert afterwards."""
    user = await require_user(request, *_STAFF)
    form = await request.post()
    label = form.get("label")
    result = await alert_to_sample(_store(request), user, request.match_info["id"],
                                   label if isinstance(label, str) else "")
    back = f"/teacher/exams/{result['alert']['exam_id']}/review"
    if form.get("unreviewed") == "1":
        back += "?unreviewed=1"
    raise web.HTTPFound(back + f"#alert-{result['alert']['id']}")
