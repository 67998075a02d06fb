import pytest

from proctor.models.interface import HeadInfo
from proctor.whitelist import EpisodeTracker, FrameVerdict, Policy, judge

HEADS = (
    HeadInfo("vscode", "VS Code", 0.5),
    HeadInfo("calc", "Spreadsheet", 0.8),
    HeadInfo("whatsapp", "WhatsApp Web", 0.6),
    HeadInfo("terminal", "Terminal", 0.7),
)
POLICY = Policy(frozenset({"vscode", "calc"}))


def scores(**values):
    base = {h.name: 0.0 for h in HEADS}
    base.update(values)
    return base


def test_allowed_head_at_threshold_is_ok():
    v = judge(scores(vscode=0.5), HEADS, POLICY)
    assert v.ok and v.program == "VS Code" and v.reason is None


def test_allowed_head_below_its_own_threshold_is_not_ok():
    # 0.79 would pass vscode's threshold but calc's is 0.8.
    v = judge(scores(calc=0.79), HEADS, POLICY)
    assert not v.ok and v.reason == "unrecognised" and v.program is None


def test_forbidden_program_is_named():
    v = judge(scores(whatsapp=0.9, terminal=0.75), HEADS, POLICY)
    assert not v.ok
    assert v.reason == "forbidden_program"
    # whatsapp is 0.3 over its threshold, terminal 0.05: the clearer detection is named.
    assert v.program == "WhatsApp Web"


def test_allowed_wins_over_forbidden_on_the_same_frame():
    # A whitelisted editor with a chat window beside it: the whitelist decides, as specified.
    v = judge(scores(vscode=0.9, whatsapp=0.99), HEADS, POLICY)
    assert v.ok and v.program == "VS Code"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_score_that_is_not_a_number_never_fires_and_is_kept_as_zero(bad):
    # NaN compares false with every threshold: "not below" used to count it as fired, so a broken allowed
    # head passed every frame, and its score then made the store refuse the alert.
    v = judge(scores(vscode=bad), HEADS, POLICY)
    assert not v.ok and v.reason == "unrecognised" and v.scores["vscode"] == 0.0
    assert judge(scores(whatsapp=bad), HEADS, POLICY).reason == "unrecognised"


def test_verdict_keeps_every_score_for_evidence():
    s = scores(vscode=0.1, whatsapp=0.2)
    v = judge(s, HEADS, POLICY)
    assert v.scores == s
    assert v.top_scores(2) == [("whatsapp", 0.2), ("vscode", 0.1)]


def test_allowed_head_not_loaded_cannot_make_a_frame_ok():
    v = judge({"vscode": 0.99}, (), POLICY)
    assert not v.ok and v.reason == "unrecognised"


def ok():
    return FrameVerdict(True, "VS Code", None, {})


def bad():
    return FrameVerdict(False, None, "unrecognised", {})


def test_two_of_three_opens_once_and_ok_closes():
    t = EpisodeTracker(2, 3)
    assert t.update(bad()) is None
    assert t.update(ok()) is None
    assert t.update(bad()) == "opened"  # bad, ok, bad: 2 of the last 3
    assert t.status == "alert"
    assert [t.update(bad()) for _ in range(5)] == [None] * 5  # one alert per incident, not per frame
    assert t.update(ok()) == "closed"
    assert t.status == "ok"


def test_isolated_suspicious_frames_never_open():
    t = EpisodeTracker(2, 3)
    changes = [t.update(v) for v in (bad(), ok(), ok(), bad(), ok(), ok(), bad())]
    assert changes == [None] * 7


def test_history_cleared_after_close():
    t = EpisodeTracker(2, 3)
    t.update(bad())
    assert t.update(bad()) == "opened"
    assert t.update(ok()) == "closed"
    assert t.update(bad()) is None  # needs two fresh suspicious frames
    assert t.update(bad()) == "opened"


def test_k_equals_one_opens_on_first_suspicious_frame():
    t = EpisodeTracker(1, 1)
    assert t.update(bad()) == "opened"


@pytest.mark.parametrize("k,n", [(0, 3), (4, 3)])
def test_bad_episode_rule_refused(k, n):
    with pytest.raises(ValueError):
        EpisodeTracker(k, n)
    with pytest.raises(ValueError):
        Policy(frozenset(), k, n)
