"""Import a Keras MobileNetV2 model saved as .h5 (Keras 2 or Keras 3 layout) with h5py only, no TensorFlow.

The backbone weights go into torchvision's MobileNetV2 `.features` with Keras' conventions kept
(BN epsilon 1e-3, 'same' padding with the extra row/column at the bottom/right on stride 2), so the
converted network computes what the Keras one did. When the model's top is GlobalAveragePooling2D or
Flatten, optional Dropout, then Dense(2, softmax) or Dense(1, sigmoid), that Dense becomes a head which
keeps the model's own input size, pixel scaling and backbone (the earlier Flask/Keras server's models:
MobileNetV2 at 400x225, Flatten + Dense(2) softmax, class 0 = the program, pixels / 255).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from proctor.models.backbone import (
    KERAS_BN_EPS, KERAS_PREPROCESSING, UNIT_PREPROCESSING, Backbone, BackboneError, build_features, feature_dim,
)
from proctor.models.heads import Head, HeadError
from proctor.models.interface import Preprocessing

logger = logging.getLogger(__name__)

# How the caller's pixels were scaled before entering the model, when the model has no Rescaling layer.
PIXELS = {"unit": UNIT_PREPROCESSING, "symmetric": KERAS_PREPROCESSING}
DEFAULT_THRESHOLD = 0.95  # the earlier server's
_BACKBONE_CLASSES = ("Functional", "Model", "Sequential")
_POOLING_LAYERS = {"GlobalAveragePooling2D": "avg", "Flatten": "flatten"}
_PASS_LAYERS = ("Dropout", "SpatialDropout2D", "GaussianDropout", "GaussianNoise")


class KerasImportError(BackboneError):
    """The file is not a Keras MobileNetV2 .h5 this importer understands; the message names the file."""


@dataclass
class KerasModel:
    """What an .h5 file held: the backbone (preprocessing = the model's input size and scaling) and maybe a head."""

    path: Path
    backbone: Backbone
    head: Head | None
    input_size: tuple[int, int] | None  # (width, height) from the model config
    keras_version: str
    matched: int  # torch tensors filled from the file (all of them, or the import fails)
    unused: list[str] = field(default_factory=list)  # weights in the file that went nowhere
    notes: list[str] = field(default_factory=list)


def _conv_pairs() -> Iterator[tuple[str, str, str]]:
    """(torch module prefix in .features, Keras layer name, "conv" | "depthwise" | "bn") in network order."""
    yield "0.0", "Conv1", "conv"
    yield "0.1", "bn_Conv1", "bn"
    yield "1.conv.0.0", "expanded_conv_depthwise", "depthwise"
    yield "1.conv.0.1", "expanded_conv_depthwise_BN", "bn"
    yield "1.conv.1", "expanded_conv_project", "conv"
    yield "1.conv.2", "expanded_conv_project_BN", "bn"
    for i in range(2, 18):
        block = f"block_{i - 1}"
        yield f"{i}.conv.0.0", f"{block}_expand", "conv"
        yield f"{i}.conv.0.1", f"{block}_expand_BN", "bn"
        yield f"{i}.conv.1.0", f"{block}_depthwise", "depthwise"
        yield f"{i}.conv.1.1", f"{block}_depthwise_BN", "bn"
        yield f"{i}.conv.2", f"{block}_project", "conv"
        yield f"{i}.conv.3", f"{block}_project_BN", "bn"
    yield "18.0", "Conv_1", "conv"
    yield "18.1", "Conv_1_bn", "bn"


_BN_NAMES = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}


def _read_weights(root: Any, path: Path) -> dict[tuple[str, str], np.ndarray]:
    """Every dataset under model_weights, keyed by (layer, weight) = its last two path parts without ':0'.

    Keras 2 writes model_weights/<layer>/<layer>/kernel:0 (or .../<nested model>/Conv1/kernel:0),
    Keras 3 writes model_weights/<layer>/<layer>/kernel; the last two parts name the weight in both.
    """
    import h5py

    found: dict[tuple[str, str], np.ndarray] = {}

    def visit(name: str, obj: Any) -> None:
        if not isinstance(obj, h5py.Dataset):
            return
        parts = name.split("/")
        if len(parts) < 2:
            return
        key = (parts[-2], parts[-1].split(":")[0])
        if key in found:
            raise KerasImportError(f"{path}: weight {key[0]}/{key[1]} appears twice (two MobileNetV2s in one "
                                   "model?); save the model to import on its own")
        found[key] = np.asarray(obj[()], dtype=np.float32)

    root.visititems(visit)
    return found


