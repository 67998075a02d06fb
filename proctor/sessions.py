"""Per-student stream sessions and the teacher fan-out hub.

A StreamSession owns one student's WebSocket: admission checks, change detection,
submission to the batcher, verdicts back to the student, alert episodes to the hub and
the store. The Hub keeps, per exam, each student's presence and the teacher sockets
watching it, and fans alerts and presence out to them (and to other nodes via the store).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import logging
import time
import uuid
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
from aiohttp import WSMsgType, web

from proctor import protocol
from proctor.batching import decode
from proctor.batching.batcher import BatcherClosed, DynamicBatcher, QueueFull, Replaced
from proctor.config import Config
from proctor.metrics import Metrics
from proctor.models.interface import Classifier, HeadInfo
from proctor.storage.base import Alert, Exam, SessionEvent, User, utcnow
from proctor.whitelist import EpisodeTracker, FrameVerdict, Policy, judge

logger = logging.getLogger(__name__)
# With Config.decode_threads 0, stream frames up to this size are decoded on the event loop. A decode of a
# 640-wide frame (20-60 kB) takes about half a millisecond; handing it to a thread wakes that thread and then
# the loop again, and at hall rates, where frames arrive one by one, nearly every frame pays both wake-ups:
# 0.1-0.2 ms of CPU per frame on the 2-core test machine (benchmarks/decode_handoff.py), CPU the model lacks
# where it limits the frames/s. Decoding is Huffman-bound, about 10 ms per MB here: larger frames (a page
# sending its maximum, 2 MB by default) still go to the threads, so no frame holds the loop for more than a
# few milliseconds, whatever a client sends.
LOOP_DECODE_MAX_BYTES = 256 * 1024
# ... and up to this many pixels, baseline JPEGs only: a 3840x2160 frame takes 20 ms even when small in bytes,
# a progressive one several passes (60-75 ms for 1-1.5 MB at 4K). A page sends 640x360 by default.
LOOP_DECODE_MAX_PIXELS = 1280 * 800


def cheap_to_decode(jpeg: bytes, width: int, height: int) -> bool:
    """Whether a frame may be decoded on the event loop (see LOOP_DECODE_MAX_BYTES)."""
    return (len(jpeg) <= LOOP_DECODE_MAX_BYTES and width * height <= LOOP_DECODE_MAX_PIXELS
            and not decode.is_progressive(jpeg))

# Abuse rule: this many bad messages within the window closes the socket (1008).
_STRIKE_LIMIT = 20
_STRIKE_WINDOW_S = 10.0
# Frames over the client's rate are refused (rate_limited) without a strike: after a network stall a page
# sends what it held back at once (stream.js keeps up to 2 MB unsent: a few hundred small frames at most).
# This many within the window is no stall but a flood, each message costing the event loop, and closes too.
_THROTTLED_LIMIT = 1000
# Messages waiting to be written to one socket; past this the client is too slow and is closed. A teacher's
# live view has room for a few more per student the node knows in the exam (server.live_handler).
OUTBOX_LIMIT = 256
HEARTBEAT_S = 5.0
# Control messages (heartbeat, hello, sharing): clients send one per HEARTBEAT_S plus a few at the start.
# Each may queue a store write, and the write-behind queue is shared by every student's alerts.
_CONTROL_RATE = 2.0
_CONTROL_BURST = 10.0
# No message for this long marks a student's stream stale.
STALE_AFTER_S = 3 * HEARTBEAT_S
# How long the full-size evidence of an alert's frame is awaited after asking the student's page for it.
EVIDENCE_WAIT_S = 15.0
# The full-size copy must show the screen that was classified: its change-detection thumbnail may differ
# from the classified frame's by at most this mean grey level. The 640-wide frame and the 1920-wide copy (both
# JPEG quality 0.7, 4:2:0) of each of the 362 captured screens differ by 0.7 on average, 3.4 at most; a screen
# and its nearest other screen by 20 (median), so an innocent picture of another program fails. Two shots of
# one program's window can be as close as 1.7: no threshold tells those apart.
EVIDENCE_MATCH = 4.0

# How long closing a socket waits for the client to take the close. One that stopped reading (or has gone)
# would otherwise hold the close, and with it its session's cleanup, for good (aiohttp drains without a limit).
CLOSE_WAIT_S = 5.0

PresenceState = str  # "live" | "stale" | "disconnected" | "not_sharing"


async def close_ws(ws: web.WebSocketResponse, code: int, reason: str) -> None:
    """Close `ws` with `code`; a client that does not take it within CLOSE_WAIT_S has its connection aborted."""
    if ws.closed:
        return
    try:
        await asyncio.wait_for(ws.close(code=code, message=reason.encode()), CLOSE_WAIT_S)
    except asyncio.TimeoutError:
        # The cancelled close() closed the transport, but a transport only closes once its unsent data is out,
        # which a client that stopped reading never takes: the handler would wait on the socket for good.
        # aiohttp has no public abort for a WebSocketResponse; its request's transport is the connection.
        request = getattr(ws, "_req", None)
        transport = getattr(request, "transport", None)
        if transport is not None:
            transport.abort()
        logger.warning("a client did not take close code %d within %g s: connection aborted", code, CLOSE_WAIT_S)


class Outbox:
    """A bounded queue of JSON messages written to one WebSocket by its own task.

    Sending never blocks the frame path: when a client stops reading and the queue fills,
    the socket is closed instead of letting memory grow.
    """

    def __init__(self, ws: web.WebSocketResponse, metrics: Metrics,
                 limit: int | Callable[[], int] = OUTBOX_LIMIT) -> None:
        """limit: messages waiting at most, or a function that says it now (a teacher's grows with the hall)."""
        self._ws = ws
        self._metrics = metrics
        self._limit = limit if callable(limit) else lambda: limit
        self._queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()  # bounded by send()
        self._task = asyncio.create_task(self._run(), name="outbox")
        # The loop keeps only weak references to tasks: an unreferenced close could vanish half done.
        self._close_task: asyncio.Task | None = None
        self.overflowed = False

    @property
    def pending(self) -> int:
        """Messages waiting to be written."""
        return self._queue.qsize()

    def send(self, message: dict[str, Any]) -> None:
        if self.overflowed or self._ws.closed:
            return
        if self._queue.qsize() < self._limit():
            self._queue.put_nowait(message)
        else:
            self.overflowed = True
            logger.warning("client too slow: %d messages unread, closing its socket", self._queue.qsize())
            self._metrics.websocket_errors.labels("slow_client").inc()
            self._close_task = asyncio.create_task(close_ws(self._ws, protocol.CLOSE_POLICY, "client too slow"),
                                                   name="outbox-close")

    async def _run(self) -> None:
        while True:
            message = await self._queue.get()
            if message is None:
                return
            if message.get("type") == "error":
                self._metrics.websocket_errors.labels(message["code"]).inc()
            try:
                await self._ws.send_json(message)
            except (ConnectionError, RuntimeError):
                return  # socket closed under us; the reader side cleans up

    async def close_socket(self, code: int, reason: str) -> None:
        """Close the WebSocket itself (its handler then ends and calls close())."""
        await close_ws(self._ws, code, reason)

    async def close(self) -> None:
        if not self._task.done():
            self._queue.put_nowait(None)
            try:
                await asyncio.wait_for(self._task, 2.0)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._task.cancel()
        if self._close_task is not None:
            await asyncio.gather(self._close_task, return_exceptions=True)


@dataclass
class StudentPresence:
    student_id: int
    username: str
    full_name: str
    state: PresenceState = "disconnected"
    displays: int = 1
    alerts: int = 0
    last_alert: dict[str, Any] | None = None

    def notice(self) -> dict[str, Any]:
        """Who and in what state: a presence message's fields, for teachers and for other nodes."""
        return {"student_id": self.student_id, "username": self.username, "full_name": self.full_name,
                "state": self.state, "displays": self.displays}

    def as_message(self) -> dict[str, Any]:
        """As a snapshot lists it: the notice and the student's alerts so far."""
        return {**self.notice(), "alerts": self.alerts, "last_alert": self.last_alert}


@dataclass
class _ExamRoom:
    students: dict[int, StudentPresence] = field(default_factory=dict)
    streams: dict[int, "StreamSession"] = field(default_factory=dict)
    teachers: set[Outbox] = field(default_factory=set)
    ended: bool = False


# Ended exams a hub remembers (ids only), far more than a server ends between restarts.
_ENDED_REMEMBERED = 10_000


class Hub:
    """Per exam: presence of each student, open streams, and the teacher sockets to fan out to."""

    def __init__(self, metrics: Metrics, node_id: str, publish: Callable[[str, dict], bool] | None = None) -> None:
        self._metrics = metrics
        self.node_id = node_id
        self._rooms: dict[int, _ExamRoom] = collections.defaultdict(_ExamRoom)
        # Cross-node fan-out: store.publish(channel, payload) queued behind the store's writes; False when
        # the write queue refused it.
        self._publish = publish
        # Every open WebSocket of each user on this node (streams, live views, sample recordings), with the
        # account as it was when the socket opened, so an account that is deactivated, has its password reset
        # or logs out loses all of them at once.
        self._user_sockets: dict[int, dict[web.WebSocketResponse, User]] = collections.defaultdict(dict)
        # (exam, student) whose latest presence notice from this node the write queue refused.
        self._unpublished: set[tuple[int, int]] = set()
        # Alerts whose live message is being made, with the closes held back until it has gone out.
        self._announcing: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        # Exams that ended, newest last (bounded): presence notices other nodes send after the end must
        # not bring a forgotten exam's room back, where nothing would ever forget it again.
        self._ended: dict[int, None] = {}

    def room(self, exam_id: int) -> _ExamRoom:
        return self._rooms[exam_id]

    def students_in(self, exam_id: int) -> int:
        """Students this node knows in the exam: its roster as teachers saw it, and whoever streamed since."""
        room = self._rooms.get(exam_id)
        return len(room.students) if room is not None else 0

    def has_ended(self, exam_id: int) -> bool:
        """Whether this node has heard that the exam ended (the newest _ENDED_REMEMBERED exams)."""
        return exam_id in self._ended

    def _update_gauges(self) -> None:
        streams = sum(len(r.streams) for r in self._rooms.values())
        self._metrics.active_streams.set(streams)
        self._metrics.active_exams.set(sum(1 for r in self._rooms.values() if r.streams))

    # streams ------------------------------------------------------------------------------

    def attach_stream(self, exam_id: int, session: "StreamSession") -> "StreamSession | None":
        """Register a student's stream; returns the stream it replaces (same student reconnecting)."""
        room = self.room(exam_id)
        previous = room.streams.get(session.user.id)
        room.streams[session.user.id] = session
        self._update_gauges()
        return previous

    def detach_stream(self, exam_id: int, session: "StreamSession") -> None:
        room = self._rooms.get(exam_id)
        if room is not None and room.streams.get(session.user.id) is session:
            del room.streams[session.user.id]
            self.set_presence(exam_id, session.user, "disconnected")
        self._update_gauges()
        self._forget_if_done(exam_id)

    def _forget_if_done(self, exam_id: int) -> None:
        # A server runs for months: the presence of every past exam must not stay in memory.
        room = self._rooms.get(exam_id)
        if room is not None and room.ended and not room.streams and not room.teachers:
            del self._rooms[exam_id]

    def streams(self, exam_id: int) -> list["StreamSession"]:
        return list(self.room(exam_id).streams.values())

    # presence and alerts -------------------------------------------------------------------

    def _presence(self, exam_id: int, student_id: int, username: str, full_name: str) -> StudentPresence:
        students = self.room(exam_id).students
        if student_id not in students:
            students[student_id] = StudentPresence(student_id, username, full_name)
        return students[student_id]

    def set_presence(self, exam_id: int, user: User, state: PresenceState, displays: int | None = None,
                     *, from_node: str | None = None) -> None:
        if from_node is not None and exam_id in self._ended:
            return
        if from_node is not None:
            self._unpublished.discard((exam_id, user.id))  # the node the student is on now says newer
        presence = self._presence(exam_id, user.id, user.username, user.full_name)
        changed = presence.state != state or (displays is not None and presence.displays != displays)
        presence.state = state
        if displays is not None:
            presence.displays = displays
        if not changed:
            return
        self.broadcast(exam_id, {"type": "presence", **presence.notice()})
        if from_node is None:
            self._publish_presence(exam_id, presence)

    def _publish_presence(self, exam_id: int, presence: StudentPresence) -> None:
        """Tell other nodes; a notice the write queue refused (a long outage) is sent again later."""
        if self._publish is None:
            return
        key = (exam_id, presence.student_id)
        if self._publish("presence", {"exam_id": exam_id, **presence.notice()}) is False:
            self._unpublished.add(key)
        else:
            self._unpublished.discard(key)

    def republish_presence(self) -> None:
        """Send other nodes the presence notices the write queue refused, each at its latest state: else a
        student's lost "disconnected" would show them live on the other nodes' dashboards for good."""
        for exam_id, student_id in list(self._unpublished):
            room = self._rooms.get(exam_id)
            presence = room.students.get(student_id) if room is not None and not room.ended else None
            if presence is None:
                self._unpublished.discard((exam_id, student_id))
            else:
                self._publish_presence(exam_id, presence)

    def alert_opened(self, exam_id: int, user: User, alert_message: dict[str, Any]) -> None:
        """Fan a live alert out to this node's teachers (other nodes hear of it from the store)."""
        if exam_id not in self._rooms:
            return  # no stream or live view of that exam here (a relayed alert from another node)
        presence = self._presence(exam_id, user.id, user.username, user.full_name)
        presence.alerts += 1
        presence.last_alert = {k: alert_message[k] for k in ("id", "opened_at", "verdict", "program")}
        self.broadcast(exam_id, {"type": "alert", "alert": alert_message})

    def alert_closed(self, exam_id: int, student_id: int, alert_id: str, closed_at: str) -> None:
        message = {"type": "alert_closed", "alert_id": alert_id, "student_id": student_id, "closed_at": closed_at}
        held = self._announcing.get(alert_id)
        if held is not None:
            held.append((exam_id, message))  # goes out once the opening has (see announcing)
        else:
            self.broadcast(exam_id, message)

    @contextlib.contextmanager
    def announcing(self, alert_id: str) -> Iterator[None]:
        """While the block makes and sends an alert's live message (a thumbnail, another node's alert read
        from the store), a close of that alert waits: dashboards ignore a close of an alert they do not
        know, and would then show it open for good."""
        held = self._announcing.setdefault(alert_id, [])  # shared when a repeated notice relays it twice at once
        try:
            yield
        finally:
            if self._announcing.get(alert_id) is held:
                del self._announcing[alert_id]
                for exam_id, message in held:
                    self.broadcast(exam_id, message)

    # teachers ------------------------------------------------------------------------------

    def add_teacher(self, exam_id: int, outbox: Outbox, roster: list[User], ended: bool = False) -> dict[str, Any]:
        """Register a teacher socket; returns the snapshot message to send it first.

        ended: the exam is over (the teacher looks back at it): its room goes once the last socket has.
        """
        room = self.room(exam_id)
        room.teachers.add(outbox)
        room.ended = room.ended or ended or exam_id in self._ended
        for user in roster:
            self._presence(exam_id, user.id, user.username, user.full_name)
        return {"type": "snapshot", "exam_id": exam_id,
                "students": [p.as_message() for p in room.students.values()]}

    def remove_teacher(self, exam_id: int, outbox: Outbox) -> None:
        room = self._rooms.get(exam_id)
        if room is not None:
            room.teachers.discard(outbox)
        self._forget_if_done(exam_id)

    def broadcast(self, exam_id: int, message: dict[str, Any]) -> None:
        # .get, not room(): a notice about an exam nobody here watches (another node's alert closing at its
        # end, say) must not make a room that nothing would ever forget.
        room = self._rooms.get(exam_id)
        for outbox in list(room.teachers) if room is not None else ():
            outbox.send(message)

    # housekeeping ----------------------------------------------------------------------------

    def mark_stale(self, now: float) -> None:
        """Called periodically: streams silent for STALE_AFTER_S become 'stale' for their teachers."""
        for exam_id, room in self._rooms.items():
            for session in list(room.streams.values()):
                session.check_stale(now)

    async def close_exam(self, exam_id: int, code: int, reason: str) -> None:
        """Close every student stream of the exam, all at once: each close waits for its client's reply."""
        await asyncio.gather(*(session.close(code, reason) for session in self.streams(exam_id)))

    @contextlib.contextmanager
    def user_socket(self, user: User, ws: web.WebSocketResponse) -> Iterator[None]:
        """Count `ws` among the user's open sockets while the block runs (see `close_user`)."""
        self._user_sockets[user.id][ws] = user
        try:
            yield
        finally:
            sockets = self._user_sockets.get(user.id)
            if sockets is not None:
                sockets.pop(ws, None)
                if not sockets:
                    del self._user_sockets[user.id]

    def users_with_sockets(self) -> list[int]:
        return list(self._user_sockets)

    def exams_not_ended(self) -> list[int]:
        """Exams this node holds a room for (streams, live views, or other nodes' presence notices), not known
        to have ended: a resync ends those the database says have, so none stays in memory for good."""
        return [exam_id for exam_id, room in self._rooms.items() if not room.ended]

    async def close_user(self, user_id: int, code: int, reason: str) -> None:
        """Close every open socket of one user on this node: streams in every exam, live views, recordings."""
        sockets = list(self._user_sockets.get(user_id, ()))
        await asyncio.gather(*(close_ws(ws, code, reason) for ws in sockets))

    async def close_ended_sessions(self, user: User) -> None:
        """Close `user`'s sockets opened before a password reset or a logout: for when that notice was lost."""
        closing = []
        for ws, opened_as in list(self._user_sockets.get(user.id, {}).items()):
            # Older only: a socket opened after `user` was read (a new login) is newer, not ended.
            if opened_as.session_epoch >= user.session_epoch:
                continue
            if opened_as.password_hash != user.password_hash:
                closing.append(close_ws(ws, protocol.CLOSE_PASSWORD_RESET, "your password was reset: log in again"))
            else:
                closing.append(close_ws(ws, protocol.CLOSE_LOGGED_OUT, "you logged out: log in again"))
        await asyncio.gather(*closing)

    async def end_exam(self, exam_id: int, code: int, reason: str) -> None:
        """The exam has ended: close its streams; its room is forgotten once its last socket has gone."""
        self.room(exam_id).ended = True
        self._ended[exam_id] = None
        while len(self._ended) > _ENDED_REMEMBERED:
            del self._ended[next(iter(self._ended))]
        await self.close_exam(exam_id, code, reason)
        self._forget_if_done(exam_id)

    async def close_all(self, code: int, reason: str) -> None:
        """Close every student stream and teacher live view of this node (server shutdown)."""
        rooms = list(self._rooms.items())
        teachers = [outbox for _, room in rooms for outbox in room.teachers]
        await asyncio.gather(*(self.close_exam(exam_id, code, reason) for exam_id, _ in rooms),
                             *(outbox.close_socket(code, reason) for outbox in teachers))


@dataclass
class StreamContext:
    """What every StreamSession shares: built once by the server."""

    config: Config
    metrics: Metrics
    batcher: DynamicBatcher
    decode_executor: Executor
    # Config.decode_threads 0: cheap stream frames are decoded on the event loop itself (LOOP_DECODE_MAX_BYTES).
    decode_on_loop: bool
    hub: Hub
    classifier: Classifier
    # write(factory, what, size=0, optional=False) queues a store write through the write-behind queue
    # (WriteBehind.submit); never blocks; False when the queue refused it (full or closing).
    write: Callable[..., bool]
    store: Any


class _TokenBucket:
    """Allows `rate` messages per second on average with bursts of `burst`."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass
class _InFlight:
    jpeg: bytes
    thumb: np.ndarray | None
    verdict: asyncio.Future  # resolved with the FrameVerdict, or None when classification failed


@dataclass
class _EvidenceWanted:
    """An alert opened on frame `seq` (`width` pixels wide): its full-size copy is awaited until `deadline`."""

    alert_id: str
    seq: int
    width: int
    deadline: float
    thumb: np.ndarray | None  # the classified frame's change-detection thumbnail, to check the copy against


@dataclass
class _Decoded:
    """What change detection made of a frame: its thumbnail and, when the CPU decodes, the model's pixels."""

    thumb: np.ndarray
    # None: the model decodes the JPEG itself (--decode-device gpu); a tuple: the frame at each of the
    # classifier's frame_sizes (heads of several input sizes are loaded).
    pixels: np.ndarray | tuple[np.ndarray, ...] | None

    @property
    def picture(self) -> np.ndarray | None:
        """The frame at the classifier's frame_size (for the alert list's thumbnail)."""
        return self.pixels[0] if isinstance(self.pixels, tuple) else self.pixels


class StreamSession:
    """One student streaming into one exam over one WebSocket."""

    def __init__(self, ctx: StreamContext, exam: Exam, user: User, ws: web.WebSocketResponse) -> None:
        self.ctx = ctx
        self.exam = exam
        self.user = user
        self.ws = ws
        self.key = ("stream", exam.id, user.id, uuid.uuid4().hex)
        config = ctx.config
        self.policy = Policy(frozenset(exam.allowed_heads), config.alert_k, config.alert_n)
        self.tracker = EpisodeTracker(config.alert_k, config.alert_n)
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._last_seen = loop.time()
        # Clients may send up to twice the asked rate (clock drift, a retried frame) before throttling.
        self._bucket = _TokenBucket(rate=config.client_fps * 2, burst=max(3.0, config.client_fps * 4),
                                    now=loop.time())
        self._control_bucket = _TokenBucket(rate=_CONTROL_RATE, burst=_CONTROL_BURST, now=loop.time())
        self._strikes: collections.deque[float] = collections.deque()
        self._throttled: collections.deque[float] = collections.deque()  # frames refused for the rate
        self._tasks: set[asyncio.Task] = set()
        self._outbox = Outbox(ws, ctx.metrics)
        self._whole_screen = True
        self._sharing = True
        self._stale = False
        self._displays_stored: dict[str, Any] | None = None  # the last "displays" event's detail
        # Change detection reference: the last frame that went through the model.
        self._last_bytes: bytes | None = None
        self._last_thumb: np.ndarray | None = None
        self._last_verdict: FrameVerdict | None = None
        self._last_heads: tuple[HeadInfo, ...] = ()
        # The frame being classified now, so a same-screen frame can wait for its verdict.
        self._inflight: _InFlight | None = None
        self._alert_id: str | None = None
        self._evidence_wanted: _EvidenceWanted | None = None
        # Frames are numbered on arrival; with decode threads, thumbnails finish out of order, and
        # an older frame must never replace a newer one in the batcher.
        self._arrivals = 0
        self._newest_submitted = -1

    # lifecycle ---------------------------------------------------------------------------------

    async def run(self) -> None:
        ctx = self.ctx
        if ctx.hub.has_ended(self.exam.id):
            # It ended while this socket was being opened, after the handler had read it as running.
            await self.close(protocol.CLOSE_EXAM_ENDED, "the exam has ended")
            await self._outbox.close()
            return
        previous = ctx.hub.attach_stream(self.exam.id, self)
        if previous is not None:
            # Not awaited: the old socket is often dead (the student's network changed), and waiting for its
            # close would hold this one's config, so its frames, for seconds.
            self._spawn(previous.close(protocol.CLOSE_REPLACED_BY_NEW_CONNECTION, "replaced by a newer connection"))
        self._event("connect")
        ctx.hub.set_presence(self.exam.id, self.user, "live")
        self._outbox.send({"type": "config", "fps": ctx.config.client_fps,
                           "max_width": ctx.config.client_max_width,
                           "evidence_max_width": ctx.config.evidence_max_width,
                           "jpeg_quality": ctx.config.client_jpeg_quality, "heartbeat_s": HEARTBEAT_S})
        try:
            async for message in self.ws:
                self._seen()
                if message.type == WSMsgType.BINARY:
                    self._on_frame(message.data)
                elif message.type == WSMsgType.TEXT:
                    self._on_text(message.data)
                elif message.type == WSMsgType.ERROR:
                    # aiohttp stopped reading a message over max_msg_size and closed with 1009.
                    if getattr(message.data, "code", None) == protocol.CLOSE_TOO_BIG:
                        logger.warning("closed the stream of %s: a message over twice the %d-byte frame limit",
                                       self.user.username, self.ctx.config.max_frame_bytes)
                        self.ctx.metrics.websocket_errors.labels("message_too_big").inc()
                        self.ctx.metrics.frames_dropped.labels("oversize").inc()
                    break
                if self._too_many_strikes():
                    await self.close(protocol.CLOSE_POLICY, "too many bad messages")
                    break
                if self._outbox.pending > OUTBOX_LIMIT // 2:
                    # Messages already received come without a pause: a burst (a page's backlog after a stall)
                    # would fill the answer queue before its writer ran, and look like a client too slow.
                    await asyncio.sleep(0)
        finally:
            await self._finish()

    async def _finish(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.tracker.is_open and self._alert_id is not None:
            self._close_alert()
        await self._outbox.close()
        self.ctx.hub.detach_stream(self.exam.id, self)
        self._event("disconnect", {"close_code": self.ws.close_code})

    async def close(self, code: int, reason: str) -> None:
        await close_ws(self.ws, code, reason)

    def _seen(self) -> None:
        self._last_seen = self._loop.time()
        if self._stale:
            self._stale = False
            self.ctx.hub.set_presence(self.exam.id, self.user, "live" if self._sharing else "not_sharing")

    def check_stale(self, now: float) -> None:
        if not self._stale and now - self._last_seen > STALE_AFTER_S:
            self._stale = True
            self.ctx.hub.set_presence(self.exam.id, self.user, "stale")
            self._event("heartbeat_lost", {"silent_s": round(now - self._last_seen, 1)})

    # control messages ------------------------------------------------------------------------

    def _on_text(self, text: str) -> None:
        if not self._control_bucket.take(self._loop.time()):
            self._strike(protocol.E_RATE_LIMITED, f"more than {_CONTROL_RATE:g} control messages per second")
            return
        try:
            message = protocol.parse_control(text)
        except protocol.ProtocolError as exc:
            self._strike(exc.code, exc.message)
            return
        kind = message["type"]
        if kind == "heartbeat":
            self._outbox.send({"type": "heartbeat", "t": message.get("t")})
        elif kind == "hello":
            surface = message.get("surface") or "monitor"
            displays = int(message.get("displays", 1))
            if message.get("extended"):
                displays = max(displays, 2)
            self._whole_screen = surface == "monitor"
            if not self._whole_screen:
                self._error(protocol.E_NOT_SHARING_SCREEN,
                            f"share your whole screen, not a {surface}: frames are refused until you do")
            self.ctx.hub.set_presence(self.exam.id, self.user, "live", displays=displays)
            detail = {"displays": displays, "surface": surface, "screen": message["screen"]}
            if detail != self._displays_stored:
                # A page repeating its hello (up to the control rate) must not fill the event log.
                self._displays_stored = detail
                self._event("displays", detail)
        elif kind == "sharing":
            self._sharing = message["state"] == "started"
            self.ctx.hub.set_presence(self.exam.id, self.user, "live" if self._sharing else "not_sharing")
            self._event("sharing_started" if self._sharing else "sharing_stopped")

    # frames ----------------------------------------------------------------------------------

    def _on_frame(self, data: bytes) -> None:
        metrics = self.ctx.metrics
        config = self.ctx.config
        metrics.frames_received.inc()
        received_at = self._loop.time()
        try:
            header, jpeg_view = protocol.unpack_frame(data)
        except protocol.ProtocolError as exc:
            self._strike(exc.code, exc.message)
            return
        seq = header.seq
        if len(jpeg_view) > config.max_frame_bytes:
            self._drop("oversize", protocol.E_FRAME_TOO_LARGE,
                       f"frame of {len(jpeg_view)} bytes is over the limit of {config.max_frame_bytes}",
                       seq, strike=True)
            return
        if header.evidence:
            self._on_evidence(seq, bytes(jpeg_view))
            return
        if not self._whole_screen:
            self._error(protocol.E_NOT_SHARING_SCREEN, "share your whole screen, not a window or tab", seq)
            return
        if not self._bucket.take(received_at):
            self._throttled.append(received_at)
            self._drop("rate_limited", protocol.E_RATE_LIMITED,
                       f"sending faster than {config.client_fps} frames/s", seq)
            return
        jpeg = bytes(jpeg_view)
        size = self._checked_size(jpeg, seq)
        if size is None:
            return
        width, height = size
        on_loop = self.ctx.decode_on_loop and cheap_to_decode(jpeg, width, height)
        self._arrivals += 1
        self._spawn(self._classify(seq, header.capture_ms, jpeg, width, received_at, self._arrivals, on_loop))

    def _checked_size(self, jpeg: bytes, seq: int) -> tuple[int, int] | None:
        """The JPEG's (width, height) after the header checks (decompression bomb, not a JPEG); None when refused."""
        try:
            return decode.check_size(jpeg, self.ctx.config.max_frame_pixels)
        except decode.TooManyPixels as exc:
            self._drop("oversize", protocol.E_TOO_MANY_PIXELS, str(exc), seq, strike=True)
            return None
        except decode.DecodeError as exc:
            self._drop("bad_jpeg", protocol.E_BAD_JPEG, str(exc), seq, strike=True)
            return None

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _classify(self, seq: int, capture_ms: float, jpeg: bytes, width: int, received_at: float,
                        arrival: int, on_loop: bool) -> None:
        ctx = self.ctx
        try:
            verdict, decoded = await self._unchanged_verdict(jpeg, on_loop)
            if decoded is not None:
                verdict = await self._inflight_verdict(jpeg, decoded.thumb)
            if verdict is not None:
                ctx.metrics.frames_unchanged.inc()
            else:
                assert decoded is not None
                if arrival < self._newest_submitted:
                    raise Replaced("a newer frame is already queued")
                self._newest_submitted = arrival
                verdict = await self._submit(jpeg, decoded)
        except Replaced:
            self._drop("replaced", protocol.E_REPLACED, "a newer frame replaced this one", seq)
            return
        except QueueFull:
            self._drop("overloaded", protocol.E_OVERLOADED, "server is overloaded, frame skipped", seq)
            return
        except decode.DecodeError as exc:
            self._drop("bad_jpeg", protocol.E_BAD_JPEG, str(exc), seq, strike=True)
            return
        except BatcherClosed:
            return
        except Exception:
            logger.exception("classifying frame %d of student %s failed", seq, self.user.username)
            self._error(protocol.E_INTERNAL, "the frame could not be classified", seq)
            return
        change = self.tracker.update(verdict)
        if change == "opened":
            # An unchanged frame was not decoded: it shows the screen of the last classified one.
            thumb = decoded.thumb if decoded is not None else self._last_thumb
            await self._open_alert(verdict, jpeg, seq, width, thumb, decoded.picture if decoded is not None else None)
        elif change == "closed":
            self._close_alert()
        # The student hears only that the frame was judged: a status, a program or whether the screen counted
        # as unchanged would let a page (or devtools) probe what the model and the change detection miss.
        self._outbox.send({"type": "ack", "seq": seq, "capture_ms": capture_ms})
        ctx.metrics.frame_latency_seconds.observe(self._loop.time() - received_at)

    async def _submit(self, jpeg: bytes, decoded: _Decoded) -> FrameVerdict:
        """Classify through the batcher; frames of the same screen arriving meanwhile wait for this verdict."""
        inflight = _InFlight(jpeg, decoded.thumb, self._loop.create_future())
        self._inflight = inflight
        verdict: FrameVerdict | None = None
        future: asyncio.Future | None = None
        try:
            # The decoded pixels, or the JPEG when the model's device decodes it.
            item = decoded.pixels if decoded.pixels is not None else jpeg
            future = self.ctx.batcher.submit(self.key, item)  # may refuse at once (QueueFull)
            heads, values = await future
            verdict = judge(dict(zip((h.name for h in heads), map(float, values))), heads, self.policy)
            self._last_bytes, self._last_thumb, self._last_verdict = jpeg, decoded.thumb, verdict
            self._last_heads = heads
            return verdict
        except asyncio.CancelledError:
            if future is not None:
                future.cancel()  # the session is going away: the batcher skips this frame
            raise
        finally:
            inflight.verdict.set_result(verdict)  # None: that classification did not complete
            if self._inflight is inflight:
                self._inflight = None

    async def _inflight_verdict(self, jpeg: bytes, thumb: np.ndarray | None) -> FrameVerdict | None:
        """The verdict of the frame being classified now, when this frame shows the same screen.

        Without this, a student's second frame arriving while the first is still queued (the burst
        when a whole hall joins) would go to the model again although nothing changed.
        """
        inflight = self._inflight
        if inflight is None:
            return None
        same = jpeg == inflight.jpeg or (
            thumb is not None and inflight.thumb is not None
            and decode.thumbnail_distance(thumb, inflight.thumb) < self.ctx.config.change_threshold)
        if not same:
            return None
        return await asyncio.shield(inflight.verdict)

    async def _unchanged_verdict(self, jpeg: bytes,
                                 on_loop: bool) -> tuple[FrameVerdict, None] | tuple[None, _Decoded]:
        """(the last verdict, None) when this screen is practically the one last classified, else (None, decoded)."""
        if self._last_heads != self.ctx.classifier.heads:
            self._last_verdict = None  # heads were added or removed since: that verdict is out of date
        if self._last_verdict is not None and jpeg == self._last_bytes:
            return self._last_verdict, None
        if on_loop:
            decoded = self._decode(jpeg)  # see LOOP_DECODE_MAX_BYTES
        else:
            decoded = await self._loop.run_in_executor(self.ctx.decode_executor, self._decode, jpeg)
        if (self._last_verdict is not None and self._last_thumb is not None
                and decode.thumbnail_distance(decoded.thumb, self._last_thumb) < self.ctx.config.change_threshold):
            return self._last_verdict, None
        return None, decoded

    def _decode(self, jpeg: bytes) -> _Decoded:
        """The thumbnail, and the model's pixels from the same decode when the CPU decodes (thread or loop).

        Decoding every frame for the model, changed or not, costs an unchanged frame a little more than a
        thumbnail alone and saves a changed one a second decode; the pixels of an unchanged frame are
        dropped at once, so only frames going to the model hold them.
        """
        started = time.perf_counter()
        classifier = self.ctx.classifier
        if self.ctx.config.decode_device == "gpu":
            decoded = _Decoded(decode.thumbnail(jpeg), None)
        else:
            pixels, thumb = decode.decode_with_thumbnail(jpeg, classifier.frame_size)
            # Heads of other input sizes loaded (an imported Keras head, say): each size gets its own DCT-scaled
            # decode, as its heads were trained on. Resizing the largest instead shifted the demo heads'
            # decisions on held-out screens from 8 errors to 15 with a 400x225 head loaded.
            others = getattr(classifier, "frame_sizes", ())[1:]
            decoded = _Decoded(thumb, (pixels, *(decode.decode_rgb(jpeg, size) for size in others))
                               if others else pixels)
        self.ctx.metrics.decode_seconds.observe(time.perf_counter() - started)
        return decoded

    # alerts ----------------------------------------------------------------------------------

    async def _open_alert(self, verdict: FrameVerdict, jpeg: bytes, seq: int, width: int,
                          frame_thumb: np.ndarray | None, pixels: np.ndarray | None = None) -> None:
        ctx = self.ctx
        kind = verdict.reason or "unrecognised"
        ctx.metrics.alerts.labels(kind).inc()
        alert = Alert(id=uuid.uuid4().hex, exam_id=self.exam.id, student_id=self.user.id, opened_at=utcnow(),
                      verdict=kind, program=verdict.program, scores=dict(verdict.scores), evidence=jpeg)
        self._alert_id = alert.id
        store = ctx.store

        async def write_alert() -> None:
            await store.add_alert(alert)
            # Other nodes' teachers learn of it once it is in the database they read from.
            await store.publish("alert", {"id": alert.id, "exam_id": alert.exam_id})

        ctx.write(write_alert, f"alert {alert.id}", len(jpeg))
        if width < ctx.config.evidence_max_width:
            # The frame was classified small; the page still holds it at full size: ask for that copy.
            self._evidence_wanted = _EvidenceWanted(alert.id, seq, width, self._loop.time() + EVIDENCE_WAIT_S,
                                                    frame_thumb)
            self._outbox.send({"type": "evidence_request", "seq": seq})
            ctx.metrics.evidence_copies.labels("requested").inc()
        with ctx.hub.announcing(alert.id):
            thumb = await alert_thumbnail(alert.evidence, ctx.decode_executor, pixels)
            ctx.hub.alert_opened(self.exam.id, self.user, alert_message(alert, self.user, thumb))

    def _on_evidence(self, seq: int, jpeg: bytes) -> None:
        """A full-size copy of an alert's frame, asked for by evidence_request: it becomes the alert's evidence."""
        wanted = self._evidence_wanted
        refused = self.ctx.metrics.evidence_copies.labels("refused")
        if wanted is None or wanted.seq != seq or self._loop.time() > wanted.deadline:
            refused.inc()
            self._strike(protocol.E_UNEXPECTED_EVIDENCE, f"no evidence was asked for frame {seq} (or it came "
                         f"more than {EVIDENCE_WAIT_S:g} s late)", seq)
            return
        self._evidence_wanted = None  # one answer per request, good or bad: no probing for the limits
        size = self._checked_size(jpeg, seq)
        if size is None:
            refused.inc()
            return
        width = size[0]
        if width < wanted.width:
            refused.inc()
            self._strike(protocol.E_UNEXPECTED_EVIDENCE, f"evidence of {width} pixels wide is smaller than the "
                         f"{wanted.width}-pixel frame it would replace", seq)
            return
        self._spawn(self._store_evidence(wanted, jpeg))

    async def _store_evidence(self, wanted: _EvidenceWanted, jpeg: bytes) -> None:
        try:
            # Decoding at 1/8 scale reads every byte of the body: a corrupt one is refused, never stored.
            thumb = await self._loop.run_in_executor(self.ctx.decode_executor, decode.thumbnail, jpeg)
        except decode.DecodeError as exc:
            self.ctx.metrics.evidence_copies.labels("refused").inc()
            self._strike(protocol.E_BAD_JPEG, f"evidence: {exc}", wanted.seq)
            return
        if wanted.thumb is not None:
            distance = decode.thumbnail_distance(thumb, wanted.thumb)
            if distance > EVIDENCE_MATCH:
                # The page controls this copy: it must not swap the evidence for another picture.
                logger.warning("refused evidence of alert %s from %s: it differs from the classified frame by "
                               "%.1f grey levels", wanted.alert_id, self.user.username, distance)
                self.ctx.metrics.evidence_copies.labels("refused").inc()
                self._strike(protocol.E_UNEXPECTED_EVIDENCE, f"evidence does not show frame {wanted.seq} (mean "
                             f"difference {distance:.1f} grey levels, at most {EVIDENCE_MATCH:g})", wanted.seq)
                return
        store = self.ctx.store
        alert_id = wanted.alert_id
        if self.ctx.write(lambda: store.set_alert_evidence(alert_id, jpeg), f"full-size evidence of alert {alert_id}",
                          len(jpeg)):
            self.ctx.metrics.evidence_copies.labels("stored").inc()

    def _close_alert(self) -> None:
        alert_id, self._alert_id = self._alert_id, None
        if alert_id is None:
            return
        closed_at = utcnow()
        store = self.ctx.store
        exam_id, student_id = self.exam.id, self.user.id

        async def write_close() -> None:
            await store.close_alert(alert_id, closed_at)
            await store.publish("alert_closed", {"alert_id": alert_id, "exam_id": exam_id,
                                                 "student_id": student_id, "closed_at": closed_at.isoformat()})

        self.ctx.write(write_close, f"close of alert {alert_id}")
        self.ctx.hub.alert_closed(exam_id, student_id, alert_id, closed_at.isoformat())

    # errors ------------------------------------------------------------------------------------

    def _drop(self, reason: str, code: str, message: str, seq: int, strike: bool = False) -> None:
        self.ctx.metrics.frames_dropped.labels(reason).inc()
        if strike:
            self._strike(code, message, seq)
        else:
            self._error(code, message, seq)

    def _error(self, code: str, message: str, seq: int | None = None) -> None:
        self._outbox.send(protocol.error_message(code, message, seq))

    def _strike(self, code: str, message: str, seq: int | None = None) -> None:
        self._strikes.append(self._loop.time())
        self._error(code, message, seq)

    def _too_many_strikes(self) -> bool:
        now = self._loop.time()
        for times in (self._strikes, self._throttled):
            while times and now - times[0] > _STRIKE_WINDOW_S:
                times.popleft()
        return (len(self._strikes) >= _STRIKE_LIMIT or len(self._throttled) >= _THROTTLED_LIMIT
                or self._outbox.overflowed)

    def _event(self, kind: str, detail: dict[str, Any] | None = None) -> None:
        event = SessionEvent(exam_id=self.exam.id, student_id=self.user.id, kind=kind, at=utcnow(),
                             detail=detail or {})
        store = self.ctx.store
        self.ctx.write(lambda: store.add_event(event), f"{kind} event")


async def alert_thumbnail(evidence: bytes, executor: Executor | None = None, pixels: np.ndarray | None = None) -> bytes:
    """The small JPEG for the teachers' live alert list, made in a thread; b"" when the evidence does not decode.

    From `pixels` when the frame was decoded for the model already (about a fifth of the cost of
    decoding the evidence again), else from the evidence JPEG.
    """
    loop = asyncio.get_running_loop()
    if pixels is not None:
        return await loop.run_in_executor(executor, decode.thumbnail_jpeg, pixels)
    try:
        return await loop.run_in_executor(executor, decode.evidence_thumbnail, evidence)
    except decode.DecodeError:
        return b""  # the alert still goes out, without its picture


def alert_message(alert: Alert, user: User, thumbnail: bytes) -> dict[str, Any]:
    """The live alert as teachers' dashboards receive it."""
    top = sorted(alert.scores.items(), key=lambda item: item[1], reverse=True)[:5]
    return {"id": alert.id, "student_id": user.id, "username": user.username, "full_name": user.full_name,
            "opened_at": alert.opened_at.isoformat(), "verdict": alert.verdict, "program": alert.program,
            "top_scores": [[name, round(score, 4)] for name, score in top],
            "thumbnail": ("data:image/jpeg;base64," + base64.b64encode(thumbnail).decode()) if thumbnail else "",
            "evidence_url": f"/api/alerts/{alert.id}/evidence"}

