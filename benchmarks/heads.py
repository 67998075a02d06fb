"""Accuracy of the demo heads on held-out screenshots, and the false-alert rate of a two-head whitelist.

The held-out set (data/screens-heldout, captured by scripts/capture-screens --split heldout) has other
files AND other screen resolutions/window sizes than the training set the demo heads were trained on.
--heldout may be given more than once (e.g. a larger split captured with another seed at other resolutions):
heads are judged on all the folders together, and on each one apart (`by_split`). Every wrong decision is
listed by file (`missed`, `accepted`), so a result can be checked by looking at the screenshots.
Each head is judged at its own stored threshold: positives = its program's held-out frames, negatives =
every other program's. The whitelist check allows two programs; a frame alerts when no allowed head
scores at or above its threshold (per frame, without the server's smoothing over recent frames):
an alert on an allowed program's frame is a false alert, no alert on another program's frame is a miss.

Frames are judged as the server gets them: scaled to --client-width (default: the server's --client-max-width)
by the student page, JPEG-encoded, decoded by DCT scaling to the model input.

Usage: PYTHONPATH=. .venv/bin/python benchmarks/heads.py [--heldout DIR ...] [--allow geany,mupdf]
Prints JSON and writes it to benchmarks/results/heads.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import describe as describe_machine, write_result  # noqa: E402
from proctor.config import Config  # noqa: E402
from proctor.models.backbone import load_backbone  # noqa: E402
from proctor.models.demo import DEMO_HEADS_DIR  # noqa: E402
from proctor.models.heads import HeadStack, read_head_file  # noqa: E402
from proctor.models.training import FeatureCache, read_images, evaluate, features, list_images  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heldout", type=Path, action="append",
                        help="a held-out folder of program folders; repeat for several (default: data/screens-heldout)")
    parser.add_argument("--allow", default="geany,mupdf", help="the two (or more) heads of the whitelist")
    parser.add_argument("--cache-dir", type=Path, default=Path("var/cache"))
    parser.add_argument("--backbone-weights", default="bundled")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/heads.json"))
    parser.add_argument("--heads-dir", type=Path, default=DEMO_HEADS_DIR,
                        help="head files to judge (default: the demo heads)")
    parser.add_argument("--client-width", type=int, default=Config().client_max_width,
                        help="frames are judged as the server gets them: scaled to this width by the student "
                             "page, JPEG-encoded, DCT-decoded (default: the server's, %(default)s)")
    args = parser.parse_args()

    heads = [read_head_file(p) for p in sorted(args.heads_dir.glob("*.safetensors"))]
    if not heads:
        print(f"benchmarks/heads.py: no head files in {args.heads_dir}", file=sys.stderr)
        return 2
    splits = args.heldout or [Path("data/screens-heldout")]
    for split in splits:
        if not split.is_dir() or not any(p.is_dir() for p in split.iterdir()):
            print(f"benchmarks/heads.py: {split}: no program folders", file=sys.stderr)
            return 2
    backbone = load_backbone(args.backbone_weights, args.cache_dir)
    for head in heads:
        if head.backbone_hash != backbone.weights_hash:
            print(f"benchmarks/heads.py: head {head.name} needs backbone {head.backbone_hash[:12]}, "
                  f"{args.backbone_weights} is {backbone.weights_hash[:12]}", file=sys.stderr)
            return 2
    programs, images, split_of = [], [], []
    for split in splits:
        for folder in sorted(p for p in split.iterdir() if p.is_dir()):
            found = read_images(list_images(folder, "held-out"), "held-out")
            images += found
            programs += [folder.name] * len(found)
            split_of += [str(split)] * len(found)
    programs_arr, split_arr = np.array(programs), np.array(split_of)
    files = np.array([image.label for image in images])
    start = time.monotonic()

    def served_features(pooling: str) -> np.ndarray:
        cache = FeatureCache(args.cache_dir / "features", backbone, pooling, args.client_width,
                             Config().client_jpeg_quality)
        return features(images, 1, backbone, cache)[:, 0]

    scores = head_scores(heads, len(images), served_features)
    feature_s = time.monotonic() - start

    per_head = {}
    for j, head in enumerate(heads):
        labels = (programs_arr == head.name).astype(int)
        if labels.sum() == 0:
            per_head[head.name] = {"error": f"no held-out folder {head.name} in {', '.join(map(str, splits))}"}
            continue
        passed = scores[:, j] >= head.threshold
        per_head[head.name] = {
            "program": head.program, "threshold": round(head.threshold, 6),
            "positives": int(labels.sum()), "negatives": int((1 - labels).sum()),
            **evaluate(scores[:, j], labels, head.threshold),
            "missed": _listed(files, scores[:, j], (labels == 1) & ~passed),
            "accepted": _listed(files, scores[:, j], (labels == 0) & passed),
            "by_split": {str(split): evaluate(scores[split_arr == str(split), j],
                                              labels[split_arr == str(split)], head.threshold)
                         for split in splits} if len(splits) > 1 else {}}

    allowed = [a for a in args.allow.split(",") if a]
    index = {h.name: j for j, h in enumerate(heads)}
    unknown = [a for a in allowed if a not in index]
    if unknown:
        print(f"benchmarks/heads.py: --allow names unknown heads {', '.join(unknown)}", file=sys.stderr)
        return 2
    accepted = np.zeros(len(images), bool)
    for name in allowed:
        accepted |= scores[:, index[name]] >= heads[index[name]].threshold
    alert = ~accepted
    is_allowed = np.isin(programs_arr, allowed)
    whitelist = {"allowed": allowed, "allowed_frames": int(is_allowed.sum()),
                 "false_alert_files": [str(f) for f in files[alert & is_allowed]],
                 "missed_files": [str(f) for f in files[~alert & ~is_allowed]],
                 "other_frames": int((~is_allowed).sum()),
                 "false_alerts": int((alert & is_allowed).sum()),
                 "false_alert_rate": round(float((alert & is_allowed).sum() / max(1, is_allowed.sum())), 4),
                 "missed": int((~alert & ~is_allowed).sum()),
                 "miss_rate": round(float((~alert & ~is_allowed).sum() / max(1, (~is_allowed).sum())), 4)}
    resolutions = sorted({r for split in splits for r in _resolutions(split)})
    result = {"benchmark": "heads", "heldout": [str(split) for split in splits], "heldout_resolutions": resolutions,
              "frames_by_split": {str(split): int((split_arr == str(split)).sum()) for split in splits},
              "frames": len(images), "backbone": backbone.spec.source, "backbone_hash": backbone.weights_hash,
              "input": f"{backbone.spec.preprocessing.width}x{backbone.spec.preprocessing.height}",
              "client_width": args.client_width,
              "poolings": sorted({h.pooling for h in heads}),
              "feature_seconds": round(feature_s, 2), "heads": per_head, "whitelist": whitelist,
              "min_balanced_accuracy": min((h.get("balanced_accuracy", 0.0) for h in per_head.values()), default=0.0),
              "machine": describe_machine(torch=torch.__version__, torch_threads=torch.get_num_threads())}
    print(json.dumps(result, indent=2))
    write_result(args.out, result)
    return 0


def head_scores(heads: list, count: int, features_for: Callable[[str], np.ndarray]) -> np.ndarray:
    """Scores [count, len(heads)]: heads of one pooling share one backbone pass (`features_for(pooling)`), as in
    the engine."""
    scores = np.zeros((count, len(heads)), np.float32)
    for pooling in sorted({h.pooling for h in heads}):
        columns = [j for j, h in enumerate(heads) if h.pooling == pooling]
        stack = HeadStack.build([heads[j] for j in columns])
        scores[:, columns] = stack.apply(torch.from_numpy(features_for(pooling))).numpy()
    return scores


def _listed(files: np.ndarray, scores: np.ndarray, wrong: np.ndarray) -> list[list]:
    """[file, score] of the wrong decisions, lowest score first."""
    order = np.argsort(scores[wrong])
    return [[str(files[wrong][i]), round(float(scores[wrong][i]), 4)] for i in order]


def _resolutions(heldout: Path) -> list[str]:
    manifest = heldout / "MANIFEST.csv"
    if not manifest.is_file():
        return []
    import csv

    with manifest.open() as f:
        return sorted({row["resolution"] for row in csv.DictReader(f)})


if __name__ == "__main__":
    sys.exit(main())