def _layers(config: dict) -> list[dict]:
    inner = config.get("config")
    if isinstance(inner, list):  # Keras 1/2 Sequential
        return inner
    if isinstance(inner, dict):
        return list(inner.get("layers") or [])
    return []


def _shape_of(layer: dict) -> list | None:
    cfg = layer.get("config") or {}
    return cfg.get("batch_shape") or cfg.get("batch_input_shape")


@dataclass
class _Structure:
    input_size: tuple[int, int] | None = None
    pre: list[dict] = field(default_factory=list)  # layers before the backbone other than the input
    top: list[dict] = field(default_factory=list)  # layers after the backbone
    bn_epsilon: float | None = None


def _structure(config: dict | None) -> _Structure:
    """Split the model config into input, the layers before the backbone, and the top."""
    s = _Structure()
    if not config:
        return s
    layers = _layers(config)
    backbone_end = None
    for i, layer in enumerate(layers):
        names = {sub.get("config", {}).get("name") or sub.get("name") for sub in _layers(layer)}
        if layer.get("class_name") in _BACKBONE_CLASSES and "Conv1" in names:
            backbone_end = i
            inner = _layers(layer)
            if s.input_size is None and inner and _shape_of(inner[0]):
                s.input_size = _size(_shape_of(inner[0]))
            s.bn_epsilon = _epsilon(inner)
            break
    if backbone_end is None:  # a flat model: MobileNetV2's layers are the model's own layers
        names = [(layer.get("config") or {}).get("name") or layer.get("name") for layer in layers]
        if "Conv1" in names and "out_relu" in names:
            start, backbone_end = names.index("Conv1") - 1, names.index("out_relu")
            s.bn_epsilon = _epsilon(layers[start + 1:backbone_end + 1])
            before, after = layers[:start + 1], layers[backbone_end + 1:]
        else:
            return s
    else:
        before, after = layers[:backbone_end], layers[backbone_end + 1:]
    for layer in before:
        if layer.get("class_name") == "InputLayer" or _shape_of(layer):
            s.input_size = _size(_shape_of(layer)) or s.input_size
        if layer.get("class_name") != "InputLayer":
            s.pre.append(layer)
    s.top = after
    return s


def _size(shape: list | None) -> tuple[int, int] | None:
    if not shape or len(shape) != 4 or not shape[1] or not shape[2]:
        return None
    return int(shape[2]), int(shape[1])


def _epsilon(layers: list[dict]) -> float | None:
    for layer in layers:
        if layer.get("class_name") == "BatchNormalization":
            return float(layer["config"].get("epsilon", 1e-3))
    return None


def _preprocessing(s: _Structure, pixels: str | None, path: Path, notes: list[str]) -> Preprocessing:
    """The model's input size with the pixel scaling of a Rescaling layer, or the one the caller names."""
    if pixels is not None and pixels not in PIXELS:
        raise KerasImportError(f"pixels={pixels!r}: expected one of {', '.join(PIXELS)}")
    base = PIXELS[pixels or "unit"]
    rescaling = [layer for layer in s.pre if layer.get("class_name") == "Rescaling"]
    others = [layer for layer in s.pre if layer.get("class_name") not in ("Rescaling",)]
    if others and pixels is None:
        names = ", ".join(f"{layer.get('class_name')} {(layer.get('config') or {}).get('name', '')}".strip()
                          for layer in others)
        raise KerasImportError(f"{path}: layers before MobileNetV2 that cannot be imported ({names}); give the "
                               "pixel scaling they perform explicitly (--pixels unit|symmetric)")
    if rescaling and pixels is None:
        if len(rescaling) > 1:
            raise KerasImportError(f"{path}: more than one Rescaling layer before MobileNetV2")
        cfg = rescaling[0]["config"]
        scale, offset = cfg.get("scale", 1.0), cfg.get("offset", 0.0)
        if isinstance(scale, list) or isinstance(offset, list):
            raise KerasImportError(f"{path}: per-channel Rescaling is not supported")
        base = Preprocessing(scale=float(scale), mean=(-float(offset),) * 3, std=(1.0, 1.0, 1.0))
        notes.append(f"pixel scaling from the model's Rescaling layer: x * {scale} + {offset}")
    elif pixels is None:
        notes.append("no scaling layer in the model: assuming pixels / 255 (--pixels unit)")
    width, height = s.input_size or (base.width, base.height)
    if s.input_size is None:
        notes.append(f"the model has no fixed input size: using {width}x{height}")
    return dataclasses.replace(base, width=width, height=height)


