"""Region files: one immutable, self-verifying file per region.

The byte layout is specified in ``docs/format.md``; this module is its only implementation.
In short::

    preamble (24) | header (header_len) | chunk frame * N | trailer (24)

Every byte is covered by a checksum, and the checksums are seeded with the region id (and
the file's generation), so a file or a chunk frame that is intact but in the wrong place
fails verification just like a damaged one.

``decode_region`` is the boundary where untrusted bytes become objects: for any input it
either returns a fully verified ``RegionFile`` or raises ``IntegrityError`` (one of its
subclasses) or ``UnsupportedFormat``. Nothing else escapes it; ``tests/test_region_fuzz.py``
holds it to that.
"""

from __future__ import annotations

import re
import struct
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Final, Literal, NoReturn

import msgspec

from streamer.errors import ChecksumMismatch, MalformedFile, TruncatedFile, UnsupportedFormat
from streamer.format.checksum import BytesLike, hex64, xxh3, xxh3_hasher

__all__ = [
    "FORMAT_VERSION",
    "FRAME_HEADER_LEN",
    "MAX_CHUNK_PAYLOAD",
    "MAX_HEADER_LEN",
    "PREAMBLE_LEN",
    "TRAILER_LEN",
    "ChunkEntry",
    "Encoding",
    "RegionFile",
    "RegionHeader",
    "RegionIndex",
    "SalvagedChunk",
    "decode_index",
    "decode_region",
    "encode_region",
    "file_seed",
    "parse_region_key",
    "read_chunk",
    "region_key",
    "region_seed",
    "scan_chunk_frames",
]

Encoding = Literal["msgpack", "json"]

MAGIC: Final = b"STRMRGN1"
FRAME_MAGIC: Final = b"CHNK"
TRAILER_MAGIC: Final = b"STRMEND1"
FORMAT_VERSION: Final = 1
HEADER_SCHEMA_VERSION: Final = 1

# magic | format_version | encoding | flags | header_len | header_xxh3
_PREAMBLE: Final = struct.Struct("<8sHBBIQ")
# magic | frame_xxh3 | cx | cy | rx | ry | payload_len   (then the payload)
_FRAME: Final = struct.Struct("<4sQiiiiI")
# magic | file_length | file_xxh3
_TRAILER: Final = struct.Struct("<8sQQ")
_FRAME_AFTER_SUM: Final = struct.Struct("<iiiiI")
_REGION_ID: Final = struct.Struct("<ii")
_REGION_GEN: Final = struct.Struct("<iiQ")
_VERSION_FIELD: Final = struct.Struct("<H")
_U64: Final = struct.Struct("<Q")

PREAMBLE_LEN: Final = _PREAMBLE.size  # 24
FRAME_HEADER_LEN: Final = _FRAME.size  # 32
TRAILER_LEN: Final = _TRAILER.size  # 24
# The header checksum covers the preamble up to (not including) its own field.
_PREAMBLE_HASHED: Final = 16
# The frame checksum sits right after the frame magic and covers every frame byte after
# itself (coordinates, length, payload) in one contiguous run: one hash call per chunk.
_FRAME_SUMMED_FROM: Final = 12
# The trailer checksum covers every file byte before itself.
_TRAILER_SUM_LEN: Final = 8

# Caps on length fields read from disk, so a damaged length cannot make a loader fetch or
# allocate gigabytes before the checksum has had a chance to reject it.
MAX_HEADER_LEN: Final = 16 * 1024 * 1024
MAX_CHUNK_PAYLOAD: Final = 64 * 1024 * 1024
_MIN_FRAME: Final = FRAME_HEADER_LEN
_MAX_FRAME: Final = FRAME_HEADER_LEN + MAX_CHUNK_PAYLOAD

_I32_MIN: Final = -(1 << 31)
_I32_MAX: Final = (1 << 31) - 1
_U64_MAX: Final = (1 << 64) - 1

_ENCODING_IDS: Final[dict[str, int]] = {"msgpack": 0, "json": 1}
_ENCODING_NAMES: Final[tuple[Encoding, ...]] = ("msgpack", "json")


