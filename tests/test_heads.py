"""Head files (safetensors + JSON metadata), store records, validation errors, and the stacked form."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save

from proctor.models.backbone import BackboneSpec
from proctor.models.heads import (
    Head, HeadError, HeadStack, head_from_record, head_to_record, load_heads, make_head, read_head_file,
    share_backbone_passes, write_head_file,
)
from proctor.models.interface import Preprocessing

SPEC = BackboneSpec("ab" * 32, Preprocessing(width=64, height=36))
F = 1280


def _logistic(name="word", seed=0, **kw) -> Head:
    rng = np.random.default_rng(seed)
    return make_head(name, kw.pop("program", "Word"), "logistic",
                     {"weight": rng.standard_normal((1, F)) * 0.05, "bias": [0.1]}, SPEC, **kw)


def _mlp(name="ide", hidden=8, seed=1) -> Head:
    rng = np.random.default_rng(seed)
    return make_head(name, "IDE", "mlp", {"hidden.weight": rng.standard_normal((hidden, F)) * 0.05,
                                          "hidden.bias": rng.standard_normal(hidden) * 0.1,
                                          "out.weight": rng.standard_normal((1, hidden)), "out.bias": [-0.2]},
                     SPEC, threshold=0.8, metrics={"f1": 0.97})


def _softmax(name="excel", seed=2) -> Head:
    rng = np.random.default_rng(seed)
    return make_head(name, "Excel", "keras_softmax", {"weight": rng.standard_normal((2, F)) * 0.05,
                                                      "bias": [0.3, -0.3]}, SPEC, threshold=0.95)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _reference(head: Head, f: np.ndarray) -> np.ndarray:
    """Each kind's score written out directly from its definition."""
    t = head.tensors
    if head.kind == "logistic":
        return _sigmoid(f @ t["weight"][0] + t["bias"][0])
    if head.kind == "keras_softmax":
        z = f @ t["weight"].T + t["bias"]
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e[:, 0] / e.sum(axis=1)
    hidden = np.maximum(f @ t["hidden.weight"].T + t["hidden.bias"], 0.0)
    return _sigmoid(hidden @ t["out.weight"][0] + t["out.bias"][0])


@pytest.mark.parametrize("make", [_logistic, _mlp, _softmax])
def test_round_trip_through_bytes_file_and_record(make, tmp_path):
    head = make()
    for again in (read_head_file(head.to_bytes()), read_head_file(write_head_file(head, tmp_path / "h.safetensors"))):
        assert again.metadata() == head.metadata()
        for key, value in head.tensors.items():
            np.testing.assert_array_equal(again.tensors[key], value)
    record = head_to_record(head, active=False)
    assert (record.name, record.program, record.backbone_hash, record.active) == \
        (head.name, head.program, head.backbone_hash, False)
    assert record.created_at.tzinfo is not None
    assert head_from_record(record).metadata() == head.metadata()
    dt.datetime.fromisoformat(head.created)  # ISO


def test_record_columns_win_over_the_file():
    record = dataclasses.replace(head_to_record(_logistic()), program="Microsoft Word", threshold=0.7,
                                 description="edited")
    head = head_from_record(record)
    assert (head.program, head.threshold, head.description) == ("Microsoft Word", 0.7, "edited")
    foreign = dataclasses.replace(record, backbone_hash="cd" * 32)
    with pytest.raises(HeadError, match="stored head 'word': record says backbone cdcdcdcdcdcd"):
        head_from_record(foreign)


def test_info_carries_what_the_verdict_needs():
    info = _mlp().info()
    assert (info.name, info.program, info.threshold) == ("ide", "IDE", 0.8)
    assert info.metadata["kind"] == "mlp" and info.metadata["metrics"] == {"f1": 0.97}


def test_stack_matches_each_head_alone_in_the_given_order():
    heads = [_mlp("a", hidden=8), _logistic("b"), _softmax("c"), _mlp("d", hidden=3, seed=9), _logistic("e", seed=4)]
    f = np.random.default_rng(0).standard_normal((6, F)).astype(np.float32)
    stack = HeadStack.build(heads)
    # One matrix for all heads: 3 linear rows (2 logistic, the softmax as a logit difference), then
    # the 2 MLP heads' hidden units, each padded to 8.
    assert stack.weight.shape == (3 + 2 * 8, F)
    scores = stack.apply(torch.from_numpy(f)).numpy()
    expected = np.stack([_reference(h, f.astype(np.float64)) for h in heads], axis=1)
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stack.weight = None


