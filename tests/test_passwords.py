"""argon2 hashing, verification, rehash detection and generated passwords."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time

import pytest
from argon2 import PasswordHasher

from proctor.passwords import (
    HASHING_NICE, MIN_LENGTH, WeakPassword, check_strength, generate_password, hash_password, hash_password_async,
    needs_rehash, run_hashing, verify_password, verify_password_async,
)


def test_hash_and_verify():
    stored = hash_password("correct horse battery")
    assert stored.startswith("$argon2id$") and "correct" not in stored
    assert verify_password(stored, "correct horse battery")
    assert not verify_password(stored, "correct horse batterY")
    assert hash_password("same password") != hash_password("same password")  # salted


@pytest.mark.parametrize("stored", ["", "not-a-hash", "$argon2id$v=19$m=1,t=1,p=1$broken"])
def test_corrupt_hash_is_a_mismatch_not_a_crash(stored):
    assert verify_password(stored, "anything") is False
    assert needs_rehash(stored)


def test_rehash_needed_for_weaker_parameters():
    weak = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash("old password here")
    assert verify_password(weak, "old password here")
    assert needs_rehash(weak)
    assert not needs_rehash(hash_password("old password here"))


def test_generated_passwords_are_long_readable_and_different():
    passwords = {generate_password() for _ in range(200)}
    assert len(passwords) == 200
    for p in passwords:
        assert len(p) == 19 and p.count("-") == 3
        assert not set(p) & set("0O1lI")
        check_strength(p)


@pytest.mark.parametrize("password, message", [
    ("admin", "too short"), ("x" * (MIN_LENGTH - 1), "too short"), ("adminadmin", "well-known default"),
    ("Password123", "well-known default"),
])
def test_weak_passwords_refused(password, message):
    with pytest.raises(WeakPassword, match=message):
        check_strength(password)


async def test_async_variants_run_off_the_loop():
    import asyncio

    stored = await hash_password_async("an exam-day password")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.001)
            ticks += 1
    task = asyncio.create_task(ticker())
    results = await asyncio.gather(*(verify_password_async(stored, p) for p in
                                     ("an exam-day password", "wrong", "an exam-day password")))
    task.cancel()
    assert results == [True, False, True]
    assert ticks >= 5  # the loop kept running while argon2 worked


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
async def test_hashing_runs_one_at_a_time_in_a_thread_below_the_streams():
    # A hall logging in at once must not take the cores from the model: argon2 runs niced, one check at a time.
    own_nice = os.getpriority(os.PRIO_PROCESS, 0)
    spans = []

    def work() -> int:
        started = time.monotonic()
        time.sleep(0.05)
        spans.append((started, time.monotonic(), threading.get_native_id()))
        return os.getpriority(os.PRIO_PROCESS, 0)  # who=0: the calling thread

    nice_values = await asyncio.gather(*(run_hashing(work) for _ in range(3)))
    assert nice_values == [min(19, own_nice + HASHING_NICE)] * 3 and HASHING_NICE > 0
    spans.sort()
    assert all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:]))  # never two at once
    assert threading.get_native_id() not in {tid for _, _, tid in spans}  # never on the event loop
    assert os.getpriority(os.PRIO_PROCESS, 0) == own_nice  # the rest of the server keeps its priority