class ChunkEntry(msgspec.Struct, array_like=True, frozen=True):
    """Index entry of one chunk: where its frame is and what its checksum must be.

    ``offset`` is the absolute file offset of the chunk *frame*, ``length`` the whole frame
    (32-byte frame header + payload), so one range read of ``(offset, length)`` fetches
    exactly what ``read_chunk`` verifies. ``xxh3`` equals the frame's own checksum field.
    """

    cx: int
    cy: int
    offset: int
    length: int
    xxh3: int


class RegionHeader(msgspec.Struct, kw_only=True, frozen=True):
    """The header record. Fields are only ever appended, with defaults (msgspec rules)."""

    type: Literal["region"] = "region"
    schemaVersion: int = HEADER_SCHEMA_VERSION
    rx: int
    ry: int
    last_processed_tick: int
    written_at: float
    writer: str
    generation: int
    encoding: Encoding
    # In file order; frames are contiguous, so offsets run from the end of the header.
    chunks: list[ChunkEntry]
    # 0 = unknown; when set, every chunk must lie inside the region.
    region_size: int = 0


@dataclass(frozen=True, slots=True)
class RegionFile:
    header: RegionHeader
    chunks: dict[tuple[int, int], bytes]


@dataclass(frozen=True, slots=True)
class RegionIndex:
    """A verified header: enough to read any single chunk by range."""

    header: RegionHeader
    entries: dict[tuple[int, int], ChunkEntry]
    # Exact length the whole file must have, as implied by the index.
    file_length: int


@dataclass(frozen=True, slots=True)
class SalvagedChunk:
    offset: int
    rx: int
    ry: int
    cx: int
    cy: int
    payload: bytes


# What msgspec can raise on hostile bytes: DecodeError (and ValidationError), but also
# UnicodeDecodeError for a bad UTF-8 string and RecursionError for deep nesting.
_DECODE_ERRORS: Final = (msgspec.DecodeError, ValueError, RecursionError)

_ENCODERS: Final = (msgspec.msgpack.Encoder(), msgspec.json.Encoder())
_DECODERS: Final[
    tuple[msgspec.msgpack.Decoder[RegionHeader], msgspec.json.Decoder[RegionHeader]]
] = (msgspec.msgpack.Decoder(RegionHeader), msgspec.json.Decoder(RegionHeader))


# --- keys ------------------------------------------------------------------------------------

_KEY_RE: Final = re.compile(r"r\.(-?[1-9][0-9]*|0)\.(-?[1-9][0-9]*|0)\.region")


def region_key(rx: int, ry: int) -> str:
    return f"regions/r.{rx}.{ry}.region"


def parse_region_key(key: str) -> tuple[int, int] | None:
    """``(rx, ry)`` from a key whose last segment is ``r.{rx}.{ry}.region``, else ``None``.

    Only the last segment is read, so snapshot and quarantine copies parse too. Only the
    canonical spelling is accepted (no ``+``, no leading zeros, no ``-0``, int32 range), so
    one region has exactly one name.
    """
    m = _KEY_RE.fullmatch(key.rpartition("/")[2])
    if m is None:
        return None
    rx, ry = int(m.group(1)), int(m.group(2))
    if not (_I32_MIN <= rx <= _I32_MAX and _I32_MIN <= ry <= _I32_MAX):
        return None
    return rx, ry


# --- seeds -----------------------------------------------------------------------------------


def region_seed(rx: int, ry: int) -> int:
    """Seed binding header and chunk checksums to a region: ``xxh3(pack("<ii", rx, ry))``."""
    return xxh3(_REGION_ID.pack(rx, ry))


def file_seed(rx: int, ry: int, generation: int) -> int:
    """Seed of the whole-file checksum: ``xxh3(pack("<iiQ", rx, ry, generation))``."""
    return xxh3(_REGION_GEN.pack(rx, ry, generation))


def _region_seed_checked(rx: int, ry: int) -> int:
    if not (_I32_MIN <= rx <= _I32_MAX and _I32_MIN <= ry <= _I32_MAX):
        raise ValueError(f"region ({rx}, {ry}) does not fit the format's int32 fields")
    return region_seed(rx, ry)


