"""Journal framing: round trips, torn tails at every byte, garbage, bogus lengths."""

from __future__ import annotations

import random
import struct
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamer.errors import FrameTooLarge
from streamer.format import journal
from streamer.format.checksum import xxh3
from streamer.format.journal import (
    FRAME_HEADER_LEN,
    MAX_COMMIT_BYTES,
    MAX_FRAME_PAYLOAD,
    FrameScan,
    SegmentVerdict,
    encode_frame,
    judge_segment,
    scan_frames,
)

PAYLOADS = [b"first", b"", b"\x00" * 100, bytes(range(256)), b"JRNL" * 10, b"last"]


def stream(payloads: list[bytes]) -> tuple[bytes, list[int]]:
    """The frames back to back, and the offset where each frame ends."""
    frames = [encode_frame(p) for p in payloads]
    ends, at = [], 0
    for f in frames:
        at += len(f)
        ends.append(at)
    return b"".join(frames), ends


def test_frame_layout() -> None:
    f = encode_frame(b"hello")
    assert len(f) == FRAME_HEADER_LEN + 5 == 21
    magic, h, n = struct.unpack_from("<4sQI", f)
    assert (magic, n) == (b"JRNL", 5)
    assert h == xxh3(f[12:])  # covers the length field and the payload
    assert f[16:] == b"hello"


def test_round_trip() -> None:
    data, ends = stream(PAYLOADS)
    assert scan_frames(data) == FrameScan(payloads=PAYLOADS, valid_length=ends[-1], torn=False)
    assert scan_frames(b"") == FrameScan(payloads=[], valid_length=0, torn=False)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=20))
def test_round_trip_property(payloads: list[bytes]) -> None:
    data, _ = stream(payloads)
    scan = scan_frames(data)
    assert (scan.payloads, scan.valid_length, scan.torn) == (payloads, len(data), False)


def test_cut_at_every_byte_offset() -> None:
    data, ends = stream(PAYLOADS)
    for cut in range(len(data) + 1):
        scan = scan_frames(data[:cut])
        complete = [e for e in ends if e <= cut]
        assert scan.payloads == PAYLOADS[: len(complete)], cut
        assert scan.valid_length == (complete[-1] if complete else 0), cut
        assert scan.torn is (cut not in ends and cut != 0), cut
        assert scan.frames_after_tear == 0, cut


def test_garbage_after_frames_is_a_torn_tail() -> None:
    data, ends = stream(PAYLOADS[:3])
    rng = random.Random(7)
    for garbage in [b"\x01", b"JRNL", b"JRNL" + b"\xff" * 12, rng.randbytes(1000), b"x" * 15]:
        # Followed by zeros or not: zeros after the garbage do not make it padding.
        for zeros in (b"", bytes(64)):
            scan = scan_frames(data + garbage + zeros)
            assert scan.payloads == PAYLOADS[:3]
            assert scan.valid_length == ends[-1]
            assert scan.torn
            assert scan.padding == 0
            assert scan.frames_after_tear == 0


def test_zeros_after_the_frames_are_padding_not_a_torn_tail() -> None:
    data, ends = stream(PAYLOADS[:3])
    for n in (1, 15, 16, 4096):
        scan = scan_frames(data + bytes(n))
        assert scan.payloads == PAYLOADS[:3]
        assert (scan.valid_length, scan.padding, scan.torn) == (ends[-1], n, False)
    # A segment preallocated and never written to is all padding.
    assert scan_frames(bytes(100)) == FrameScan(
        payloads=[], valid_length=0, torn=False, padding=100
    )
    # A frame torn inside preallocated space: its start, then zeros.
    cut = ends[-1] + 20
    full, _ = stream(PAYLOADS[:4])
    scan = scan_frames(full[:cut] + bytes(len(full) - cut + 100))
    assert scan.payloads == PAYLOADS[:3]
    assert scan.torn and scan.padding == 0


def test_damage_in_the_middle_is_told_apart_from_a_torn_tail() -> None:
    data, ends = stream(PAYLOADS)
    damaged = bytearray(data)
    damaged[ends[1] + 20] ^= 0x01  # inside the third frame
    scan = scan_frames(bytes(damaged))
    assert scan.payloads == PAYLOADS[:2]
    assert scan.valid_length == ends[1]
    assert scan.torn
    # The three frames after the damaged one still verify: acknowledged records were lost.
    assert scan.frames_after_tear == 3


def test_every_single_bit_flip_stops_the_scan_without_wrong_data() -> None:
    data, ends = stream(PAYLOADS)
    for bit in range(len(data) * 8):
        damaged = bytearray(data)
        damaged[bit >> 3] ^= 1 << (bit & 7)
        scan = scan_frames(bytes(damaged))
        hit = next(i for i, e in enumerate(ends) if (bit >> 3) < e)
        assert scan.payloads == PAYLOADS[:hit], bit
        assert scan.valid_length == (ends[hit - 1] if hit else 0), bit
        assert scan.torn, bit


