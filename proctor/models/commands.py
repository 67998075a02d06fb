"""`proctor classify`, `proctor import-keras` and `proctor heads add|list|deactivate`: models from the command line."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

import numpy as np

from proctor import config as config_module
from proctor.cli import CommandError
from proctor.config import ConfigError
from proctor.models.interface import Scores

logger = logging.getLogger(__name__)

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def register(subparsers: argparse._SubParsersAction) -> None:
    classify = subparsers.add_parser("classify", help="score screenshots with the heads, as the server would")
    _model_flags(classify)
    classify.add_argument("--heads", action="append", metavar="FILE", default=None,
                          help="a head file to use; repeat for several (default: the active heads in the database)")
    classify.add_argument("--allowed", default=None, metavar="NAME,...",
                          help="an exam whitelist of head names: also print each image's verdict")
    classify.add_argument("--json", action="store_true", help="one JSON object per image and line")
    classify.add_argument("images", nargs="+", metavar="IMAGE", type=Path)
    classify.set_defaults(func=_classify)

    imp = subparsers.add_parser("import-keras", help="convert a Keras MobileNetV2 .h5 into a backbone and a head")
    _model_flags(imp)
    imp.add_argument("model", type=Path, metavar="FILE.h5")
    imp.add_argument("--out", type=Path, default=None, metavar="DIR",
                     help="where to write the head and backbone files (default <data_dir>/imported)")
    imp.add_argument("--name", default=None, help="head name (default: from the file name)")
    imp.add_argument("--program", default=None, help="the program the head recognises (default: the name)")
    imp.add_argument("--threshold", type=float, default=None,
                     help="score at which the head fires (default 0.95, the earlier server's)")
    imp.add_argument("--pixels", choices=("unit", "symmetric"), default=None,
                     help="how pixels were scaled for the model when it has no Rescaling layer: unit = x/255 "
                          "(the earlier Flask/Keras server; the default), symmetric = x/127.5-1 "
                          "(keras.applications.mobilenet_v2.preprocess_input)")
    imp.set_defaults(func=_import_keras)

    heads = subparsers.add_parser("heads", help="add, list or deactivate heads in the database")
    actions = heads.add_subparsers(dest="heads_command", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="add a head file (from import-keras or train-head)")
    _model_flags(add)
    add.add_argument("file", type=Path)
    add.add_argument("--inactive", action="store_true", help="store it without loading it yet")
    add.set_defaults(func=_heads_add)
    listing = actions.add_parser("list", help="list the heads")
    _database_flag(listing)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=_heads_list)
    deactivate = actions.add_parser("deactivate", help="stop using a head (servers reload their heads)")
    _database_flag(deactivate)
    deactivate.add_argument("name")
    deactivate.set_defaults(func=_heads_deactivate)

    # train-head: registered by proctor.models.training (the screens helper's module) when it exists.
    try:
        training = importlib.import_module("proctor.models.training")
    except ModuleNotFoundError as exc:
        if exc.name != "proctor.models.training":
            raise
    else:
        training.register(subparsers)


def _database_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database-url", default=None, metavar="URL",
                        help="sqlite:///path or postgresql://... (env PROCTOR_DATABASE_URL; "
                             f"default {config_module.Config.database_url})")


def _model_flags(parser: argparse.ArgumentParser) -> None:
    _database_flag(parser)
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help=f"caches and imported backbones (env PROCTOR_DATA_DIR; default "
                             f"{config_module.Config.data_dir})")
    parser.add_argument("--backbone-weights", default=None, metavar="WEIGHTS",
                        help="bundled, imagenet or a .pt/.pth/.h5 file (env PROCTOR_BACKBONE_WEIGHTS; "
                             f"default {config_module.Config.backbone_weights})")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (env PROCTOR_DEVICE)")


def _config(args: argparse.Namespace) -> config_module.Config:
    try:
        return config_module.from_sources(args)
    except ConfigError as exc:
        raise CommandError(str(exc)) from None


async def _open_store(url: str) -> Any:
    """The store a URL names, made by `proctor init`; tests replace this with an in-memory fake."""
    from proctor.storage.commands import open_initialised

    return await open_initialised(url)


@asynccontextmanager
async def _store(config: config_module.Config) -> AsyncIterator[Any]:
    from proctor.storage.base import StoreError

    try:
        store = await _open_store(config.database_url)
    except StoreError as exc:
        raise CommandError(f"database {config.database_url}: {exc}") from None
    try:
        yield store
    except StoreError as exc:
        raise CommandError(str(exc)) from None
    finally:
        await store.close()


def _engine(config: config_module.Config) -> Any:
    """The server's engine, built the same way (Engine.from_config)."""
    from proctor.models.backbone import BackboneError
    from proctor.models.engine import Engine, EngineError

    try:
        return Engine.from_config(config)
    except (BackboneError, EngineError) as exc:
        raise CommandError(str(exc)) from None


