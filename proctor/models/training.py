"""Training a head: backbone features of labelled screenshots (cached), a logistic or MLP head, a threshold.

`train_head` is a plain blocking function (images as paths or bytes, optional progress callback), so the
server can run it in a worker thread and the `train-head` command can run it in the foreground.

Screenshots of a program are augmented the way real student screens differ: the screen shrunk onto a
desktop-like background at a random position, rescaled, re-compressed as JPEG at varied quality and
partly covered by another window; with `overlaps`, also shown as a large window over another of the
training screenshots, a real program left partly visible behind it. Features of every (image, variant) are cached on disk under the
image's sha256 and the backbone's hash, so retraining or training another head on the same images
only runs the backbone for new images.

The threshold is picked for a target false-alarm rate (the fraction of the program's own frames that
would score below it; in the whitelist, such a frame raises an alert although the program is allowed)
on out-of-fold scores: stratified, seeded k-fold cross-validation scores every image with a head that
did not see it, so the threshold rests on all the screenshots instead of a small validation share; the
head itself is then fitted on all of them. With fewer than 1/target_far positives (no miss fits the
rate), the lowest positive may stay below the threshold when that keeps out a larger share of the
negatives than the share of positives it loses: one odd shot must not open the head to other programs.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

from proctor.batching.decode import PAGE_RESAMPLING, PAGE_SUBSAMPLING, served_frame
from proctor.config import Config
from proctor.models.backbone import POOLINGS, Backbone, preprocessing_to_dict
from proctor.models.heads import Head, make_head

logger = logging.getLogger(__name__)

ImageSource = Union[str, os.PathLike, bytes]
# progress(stage, done, total): stage is "features" or "fit".
Progress = Callable[[str, int, int], None]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# Bump when the augmentation changes, so cached features of the old augmentation are not reused.
AUGMENT_VERSION = 2
# Bump when the overlap augmentation (`overlap`) changes; part of those copies' cache file names.
OVERLAP_VERSION = 2
MAX_DECODE_PIXELS = 4096 * 4096
# The pooling new heads are trained on: on the demo screenshots it cut the out-of-fold errors of global
# average pooling by about half (benchmarks/pooling_oof.py, README "Demo heads").
DEFAULT_POOLING = "avg_max2x2"


class TrainingError(ValueError):
    """Training cannot start or finish; the message names the file, folder or value to fix."""


@dataclass(frozen=True)
class TrainOptions:
    """Knobs of `train_head`; the defaults are what `proctor train-head` uses."""

    mlp: bool = False
    hidden: int = 64
    # How the backbone's feature map becomes the head's input (backbone.POOLINGS); all heads of one pooling
    # share one backbone pass per batch.
    pooling: str = DEFAULT_POOLING
    target_far: float = 0.01
    # Cross-validation folds for the out-of-fold scores the threshold is picked on (fewer when a class has
    # fewer images).
    folds: int = 4
    seed: int = 0
    augment: bool = True
    # Augmented copies per training image (the original is always used too).
    copies: int = 8
    # Further copies per training image showing it as a window over ANOTHER training screenshot (`overlap`):
    # real programs partly visible behind the labelled one, as in exam screens. 4 was chosen out of fold
    # on the demo screenshots (benchmarks/augment_oof.py, README "Demo heads").
    overlaps: int = 4
    # L2 penalty on the standardised-feature weights.
    l2: float = 1.0
    cache_dir: str | os.PathLike | None = None
    # Heads see every screenshot as the server will see it: scaled to the width student pages send
    # (--client-max-width), JPEG-encoded at their quality and decoded by DCT scaling.
    client_width: int = Config.client_max_width
    client_quality: float = Config.client_jpeg_quality
    # Where the threshold sits between the highest negative (0) and the lowest passing positive (1), in logits;
    # nearer the negatives, because screens of new sizes score lower than the validation positives did.
    threshold_position: float = 0.25

    def check(self) -> None:
        if not 0.0 < self.target_far < 0.5:
            raise TrainingError(f"invalid target false-alarm rate {self.target_far!r}: must be in (0, 0.5)")
        if not 2 <= self.folds <= 20:
            raise TrainingError(f"invalid number of folds {self.folds!r}: must be 2..20")
        if not 0 <= self.copies <= 32:
            raise TrainingError(f"invalid augmented copies {self.copies!r}: must be 0..32")
        if not 0 <= self.overlaps <= 32:
            raise TrainingError(f"invalid overlap copies {self.overlaps!r}: must be 0..32")
        if not 0.0 <= self.threshold_position <= 1.0:
            raise TrainingError(f"invalid threshold position {self.threshold_position!r}: must be in [0, 1]")
        if not 1 <= self.hidden <= 4096:
            raise TrainingError(f"invalid hidden size {self.hidden!r}: must be 1..4096")
        if not 160 <= self.client_width <= 7680:
            raise TrainingError(f"invalid client width {self.client_width!r}: must be 160..7680")
        if not 0.1 <= self.client_quality <= 1.0:
            raise TrainingError(f"invalid client JPEG quality {self.client_quality!r}: must be 0.1..1")
        if self.pooling not in POOLINGS or self.pooling == "flatten":
            # flatten is for imported Keras heads: its features grow with the input size and overfit.
            raise TrainingError(f"invalid pooling {self.pooling!r}: expected one of "
                                f"{', '.join(p for p in POOLINGS if p != 'flatten')}")


@dataclass
class TrainResult:
    """The trained head (threshold set) and the validation metrics also stored in head.metrics."""

    head: Head
    metrics: dict[str, Any] = field(default_factory=dict)


# --- images -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Image:
    label: str  # file name, or "upload N" for bytes; used in error messages
    data: bytes
    sha256: str


def list_images(directory: str | os.PathLike, role: str = "images") -> list[Path]:
    """The image files of a folder (not recursive, hidden files skipped), sorted; errors name the folder."""
    path = Path(directory)
    if not path.exists():
        raise TrainingError(f"{role} folder {path}: does not exist")
    if not path.is_dir():
        raise TrainingError(f"{role} folder {path}: is not a folder")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise TrainingError(f"{role} folder {path}: is empty (expected screenshots: "
                            f"{', '.join(IMAGE_SUFFIXES)})")
    others = [p.name for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if others:
        raise TrainingError(f"{role} folder {path}: {', '.join(others[:5])} "
                            f"{'is' if len(others) == 1 else 'are'} not an image file "
                            f"(expected only {', '.join(IMAGE_SUFFIXES)})")
    return files


def read_images(sources: Sequence[ImageSource] | str | os.PathLike, role: str = "images") -> list[_Image]:
    """Read a folder or a list of paths/bytes (not decoded yet); errors name the file or folder."""
    if isinstance(sources, (str, os.PathLike)):
        sources = list_images(sources, role)
    images = []
    for i, source in enumerate(sources):
        if isinstance(source, (bytes, bytearray, memoryview)):
            label, data = f"{role} upload {i + 1}", bytes(source)
        else:
            label = str(source)
            try:
                data = Path(source).read_bytes()
            except OSError as exc:
                raise TrainingError(f"{label}: cannot read ({exc.strerror or exc})") from None
        images.append(_Image(label, data, hashlib.sha256(data).hexdigest()))
    return images


def decode(image: _Image) -> Image.Image:
    """Decode to RGB; an undecodable or oversized file is a TrainingError naming it."""
    try:
        with Image.open(io.BytesIO(image.data)) as img:
            if img.width * img.height > MAX_DECODE_PIXELS:
                raise TrainingError(f"{image.label}: {img.width}x{img.height} is larger than a screen "
                                    f"({MAX_DECODE_PIXELS} pixels at most)")
            return img.convert("RGB")
    except Image.DecompressionBombError:  # PIL refuses over ~179 million pixels before our own check
        raise TrainingError(f"{image.label}: larger than a screen ({MAX_DECODE_PIXELS} pixels at most)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, TrainingError):
            raise
        raise TrainingError(f"{image.label}: not an image ({type(exc).__name__}: {exc})") from None


# --- augmentation -------------------------------------------------------------------------------------------


def _desktop(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """A desktop-like background: a vertical two-colour gradient with a few icon squares."""
    w, h = size
    c1 = np.array([rng.randint(0, 255) for _ in range(3)], np.float32)
    c2 = np.array([rng.randint(0, 255) for _ in range(3)], np.float32)
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    arr = np.broadcast_to(c1 + (c2 - c1) * t, (h, w, 3)).astype(np.uint8)
    img = Image.fromarray(np.ascontiguousarray(arr))
    draw = ImageDraw.Draw(img)
    icon = max(8, w // 30)
    for _ in range(rng.randint(0, 8)):
        x, y = rng.randint(0, max(0, w - icon)), rng.randint(0, max(0, h - icon))
        draw.rectangle([x, y, x + icon, y + icon], fill=tuple(rng.randint(0, 255) for _ in range(3)))
    return img


def _cover(rng: random.Random, img: Image.Image) -> None:
    """Draw another program's window (title bar, light body, text-like lines) over part of the frame."""
    w, h = img.size
    cw, ch = int(w * rng.uniform(0.15, 0.4)), int(h * rng.uniform(0.15, 0.45))
    x = rng.randint(-cw // 3, w - 2 * cw // 3)
    y = rng.randint(-ch // 3, h - 2 * ch // 3)
    draw = ImageDraw.Draw(img)
    body = tuple(rng.randint(200, 255) for _ in range(3)) if rng.random() < 0.7 else \
        tuple(rng.randint(0, 60) for _ in range(3))
    ink = (30, 30, 30) if sum(body) > 380 else (220, 220, 220)
    bar = max(4, h // 30)
    draw.rectangle([x, y, x + cw, y + ch], fill=body, outline=(90, 90, 90))
    draw.rectangle([x, y, x + cw, y + bar], fill=tuple(rng.randint(40, 220) for _ in range(3)))
    line = max(3, h // 60)
    for ly in range(y + bar + line, y + ch - line, line * 2):
        lw = int(cw * rng.uniform(0.2, 0.9))
        draw.rectangle([x + line, ly, x + line + lw, ly + max(1, line // 2)], fill=ink)


def augment(img: Image.Image, seed: int) -> Image.Image:
    """One plausible variant of a full screenshot as a student's stream might show it (deterministic per seed).

    The result may differ in size and aspect ratio from the input, like real screens do.
    """
    rng = random.Random(seed)
    if rng.random() < 0.3:
        # A 4:3 or 16:10 screen shows less width than a 16:9 one; the backbone input is still 16:9.
        keep = int(img.width * rng.uniform(0.75, 0.95))
        left = rng.randint(0, img.width - keep)
        img = img.crop((left, 0, left + keep, img.height))
    w, h = img.size
    out = img
    if rng.random() < 0.6:
        # The program's window smaller than the screen, somewhere on a desktop.
        s = rng.uniform(0.6, 0.95)
        win = img.resize((max(1, int(w * s)), max(1, int(h * rng.uniform(s * 0.9, min(1.0, s * 1.1))))),
                         Image.BILINEAR)
        out = _desktop(rng, (w, h))
        out.paste(win, (rng.randint(0, w - win.width), rng.randint(0, h - win.height)))
    else:
        out = img.copy()
    if rng.random() < 0.4:
        _cover(rng, out)
    return _degrade(rng, out)


def _degrade(rng: random.Random, out: Image.Image) -> Image.Image:
    """Maybe rescaled (a lower-resolution screen, scaled back by the server), always re-compressed as JPEG."""
    if rng.random() < 0.5:
        s = rng.uniform(0.45, 0.9)
        out = out.resize((max(16, int(out.width * s)), max(16, int(out.height * s))), Image.BILINEAR)
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=rng.randint(35, 90))
    buf.seek(0)
    with Image.open(buf) as recompressed:
        return recompressed.convert("RGB")


def overlap(img: Image.Image, behind: Image.Image, seed: int) -> Image.Image:
    """`img` as a large window over another real screen `behind`, part of which stays visible (deterministic).

    Real exam screens often show the allowed program over another one whose toolbar or sidebar stays in
    view; a synthetic box (`_cover`) does not look like one. The label stays `img`'s program: the window
    covers about half the screen or more and lies on top. The result has `img`'s aspect ratio.
    """
    rng = random.Random(seed)
    w, h = img.size
    out = behind.resize((w, h), Image.BILINEAR)
    # The shot's own program may fill only part of it: the window keeps most of the shot, at most 30 %
    # smaller than the screen, so the labelled program still shows more of the screen than the one behind.
    cw, ch = int(w * rng.uniform(0.9, 1.0)), int(h * rng.uniform(0.9, 1.0))
    cx, cy = rng.randint(0, w - cw), rng.randint(0, h - ch)
    s = rng.uniform(0.7, 0.92)
    ww, wh = max(1, int(w * s)), max(1, int(h * min(0.97, s * rng.uniform(0.95, 1.05))))
    window = img.crop((cx, cy, cx + cw, cy + ch)).resize((ww, wh), Image.BILINEAR)
    out.paste(window, (rng.randint(0, w - ww), rng.randint(0, h - wh)))
    return _degrade(rng, out)


# --- features -----------------------------------------------------------------------------------------------


class FeatureCache:
    """Feature vectors on disk, one .npy per (image sha256, variant), under a key of everything that makes one:
    backbone, input, pooling, augmentation, and the width and JPEG quality frames are served at."""

    def __init__(self, directory: str | os.PathLike | None, backbone: Backbone, pooling: str | None = None,
                 client_width: int = Config.client_max_width, client_quality: float = Config.client_jpeg_quality):
        spec = backbone.spec
        self.pooling = pooling or spec.pooling
        self.frame_size = (spec.preprocessing.width, spec.preprocessing.height)
        self.client_width = client_width
        self.client_quality = client_quality
        key = repr((spec.weights_hash, sorted(preprocessing_to_dict(spec.preprocessing).items()), self.pooling,
                    AUGMENT_VERSION, client_width, client_quality, PAGE_SUBSAMPLING, int(PAGE_RESAMPLING)))
        self.key = hashlib.sha256(key.encode()).hexdigest()[:24]
        self.directory = Path(directory) / self.key if directory else None

    def _path(self, sha: str, variant: int | str) -> Path:
        assert self.directory is not None
        return self.directory / sha[:2] / f"{sha}-{variant}.npy"

    def get(self, sha: str, variant: int | str) -> np.ndarray | None:
        if self.directory is None:
            return None
        path = self._path(sha, variant)
        try:
            return np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            logger.warning("ignoring the unreadable cached features %s: %s", path, exc)
            return None

    def put(self, sha: str, variant: int | str, vector: np.ndarray) -> None:
        if self.directory is None:
            return
        path = self._path(sha, variant)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, vector.astype(np.float32))
        os.replace(tmp, path)


def _variant_seed(sha: str, variant: int) -> int:
    return int(sha[:12], 16) * 64 + variant


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-spread 64-bit hash of each uint64."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def backdrops(images: Sequence[_Image], overlaps: int) -> np.ndarray:
    """For every image and overlap copy, the index of the other image shown behind it: [len(images), overlaps].

    Rendezvous hashing on the images' sha256: each choice depends only on the image, the copy number and
    the candidates, so adding or removing screenshots changes few choices (cached features stay valid
    because a copy's cache entry is keyed by its backdrop too). An image never backs itself; a copy of
    the same program may.
    """
    keys = np.array([int(im.sha256[:16], 16) for im in images], dtype=np.uint64)
    out = np.zeros((len(images), overlaps), dtype=np.int64)
    for i, key in enumerate(keys):
        for j in range(overlaps):
            with np.errstate(over="ignore"):
                score = _mix(keys ^ _mix(np.uint64(key) + np.uint64(j + 1) * np.uint64(0x9E3779B97F4A7C15)))
            score[keys == key] = np.iinfo(np.uint64).max  # never itself (nor a byte-identical copy)
            out[i, j] = int(np.argmin(score)) if len(images) > 1 else i
    return out


def _overlap_variant(j: int, behind: _Image) -> str:
    return f"o{OVERLAP_VERSION}.{j}-{behind.sha256[:16]}"


def features(images: Sequence[_Image], variants: int, backbone: Backbone, cache: FeatureCache,
             progress: Progress | None = None, batch_size: int = 16, overlaps: int = 0) -> np.ndarray:
    """Features [len(images), variants + overlaps, F] (cache.pooling).

    Variant 0 is the image itself, variants 1..variants-1 are `augment`ed copies, the last `overlaps`
    are `overlap` copies over the screenshots `backdrops(images, overlaps)` names. Each image goes to the
    backbone as the live path would serve it (cache.client_width / client_quality).
    """
    behind = backdrops(images, overlaps) if overlaps else np.zeros((len(images), 0), np.int64)
    keys = [[*range(variants), *(_overlap_variant(j, images[b]) for j, b in enumerate(behind[i]))]
            for i in range(len(images))]
    # One preallocated array, filled in place: a job of 4,000 screenshots x 13 copies holds 1.3 GB of
    # features, and stacking per-vector lists at the end needed three times that at its peak.
    out: np.ndarray | None = None

    def put(i: int, v: int, vector: np.ndarray) -> None:
        nonlocal out
        if out is None:
            out = np.empty((len(images), variants + overlaps, vector.shape[-1]), np.float32)
        out[i, v] = vector

    todo = []
    for i, image in enumerate(images):
        for v, key in enumerate(keys[i]):
            cached = cache.get(image.sha256, key)
            if cached is None:
                todo.append((i, v))
            else:
                put(i, v, cached)
    total = len(images) * (variants + overlaps)
    done = total - len(todo)
    if progress:
        progress("features", done, total)
    decoded: dict[int, Image.Image] = {}
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        frames = []
        for i, v in chunk:
            if i not in decoded:
                decoded.clear()  # a chunk walks one image's variants in order: keep only the current one
                decoded[i] = decode(images[i])
            if v == 0:
                img = decoded[i]
            elif v < variants:
                img = augment(decoded[i], _variant_seed(images[i].sha256, v))
            else:
                b = int(behind[i, v - variants])
                img = overlap(decoded[i], decode(images[b]), _variant_seed(images[i].sha256, v))
            frames.append(served_frame(np.asarray(img), cache.frame_size, cache.client_width, cache.client_quality))
        vectors = backbone.extract(frames, pooling=cache.pooling, batch_size=batch_size)
        for (i, v), vector in zip(chunk, vectors):
            put(i, v, vector)
            cache.put(images[i].sha256, keys[i][v], vector)
        done += len(chunk)
        if progress:
            progress("features", done, total)
    if out is None:  # no images
        return np.zeros((0, variants + overlaps, 0), np.float32)
    return out


# --- fitting ------------------------------------------------------------------------------------------------


def fold_ids(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Stratified, seeded fold number of every image; each fold gets images of both classes.

    Uses min(folds, smallest class size) folds, so that every fold leaves at least one image of each
    class for the head that scores it.
    """
    k = max(2, min(folds, int((labels == 1).sum()), int((labels == 0).sum())))
    rng = np.random.default_rng(seed)
    out = np.zeros(len(labels), dtype=np.int64)
    for cls in (0, 1):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        out[idx] = np.arange(len(idx)) % k
    return out


def _fit(x: np.ndarray, y: np.ndarray, options: TrainOptions,
         interrupt: Callable[[], None] | None = None) -> dict[str, np.ndarray]:
    """Class-balanced logistic regression (L-BFGS) or a one-hidden-layer MLP (Adam) on standardised features.

    The standardisation is folded into the first layer, so the head file sees raw backbone features.
    `interrupt` is called at every step and may raise to stop (a server shutting down must not wait for
    a whole fit of thousands of screenshots).
    """
    torch.manual_seed(options.seed)
    mean = x.mean(axis=0)
    std = x.std(axis=0) + 1e-3
    xt = torch.from_numpy((x - mean) / std).float()
    yt = torch.from_numpy(y.astype(np.float32))
    n_pos, n_neg = float(y.sum()), float(len(y) - y.sum())
    # Each class weighs half of the loss whatever the counts (a head has many more negatives).
    weights = torch.where(yt > 0, 0.5 / n_pos, 0.5 / n_neg)
    dim = x.shape[1]
    if options.mlp:
        hidden = torch.nn.Linear(dim, options.hidden)
        out = torch.nn.Linear(options.hidden, 1)
        params = list(hidden.parameters()) + list(out.parameters())
        opt = torch.optim.Adam(params, lr=1e-3, weight_decay=options.l2)
        for _ in range(400):
            if interrupt:
                interrupt()
            opt.zero_grad()
            z = out(torch.relu(torch.nn.functional.dropout(hidden(xt), 0.2, training=True)))[:, 0]
            loss = (torch.nn.functional.binary_cross_entropy_with_logits(z, yt, reduction="none") * weights).sum()
            loss.backward()
            opt.step()
        w1 = hidden.weight.detach().numpy() / std
        b1 = hidden.bias.detach().numpy() - w1 @ mean
        return {"hidden.weight": w1, "hidden.bias": b1, "out.weight": out.weight.detach().numpy(),
                "out.bias": out.bias.detach().numpy()}
    w = torch.zeros(dim, requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=300, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        if interrupt:
            interrupt()
        opt.zero_grad()
        z = xt @ w + b
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(z, yt, reduction="none") * weights).sum()
        loss = loss + options.l2 * 0.5 * (w * w).sum() / math.sqrt(dim)
        loss.backward()
        return loss

    opt.step(closure)
    wn = w.detach().numpy() / std
    bn = b.detach().numpy() - float(wn @ mean)
    return {"weight": wn[None, :], "bias": bn.astype(np.float32)}


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def pick_threshold(pos: np.ndarray, neg: np.ndarray, target_far: float, position: float = 0.5) -> float:
    """Threshold so that at most target_far of the positives score below it, with a margin toward the negatives.

    Among thresholds that keep the false-alarm rate within target, the one `position` of the way (in
    logit space) from the highest negative under the lowest positive allowed to pass toward that
    positive: both kinds of error get room on unseen frames. With fewer than 1/target_far positives
    no miss fits the rate, yet one frame cannot show a rate that small either; there the lowest positive
    may stay below the threshold when that keeps out a larger share of the negatives than the share of
    positives it loses (a lone outlier shot must not drag the threshold under many other programs' frames).
    """
    pos = np.sort(pos)
    allowed_misses = int(math.floor(target_far * len(pos) + 1e-9))
    t = _threshold_passing(pos, neg, allowed_misses, position)
    if allowed_misses == 0 and len(pos) >= 2 and neg.size:
        spared = _threshold_passing(pos, neg, 1, position)
        if _balanced_accuracy(pos, neg, spared) > _balanced_accuracy(pos, neg, t):
            t = spared
    return t


def _threshold_passing(pos: np.ndarray, neg: np.ndarray, misses: int, position: float) -> float:
    """The threshold `position` of the way from the highest negative under sorted pos[misses] up to it."""
    low_pos = float(pos[misses])
    below = neg[neg < low_pos]
    high_neg = float(below.max()) if below.size else min(low_pos / 2, 1e-3)
    t = 1 / (1 + math.exp(-(_logit(high_neg) + position * (_logit(low_pos) - _logit(high_neg)))))
    # A head threshold lies strictly inside (0, 1), and never above the lowest positive it must pass.
    return float(min(max(t, 1e-6), 1 - 1e-6, low_pos))


def _balanced_accuracy(pos: np.ndarray, neg: np.ndarray, threshold: float) -> float:
    return float(((pos >= threshold).mean() + (neg < threshold).mean()) / 2)


def evaluate(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, Any]:
    """Precision, recall, balanced accuracy, false-alarm and false-accept rates, confusion counts."""
    predicted = scores >= threshold
    pos = labels == 1
    tp = int((predicted & pos).sum())
    fn = int((~predicted & pos).sum())
    fp = int((predicted & ~pos).sum())
    tn = int((~predicted & ~pos).sum())
    recall = tp / max(1, tp + fn)
    specificity = tn / max(1, tn + fp)
    return {"precision": round(tp / max(1, tp + fp), 4), "recall": round(recall, 4),
            "specificity": round(specificity, 4), "balanced_accuracy": round((recall + specificity) / 2, 4),
            "false_alarm_rate": round(fn / max(1, tp + fn), 4), "false_accept_rate": round(fp / max(1, tn + fp), 4),
            "tp": tp, "fn": fn, "fp": fp, "tn": tn}


def train_head(name: str, positives: Sequence[ImageSource] | str | os.PathLike,
               negatives: Sequence[ImageSource] | str | os.PathLike, backbone: Backbone, *,
               program: str | None = None, description: str = "", options: TrainOptions = TrainOptions(),
               progress: Progress | None = None) -> TrainResult:
    """Train a head recognising `positives` (screens of one program) against `negatives` (screens of others).

    positives/negatives: a folder, or a list of image paths and/or image bytes. Blocking; CPU-heavy.
    """
    options.check()
    pos = read_images(positives, "positives")
    neg = read_images(negatives, "negatives")
    for role, images in (("positive", pos), ("negative", neg)):
        if len(images) < 2:
            raise TrainingError(f"only {len(images)} {role} image(s): a head needs at least 2 screenshots of "
                                f"its program and 2 of other programs (one of each is kept for validation)")
    overlap = {im.sha256 for im in pos} & {im.sha256 for im in neg}
    if overlap:
        both = next(im.label for im in pos if im.sha256 in overlap)
        raise TrainingError(f"{both}: the same image is among both positives and negatives")
    images = pos + neg
    labels = np.array([1] * len(pos) + [0] * len(neg))
    fold = fold_ids(labels, options.folds, options.seed)
    k = int(fold.max()) + 1
    cache = FeatureCache(options.cache_dir, backbone, options.pooling, options.client_width, options.client_quality)
    variants = 1 + (options.copies if options.augment else 0)
    overlaps = options.overlaps if options.augment else 0
    # Every image is in training for all folds but its own, so every image gets its augmented copies;
    # an image is scored out of fold as it is (variant 0).
    feats = features(images, variants, backbone, cache, progress, overlaps=overlaps)
    # The fold of the screenshot each copy shows (an overlap copy also shows its backdrop's).
    shown = np.concatenate([np.repeat(fold[:, None], variants, axis=1), fold[backdrops(images, overlaps)]], axis=1)
    copy_labels = np.repeat(labels[:, None], variants + overlaps, axis=1)
    kind = "mlp" if options.mlp else "logistic"
    oof = np.zeros(len(images), dtype=np.float32)
    for f in range(k + 1):
        if progress:
            progress("fit", f, k + 1)
        # Folds 0..k-1 give out-of-fold scores; the last pass fits the shipped head on everything.
        train = fold != f
        # No training copy may show a screenshot that is scored out of fold, not even as a backdrop.
        use = train[:, None] & (shown != f)
        tensors = _fit(feats[use], copy_labels[use], options,
                       interrupt=(lambda f=f: progress("fit", f, k + 1)) if progress else None)
        model = make_head(name, program or name, kind, tensors, backbone.spec, threshold=0.5, pooling=options.pooling)
        if f < k:
            oof[~train] = model.scores(feats[~train, 0])
    threshold = pick_threshold(oof[labels == 1], oof[labels == 0], options.target_far, options.threshold_position)
    metrics = evaluate(oof, labels, threshold)
    metrics.update({"threshold": round(threshold, 6), "target_far": options.target_far, "kind": kind,
                    "augmented_copies": variants - 1, "overlap_copies": overlaps,
                    "train_positives": len(pos), "train_negatives": len(neg),
                    "validation": f"out-of-fold, {k} folds", "folds": k, "seed": options.seed})
    if progress:
        progress("fit", k + 1, k + 1)
    head = model.replace(threshold=threshold, description=description, metrics=metrics)
    logger.info("trained head %s: %s", name, metrics)
    return TrainResult(head, metrics)


def register(subparsers) -> None:
    """Add the `train-head` sub-command (proctor.models.commands calls this); it lives in train_command."""
    from proctor.models import train_command

    train_command.register(subparsers)


__all__ = ["DEFAULT_POOLING", "FeatureCache", "read_images", "TrainOptions", "TrainResult", "TrainingError", "augment",
           "backdrops", "evaluate", "features", "fold_ids", "list_images", "overlap", "pick_threshold", "train_head"]
