"""benchmarks/overhead.py: the sleeping classifier, thread grouping and the ceiling it reports."""

from __future__ import annotations

import time

import numpy as np
import pytest

from benchmarks import overhead
from fakes import FakeClassifier


def frames(*colours):
    out = []
    for channel in colours:
        frame = np.zeros((180, 320, 3), np.uint8)
        frame[:, :, channel] = 200
        out.append(frame)
    return out


def test_sleeping_classifier_scores_each_frame_once_then_only_sleeps():
    real = FakeClassifier(delay_s=0.0)
    sleeping = overhead.SleepingClassifier(real, per_frame_s=0.02)
    first = sleeping.classify(frames(0, 1))
    assert real.backbone_calls == 1 and sleeping.scored == 2
    started = time.perf_counter()
    again = sleeping.classify(frames(1, 0, 1))
    took = time.perf_counter() - started
    assert real.backbone_calls == 1  # every frame known: the real engine is not called
    assert took >= 0.06  # 3 frames x 20 ms, the backbone's time for them
    assert np.array_equal(again.values, first.values[[1, 0, 1]])
    assert sleeping.heads == real.heads and sleeping.frame_size == real.frame_size
    sleeping.set_heads([])  # a head change may change every score: forget them
    sleeping.classify(frames(0))
    assert real.backbone_calls == 2


def test_threads_are_grouped_by_their_names():
    names = {1: "MainThread", 2: "decode_0", 3: "decode_1", 4: "inference_0", 5: "Thread-1 (_connection_worker_thread)",
             6: "password-hashing"}
    before = {1: 10.0, 2: 1.0, 3: 1.0, 4: 0.5, 5: 0.0, 6: 0.0}
    after = {1: 12.0, 2: 2.0, 3: 2.0, 4: 0.6, 5: 0.4, 6: 0.2, 7: 0.2}  # 7: a thread that started meanwhile
    cores = overhead.per_group(before, after, names, seconds=10.0)
    assert cores == pytest.approx({"event_loop": 0.2, "decode": 0.2, "model": 0.01, "store": 0.04, "other": 0.04})


def test_ceiling_is_the_share_of_the_cores_left_to_the_model():
    # 2 cores, backbone 229 frames/s: the model needs 8.73 ms of CPU per frame; 2.48 ms more leaves 0.78.
    assert overhead.ceiling(2.48, 229.0, 2) == pytest.approx(8.734 / (8.734 + 2.48), abs=1e-3)
    assert overhead.ceiling(0.0, 229.0, 2) == 1.0


def test_it_refuses_to_run_without_a_backbone_rate(capsys, tmp_path):
    assert overhead.main(["--credentials", str(tmp_path / "c.json")]) == 2
    assert "--backbone-fps or --backbone-json" in capsys.readouterr().err


def test_the_window_is_the_steady_part_after_the_warm_up():
    # Logins (nothing classified), students joining, 30 s at the offered 200 frames/s, then stopping.
    rates = [0] * 10 + [50, 150] + [200] * 30 + [120, 10]
    samples, total = [], 0.0
    for second, rate in enumerate(rates + [0]):
        samples.append((float(second), total, None))
        total += rate
    first, last = overhead.steady_window(samples, offered_fps=200.0, warmup_s=5.0)
    assert (samples[first][0], samples[last][0]) == (17.0, 40.0)  # 12 + 5 s warm-up .. 42 - 2 s
    with pytest.raises(overhead.LoadgenError, match="never classified 90%"):
        overhead.steady_window(samples, offered_fps=1000.0, warmup_s=5.0)
    with pytest.raises(overhead.LoadgenError, match="too short"):
        overhead.steady_window(samples, offered_fps=200.0, warmup_s=25.0)