# --- classify ---------------------------------------------------------------------------------------------------


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise CommandError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise CommandError(f"{path}: not an image this command can read ({exc})") from None


def _classify(args: argparse.Namespace) -> int:
    from proctor.batching.decode import served_frame
    from proctor.models.engine import EngineError

    config = _config(args)
    allowed = [name.strip() for name in (args.allowed or "").split(",") if name.strip()]
    images = images_in(args.images)
    if not images:
        raise CommandError("no images found in the directories given")
    for path in images:
        if not path.is_file():
            raise CommandError(f"{path}: no such file")
    engine = _engine(config)
    if args.heads:
        sources: list[Any] = list(args.heads)
    else:
        sources = asyncio.run(_active_heads(config))
    try:
        refused = engine.set_heads(sources, strict=bool(args.heads))
    except EngineError as exc:
        raise CommandError(str(exc)) from None
    for message in refused:
        print(f"warning: {message}", file=sys.stderr, flush=True)
    if not engine.heads:
        raise CommandError("no heads to classify with: give --heads FILE... or add heads to the database")
    unknown = sorted(set(allowed) - {h.name for h in engine.heads})
    if unknown:
        raise CommandError(f"--allowed names unknown heads: {', '.join(unknown)} "
                           f"(heads: {', '.join(h.name for h in engine.heads)})")
    for start in range(0, len(images), config.max_batch):
        paths = images[start:start + config.max_batch]
        try:
            # Each image as the server would get it from a student page (width, JPEG, DCT-scaled decode).
            frames = [served_frame(_read_image(p), engine.frame_size, config.client_max_width,
                                   config.client_jpeg_quality) for p in paths]
            scores = engine.classify(frames)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        for i, path in enumerate(paths):
            _print_result(path, scores, i, allowed if args.allowed is not None else None, args.json)
    return 0


async def _active_heads(config: config_module.Config) -> list[Any]:
    async with _store(config) as store:
        return await store.list_heads(active_only=True)


def _print_result(path: Path, scores: Scores, index: int, allowed: list[str] | None, as_json: bool) -> None:
    from proctor.whitelist import Policy, judge

    row = scores.row(index)
    verdict = None
    if allowed is not None:
        judged = judge(row, scores.heads, Policy(allowed=frozenset(allowed)))
        verdict = {"ok": judged.ok, "program": judged.program, "reason": judged.reason}
    if as_json:
        print(json.dumps({"path": str(path), "scores": {k: round(v, 6) for k, v in row.items()},
                          "verdict": verdict}), flush=True)
        return
    print(path)
    width = max(len(h.name) for h in scores.heads)
    for head in scores.heads:
        score = row[head.name]
        fired = "fires" if score >= head.threshold else ""
        print(f"  {head.name:<{width}}  {score:.4f}  (threshold {head.threshold:.2f}, {head.program})  {fired}".rstrip())
    if verdict is not None:
        if verdict["ok"]:
            print(f"  verdict: OK ({verdict['program']})")
        elif verdict["reason"] == "forbidden_program":
            print(f"  verdict: ALERT, forbidden program {verdict['program']}")
        else:
            print("  verdict: ALERT, no allowed program recognised")


# --- import-keras -----------------------------------------------------------------------------------------------


