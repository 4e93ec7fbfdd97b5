"""This machine's limits, measured in the same run as the benchmarks they judge.

Each probe does the irreducible work with no streamer code in the way: a raw atomic
replace (write temp, fsync, rename, fsync dir), a cached pread, a bare msgspec decode.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import msgspec
import numpy as np

from streamer.schema.records import Character, ChunkRecord, Feature

KIB16 = 16 * 1024


def raw_atomic_replace(tmp: Path, target: Path, payload: bytes, dir_fd: int) -> None:
    """Write ``tmp``, fsync it, rename it over ``target`` and fsync the directory open as
    ``dir_fd``: the irreducible work of one atomic replace."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, payload)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)
    os.fsync(dir_fd)


def atomic_replace_per_s(directory: Path, n: int, size: int = KIB16) -> float:
    """Serial raw atomic replaces of a ``size``-byte file per second."""
    payload = os.urandom(size)
    target = directory / "limit.bin"
    dfd = os.open(directory, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        for i in range(n):
            raw_atomic_replace(directory / f".limit.{i}.tmp", target, payload, dfd)
        elapsed = time.perf_counter() - t0
    finally:
        os.close(dfd)
    return n / elapsed


def cached_pread_us(directory: Path, n: int, size: int = KIB16) -> float:
    path = directory / "pread.bin"
    path.write_bytes(os.urandom(size * 64))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, size, 0)
        t0 = time.perf_counter()
        for i in range(n):
            os.pread(fd, size, (i % 64) * size)
        elapsed = time.perf_counter() - t0
    finally:
        os.close(fd)
    return elapsed / n * 1e6


def sample_chunk_record(cx: int = 3, cy: int = -2, overrides: int = 200) -> ChunkRecord:
    """A representative edited chunk: packed tile overrides plus a few records."""
    rng = np.random.default_rng(cx * 1_000_003 + cy)
    idx = np.unique(rng.integers(0, 4096, size=overrides)).astype("<u2")
    val = rng.integers(0, 40, size=idx.size).astype("<u2")
    x0, y0 = cx * 64, cy * 64
    return ChunkRecord(
        cx=cx,
        cy=cy,
        generator="streamer-terrain",
        generator_version=1,
        base_fingerprint=int(rng.integers(0, 2**62)),
        tile_idx=idx.tobytes(),
        tile_val=val.tobytes(),
        characters=[
            Character(id=f"npc-{cx}-{cy}-{i}", x=x0 + i, y=y0 + i, given_name="Ada")
            for i in range(3)
        ],
        features=[
            Feature(id=f"f-{cx}-{cy}-{i}", kind="tree", x=x0 + 2 * i, y=y0) for i in range(5)
        ],
        record_versions={"character": 3, "feature": 1},
    )


def msgpack_decode_chunk_us(n: int) -> float:
    data = msgspec.msgpack.encode(sample_chunk_record())
    dec = msgspec.msgpack.Decoder(ChunkRecord)
    dec.decode(data)
    t0 = time.perf_counter()
    for _ in range(n):
        dec.decode(data)
    return (time.perf_counter() - t0) / n * 1e6