# --- encode ----------------------------------------------------------------------------------


def encode_region(
    *,
    rx: int,
    ry: int,
    last_processed_tick: int,
    generation: int,
    writer: str,
    encoding: Encoding,
    chunks: Mapping[tuple[int, int], bytes],
    region_size: int = 0,
    written_at: float | None = None,
) -> bytes:
    """A complete region file. Chunk payloads are opaque, already-encoded records.

    Frames are laid out sorted by ``(cx, cy)``, so equal inputs give equal bytes.
    ``written_at`` defaults to now; ``region_size`` (0 = not recorded) lets every later
    decode check that each chunk lies inside the region.

    :raises ValueError: a coordinate outside int32, a generation outside uint64, a payload
        over ``MAX_CHUNK_PAYLOAD``, an unknown encoding, or (with ``region_size``) a chunk
        outside the region. These are caller bugs, never data problems.
    """
    rseed = _region_seed_checked(rx, ry)
    if not 0 <= generation <= _U64_MAX:
        raise ValueError(f"generation={generation} does not fit uint64")
    enc_id = _ENCODING_IDS.get(encoding)
    if enc_id is None:
        raise ValueError(f"unknown encoding {encoding!r}; expected 'msgpack' or 'json'")
    if region_size < 0:
        raise ValueError(f"region_size={region_size} must be >= 0")

    # Frames first, into their own buffer: their checksums do not depend on where the
    # frames land, and the header (whose length fixes that) needs the checksums.
    keys = sorted(chunks)
    lens = [len(chunks[k]) for k in keys]
    if lens and max(lens) > MAX_CHUNK_PAYLOAD:
        big = keys[lens.index(max(lens))]
        raise ValueError(f"chunk {big} payload of {max(lens)} bytes is over the format's cap")
    frames_len = sum(lens) + FRAME_HEADER_LEN * len(keys)
    frames = bytearray(frames_len)
    fmv = memoryview(frames)
    sums: list[int] = []
    off = 0
    pack_frame = _FRAME.pack_into
    for cx, cy in keys:
        payload = chunks[(cx, cy)]
        start = off + FRAME_HEADER_LEN
        end = start + len(payload)
        try:
            pack_frame(frames, off, FRAME_MAGIC, 0, cx, cy, rx, ry, len(payload))
        except struct.error as exc:
            raise ValueError(f"chunk ({cx}, {cy}) does not fit the format's int32 fields") from exc
        fmv[start:end] = payload
        h = xxh3(fmv[off + _FRAME_SUMMED_FROM : end], rseed)
        _U64.pack_into(frames, off + len(FRAME_MAGIC), h)
        sums.append(h)
        off = end
    fmv.release()
    if region_size and keys:
        ys = [cy for _, cy in keys]
        # Floor division is monotone, so checking the extremes checks every chunk.
        corners = (keys[0][0], keys[-1][0], min(ys), max(ys))
        if tuple(v // region_size for v in corners) != (rx, rx, ry, ry):
            raise ValueError(f"a chunk lies outside region ({rx}, {ry}) of size {region_size}")

    # Offsets are absolute, so they depend on the header's own length, which depends on how
    # the offsets encode. Iterate to the fixed point from an estimate; the header length is
    # monotone in the base offset, so the iteration cannot oscillate and usually takes two
    # rounds.
    encoder = _ENCODERS[enc_id]
    when = time.time() if written_at is None else written_at
    base = PREAMBLE_LEN + 96 + len(writer) + 24 * len(keys)
    for _ in range(16):
        entries = []
        off = base
        for (cx, cy), n, h in zip(keys, lens, sums, strict=True):
            n += FRAME_HEADER_LEN
            entries.append(ChunkEntry(cx, cy, off, n, h))
            off += n
        header = RegionHeader(
            rx=rx,
            ry=ry,
            last_processed_tick=last_processed_tick,
            written_at=when,
            writer=writer,
            generation=generation,
            encoding=encoding,
            chunks=entries,
            region_size=region_size,
        )
        header_bytes = encoder.encode(header)
        if PREAMBLE_LEN + len(header_bytes) == base:
            break
        base = PREAMBLE_LEN + len(header_bytes)
    else:  # pragma: no cover - a monotone map on the integers reaches its fixed point
        raise AssertionError("region header length did not converge")
    if len(header_bytes) > MAX_HEADER_LEN:
        raise ValueError(f"region header of {len(header_bytes)} bytes is too large")

    total = base + frames_len + TRAILER_LEN
    pre = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, enc_id, 0, len(header_bytes), 0)
    header_sum = xxh3(header_bytes, xxh3(pre[:_PREAMBLE_HASHED], rseed))
    pre = pre[:_PREAMBLE_HASHED] + _U64.pack(header_sum)
    trailer_head = TRAILER_MAGIC + _U64.pack(total)
    # Streamed, so the whole-file checksum needs no joined copy before the final one.
    whole = xxh3_hasher(file_seed(rx, ry, generation))
    for part in (pre, header_bytes, frames, trailer_head):
        whole.update(part)
    return b"".join((pre, header_bytes, frames, trailer_head, _U64.pack(whole.intdigest())))


