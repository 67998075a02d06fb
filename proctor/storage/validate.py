"""Checks on data before it is stored; each failure is an InvalidData whose message names the value."""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import uuid
from typing import Any, Sequence

import numpy as np
from safetensors.numpy import load as load_safetensors

from proctor.batching import decode
from proctor.storage.base import EVENT_KINDS, REVIEW_STATES, ROLES, InvalidData

ALERT_VERDICTS = ("unrecognised", "forbidden_program")
CHANNELS = ("alert", "alert_closed", "presence", "heads", "exam", "user")
MAX_NOTIFY_BYTES = 1000  # PostgreSQL allows 8000; ids only, so a small cap catches misuse early.
MAX_USERNAME = 64
_USERNAME = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9._@-]{{0,{MAX_USERNAME - 1}}}$")
_HEAD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# How much of a refused value an error message repeats: a megabyte "username" must not come back whole.
_SHOWN_CHARS = 80


def shown(value: Any) -> str:
    """repr(value) for an error message, cut to a readable length."""
    text = repr(value)
    if len(text) <= _SHOWN_CHARS:
        return text
    size = f" ({len(value)} characters)" if isinstance(value, str) else ""
    return text[:_SHOWN_CHARS] + "..." + size


def username(value: str) -> str:
    if not isinstance(value, str) or not _USERNAME.match(value):
        raise InvalidData(f"invalid username {shown(value)}: 1-64 letters, digits or . _ @ -, "
                          "starting with a letter or digit")
    return value


def role(value: str) -> str:
    if value not in ROLES:
        raise InvalidData(f"invalid role {shown(value)}: must be one of {', '.join(ROLES)}")
    return value


MAX_FULL_NAME = 200


def full_name(value: str) -> str:
    """A user's full name: may be empty (the callers then show the username), at most MAX_FULL_NAME characters."""
    return text("full name", value, max_length=MAX_FULL_NAME, allow_empty=True)


def password_hash(value: str) -> str:
    # The store only ever keeps argon2 hashes: a plain password handed in by mistake is refused.
    if not isinstance(value, str) or not value.startswith("$argon2"):
        raise InvalidData("password_hash must be an argon2 hash (use proctor.passwords.hash_password)")
    return value


def text(name: str, value: str, *, max_length: int = 1000, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise InvalidData(f"{name} must be text, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise InvalidData(f"{name} must not be empty")
    if len(value) > max_length:
        raise InvalidData(f"{name} is too long ({len(value)} characters, at most {max_length})")
    return value


def head_name(value: str) -> str:
    if not isinstance(value, str) or not _HEAD_NAME.match(value):
        raise InvalidData(f"invalid head name {shown(value)}: 1-64 letters, digits or . _ -")
    return value


def head_names(values: Sequence[str]) -> list[str]:
    if isinstance(values, str):
        raise InvalidData(f"allowed heads must be a list of head names, not the string {shown(values)}")
    names = [head_name(v) for v in values]
    if len(set(names)) != len(names):
        raise InvalidData(f"allowed heads list a head twice: {names}")
    return names


def choice(name: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise InvalidData(f"invalid {name} {shown(value)}: must be one of {', '.join(allowed)}")
    return value


def review_state(value: str) -> str:
    return choice("review state", value, REVIEW_STATES)


def event_kind(value: str) -> str:
    return choice("event kind", value, EVENT_KINDS)


def channel(value: str) -> str:
    return choice("channel", value, CHANNELS)


def timestamp(name: str, value: dt.datetime) -> dt.datetime:
    """Aware datetimes only, converted to UTC: a naive one is ambiguous across nodes."""
    if not isinstance(value, dt.datetime):
        raise InvalidData(f"{name} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidData(f"{name} {value.isoformat()} has no time zone (use proctor.storage.base.utcnow())")
    return value.astimezone(dt.timezone.utc)


def alert_id(value: str) -> str:
    try:
        uuid.UUID(hex=value)
    except (ValueError, TypeError, AttributeError):
        raise InvalidData(f"invalid alert id {shown(value)}: must be a UUID (uuid4().hex)") from None
    return value


def to_json(name: str, value: Any, kind: type = dict) -> str:
    if not isinstance(value, kind):
        raise InvalidData(f"{name} must be a {kind.__name__}, got {type(value).__name__}")
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InvalidData(f"{name} cannot be stored as JSON: {exc}") from None


def scores(value: dict[str, float]) -> str:
    if not isinstance(value, dict):
        raise InvalidData(f"scores must be a dict of head name to score, got {type(value).__name__}")
    for key, score in value.items():
        if not isinstance(key, str) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise InvalidData(f"invalid score {shown(key)}: {shown(score)} (must be a finite number)")
    return to_json("scores", {k: float(v) for k, v in value.items()})


def threshold(value: float) -> float:
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise InvalidData(f"invalid threshold {shown(value)}: must be a number in 0..1")
    return float(value)


def jpeg(name: str, data: bytes) -> bytes:
    """A JPEG whose header decodes; the pixels are not decoded (evidence is stored as received)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidData(f"{name} must be bytes, got {type(data).__name__}")
    data = bytes(data)
    try:
        decode.read_size(data)  # the same header check as the frame path
    except decode.DecodeError as exc:
        raise InvalidData(f"{name}: {exc} ({len(data)} bytes)") from None
    return data


def head_weights(data: bytes) -> dict[str, np.ndarray]:
    """Check a head file: a readable safetensors blob of finite float tensors that agree with each other.

    Every tensor named `<prefix>weight` must be 2-D [out, in]; a `<prefix>bias` beside it must be
    1-D [out]; there must be at least one weight. The layout beyond that (layer names, feature size
    against the backbone) belongs to proctor.models, which loads the head.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise InvalidData("head weights must be non-empty bytes (a safetensors file)")
    try:
        tensors = load_safetensors(bytes(data))
    except Exception as exc:  # safetensors raises its own SafetensorError and a few builtins
        raise InvalidData(f"head weights are not a readable safetensors file: {exc}") from None
    weights = {k: v for k, v in tensors.items() if k.endswith("weight")}
    if not weights:
        raise InvalidData(f"head weights have no '*weight' tensor (found: {sorted(tensors) or 'none'})")
    for key, array in tensors.items():
        if array.dtype.kind != "f":
            raise InvalidData(f"head tensor {key!r} has dtype {array.dtype}, expected floating point")
        if not np.all(np.isfinite(array)):
            raise InvalidData(f"head tensor {key!r} holds NaN or infinite values")
    for key, array in weights.items():
        if array.ndim != 2 or 0 in array.shape:
            raise InvalidData(f"head tensor {key!r} has shape {list(array.shape)}, expected [out, in]")
        bias_key = key[: -len("weight")] + "bias"
        bias = tensors.get(bias_key)
        if bias is not None and bias.shape != (array.shape[0],):
            raise InvalidData(f"head tensor {bias_key!r} has shape {list(bias.shape)}, "
                              f"expected [{array.shape[0]}] to match {key!r} {list(array.shape)}")
    return tensors
