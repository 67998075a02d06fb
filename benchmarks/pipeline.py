#!/usr/bin/env python3
"""Throughput of the frame path, in one process and one run (a script, not a test).

Measures, on the same frames:
  backbone_fps  the shared backbone alone (with the pooling new heads are trained with) on pre-decoded
                frames at --batch: the best of several layouts (one single-threaded batch per core at once,
                as the server runs, or one batch at a time on every core; each with ONNX Runtime called on
                slices of 1, 2, 4 frames or the whole batch, see --cpu-batch) and, for comparison, every
                other runtime it can run;
  pipeline_fps  the whole path: JPEG decode + change-detection thumbnail (thread pool) + dynamic batcher + backbone + all heads
                as one matmul + whitelist verdict per frame;
  naive_fps     how one-model-per-program servers work: decode, then one full eager-PyTorch
                MobileNetV2 classifier per allowed program, per frame, at batch size 1.

    python benchmarks/pipeline.py --json benchmarks/results/pipeline-cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torchvision

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe as describe_machine, write_result  # noqa: E402
from proctor.batching import decode  # noqa: E402
from proctor.batching.batcher import DynamicBatcher  # noqa: E402
from proctor.config import Config  # noqa: E402
from proctor.models.backbone import BackboneSpec, feature_dim  # noqa: E402
from proctor.models.engine import Engine  # noqa: E402
from proctor.models.heads import make_head  # noqa: E402
from proctor.models.training import DEFAULT_POOLING  # noqa: E402
from proctor.server import decode_threads  # noqa: E402
from proctor.sessions import cheap_to_decode  # noqa: E402
from proctor.whitelist import Policy, judge  # noqa: E402


def load_frames(images: Path | None, count: int, width: int, quality: float) -> tuple[list[bytes], str]:
    """JPEGs as students send them (`width` wide at most): the captured screenshots, else synthetic screens."""
    files = sorted(images.rglob("*.jpg")) if images and images.is_dir() else []
    frames: list[bytes] = []
    if files:
        for path in files[:count]:
            data = path.read_bytes()
            shot_width, shot_height = decode.read_size(data)
            if shot_width > width:
                data = decode.page_jpeg(decode.decode_rgb(data, (shot_width, shot_height)), width, quality)
            frames.append(data)
        source = f"{len(frames)} screenshots from {images}, {width} wide at most"
    rng = np.random.default_rng(0)
    while len(frames) < count:
        # Window-like blocks of flat colour with text-like noise: compresses like a real screen.
        pixels = np.full((720, 1280, 3), rng.integers(200, 255), np.uint8)
        for _ in range(6):
            x, y = rng.integers(0, 1000), rng.integers(0, 500)
            pixels[y:y + 200, x:x + 280] = rng.integers(0, 255, 3)
            pixels[y + 20:y + 180:12, x + 10:x + 270] = rng.integers(0, 80, (14, 260, 3))
        frames.append(decode.page_jpeg(pixels, width, quality))
    if not files:
        source = "synthetic screens (no screenshots found)"
    return frames, source


def served_spec(engine: Engine) -> BackboneSpec:
    """The default backbone with the pooling new heads are trained with: the graph the server runs for them."""
    return dataclasses.replace(engine.backbone, pooling=DEFAULT_POOLING)


def make_heads(engine: Engine, count: int) -> None:
    spec = served_spec(engine)
    rng = np.random.default_rng(1)
    features = feature_dim(spec.preprocessing, spec.pooling)
    heads = [make_head(f"program{i}", f"Program {i}", "logistic",
                       {"weight": rng.normal(0, 0.05, (1, features)).astype(np.float32),
                        "bias": np.zeros(1, np.float32)}, spec)
             for i in range(count)]
    engine.set_heads(heads)


WHOLE_BATCH = 1024  # cpu_batch at its maximum: every batch in one ONNX Runtime call


def backbone_engines(config: Config) -> list[Engine]:
    """The layouts backbone_fps is the best of, the server's own (`config`) first.

    Layouts: one single-threaded batch per core at once (the server's) and one batch at a time on every core,
    each calling ONNX Runtime on slices of `config.cpu_batch`, 1, 2 or 4 frames or the whole batch: which is
    fastest depends on the CPU's cache, so the baseline does not assume the server's choice.
    """
    engine = Engine.from_config(config)
    if engine.runtime != "onnx":
        return [engine]
    others = [(config.inference_workers, size) for size in (1, 2, 4, WHOLE_BATCH) if size != config.cpu_batch]
    if engine.workers > 1:
        others += [(1, size) for size in dict.fromkeys([config.cpu_batch, WHOLE_BATCH])]
    return [engine] + [Engine.from_config(config.replace(inference_workers=workers, cpu_batch=size))
                       for workers, size in others]


def layout_name(engine: Engine) -> str:
    """'2x1/2': batches at once x threads each / frames per ONNX Runtime call ('all': the whole batch)."""
    size = engine.cpu_batch
    return f"{engine.workers}x{engine.threads}/{'all' if size is None or size >= WHOLE_BATCH else size}"


def time_backbone(engine: Engine, frames: list[np.ndarray], batch: int, seconds: float) -> float:
    """Frames/s of the backbone alone, with engine.workers threads each running batches back to back."""
    spec = served_spec(engine)
    engine.features(frames[:batch], spec, batch_size=batch)  # warm-up (runtime build, allocator)
    done = [0] * engine.workers
    started = time.perf_counter()

    def work(worker: int) -> None:
        while time.perf_counter() - started < seconds:
            engine.features(frames[:batch], spec, batch_size=batch)
            done[worker] += batch

    threads = [threading.Thread(target=work, args=(i,)) for i in range(engine.workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.perf_counter() - started)


async def time_pipeline(engine: Engine, jpegs: list[bytes], batch: int, total: int, decode_threads: int) -> float:
    policy = Policy(frozenset({"program0", "program1"}))
    decode_pool = ThreadPoolExecutor(max(1, decode_threads))
    infer_pool = ThreadPoolExecutor(engine.workers)
    size = engine.frame_size

    def infer(frames):
        scores = engine.classify(frames)
        return [judge(scores.row(i), scores.heads, policy) for i in range(len(frames))]

    batcher = DynamicBatcher(prepare=None, infer=infer, decode_executor=decode_pool, infer_executor=infer_pool,
                             max_batch=batch, max_wait_s=0.01, max_queue=total + 1, infer_workers=engine.workers)
    batcher.start()
    loop = asyncio.get_running_loop()

    async def frame(key, jpeg: bytes):
        # As a session does: one decode in the thread pool gives the change-detection thumbnail and
        # the pixels it then submits.
        if decode_threads == 0 and cheap_to_decode(jpeg, *decode.read_size(jpeg)):  # on the loop, as the server
            pixels, _thumb = decode.decode_with_thumbnail(jpeg, size)
        else:
            pixels, _thumb = await loop.run_in_executor(decode_pool, decode.decode_with_thumbnail, jpeg, size)
        return await batcher.submit(key, pixels)

    # Warm-up batch, then the timed run: every frame from its own session, all offered at once,
    # so the batcher runs full batches and decode of the next overlaps inference.
    await asyncio.gather(*(frame(("warm", i), jpegs[i % len(jpegs)]) for i in range(batch)))
    started = time.perf_counter()
    verdicts = await asyncio.gather(*(frame(i, jpegs[i % len(jpegs)]) for i in range(total)))
    elapsed = time.perf_counter() - started
    await batcher.close()
    decode_pool.shutdown()
    infer_pool.shutdown()
    assert len(verdicts) == total
    return total / elapsed


def time_naive(jpegs: list[bytes], programs: int, frames: int, size: tuple[int, int]) -> float:
    models = [torchvision.models.mobilenet_v2(weights=None, num_classes=2).eval() for _ in range(programs)]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def one(jpeg: bytes) -> None:
        pixels = decode.decode_rgb(jpeg, size)
        x = (torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0).float() / 255 - mean) / std
        with torch.inference_mode():
            for model in models:
                torch.softmax(model(x), dim=1)

    one(jpegs[0])
    started = time.perf_counter()
    for i in range(frames):
        one(jpegs[i % len(jpegs)])
    return frames / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--heads", type=int, default=4, help="heads loaded (= programs of the naive baseline)")
    parser.add_argument("--frames", type=int, default=640, help="frames through the full pipeline")
    parser.add_argument("--naive-frames", type=int, default=24)
    parser.add_argument("--seconds", type=float, default=8.0, help="time per backbone measurement")
    parser.add_argument("--images", type=Path, default=ROOT / "data" / "screens")
    parser.add_argument("--client-width", type=int, default=Config().client_max_width,
                        help="frame width, as the student page sends them (default: the server's, %(default)s)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backbone-weights", default="bundled")
    parser.add_argument("--data-dir", default=str(ROOT / "var"))
    args = parser.parse_args()

    config = Config(device=args.device, backbone_weights=args.backbone_weights, data_dir=args.data_dir)
    engine, *other_layouts = backbone_engines(config)
    make_heads(engine, args.heads)
    jpegs, source = load_frames(args.images, 64, args.client_width, config.client_jpeg_quality)
    size = engine.frame_size
    decoded = [decode.decode_rgb(j, size) for j in jpegs]
    while len(decoded) < args.batch:
        decoded += decoded
    print(f"engine: {engine.describe()}", flush=True)

    # Every layout backbone_engines lists, the server's first: the baseline is the best of them.
    by_layout = {layout_name(e): time_backbone(e, decoded, args.batch, args.seconds) for e in (engine, *other_layouts)}
    del other_layouts
    for layout, fps in by_layout.items():
        print(f"backbone {engine.runtime}, {layout} (batches at once x threads each / frames per call): "
              f"{fps:.1f} frames/s", flush=True)
    by_runtime = {engine.runtime: max(by_layout.values())}
    other_runtimes = ["torch"] if engine.runtime == "onnx" else []
    for runtime in other_runtimes:
        other = Engine.from_config(config, runtime=runtime)
        by_runtime[runtime] = time_backbone(other, decoded, args.batch, args.seconds)
        print(f"backbone {runtime}: {by_runtime[runtime]:.1f} frames/s", flush=True)
        del other

    threads = decode_threads(config, engine)
    pipeline_fps = asyncio.run(time_pipeline(engine, jpegs, args.batch, args.frames, threads))
    print(f"pipeline: {pipeline_fps:.1f} frames/s", flush=True)
    naive_fps = time_naive(jpegs, args.heads, args.naive_frames, size)
    print(f"naive ({args.heads} full classifiers per frame, batch 1): {naive_fps:.2f} frames/s", flush=True)

    result = {
        "device": str(engine.device), "runtime": engine.runtime, "heads": args.heads, "batch_size": args.batch,
        "input_size": list(size), "frames": source,
        "backbone_fps": round(by_runtime[engine.runtime], 2), "pipeline_fps": round(pipeline_fps, 2),
        "naive_fps": round(naive_fps, 3), "speedup_vs_naive": round(pipeline_fps / naive_fps, 2),
        "pipeline_vs_backbone": round(pipeline_fps / by_runtime[engine.runtime], 3),
        "backbone_fps_by_runtime": {k: round(v, 2) for k, v in by_runtime.items()},
        "backbone_fps_by_layout": {k: round(v, 2) for k, v in by_layout.items()},
        "server_layout": layout_name(engine),
        "machine": describe_machine(torch=torch.__version__,
                                    gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        write_result(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