# --- decode ----------------------------------------------------------------------------------


def decode_region(data: BytesLike, *, rx: int, ry: int, path: str) -> RegionFile:
    """Verify and decode a whole region file read from ``path`` (key of region ``(rx, ry)``).

    :raises TruncatedFile: shorter or longer than the index and trailer say.
    :raises ChecksumMismatch: a checksum fails, including a file or frame of another region.
    :raises MalformedFile: bad magic, an undecodable header, an inconsistent index.
    :raises UnsupportedFormat: written by a newer format version.
    :raises ValueError: ``rx``/``ry`` outside int32 (a caller bug, not a data problem).
    """
    return _decode_region(bytes(data), rx, ry, path)  # bytes(): no copy when already bytes


def _decode_region(data: bytes, rx: int, ry: int, path: str) -> RegionFile:
    region = (rx, ry)
    rseed = _region_seed_checked(rx, ry)
    n = len(data)
    parsed = _read_header(data, region, rseed, path)
    if isinstance(parsed, int):
        raise TruncatedFile(
            f"region {region}: file ends inside its header",
            path=path,
            expected=f"at least {parsed + TRAILER_LEN} bytes",
            actual=f"{n} bytes",
            region=region,
        )
    header, header_end = parsed

    # One pass does the index checks and the frame checks together: this loop runs once
    # per chunk on every full load. Any doubt leaves it for _diagnose, which repeats the
    # checks one at a time, in a fixed order, to name the first fault precisely.
    mv = memoryview(data)
    unpack = _FRAME.unpack_from
    limit = n - TRAILER_LEN
    chunks: dict[tuple[int, int], bytes] = {}
    off = header_end
    ok = True
    for e in header.chunks:
        end = off + e.length
        if (
            e.offset != off
            or e.length < FRAME_HEADER_LEN
            or end > limit
            or unpack(data, off)
            != (FRAME_MAGIC, e.xxh3, e.cx, e.cy, rx, ry, end - off - FRAME_HEADER_LEN)
            or xxh3(mv[off + _FRAME_SUMMED_FROM : end], rseed) != e.xxh3
        ):
            ok = False
            break
        chunks[(e.cx, e.cy)] = data[off + FRAME_HEADER_LEN : end]
        off = end
    if not ok or off != limit or len(chunks) != len(header.chunks):
        _diagnose(data, header, header_end, rseed, region, path)

    magic, file_length, file_sum = _TRAILER.unpack_from(data, limit)
    if magic != TRAILER_MAGIC:
        raise MalformedFile(
            f"region {region}: bad trailer magic",
            path=path,
            expected=repr(TRAILER_MAGIC),
            actual=repr(magic),
            region=region,
        )
    if file_length != n:
        raise TruncatedFile(
            f"region {region}: file length disagrees with its trailer",
            path=path,
            expected=f"{file_length} bytes",
            actual=f"{n} bytes",
            region=region,
        )
    actual = xxh3(mv[: n - _TRAILER_SUM_LEN], file_seed(rx, ry, header.generation))
    if actual != file_sum:
        raise ChecksumMismatch(
            f"region {region}: whole-file checksum mismatch (generation {header.generation})",
            path=path,
            expected=hex64(file_sum),
            actual=hex64(actual),
            region=region,
        )
    return RegionFile(header=header, chunks=chunks)


