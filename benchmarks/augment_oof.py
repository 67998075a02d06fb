"""How many overlap copies (`TrainOptions.overlaps`) make the best demo heads, judged on the TRAINING screenshots only.

Every demo head is cross-validated on data/screens exactly as `train_head` does it (same stratified seeded
folds, class-balanced logistic regression on the default pooling, frames served at the client width,
no training copy showing an out-of-fold screenshot, `pick_threshold`), for each number of overlap copies
and fold seed. Reported: out-of-fold errors, lowest balanced accuracy and AUC of the shots themselves, and
errors at the picked threshold on the copies of the out-of-fold shots: the `augment`ed ones and the
`overlap` ones (the shot as a window over another training screenshot; the same copies for every
option, so a larger and harder out-of-fold set of the kind exam screens show). The held-out split is
never read here.

Usage: PYTHONPATH=. .venv/bin/python benchmarks/augment_oof.py [--overlaps 0,2,4] [--seeds 0,1,2] [--heads logistic,mlp]
Prints JSON lines and writes benchmarks/results/augment_oof.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import describe as describe_machine, write_result  # noqa: E402
from benchmarks.pooling_oof import auc, mean_over_seeds, oof_parser, training_set  # noqa: E402
from proctor.models.backbone import BackboneSpec, load_backbone  # noqa: E402
from proctor.models.heads import make_head  # noqa: E402
from proctor.models.training import (  # noqa: E402
    FeatureCache, TrainOptions, _fit, backdrops, evaluate, features, fold_ids, pick_threshold,
)


def cross_validate(feats: np.ndarray, behind: np.ndarray, programs: np.ndarray, copies: int, overlaps: int,
                   seed: int, spec: BackboneSpec, mlp: bool = False) -> dict:
    """Every head's out-of-fold results with `overlaps` overlap copies in training, as train_head computes them."""
    options = TrainOptions(seed=seed, overlaps=overlaps, mlp=mlp)
    n, _, dim = feats.shape
    variants = 1 + copies
    train_v = list(range(variants)) + list(range(variants, variants + overlaps))
    heads = {}
    for head in sorted(set(programs)):
        labels = (programs == head).astype(int)
        fold = fold_ids(labels, options.folds, options.seed)
        shown = np.concatenate([np.repeat(fold[:, None], variants, axis=1), fold[behind]], axis=1)
        copy_labels = np.repeat(labels[:, None], feats.shape[1], axis=1)
        oof = np.zeros(feats.shape[:2], np.float32)
        for f in range(int(fold.max()) + 1):
            train = fold != f
            use = train[:, None] & (shown != f)
            use[:, [v for v in range(feats.shape[1]) if v not in train_v]] = False
            # Scored by the head as train_head makes it (Head.scores), logistic or MLP.
            model = make_head(head, head, "mlp" if mlp else "logistic", _fit(feats[use], copy_labels[use], options),
                              spec, pooling=options.pooling)
            oof[~train] = model.scores(feats[~train].reshape(-1, dim)).reshape(-1, feats.shape[1])
        o = oof[:, 0]
        threshold = pick_threshold(o[labels == 1], o[labels == 0], options.target_far, options.threshold_position)
        plain = evaluate(o, labels, threshold)
        row = {"balanced_accuracy": plain["balanced_accuracy"], "fn": plain["fn"], "fp": plain["fp"],
               "auc": round(auc(o[labels == 1], o[labels == 0]), 5), "threshold": round(threshold, 4)}
        for part, cols in (("aug", slice(1, variants)), ("overlap", slice(variants, None))):
            s, lab = oof[:, cols].reshape(-1), np.repeat(labels, oof[:, cols].shape[1])
            e = evaluate(s, lab, threshold)
            row.update({f"{part}_fn": e["fn"], f"{part}_fp": e["fp"],
                        f"{part}_balanced_accuracy": e["balanced_accuracy"],
                        f"{part}_auc": round(auc(s[lab == 1], s[lab == 0]), 5)})
        heads[head] = row
    values = list(heads.values())
    summary = {"errors": sum(h["fn"] + h["fp"] for h in values),
               "min_balanced_accuracy": min(h["balanced_accuracy"] for h in values),
               "mean_auc": round(float(np.mean([h["auc"] for h in values])), 5)}
    for part in ("aug", "overlap"):
        summary[f"{part}_errors"] = sum(h[f"{part}_fn"] + h[f"{part}_fp"] for h in values)
        summary[f"min_{part}_balanced_accuracy"] = min(h[f"{part}_balanced_accuracy"] for h in values)
        summary[f"mean_{part}_auc"] = round(float(np.mean([h[f"{part}_auc"] for h in values])), 5)
    return {"summary": summary, "heads": heads}


def main() -> int:
    parser = oof_parser(__doc__, "augment_oof.json")
    parser.add_argument("--overlaps", default="0,2,4", help="comma-separated numbers of overlap copies to compare")
    parser.add_argument("--heads", default="logistic", help="head kinds to compare: logistic, mlp or both "
                        "(logistic,mlp); results of an MLP are keyed mlp-OVERLAPS")
    parser.add_argument("--eval-overlaps", type=int, default=6,
                        help="overlap copies of each out-of-fold shot scored (at least the largest option)")
    args = parser.parse_args()
    images, programs = training_set(args.data, "benchmarks/augment_oof.py")
    if not images:
        return 2
    try:
        options = [int(o) for o in args.overlaps.split(",")]
    except ValueError:
        parser.error(f"--overlaps {args.overlaps!r}: write whole numbers separated by commas, e.g. 0,2,4")
    if any(not 0 <= o <= 32 for o in options):
        parser.error(f"--overlaps {args.overlaps!r}: each number must be 0..32")
    kinds = args.heads.split(",")
    if not kinds or any(k not in ("logistic", "mlp") for k in kinds):
        parser.error(f"--heads {args.heads!r}: logistic, mlp or logistic,mlp")
    extracted = max([args.eval_overlaps, *options])
    backbone = load_backbone(args.backbone_weights, args.cache_dir)
    defaults = TrainOptions()
    cache = FeatureCache(args.cache_dir / "features", backbone, defaults.pooling, defaults.client_width,
                         defaults.client_quality)
    start = time.monotonic()
    feats = features(images, 1 + defaults.copies, backbone, cache, overlaps=extracted)
    features_s = time.monotonic() - start
    behind = backdrops(images, extracted)
    # Every option is scored on the same copies (all `extracted` overlap ones); it trains on its first `overlaps`.
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {}
    for kind in kinds:
        for overlaps in options:
            runs = {seed: cross_validate(feats, behind, np.array(programs), defaults.copies, overlaps, seed,
                                         backbone.spec, mlp=kind == "mlp")
                    for seed in seeds}
            mean = mean_over_seeds(runs)
            key = str(overlaps) if kind == "logistic" else f"mlp-{overlaps}"
            results[key] = {"mean_over_seeds": mean, "seeds": {str(s): r for s, r in runs.items()}}
            print(json.dumps({"heads": kind, "overlaps": overlaps, **mean}), flush=True)
    result = {"benchmark": "augment_oof", "data": str(args.data), "images": len(images),
              "augmented_copies": defaults.copies, "eval_overlap_copies": extracted,
              "backbone": backbone.spec.source, "input": f"{backbone.spec.preprocessing.width}x"
              f"{backbone.spec.preprocessing.height}", "pooling": defaults.pooling,
              "client_width": defaults.client_width, "features_seconds": round(features_s, 1), "seeds": seeds,
              "overlaps": results, "machine": describe_machine(torch=torch.__version__)}
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
