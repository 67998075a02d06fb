"""The `proctor train-head` command: train a head from two folders of screenshots and write its file."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from proctor import config as config_module
from proctor.cli import CommandError

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train-head", help="train a head from screenshots of a program and of others",
                              description="Train a head recognising one program's screens; prints JSON metrics "
                                          "and writes the head file (import it with `proctor heads add`).")
    p.add_argument("name", help="head name (letters, digits, '_', '-', '.')")
    p.add_argument("--positives", required=True, type=Path, help="folder of screenshots of the program")
    p.add_argument("--negatives", required=True, type=Path, help="folder of screenshots of other programs")
    p.add_argument("--out", type=Path, default=None, help="head file to write (default: NAME.safetensors)")
    p.add_argument("--description", default="", help="free text shown to teachers")
    p.add_argument("--program", default=None, help="the program's display name (default: NAME)")
    p.add_argument("--mlp", action="store_true", help="a small MLP head instead of logistic regression")
    p.add_argument("--target-far", type=float, default=0.01,
                   help="false-alarm rate the threshold is picked for on out-of-fold scores (default 0.01; "
                        "with fewer than 1/rate positives one outlier may be left below it, see README)")
    p.add_argument("--pooling", default=None,
                   help="how the backbone's feature map becomes the head's input: avg_max2x2 (default; the "
                        "global average plus the maxima of a 2x2 grid) or avg (the global average only)")
    p.add_argument("--client-width", type=int, default=None,
                   help="width of the frames the heads will be served (the server's --client-max-width; "
                        "default: the server's configuration)")
    p.add_argument("--no-augment", action="store_true", help="train on the screenshots as they are")
    p.add_argument("--overlap-copies", type=int, default=None,
                   help="augmented copies per screenshot that show it as a window over another of the given "
                        "screenshots (default: TrainOptions.overlaps, see README)")
    p.add_argument("--seed", type=int, default=0, help="seed of the cross-validation folds and augmentation")
    p.add_argument("--backbone-weights", default=None,
                   help="'bundled', 'imagenet' or a weights file (default: the server's configuration)")
    p.add_argument("--data-dir", default=None, help="where the feature cache lives (default: the server's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from proctor.models.backbone import BackboneError, load_backbone
    from proctor.models.heads import HeadError, write_head_file
    from proctor.models.training import DEFAULT_POOLING, TrainingError, TrainOptions, train_head

    overrides = {k: v for k, v in (("backbone_weights", args.backbone_weights), ("data_dir", args.data_dir)) if v}
    try:
        config = config_module.from_sources(None, **overrides)
    except config_module.ConfigError as exc:
        raise CommandError(str(exc)) from None
    out = args.out or Path(f"{args.name}.safetensors")
    cache = Path(config.data_dir) / "cache"
    try:
        overlaps = TrainOptions.overlaps if args.overlap_copies is None else args.overlap_copies
        options = TrainOptions(mlp=args.mlp, target_far=args.target_far, augment=not args.no_augment,
                               overlaps=overlaps, seed=args.seed, cache_dir=cache / "features",
                               pooling=args.pooling or DEFAULT_POOLING,
                               client_width=args.client_width or config.client_max_width,
                               client_quality=config.client_jpeg_quality)
        options.check()
        backbone = load_backbone(config.backbone_weights, cache)
        result = train_head(args.name, args.positives, args.negatives, backbone, program=args.program,
                            description=args.description, options=options, progress=_progress)
        write_head_file(result.head, out)
    except (TrainingError, BackboneError, HeadError) as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(f"{out}: cannot write ({exc.strerror or exc})") from None
    print(json.dumps({"head": args.name, "file": str(out), **result.metrics}, indent=2))
    return 0


def _progress(stage: str, done: int, total: int) -> None:
    if sys.stderr.isatty():
        print(f"\r{stage}: {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)
