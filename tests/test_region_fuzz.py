"""Corruption fuzz: every change to a region file's bytes is detected, by our errors only.

Default mode runs 12,000 byte-level mutations (120,000 with ``--torture``) over a few base
files, plus structure-aware mutations whose checksums are re-sealed (so the decoder's own
validation, not the checksum, has to catch them), plus random garbage. The RNG is seeded:
a failure prints the seed, kind and iteration needed to replay it.
"""

from __future__ import annotations

import random
import re
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest

from streamer.errors import IntegrityError, UnsupportedFormat
from streamer.format.checksum import xxh3
from streamer.format.region import (
    PREAMBLE_LEN,
    RegionIndex,
    decode_index,
    decode_region,
    encode_region,
    file_seed,
    read_chunk,
    region_seed,
    scan_chunk_frames,
)

SEED = 20_240_611
OURS = (IntegrityError, UnsupportedFormat)


@dataclass(frozen=True)
class Base:
    name: str
    rx: int
    ry: int
    generation: int
    data: bytes
    chunks: dict[tuple[int, int], bytes]

    @property
    def header_len(self) -> int:
        return int(struct.unpack_from("<I", self.data, 12)[0])


def _base(name: str, rx: int, ry: int, encoding: str, sizes: list[int], seed: int) -> Base:
    rng = random.Random(seed)
    coords = [(rx * 8 + i % 8, ry * 8 + i // 8) for i in range(len(sizes))]
    chunks = {c: rng.randbytes(n) for c, n in zip(coords, sizes, strict=True)}
    generation = rng.randrange(1, 2**40)
    data = encode_region(
        rx=rx,
        ry=ry,
        last_processed_tick=rng.randrange(10**9),
        generation=generation,
        writer=f"fuzz-{name}",
        encoding=encoding,  # type: ignore[arg-type]
        chunks=chunks,
        region_size=8,
        written_at=1_700_000_000.5,
    )
    return Base(name, rx, ry, generation, data, chunks)


@pytest.fixture(scope="module")
def bases() -> list[Base]:
    rng = random.Random(SEED)
    return [
        _base("msgpack-64", 0, 0, "msgpack", [rng.randrange(0, 300) for _ in range(64)], 1),
        _base("json-20", 3, -2, "json", [rng.randrange(0, 600) for _ in range(20)], 2),
        _base("msgpack-empty", -5, 7, "msgpack", [], 3),
        _base("msgpack-big", -1, -1, "msgpack", [3000, 0, 1, 5000, 200], 4),
    ]


# --- byte-level mutations --------------------------------------------------------------------

Mutation = Callable[[random.Random, Base], tuple[bytes, int, int]]  # (bytes, rx, ry)


def flip_bits(rng: random.Random, b: Base) -> tuple[bytes, int, int]:
    d = bytearray(b.data)
    for _ in range(rng.choice((1, 1, 2, 3, rng.randint(4, 64)))):
        bit = rng.randrange(len(d) * 8)
        d[bit >> 3] ^= 1 << (bit & 7)
    return bytes(d), b.rx, b.ry


def truncate(rng: random.Random, b: Base) -> tuple[bytes, int, int]:
    return b.data[: rng.randrange(len(b.data))], b.rx, b.ry


def zero_run(rng: random.Random, b: Base) -> tuple[bytes, int, int]:
    d = bytearray(b.data)
    at = rng.randrange(len(d))
    n = len(d[at : at + 512])
    d[at : at + n] = bytes(n)
    return bytes(d), b.rx, b.ry


def swap_blocks(rng: random.Random, b: Base) -> tuple[bytes, int, int]:
    d = bytearray(b.data)
    size = rng.randint(1, max(1, len(d) // 3))
    i = rng.randrange(len(d) - size + 1)
    j = rng.randrange(len(d) - size + 1)
    if abs(i - j) < size:  # overlapping: move instead of swap
        j = (i + size) % (len(d) - size + 1)
    if abs(i - j) >= size:
        d[i : i + size], d[j : j + size] = d[j : j + size], d[i : i + size]
    return bytes(d), b.rx, b.ry


def trailing_garbage(rng: random.Random, b: Base) -> tuple[bytes, int, int]:
    extra = rng.choice((b"\0", rng.randbytes(rng.randint(1, 64)), b.data[-24:], b.data))
    return b.data + extra, b.rx, b.ry


def header_len_field(rng: random.Random, b: Base) -> tuple[bytes, int, int]:
    d = bytearray(b.data)
    new = rng.choice(
        (
            b.header_len + rng.choice((-1, 1)),
            rng.randrange(0, b.header_len + 64),
            rng.randrange(2**32),
            0,
            2**32 - 1,
        )
    )
    struct.pack_into("<I", d, 12, new)
    return bytes(d), b.rx, b.ry


def other_region(rng: random.Random, b: Base) -> tuple[bytes, int, int]:
    dx, dy = rng.choice(((1, 0), (0, 1), (-1, 0), (0, -1), (rng.randint(-99, 99), 1)))
    return b.data, b.rx + dx, b.ry + dy


def wrong_block(rng: random.Random, b: Base) -> tuple[bytes, int, int]:
    # Copy a block from elsewhere in the same file over a same-sized block: frames land on
    # frame boundaries and headers stay plausible more often than with random bytes.
    d = bytearray(b.data)
    size = rng.choice((4, 8, 12, 32, rng.randint(1, 256)))
    if size >= len(d):
        size = 1
    i, j = rng.randrange(len(d) - size + 1), rng.randrange(len(d) - size + 1)
    d[i : i + size] = b.data[j : j + size]
    return bytes(d), b.rx, b.ry


MUTATIONS: dict[str, Mutation] = {
    "flip_bits": flip_bits,
    "truncate": truncate,
    "zero_run": zero_run,
    "swap_blocks": swap_blocks,
    "trailing_garbage": trailing_garbage,
    "header_len_field": header_len_field,
    "other_region": other_region,
    "wrong_block": wrong_block,
}


@dataclass
class Tally:
    mutated: Counter[str] = field(default_factory=Counter)
    detected: Counter[str] = field(default_factory=Counter)
    by_error: Counter[str] = field(default_factory=Counter)
    unchanged: int = 0
    accepted: list[str] = field(default_factory=list)
    escaped: list[str] = field(default_factory=list)


def test_every_mutation_is_detected(bases: list[Base], torture: bool) -> None:
    total = 120_000 if torture else 12_000
    rng = random.Random(SEED)
    kinds = list(MUTATIONS)
    t = Tally()
    for i in range(total):
        base = bases[i % len(bases)]
        kind = kinds[(i // len(bases)) % len(kinds)]
        data, rx, ry = MUTATIONS[kind](rng, base)
        if data == base.data and (rx, ry) == (base.rx, base.ry):
            t.unchanged += 1  # e.g. a swap of two equal blocks: nothing to detect
            continue
        t.mutated[kind] += 1
        where = f"seed={SEED} i={i} kind={kind} base={base.name}"
        try:
            decode_region(data, rx=rx, ry=ry, path="fuzz")
        except OURS as exc:
            t.detected[kind] += 1
            t.by_error[type(exc).__name__] += 1
            assert exc.args and "fuzz" in str(exc), where
        except Exception as exc:
            t.escaped.append(f"{where}: {type(exc).__name__}: {exc}")
        else:
            t.accepted.append(where)
    summary = (
        f"mutated={sum(t.mutated.values())} detected={sum(t.detected.values())}"
        f" unchanged={t.unchanged} by_kind={dict(t.mutated)} by_error={dict(t.by_error)}"
    )
    print(summary)
    assert t.escaped == [], summary
    assert t.accepted == [], summary
    assert t.detected == t.mutated, summary
    assert sum(t.mutated.values()) >= total * 0.98, summary
    assert set(t.mutated) == set(MUTATIONS), summary


def test_salvage_and_range_reads_never_return_wrong_data(bases: list[Base], torture: bool) -> None:
    """On damaged bytes, salvage returns only original chunks; range reads verify or raise."""
    total = 20_000 if torture else 2_000
    rng = random.Random(SEED + 1)
    kinds = ["flip_bits", "zero_run", "swap_blocks", "wrong_block", "truncate"]
    escaped: list[str] = []
    salvaged = 0
    for i in range(total):
        base = bases[i % len(bases)]
        kind = kinds[i % len(kinds)]
        data, _, _ = MUTATIONS[kind](rng, base)
        where = f"seed={SEED + 1} i={i} kind={kind} base={base.name}"
        originals = {(base.rx, base.ry, *k): v for k, v in base.chunks.items()}
        for s in scan_chunk_frames(data):
            assert originals.get((s.rx, s.ry, s.cx, s.cy)) == s.payload, where
            salvaged += 1
        try:
            index = decode_index(data, rx=base.rx, ry=base.ry, path="fuzz")
            if isinstance(index, RegionIndex):
                for key, e in index.entries.items():
                    frame = data[e.offset : e.offset + e.length]
                    try:
                        payload = read_chunk(frame, e, rx=base.rx, ry=base.ry, path="fuzz")
                    except OURS:
                        continue
                    assert payload == base.chunks[key], where
        except OURS:
            pass
        except Exception as exc:
            escaped.append(f"{where}: {type(exc).__name__}: {exc}")
    assert escaped == []
    assert salvaged > 0


# --- structure-aware mutations, checksums re-sealed ------------------------------------------


def _seal(
    encoding_id: int, header: bytes, body: bytes, rx: int, ry: int, generation: int, version: int
) -> bytes:
    """A file with correct checksums around arbitrary header bytes and frame bytes."""
    pre = bytearray(struct.pack("<8sHBBIQ", b"STRMRGN1", version, encoding_id, 0, len(header), 0))
    struct.pack_into("<Q", pre, 16, xxh3(header, xxh3(bytes(pre[:16]), region_seed(rx, ry))))
    head = bytes(pre) + header + body + b"STRMEND1"
    total = len(head) + 16
    head += struct.pack("<Q", total)
    return head + struct.pack("<Q", xxh3(head, file_seed(rx, ry, generation)))


def _mutate_header(rng: random.Random, h: dict[str, Any]) -> None:
    weird: list[Any] = [
        -1,
        0,
        1,
        2**31,
        -(2**31) - 1,
        2**63,
        2**64 - 1,
        -(2**63),
        None,
        "x",
        1.5,
        [],
        {},
        [1, 2],
        True,
    ]
    key = rng.choice([*h.keys(), "chunks", "chunks", "chunks", "extra"])
    if key == "extra":
        h[rng.choice(["extra", "zz", "type2"])] = rng.choice(weird)
    elif key == "chunks" and isinstance(h.get("chunks"), list) and h["chunks"]:
        chunks: list[Any] = h["chunks"]
        i = rng.randrange(len(chunks))
        op = rng.randrange(7)
        if not isinstance(chunks[i], list) or len(chunks[i]) != 5:
            chunks[i] = rng.choice(weird)
        elif op == 0:  # one field of one entry, often just off by a little
            entry = list(chunks[i])
            f = rng.randrange(5)
            near = entry[f] + rng.choice((-32, -1, 1, 32)) if isinstance(entry[f], int) else 0
            entry[f] = rng.choice([*weird, near, near, near])
            chunks[i] = entry
        elif op == 1:
            chunks.append(list(chunks[i]))
        elif op == 2:
            del chunks[i]
        elif op == 3:
            j = rng.randrange(len(chunks))
            chunks[i], chunks[j] = chunks[j], chunks[i]
        elif op == 4:
            chunks[i] = list(chunks[i])[: rng.randrange(5)]
        elif op == 5:
            chunks[i] = [*chunks[i], 0]
        else:
            chunks[i] = rng.choice(weird)
    elif key == "chunks":
        h["chunks"] = rng.choice([[[0, 0, 100, 40, 1]], None, {}, "x"])
    elif rng.random() < 0.2:
        del h[key]
    else:
        h[key] = rng.choice(weird)


def test_resealed_structural_damage_only_raises_our_errors(
    bases: list[Base], torture: bool
) -> None:
    """Checksums cannot help here: validation must turn every bad structure into our error."""
    total = 30_000 if torture else 3_000
    rng = random.Random(SEED + 2)
    outcomes: Counter[str] = Counter()
    escaped: list[str] = []
    for i in range(total):
        base = bases[i % len(bases)]
        enc_id = base.data[10]
        hl = base.header_len
        raw = base.data[PREAMBLE_LEN : PREAMBLE_LEN + hl]
        body = base.data[PREAMBLE_LEN + hl : -24]
        mod: Any = msgspec.json if enc_id else msgspec.msgpack
        h = mod.decode(raw)
        for _ in range(rng.randint(1, 3)):
            _mutate_header(rng, h)
        header = mod.encode(h)
        if enc_id and rng.random() < 0.1:
            # Integers no 64-bit type holds: only JSON text can carry them.
            digits = [m.start() for m in re.finditer(rb"[0-9]+", header)]
            at = rng.choice(digits)
            header = header[:at] + rng.choice((b"1" + b"0" * 30, b"-" + b"9" * 25)) + header[at:]
        if rng.random() < 0.2:  # byte damage inside the sealed header: undecodable bytes
            hb = bytearray(header)
            for _ in range(rng.randint(1, 4)):
                hb[rng.randrange(len(hb))] = rng.randrange(256)
            header = bytes(hb)
        gen = h.get("generation") if isinstance(h, dict) else None
        gen = gen if isinstance(gen, int) and 0 <= gen < 2**64 else base.generation
        # Keep offsets valid for the new header length most of the time, so entry checks
        # are reached instead of stopping at the first misplaced offset.
        data = _seal(enc_id, header, body, base.rx, base.ry, gen, 1)
        where = f"seed={SEED + 2} i={i} base={base.name}"
        try:
            rf = decode_region(data, rx=base.rx, ry=base.ry, path="fuzz")
            # The frames are untouched, so an accepted index must describe them exactly.
            assert rf.chunks == base.chunks, where
            outcomes["accepted"] += 1
        except OURS as exc:
            outcomes[type(exc).__name__] += 1
        except Exception as exc:
            escaped.append(f"{where}: {type(exc).__name__}: {exc}")
        try:
            decode_index(data, rx=base.rx, ry=base.ry, path="fuzz")
        except OURS:
            pass
        except Exception as exc:
            escaped.append(f"{where} (index): {type(exc).__name__}: {exc}")
    print(dict(outcomes))
    assert escaped == [], escaped[:5]
    assert outcomes["MalformedFile"] > total // 4


def test_resealed_frames_of_the_wrong_shape_are_rejected(bases: list[Base]) -> None:
    """Header re-encoded with offsets shifted to its new length, frames left alone."""
    base = bases[0]
    rng = random.Random(SEED + 3)
    hl = base.header_len
    raw = base.data[PREAMBLE_LEN : PREAMBLE_LEN + hl]
    body = base.data[PREAMBLE_LEN + hl : -24]
    for _ in range(300):
        h = msgspec.msgpack.decode(raw)
        chunks = h["chunks"]
        i = rng.randrange(len(chunks))
        field_ = rng.choice((0, 1, 4))  # cx, cy or checksum disagree with the frame
        chunks[i][field_] += rng.choice((-1, 1))
        header = msgspec.msgpack.encode(h)
        shift = len(header) - hl
        for c in chunks:
            c[2] += shift
        header = msgspec.msgpack.encode(h)
        if len(header) - hl != shift:
            continue
        data = _seal(0, header, body, base.rx, base.ry, base.generation, 1)
        with pytest.raises(IntegrityError):
            decode_region(data, rx=base.rx, ry=base.ry, path="fuzz")


def test_random_garbage_only_raises_our_errors(torture: bool) -> None:
    rng = random.Random(SEED + 4)
    prefixes = [b"", b"STRMRGN1", b"STRMRGN1\x01\x00\x00\x00", b"STRMRGN1\x01\x00\x01\x00"]
    escaped: list[str] = []
    for i in range(20_000 if torture else 2_000):
        data = rng.choice(prefixes) + rng.randbytes(rng.choice((0, 1, 8, 30, 100, 2000)))
        try:
            decode_region(data, rx=0, ry=0, path="fuzz")
        except OURS:
            pass
        except Exception as exc:
            escaped.append(f"i={i}: {type(exc).__name__}: {exc}")
        list(scan_chunk_frames(data))
    assert escaped == []
