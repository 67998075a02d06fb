"""Password hashing (argon2id via argon2-cffi) and readable generated passwords."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

logger = logging.getLogger(__name__)

MIN_LENGTH = 10
# No 0/O, 1/l/I: generated passwords are read off a terminal and typed by hand.
_ALPHABET = "abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"
_hasher = PasswordHasher()
# A check takes ~170 ms of CPU here (RFC 9106's low-memory profile: 64 MiB, 3 passes, 4 lanes in 4 threads).
# At exam start a whole hall logs in within minutes while the first students already stream: 300 logins
# during 120 students' streams cut the frames classified from 120 to 75 per second, with p99 at 5.4 s
# (benchmarks/login_storm.py). So hashing runs one at a time, in a thread niced below the model's (its
# lane threads inherit that): logins take the CPU the streams leave, and wait their turn when there is none.
HASHING_NICE = 10
_T = TypeVar("_T")
_hashing_pool: ThreadPoolExecutor | None = None
_hashing_pool_lock = threading.Lock()


class WeakPassword(ValueError):
    """A password was refused; the message says why (never the password itself)."""


def check_strength(password: str) -> None:
    """Refuse passwords too short to stand a guessing attack, and the classic defaults."""
    if len(password) < MIN_LENGTH:
        raise WeakPassword(f"password too short: at least {MIN_LENGTH} characters are needed")
    if password.lower() in ("admin", "password", "adminadmin", "password123", "1234567890"):
        raise WeakPassword("password refused: it is a well-known default")


def hash_password(password: str) -> str:
    """An argon2id hash with its own salt and parameters, in PHC string format."""
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    """Check a password against its stored hash in constant time; False on mismatch or a corrupt hash."""
    try:
        return _hasher.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(password_hash: str) -> bool:
    """True when the hash was made with weaker parameters than today's: re-hash after a good login."""
    try:
        return _hasher.check_needs_rehash(password_hash)
    except (InvalidHashError, ValueError):
        return True


def _lower_thread_priority() -> None:
    # On Linux the nice value is per thread (who = the thread id); elsewhere it would nice the whole server.
    # Relative to the server's own: lowering a priority needs no privilege, raising one would.
    if sys.platform.startswith("linux"):
        thread = threading.get_native_id()
        try:
            os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + HASHING_NICE))
        except OSError as exc:
            logger.warning("password hashing keeps the server's priority (cannot lower it: %s)", exc)


def _hashing_executor() -> ThreadPoolExecutor:
    global _hashing_pool
    with _hashing_pool_lock:
        if _hashing_pool is None:
            _hashing_pool = ThreadPoolExecutor(1, thread_name_prefix="password-hashing",
                                               initializer=_lower_thread_priority)
        return _hashing_pool


async def run_hashing(function: Callable[..., _T], *args: object) -> _T:
    """Run a blocking argon2 call (hash or verify) in the low-priority hashing thread, one at a time."""
    return await asyncio.get_running_loop().run_in_executor(_hashing_executor(), function, *args)


async def hash_password_async(password: str) -> str:
    """hash_password off the event loop, behind the streams (see HASHING_NICE)."""
    return await run_hashing(hash_password, password)


async def verify_password_async(password_hash: str, password: str) -> bool:
    """verify_password off the event loop, so a burst of logins at exam start does not stall streams."""
    return await run_hashing(verify_password, password_hash, password)


def generate_password(groups: int = 4, group_length: int = 4) -> str:
    """A random password like 'k7Rm-x2Pq-...' from the OS CSPRNG (4x4 = about 93 bits)."""
    return "-".join("".join(secrets.choice(_ALPHABET) for _ in range(group_length)) for _ in range(groups))
