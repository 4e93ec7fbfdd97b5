"""CLI: region rebuild, regenerate, salvage, incidents and check --repair, via main()."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import anyio
import pytest

from streamer.cli.main import main
from streamer.format.manifest import WorldManifest
from streamer.format.region import decode_region, region_key
from streamer.recovery.incidents import IncidentLog
from streamer.recovery.snapshots import create_snapshot, list_snapshots, snapshot_file_key
from streamer.storage.base import BlobStore
from streamer.storage.local import LocalStore
from streamer.worlddir import WorldLock, read_manifest
from tests.test_ladder import flip, region_bytes

T = TypeVar("T")


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STREAMER_CONFIG", raising=False)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _with_store(path: Path, fn: Callable[[BlobStore], Awaitable[T]]) -> T:
    async def body() -> T:
        async with await LocalStore.open(path, fsync=False) as store:
            return await fn(store)

    return anyio.run(body)


def manifest_of(path: Path) -> WorldManifest:
    return _with_store(path, read_manifest)


@pytest.fixture
def world(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    path = tmp_path / "w"
    code, out, _ = run(capsys, "init", str(path), "--seed", "3", "--region-size", "2")
    assert code == 0, out
    m = manifest_of(path)

    async def fill(store: BlobStore) -> None:
        for rx, ry in [(0, 0), (1, 0), (0, 1)]:
            await store.put_atomic(region_key(rx, ry), region_bytes(m, rx, ry, tag="a", lpt=5))

    _with_store(path, fill)
    return path


def corrupt(path: Path, rx: int, ry: int, pos: int = 77) -> bytes:
    f = path / region_key(rx, ry)
    bad = flip(f.read_bytes(), pos)
    f.unlink()  # a new inode, as a tool that rewrote the file would leave
    f.write_bytes(bad)
    return bad


def snapshot(path: Path) -> str:
    async def snap(store: BlobStore) -> str:
        return (await create_snapshot(store, keep=5)).id

    return _with_store(path, snap)


@pytest.fixture
def held_lock(world: Path) -> Iterator[WorldLock]:
    # flock locks belong to the open file description: a second open in this process
    # conflicts exactly as another process would.
    lock = WorldLock(world)
    lock.acquire()
    yield lock
    lock.release()


# --- region rebuild -------------------------------------------------------------------------


def test_region_rebuild_inactive_region(world: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corrupt(world, 0, 0)
    code, out, _ = run(capsys, "check", str(world), "--repair")
    assert code == 0, out
    assert "isolated" in out
    code, out, err = run(capsys, "region", "rebuild", str(world), "0", "0")
    assert code == 0, err
    assert "rebuilt region (0, 0)" in out and "now active" in out
    decode_region((world / region_key(0, 0)).read_bytes(), rx=0, ry=0, path="r")
    code, out, _ = run(capsys, "check", str(world))
    assert code == 0, out


def test_region_rebuild_active_region_needs_force(
    world: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (world / region_key(1, 0)).read_bytes()
    code, _, err = run(capsys, "region", "rebuild", str(world), "1", "0")
    assert code == 2
    assert "--force" in err and "discards" in err
    assert (world / region_key(1, 0)).read_bytes() == before
    code, out, _ = run(capsys, "region", "rebuild", str(world), "1", "0", "--force")
    assert code == 0
    assert "previous file kept in quarantine/" in out
    # A region never written needs no --force.
    code, out, _ = run(capsys, "region", "rebuild", str(world), "-3", "5")
    assert code == 0, out


def test_region_rebuild_out_of_range(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "b"
    cfg = tmp_path / "s.toml"
    cfg.write_text("[world]\nbound_tiles = 256\n")
    argv = ["--config", str(cfg), "init", str(path), "--seed", "1", "--region-size", "2"]
    code, _, _ = run(capsys, *argv)
    assert code == 0
    code, _, err = run(capsys, "region", "rebuild", str(path), "2", "0")
    assert code == 2
    assert "outside this world" in err and "256" in err
    assert not (path / "regions").exists() or not list((path / "regions").iterdir())


def test_region_rebuild_damaged_region_points_to_check_repair(
    world: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = corrupt(world, 1, 0)
    code, _, err = run(capsys, "region", "rebuild", str(world), "1", "0")
    assert code == 2
    assert "fails verification" in err and f"streamer check {world} --repair" in err
    assert "--force" in err and "is active and has stored state" not in err
    assert (world / region_key(1, 0)).read_bytes() == bad


@pytest.mark.parametrize(
    ("rx", "ry"),
    [(999999999, 0), (0, -999999999), (1 << 29, 0), (-(1 << 29) - 1, 0)],
)
def test_region_rebuild_outside_the_addressable_world(
    world: Path, capsys: pytest.CaptureFixture[str], rx: int, ry: int
) -> None:
    # Unbounded world, 2x2-chunk regions: the runtime loads chunks -2**30 <= c < 2**30,
    # so regions -2**29 .. 2**29 - 1.
    before = sorted(p.name for p in (world / "regions").iterdir())
    code, _, err = run(capsys, "region", "rebuild", str(world), str(rx), str(ry))
    assert code == 2
    assert "outside the addressable world" in err and "-536870912 to 536870911" in err
    assert sorted(p.name for p in (world / "regions").iterdir()) == before


def test_region_rebuild_at_the_edge_of_the_addressable_world(
    world: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for rx in ((1 << 29) - 1, -(1 << 29)):
        code, out, err = run(capsys, "region", "rebuild", str(world), str(rx), "0")
        assert code == 0, err
        assert f"rebuilt region ({rx}, 0)" in out


def test_region_rebuild_refused_while_locked(
    world: Path, held_lock: WorldLock, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "region", "rebuild", str(world), "0", "0", "--force")
    assert code == 2
    assert "open in another process" in err


def test_region_rebuild_unknown_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "region", "rebuild", str(tmp_path / "nope"), "0", "0")
    assert code == 2 and "no such directory" in err


# --- regenerate -----------------------------------------------------------------------------


def test_regenerate_requires_yes_and_explains(
    world: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = sorted(p.name for p in (world / "regions").iterdir())
    code, _out, err = run(capsys, "regenerate", str(world))
    assert code == 2
    assert "--yes" in err and "3 region file(s)" in err and "ALL dynamic state" in err
    assert sorted(p.name for p in (world / "regions").iterdir()) == before


def test_regenerate_with_yes(world: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = corrupt(world, 0, 1)
    code, out, err = run(capsys, "regenerate", str(world), "--yes")
    assert code == 0, err
    assert "world regenerated from seed 3" in out
    assert "regions/r.0.1.region -> quarantine/" in out
    assert list((world / "regions").iterdir()) == []

    async def snaps(store: BlobStore) -> list[str]:
        return [s.reason for s in await list_snapshots(store)]

    assert _with_store(world, snaps) == ["pre-regenerate"]
    assert any(p.read_bytes() == bad for p in (world / "quarantine").iterdir())
    code, out, _ = run(capsys, "check", str(world))
    assert code == 0, out


def test_regenerate_refused_while_locked(
    world: Path, held_lock: WorldLock, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "regenerate", str(world), "--yes")
    assert code == 2 and "open in another process" in err
    assert len(list((world / "regions").iterdir())) == 3


def test_regenerate_unknown_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "regenerate", str(tmp_path / "nope"), "--yes")
    assert code == 2 and "no such directory" in err


# --- salvage --------------------------------------------------------------------------------


def test_salvage_happy_path(
    world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corrupt(world, 1, 0, pos=3)  # preamble damaged: the header cannot be trusted
    out_dir = tmp_path / "salv"
    code, out, err = run(capsys, "salvage", str(world / "regions"), "--out", str(out_dir))
    assert code == 0, err
    assert "salvaged 60 record(s)" in out
    rows = [json.loads(x) for x in (out_dir / "salvage.jsonl").read_text().splitlines()]
    assert {r["region"][0] for r in rows if r["type"] == "character"} == {0, 1}
    # Refuses to overwrite what it wrote.
    code, _, err = run(capsys, "salvage", str(world / "regions"), "--out", str(out_dir))
    assert code == 2 and "already holds" in err


def test_salvage_unknown_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "salvage", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert code == 2 and "no such file" in err
    assert not (tmp_path / "o").exists()


def test_salvage_undecodable_chunk_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from streamer.format.region import encode_region

    f = tmp_path / "x.region"
    f.write_bytes(
        encode_region(
            rx=0,
            ry=0,
            last_processed_tick=0,
            generation=1,
            writer="t",
            encoding="msgpack",
            chunks={(0, 0): b"\xc1\xc1"},
        )
    )
    code, out, err = run(capsys, "salvage", str(f), "--out", str(tmp_path / "o"))
    assert code == 1
    assert "1 undecodable" in out and "warning:" in err


# --- incidents ------------------------------------------------------------------------------


def test_incidents_listing_and_damage_warnings(
    world: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "incidents", str(world))
    assert code == 0 and "0 incident(s)" in out
    sid = snapshot(world)
    corrupt(world, 0, 0)
    assert run(capsys, "check", str(world), "--repair")[0] == 0
    code, out, err = run(capsys, "incidents", str(world))
    assert code == 0, err
    assert "checksum_failure" in out and "restored_from_snapshot" in out and sid in out
    code, out, _ = run(
        capsys, "incidents", str(world), "--json", "--kind", "restored_from_snapshot"
    )
    doc = json.loads(out)
    assert [i["kind"] for i in doc["incidents"]] == ["restored_from_snapshot"]
    assert doc["incidents"][0]["details"]["snapshot"] == sid

    log = world / "incidents.log"
    lines = log.read_bytes().split(b"\n")
    lines[0] = lines[0].replace(b"checksum_failure", b"checksum_fa1lure")
    log.write_bytes(b"\n".join(lines) + b'{"torn')
    code, out, err = run(capsys, "incidents", str(world))
    assert code == 1
    assert "line 1: damaged" in err
    assert "crash fragment" in err
    assert "1 damaged line(s)" in out


def test_incidents_unknown_kind_is_a_usage_error(
    world: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "incidents", str(world), "--kind", "data_loss", "--kind", "bogus")
    assert code == 2 and out == ""
    assert "--kind bogus: unknown incident kind" in err
    assert "data_loss" in err and "migration_failed" in err


def test_incidents_text_shows_the_failed_migration_record(
    world: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def record(store: BlobStore) -> None:
        await IncidentLog(store).record(
            "migration_failed",
            region=(0, 0),
            file="regions/r.0.0.region",
            details={
                "snapshot_id": "20261126T110600343182Z-1770a4",
                "record_id": "npc-anon",
                "record_type": "character",
                "schema_version": 2,
                "chunk": [0, 1],
                "error_type": "MigrationFailed",
                "error": "migration step character_v2_to_v3 (v2→v3) failed: TypeError('x')",
            },
            action="rolled back to pre-migration snapshot 20261126T110600343182Z-1770a4",
        )

    _with_store(world, record)
    code, out, err = run(capsys, "incidents", str(world), "--kind", "migration_failed")
    assert code == 0, err
    assert "    record: chunk (0, 1) id=npc-anon type=character schemaVersion=2\n" in out
    assert "    error: MigrationFailed: migration step character_v2_to_v3" in out


def test_incidents_unknown_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "incidents", str(tmp_path))
    assert code == 2 and "not a streamer world" in err


# --- check --repair -------------------------------------------------------------------------


def test_check_repair_restores_and_isolates(
    world: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sid = snapshot(world)
    # (1, 0): the snapshot copy is damaged too, so it can only be isolated.
    snap_copy = world / snapshot_file_key(sid, region_key(1, 0))
    data = snap_copy.read_bytes()
    snap_copy.unlink()
    snap_copy.write_bytes(flip(data, 90))
    corrupt(world, 0, 0)
    corrupt(world, 1, 0)
    code, out, _ = run(capsys, "check", str(world))
    assert code == 1
    code, out, err = run(capsys, "check", str(world), "--repair")
    # The damaged snapshot copy is a problem no repair can remove.
    assert code == 1, out
    assert f"-> restored: restored from snapshot {sid}" in out
    assert "-> isolated: no valid copy" in out
    assert f"still failing: snapshots/{sid}" in out
    assert "region (1, 0) is inactive" in err

    async def log_kinds(store: BlobStore) -> list[str]:
        return [i.kind for i in (await IncidentLog(store).read()).incidents]

    kinds = _with_store(world, log_kinds)
    assert kinds.count("data_loss") == 1 and kinds.count("restored_from_snapshot") == 1


def test_check_repair_exit_0_when_all_repaired(
    world: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    snapshot(world)
    corrupt(world, 0, 1)
    manifest = world / "world.json"
    text = manifest.read_bytes()
    manifest.unlink()
    manifest.write_bytes(text.replace(b'"seed": 3', b'"seed": 4'))
    code, out, _ = run(capsys, "check", str(world), "--repair", "--json")
    assert code == 0, out
    doc = json.loads(out)
    assert doc["ok"] is True and doc["after"]["problems"] == []
    assert [a["file"] for a in doc["actions"]] == ["world.json", region_key(0, 1)]
    assert manifest.read_bytes() == text
    code, out, _ = run(capsys, "check", str(world), "--repair")
    assert code == 0 and "found 0 problem(s)" in out


def test_check_repair_refused_while_locked(
    world: Path, held_lock: WorldLock, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "check", str(world), "--repair")
    assert code == 2 and "open in another process" in err


def test_check_repair_unknown_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "check", str(tmp_path / "x"), "--repair")
    assert code == 2 and "no such directory" in err