def test_stack_refuses_mixed_groups_and_empty():
    other = make_head("x", "X", "logistic", {"weight": np.zeros((1, F)), "bias": [0]},
                      BackboneSpec("cd" * 32, SPEC.preprocessing))
    with pytest.raises(HeadError, match="different backbone groups"):
        HeadStack.build([_logistic(), other])
    with pytest.raises(HeadError, match="at least one head"):
        HeadStack.build([])


@pytest.mark.parametrize("change,message", [
    ({"tensors": {"weight": np.zeros((1, 1000)), "bias": np.zeros(1)}}, r"tensor weight has shape \(1, 1000\), expected \(1, 1280\)"),
    ({"tensors": {"weight": np.zeros((1, F))}}, r"a logistic head needs tensors \['bias', 'weight'\]"),
    ({"tensors": {"weight": np.full((1, F), np.nan), "bias": np.zeros(1)}}, "NaN or infinite"),
    ({"kind": "svm"}, "unknown head kind 'svm'"),
    ({"threshold": 1.5}, "threshold must be in"),
    ({"name": "bad name!"}, "invalid head name 'bad name!'"),
    ({"program": " "}, "program must be a non-empty string"),
    ({"backbone_hash": "abc"}, "backbone_hash must be 64 hex digits"),
    ({"pooling": "max"}, "unknown pooling 'max'"),
    ({"created": "yesterday"}, "created must be an ISO date and time, got 'yesterday'"),
])
def test_invalid_heads_are_refused(change, message):
    with pytest.raises(HeadError, match=message):
        _logistic().replace(**change)


def _file_with_metadata(meta: dict | None, tensors=None) -> bytes:
    tensors = tensors or {"weight": np.zeros((1, F), np.float32), "bias": np.zeros(1, np.float32)}
    return save(tensors, metadata=None if meta is None else {"proctor": json.dumps(meta)})


