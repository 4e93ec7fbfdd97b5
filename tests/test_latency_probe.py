"""scripts/latency-probe: the open-loop diagnostic behind docs/performance.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamer.bench.latency_probe import main, probe
from tests.helpers.cli import assert_refused


async def test_probe_times_every_batch_both_ways(tmp_path: Path) -> None:
    r = await probe(tmp_path / "w", seconds=0.3, rate=20_000)
    assert r.acked_per_s > 0
    assert r.scheduled.count > 0
    # Every batch the schedule sent was timed from submit to acknowledgement too.
    assert r.submit_to_ack.count == r.scheduled.count
    assert all(lag > 0.003 for lag in r.lags)
    assert len(r.lines()) == 8
    assert r.segments_opened >= 1  # the open loop's first commit opens one
    assert r.segments_preallocated == 0  # off by default
    # The first commit opens the segment in the journal's thread; the others are the sync
    # process's (on by default).
    assert 0 < r.commits_in_process < r.commits
    assert r.batches == r.scheduled.count
    assert 0 < r.loop_cpu_s <= r.process_cpu_s + 0.05 and r.wall_s > 0


async def test_probe_without_the_sync_process_commits_in_the_thread(tmp_path: Path) -> None:
    r = await probe(tmp_path / "w", seconds=0.3, rate=20_000, sync_process=False)
    assert r.commits > 0 and r.commits_in_process == 0


async def test_probe_with_preallocation_starts_from_a_spare(tmp_path: Path) -> None:
    r = await probe(tmp_path / "w", seconds=0.3, rate=20_000, preallocate=True)
    # The probe waited for the spare: the open loop's first segment is made from it.
    assert 1 <= r.segments_preallocated <= r.segments_opened


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--seconds", "0"], "--seconds and --rate must be > 0"),
        (["--rate", "-5"], "--seconds and --rate must be > 0"),
    ],
)
def test_bad_arguments_are_refused(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert_refused(main, argv, needle, capsys)
