#!/usr/bin/env python3
"""Streams during a login storm: what hundreds of logins at exam start cost the students already streaming.

At exam start a hall logs in within minutes while the first students already share their screens, and
every login is an argon2 check (~170 ms of CPU here). This runs benchmarks/loadgen.py (a subprocess)
streaming the first --students of a credentials file (written by loadgen --save-credentials); once
they all stream (the server's proctor_active_streams) and --storm-after seconds more have passed, it logs
in the next --logins students through the JSON API, --concurrency at a time, timing each login. It
prints and writes JSON: the streams' figures as the load generator reports them (processed frames/s,
latency over the run after its warm-up, drops) and the logins' (p50/p95/p99/max seconds, errors, how
long the storm lasted). --logins 0 gives the same streams without a storm: the baseline.

    python benchmarks/login_storm.py --url http://127.0.0.1:8080 --credentials var/loadgen-creds.json \\
        --students 120 --logins 300 --json benchmarks/results/login-storm/storm.json

The streaming server needs --client-fps at least --fps (as for loadgen.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.loadgen import (  # noqa: E402
    ApiClient, Credentials, LoadgenError, ServerProbe, _total, latency_summary,
)
from benchmarks.machine import describe as describe_machine, write_result  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--credentials", type=Path, required=True,
                   help="loadgen --save-credentials file with at least --students + --logins students")
    p.add_argument("--students", type=int, default=120, help="students streaming (default %(default)s)")
    p.add_argument("--fps", type=float, default=1.0, help="frames/s per streaming student (default %(default)s)")
    p.add_argument("--changed", type=float, default=1.0, help="share of changed frames (default %(default)s)")
    p.add_argument("--duration", type=float, default=60.0, help="streaming seconds after the warm-up")
    p.add_argument("--warmup", type=float, default=10.0)
    p.add_argument("--logins", type=int, default=300, help="other students logging in meanwhile (0: none)")
    p.add_argument("--concurrency", type=int, default=8, help="logins in flight at once (default %(default)s)")
    p.add_argument("--storm-after", type=float, default=15.0,
                   help="seconds after every stream is up before the logins start (default %(default)s)")
    p.add_argument("--metrics-token", default=None)
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    return p


async def wait_for_streams(probe: ServerProbe, count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        scraped = await probe.scrape()
        if scraped is None:
            raise LoadgenError(probe.problem or "cannot read /metrics")
        if (_total(scraped[1], "proctor_active_streams") or 0) >= count:
            return
        await asyncio.sleep(1.0)
    raise LoadgenError(f"{count} streams were not up within {timeout_s:.0f} s")


async def login_storm(url: str, students: list[tuple[str, str]], concurrency: int) -> dict[str, Any]:
    """Log every student in, `concurrency` at a time; seconds per login and errors."""
    seconds: list[float] = []
    errors: list[str] = []
    limit = asyncio.Semaphore(concurrency)

    async def one(username: str, password: str) -> None:
        async with limit:
            client = ApiClient(url)
            started = time.perf_counter()
            try:
                await client.login(username, password)
                seconds.append(time.perf_counter() - started)
            except LoadgenError as exc:
                errors.append(str(exc))
            finally:
                await client.close()

    started = time.perf_counter()
    await asyncio.gather(*(one(u, p) for u, p in students))
    summary = latency_summary(s * 1000.0 for s in seconds)
    return {"logins": len(students), "succeeded": len(seconds), "errors": errors[:5], "error_count": len(errors),
            "concurrency": concurrency, "storm_s": round(time.perf_counter() - started, 1),
            "login_ms": summary}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    creds = Credentials.load(args.credentials)
    if len(creds.students) < args.students + args.logins:
        raise LoadgenError(f"{args.credentials} holds {len(creds.students)} students; --students {args.students} "
                           f"+ --logins {args.logins} are needed")
    with tempfile.TemporaryDirectory() as tmp:
        streaming = Path(tmp) / "streaming-credentials.json"
        Credentials(creds.exam_id, creds.students[:args.students], creds.server).dump(streaming)
        figures = Path(tmp) / "streams.json"
        command = [sys.executable, str(ROOT / "benchmarks" / "loadgen.py"), "--url", args.url,
                   "--credentials", str(streaming), "--students", str(args.students), "--fps", str(args.fps),
                   "--changed", str(args.changed), "--duration", str(args.duration), "--warmup", str(args.warmup),
                   "--json", str(figures)]
        if args.metrics_token:
            command += ["--metrics-token", args.metrics_token]
        streams = await asyncio.create_subprocess_exec(*command, stdout=subprocess.DEVNULL)
        probe = ServerProbe(args.url, args.metrics_token)
        storm: dict[str, Any] | None = None
        try:
            if args.logins:
                await wait_for_streams(probe, args.students, timeout_s=300.0)
                await asyncio.sleep(args.storm_after)
                storm = await login_storm(args.url, creds.students[args.students:args.students + args.logins],
                                          args.concurrency)
            if await streams.wait() != 0:
                raise LoadgenError(f"the load generator failed (exit {streams.returncode}); run it alone to see why")
        finally:
            await probe.close()
            if streams.returncode is None:
                streams.kill()
                await streams.wait()
        result = json.loads(figures.read_text())
    keep = ("students", "fps_per_student", "changed_share", "offered_fps", "processed_fps", "latency_ms", "dropped",
            "errors", "server")
    return {"streams": {k: result.get(k) for k in keep}, "storm": storm,
            "storm_after_s": args.storm_after if storm else None,
            "machine": describe_machine()}


def main() -> int:
    args = build_parser().parse_args()
    try:
        report = asyncio.run(run(args))
    except LoadgenError as exc:
        print(f"login_storm: {exc}", file=sys.stderr)
        return 2
    s, storm = report["streams"], report["storm"]
    print(f"{s['students']} students streaming: processed {s['processed_fps']} of {s['offered_fps']} frames/s, "
          f"latency ms {s['latency_ms']}, dropped {s['dropped'] or 0}")
    if storm:
        print(f"{storm['succeeded']} of {storm['logins']} logins ({storm['concurrency']} at a time) in "
              f"{storm['storm_s']} s; login ms {storm['login_ms']}; errors {storm['error_count']}")
    if args.json:
        write_result(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