def _fill_backbone(weights: dict[tuple[str, str], np.ndarray], path: Path) -> tuple[torch.nn.Sequential, int, set]:
    features = build_features("keras")
    state = features.state_dict()
    used: set[tuple[str, str]] = set()
    missing: list[str] = []
    matched = 0

    def take(layer: str, *names: str) -> np.ndarray | None:
        for name in names:
            if (layer, name) in weights:
                used.add((layer, name))
                return weights[(layer, name)]
        missing.append(f"{layer}/{names[0]}")
        return None

    for prefix, layer, kind in _conv_pairs():
        if kind == "bn":
            for torch_name, keras_name in _BN_NAMES.items():
                array = take(layer, keras_name)
                if array is not None:
                    matched += _put(state, f"{prefix}.{torch_name}", array, path, f"{layer}/{keras_name}")
            continue
        array = take(layer, "depthwise_kernel", "kernel") if kind == "depthwise" else take(layer, "kernel")
        if array is None:
            continue
        # Keras kernels are (h, w, in, out), depthwise (h, w, channels, 1); torch wants (out, in, h, w).
        converted = array.transpose(2, 3, 0, 1) if kind == "depthwise" else array.transpose(3, 2, 0, 1)
        matched += _put(state, f"{prefix}.weight", converted, path, f"{layer}/kernel", array.shape)
    if missing:
        raise KerasImportError(f"{path}: not a Keras MobileNetV2 model: {len(missing)} weights missing "
                               f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})")
    features.load_state_dict(state)
    return features, matched, used


def _put(state: dict, key: str, array: np.ndarray, path: Path, keras_name: str,
         keras_shape: tuple[int, ...] | None = None) -> int:
    if tuple(state[key].shape) != array.shape:
        raise KerasImportError(f"{path}: {keras_name} has shape {keras_shape or array.shape}, which is not "
                               "MobileNetV2 alpha 1.0's (other widths are not supported)")
    state[key] = torch.from_numpy(np.ascontiguousarray(array))
    return 1


def _head(s: _Structure, weights: dict, used: set, backbone: Backbone, preprocessing: Preprocessing, path: Path,
          name: str, program: str, threshold: float, notes: list[str]) -> tuple[Head | None, str]:
    top = [layer for layer in s.top if layer.get("class_name") not in _PASS_LAYERS]
    kinds = [layer.get("class_name") for layer in top]
    if not top:
        notes.append("the model has no top: backbone only")
        return None, "avg"
    if len(top) != 2 or kinds[0] not in _POOLING_LAYERS or kinds[1] != "Dense":
        notes.append(f"top layers {' -> '.join(kinds)} are not pooling -> Dense: backbone only")
        return None, "avg"
    pooling = _POOLING_LAYERS[kinds[0]]
    cfg = top[1].get("config") or {}
    layer_name = cfg.get("name") or top[1].get("name")
    units, activation = int(cfg.get("units", 0)), cfg.get("activation")
    if (units, activation) == (2, "softmax"):
        kind = "keras_softmax"
    elif (units, activation) == (1, "sigmoid"):
        kind = "logistic"
    else:
        notes.append(f"top Dense({units}, {activation}) is not a one-program head (Dense(2, softmax) with class 0 "
                     "= the program, or Dense(1, sigmoid)): backbone only")
        return None, pooling
    kernel, bias = weights.get((layer_name, "kernel")), weights.get((layer_name, "bias"))
    if kernel is None or bias is None:
        raise KerasImportError(f"{path}: the weights of the top layer {layer_name!r} are missing")
    used.update({(layer_name, "kernel"), (layer_name, "bias")})
    expected = feature_dim(preprocessing, pooling)
    if kernel.shape != (expected, units):
        raise KerasImportError(f"{path}: {layer_name} kernel has shape {kernel.shape}; MobileNetV2 at "
                               f"{preprocessing.width}x{preprocessing.height} with {kinds[0]} gives {expected} features")
    try:
        head = Head(name=name, program=program, kind=kind, backbone_hash=backbone.weights_hash,
                    preprocessing=preprocessing, pooling=pooling, threshold=threshold,
                    tensors={"weight": kernel.T, "bias": bias}, description=f"imported from {path.name}",
                    metrics={"imported_from": path.name})
    except HeadError as exc:
        raise KerasImportError(f"{path}: {exc}") from None
    return head, pooling


