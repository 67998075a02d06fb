"""Which pooling of the backbone's feature map makes the best demo heads, judged on the TRAINING screenshots only.

For every shot of data/screens and its augmented copies (the same variants `train_head` uses), the
backbone's 1280-channel feature map is computed once (cached under var/cache); each pooling variant
then turns the maps into head inputs, and every demo head is cross-validated exactly as `train_head`
does it (same stratified seeded folds, class-balanced logistic regression, `pick_threshold`). Reported
per variant and fold seed: out-of-fold errors and balanced accuracy at the picked threshold, AUC, and
the same on the augmented copies of the out-of-fold shots (a larger, harder out-of-fold set: other
window sizes, positions, JPEG qualities, covered windows). The held-out split is never read here.

Usage: PYTHONPATH=. .venv/bin/python benchmarks/pooling_oof.py [--poolings avg,avg_max2x2,...] [--seeds 0,1,2]
Prints JSON lines and writes benchmarks/results/pooling_oof.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import describe as describe_machine, write_result  # noqa: E402
from proctor.models.backbone import POOLINGS, Pool, frames_to_tensor, load_backbone, to_input  # noqa: E402
from proctor.models.training import (  # noqa: E402
    AUGMENT_VERSION, TrainOptions, _fit, _variant_seed, augment, decode, evaluate, fold_ids, list_images,
    pick_threshold, read_images,
)

DEFAULT_POOLINGS = "avg,avg+max,max,gem3,avg+std,avg+grid2,avg_max2x2,avg+grid2+gridmax2"


def _part(name: str, maps: torch.Tensor) -> torch.Tensor:
    """One candidate pooling of maps [N, C, H, W] -> [N, F]; names of backbone.POOLINGS use the product code."""
    if name in POOLINGS:
        return Pool(name)(maps)
    if name == "max":
        return maps.amax(dim=(2, 3))
    if name == "gem3":  # generalised mean, p = 3 (the maps are ReLU6 outputs, so non-negative)
        return maps.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)
    if name == "std":
        return maps.std(dim=(2, 3))
    if name == "grid2":
        return F.adaptive_avg_pool2d(maps, 2).flatten(1)
    if name == "gridmax2":
        return F.adaptive_max_pool2d(maps, 2).flatten(1)
    raise SystemExit(f"benchmarks/pooling_oof.py: unknown pooling part {name!r}")


def pool(name: str, maps: np.ndarray) -> np.ndarray:
    """Pooled features [N, V, F] of maps [N, V, C, H, W] (float16 on disk)."""
    out = []
    for row in maps:
        m = torch.from_numpy(np.asarray(row, np.float32))
        out.append(torch.cat([_part(p, m) for p in name.split("+")], dim=1).numpy())
    return np.stack(out)


def feature_maps(images, variants: int, backbone, cache: Path) -> np.ndarray:
    """Maps [N, V, C, h, w] float16 of every image and augmented variant, cached as one .npy."""
    if cache.is_file():
        return np.load(cache, mmap_mode="r")
    rows = []
    for image in images:
        img = decode(image)
        frames = [np.asarray(img if v == 0 else augment(img, _variant_seed(image.sha256, v))) for v in range(variants)]
        with torch.inference_mode():
            x = torch.cat([to_input(frames_to_tensor([f]), backbone.spec.preprocessing) for f in frames])
            rows.append(backbone.features(x).numpy().astype(np.float16))
    maps = np.stack(rows)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, maps)
    return maps


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    return float(((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (pos.size * neg.size))


def cross_validate(feats: np.ndarray, programs: np.ndarray, seed: int) -> dict:
    """Every head's out-of-fold results, as train_head computes them, plus those of the augmented copies."""
    options = TrainOptions(seed=seed)
    n, variants, dim = feats.shape
    heads = {}
    for head in sorted(set(programs)):
        labels = (programs == head).astype(int)
        fold = fold_ids(labels, options.folds, options.seed)
        oof = np.zeros((n, variants), np.float32)
        for f in range(int(fold.max()) + 1):
            train = fold != f
            t = _fit(feats[train].reshape(-1, dim), np.repeat(labels[train], variants), options)
            z = feats[~train].reshape(-1, dim) @ t["weight"][0] + t["bias"][0]
            oof[~train] = (1 / (1 + np.exp(-np.clip(z, -50, 50)))).reshape(-1, variants)
        o = oof[:, 0]
        threshold = pick_threshold(o[labels == 1], o[labels == 0], options.target_far, options.threshold_position)
        plain = evaluate(o, labels, threshold)
        aug_labels, aug = np.repeat(labels, variants - 1), oof[:, 1:].reshape(-1)
        augmented = evaluate(aug, aug_labels, threshold)
        heads[head] = {"balanced_accuracy": plain["balanced_accuracy"], "fn": plain["fn"], "fp": plain["fp"],
                       "auc": round(auc(o[labels == 1], o[labels == 0]), 5), "threshold": round(threshold, 4),
                       "aug_balanced_accuracy": augmented["balanced_accuracy"], "aug_fn": augmented["fn"],
                       "aug_fp": augmented["fp"],
                       "aug_auc": round(auc(aug[aug_labels == 1], aug[aug_labels == 0]), 5)}
    values = list(heads.values())
    summary = {"errors": sum(h["fn"] + h["fp"] for h in values),
               "min_balanced_accuracy": min(h["balanced_accuracy"] for h in values),
               "mean_auc": round(float(np.mean([h["auc"] for h in values])), 5),
               "aug_errors": sum(h["aug_fn"] + h["aug_fp"] for h in values),
               "min_aug_balanced_accuracy": min(h["aug_balanced_accuracy"] for h in values),
               "mean_aug_auc": round(float(np.mean([h["aug_auc"] for h in values])), 5)}
    return {"summary": summary, "heads": heads}


