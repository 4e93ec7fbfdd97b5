"""`streamer demo` / `streamer run`: simulated players, the summary, and what they leave behind."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import anyio
import pytest

import streamer
from streamer.cli.main import main
from streamer.loadtest import EditLedger, LatencyRecorder, TickClock
from streamer.schema.deltas import TileSet


@pytest.fixture(autouse=True)
def _no_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The repo's config/streamer.toml must not decide where or how the test world lives.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STREAMER_CONFIG", raising=False)


def _run_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict[str, Any]:
    rc = main(argv)
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one JSON object on stdout, got {out!r}"
    summary = json.loads(lines[0])
    assert isinstance(summary, dict)
    return summary


async def _tiles_at(path: Path, points: list[list[int]]) -> list[int]:
    async with streamer.open_world(path) as world:
        out = []
        for x, y, _ in points:
            chunk = await world.chunk(x // 64, y // 64)
            out.append(int(chunk.tiles[y % 64, x % 64]))
        return out


def test_demo_json_and_edits_survive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    world = tmp_path / "w"
    summary = _run_json(
        capsys, ["demo", str(world), "--players", "3", "--duration", "2", "--json", "--seed", "7"]
    )
    assert summary["created"] is True
    assert summary["interrupted"] is False
    assert summary["players"] == 3
    for key in ("deltas_acked", "submits", "chunk_loads", "chunk_waits", "steps", "flushes"):
        assert isinstance(summary[key], int) and summary[key] > 0, key
    assert summary["peak_rss_mib"] > 0
    assert summary["ack_p99_ms"] >= summary["ack_p50_ms"] > 0
    last_tick = summary["last_tick"]
    assert isinstance(last_tick, dict) and set(last_tick) == {"p0", "p1", "p2"}
    verify = summary["verify"]
    assert isinstance(verify, list) and verify

    # Reopened, the world holds the newest acknowledged edit at every sampled position.
    held = anyio.run(_tiles_at, world, verify)
    assert held == [tile for _, _, tile in verify]
    assert main(["check", str(world)]) == 0, capsys.readouterr()
    capsys.readouterr()

    # A second run on the same world continues above the first run's ticks and characters.
    again = _run_json(capsys, ["demo", str(world), "--players", "2", "--duration", "1", "--json"])
    assert again["created"] is False
    assert again["deltas_acked"] > 0
    assert again["last_tick"]["p0"] > last_tick["p0"]


async def _characters(path: Path, ids: list[str]) -> list[streamer.Character | None]:
    async with streamer.open_world(path) as world:
        return [await world.find_player(pid) for pid in ids]


def test_run_main_job(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    world = tmp_path / "main"
    summary = _run_json(
        capsys,
        ["run", "--path", str(world), "--duration", "1", "--players", "2", "--json"],
    )
    assert summary["created"] is True
    assert summary["players"] == 2
    assert summary["deltas_acked"] > 0
    assert (world / "world.json").is_file()
    # Each player left exactly its own character behind.
    chars = anyio.run(_characters, world, ["p0", "p1"])
    assert [c.id if c is not None else None for c in chars] == ["demo-p0", "demo-p1"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "{w}", "--players", "0"], "--players must be between 1 and"),
        (["demo", "{w}", "--duration", "0"], "--duration must be > 0"),
        (["demo", "{w}", "--view-radius", "99"], "--view-radius must be between 0 and 64"),
        (["run", "--path", "{w}", "--players", "-3"], "--players must be between 1 and"),
    ],
)
def test_bad_input_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    world = tmp_path / "w"
    rc = main([a.replace("{w}", str(world)) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err
    assert not world.exists()  # refused before touching anything


def test_demo_path_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "not-a-dir"
    f.write_text("x")
    assert main(["demo", str(f), "--duration", "1"]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_tick_clock_is_strictly_increasing() -> None:
    clock = TickClock()
    ticks = [clock.next() for _ in range(1000)]
    assert all(b > a for a, b in itertools.pairwise(ticks))


def test_ledger_samples_only_certain_newest_edits() -> None:
    import random

    ledger = EditLedger()
    first = [TileSet(tick=1, x=0, y=0, tile=5), TileSet(tick=1, x=1, y=0, tile=6)]
    ledger.begin(first)
    ledger.acked(first)
    newer = [TileSet(tick=2, x=0, y=0, tile=9)]
    ledger.begin(newer)
    ledger.acked(newer)
    lost = [TileSet(tick=3, x=1, y=0, tile=7)]
    ledger.begin(lost)
    ledger.unknown(lost)  # may or may not be durable: never a sample
    refused = [TileSet(tick=4, x=0, y=0, tile=1)]
    ledger.begin(refused)
    ledger.rejected(refused)  # certainly not there: (0, 0) still holds 9
    assert ledger.sample(10, random.Random(0)) == [(0, 0, 9)]


def test_latency_recorder_is_bounded() -> None:
    rec = LatencyRecorder(capacity=100)
    for i in range(10_000):
        rec.add(i / 1000)
    assert rec.count == 10_000
    assert rec.max_s == pytest.approx(9.999)
    assert 0 < rec.percentile_ms(50) < rec.percentile_ms(99) <= 9999.0
