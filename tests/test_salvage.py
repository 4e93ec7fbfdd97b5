"""Salvage: every intact chunk's records out of raw, damaged region files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamer.format.region import decode_region
from streamer.recovery.salvage import (
    REPORT_NAME,
    SALVAGE_NAME,
    salvage_bytes,
    salvage_files,
    summarize_records,
)
from streamer.storage.memory import MemoryStore
from tests.test_ladder import make_world, region_bytes


def lines(out: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in (out / SALVAGE_NAME).read_text().splitlines()]


def expected_ids(rx: int, ry: int, rs: int, tag: str, skip: set[tuple[int, int]]) -> set[str]:
    return {
        f"c-{tag}-{cx}-{cy}"
        for cx in range(rx * rs, rx * rs + rs)
        for cy in range(ry * rs, ry * rs + rs)
        if (cx, cy) not in skip
    }


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
async def test_destroyed_header_every_intact_chunk_extracted(tmp_path: Path, encoding: str) -> None:
    m = await make_world(MemoryStore(), region_size=3, encoding=encoding)
    data = region_bytes(m, 1, -1, tag="x", lpt=5)
    rf = decode_region(data, rx=1, ry=-1, path="r")
    first = rf.header.chunks[0].offset
    # Wipe preamble and the whole header (index included) and the trailer.
    wrecked = b"\0" * first + data[first:-24] + b"\xff" * 24
    path = tmp_path / "r.1.-1.region"
    path.write_bytes(wrecked)

    report = await salvage_files([path], tmp_path / "out")

    assert report.complete
    assert report.chunks == 9
    rows = lines(tmp_path / "out")
    chars = {r["id"] for r in rows if r["type"] == "character"}
    assert chars == expected_ids(1, -1, 3, "x", set())
    # Every record type, each nested record once per chunk, plus the chunk line.
    assert report.by_type == {
        "chunk": 9,
        "character": 9,
        "structure": 9,
        "feature": 9,
        "society": 9,
    }
    chunk_rows = [r for r in rows if r["type"] == "chunk"]
    assert all(r["valid"] is True and r["encoding"] == encoding for r in chunk_rows)
    assert all("characters" not in r["record"] for r in chunk_rows)  # type: ignore[operator]
    # Provenance: file, the frame's byte offset, region, chunk, schemaVersion.
    row = next(r for r in rows if r["id"] == "c-x-3--3")
    assert row["file"] == str(path)
    assert row["region"] == [1, -1] and row["chunk"] == [3, -3]
    assert row["schemaVersion"] == 3
    entry = next(e for e in rf.header.chunks if (e.cx, e.cy) == (3, -3))
    assert row["offset"] == entry.offset
    assert row["record"]["player_id"] == "p-x"  # type: ignore[index]
    summary = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert summary["records"] == 45


async def test_partially_damaged_file_extracts_all_others(tmp_path: Path) -> None:
    m = await make_world(MemoryStore(), region_size=2)
    data = region_bytes(m, 0, 0, tag="y", lpt=5)
    rf = decode_region(data, rx=0, ry=0, path="r")
    e = rf.header.chunks[2]
    damaged = bytearray(data)
    damaged[e.offset + e.length - 5] ^= 1
    src = tmp_path / "a.region"
    src.write_bytes(bytes(damaged))
    other = tmp_path / "b.region"
    other.write_bytes(region_bytes(m, 1, 1, tag="z", lpt=5))

    report = await salvage_files([src, other], tmp_path / "out")

    rows = lines(tmp_path / "out")
    got = {r["id"] for r in rows if r["type"] == "character"}
    assert got == expected_ids(0, 0, 2, "y", {(e.cx, e.cy)}) | expected_ids(1, 1, 2, "z", set())
    assert [f.chunks for f in report.files] == [3, 4]


async def test_undecodable_payload_reported_not_fatal(tmp_path: Path) -> None:
    from streamer.format.region import encode_region

    m = await make_world(MemoryStore(), region_size=2)
    good = region_bytes(m, 0, 0, tag="q", lpt=1)
    rf = decode_region(good, rx=0, ry=0, path="r")
    chunks = dict(rf.chunks)
    chunks[(1, 1)] = b"\xc1 not msgpack, not json"
    data = encode_region(
        rx=0,
        ry=0,
        last_processed_tick=1,
        generation=1,
        writer="t",
        encoding="msgpack",
        chunks=chunks,
    )
    path = tmp_path / "r.region"
    path.write_bytes(data)
    missing = tmp_path / "nope.region"
    report = await salvage_files([path, missing], tmp_path / "out")
    assert not report.complete
    assert report.chunks == 4
    assert {f.chunk for f in report.failures if f.chunk} == {(1, 1)}
    assert any(f.file == str(missing) and "cannot read" in f.error for f in report.failures)
    assert len([r for r in lines(tmp_path / "out") if r["type"] == "character"]) == 3


async def test_output_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / SALVAGE_NAME).write_text("precious\n")
    with pytest.raises(FileExistsError):
        await salvage_files([], tmp_path / "out")
    assert (tmp_path / "out" / SALVAGE_NAME).read_text() == "precious\n"


def test_garbage_never_raises() -> None:
    import random

    rng = random.Random(5)
    for n in range(300):
        blob = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 400)))
        if n % 3 == 0:
            blob = b"CHNK" + blob
        records, failures, chunks = salvage_bytes(blob, source="g")
        assert chunks == 0 and not records and not failures


async def test_summarize_ids_per_type() -> None:
    m = await make_world(MemoryStore(), region_size=1)
    records, _, _ = salvage_bytes(region_bytes(m, 0, 0, tag="s", lpt=0), source="x")
    ids = summarize_records(records)
    assert ids["character"] == ["c-s-0-0"]
    assert ids["chunk"] == ["0,0"]
