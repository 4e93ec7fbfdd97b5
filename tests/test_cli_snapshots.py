"""`streamer snapshot | snapshots | restore` through the real entry point."""

from __future__ import annotations

import json
import os
from pathlib import Path

import anyio
import pytest

from streamer.cli import main as cli_main
from streamer.cli import snapshot_cmds
from streamer.format.region import region_key
from streamer.recovery.incidents import IncidentLog
from streamer.recovery.snapshots import list_snapshots, snapshot_file_key
from streamer.storage.local import LocalStore
from streamer.worlddir import WorldLock
from tests.test_snapshots import JOURNAL, corrupt_file, region_bytes, world_state


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("STREAMER_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def closed_world(monkeypatch: pytest.MonkeyPatch) -> None:
    """Snapshot the closed world as it lies (no runtime open/flush)."""
    monkeypatch.setattr(snapshot_cmds, "_find_open_world", lambda: None)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli_main.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def _populate(path: Path) -> None:
    async with await LocalStore.open(path) as store:
        for rx, ry, tick in ((0, 0, 10), (1, -1, 20)):
            await store.put_atomic(region_key(rx, ry), region_bytes(rx, ry, tick))
        await store.put_atomic(JOURNAL, b"journal")


async def _state(path: Path) -> dict[str, bytes]:
    async with await LocalStore.open(path) as store:
        return await world_state(store)


@pytest.fixture
def world(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    path = tmp_path / "w"
    code, _, err = run(capsys, "init", str(path), "--seed", "7")
    assert code == 0, err
    return path


def take(capsys: pytest.CaptureFixture[str], world: Path) -> str:
    code, out, err = run(capsys, "snapshot", str(world))
    assert code == 0, err
    return out.strip()


@pytest.mark.usefixtures("closed_world")
def test_snapshot_list_restore(world: Path, capsys: pytest.CaptureFixture[str]) -> None:
    anyio.run(_populate, world)
    original = anyio.run(_state, world)
    first = take(capsys, world)
    assert (world / snapshot_file_key(first, JOURNAL)).read_bytes() == b"journal"

    (world / region_key(0, 0)).unlink()
    second = take(capsys, world)
    assert second > first

    code, out, _ = run(capsys, "snapshots", str(world))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["ID", "CREATED", "(UTC)"]
    assert [ln.split()[0] for ln in lines[1:]] == [second, first]
    assert all(ln.split()[-1] == "yes" and "manual" in ln for ln in lines[1:])

    code, out, _ = run(capsys, "snapshots", str(world), "--json")
    assert code == 0
    listing = json.loads(out)
    assert [r["id"] for r in listing["snapshots"]] == [second, first]
    assert listing["snapshots"][1]["files"] == len(original) and listing["valid"] == 2

    code, out, err = run(capsys, "restore", str(world), first)
    assert code == 0, err
    assert f"snapshot {first}" in out and "previous state is snapshot" in out
    assert anyio.run(_state, world) == original


@pytest.mark.usefixtures("closed_world")
def test_restore_unknown_id(world: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sid = take(capsys, world)
    code, _, err = run(capsys, "restore", str(world), "20200101T000000000000Z-bad000")
    # A mistyped id is a bad argument, like an unknown path: usage, one line.
    assert code == cli_main.EXIT_USAGE
    assert "20200101T000000000000Z-bad000" in err and sid in err and "available" in err
    assert [ln for ln in err.splitlines() if "no snapshot" in ln] == err.splitlines()[-1:]


@pytest.mark.usefixtures("closed_world")
def test_refuses_a_locked_world(world: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sid = take(capsys, world)
    lock = WorldLock(world)
    lock.acquire()
    try:
        before = sorted(os.listdir(world / "snapshots"))
        # Exit 2, as for every command that finds the world open elsewhere.
        code, _, err = run(capsys, "snapshot", str(world))
        assert code == cli_main.EXIT_USAGE and "lock" in err
        code, _, err = run(capsys, "restore", str(world), sid)
        assert code == cli_main.EXIT_USAGE and "lock" in err
        assert sorted(os.listdir(world / "snapshots")) == before
    finally:
        lock.release()
    code, _, _ = run(capsys, "restore", str(world), sid)
    assert code == 0


@pytest.mark.usefixtures("closed_world")
def test_damage_is_reported(world: Path, capsys: pytest.CaptureFixture[str]) -> None:
    anyio.run(_populate, world)
    sid = take(capsys, world)
    corrupt_file(world, snapshot_file_key(sid, JOURNAL))
    code, out, err = run(capsys, "snapshots", str(world))
    assert code == cli_main.EXIT_PROBLEMS
    assert out.splitlines()[1].split()[-1] == "NO" and JOURNAL in err

    corrupt_file(world, region_key(1, -1))
    code, _, err = run(capsys, "snapshot", str(world))
    assert code == cli_main.EXIT_PROBLEMS and "regions/r.1.-1.region" in err

    async def incidents() -> list[str]:
        async with await LocalStore.open(world) as store:
            return [i.kind for i in (await IncidentLog(store).read()).incidents]

    assert anyio.run(incidents) == ["snapshot_failed"]


def test_snapshot_through_the_runtime(world: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if snapshot_cmds._find_open_world() is None:
        pytest.skip("streamer.open_world not available")
    sid = take(capsys, world)

    async def ids() -> list[str]:
        async with await LocalStore.open(world) as store:
            return [s.id for s in await list_snapshots(store)]

    assert anyio.run(ids) == [sid]


def test_snapshot_through_the_runtime_refuses_a_locked_world(
    world: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if snapshot_cmds._find_open_world() is None:
        pytest.skip("streamer.open_world not available")
    lock = WorldLock(world)
    lock.acquire()
    try:
        code, _, err = run(capsys, "snapshot", str(world))
    finally:
        lock.release()
    assert code == cli_main.EXIT_USAGE, err
    assert "open in another process" in err and "Traceback" not in err