def oof_parser(doc: str, result: str) -> argparse.ArgumentParser:
    """The options every out-of-fold benchmark on the training shots has."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/screens"))
    parser.add_argument("--seeds", default="0,1,2", help="fold seeds (train_head uses 0)")
    parser.add_argument("--cache-dir", type=Path, default=Path("var/cache"))
    parser.add_argument("--backbone-weights", default="bundled")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results") / result)
    return parser


def training_set(data: Path, script: str) -> tuple[list, list[str]]:
    """The screenshots of every program folder of `data` and their programs; none (and a message) if < 2 folders."""
    folders = sorted(p for p in data.iterdir() if p.is_dir()) if data.is_dir() else []
    if len(folders) < 2:
        print(f"{script}: {data}: needs at least two program folders", file=sys.stderr)
        return [], []
    images, programs = [], []
    for folder in folders:
        found = read_images(list_images(folder, "training"), "training")
        images += found
        programs += [folder.name] * len(found)
    return images, programs


def mean_over_seeds(runs: dict) -> dict:
    """Every summary figure of the per-seed runs, averaged over the seeds."""
    first = next(iter(runs.values()))["summary"]
    return {k: round(float(np.mean([r["summary"][k] for r in runs.values()])), 5) for k in first}


def main() -> int:
    parser = oof_parser(__doc__, "pooling_oof.json")
    parser.add_argument("--poolings", default=DEFAULT_POOLINGS, help="comma-separated; parts joined by '+'")
    args = parser.parse_args()
    images, programs = training_set(args.data, "benchmarks/pooling_oof.py")
    if not images:
        return 2
    backbone = load_backbone(args.backbone_weights, args.cache_dir)
    variants = 1 + TrainOptions().copies
    key = hashlib.sha256(repr((backbone.weights_hash, [im.sha256 for im in images], variants,
                               AUGMENT_VERSION)).encode()).hexdigest()[:16]
    start = time.monotonic()
    maps = feature_maps(images, variants, backbone, args.cache_dir / f"pooling-maps-{key}.npy")
    maps_s = time.monotonic() - start
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {}
    for name in args.poolings.split(","):
        feats = pool(name, maps)
        runs = {seed: cross_validate(feats, np.array(programs), seed) for seed in seeds}
        mean = mean_over_seeds(runs)
        results[name] = {"features": int(feats.shape[-1]), "mean_over_seeds": mean,
                         "seeds": {str(s): r for s, r in runs.items()}}
        print(json.dumps({"pooling": name, "features": int(feats.shape[-1]), **mean}), flush=True)
    result = {"benchmark": "pooling_oof", "data": str(args.data), "images": len(images), "variants": variants,
              "backbone": backbone.spec.source, "input": f"{backbone.spec.preprocessing.width}x"
              f"{backbone.spec.preprocessing.height}", "map_seconds": round(maps_s, 1), "seeds": seeds,
              "poolings": results, "machine": describe_machine(torch=torch.__version__)}
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
