"""The model's small interface: plain dataclasses in and out, no torch import.

The batcher, the sessions and the whitelist logic only see this module, so they
are tested fast and exactly with a fake classifier.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np


@dataclass(frozen=True)
class Preprocessing:
    """How a frame becomes backbone input: size, pixel scaling, normalisation, channel order."""

    width: int = 320
    height: int = 180
    # input = (pixels * scale - mean) / std, per channel, in `channels` order.
    scale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    channels: str = "RGB"


@dataclass(frozen=True)
class HeadInfo:
    """What the verdict logic needs to know of a head."""

    name: str
    program: str
    threshold: float
    description: str = ""
    metadata: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Scores:
    """Every head's score for every frame of one batch: values[frame, head], in [0, 1]."""

    heads: tuple[HeadInfo, ...]
    values: np.ndarray

    def row(self, index: int) -> dict[str, float]:
        return {h.name: float(v) for h, v in zip(self.heads, self.values[index])}


class Classifier(Protocol):
    """What the server needs from the model engine; the real one is models.engine.Engine."""

    @property
    def frame_size(self) -> tuple[int, int]:
        """(width, height) of the RGB uint8 frames classify() wants."""

    @property
    def heads(self) -> tuple[HeadInfo, ...]:
        """The heads loaded now."""

    @property
    def workers(self) -> int:
        """How many classify() calls may run at once (from as many threads)."""

    def classify(self, frames: Sequence[np.ndarray]) -> Scores:
        """Blocking: one backbone pass per backbone group for the whole batch, then every head at once.

        A classifier whose heads take several input sizes may also have `frame_sizes` (frame_size first)
        and accept each frame as a tuple of the picture at those sizes (models.engine.Engine does).
        """