def default_head_name(path: str | os.PathLike) -> str:
    """A valid head name made from a file name."""
    stem = re.sub(r"[^A-Za-z0-9_.\-]+", "-", Path(path).stem).strip("-._") or "imported"
    return stem[:64]


def read_keras_model(path: str | os.PathLike, name: str | None = None, program: str | None = None,
                     threshold: float = DEFAULT_THRESHOLD, pixels: str | None = None) -> KerasModel:
    """Read a Keras MobileNetV2 .h5: the backbone and, when the top is a one-program Dense, a head.

    `pixels` ("unit" = x / 255, "symmetric" = x / 127.5 - 1) says how the model's users scaled pixels;
    when None the model's own Rescaling layer decides, else "unit" (the earlier server's convention).
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise KerasImportError(f"{path}: no such file")
    if zipfile.is_zipfile(path):
        raise KerasImportError(f"{path}: a Keras 3 .keras archive, not an .h5 file; in Keras save it with "
                               "model.save('model.h5')")
    if not h5py.is_hdf5(path):
        raise KerasImportError(f"{path}: not an HDF5 (.h5) file")
    notes: list[str] = []
    try:
        with h5py.File(path, "r") as f:
            root = f["model_weights"] if "model_weights" in f else f
            version = f.attrs.get("keras_version", root.attrs.get("keras_version", "unknown"))
            version = version.decode() if isinstance(version, bytes) else str(version)
            raw_config = f.attrs.get("model_config")
            weights = _read_weights(root, path)
    except KerasImportError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise KerasImportError(f"{path}: cannot read the HDF5 data, truncated or corrupt ({exc})") from None
    config = None
    if raw_config is not None:
        try:
            config = json.loads(raw_config.decode() if isinstance(raw_config, bytes) else raw_config)
        except ValueError as exc:
            raise KerasImportError(f"{path}: model_config is not JSON ({exc})") from None
    else:
        notes.append("weights-only file (no model config): backbone only")
    if not weights:
        raise KerasImportError(f"{path}: no weights in the file")
    structure = _structure(config)
    if config is not None and structure.bn_epsilon is None and not structure.top and not structure.pre:
        if ("Conv1", "kernel") not in weights:
            raise KerasImportError(f"{path}: not a Keras MobileNetV2 model (no Conv1 layer)")
    if structure.bn_epsilon not in (None, KERAS_BN_EPS):
        # Keras' MobileNetV2 always uses 1e-3; the "keras" backbone variant (and its hash) assumes it.
        raise KerasImportError(f"{path}: batch-norm epsilon {structure.bn_epsilon} is not Keras MobileNetV2's 1e-3")
    features, matched, used = _fill_backbone(weights, path)
    preprocessing = _preprocessing(structure, pixels, path, notes)
    backbone = Backbone(features, preprocessing, "keras", "avg", f"keras:{path.name}")
    head, pooling = _head(structure, weights, used, backbone, preprocessing, path,
                          name or default_head_name(path), program or name or default_head_name(path), threshold,
                          notes)
    backbone.spec = dataclasses.replace(backbone.spec, pooling=pooling)
    unused = sorted(f"{layer}/{weight}" for layer, weight in set(weights) - used)
    if unused:
        notes.append(f"{len(unused)} weights in the file were not used: {', '.join(unused[:4])}")
    logger.info("imported %s (Keras %s): %d tensors, head %s", path, version, matched,
                head.kind if head else "none")
    return KerasModel(path, backbone, head, structure.input_size, version, matched, unused, notes)


__all__ = ["DEFAULT_THRESHOLD", "KerasImportError", "KerasModel", "PIXELS", "default_head_name",
           "read_keras_model"]
