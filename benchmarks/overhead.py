#!/usr/bin/env python3
"""What everything but the model costs per frame: the server with the backbone's CPU replaced by sleep.

benchmarks/loadgen.py measures how many frames/s a server processes; this says where the CPU that does
not go to the model goes, without the model's threads competing for the cores and the caches. It starts
`proctor serve` (a subprocess, with the given flags) whose engine scores each distinct frame once for real,
so verdicts, alerts and evidence requests are the ones a real run has, and then answers every batch after
sleeping as long as the backbone would take (`--backbone-fps`, the backbone-only rate of
benchmarks/pipeline.py split over the engine's workers): the batches keep their real sizes and timing but
hold no CPU. It runs the load generator against it (a subprocess) and reads every server thread's CPU time
from /proc over the steady part of the run.

It prints and writes JSON: cores and milliseconds of CPU per classified frame for the event loop, the
decode threads, the model threads (what is left of them: batching glue), the store's thread and the rest,
plus the load generator's own CPU per frame, and the ceiling these put on processed / backbone-only frames/s
on this machine when every frame goes to the model:

    ceiling = 1 / (1 + overhead_s_per_frame x backbone_fps / cores)

(the baseline spends all `cores` on the backbone; the server also spends `overhead` per frame).

The ceiling is conservative: with the model asleep the cores idle most of the time, and on a virtual
machine work done right after an idle costs more CPU than on a busy core (benchmarks/decode_handoff.py:
a frame's decode 0.61 ms paced at 200/s against 0.49 ms back to back on the 2-core test machine).

    python benchmarks/overhead.py --credentials var/loadgen-creds.json --backbone-json \\
        benchmarks/results/pipeline-cpu.json --students 200 --json benchmarks/results/overhead/all-changed.json \\
        -- --database-url sqlite:///var/bench.db --client-fps 1

Linux only (/proc). Everything after `--` goes to `proctor serve` (give it --client-fps >= --fps).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.loadgen import LoadgenError, ServerProbe, _total, read_backbone_fps  # noqa: E402
from benchmarks.machine import describe as describe_machine, write_result  # noqa: E402

# Thread names (threading's, published by the served process) -> the groups reported.
GROUPS = (("event_loop", ("MainThread",)), ("decode", ("decode",)), ("model", ("inference",)),
          ("store", ("_connection_worker_thread",)))


class SleepingClassifier:
    """The real engine for what a frame scores (once per distinct frame), sleep for what a batch costs.

    A frame is known by a sample of its pixels: the load generator sends a pool of pre-encoded screens,
    so after the first round every batch is answered from the cache after `per_frame_s` x its size of
    sleep, which holds the GIL no more than time.sleep does.
    """

    def __init__(self, real: Any, per_frame_s: float) -> None:
        self.real = real
        self.per_frame_s = per_frame_s
        self._scores: dict[bytes, Any] = {}
        self._lock = threading.Lock()
        self.scored = 0  # frames the real engine scored

    @property
    def frame_size(self) -> tuple[int, int]:
        return self.real.frame_size

    @property
    def heads(self) -> Any:
        return self.real.heads

    @property
    def workers(self) -> int:
        return self.real.workers

    def set_heads(self, records: Any, strict: bool = True) -> None:
        with self._lock:
            self._scores.clear()
        self.real.set_heads(records, strict=strict)

    def classify(self, frames: Sequence[Any]) -> Any:
        import numpy as np

        from proctor.models.interface import Scores

        keys = [np.ascontiguousarray(frame[::9, ::9]).tobytes() for frame in frames]
        with self._lock:
            missing = [i for i, key in enumerate(keys) if key not in self._scores]
        if missing:
            scores = self.real.classify([frames[i] for i in missing])
            with self._lock:
                for row, i in enumerate(missing):
                    self._scores[keys[i]] = scores.values[row]
                self.scored += len(missing)
        time.sleep(self.per_frame_s * (len(frames) - len(missing)))
        with self._lock:
            values = np.stack([self._scores[key] for key in keys])
        return Scores(self.real.heads, values)


def serve_sleeping(backbone_fps: float, names_path: Path, serve_args: list[str]) -> int:
    """`proctor serve` with a SleepingClassifier; publishes {native thread id: name} to names_path every second."""
    from proctor import cli
    from proctor.models import engine as engine_module

    real_from_config = engine_module.Engine.from_config

    def sleeping_from_config(config: Any) -> SleepingClassifier:
        real = real_from_config(config)
        return SleepingClassifier(real, per_frame_s=real.workers / backbone_fps)

    engine_module.Engine.from_config = staticmethod(sleeping_from_config)  # type: ignore[method-assign]

    def publish_names() -> None:
        while True:
            names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
            tmp = names_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(names))
            os.replace(tmp, names_path)
            time.sleep(1.0)

    threading.Thread(target=publish_names, name="thread-names", daemon=True).start()
    return cli.main(["serve", *serve_args])


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """User + system CPU seconds of every thread of a process, by native thread id."""
    tick = os.sysconf("SC_CLK_TCK")
    seconds = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue  # the thread ended meanwhile
        fields = stat[stat.rindex(")") + 2:].split()
        seconds[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return seconds


def group_of(name: str) -> str:
    for group, markers in GROUPS:
        if any(marker in name for marker in markers):
            return group
    return "other"


def per_group(before: dict[int, float], after: dict[int, float], names: dict[int, str], seconds: float
              ) -> dict[str, float]:
    """Cores each group of threads kept busy between two readings."""
    cores = {group: 0.0 for group, _ in GROUPS} | {"other": 0.0}
    for tid, cpu in after.items():
        cores[group_of(names.get(tid, ""))] += (cpu - before.get(tid, 0.0)) / seconds
    return cores


def steady_window(samples: Sequence[tuple[float, float, Any]], offered_fps: float, warmup_s: float) -> tuple[int, int]:
    """Indices of the first and last sample of the steady part of a run.

    `samples` are (time, frames classified so far, ...) a second apart. Steady: from `warmup_s` after the
    first second in which at least 90% of the offered frames were classified, to 2 s before the last such
    second (students stop one by one at the end).
    """
    busy = [i for i in range(len(samples) - 1)
            if (samples[i + 1][1] - samples[i][1]) / (samples[i + 1][0] - samples[i][0]) >= 0.9 * offered_fps]
    if not busy:
        raise LoadgenError(f"the server never classified 90% of the {offered_fps} frames/s offered in a second: "
                           "it is not keeping up even without the model's CPU (or the run was too short)")
    start, end = samples[busy[0]][0] + warmup_s, samples[busy[-1] + 1][0] - 2.0
    inside = [i for i, sample in enumerate(samples) if start <= sample[0] <= end]
    if len(inside) < 6:
        raise LoadgenError(f"the steady part of the run ({end - start:.0f} s after the warm-up) is too short to "
                           "measure: give a longer --duration")
    return inside[0], inside[-1]


def ceiling(overhead_ms_per_frame: float, backbone_fps: float, cores: int) -> float:
    """The highest processed / backbone-only ratio `overhead` per frame allows when every frame is classified."""
    return 1.0 / (1.0 + overhead_ms_per_frame / 1000.0 * backbone_fps / cores)


async def wait_ready(probe_url: str, server: subprocess.Popen, timeout_s: float = 300.0) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise LoadgenError(f"the server exited with {server.returncode}; see its log")
            try:
                async with session.get(probe_url + "/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(1.0)
    raise LoadgenError(f"the server was not ready within {timeout_s:.0f} s")


async def classified(probe: ServerProbe) -> float:
    scraped = await probe.scrape()
    if scraped is None:
        raise LoadgenError(probe.problem or "cannot read /metrics")
    return _total(scraped[1], "proctor_frames_classified_total") or 0.0


async def measure(args: argparse.Namespace, backbone_fps: float) -> dict[str, Any]:
    url = f"http://127.0.0.1:{args.port}"
    with tempfile.TemporaryDirectory() as tmp:
        names_path, figures = Path(tmp) / "threads.json", Path(tmp) / "loadgen.json"
        log = open(Path(tmp) / "server.log", "w")
        server = subprocess.Popen([sys.executable, __file__, "--serve-sleeping", str(backbone_fps), str(names_path),
                                   "--", "--port", str(args.port), *args.serve_args], stdout=log, stderr=log)
        probe = ServerProbe(url, args.metrics_token)
        loadgen: asyncio.subprocess.Process | None = None
        try:
            await wait_ready(url, server)
            loadgen = await asyncio.create_subprocess_exec(
                sys.executable, str(ROOT / "benchmarks" / "loadgen.py"), "--url", url,
                "--credentials", str(args.credentials), "--students", str(args.students), "--fps", str(args.fps),
                "--changed", str(args.changed), "--duration", str(args.duration), "--warmup", str(args.warmup),
                "--json", str(figures), *(["--metrics-token", args.metrics_token] if args.metrics_token else []),
                stdout=subprocess.DEVNULL)
            # Every second: frames classified so far and each thread's CPU time. The window is chosen after
            # the run, from what the server did: the logins come first, and students join over seconds.
            samples: list[tuple[float, float, dict[int, float]]] = []
            while loadgen.returncode is None:
                samples.append((time.monotonic(), await classified(probe), thread_cpu_seconds(server.pid)))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(loadgen.wait(), 1.0)
            names = {int(k): v for k, v in json.loads(names_path.read_text()).items()}
            if loadgen.returncode != 0:
                raise LoadgenError(f"the load generator failed (exit {loadgen.returncode}); run it alone to see why")
            result = json.loads(figures.read_text())
        finally:
            await probe.close()
            if loadgen is not None and loadgen.returncode is None:
                loadgen.kill()
                await loadgen.wait()
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
            log.close()
    first, last = steady_window(samples, float(result["offered_fps"]), args.warmup)
    (t0, frames_before, cpu_before), (t1, frames_after, cpu_after) = samples[first], samples[last]
    elapsed = t1 - t0
    frames_per_s = (frames_after - frames_before) / elapsed
    cores = per_group(cpu_before, cpu_after, names, elapsed)
    ms_per_frame = {group: round(busy / frames_per_s * 1000.0, 3) for group, busy in cores.items()}
    loadgen_cores = (result.get("loadgen") or {}).get("cpu_cores") or 0.0
    ms_per_frame["load_generator"] = round(loadgen_cores / frames_per_s * 1000.0, 3)
    overhead_ms = sum(ms_per_frame.values())
    machine_cores = os.cpu_count() or 1
    return {
        "benchmark": "overhead", "students": args.students, "fps_per_student": args.fps, "changed_share": args.changed,
        "serve_args": args.serve_args, "window_s": round(elapsed, 1), "classified_fps": round(frames_per_s, 1),
        "offered_fps": result.get("offered_fps"), "dropped": result.get("dropped"),
        "evidence_sent": result.get("evidence_sent"),
        "cores": {group: round(busy, 3) for group, busy in cores.items()} | {"load_generator": loadgen_cores},
        "cpu_ms_per_frame": ms_per_frame, "overhead_ms_per_frame": round(overhead_ms, 3),
        "backbone_fps": backbone_fps, "ceiling_vs_backbone": round(ceiling(overhead_ms, backbone_fps, machine_cores), 3),
        "machine": describe_machine(),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--credentials", type=Path, required=True, help="loadgen --save-credentials file")
    p.add_argument("--backbone-fps", type=float, default=None, help="the backbone-only rate, frames/s")
    p.add_argument("--backbone-json", type=Path, default=None, help="...or a benchmarks/pipeline.py result")
    p.add_argument("--students", type=int, default=200)
    p.add_argument("--fps", type=float, default=1.0, help="frames/s per student (default %(default)s)")
    p.add_argument("--changed", type=float, default=1.0, help="share of changed frames (default %(default)s)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of streaming after the warm-up")
    p.add_argument("--warmup", type=float, default=10.0)
    p.add_argument("--port", type=int, default=8090)
    p.add_argument("--metrics-token", default=None)
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument("serve_args", nargs="*", help="after --: flags for proctor serve (--database-url, ...)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--serve-sleeping"]:  # the server subprocess this script starts
        backbone_fps, names_path, rest = float(argv[1]), Path(argv[2]), argv[3:]
        return serve_sleeping(backbone_fps, names_path, rest[1:] if rest[:1] == ["--"] else rest)
    args = build_parser().parse_args(argv)
    if not Path("/proc/self/task").is_dir():
        print("overhead: needs Linux (/proc) to read each thread's CPU time", file=sys.stderr)
        return 2
    try:
        if args.backbone_fps is None and args.backbone_json is None:
            raise LoadgenError("give --backbone-fps or --backbone-json (a benchmarks/pipeline.py result from "
                               "this machine)")
        backbone_fps = args.backbone_fps or read_backbone_fps(args.backbone_json)
        if backbone_fps <= 0:
            raise LoadgenError(f"--backbone-fps {backbone_fps} must be positive")
        report = asyncio.run(measure(args, backbone_fps))
    except LoadgenError as exc:
        print(f"overhead: {exc}", file=sys.stderr)
        return 2
    ms = report["cpu_ms_per_frame"]
    print(f"{report['students']} students x {report['fps_per_student']} frames/s ({report['changed_share']:.0%} "
          f"changed): {report['classified_fps']} frames/s classified over {report['window_s']} s, "
          f"{report['evidence_sent']} evidence copies in the run")
    print("CPU ms per classified frame, all but the model: " + ", ".join(f"{k} {v}" for k, v in ms.items())
          + f"; total {report['overhead_ms_per_frame']}")
    print(f"ceiling on processed / backbone-only ({report['backbone_fps']} frames/s on {os.cpu_count()} cores): "
          f"{report['ceiling_vs_backbone']}")
    if args.json:
        write_result(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
