"""Write a backbone (MobileNetV2 features + pooling) as an ONNX graph for ONNX Runtime on the CPU.

The graph is built node by node from the weights rather than traced: batch norms are folded into the
convolutions, Keras' asymmetric 'same' padding becomes explicit Conv pads for the fixed input size,
the batch axis stays dynamic, and nothing depends on torch's deprecated TorchScript exporter.

The graph takes the decoded frames as they are, uint8 [N, H, W, 3] RGB, and does the head's
preprocessing (channel order, scaling, normalisation, NCHW layout) itself: ONNX Runtime fuses it
into a pass it runs anyway, where the same steps in torch cost about a tenth of the backbone's time
on a 2-core CPU and woke torch's own worker threads next to ONNX Runtime's.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
from torch import nn

from proctor.models.backbone import Backbone, feature_dim, grid_cells, same_padding
from proctor.models.interface import Preprocessing

logger = logging.getLogger(__name__)

OPSET = 17
IR_VERSION = 8
INPUT_NAME = "frames"
OUTPUT_NAME = "features"
# Part of the cache file name: bump when the graph's inputs or structure change (3: the avg_max2x2 pooling).
GRAPH_VERSION = 3


class _Graph:
    def __init__(self, keras_padding: bool, height: int, width: int):
        self.nodes: list = []
        self.initializers: list = []
        self.keras_padding = keras_padding
        self.size = (height, width)
        self._count = 0

    def name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def constant(self, array: np.ndarray, prefix: str) -> str:
        from onnx import numpy_helper

        name = self.name(prefix)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        from onnx import helper

        out = output or self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv_bn(self, x: str, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu6: bool) -> str:
        """Conv with the batch norm folded in (computed in float64), then ReLU6 as Clip(0, 6)."""
        w = conv.weight.detach().double().numpy()
        scale = bn.weight.detach().double().numpy() / np.sqrt(bn.running_var.detach().double().numpy() + bn.eps)
        bias = bn.bias.detach().double().numpy() - bn.running_mean.detach().double().numpy() * scale
        kh, kw = conv.kernel_size
        sh, sw = conv.stride
        h, w_ = self.size
        if self.keras_padding and conv.stride != (1, 1):
            th, tw = same_padding(h, kh, sh), same_padding(w_, kw, sw)
            pads = [th // 2, tw // 2, th - th // 2, tw - tw // 2]
        else:
            ph, pw = conv.padding if isinstance(conv.padding, tuple) else (kh // 2, kw // 2)
            pads = [ph, pw, ph, pw]
        self.size = ((h + pads[0] + pads[2] - kh) // sh + 1, (w_ + pads[1] + pads[3] - kw) // sw + 1)
        weight = self.constant((w * scale[:, None, None, None]).astype(np.float32), "w")
        b = self.constant(bias.astype(np.float32), "b")
        y = self.node("Conv", [x, weight, b], kernel_shape=[kh, kw], strides=[sh, sw], pads=pads,
                      group=conv.groups)
        if relu6:
            lo = self.constant(np.array(0.0, np.float32), "zero")
            hi = self.constant(np.array(6.0, np.float32), "six")
            y = self.node("Clip", [y, lo, hi])
        return y

    def block(self, x: str, module: nn.Module) -> str:
        """One element of MobileNetV2 `.features`: a conv-BN-ReLU6 or an inverted residual."""
        if hasattr(module, "use_res_connect"):
            y = x
            layers = list(module.conv)
            i = 0
            while i < len(layers):
                layer = layers[i]
                if isinstance(layer, nn.Conv2d):  # the linear projection: conv then BN, no activation
                    y = self.conv_bn(y, layer, layers[i + 1], relu6=False)
                    i += 2
                else:
                    y = self.conv_bn(y, layer[0], layer[1], relu6=True)
                    i += 1
            return self.node("Add", [x, y]) if module.use_res_connect else y
        return self.conv_bn(x, module[0], module[1], relu6=True)


    def preprocess(self, frames: str, p: Preprocessing) -> str:
        """uint8 [N, H, W, 3] RGB -> float [N, 3, H, W] backbone input: (pixels * scale - mean) / std."""
        from onnx import TensorProto

        x = self.node("Cast", [frames], to=TensorProto.FLOAT)
        if p.channels == "BGR":
            x = self.node("Gather", [x, self.constant(np.array([2, 1, 0], np.int64), "bgr")], axis=3)
        x = self.node("Transpose", [x], perm=[0, 3, 1, 2])
        inv_std = 1.0 / np.array(p.std, np.float64)
        scale = (p.scale * inv_std).astype(np.float32).reshape(1, 3, 1, 1)
        shift = (-np.array(p.mean, np.float64) * inv_std).astype(np.float32).reshape(1, 3, 1, 1)
        x = self.node("Mul", [x, self.constant(scale, "scale")])
        return self.node("Add", [x, self.constant(shift, "shift")])

    def avg_max_grid(self, x: str) -> str:
        """[N, C, H, W] -> [N, 5C]: the global average, then each 2x2-grid cell's maximum (cells as Pool cuts them)."""
        parts = [self.node("Flatten", [self.node("GlobalAveragePool", [x])], axis=1)]
        axes = self.constant(np.array([2, 3], np.int64), "axes")
        for top, bottom, left, right in grid_cells(*self.size):
            cell = self.node("Slice", [x, self.constant(np.array([top, left], np.int64), "starts"),
                                       self.constant(np.array([bottom, right], np.int64), "ends"), axes])
            parts.append(self.node("ReduceMax", [cell], axes=[2, 3], keepdims=0))
        return self.node("Concat", parts, axis=1)


