"""Test helpers written from Keras' own conventions, independent of proctor.models.keras_import.

- `keras_weights(seed)`: random MobileNetV2 (alpha 1.0) weights named and shaped as Keras names them
  (kernels (h, w, in, out), depthwise (h, w, channels, 1), BN gamma/beta/moving_mean/moving_variance).
- `write_h5(...)`: such weights as a Keras 2 or Keras 3 .h5 file (h5py), optionally with a top.
- `keras_forward(...)`: what Keras computes, in NumPy float64, NHWC, with TF 'same' padding and BN eps 1e-3.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np

EPS = 1e-3
# (expansion, output channels, repeats, first stride): Keras' MobileNetV2 table.
_STAGES = ((6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _blocks():
    """(prefix, input channels, expansion, output channels, stride) for expanded_conv and block_1..16."""
    yield "expanded_conv", 32, 1, 16, 1
    channels, index = 16, 1
    for t, c, n, s in _STAGES:
        for i in range(n):
            yield f"block_{index}", channels, t, c, s if i == 0 else 1
            channels, index = c, index + 1


def keras_weights(seed: int = 0) -> dict[tuple[str, str], np.ndarray]:
    rng = np.random.default_rng(seed)
    w: dict[tuple[str, str], np.ndarray] = {}

    def conv(name: str, shape: tuple[int, ...], depthwise: bool = False) -> None:
        fan_in = shape[0] * shape[1] * (1 if depthwise else shape[2])
        w[(name, "depthwise_kernel" if depthwise else "kernel")] = (
            rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)).astype(np.float32)

    def bn(name: str, channels: int) -> None:
        w[(name, "gamma")] = (rng.random(channels) + 0.5).astype(np.float32)
        w[(name, "beta")] = (rng.standard_normal(channels) * 0.1).astype(np.float32)
        w[(name, "moving_mean")] = (rng.standard_normal(channels) * 0.1).astype(np.float32)
        w[(name, "moving_variance")] = (rng.random(channels) + 0.5).astype(np.float32)

    conv("Conv1", (3, 3, 3, 32))
    bn("bn_Conv1", 32)
    for prefix, cin, t, cout, _ in _blocks():
        hidden = cin * t
        if t != 1:
            conv(f"{prefix}_expand", (1, 1, cin, hidden))
            bn(f"{prefix}_expand_BN", hidden)
        conv(f"{prefix}_depthwise", (3, 3, hidden, 1), depthwise=True)
        bn(f"{prefix}_depthwise_BN", hidden)
        conv(f"{prefix}_project", (1, 1, hidden, cout))
        bn(f"{prefix}_project_BN", cout)
    conv("Conv_1", (1, 1, 320, 1280))
    bn("Conv_1_bn", 1280)
    return w


def _same_pad(x: np.ndarray, k: int, s: int) -> np.ndarray:
    pads = []
    for size in x.shape[1:3]:
        out = -(-size // s)
        total = max((out - 1) * s + k - size, 0)
        pads.append((total // 2, total - total // 2))
    return np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))


def _conv(x: np.ndarray, kernel: np.ndarray, s: int) -> np.ndarray:
    k = kernel.shape[0]
    x = _same_pad(x, k, s)
    win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))[:, ::s, ::s]
    return np.einsum("nhwcij,ijco->nhwo", win, kernel.astype(np.float64), optimize=True)


def _depthwise(x: np.ndarray, kernel: np.ndarray, s: int) -> np.ndarray:
    x = _same_pad(x, 3, s)
    win = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(1, 2))[:, ::s, ::s]
    return np.einsum("nhwcij,ijc->nhwc", win, kernel[..., 0].astype(np.float64), optimize=True)


def _bn(x: np.ndarray, w: dict, name: str) -> np.ndarray:
    g, b, m, v = (w[(name, k)].astype(np.float64) for k in ("gamma", "beta", "moving_mean", "moving_variance"))
    return (x - m) / np.sqrt(v + EPS) * g + b


def _relu6(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0.0, 6.0)


def keras_forward(w: dict, images: np.ndarray) -> np.ndarray:
    """MobileNetV2 features (the out_relu map), NHWC float64, for NHWC float inputs already scaled."""
    x = _relu6(_bn(_conv(images.astype(np.float64), w[("Conv1", "kernel")], 2), w, "bn_Conv1"))
    for prefix, cin, t, cout, s in _blocks():
        y = x
        if t != 1:
            y = _relu6(_bn(_conv(y, w[(f"{prefix}_expand", "kernel")], 1), w, f"{prefix}_expand_BN"))
        y = _relu6(_bn(_depthwise(y, w[(f"{prefix}_depthwise", "depthwise_kernel")], s), w, f"{prefix}_depthwise_BN"))
        y = _bn(_conv(y, w[(f"{prefix}_project", "kernel")], 1), w, f"{prefix}_project_BN")
        x = x + y if (s == 1 and cin == cout) else y
    return _relu6(_bn(_conv(x, w[("Conv_1", "kernel")], 1), w, "Conv_1_bn"))


def _nested_config(name: str, height: int, width: int, version: int) -> dict:
    shape_key = "batch_shape" if version == 3 else "batch_input_shape"
    return {"class_name": "Functional", "config": {"name": name, "layers": [
        {"class_name": "InputLayer", "config": {shape_key: [None, height, width, 3], "name": "input_1"}},
        {"class_name": "Conv2D", "config": {"name": "Conv1", "strides": [2, 2], "padding": "same"}},
        {"class_name": "BatchNormalization", "config": {"name": "bn_Conv1", "epsilon": 0.001}},
        {"class_name": "ReLU", "config": {"name": "out_relu", "max_value": 6.0}},
    ]}}


def write_h5(path: Path, weights: dict, version: int, height: int, width: int, top: list[dict] | None = None,
             pre: list[dict] | None = None, top_weights: dict | None = None) -> Path:
    """A Keras `model.save('x.h5')` file: Keras 2 (version=2) or Keras 3 (version=3) layout.

    top: layer configs after MobileNetV2 (e.g. Flatten, Dense); pre: layers between the input and it.
    """
    nested = "mobilenetv2_1.00_224"
    shape_key = "batch_shape" if version == 3 else "batch_input_shape"
    layers = [{"class_name": "InputLayer", "config": {shape_key: [None, height, width, 3], "name": "input_2"}}]
    layers += list(pre or [])
    layers.append(_nested_config(nested, height, width, version))
    layers += list(top or [])
    config = {"class_name": "Sequential" if version == 2 else "Functional",
              "config": {"name": "model", "layers": layers}}
    suffix = ":0" if version == 2 else ""
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = "2.15.0" if version == 2 else "3.11.3"
        f.attrs["backend"] = "tensorflow"
        f.attrs["model_config"] = json.dumps(config)
        root = f.create_group("model_weights")
        root.attrs["layer_names"] = np.array([layer["config"]["name"].encode() for layer in layers])
        group = root.create_group(nested)
        names = []
        for (layer, weight), array in weights.items():
            if version == 3 and weight == "depthwise_kernel":
                weight = "kernel"  # Keras 3 names the depthwise kernel plainly
            names.append(f"{layer}/{weight}{suffix}")
            group.create_dataset(names[-1], data=array)
        group.attrs["weight_names"] = np.array([n.encode() for n in names])
        for layer in (top or []) + (pre or []):
            name = layer["config"]["name"]
            sub = root.create_group(name)
            layer_weights = (top_weights or {}).get(name, {})
            sub.attrs["weight_names"] = np.array([f"{name}/{k}{suffix}".encode() for k in layer_weights])
            for k, array in layer_weights.items():
                sub.create_dataset(f"{name}/{k}{suffix}", data=array)
        f.create_group("optimizer_weights").create_dataset("iterations", data=np.array(3))
    return path


def flatten_dense_top(units: int, activation: str, pooling: str = "Flatten") -> list[dict]:
    layers = [{"class_name": pooling, "config": {"name": "pool"}},
              {"class_name": "Dropout", "config": {"name": "dropout", "rate": 0.3}},
              {"class_name": "Dense", "config": {"name": "dense", "units": units, "activation": activation}}]
    return layers
