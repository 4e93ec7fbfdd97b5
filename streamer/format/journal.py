"""Journal framing: how records sit in a write-ahead-log segment (framing only).

A segment is a run of frames::

    b"JRNL" | xxh3 u64 | payload_len u32 | payload

The checksum covers every frame byte after itself (length and payload), so a damaged length
is caught like damaged data. Appends can be torn by a crash: ``scan_frames`` returns the
intact prefix and says whether anything followed it. What the payloads mean, and what a
torn tail means for recovery, belongs to the runtime; see ``docs/format.md``.

A segment may be preallocated: zero-filled to its full size first, then written in place.
Zero bytes never start a frame (a frame starts with the magic), so an all-zero remainder
after the intact frames is *padding*, the part not yet written, and not a torn tail.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from streamer.errors import FrameTooLarge
from streamer.format.checksum import BytesLike, xxh3, xxh3_hasher

__all__ = [
    "FRAME_HEADER_LEN",
    "JOURNAL_MAGIC",
    "MAX_COMMIT_BYTES",
    "MAX_FRAME_PAYLOAD",
    "MIN_ZERO_TAIL",
    "SEGMENT_COPY_SUFFIX",
    "SPARE_FILE_NAME",
    "FrameScan",
    "SegmentVerdict",
    "encode_frame",
    "judge_segment",
    "parse_segment_name",
    "scan_frames",
    "segment_file_name",
    "segment_keys",
]

_SEGMENT_SUFFIX: Final = ".wal"
_JOURNAL_PREFIX: Final = "journal/"
#: The zero-filled file a preallocating journal makes its next segment from (not a segment).
SPARE_FILE_NAME: Final = "spare.zero"
#: Appended to the newest segment's name for its copy while open makes it durable; one left
#: by a crash is removed by the next open.
SEGMENT_COPY_SUFFIX: Final = ".copy"


def segment_file_name(seq: int) -> str:
    """A segment's file name in ``journal/``: its sequence number, 20 digits, ``.wal``."""
    return f"{seq:020d}{_SEGMENT_SUFFIX}"


def parse_segment_name(name: str) -> int | None:
    """The sequence number of segment file ``name`` (no directory), or None for any other
    file. Everything that reads the journal goes by this (the runtime's open, ``streamer
    check``, snapshots, rebuild): what it refuses is not a segment."""
    stem = name[: -len(_SEGMENT_SUFFIX)] if name.endswith(_SEGMENT_SUFFIX) else None
    if stem is None or len(stem) != 20 or not stem.isdigit() or not stem.isascii():
        return None
    return int(stem)


def segment_keys(keys: Iterable[str]) -> list[str]:
    """The journal segments among store ``keys``, oldest first: ``journal/`` + a name
    :func:`parse_segment_name` takes (the 20-digit names sort as their numbers do)."""
    n = len(_JOURNAL_PREFIX)
    return sorted(
        k for k in keys if k.startswith(_JOURNAL_PREFIX) and parse_segment_name(k[n:]) is not None
    )


JOURNAL_MAGIC: Final = b"JRNL"
# magic | xxh3 | payload_len
_HEADER: Final = struct.Struct("<4sQI")
_LEN: Final = struct.Struct("<I")
_SUM: Final = struct.Struct("<Q")
FRAME_HEADER_LEN: Final = _HEADER.size  # 16
_SUMMED_FROM: Final = 12
# A length field is trusted only after the checksum, so cap it first: damage (or a hostile
# file) must not make the scanner slice or hash gigabytes it does not have.
MAX_FRAME_PAYLOAD: Final = 64 * 1024 * 1024
#: The most bytes one commit writes into a preallocated segment (a larger single frame is a
#: commit of its own), and so how far after a tear the pages of that commit can reach when
#: a power loss persisted them out of order. Part of the format: a scan of existing
#: segments relies on it, so it may never grow.
MAX_COMMIT_BYTES: Final = 1024 * 1024
#: Zeros after a tear this long or longer are preallocated space, not the torn frame's own
#: (a preallocated segment keeps at least this much after its last commit).
MIN_ZERO_TAIL: Final = 4096


@dataclass(frozen=True, slots=True)
class FrameScan:
    # Payloads of the intact frames before the first bad or short one, in order.
    payloads: list[bytes]
    # Bytes covered by those frames; everything from here on is discarded.
    valid_length: int
    # True when anything but zero padding follows valid_length.
    torn: bool
    # Frames after the tear whose own checksum verifies. A crash mid-append leaves 0;
    # more means damage in the middle of the segment, so acknowledged records were lost.
    frames_after_tear: int = 0
    # Zero bytes after valid_length when nothing else follows it (preallocated, unwritten
    # space); not counted as torn.
    padding: int = 0
    # When torn: the offset just past the last non-zero byte. With zeros after it, the data
    # from valid_length to here is what a crash left of the last writes to a preallocated
    # segment, whose pages may have been persisted in any order.
    data_end: int = 0


@dataclass(frozen=True, slots=True)
class SegmentVerdict:
    """What a segment's scan means for recovery (the journal's open and ``streamer check``
    judge alike)."""

    # Acknowledged frames are gone: damage in an older segment, zeros after an older
    # segment's frames, or intact frames after a tear that no single commit could have
    # written. Nothing may be cut.
    damaged: bool
    # Bytes of torn tail to cut (0 when intact; zero padding is not counted).
    torn_bytes: int
    # Intact frames after the tear that are the newest segment's last commit, its pages
    # persisted out of order (never acknowledged): cut with the tail.
    last_commit_frames: int = 0