def _import_keras(args: argparse.Namespace) -> int:
    from proctor.models.backbone import BackboneError, BackboneLibrary
    from proctor.models.heads import write_head_file
    from proctor.models.keras_import import DEFAULT_THRESHOLD, KerasImportError, read_keras_model

    config = _config(args)
    threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    if not 0.0 < threshold < 1.0:
        raise CommandError(f"--threshold {threshold}: must be between 0 and 1")
    try:
        model = read_keras_model(args.model, name=args.name, program=args.program, threshold=threshold,
                                 pixels=args.pixels)
    except KerasImportError as exc:
        raise CommandError(str(exc)) from None
    out = args.out or Path(config.data_dir) / "imported"
    out.mkdir(parents=True, exist_ok=True)
    stem = model.head.name if model.head else args.model.stem
    backbone_file = model.backbone.save(out / f"{stem}.backbone.pt")
    # Installed under <data_dir>/backbones/<hash>.pt, where this node's engine looks for heads' backbones.
    try:
        installed = BackboneLibrary([], Path(config.data_dir) / "backbones").install(model.backbone)
    except (BackboneError, OSError) as exc:
        raise CommandError(f"cannot install the backbone: {exc}") from None
    print(f"{args.model}: Keras {model.keras_version}, {model.matched} backbone tensors converted")
    for note in model.notes:
        print(f"  note: {note}")
    p = model.backbone.spec.preprocessing
    print(f"backbone {model.backbone.weights_hash[:12]} ({p.width}x{p.height}): {backbone_file}, installed as "
          f"{installed}")
    if model.head is None:
        print("no head: the model's top is not a one-program classifier")
        return 0
    head_file = write_head_file(model.head, out / f"{model.head.name}.safetensors")
    print(f"head {model.head.name!r} ({model.head.kind}, {model.head.pooling}, threshold {model.head.threshold}): "
          f"{head_file}")
    print(f"next: proctor heads add {head_file}   (copy {installed.name} into <data_dir>/backbones on every node)")
    return 0


# --- heads ------------------------------------------------------------------------------------------------------


def _heads_add(args: argparse.Namespace) -> int:
    from proctor.models.backbone import BackboneError, BackboneLibrary
    from proctor.models.heads import HeadError, head_to_record, read_head_file

    config = _config(args)
    try:
        head = read_head_file(args.file)
    except HeadError as exc:
        raise CommandError(str(exc)) from None
    try:
        library = BackboneLibrary.from_config(config)
        known = library.get(head.backbone_hash) is not None
    except BackboneError as exc:
        raise CommandError(str(exc)) from None
    if not known:
        raise CommandError(f"{args.file}: head {head.name!r} was made for backbone {head.backbone_hash[:12]}, which "
                           f"this node does not have (it has {', '.join(h[:12] for h in library.known())}); "
                           "train it again on this backbone or import its Keras model here first")

    async def run() -> None:
        async with _store(config) as store:
            await store.add_head(head_to_record(head, active=not args.inactive))

    asyncio.run(run())
    print(f"added head {head.name!r} ({head.program}, {head.kind}, threshold {head.threshold})"
          + (" inactive" if args.inactive else ""))
    return 0


def _heads_list(args: argparse.Namespace) -> int:
    config = _config(args)

    async def run() -> list[Any]:
        async with _store(config) as store:
            return await store.list_heads()

    records = asyncio.run(run())
    if args.json:
        for r in records:
            print(json.dumps({"name": r.name, "program": r.program, "active": r.active, "threshold": r.threshold,
                              "backbone_hash": r.backbone_hash, "metrics": r.metrics,
                              "created_at": r.created_at.isoformat(), "description": r.description}))
        return 0
    if not records:
        print("no heads")
        return 0
    rows = [("NAME", "PROGRAM", "ACTIVE", "THRESHOLD", "BACKBONE", "CREATED")]
    rows += [(r.name, r.program, "yes" if r.active else "no", f"{r.threshold:.2f}", r.backbone_hash[:12],
              r.created_at.strftime("%Y-%m-%d %H:%M")) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def _heads_deactivate(args: argparse.Namespace) -> int:
    config = _config(args)

    async def run() -> None:
        async with _store(config) as store:
            await store.set_head_active(args.name, False)

    asyncio.run(run())
    print(f"head {args.name!r} deactivated")
    return 0


def images_in(paths: Sequence[Path]) -> list[Path]:
    """Image files among paths, expanding directories (sorted)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        else:
            found.append(path)
    return found
