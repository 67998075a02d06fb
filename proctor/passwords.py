"""Password hashing (argon2id via argon2-cffi) and readable generated passwords."""

from __future__ import annotations

import asyncio
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

MIN_LENGTH = 10
# No 0/O, 1/l/I: generated passwords are read off a terminal and typed by hand.
_ALPHABET = "abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"
_hasher = PasswordHasher()


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


async def hash_password_async(password: str) -> str:
    """hash_password off the event loop: argon2 takes ~0.1 s of CPU by design (and releases the GIL)."""
    return await asyncio.to_thread(hash_password, password)


async def verify_password_async(password_hash: str, password: str) -> bool:
    """verify_password off the event loop, so a burst of logins at exam start does not stall streams."""
    return await asyncio.to_thread(verify_password, password_hash, password)


def generate_password(groups: int = 4, group_length: int = 4) -> str:
    """A random password like 'k7Rm-x2Pq-...' from the OS CSPRNG (4x4 = about 93 bits)."""
    return "-".join("".join(secrets.choice(_ALPHABET) for _ in range(group_length)) for _ in range(groups))
