"""The benches' baselines: repeated, reported as their median, and flagged when they spread or drift."""

from __future__ import annotations

import json
import os

import pytest

from promptus.bench import history


def test_a_steady_baseline_is_not_flagged_and_a_drifted_one_is():
    work = {"device": "H100", "torch": "2.11", "size": 512}
    assert history.spread_flag("published", [100.0, 104.0, 98.0], "ms/it") is None
    flag = history.spread_flag("published", [100.0, 135.0, 101.0], "ms/it")
    assert "spread 35%" in flag and "101.0" in flag  # the median is named
    assert history.check_and_record("published", work, 1328.5, "ms/it") is None  # nothing earlier: recorded
    assert history.check_and_record("published", work, 1350.0, "ms/it") is None  # within 20 %
    flag = history.check_and_record("published", work, 1797.4, "ms/it")
    assert "34% off the median of 2 earlier runs" in flag and "slower" in flag and "read high" in flag
    # another workload has its own history; frames/s are faster when higher
    assert history.check_and_record("eager", {**work, "size": 64}, 180.0, "frames/s", lower_is_faster=False) is None
    flag = history.check_and_record("eager", {**work, "size": 64}, 120.0, "frames/s", lower_is_faster=False)
    assert "slower" in flag and "read high" in flag
    assert "faster" in history.check_and_record("published", work, 900.0, "ms/it", record=False)
    assert history.median([3.0, float("nan"), 1.0, 2.0, -1.0, True]) == 2.0


@pytest.mark.parametrize("content", [b"\x00\xff not json", b"[1, 2]", b'{"format": 99, "runs": {}}',
                                     b'{"format": 1, "runs": {"k": [1e308, "x", true, null, -5, 1.5]}}',
                                     b'{"format": 1, "runs": []}', b" " * (history.MAX_BYTES + 10)])
def test_a_hostile_history_is_ignored_and_rewritten(content):
    path = history.history_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    assert history.check_and_record("b", {}, 10.0, "ms/it") is None  # no exception, nothing earlier for "b"
    data = json.loads(path.read_text())
    assert data["format"] == history.FORMAT and all(
        isinstance(v, float) and v > 0 for vs in data["runs"].values() for v in vs)


def test_the_history_stays_bounded_and_a_place_that_cannot_be_written_is_skipped(tmp_path, monkeypatch):
    for i in range(history.KEEP_RUNS + 5):
        history.check_and_record("b", {}, 10.0 + i % 2, "ms/it")
    for i in range(history.KEEP_BASELINES + 5):
        history.check_and_record(f"b{i}", {}, 1.0, "ms/it")
    runs = json.loads(history.history_path().read_text())["runs"]
    assert len(runs) == history.KEEP_BASELINES and all(len(v) <= history.KEEP_RUNS for v in runs.values())
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("PROMPTUS_CACHE_DIR", str(blocker / "cache"))  # below a file: cannot be made
    assert history.check_and_record("b", {}, 10.0, "ms/it") is None
    if hasattr(os, "mkfifo"):
        monkeypatch.setenv("PROMPTUS_CACHE_DIR", str(tmp_path / "fifo-cache"))
        os.makedirs(tmp_path / "fifo-cache")
        os.mkfifo(history.history_path())  # a FIFO where the file should be: not read (would block), not fatal
        assert history.check_and_record("b", {}, 10.0, "ms/it") is None


def test_the_encode_bench_reports_the_median_of_its_baseline_runs_and_flags_them(monkeypatch):
    from promptus.bench import encode as enc_bench
    from promptus.commands.bench import format_encode_table

    times = iter([(1800.0, 150.0), (1300.0, 110.0), (1310.0, 112.0),  # published: repeats spread 38 %
                  (1200.0, 100.0), (1210.0, 101.0), (1190.0, 99.0)])  # frozen
    monkeypatch.setattr(enc_bench, "_time_published", lambda *a, **k: next(times))
    monkeypatch.setattr(enc_bench, "_time_ours", lambda *a, **k: {
        "ms_segment": 131.0, "ms_first": 11.0, "peak_gib_segment": 1.0, "peak_gib_first": 1.0})
    result = enc_bench.bench_encode(model="tiny", device="cpu", size=64, budgets=(), compile="off", profile=False,
                                    baseline_repeats=3)
    published = result["rows"][0]
    assert published["runs_segment"] == [1800.0, 1300.0, 1310.0] and published["ms_per_iteration_segment"] == 1310.0
    assert result["rows"][2]["speedup"] == pytest.approx(1310.0 / 131.0)  # against the median
    assert any("spread 38%" in f for f in result["baseline_flags"])
    table = format_encode_table(result)
    assert "the median of its 3 timed runs" in table and "baseline flag: published (as released), segment" in table
