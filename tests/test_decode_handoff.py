"""benchmarks/decode_handoff.py: each way runs where it says and the JSON has every figure."""

from __future__ import annotations

import json

import pytest

from benchmarks import decode_handoff


def test_short_run_writes_every_way_by_thread(tmp_path, capsys):
    out = tmp_path / "handoff.json"
    assert decode_handoff.main(["--rate", "200", "--seconds", "0.5", "--rounds", "1", "--frames", "4",
                                "--threads", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["median"]) == set(decode_handoff.WAYS) and result["machine"]["cores"] >= 1
    # The decode thread only works in the "thread" way; the loop does the decoding in the others.
    assert "decode" in result["runs"]["thread"][0]
    assert all("decode" not in run for way in ("pacing", "inline", "back_to_back") for run in result["runs"][way])
    assert "thread hop vs inline" in capsys.readouterr().out


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit, match="--rate"):
        decode_handoff.main(["--rate", "0"])
