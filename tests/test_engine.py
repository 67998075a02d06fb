"""The engine: runtimes agree, one backbone pass per group per batch, atomic head swaps, refusals, bad input."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import warnings

import numpy as np
import pytest
import simplejpeg
import torch
import torchvision

from proctor.config import Config
from proctor.models import backbone as bb
from proctor.models.backbone import resize_frames
from proctor.models.engine import Engine, EngineError
from proctor.models.heads import make_head
from proctor.models.interface import Preprocessing
from proctor.models.onnx_export import onnx_path
from proctor.models.keras_import import read_keras_model
from keras_reference import flatten_dense_top, keras_forward, keras_weights, write_h5

SMALL = Preprocessing(width=64, height=36)


@pytest.fixture(scope="module")
def backbone():
    return bb.random_backbone(seed=0, preprocessing=SMALL)


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def onnx_engine(backbone, onnx_cache):
    return Engine(bb.BackboneLibrary([backbone]), device="cpu", runtime="onnx", cache_dir=onnx_cache)


@pytest.fixture(scope="module")
def torch_engine(backbone):
    return Engine(bb.BackboneLibrary([backbone]), device="cpu", runtime="torch")


def _heads(spec, count, seed=0, prefix="h"):
    rng = np.random.default_rng(seed)
    return [make_head(f"{prefix}{i}", f"Program {i}", "logistic",
                      {"weight": rng.standard_normal((1, 1280)) * 0.05, "bias": [rng.standard_normal() * 0.1]}, spec)
            for i in range(count)]


def _frames(count, seed=0, size=(64, 36)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) for _ in range(count)]


def test_onnx_and_torch_runtimes_agree(onnx_engine, torch_engine, backbone):
    heads = _heads(backbone.spec, 5)
    onnx_engine.set_heads(heads)
    torch_engine.set_heads(heads)
    frames = _frames(6)
    a, b = onnx_engine.classify(frames), torch_engine.classify(frames)
    assert a.values.shape == (6, 5) and [h.name for h in a.heads] == [f"h{i}" for i in range(5)]
    np.testing.assert_allclose(a.values, b.values, atol=1e-4)
    np.testing.assert_allclose(onnx_engine.features(frames), backbone.extract(frames), rtol=1e-3, atol=1e-3)
    assert a.values.std() > 0.01  # the comparison means something: scores vary


def test_preprocessing_inside_the_onnx_graph_matches_torch(backbone, tmp_path):
    # Heads with other input sizes, scalings and channel orders than the frames: resized per group, then
    # normalised inside the ONNX graph, they must score as the torch runtime does.
    bgr = Preprocessing(width=48, height=27, scale=1.0, mean=(103.9, 116.8, 123.7), std=(1.0, 1.0, 1.0),
                        channels="BGR")
    keras = dataclasses.replace(bb.KERAS_PREPROCESSING, width=80, height=45)
    heads = []
    for i, p in enumerate((backbone.spec.preprocessing, bgr, keras)):
        spec = dataclasses.replace(backbone.spec, preprocessing=p)
        heads += _heads(spec, 2, seed=i, prefix=f"g{i}-")
    onnx = Engine(bb.BackboneLibrary([backbone]), device="cpu", runtime="onnx", cache_dir=tmp_path)
    eager = Engine(bb.BackboneLibrary([backbone]), device="cpu", runtime="torch")
    for engine in (onnx, eager):
        engine.set_heads(heads, strict=True)
    assert len(onnx.describe()["groups"]) == 3
    frames = _frames(4, seed=5, size=(96, 54)) + _frames(1, seed=6, size=(50, 40))
    a, b = onnx.classify(frames), eager.classify(frames)
    np.testing.assert_allclose(a.values, b.values, atol=1e-4)
    assert a.values.std() > 0.01


def test_workers_classify_batches_at_the_same_time(backbone, tmp_path):
    engine = Engine(bb.BackboneLibrary([backbone]), device="cpu", runtime="onnx", cache_dir=tmp_path, workers=2)
    assert (engine.workers, engine.threads) == (2, max(1, (os.cpu_count() or 1) // 2))
    engine.set_heads(_heads(backbone.spec, 3))
    batches = [_frames(5, seed=s) for s in range(6)]
    expected = [engine.classify(frames).values for frames in batches]
    before = engine.backbone_calls
    results = [None] * len(batches)

    def work(i):
        results[i] = engine.classify(batches[i]).values

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for got, want in zip(results, expected):
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert engine.backbone_calls - before == len(batches)
    # Eager torch shares one process-wide thread pool: one batch at a time whatever is asked.
    assert Engine(bb.BackboneLibrary([backbone]), device="cpu", runtime="torch", workers=4).workers == 1
    with pytest.raises(EngineError, match="workers"):
        Engine(bb.BackboneLibrary([backbone]), device="cpu", runtime="onnx", workers=0)


def test_cpu_batch_runs_a_batch_in_slices_with_the_same_scores(backbone, onnx_cache, onnx_engine):
    sliced = Engine(bb.BackboneLibrary([backbone]), device="cpu", runtime="onnx", cache_dir=onnx_cache, cpu_batch=2)
    heads = _heads(backbone.spec, 3)
    sliced.set_heads(heads)
    onnx_engine.set_heads(heads)
    (runner,) = sliced._runners.values()
    session, calls = runner.session, []

    class CountingSession:
        def run(self, outputs, feed):
            calls.append(len(feed[runner.input_name]))
            return session.run(outputs, feed)

    runner.session = CountingSession()
    frames = _frames(5, seed=4)
    np.testing.assert_allclose(sliced.classify(frames).values, onnx_engine.classify(frames).values, atol=1e-5)
    assert calls == [2, 2, 1]  # 5 frames in slices of at most 2, in order
    np.testing.assert_allclose(sliced.features(frames), onnx_engine.features(frames), atol=1e-5)
    assert sliced.describe()["cpu_batch"] == 2 and onnx_engine.describe()["cpu_batch"] is None
    # From the server's config (default 2); eager torch has no slices; nonsense is refused.
    assert Engine.from_config(Config(data_dir=str(onnx_cache), cpu_batch=3), runtime="onnx").cpu_batch == 3
    assert Engine.from_config(Config(data_dir=str(onnx_cache)), runtime="torch").cpu_batch is None
    with pytest.raises(EngineError, match="cpu_batch"):
        Engine(bb.BackboneLibrary([backbone]), device="cpu", runtime="onnx", cpu_batch=0)


def test_avg_max2x2_heads_classify_alike_in_onnx_and_torch(backbone, tmp_path):
    # 80x45 gives a 3x2 map: the grid's cells overlap, which the ONNX graph must cut as torch does.
    odd = dataclasses.replace(backbone.spec, preprocessing=Preprocessing(width=80, height=45), pooling="avg_max2x2")
    grid = dataclasses.replace(backbone.spec, pooling="avg_max2x2")
    rng = np.random.default_rng(3)
    heads = [make_head(f"{name}{i}", "P", "logistic", {"weight": rng.standard_normal((1, 6400)) * 0.05,
                                                          "bias": [0.0]}, spec)
             for name, spec in (("grid", grid), ("odd", odd)) for i in range(2)] + _heads(backbone.spec, 2)
    onnx = Engine(bb.BackboneLibrary([backbone]), device="cpu", runtime="onnx", cache_dir=tmp_path)
    eager = Engine(bb.BackboneLibrary([backbone]), device="cpu", runtime="torch")
    for engine in (onnx, eager):
        engine.set_heads(heads, strict=True)
    # The avg heads join the avg_max2x2 group of their backbone and input: two groups, two backbone passes.
    assert [(g["input"], g["pooling"], g["heads"]) for g in onnx.describe()["groups"]] == \
        [("64x36", "avg_max2x2", 4), ("80x45", "avg_max2x2", 2)]
    frames = _frames(3, seed=11, size=(80, 45))
    before = onnx.backbone_calls
    a, b = onnx.classify(frames), eager.classify(frames)
    assert onnx.backbone_calls - before == 2
    alone = Engine(bb.BackboneLibrary([backbone]), device="cpu", runtime="onnx", cache_dir=tmp_path)
    alone.set_heads(heads[4:])
    np.testing.assert_allclose(a.values[:, 4:], alone.classify(frames).values, atol=1e-5)
    np.testing.assert_allclose(a.values, b.values, atol=1e-4)
    assert a.values.std() > 0.01
    small = _frames(3, seed=12)  # at the grid group's input size: no resize differs between the two paths
    features = onnx.features(small, spec=grid)
    np.testing.assert_allclose(features, backbone.extract(small, pooling="avg_max2x2"), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(a.values[:, 0], heads[0].scores(onnx.features(frames, spec=grid)), atol=1e-5)
    assert any("-80x45-avg_max2x2-" in p.name for p in tmp_path.glob("*.onnx"))


def test_every_head_kind_scores_as_it_does_alone(onnx_engine, backbone):
    rng = np.random.default_rng(7)
    mlp = make_head("mlp", "M", "mlp", {"hidden.weight": rng.standard_normal((16, 1280)) * 0.05,
                                         "hidden.bias": np.zeros(16), "out.weight": rng.standard_normal((1, 16)),
                                         "out.bias": [0.0]}, backbone.spec)
    softmax = make_head("soft", "S", "keras_softmax", {"weight": rng.standard_normal((2, 1280)) * 0.05,
                                                       "bias": [0.1, -0.1]}, backbone.spec)
    heads = [mlp, *_heads(backbone.spec, 2), softmax]
    onnx_engine.set_heads(heads)
    frames = _frames(3, seed=9)
    scores = onnx_engine.classify(frames)
    features = onnx_engine.features(frames)
    for i, head in enumerate(heads):
        np.testing.assert_allclose(scores.values[:, i], head.scores(features), atol=1e-5)


def test_backbone_runs_once_per_batch_whatever_the_number_of_heads(onnx_engine, backbone):
    calls = {}
    for count in (1, 20):
        onnx_engine.set_heads(_heads(backbone.spec, count))
        before = onnx_engine.backbone_calls
        scores = onnx_engine.classify(_frames(8))
        calls[count] = onnx_engine.backbone_calls - before
        assert scores.values.shape == (8, count)
    assert calls == {1: 1, 20: 1}


def test_onnx_graph_is_cached_by_hash_and_size(onnx_engine, onnx_cache, backbone):
    onnx_engine.set_heads(_heads(backbone.spec, 1))
    files = list(onnx_cache.glob("*.onnx"))
    assert [f.name for f in files] == [onnx_path(onnx_cache, backbone, backbone.spec.preprocessing, "avg").name]
    assert files[0].name.startswith(f"backbone-{backbone.weights_hash}-64x36-avg-")
    stamp = files[0].stat().st_mtime_ns
    Engine(bb.BackboneLibrary([backbone]), device="cpu", runtime="onnx", cache_dir=onnx_cache).set_heads(
        _heads(backbone.spec, 1))
    assert files[0].stat().st_mtime_ns == stamp


def test_head_swap_is_atomic(torch_engine, backbone):
    set_a = _heads(backbone.spec, 3, seed=1, prefix="a")
    set_b = _heads(backbone.spec, 7, seed=2, prefix="b")
    frame = _frames(1, seed=3)
    expected = {}
    for heads in (set_a, set_b):
        torch_engine.set_heads(heads)
        expected.update(torch_engine.classify(frame).row(0))
    stop = threading.Event()
    seen, problems = set(), []

    def swap():
        while not stop.is_set():
            torch_engine.set_heads(set_a)
            time.sleep(0.001)  # lets the classifying thread have the GIL between swaps
            torch_engine.set_heads(set_b)
            time.sleep(0.001)

    swapper = threading.Thread(target=swap)
    swapper.start()
    try:
        for _ in range(40):
            scores = torch_engine.classify(frame)
            names = tuple(h.name for h in scores.heads)
            seen.add(names)
            if names not in ((tuple(h.name for h in set_a)), tuple(h.name for h in set_b)):
                problems.append(names)
            for name, value in scores.row(0).items():
                if abs(value - expected[name]) > 1e-5:
                    problems.append((name, value, expected[name]))
    finally:
        stop.set()
        swapper.join()
    assert problems == []
    assert len(seen) == 2  # both sets were really seen mid-swap


def test_foreign_backbone_head_is_refused(torch_engine, backbone):
    ours = _heads(backbone.spec, 2)
    foreign = _heads(bb.BackboneSpec("ef" * 32, SMALL), 1, prefix="foreign")
    with pytest.raises(EngineError, match=r"head 'foreign0' was made for backbone efefefefefef, which this server"):
        torch_engine.set_heads(ours + foreign, strict=True)
    refused = torch_engine.set_heads(ours + foreign + [b"not a head file"])
    assert [h.name for h in torch_engine.heads] == ["h0", "h1"]
    assert len(refused) == 2 and "foreign0" in refused[0] and "not a safetensors file" in refused[1]
    # The same check, asked before a head is accepted (the head upload API answers 400 with it).
    assert torch_engine.check_head(ours[0]) is None
    assert "which this server does not have" in torch_engine.check_head(foreign[0])


def _keras_head_72x40(backbone, tmp_path):
    """(a head imported from a Keras model at 72x40 input, its backbone installed under tmp_path; the
    model's weights; its Dense layer)."""
    weights = keras_weights(seed=4)
    rng = np.random.default_rng(0)
    dense = {"kernel": (rng.standard_normal((2 * 3 * 1280, 2)) * 0.01).astype(np.float32),
             "bias": np.array([0.1, 0.0], np.float32)}
    path = write_h5(tmp_path / "old.h5", weights, version=2, height=40, width=72,
                    top=flatten_dense_top(2, "softmax"), top_weights={"dense": dense})
    imported = read_keras_model(path, name="old")
    bb.BackboneLibrary([backbone], tmp_path / "backbones").install(imported.backbone)
    return imported.head, weights, dense


def test_groups_of_other_backbones_and_sizes(backbone, tmp_path):
    """A head imported from Keras keeps its backbone and input size: two groups, two backbone passes."""
    head, weights, dense = _keras_head_72x40(backbone, tmp_path)
    engine = Engine(bb.BackboneLibrary([backbone], tmp_path / "backbones"), device="cpu", runtime="onnx",
                    cache_dir=tmp_path / "cache")
    engine.set_heads([head] + _heads(backbone.spec, 3))
    assert engine.frame_size == (72, 40)  # the largest input among the groups
    frames = _frames(2, size=(72, 40))
    before = engine.backbone_calls
    scores = engine.classify(frames)
    assert engine.backbone_calls - before == 2 and scores.values.shape == (2, 4)
    reference = keras_forward(weights, np.stack(frames) / 255.0).reshape(2, -1)
    logits = reference @ dense["kernel"] + dense["bias"]
    np.testing.assert_allclose(scores.values[:, 0], 1 / (1 + np.exp(logits[:, 1] - logits[:, 0])), atol=1e-3)
    assert engine.describe()["groups"][0]["input"] == "72x40"


def test_a_frame_given_at_each_groups_size_gives_each_group_its_own_pixels(backbone, tmp_path):
    """With heads of two input sizes, a frame decoded at each size scores as each group alone would on it."""
    keras_head, _, _ = _keras_head_72x40(backbone, tmp_path)

    def engine(heads):
        e = Engine(bb.BackboneLibrary([backbone], tmp_path / "backbones"), device="cpu", runtime="torch")
        e.set_heads(heads)
        return e

    mine = _heads(backbone.spec, 2)
    both = engine([keras_head] + mine)
    assert both.frame_sizes == ((72, 40), (64, 36))
    large, small = _frames(3, seed=1, size=(72, 40)), _frames(3, seed=2, size=(64, 36))
    scores = both.classify([(a, b) for a, b in zip(large, small)])
    np.testing.assert_allclose(scores.values[:, :1], engine([keras_head]).classify(large).values, atol=1e-5)
    np.testing.assert_allclose(scores.values[:, 1:], engine(mine).classify(small).values, atol=1e-5)
    # Decoding JPEGs on the engine's device resizes the picture once for each group, as above.
    jpegs = [simplejpeg.encode_jpeg(np.ascontiguousarray(f), quality=95, colorspace="RGB") for f in large]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pictures = [torchvision.io.decode_jpeg(torch.frombuffer(bytearray(j), dtype=torch.uint8)).permute(1, 2, 0)
                    for j in jpegs]
    per_size = [tuple(resize_frames(p.unsqueeze(0), w, h)[0].numpy() for w, h in both.frame_sizes) for p in pictures]
    np.testing.assert_allclose(both.classify_jpegs(jpegs).values, both.classify(per_size).values, atol=1e-5)
    # A tuple without a picture at some group's size (the heads changed meanwhile): its first is resized.
    alone = engine(mine).classify([(f,) for f in large])
    np.testing.assert_allclose(alone.values, engine(mine).classify(large).values, atol=1e-5)


def test_frames_of_other_sizes_are_resized(torch_engine, backbone):
    torch_engine.set_heads(_heads(backbone.spec, 4))
    small = np.full((36, 64, 3), (30, 120, 200), np.uint8)
    large = np.full((720, 1280, 3), (30, 120, 200), np.uint8)
    odd = np.full((50, 33, 3), (30, 120, 200), np.uint8)
    scores = torch_engine.classify([small, large, odd])
    np.testing.assert_allclose(scores.values[1], scores.values[0], atol=1e-5)
    np.testing.assert_allclose(scores.values[2], scores.values[0], atol=1e-5)
    alone = torch_engine.classify([large])  # all frames the same (wrong) size: resized as a batch
    np.testing.assert_allclose(alone.values[0], scores.values[0], atol=1e-5)


def test_bad_inputs(torch_engine, backbone):
    torch_engine.set_heads(_heads(backbone.spec, 2))
    assert torch_engine.classify([]).values.shape == (0, 2)
    with pytest.raises(ValueError, match="frame 1: expected an HxWx3 uint8 RGB array"):
        torch_engine.classify([_frames(1)[0], np.zeros((36, 64, 3), np.float64)])
    with pytest.raises(EngineError, match="runtime='tensorrt'"):
        Engine(bb.BackboneLibrary([backbone]), runtime="tensorrt")
    with pytest.raises(EngineError, match="device='tpu'"):
        Engine(bb.BackboneLibrary([backbone]), device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match="device='cuda': torch sees no CUDA GPU"):
            Engine(bb.BackboneLibrary([backbone]), device="cuda")


def test_no_heads_means_no_backbone_pass(backbone):
    engine = Engine(bb.BackboneLibrary([backbone]), device="cpu", runtime="torch")
    scores = engine.classify(_frames(3))
    assert scores.values.shape == (3, 0) and engine.backbone_calls == 0
    assert engine.frame_size == (64, 36) and engine.heads == ()


def test_from_config_uses_the_configured_weights_and_cache(backbone, tmp_path):
    weights = backbone.save(tmp_path / "weights.pt")
    config = Config(data_dir=str(tmp_path / "var"), backbone_weights=str(weights), device="cpu")
    engine = Engine.from_config(config)
    assert engine.runtime == "onnx" and engine.backbone.weights_hash == backbone.weights_hash
    engine.set_heads(_heads(backbone.spec, 1))
    assert list((tmp_path / "var" / "cache").glob("*.onnx"))
    assert engine.describe()["runtime"] == "onnx"


def test_random_engine_for_other_tests():
    engine = Engine.random(seed=3, width=48, height=32)
    engine.set_heads(_heads(engine.backbone, 2))
    assert engine.classify(_frames(2, size=(48, 32))).values.shape == (2, 2)


def test_unwritable_cache_costs_the_cache_not_the_service(backbone, tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache directory should be")
    engine = Engine(bb.BackboneLibrary([backbone]), device="cpu", runtime="onnx", cache_dir=blocker / "sub")
    engine.set_heads(_heads(backbone.spec, 1))
    assert engine.classify(_frames(1)).values.shape == (1, 1)


def test_bad_frames_are_refused_even_without_heads(backbone):
    engine = Engine(bb.BackboneLibrary([backbone]), device="cpu", runtime="torch")
    with pytest.raises(ValueError, match="frame 0: expected an HxWx3 uint8 RGB array"):
        engine.classify([np.zeros((4, 4), np.uint8)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_cuda_runtime_matches_the_cpu(onnx_engine, backbone, precision):
    heads = _heads(backbone.spec, 5)
    cuda = Engine(bb.BackboneLibrary([backbone]), device="cuda", precision=precision)
    assert cuda.runtime == "torch"
    cuda.set_heads(heads)
    onnx_engine.set_heads(heads)
    frames = _frames(6) + [np.zeros((72, 128, 3), np.uint8)]
    np.testing.assert_allclose(cuda.classify(frames).values, onnx_engine.classify(frames).values,
                               atol=2e-2 if precision == "fp16" else 1e-4)


def test_classify_jpegs_decodes_on_the_engines_device_and_agrees_with_classify(torch_engine, backbone):
    from proctor.batching import decode

    torch_engine.set_heads(_heads(backbone.spec, 3))
    rng = np.random.default_rng(5)
    width, height = torch_engine.frame_size
    jpegs, reference = [], []
    for _ in range(3):
        blocks = rng.integers(0, 255, (height // 4, width // 4, 3), dtype=np.uint8)
        pixels = np.ascontiguousarray(np.kron(blocks, np.ones((4, 4, 1), np.uint8)))
        jpegs.append(simplejpeg.encode_jpeg(pixels, quality=95, colorspace="RGB"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            image = torchvision.io.decode_jpeg(torch.frombuffer(bytearray(jpegs[-1]), dtype=torch.uint8),
                                               mode=torchvision.io.ImageReadMode.RGB)
        reference.append(image.permute(1, 2, 0).numpy())
        # The batch decoder sees the same screen as the server's CPU decoder, up to IDCT rounding.
        assert np.abs(reference[-1].astype(int) - decode.decode_rgb(jpegs[-1], (width, height))).mean() < 4
    calls = torch_engine.backbone_calls
    on_device = torch_engine.classify_jpegs(jpegs)
    assert torch_engine.backbone_calls == calls + 1  # one backbone pass for the batch
    np.testing.assert_allclose(on_device.values, torch_engine.classify(reference).values, atol=1e-5)
    big = simplejpeg.encode_jpeg(np.zeros((720, 1280, 3), np.uint8), colorspace="RGB")
    assert torch_engine.classify_jpegs([big]).values.shape == (1, 3)  # resized to the model's size
    with pytest.raises(RuntimeError):
        torch_engine.classify_jpegs([jpegs[0], jpegs[1][: len(jpegs[1]) // 3]])
