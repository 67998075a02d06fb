"""Backbone throughput: images/s at 320x180, batch 32, ONNX Runtime vs eager torch, plus the stacked heads' cost.

Usage: python benchmarks/backbone.py [--batch 32] [--repeats 10] [--out benchmarks/results/backbone.json]
Uses the bundled backbone (converted once into a temporary cache). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine import write_result  # noqa: E402
from proctor.models import backbone as bb  # noqa: E402
from proctor.models.engine import Engine  # noqa: E402
from proctor.models.heads import HeadStack, make_head  # noqa: E402


def _time(fn, repeats: int) -> list[float]:
    fn()  # warm-up: first runs allocate and pick kernels
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _heads(spec, count: int):
    rng = np.random.default_rng(0)
    return [make_head(f"h{i}", f"P{i}", "logistic", {"weight": rng.standard_normal((1, 1280)) * 0.05,
                                                     "bias": [0.0]}, spec) for i in range(count)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "backbone.json")
    args = parser.parse_args()

    cache = Path(tempfile.mkdtemp(prefix="proctor-bench-"))
    backbone = bb.load_backbone("bundled", cache)
    p = backbone.spec.preprocessing
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (p.height, p.width, 3), dtype=np.uint8) for _ in range(args.batch)]
    # What a runner takes: the uint8 NHWC batch (each runtime does the preprocessing itself).
    batch = bb.frames_to_batch(frames, (p.width, p.height))
    results = {"input": f"{p.width}x{p.height}", "batch": args.batch, "repeats": args.repeats,
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
               # Other processes share these CPUs; the load average says how much the figures can be trusted.
               "load_average_before": list(os.getloadavg()), "runtimes": {}}
    import onnxruntime

    results["onnxruntime"] = onnxruntime.__version__
    for runtime in ("onnx", "torch"):
        engine = Engine(bb.BackboneLibrary([backbone]), device="cpu", runtime=runtime, cache_dir=cache)
        engine.set_heads(_heads(backbone.spec, 20))
        runner = engine._state.groups[0].runner
        backbone_times = _time(lambda: runner(batch), args.repeats)
        classify_times = _time(lambda: engine.classify(frames), args.repeats)
        results["runtimes"][runtime] = {
            "backbone_images_per_s": args.batch / statistics.median(backbone_times),
            "backbone_batch_ms_median": 1000 * statistics.median(backbone_times),
            "classify_20_heads_images_per_s": args.batch / statistics.median(classify_times),
            "classify_batch_ms_median": 1000 * statistics.median(classify_times),
        }
    results["onnx_speedup"] = (results["runtimes"]["onnx"]["backbone_images_per_s"]
                               / results["runtimes"]["torch"]["backbone_images_per_s"])

    features = torch.from_numpy(rng.standard_normal((args.batch, 1280)).astype(np.float32))
    results["stacked_heads_ms"] = {}
    for count in (1, 20, 200):
        stack = HeadStack.build(_heads(backbone.spec, count))
        results["stacked_heads_ms"][str(count)] = 1000 * statistics.median(
            _time(lambda: stack.apply(features), args.repeats * 10))

    for runtime, r in results["runtimes"].items():
        print(f"{runtime:>5}: backbone {r['backbone_images_per_s']:7.1f} images/s "
              f"({r['backbone_batch_ms_median']:.0f} ms per batch of {args.batch} at {results['input']}); "
              f"classify with 20 heads {r['classify_20_heads_images_per_s']:7.1f} images/s")
    print(f"ONNX Runtime / eager torch: {results['onnx_speedup']:.2f}x on {os.cpu_count()} CPUs")
    print("stacked heads on a batch's features: " + ", ".join(
        f"{k} heads {v:.3f} ms" for k, v in results["stacked_heads_ms"].items()))
    results["load_average_after"] = list(os.getloadavg())
    print(f"load average before/after: {results['load_average_before'][0]:.1f} / "
          f"{results['load_average_after'][0]:.1f} (on {os.cpu_count()} CPUs)")
    write_result(args.out, results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