def test_random_damage_never_yields_wrong_payloads(torture: bool) -> None:
    rng = random.Random(11)
    payloads = [rng.randbytes(rng.randrange(0, 200)) for _ in range(30)]
    data, _ = stream(payloads)
    for _ in range(20_000 if torture else 2_000):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(damaged))
            damaged[at : at + rng.randint(1, 40)] = rng.randbytes(rng.randint(0, 40))
        scan = scan_frames(bytes(damaged))
        assert scan.payloads == payloads[: len(scan.payloads)]


def test_huge_bogus_length_does_not_allocate() -> None:
    good = encode_frame(b"ok")
    bogus = [
        b"JRNL" + struct.pack("<QI", 0, 0xFFFFFFFF) + b"x" * 100,
        b"JRNL" + struct.pack("<QI", 0, MAX_FRAME_PAYLOAD + 1),
        b"JRNL" + struct.pack("<QI", 0, MAX_FRAME_PAYLOAD),
    ]
    for tail in bogus:
        tracemalloc.start()
        try:
            scan = scan_frames(good + tail)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert scan.payloads == [b"ok"]
        assert scan.valid_length == len(good)
        assert scan.torn
        assert peak < 64 * 1024


def test_oversized_payload_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal, "MAX_FRAME_PAYLOAD", 8)
    assert scan_frames(encode_frame(b"12345678")).payloads == [b"12345678"]
    with pytest.raises(FrameTooLarge, match="9 bytes"):
        encode_frame(b"123456789")
    # A frame written before the cap was lowered is not trusted either.
    big = b"JRNL" + struct.pack("<QI", 0, 9) + b"123456789"
    big = big[:4] + struct.pack("<Q", xxh3(big[12:])) + big[12:]
    assert scan_frames(big).torn


def test_accepts_bytes_like() -> None:
    data, _ = stream([b"a", b"b"])
    assert scan_frames(bytearray(data)).payloads == [b"a", b"b"]
    assert scan_frames(memoryview(data)).payloads == [b"a", b"b"]
    assert scan_frames(data).payloads == [b"a", b"b"]
    assert encode_frame(bytearray(b"a")) == encode_frame(memoryview(b"a")) == encode_frame(b"a")
    assert all(type(p) is bytes for p in scan_frames(bytearray(data)).payloads)


def test_a_torn_scan_says_where_the_non_zero_data_ends() -> None:
    data, ends = stream(PAYLOADS[:4])
    hole = bytearray(data)
    hole[ends[1] : ends[1] + 8] = bytes(8)  # the third frame's magic and checksum are gone
    for zeros in (0, 10, 70_000):  # up to a long preallocated tail, read a window at a time
        scan = scan_frames(bytes(hole) + bytes(zeros))
        assert scan.torn and scan.valid_length == ends[1]
        assert scan.frames_after_tear == 1  # the fourth frame
        assert scan.data_end == ends[-1]


def test_the_verdict_on_each_shape_of_segment() -> None:
    data, ends = stream(PAYLOADS[:4])
    hole = bytearray(data)
    hole[ends[1] : ends[1] + 8] = bytes(8)  # a hole in the third frame, the fourth intact
    pad = bytes(8192)

    def judge(seg: bytes, newest: bool, preallocated: bool = True) -> SegmentVerdict:
        return judge_segment(scan_frames(seg), len(seg), newest=newest, preallocated=preallocated)

    ok = SegmentVerdict(damaged=False, torn_bytes=0)
    assert judge(data, newest=False) == ok
    assert judge(data + pad, newest=True) == ok  # the newest may end in padding
    assert judge(bytes(100), newest=False).damaged  # an older one: never, not even alone
    assert judge(data + pad, newest=False).damaged  # zeros where its last frames were
    torn = data + b"\x01\x02"
    assert judge(torn, newest=True) == SegmentVerdict(damaged=False, torn_bytes=2)
    assert judge(torn + pad, newest=True) == SegmentVerdict(damaged=False, torn_bytes=2)
    assert judge(torn, newest=False).damaged
    # Intact frames after a hole: the last commit only in the newest, zeros after, close by.
    assert judge(bytes(hole) + pad, newest=True) == SegmentVerdict(
        damaged=False, torn_bytes=ends[-1] - ends[1], last_commit_frames=1
    )
    # Appended (not preallocated), the shape is damage: a crash leaves a prefix there.
    assert judge(bytes(hole) + pad, newest=True, preallocated=False).damaged
    assert judge(bytes(hole), newest=True).damaged  # no zeros after: an append, damaged
    assert judge(bytes(hole) + bytes(10), newest=True).damaged  # nor a few (a frame's own)
    assert judge(bytes(hole) + pad, newest=False).damaged
    far = bytes(hole[: ends[1] + 8]) + bytes(MAX_COMMIT_BYTES) + bytes(hole[ends[1] + 8 :])
    assert judge(far + pad, newest=True).damaged  # more than one commit's reach


def test_segment_keys_are_what_open_replays_oldest_first() -> None:
    keys = [
        "journal/00000000000000000010.wal",
        "journal/00000000000000000002.wal",
        "journal/2.wal",
        "journal/zz-copy.wal",
        "journal/00000000000000000003.wal.copy",
        "journal/spare.zero",
        "journal/x/00000000000000000004.wal",
        "regions/00000000000000000005.wal",
    ]
    assert journal.segment_keys(keys) == [
        "journal/00000000000000000002.wal",
        "journal/00000000000000000010.wal",
    ]