@pytest.mark.parametrize("data,message", [
    (b"", "not a safetensors file"),
    (b"PK\x03\x04 this is a zip", "not a safetensors file"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......", "not a safetensors file"),
])
def test_not_safetensors(data, message):
    with pytest.raises(HeadError, match=f"head file: {message}"):
        read_head_file(data)


def test_truncated_file():
    data = _logistic().to_bytes()
    with pytest.raises(HeadError, match="not a safetensors file"):
        read_head_file(data[: len(data) // 2])


def test_metadata_problems_are_named(tmp_path):
    good = _logistic().metadata()
    with pytest.raises(HeadError, match="without proctor head metadata"):
        read_head_file(_file_with_metadata(None))
    with pytest.raises(HeadError, match="lacks backbone_hash, threshold"):
        read_head_file(_file_with_metadata({k: v for k, v in good.items() if k not in ("backbone_hash", "threshold")}))
    with pytest.raises(HeadError, match="version 9 is not supported"):
        read_head_file(_file_with_metadata({**good, "version": 9}))
    with pytest.raises(HeadError, match="not a proctor-head description"):
        read_head_file(_file_with_metadata({**good, "format": "other"}))
    with pytest.raises(HeadError, match="invalid preprocessing"):
        read_head_file(_file_with_metadata({**good, "preprocessing": {"width": 64}}))
    # Fields of the wrong type or nesting: a HeadError naming the file, not a TypeError (a 500 on upload).
    with pytest.raises(HeadError, match="invalid preprocessing"):
        read_head_file(_file_with_metadata({**good, "preprocessing": 5}))
    with pytest.raises(HeadError, match="invalid head metadata"):
        read_head_file(_file_with_metadata({**good, "metrics": 5}))
    with pytest.raises(HeadError, match="not JSON"):
        read_head_file(save({"weight": np.zeros((1, F), np.float32), "bias": np.zeros(1, np.float32)},
                            metadata={"proctor": "[" * 100_000}))
    # An input larger than any frame only upscales, at a cost that grows with its area, for every frame.
    with pytest.raises(HeadError, match="each side must be 16..1920"):
        read_head_file(_file_with_metadata({**good, "preprocessing": {**good["preprocessing"], "width": 4096,
                                                                      "height": 4096}}))
    # Normalisation that is not a number, or absurd: every score of the head would be NaN or saturated.
    for bad in ({"scale": float("nan")}, {"std": [0.0, 1.0, 1.0]}, {"mean": [1e300, 0, 0]}, {"scale": 1e9}):
        pre = {**good["preprocessing"], **bad}
        with pytest.raises(HeadError, match="invalid normalisation"):
            read_head_file(_file_with_metadata({**good, "preprocessing": pre}))
    path = tmp_path / "wrong.safetensors"
    path.write_bytes(_file_with_metadata(good, {"weight": np.zeros((1, 5), np.float32),
                                                "bias": np.zeros(1, np.float32)}))
    with pytest.raises(HeadError, match=r"wrong\.safetensors: head 'word': tensor weight has shape \(1, 5\)"):
        read_head_file(path)
    with pytest.raises(HeadError, match=r"missing\.safetensors: cannot read"):
        read_head_file(tmp_path / "missing.safetensors")


def test_naive_creation_time_is_taken_as_utc():
    head = _logistic().replace(created="2026-01-02T03:04:05")
    assert head.created == "2026-01-02T03:04:05+00:00"
    assert head_to_record(head).created_at == dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)


def test_load_heads_refuses_duplicate_names():
    with pytest.raises(HeadError, match="two heads are named 'word'"):
        load_heads([_logistic(), _logistic(seed=5).to_bytes()])


def test_avg_max2x2_heads_round_trip_and_check_their_width():
    spec = BackboneSpec("ab" * 32, Preprocessing(width=320, height=180), pooling="avg_max2x2")
    head = make_head("grid", "Grid", "logistic", {"weight": np.zeros((1, 5 * F)), "bias": [0]}, spec)
    again = read_head_file(head.to_bytes())
    assert again.pooling == "avg_max2x2" and again.feature_dim == 6400 and again.group == head.group
    with pytest.raises(HeadError, match=r"weight has shape \(1, 1280\), expected \(1, 6400\)"):
        make_head("grid", "Grid", "logistic", {"weight": np.zeros((1, F)), "bias": [0]}, spec)
    with pytest.raises(HeadError, match=r"head 'grid': features of shape \(3, 1280\), expected \[N, 6400\] "
                                        r"\(avg_max2x2 pooling\)"):
        head.scores(np.zeros((3, F)))


def test_avg_heads_share_the_pass_of_avg_max2x2_heads_and_score_the_same():
    grid_spec = dataclasses.replace(SPEC, pooling="avg_max2x2")
    grid = make_head("grid", "Grid", "logistic", {"weight": np.ones((1, 5 * F)), "bias": [0]}, grid_spec)
    other = make_head("other", "O", "logistic", {"weight": np.ones((1, F)), "bias": [0]},
                      dataclasses.replace(SPEC, preprocessing=Preprocessing(width=32, height=18)))
    avg = [_logistic("a"), _mlp("b", hidden=4), _softmax("c")]
    shared = share_backbone_passes([*avg, grid, other])
    assert [h.pooling for h in shared] == ["avg_max2x2"] * 4 + ["avg"]  # other input size: stays as it is
    assert shared[3] is grid and shared[4] is other and len({h.group for h in shared[:4]}) == 1
    f = np.random.default_rng(1).standard_normal((5, 5 * F)).astype(np.float32)
    for before, after in zip(avg, shared):
        np.testing.assert_allclose(after.scores(f), before.scores(f[:, :F]), atol=1e-6)
    assert share_backbone_passes(avg) == avg  # no avg_max2x2 head: nothing changes


def test_flatten_heads_use_the_whole_map():
    spec = BackboneSpec("ab" * 32, Preprocessing(width=400, height=225), pooling="flatten")
    head = make_head("old", "Old", "keras_softmax", {"weight": np.zeros((2, 13 * 8 * F)), "bias": [0, 0]}, spec)
    assert head.feature_dim == 133120 and read_head_file(head.to_bytes()).pooling == "flatten"
