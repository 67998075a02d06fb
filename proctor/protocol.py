"""WebSocket message formats of the student stream and their validation.

Student -> server
  binary: one frame = 16-byte header + JPEG bytes. Header, big-endian:
          version (u8, = 1), flags (u8), 2 reserved bytes, sequence number (u32),
          capture time in ms on the client's clock (f64, echoed back for latency).
          Flags: 0 = a frame to classify (at most config.max_width wide);
          FLAG_EVIDENCE = the same captured frame `seq` again, at up to config.evidence_max_width,
          sent only in answer to an evidence_request (it replaces the alert's small evidence).
  text:   JSON control messages with a "type":
          {"type": "hello", "screen": {"width": W, "height": H}, "displays": N,
           "extended": bool, "surface": "monitor"|"window"|"browser", "client": "..."}
          {"type": "heartbeat", "t": client_ms}
          {"type": "sharing", "state": "started"|"stopped"}
Server -> student (JSON text)
  {"type": "config", "fps": F, "max_width": W, "evidence_max_width": E, "jpeg_quality": Q, "heartbeat_s": S}
  {"type": "evidence_request", "seq": N}  (an alert opened on frame N: send it again at full size)
  {"type": "ack", "seq": N, "capture_ms": T}  (frame N was judged; the judgement goes to the teachers only)
  {"type": "error", "code": CODE, "message": "...", "seq": N (when about a frame)}
  {"type": "heartbeat", "t": client_ms}
Teacher <- server: see sessions.TeacherHub (alert, alert_closed, presence, snapshot).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

HEADER = struct.Struct("!BB2xId")
HEADER_SIZE = HEADER.size  # 16
PROTOCOL_VERSION = 1
# Header flags. Clients of the first protocol revision sent a zero byte here: their frames still classify.
FLAG_EVIDENCE = 0x01
MAX_TEXT_BYTES = 16 * 1024

# Stable error codes sent in {"type": "error"}; clients and the load generator key on them.
E_BAD_HEADER = "bad_header"
E_BAD_JPEG = "bad_jpeg"
E_FRAME_TOO_LARGE = "frame_too_large"
E_TOO_MANY_PIXELS = "too_many_pixels"
E_RATE_LIMITED = "rate_limited"
E_OVERLOADED = "overloaded"
E_REPLACED = "replaced"
E_BAD_JSON = "bad_json"
E_BAD_MESSAGE = "bad_message"
E_NOT_SHARING_SCREEN = "not_whole_screen"
E_UNEXPECTED_EVIDENCE = "unexpected_evidence"
E_INTERNAL = "internal"

# WebSocket close codes (RFC 6455 + application range 4000-4999).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001          # server shutting down
CLOSE_POLICY = 1008              # repeated bad input
CLOSE_TOO_BIG = 1009             # oversize message flood
CLOSE_INTERNAL = 1011
CLOSE_EXAM_ENDED = 4000
CLOSE_REPLACED_BY_NEW_CONNECTION = 4001
CLOSE_ACCOUNT_DEACTIVATED = 4003
CLOSE_PASSWORD_RESET = 4004       # the account's password was reset: log in again
CLOSE_LOGGED_OUT = 4005           # the account logged out (here or on another device): log in again


class ProtocolError(ValueError):
    """A message that breaks the protocol; `code` is one of the E_* codes."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class FrameHeader:
    seq: int
    capture_ms: float
    evidence: bool = False  # the full-size copy of frame `seq`, answering an evidence_request


def pack_frame(seq: int, capture_ms: float, jpeg: bytes, evidence: bool = False) -> bytes:
    flags = FLAG_EVIDENCE if evidence else 0
    return HEADER.pack(PROTOCOL_VERSION, flags, seq & 0xFFFFFFFF, capture_ms) + jpeg


def unpack_frame(data: bytes) -> tuple[FrameHeader, memoryview]:
    if len(data) < HEADER_SIZE:
        raise ProtocolError(E_BAD_HEADER, f"binary message of {len(data)} bytes is shorter than the "
                                          f"{HEADER_SIZE}-byte frame header")
    version, flags, seq, capture_ms = HEADER.unpack_from(data)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(E_BAD_HEADER, f"frame header version {version} is not supported "
                                          f"(expected {PROTOCOL_VERSION})")
    if flags & ~FLAG_EVIDENCE:
        raise ProtocolError(E_BAD_HEADER, f"frame header flags 0x{flags:02x} are not supported "
                                          f"(known: 0x{FLAG_EVIDENCE:02x} evidence)")
    if capture_ms != capture_ms:  # NaN
        capture_ms = 0.0
    return FrameHeader(seq, capture_ms, bool(flags & FLAG_EVIDENCE)), memoryview(data)[HEADER_SIZE:]


_CONTROL_TYPES = ("hello", "heartbeat", "sharing")


def parse_control(text: str) -> dict[str, Any]:
    """Parse and check a JSON control message; raises ProtocolError with a stable code."""
    if len(text) > MAX_TEXT_BYTES:
        raise ProtocolError(E_BAD_MESSAGE, f"control message over {MAX_TEXT_BYTES} bytes")
    try:
        message = json.loads(text)
    except (ValueError, RecursionError):
        raise ProtocolError(E_BAD_JSON, "control message is not valid JSON") from None
    if not isinstance(message, dict):
        raise ProtocolError(E_BAD_MESSAGE, "control message must be a JSON object")
    kind = message.get("type")
    if kind not in _CONTROL_TYPES:
        raise ProtocolError(E_BAD_MESSAGE, f"unknown message type {kind!r}; expected one of "
                                           f"{', '.join(_CONTROL_TYPES)}")
    if kind == "hello":
        displays = message.get("displays", 1)
        if not isinstance(displays, int) or isinstance(displays, bool) or not 0 <= displays <= 64:
            raise ProtocolError(E_BAD_MESSAGE, "hello.displays must be an integer 0..64")
        message["screen"] = _screen_size(message.get("screen", {}))
        surface = message.get("surface", "monitor")
        if surface not in ("monitor", "window", "browser", None):
            raise ProtocolError(E_BAD_MESSAGE, "hello.surface must be monitor, window or browser")
    elif kind == "sharing":
        if message.get("state") not in ("started", "stopped"):
            raise ProtocolError(E_BAD_MESSAGE, "sharing.state must be started or stopped")
    return message


def _screen_size(screen: Any) -> dict[str, int]:
    """hello.screen cut down to its width and height: it is stored with the session's events, so nothing
    else a page puts there (of any size) may reach the database."""
    if not isinstance(screen, dict):
        raise ProtocolError(E_BAD_MESSAGE, "hello.screen must be an object")
    size = {}
    for name in ("width", "height"):
        value = screen.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 100_000:
            raise ProtocolError(E_BAD_MESSAGE, f"hello.screen.{name} must be an integer 0..100000")
        size[name] = value
    return size


def error_message(code: str, message: str, seq: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if seq is not None:
        out["seq"] = seq
    return out