def build_onnx(backbone: Backbone, preprocessing: Preprocessing, pooling: str):
    """The ONNX model: frames [N, H, W, 3] uint8 RGB -> features [N, F] float32."""
    from onnx import TensorProto, checker, helper

    graph = _Graph(backbone.spec.padding == "keras", preprocessing.height, preprocessing.width)
    x = graph.preprocess(INPUT_NAME, preprocessing)
    for module in backbone.features:
        x = graph.block(x, module)
    if pooling == "avg":
        x = graph.node("GlobalAveragePool", [x])
    elif pooling == "avg_max2x2":
        x = graph.avg_max_grid(x)
    else:  # Keras' Flatten order: (H, W, C)
        x = graph.node("Transpose", [x], perm=[0, 2, 3, 1])
    graph.node("Flatten", [x], output=OUTPUT_NAME, axis=1)
    dim = feature_dim(preprocessing, pooling)
    model = helper.make_model(
        helper.make_graph(
            graph.nodes, "mobilenetv2_features",
            [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8,
                                           ["batch", preprocessing.height, preprocessing.width, 3])],
            [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", dim])],
            graph.initializers),
        opset_imports=[helper.make_opsetid("", OPSET)], producer_name="proctor")
    model.ir_version = IR_VERSION
    checker.check_model(model)
    return model


def onnx_path(cache_dir: str | os.PathLike, backbone: Backbone, preprocessing: Preprocessing, pooling: str) -> Path:
    """Where the exported graph for this backbone, input size, preprocessing and pooling is cached."""
    # Scaling, normalisation and channel order are in the graph: a hash of them keeps graphs apart.
    norm = hashlib.sha256(repr((preprocessing.scale, preprocessing.mean, preprocessing.std,
                                preprocessing.channels)).encode()).hexdigest()[:8]
    return Path(cache_dir) / (f"backbone-{backbone.weights_hash}-{preprocessing.width}x{preprocessing.height}-"
                              f"{pooling}-{norm}-v{GRAPH_VERSION}.onnx")


def export_onnx(backbone: Backbone, preprocessing: Preprocessing, pooling: str,
                cache_dir: str | os.PathLike | None) -> bytes | Path:
    """The ONNX graph: a cached file under cache_dir (written atomically once), or bytes without a cache."""
    if cache_dir is None:
        return build_onnx(backbone, preprocessing, pooling).SerializeToString()
    path = onnx_path(cache_dir, backbone, preprocessing, pooling)
    if path.is_file():
        return path
    data = build_onnx(backbone, preprocessing, pooling).SerializeToString()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    except OSError as exc:
        # A read-only or full data dir costs the cache, not the service.
        logger.warning("cannot cache the ONNX graph in %s (%s); using it from memory", path.parent, exc)
        return data
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        logger.warning("cannot cache the ONNX graph as %s (%s); using it from memory", path, exc)
        return data
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("exported the backbone %s at %dx%d (%s) to %s", backbone.weights_hash[:12], preprocessing.width,
                preprocessing.height, pooling, path)
    return path