def decode_index(prefix: BytesLike, *, rx: int, ry: int, path: str) -> RegionIndex | int:
    """Verify and decode the header from a prefix of the file.

    Returns the total prefix length needed when ``prefix`` is too short; call again with at
    least that many bytes. If a range read of that length returns fewer bytes, the file is
    truncated: that is the caller's ``TruncatedFile`` to raise. The trailer is not checked
    here; each chunk read by range is verified on its own by ``read_chunk``.

    :raises ChecksumMismatch, MalformedFile, UnsupportedFormat: as ``decode_region``.
    :raises ValueError: ``rx``/``ry`` outside int32.
    """
    region = (rx, ry)
    parsed = _read_header(bytes(prefix), region, _region_seed_checked(rx, ry), path)
    if isinstance(parsed, int):
        return parsed
    header, header_end = parsed
    entries, file_length = _check_index(header, header_end, region, path)
    return RegionIndex(header=header, entries=entries, file_length=file_length)


def read_chunk(frame: BytesLike, entry: ChunkEntry, *, rx: int, ry: int, path: str) -> bytes:
    """Verify one chunk frame read by range ``(entry.offset, entry.length)``; its payload.

    ``entry`` comes from a ``RegionIndex`` of the same region.

    :raises TruncatedFile: ``frame`` is not exactly ``entry.length`` bytes.
    :raises ChecksumMismatch, MalformedFile: as ``decode_region``, for this chunk.
    :raises ValueError: ``rx``/``ry`` outside int32.
    """
    buf = bytes(frame)
    region = (rx, ry)
    rseed = _region_seed_checked(rx, ry)
    if len(buf) != entry.length or entry.length < FRAME_HEADER_LEN:
        raise TruncatedFile(
            f"region {region}: chunk ({entry.cx}, {entry.cy}) frame at offset {entry.offset}"
            " has the wrong length",
            path=path,
            expected=f"{entry.length} bytes (at least {FRAME_HEADER_LEN})",
            actual=f"{len(buf)} bytes",
            region=region,
        )
    _check_frame(buf, 0, entry, rseed, region, path)
    return buf[FRAME_HEADER_LEN:]


def _read_header(
    data: bytes, region: tuple[int, int], rseed: int, path: str
) -> tuple[RegionHeader, int] | int:
    """The verified header and where it ends, or the prefix length needed to verify it."""
    n = len(data)
    k = min(n, len(MAGIC))
    if data[:k] != MAGIC[:k]:
        raise MalformedFile(
            f"region {region}: not a region file (bad magic)",
            path=path,
            expected=repr(MAGIC),
            actual=repr(data[:k]),
            region=region,
        )
    if n < PREAMBLE_LEN:
        return PREAMBLE_LEN
    _, version, enc_id, flags, header_len, header_sum = _PREAMBLE.unpack_from(data, 0)
    if header_len > MAX_HEADER_LEN:
        raise MalformedFile(
            f"region {region}: header length field is implausible",
            path=path,
            expected=f"<= {MAX_HEADER_LEN}",
            actual=str(header_len),
            region=region,
        )
    header_end: int = PREAMBLE_LEN + header_len
    if version != FORMAT_VERSION:
        _raise_bad_version(data, version, header_end, header_sum, rseed, region, path)
    if n < header_end:
        return header_end
    mv = memoryview(data)
    header_bytes = mv[PREAMBLE_LEN:header_end]
    actual = xxh3(header_bytes, xxh3(mv[:_PREAMBLE_HASHED], rseed))
    if actual != header_sum:
        _raise_header_mismatch(data, header_end, header_sum, actual, region, path)
    # Checked only now: once the checksum holds, a value we do not know was written on
    # purpose by a newer writer, not flipped by damage.
    if flags != 0:
        raise UnsupportedFormat(
            f"region {region}: unknown flags {flags:#04x} (format version 1 defines none)",
            path=path,
        )
    if enc_id >= len(_DECODERS):
        raise UnsupportedFormat(f"region {region}: unknown encoding id {enc_id}", path=path)
    try:
        header = _DECODERS[enc_id].decode(header_bytes)
    except _DECODE_ERRORS as exc:
        # Checksum-valid but undecodable: a writer bug or a forged file, never bit rot.
        raise MalformedFile(
            f"region {region}: header does not decode: {exc}", path=path, region=region
        ) from exc
    _check_header_fields(header, _ENCODING_NAMES[enc_id], region, path)
    return header, header_end


