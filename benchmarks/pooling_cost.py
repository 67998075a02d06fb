"""What the avg_max2x2 pooling costs next to avg: ONNX backbone pass per batch and the stacked heads' product.

Runs the bundled backbone's ONNX graph with each pooling on the same uint8 batch, alternating the two
poolings repeat by repeat so that load from other processes hits both alike, and times the matrix
product of 7 stacked logistic heads (the demo heads' count) on 1280 vs 6400 features.

Usage: PYTHONPATH=. .venv/bin/python benchmarks/pooling_cost.py [--batch 16] [--repeats 15]
Prints JSON and writes benchmarks/results/pooling_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import describe as describe_machine, write_result  # noqa: E402
from proctor.models import backbone as bb  # noqa: E402
from proctor.models.engine import _OnnxRunner  # noqa: E402
from proctor.models.heads import HeadStack, make_head  # noqa: E402

POOLINGS = ("avg", "avg_max2x2")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (the server uses 1 per worker)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pooling_cost.json"))
    args = parser.parse_args()
    cache = Path(tempfile.mkdtemp(prefix="proctor-pooling-"))
    backbone = bb.load_backbone("bundled", cache)
    p = backbone.spec.preprocessing
    rng = np.random.default_rng(0)
    batch = torch.from_numpy(rng.integers(0, 256, (args.batch, p.height, p.width, 3), dtype=np.uint8))
    runners = {name: _OnnxRunner(backbone, p, name, cache, args.threads) for name in POOLINGS}
    for runner in runners.values():
        runner(batch)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in POOLINGS}
    load_before = os.getloadavg()
    for _ in range(args.repeats):
        for name, runner in runners.items():
            start = time.perf_counter()
            runner(batch)
            times[name].append(time.perf_counter() - start)
    heads_ms = {}
    for name in POOLINGS:
        dim = bb.feature_dim(p, name)
        spec = bb.BackboneSpec(backbone.weights_hash, p, name)
        stack = HeadStack.build([make_head(f"h{i}", "P", "logistic", {"weight": rng.standard_normal((1, dim)),
                                                                      "bias": [0.0]}, spec) for i in range(7)])
        features = torch.from_numpy(rng.standard_normal((args.batch, dim)).astype(np.float32))
        stack.apply(features)
        samples = []
        for _ in range(200):
            start = time.perf_counter()
            stack.apply(features)
            samples.append(time.perf_counter() - start)
        heads_ms[name] = round(1000 * statistics.median(samples), 4)
    medians = {name: statistics.median(t) for name, t in times.items()}
    result = {"benchmark": "pooling_cost", "backbone": backbone.spec.source, "input": f"{p.width}x{p.height}",
              "batch": args.batch, "repeats": args.repeats, "onnx_threads": args.threads,
              "backbone_batch_ms_median": {k: round(1000 * v, 2) for k, v in medians.items()},
              "backbone_images_per_s": {k: round(args.batch / v, 1) for k, v in medians.items()},
              "avg_max2x2_over_avg": round(medians["avg_max2x2"] / medians["avg"], 4),
              "seven_heads_ms_median": heads_ms,
              # Other processes share these CPUs; the load average says how far the figures can be trusted.
              "load_average_before": [round(v, 2) for v in load_before],
              "load_average_after": [round(v, 2) for v in os.getloadavg()],
              "machine": describe_machine(torch=torch.__version__)}
    print(json.dumps(result, indent=2))
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
