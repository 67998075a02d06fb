"""Verdict logic: head scores + the exam's whitelist + recent history -> verdict and alert episodes.

Pure code: no I/O, no torch, so every rule is tested exactly.
"""

from __future__ import annotations

import math

from collections import deque
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

from proctor.models.interface import HeadInfo

REASON_UNRECOGNISED = "unrecognised"
REASON_FORBIDDEN = "forbidden_program"


@dataclass(frozen=True)
class Policy:
    """An exam's whitelist (head names) and its episode rule: k suspicious frames among the last n."""

    allowed: frozenset[str]
    k: int = 2
    n: int = 3

    def __post_init__(self) -> None:
        if not 1 <= self.k <= self.n:
            raise ValueError(f"episode rule needs 1 <= k <= n, got k={self.k} n={self.n}")


@dataclass(frozen=True)
class FrameVerdict:
    """The judgement of one frame.

    ok: an allowed head fired; program names the allowed program recognised.
    not ok: reason is "forbidden_program" (program names the forbidden program whose head
    fired) or "unrecognised" (program is None).
    """

    ok: bool
    program: str | None
    reason: str | None
    scores: dict[str, float]

    def top_scores(self, count: int = 5) -> list[tuple[str, float]]:
        return sorted(self.scores.items(), key=lambda item: item[1], reverse=True)[:count]


def judge(scores: Mapping[str, float], heads: Sequence[HeadInfo], policy: Policy) -> FrameVerdict:
    """OK when some allowed head scores at or above its threshold; otherwise name a forbidden program if one fired.

    A score that is not a number (a broken head: NaN compares false with everything) counts as 0, not
    fired: it must neither pass every frame of an exam that allows it nor reach the store, which refuses it.
    """
    kept = {name: (v if math.isfinite(v) else 0.0) for name, v in ((n, float(x)) for n, x in scores.items())}
    best_allowed: tuple[float, HeadInfo] | None = None
    best_forbidden: tuple[float, HeadInfo] | None = None
    for head in heads:
        score = kept.get(head.name)
        if score is None or score < head.threshold:
            continue
        # Rank fired heads by how far above their own threshold they are: thresholds differ per head.
        margin = score - head.threshold
        if head.name in policy.allowed:
            if best_allowed is None or margin > best_allowed[0]:
                best_allowed = (margin, head)
        elif best_forbidden is None or margin > best_forbidden[0]:
            best_forbidden = (margin, head)
    if best_allowed is not None:
        return FrameVerdict(True, best_allowed[1].program, None, kept)
    if best_forbidden is not None:
        return FrameVerdict(False, best_forbidden[1].program, REASON_FORBIDDEN, kept)
    return FrameVerdict(False, None, REASON_UNRECOGNISED, kept)


EpisodeChange = Literal["opened", "closed"] | None


class EpisodeTracker:
    """Turns per-frame verdicts into alert episodes: one alert per incident, not one per frame.

    An episode opens when k of the last n frames were suspicious and closes on the first OK
    frame; the history is then cleared so a single stale suspicious frame cannot reopen it.
    """

    def __init__(self, k: int = 2, n: int = 3) -> None:
        if not 1 <= k <= n:
            raise ValueError(f"episode rule needs 1 <= k <= n, got k={k} n={n}")
        self.k = k
        self._recent: deque[bool] = deque(maxlen=n)
        self.is_open = False

    def update(self, verdict: FrameVerdict) -> EpisodeChange:
        if self.is_open:
            if verdict.ok:
                self.is_open = False
                self._recent.clear()
                return "closed"
            return None
        self._recent.append(not verdict.ok)
        if sum(self._recent) >= self.k:
            self.is_open = True
            return "opened"
        return None

    @property
    def status(self) -> str:
        return "alert" if self.is_open else "ok"