def _bad(
    region: tuple[int, int], path: str, what: str, expected: object, actual: object
) -> MalformedFile:
    return MalformedFile(
        f"region {region}: {what}",
        path=path,
        expected=str(expected),
        actual=str(actual),
        region=region,
    )


def _check_header_fields(
    header: RegionHeader, encoding: Encoding, region: tuple[int, int], path: str
) -> None:
    """Whole-header rules; the per-chunk rules are in ``_check_index``."""
    if header.schemaVersion > HEADER_SCHEMA_VERSION:
        raise UnsupportedFormat(
            f"region {region}: header schemaVersion {header.schemaVersion} is newer than this"
            f" code supports ({HEADER_SCHEMA_VERSION})",
            path=path,
        )
    if header.schemaVersion < 1:
        raise _bad(region, path, "invalid header schemaVersion", 1, header.schemaVersion)
    if header.encoding != encoding:
        raise _bad(
            region, path, "header encoding disagrees with the preamble", encoding, header.encoding
        )
    if (header.rx, header.ry) != region:
        raise _bad(region, path, "header names another region", region, (header.rx, header.ry))
    if not 0 <= header.generation <= _U64_MAX:
        raise _bad(region, path, "generation out of range", "0..2**64-1", header.generation)
    size = header.region_size
    if size < 0:
        raise _bad(region, path, "negative region_size", ">= 0", size)
    if size and header.chunks:
        # Floor division is monotone, so the extremes decide for every chunk.
        xs = [e.cx for e in header.chunks]
        ys = [e.cy for e in header.chunks]
        rx, ry = region
        for v, want in ((min(xs), rx), (max(xs), rx), (min(ys), ry), (max(ys), ry)):
            if v // size != want:
                raise _bad(
                    region,
                    path,
                    f"a chunk lies outside the region (region_size {size})",
                    f"a coordinate of region {region}",
                    f"{v} (in region coordinate {v // size})",
                )


def _check_index(
    header: RegionHeader, header_end: int, region: tuple[int, int], path: str
) -> tuple[dict[tuple[int, int], ChunkEntry], int]:
    """Canonical index: frames contiguous in index order, plausible lengths, unique coords.

    Returns the entries by coordinates and the exact file length the index implies.
    """
    chunks = header.chunks
    entries: dict[tuple[int, int], ChunkEntry] = {}
    off = header_end
    for e in chunks:
        if e.offset != off or not _MIN_FRAME <= e.length <= _MAX_FRAME:
            if e.offset != off:
                raise _bad(
                    region, path, f"chunk ({e.cx}, {e.cy}) frame is misplaced", off, e.offset
                )
            raise _bad(
                region,
                path,
                f"chunk ({e.cx}, {e.cy}) has an impossible frame length",
                f"{_MIN_FRAME}..{_MAX_FRAME}",
                e.length,
            )
        entries[(e.cx, e.cy)] = e
        off += e.length
    if len(entries) != len(chunks):
        seen: set[tuple[int, int]] = set()
        for e in chunks:
            if (e.cx, e.cy) in seen:
                raise _bad(region, path, f"chunk ({e.cx}, {e.cy}) is listed twice", "once", "twice")
            seen.add((e.cx, e.cy))
    return entries, off + TRAILER_LEN