def judge_segment(
    scan: FrameScan, size: int, *, newest: bool, preallocated: bool = False
) -> SegmentVerdict:
    """The verdict on a segment of ``size`` bytes scanned as ``scan``; ``newest``: the
    segment with the highest sequence number, the only one written when a crash comes;
    ``preallocated``: the journal writes segments in place (``journal_preallocate``).

    Older segments are cut to their used size when closed, and a spare renamed into place
    whose segment could not start is renamed back: zeros at the end of an older segment, or
    an older segment of zeros alone, are acknowledged frames gone.
    With preallocation, in the newest, a tear whose non-zero rest ends within
    MAX_COMMIT_BYTES of it, with a page or more of zeros after, is the last commit written in
    place; anything else after a tear that verifies is acknowledged data behind damage
    (appended, a crash leaves a prefix: the scan cannot tell the shape from damage there).
    """
    if not scan.torn:
        return SegmentVerdict(damaged=not newest and bool(scan.padding), torn_bytes=0)
    end = scan.data_end if size - scan.data_end >= MIN_ZERO_TAIL else size
    torn = end - scan.valid_length
    if not newest:
        return SegmentVerdict(damaged=True, torn_bytes=torn)
    if not scan.frames_after_tear:
        return SegmentVerdict(damaged=False, torn_bytes=torn)
    # A page of zeros at least: an appended segment's last frame may end in a zero byte.
    last_commit = (
        preallocated
        and size - scan.data_end >= MIN_ZERO_TAIL
        and scan.data_end - scan.valid_length <= MAX_COMMIT_BYTES
    )
    if last_commit:
        return SegmentVerdict(
            damaged=False, torn_bytes=torn, last_commit_frames=scan.frames_after_tear
        )
    return SegmentVerdict(damaged=True, torn_bytes=torn)


def encode_frame(payload: BytesLike) -> bytes:
    """One journal frame around ``payload``.

    :raises FrameTooLarge: ``payload`` is over ``MAX_FRAME_PAYLOAD``; split the batch.
    """
    n = len(payload)
    if n > MAX_FRAME_PAYLOAD:
        raise FrameTooLarge(
            f"journal frame payload of {n} bytes is over the {MAX_FRAME_PAYLOAD}-byte cap"
        )
    length = _LEN.pack(n)
    # Streamed so a large batch is copied once, by the join, not twice.
    h = xxh3_hasher()
    h.update(length)
    h.update(payload)
    return b"".join((JOURNAL_MAGIC, _SUM.pack(h.intdigest()), length, payload))


def scan_frames(data: BytesLike) -> FrameScan:
    """The intact frames at the start of ``data``; stops at the first bad or short frame.

    Never raises on any input: a journal tail is expected to be torn after a crash.
    """
    return _scan(bytes(data))  # bytes(): no copy when already bytes


def _scan(data: bytes) -> FrameScan:
    mv = memoryview(data)
    n = len(data)
    payloads: list[bytes] = []
    off = 0
    while n - off >= FRAME_HEADER_LEN:
        end = _frame_end(data, mv, off, n)
        if end < 0:
            break
        payloads.append(data[off + FRAME_HEADER_LEN : end])
        off = end
    if off == n:
        return FrameScan(payloads=payloads, valid_length=off, torn=False)
    if data.count(0, off) == n - off:
        return FrameScan(payloads=payloads, valid_length=off, torn=False, padding=n - off)
    return FrameScan(
        payloads=payloads,
        valid_length=off,
        torn=True,
        frames_after_tear=_count_after(data, off),
        data_end=_data_end(data, off),
    )


def _frame_end(data: bytes, mv: memoryview, off: int, n: int) -> int:
    """End offset of a verified frame starting at ``off``, or -1."""
    magic, stored, plen = _HEADER.unpack_from(data, off)
    end: int = off + FRAME_HEADER_LEN + plen
    if magic != JOURNAL_MAGIC or plen > MAX_FRAME_PAYLOAD or end > n:
        return -1
    if xxh3(mv[off + _SUMMED_FROM : end]) != stored:
        return -1
    return end


def _count_after(data: bytes, off: int) -> int:
    """Verified frames anywhere after a tear at ``off`` (resynchronising on the magic)."""
    mv = memoryview(data)
    n = len(data)
    count = 0
    pos = data.find(JOURNAL_MAGIC, off + 1)
    while 0 <= pos and n - pos >= FRAME_HEADER_LEN:
        end = _frame_end(data, mv, pos, n)
        if end < 0:
            pos = data.find(JOURNAL_MAGIC, pos + 1)
        else:
            count += 1
            pos = data.find(JOURNAL_MAGIC, end)
    return count


def _data_end(data: bytes, off: int, step: int = 1 << 16) -> int:
    """Just past the last non-zero byte at or after ``off`` (``off`` if there is none),
    looking back from the end a window at a time: a preallocated segment's zeros are long."""
    end = len(data)
    while end > off:
        start = max(off, end - step)
        if data.count(0, start, end) != end - start:
            return start + len(data[start:end].rstrip(b"\0"))
        end = start
    return off
