"""scripts/sync-probe: the bare sync-cost loop behind docs/performance.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from streamer.bench.sync_probe import main, measure
from tests.helpers.cli import assert_refused

LINE = re.compile(
    r"^(append|preallocated) +(\d+) syncs: p50 [\d.]+ ms, p99 [\d.]+ ms, p99\.9 [\d.]+ ms, "
    r"max [\d.]+ ms(, (\d+) region rewrites beside)?$"
)


@pytest.mark.parametrize("mode", ["append", "preallocated"])
def test_each_mode_syncs_and_reports(tmp_path: Path, mode: str) -> None:
    line = measure(tmp_path, mode, 0.2, regions=True)
    m = LINE.match(line)
    assert m is not None, line
    assert m.group(1) == mode and int(m.group(2)) > 0
    assert m.group(4) is not None and int(m.group(4)) > 0  # the region writer ran beside


def test_both_modes_without_regions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--seconds", "0.1", "--no-regions", "--dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    matches = [LINE.match(line) for line in lines]
    assert [m.group(1) if m else line for m, line in zip(matches, lines, strict=True)] == [
        "append",
        "preallocated",
    ]
    assert all("region rewrites" not in line for line in lines)
    assert list(tmp_path.iterdir()) == []  # its temporary directory is gone


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--seconds", "0"], "--seconds must be > 0"),
        (["--dir", "/nonexistent/x"], "not a directory"),
    ],
)
def test_bad_arguments_are_refused(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert_refused(main, argv, needle, capsys)