def _diagnose(
    data: bytes,
    header: RegionHeader,
    header_end: int,
    rseed: int,
    region: tuple[int, int],
    path: str,
) -> NoReturn:
    """Name the first fault the fast pass of ``decode_region`` tripped over."""
    _, file_length = _check_index(header, header_end, region, path)
    n = len(data)
    if n != file_length:
        raise TruncatedFile(
            f"region {region}: file is {'shorter' if n < file_length else 'longer'}"
            " than its index says",
            path=path,
            expected=f"{file_length} bytes",
            actual=f"{n} bytes",
            region=region,
        )
    for e in header.chunks:
        _check_frame(data, e.offset, e, rseed, region, path)
    # Unreachable if the fast pass and the checks above agree; kept so that even a bug
    # here cannot let another exception type, or unverified data, out of decode_region.
    raise MalformedFile(f"region {region}: inconsistent index", path=path, region=region)


def _check_frame(
    data: bytes, off: int, entry: ChunkEntry, rseed: int, region: tuple[int, int], path: str
) -> None:
    """Check one frame at ``off`` against its index entry; the caller ensured it fits."""
    magic, stored, cx, cy, frx, fry, plen = _FRAME.unpack_from(data, off)
    end = off + entry.length
    actual = xxh3(memoryview(data)[off + _FRAME_SUMMED_FROM : end], rseed)
    if (magic, stored, cx, cy, frx, fry, plen) == (
        FRAME_MAGIC,
        actual,
        entry.cx,
        entry.cy,
        *region,
        entry.length - FRAME_HEADER_LEN,
    ) and (actual == entry.xxh3):
        return
    where = f"region {region}: chunk ({entry.cx}, {entry.cy}) at offset {entry.offset}"
    if magic != FRAME_MAGIC:
        raise MalformedFile(
            f"{where}: bad frame magic",
            path=path,
            expected=repr(FRAME_MAGIC),
            actual=repr(magic),
            region=region,
        )
    if actual != stored:
        # Checked before the fields: a flipped field is damage, and this says so; a frame
        # from another region fails here too, so tell that case apart for the operator.
        if (frx, fry) != region and _I32_MIN <= frx <= _I32_MAX and _I32_MIN <= fry <= _I32_MAX:
            if (
                xxh3(memoryview(data)[off + _FRAME_SUMMED_FROM : end], region_seed(frx, fry))
                == stored
            ):
                raise ChecksumMismatch(
                    f"{where}: frame belongs to region ({frx}, {fry}) (moved between files)",
                    path=path,
                    expected=f"region {region}",
                    actual=f"region ({frx}, {fry})",
                    region=region,
                )
        raise ChecksumMismatch(
            f"{where}: chunk checksum mismatch",
            path=path,
            expected=hex64(stored),
            actual=hex64(actual),
            region=region,
        )
    if stored != entry.xxh3:
        raise ChecksumMismatch(
            f"{where}: frame checksum disagrees with the index",
            path=path,
            expected=hex64(entry.xxh3),
            actual=hex64(stored),
            region=region,
        )
    if (cx, cy, frx, fry, plen) != (entry.cx, entry.cy, *region, entry.length - FRAME_HEADER_LEN):
        raise MalformedFile(
            f"{where}: frame fields disagree with the index",
            path=path,
            expected=f"chunk ({entry.cx}, {entry.cy}) of region {region},"
            f" {entry.length - FRAME_HEADER_LEN} payload bytes",
            actual=f"chunk ({cx}, {cy}) of region ({frx}, {fry}), {plen} payload bytes",
            region=region,
        )
    # Unreachable while the checks above cover the fast test's negation; kept so that a
    # slip there fails loudly instead of passing an unverified frame.
    raise MalformedFile(f"{where}: frame does not verify", path=path, region=region)


