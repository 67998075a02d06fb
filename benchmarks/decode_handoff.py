#!/usr/bin/env python3
"""What handing a frame's decode to a thread costs, against decoding it on the event loop, at a paced rate.

The server decodes each frame in a decode thread (run_in_executor) so the event loop stays free; a
thread hop wakes the decode thread and then the loop again. On a virtual machine an idle CPU waking up
is expensive, and at exam-hall rates (hundreds of frames/s, each arriving alone) nearly every frame pays
those wake-ups. This measures, for the server's own decode (decode_with_thumbnail at the model's size)
of browser-like frames made from the bundled screenshots, the CPU per frame of each thread when frames
come at --rate frames/s, three ways in one process, interleaved over --rounds:

- pacing: the loop only sleeps until each frame's time (the cost of waking at that rate at all);
- inline: the loop decodes each frame itself;
- thread: the loop hands each frame to a pool of --threads decode threads and awaits it (what the server does);
- back_to_back: the loop decodes the same number of frames without pausing (a CPU that never idles).

The last against `inline` shows what idling between frames costs the work itself. It matters for reading
benchmarks/overhead.py, whose server idles most of the time (its model sleeps instead of computing).

It prints and writes JSON (CPU ms per frame by thread group, medians over the rounds, and the machine).

    python benchmarks/decode_handoff.py --rate 200 --json benchmarks/results/decode-handoff.json

Linux only (per-thread CPU from /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import statistics
import sys
import threading
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe as describe_machine, write_result  # noqa: E402

WAYS = ("pacing", "inline", "thread", "back_to_back")


def thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds of this process's threads, summed by name ('decode_0' and 'decode_1' -> 'decode')."""
    tick = os.sysconf("SC_CLK_TCK")
    seconds: dict[str, float] = {}
    for thread in threading.enumerate():
        try:
            fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        group = "event_loop" if thread is threading.main_thread() else thread.name.rstrip("0123456789").rstrip("_")
        seconds[group] = seconds.get(group, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return seconds


def browser_frames(count: int, width: int, quality: float) -> list[bytes]:
    from PIL import Image
    import numpy as np

    from proctor.batching.decode import page_jpeg

    paths = sorted((ROOT / "data" / "screens").rglob("*.jpg"))[:count]
    if not paths:
        raise SystemExit("no screenshots under data/screens")
    return [page_jpeg(np.asarray(Image.open(p).convert("RGB")), width, quality) for p in paths]


async def paced(way: str, frames: list[bytes], rate: float, seconds: float, decode: Callable[[bytes], Any],
                pool: concurrent.futures.Executor) -> dict[str, float]:
    """CPU ms per frame by thread group for `seconds` of frames at `rate` handled `way`."""
    loop = asyncio.get_running_loop()
    count = max(1, int(rate * seconds))
    before = thread_cpu_seconds()
    start = loop.time()
    for i in range(count):
        frame = frames[i % len(frames)]
        if way == "inline":
            decode(frame)
        elif way == "thread":
            await loop.run_in_executor(pool, decode, frame)
        elif way == "back_to_back":
            decode(frame)
            continue
        await asyncio.sleep(max(0.0, start + (i + 1) / rate - loop.time()))
    after = thread_cpu_seconds()
    return {group: round((after[group] - before.get(group, 0.0)) / count * 1000, 3) for group in after
            if after[group] - before.get(group, 0.0) > 0}


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    from proctor.batching.decode import decode_with_thumbnail

    frames = browser_frames(args.frames, args.width, args.quality)
    size = (args.model_width, args.model_height)

    def decode(jpeg: bytes) -> Any:
        return decode_with_thumbnail(jpeg, size)

    pool = concurrent.futures.ThreadPoolExecutor(args.threads, thread_name_prefix="decode")
    try:
        for frame in frames[:8]:  # warm the pool's threads and the decoder
            await asyncio.get_running_loop().run_in_executor(pool, decode, frame)
        runs: dict[str, list[dict[str, float]]] = {way: [] for way in WAYS}
        for round_ in range(args.rounds):
            for way in WAYS:
                runs[way].append(await paced(way, frames, args.rate, args.seconds, decode, pool))
                print(f"round {round_ + 1} {way}: {runs[way][-1]}", file=sys.stderr)
    finally:
        pool.shutdown()
    median = {}
    for way, results in runs.items():
        groups = sorted({g for r in results for g in r})
        by_group = {g: statistics.median(r.get(g, 0.0) for r in results) for g in groups}
        median[way] = {"cpu_ms_per_frame": by_group, "total": round(sum(by_group.values()), 3)}
    return {"benchmark": "decode_handoff", "rate_fps": args.rate, "seconds_per_run": args.seconds,
            "rounds": args.rounds, "decode_threads": args.threads, "frame_width": args.width,
            "jpeg_quality": args.quality, "model_size": list(size),
            "frame_bytes_mean": round(sum(map(len, frames)) / len(frames)),
            "median": median, "runs": runs, "machine": describe_machine()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=200.0, help="frames/s (default %(default)s)")
    p.add_argument("--seconds", type=float, default=10.0, help="seconds per run (default %(default)s)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="decode threads (the server's --decode-threads)")
    p.add_argument("--frames", type=int, default=48, help="distinct screenshots to cycle through")
    p.add_argument("--width", type=int, default=640, help="frame width, as the page sends (default %(default)s)")
    p.add_argument("--quality", type=float, default=0.7, help="JPEG quality 0.1..1 (default %(default)s)")
    p.add_argument("--model-width", type=int, default=320)
    p.add_argument("--model-height", type=int, default=180)
    p.add_argument("--json", type=Path, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rate <= 0 or args.seconds <= 0 or args.rounds < 1 or args.threads < 1:
        raise SystemExit("--rate and --seconds must be positive, --rounds and --threads at least 1")
    import uvloop

    result = uvloop.run(measure(args))
    for way in WAYS:
        m = result["median"][way]
        print(f"{way:7s} {m['total']:.3f} ms CPU/frame  " +
              "  ".join(f"{g} {v:.3f}" for g, v in m["cpu_ms_per_frame"].items()))
    median = result["median"]
    print(f"thread hop vs inline: {median['thread']['total'] - median['inline']['total']:+.3f} ms CPU/frame; "
          f"inline minus pacing vs back to back: {median['inline']['total'] - median['pacing']['total']:.3f} vs "
          f"{median['back_to_back']['total']:.3f} ms per decode, at {args.rate:g} frames/s")
    if args.json:
        write_result(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
