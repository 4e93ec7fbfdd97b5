"""Region file format: round trips, range reads, region binding, versions, salvage."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamer.errors import (
    ChecksumMismatch,
    IntegrityError,
    MalformedFile,
    TruncatedFile,
    UnsupportedFormat,
)
from streamer.format.checksum import hex64, xxh3
from streamer.format.region import (
    FRAME_HEADER_LEN,
    PREAMBLE_LEN,
    TRAILER_LEN,
    ChunkEntry,
    RegionIndex,
    decode_index,
    decode_region,
    encode_region,
    file_seed,
    parse_region_key,
    read_chunk,
    region_key,
    region_seed,
    scan_chunk_frames,
)

ENCODINGS = ("msgpack", "json")


def payloads(rx: int, ry: int, size: int = 8, seed: int = 0) -> dict[tuple[int, int], bytes]:
    rng = random.Random(seed)
    return {
        (rx * size + i, ry * size + j): rng.randbytes(rng.randrange(0, 400))
        for i in range(size)
        for j in range(size)
    }


def make(
    rx: int = 0,
    ry: int = 0,
    chunks: dict[tuple[int, int], bytes] | None = None,
    encoding: str = "msgpack",
    generation: int = 7,
    region_size: int = 8,
) -> bytes:
    return encode_region(
        rx=rx,
        ry=ry,
        last_processed_tick=1234,
        generation=generation,
        writer="shard-a/epoch-3",
        encoding=encoding,  # type: ignore[arg-type]
        chunks=payloads(rx, ry) if chunks is None else chunks,
        region_size=region_size,
        written_at=1_700_000_000.25,
    )


def reseal(data: bytearray, rx: int, ry: int, generation: int) -> bytes:
    """Recompute the header and whole-file checksums after a deliberate edit."""
    header_len = struct.unpack_from("<I", data, 12)[0]
    seed = xxh3(bytes(data[:16]), region_seed(rx, ry))
    h = xxh3(bytes(data[PREAMBLE_LEN : PREAMBLE_LEN + header_len]), seed)
    struct.pack_into("<Q", data, 16, h)
    struct.pack_into("<Q", data, len(data) - 16, len(data))
    struct.pack_into(
        "<Q", data, len(data) - 8, xxh3(bytes(data[:-8]), file_seed(rx, ry, generation))
    )
    return bytes(data)


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_round_trip_64_chunks(encoding: str) -> None:
    chunks = payloads(0, 0)
    assert len(chunks) == 64
    data = make(chunks=chunks, encoding=encoding)
    rf = decode_region(data, rx=0, ry=0, path="regions/r.0.0.region")
    assert rf.chunks == chunks
    h = rf.header
    assert (h.type, h.schemaVersion, h.rx, h.ry) == ("region", 1, 0, 0)
    assert (h.last_processed_tick, h.generation, h.region_size) == (1234, 7, 8)
    assert (h.writer, h.encoding, h.written_at) == ("shard-a/epoch-3", encoding, 1_700_000_000.25)
    assert data[10] == ENCODINGS.index(encoding)
    # Deterministic: the same input gives the same bytes.
    assert make(chunks=dict(reversed(list(chunks.items()))), encoding=encoding) == data


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_empty_region(encoding: str) -> None:
    data = make(chunks={}, encoding=encoding)
    rf = decode_region(data, rx=0, ry=0, path="p")
    assert rf.chunks == {}
    assert rf.header.chunks == []
    assert list(scan_chunk_frames(data)) == []


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_negative_coordinates(encoding: str) -> None:
    chunks = payloads(-1, -3)
    assert min(chunks) == (-8, -24)
    data = make(-1, -3, chunks, encoding)
    assert decode_region(data, rx=-1, ry=-3, path="p").chunks == chunks


def test_extreme_coordinates_and_generation() -> None:
    lo, hi = -(2**31), 2**31 - 1
    chunks = {(lo, hi): b"corner", (hi, lo): b""}
    data = make(lo, hi, chunks, generation=2**64 - 1, region_size=0)
    rf = decode_region(data, rx=lo, ry=hi, path="p")
    assert rf.chunks == chunks
    assert rf.header.generation == 2**64 - 1


def test_written_at_defaults_to_now() -> None:
    data = encode_region(
        rx=0, ry=0, last_processed_tick=0, generation=0, writer="w", encoding="msgpack", chunks={}
    )
    assert decode_region(data, rx=0, ry=0, path="p").header.written_at > 1.6e9


@settings(max_examples=60, deadline=None)
@given(
    chunks=st.dictionaries(
        st.tuples(st.integers(-(2**31), 2**31 - 1), st.integers(-(2**31), 2**31 - 1)),
        st.binary(max_size=64),
        max_size=12,
    ),
    encoding=st.sampled_from(ENCODINGS),
    tick=st.integers(-(2**63), 2**63 - 1),
    writer=st.text(max_size=20),
)
def test_round_trip_property(
    chunks: dict[tuple[int, int], bytes], encoding: str, tick: int, writer: str
) -> None:
    data = encode_region(
        rx=3,
        ry=-4,
        last_processed_tick=tick,
        generation=1,
        writer=writer,
        encoding=encoding,  # type: ignore[arg-type]
        chunks=chunks,
    )
    rf = decode_region(data, rx=3, ry=-4, path="p")
    assert rf.chunks == chunks
    assert (rf.header.last_processed_tick, rf.header.writer) == (tick, writer)


# --- index + range reads ---------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_index_and_range_reads_equal_full_decode(encoding: str) -> None:
    data = make(2, -1, payloads(2, -1), encoding)
    full = decode_region(data, rx=2, ry=-1, path="p")
    # A loader reads a small prefix first and is told how much more the header needs.
    prefix = data[:64]
    index = decode_index(prefix, rx=2, ry=-1, path="p")
    while isinstance(index, int):
        assert index > len(prefix)
        prefix = data[:index]
        index = decode_index(prefix, rx=2, ry=-1, path="p")
    assert isinstance(index, RegionIndex)
    assert index.header == full.header
    assert index.file_length == len(data)
    assert list(index.entries) == list(full.chunks)
    for key, e in index.entries.items():
        assert (
            read_chunk(data[e.offset : e.offset + e.length], e, rx=2, ry=-1, path="p")
            == (full.chunks[key])
        )


def test_decode_index_needs_exact_prefix() -> None:
    data = make()
    assert decode_index(b"", rx=0, ry=0, path="p") == PREAMBLE_LEN
    assert decode_index(data[:10], rx=0, ry=0, path="p") == PREAMBLE_LEN
    need = decode_index(data[:PREAMBLE_LEN], rx=0, ry=0, path="p")
    assert isinstance(need, int)
    assert decode_index(data[: need - 1], rx=0, ry=0, path="p") == need
    assert isinstance(decode_index(data[:need], rx=0, ry=0, path="p"), RegionIndex)
    with pytest.raises(MalformedFile, match="bad magic"):
        decode_index(b"STRX", rx=0, ry=0, path="p")


def test_read_chunk_rejects_wrong_range_and_damage() -> None:
    data = make()
    index = decode_index(data, rx=0, ry=0, path="k")
    assert isinstance(index, RegionIndex)
    a, b = list(index.entries.values())[:2]
    frame = data[a.offset : a.offset + a.length]
    with pytest.raises(TruncatedFile) as ti:
        read_chunk(frame[:-1], a, rx=0, ry=0, path="k")
    assert (ti.value.expected, ti.value.actual) == (
        f"{a.length} bytes (at least {FRAME_HEADER_LEN})",
        f"{a.length - 1} bytes",
    )
    damaged = bytearray(frame)
    damaged[-1] ^= 0x01
    with pytest.raises(ChecksumMismatch) as ci:
        read_chunk(bytes(damaged), a, rx=0, ry=0, path="k")
    assert ci.value.path == "k" and ci.value.region == (0, 0)
    assert ci.value.expected == hex64(a.xxh3) and len(ci.value.actual or "") == 16
    # An intact frame of another chunk read under this chunk's entry.
    other = data[b.offset : b.offset + b.length]
    with pytest.raises(IntegrityError):
        read_chunk(
            other, ChunkEntry(a.cx, a.cy, a.offset, len(other), a.xxh3), rx=0, ry=0, path="k"
        )
    # Right frame, wrong region.
    with pytest.raises(ChecksumMismatch, match=r"belongs to region \(0, 0\)"):
        read_chunk(frame, a, rx=1, ry=0, path="k")


# --- binding and versions --------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_valid_file_under_another_region_name_is_detected(encoding: str) -> None:
    data = make(0, 0, encoding=encoding)
    with pytest.raises(ChecksumMismatch) as ei:
        decode_region(data, rx=1, ry=0, path=region_key(1, 0))
    err = ei.value
    assert err.path == "regions/r.1.0.region" and err.region == (1, 0)
    assert (err.expected, err.actual) == ("region (1, 0)", "region (0, 0)")
    assert "belongs to region (0, 0)" in str(err)
    with pytest.raises(ChecksumMismatch):
        decode_index(data, rx=0, ry=1, path="p")


def test_frame_moved_between_regions_is_detected() -> None:
    # Two regions whose first chunks have equal-length payloads, so a frame can be swapped
    # in byte for byte and the rest of the file re-sealed: only the frame binding is left.
    a = make(0, 0, {(0, 0): b"A" * 50, (1, 0): b"a"}, region_size=0)
    b = make(5, 5, {(0, 0): b"B" * 50}, region_size=0)
    ia, ib = decode_index(a, rx=0, ry=0, path="a"), decode_index(b, rx=5, ry=5, path="b")
    assert isinstance(ia, RegionIndex) and isinstance(ib, RegionIndex)
    ea, eb = ia.entries[(0, 0)], ib.entries[(0, 0)]
    moved = bytearray(a)
    moved[ea.offset : ea.offset + ea.length] = b[eb.offset : eb.offset + eb.length]
    with pytest.raises(ChecksumMismatch, match=r"belongs to region \(5, 5\)"):
        decode_region(reseal(moved, 0, 0, 7), rx=0, ry=0, path="a")
    # Even with the frame's region fields rewritten to the target region, its checksum
    # (seeded with the region it was written for) no longer verifies.
    struct.pack_into("<ii", moved, ea.offset + 20, 0, 0)
    with pytest.raises(ChecksumMismatch, match="chunk checksum mismatch"):
        decode_region(reseal(moved, 0, 0, 7), rx=0, ry=0, path="a")
    with pytest.raises(ChecksumMismatch):
        read_chunk(b[eb.offset : eb.offset + eb.length], ea, rx=0, ry=0, path="a")


def test_header_resealed_alone_is_not_enough() -> None:
    # The whole-file checksum is seeded with the generation: a header edited and re-sealed
    # (say, a stale header spliced onto a newer body) fails the trailer.
    data = bytearray(make(generation=7))
    header_len = struct.unpack_from("<I", data, 12)[0]
    at = bytes(data).index(b"\xaageneration", 0, PREAMBLE_LEN + header_len) + 11
    assert data[at] == 7
    data[at] = 6
    seed = xxh3(bytes(data[:16]), region_seed(0, 0))
    struct.pack_into(
        "<Q", data, 16, xxh3(bytes(data[PREAMBLE_LEN : PREAMBLE_LEN + header_len]), seed)
    )
    with pytest.raises(ChecksumMismatch, match=r"whole-file checksum mismatch \(generation 6\)"):
        decode_region(bytes(data), rx=0, ry=0, path="p")


def test_newer_format_version_is_unsupported() -> None:
    # A genuine newer writer hashes its own version into the header checksum.
    data = bytearray(make())
    struct.pack_into("<H", data, 8, 2)
    data = bytearray(reseal(data, 0, 0, 7))
    with pytest.raises(UnsupportedFormat) as ei:
        decode_region(bytes(data), rx=0, ry=0, path="regions/r.0.0.region")
    msg = str(ei.value)
    assert ei.value.path == "regions/r.0.0.region"
    assert msg.startswith("regions/r.0.0.region: ")
    assert "format version 2" in msg and "version 1" in msg and "damaged" not in msg
    with pytest.raises(UnsupportedFormat):
        decode_index(bytes(data[:40]), rx=0, ry=0, path="p")


def test_patched_version_field_is_unsupported_with_a_damage_hint() -> None:
    data = bytearray(make())
    data[8:10] = (99).to_bytes(2, "little")
    with pytest.raises(UnsupportedFormat, match="version field is probably damaged"):
        decode_region(bytes(data), rx=0, ry=0, path="p")
    data[8:10] = (0).to_bytes(2, "little")  # version 0 never existed: plain damage
    with pytest.raises(ChecksumMismatch) as ei:
        decode_region(bytes(data), rx=0, ry=0, path="p")
    assert (ei.value.expected, ei.value.actual) == ("version 1", "version 0")


def test_unknown_flags_and_header_schema_are_unsupported() -> None:
    data = bytearray(make())
    data[11] = 0x01
    with pytest.raises(UnsupportedFormat, match="flags"):
        decode_region(reseal(data, 0, 0, 7), rx=0, ry=0, path="p")
    data = bytearray(make())
    header_len = struct.unpack_from("<I", data, 12)[0]
    at = bytes(data).index(b"\xadschemaVersion", 0, PREAMBLE_LEN + header_len) + 14
    data[at] = 2
    with pytest.raises(UnsupportedFormat, match="schemaVersion 2"):
        decode_region(reseal(data, 0, 0, 7), rx=0, ry=0, path="p")


# --- errors name what and where --------------------------------------------------------------


def test_errors_name_path_region_expected_actual() -> None:
    data = make(3, 4, payloads(3, 4))
    n = len(data)
    with pytest.raises(TruncatedFile) as t:
        decode_region(data[:-1], rx=3, ry=4, path="regions/r.3.4.region")
    assert (t.value.expected, t.value.actual) == (f"{n} bytes", f"{n - 1} bytes")
    assert t.value.path == "regions/r.3.4.region" and t.value.region == (3, 4)
    with pytest.raises(TruncatedFile) as t:
        decode_region(data + b"\0", rx=3, ry=4, path="p")
    assert "longer" in str(t.value)
    with pytest.raises(TruncatedFile, match="ends inside its header"):
        decode_region(data[:30], rx=3, ry=4, path="p")

    flipped = bytearray(data)
    flipped[n - 100] ^= 0x80  # inside the last chunk's payload
    with pytest.raises(ChecksumMismatch) as c:
        decode_region(bytes(flipped), rx=3, ry=4, path="p")
    assert "chunk (31, 39)" in str(c.value)
    assert len(c.value.expected or "") == 16 and len(c.value.actual or "") == 16

    flipped = bytearray(data)
    flipped[n - 3] ^= 0x01  # the whole-file checksum itself
    with pytest.raises(ChecksumMismatch, match="whole-file"):
        decode_region(bytes(flipped), rx=3, ry=4, path="p")

    flipped = bytearray(data)
    flipped[PREAMBLE_LEN + 5] ^= 0x01
    with pytest.raises(ChecksumMismatch, match="header checksum"):
        decode_region(bytes(flipped), rx=3, ry=4, path="p")

    with pytest.raises(MalformedFile, match="bad magic"):
        decode_region(b"GIF89a" + data[6:], rx=3, ry=4, path="p")
    with pytest.raises(MalformedFile, match="trailer magic"):
        decode_region(
            reseal(bytearray(data[:-24] + b"STRMEND2" + data[-16:]), 3, 4, 7), rx=3, ry=4, path="p"
        )


def test_header_length_field_is_capped() -> None:
    data = bytearray(make())
    struct.pack_into("<I", data, 12, 0xFFFFFFFF)
    with pytest.raises(MalformedFile, match="implausible"):
        decode_index(bytes(data[:PREAMBLE_LEN]), rx=0, ry=0, path="p")


# --- caller errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rx": 2**31},
        {"chunks": {(2**31, 0): b""}, "region_size": 0},
        {"chunks": {(8, 0): b""}},  # outside region (0, 0) of size 8
        {"chunks": {(0, -1): b""}},
        {"generation": -1},
        {"generation": 2**64},
        {"encoding": "yaml"},
        {"region_size": -1},
    ],
)
def test_encode_rejects_caller_errors(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {
        "rx": 0,
        "ry": 0,
        "last_processed_tick": 0,
        "generation": 1,
        "writer": "w",
        "encoding": "msgpack",
        "chunks": {(0, 0): b"x"},
        "region_size": 8,
    }
    args.update(kwargs)
    with pytest.raises(ValueError):
        encode_region(**args)  # type: ignore[arg-type]


def test_decode_rejects_out_of_range_region_argument() -> None:
    with pytest.raises(ValueError):
        decode_region(make(), rx=2**31, ry=0, path="p")


# --- keys ------------------------------------------------------------------------------------


def test_region_keys() -> None:
    for rx, ry in [(0, 0), (0, -3), (-1, 12), (2**31 - 1, -(2**31))]:
        assert parse_region_key(region_key(rx, ry)) == (rx, ry)
    assert region_key(0, -3) == "regions/r.0.-3.region"
    assert parse_region_key("snapshots/7/regions/r.1.2.region") == (1, 2)
    for bad in [
        "regions/r.01.2.region",
        "regions/r.-0.2.region",
        "regions/r.+1.2.region",
        "regions/r.1.2.region.tmp",
        "regions/r.1.region",
        "regions/r.1.2.3.region",
        "regions/r.a.2.region",
        "regions/r.2147483648.0.region",
        "regions/r. 1.2.region",
        "regions/r.1.2.region/",
    ]:
        assert parse_region_key(bad) is None, bad


# --- salvage ---------------------------------------------------------------------------------


def test_salvage_with_header_destroyed_returns_every_chunk() -> None:
    chunks = payloads(-2, 5)
    data = bytearray(make(-2, 5, chunks))
    header_len = struct.unpack_from("<I", data, 12)[0]
    data[: PREAMBLE_LEN + header_len] = bytes(PREAMBLE_LEN + header_len)
    data[-TRAILER_LEN:] = b"\xff" * TRAILER_LEN
    with pytest.raises(IntegrityError):
        decode_region(bytes(data), rx=-2, ry=5, path="p")
    got = list(scan_chunk_frames(bytes(data)))
    assert {(s.cx, s.cy): s.payload for s in got} == chunks
    assert {(s.rx, s.ry) for s in got} == {(-2, 5)}
    assert all(data[s.offset : s.offset + 4] == b"CHNK" for s in got)


def test_salvage_skips_only_the_damaged_chunk() -> None:
    chunks = payloads(0, 0, seed=3)
    data = make(0, 0, chunks)
    index = decode_index(data, rx=0, ry=0, path="p")
    assert isinstance(index, RegionIndex)
    for victim, at in [((3, 3), 40), ((0, 0), 0), ((7, 7), 14)]:
        e = index.entries[victim]
        if at >= e.length:
            continue
        damaged = bytearray(data)
        damaged[e.offset + at] ^= 0x04
        got = {(s.cx, s.cy): s.payload for s in scan_chunk_frames(bytes(damaged))}
        want = {k: v for k, v in chunks.items() if k != victim}
        assert got == want


def test_salvage_finds_frames_of_several_files_and_ignores_garbage() -> None:
    rng = random.Random(5)
    a, b = payloads(0, 0, 2, seed=1), payloads(1, 1, 2, seed=2)
    fa, fb = make(0, 0, a, region_size=2), make(1, 1, b, region_size=2)
    blob = rng.randbytes(300) + fa + b"CHNK" * 50 + fb + rng.randbytes(99)
    got = {(s.rx, s.ry, s.cx, s.cy): s.payload for s in scan_chunk_frames(blob)}
    want = {(0, 0, *k): v for k, v in a.items()} | {(1, 1, *k): v for k, v in b.items()}
    assert got == want
    # A bogus huge length after the magic neither raises nor allocates.
    assert list(scan_chunk_frames(b"CHNK" + b"\xff" * 60)) == []
    for _ in range(200):
        assert list(scan_chunk_frames(rng.randbytes(rng.randrange(0, 200)) + b"CHNK")) == []


def test_index_entries_are_array_like() -> None:
    import msgspec

    e = ChunkEntry(1, -2, 300, 40, 2**64 - 1)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(e)) == [1, -2, 300, 40, 2**64 - 1]