def _raise_bad_version(
    data: bytes,
    version: int,
    header_end: int,
    header_sum: int,
    rseed: int,
    region: tuple[int, int],
    path: str,
) -> NoReturn:
    # A real newer writer hashes its own version number into the header checksum, so if
    # the header verifies once the field reads 1 again, this is a version 1 file whose
    # version field was changed.
    damaged = False
    if len(data) >= header_end:
        preamble = bytearray(data[:_PREAMBLE_HASHED])
        _VERSION_FIELD.pack_into(preamble, len(MAGIC), FORMAT_VERSION)
        seed = xxh3(preamble, rseed)
        damaged = xxh3(memoryview(data)[PREAMBLE_LEN:header_end], seed) == header_sum
    if version > FORMAT_VERSION:
        # Still UnsupportedFormat: refusing is the safe answer either way, and a test or a
        # tool may patch the field on purpose. The hint tells the operator which it is.
        hint = (
            f"; the rest of the header verifies as version {FORMAT_VERSION}, so the version"
            " field is probably damaged: restore the region from a snapshot"
            if damaged
            else ""
        )
        raise UnsupportedFormat(
            f"region {region}: format version {version} is newer than this code supports"
            f" (version {FORMAT_VERSION}){hint}",
            path=path,
        )
    if damaged:
        raise ChecksumMismatch(
            f"region {region}: format version field is damaged; the header verifies"
            f" as version {FORMAT_VERSION}",
            path=path,
            expected=f"version {FORMAT_VERSION}",
            actual=f"version {version}",
            region=region,
        )
    raise MalformedFile(
        f"region {region}: invalid format version",
        path=path,
        expected=str(FORMAT_VERSION),
        actual=str(version),
        region=region,
    )


def _raise_header_mismatch(
    data: bytes,
    header_end: int,
    stored: int,
    actual: int,
    region: tuple[int, int],
    path: str,
) -> NoReturn:
    # An intact file under another region's name fails here too; say so when the header
    # verifies under the region it names, so the operator sees a misplaced file, not rot.
    mv = memoryview(data)
    enc_id = data[10]
    if enc_id < len(_DECODERS):
        try:
            claimed: RegionHeader | None = _DECODERS[enc_id].decode(mv[PREAMBLE_LEN:header_end])
        except _DECODE_ERRORS:
            claimed = None
        if (
            claimed is not None
            and (claimed.rx, claimed.ry) != region
            and _I32_MIN <= claimed.rx <= _I32_MAX
            and _I32_MIN <= claimed.ry <= _I32_MAX
        ):
            seed = xxh3(mv[:_PREAMBLE_HASHED], region_seed(claimed.rx, claimed.ry))
            if xxh3(mv[PREAMBLE_LEN:header_end], seed) == stored:
                raise ChecksumMismatch(
                    f"region {region}: file belongs to region ({claimed.rx}, {claimed.ry})"
                    " (misplaced or renamed file)",
                    path=path,
                    expected=f"region {region}",
                    actual=f"region ({claimed.rx}, {claimed.ry})",
                    region=region,
                )
    raise ChecksumMismatch(
        f"region {region}: header checksum mismatch",
        path=path,
        expected=hex64(stored),
        actual=hex64(actual),
        region=region,
    )


# --- salvage ---------------------------------------------------------------------------------


def scan_chunk_frames(raw: BytesLike) -> Iterator[SalvagedChunk]:
    """Every chunk frame in ``raw`` whose own checksum verifies, in file order.

    Trusts nothing: no preamble, header or trailer is needed, and garbage never raises.
    Each frame names its region and is checked under that region's seed, so a frame is
    returned with the region it was written for, and the caller decides what to do with
    frames of other regions. A false positive needs a chance 64-bit checksum match.
    """
    data = bytes(raw)
    mv = memoryview(data)
    n = len(data)
    pos = data.find(FRAME_MAGIC)
    while pos >= 0:
        if n - pos >= FRAME_HEADER_LEN:
            _, stored, cx, cy, frx, fry, plen = _FRAME.unpack_from(data, pos)
            start = pos + FRAME_HEADER_LEN
            end = start + plen
            if plen <= MAX_CHUNK_PAYLOAD and end <= n:
                if xxh3(mv[pos + _FRAME_SUMMED_FROM : end], region_seed(frx, fry)) == stored:
                    yield SalvagedChunk(
                        offset=pos, rx=frx, ry=fry, cx=cx, cy=cy, payload=data[start:end]
                    )
                    # A verified frame's payload is data, not more frames.
                    pos = data.find(FRAME_MAGIC, end)
                    continue
        pos = data.find(FRAME_MAGIC, pos + 1)
