"""Foundation benchmarks: atomic region writes and chunk read + verify + decode.

Both are also run on a SQLite blob store doing the same work in the same process
(WAL, synchronous=FULL, one transaction per region write, one SELECT per chunk).
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import anyio

from streamer.bench.limits import (
    atomic_replace_per_s,
    cached_pread_us,
    msgpack_decode_chunk_us,
    sample_chunk_record,
)
from streamer.bench.report import Figure
from streamer.format.region import decode_index, encode_region, read_chunk, region_key
from streamer.schema.codec import ChunkCodec
from streamer.storage.local import LocalStore


def _region_bytes(rx: int, ry: int, chunks: int, codec: ChunkCodec) -> bytes:
    payloads = {}
    for i in range(chunks):
        cx, cy = rx * 8 + i % 8, ry * 8 + i // 8
        payloads[(cx, cy)] = codec.encode(sample_chunk_record(cx, cy))
    return encode_region(
        rx=rx,
        ry=ry,
        last_processed_tick=1,
        generation=1,
        writer="bench",
        encoding="msgpack",
        chunks=payloads,
    )


def _sqlite(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE IF NOT EXISTS blobs (key TEXT PRIMARY KEY, data BLOB NOT NULL)")
    return db


async def region_writes(work: Path, quick: bool) -> list[Figure]:
    n = 150 if quick else 1000
    codec = ChunkCodec("msgpack")
    # ~16 KiB region files, the size the machine limit is quoted for.
    data = _region_bytes(0, 0, 6, codec)
    limit = await anyio.to_thread.run_sync(atomic_replace_per_s, work, n, len(data))

    store = await LocalStore.open(work / "store")
    async with store:
        t0 = time.perf_counter()
        for i in range(n):
            await store.put_atomic(region_key(i % 32, 0), data)
        serial = n / (time.perf_counter() - t0)

        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for w in range(16):

                async def writer(w: int = w) -> None:
                    for i in range(w, n, 16):
                        await store.put_atomic(region_key(i % 32, 1), data)

                tg.start_soon(writer)
        concurrent = n / (time.perf_counter() - t0)

        # The shape of a world flush's writes (flush_concurrency 16: two lanes of 8).
        t0 = time.perf_counter()
        for start in range(0, n, 8):
            keys = [region_key(i % 32, 2) for i in range(start, min(n, start + 8))]
            for res in await store.put_many_atomic([(k, data) for k in keys]):
                if not isinstance(res, str):
                    raise res
        batched = n / (time.perf_counter() - t0)

    db = _sqlite(work / "baseline.sqlite")

    def sqlite_writes() -> float:
        t0 = time.perf_counter()
        for i in range(n):
            db.execute("INSERT OR REPLACE INTO blobs VALUES (?, ?)", (region_key(i % 32, 0), data))
        return n / (time.perf_counter() - t0)

    baseline = await anyio.to_thread.run_sync(sqlite_writes)
    db.close()
    return [
        Figure(
            name="region writes (serial)",
            value=serial,
            unit="writes/s",
            limit=limit,
            limit_name="raw atomic replace",
            baseline=baseline,
            baseline_name="sqlite WAL full",
            goal_ratio=0.8,
            note=f"{len(data)} B region files, LocalStore.put_atomic awaited one at a time",
        ),
        Figure(
            name="region writes (16 concurrent)",
            value=concurrent,
            unit="writes/s",
            limit=limit,
            limit_name="raw atomic replace",
            baseline=baseline,
            baseline_name="sqlite WAL full",
            goal_ratio=0.8,
            note="concurrent fsyncs overlap in the device queue: may exceed the serial limit",
        ),
        Figure(
            name="region writes (batches of 8)",
            value=batched,
            unit="writes/s",
            limit=limit,
            limit_name="raw atomic replace",
            baseline=baseline,
            baseline_name="sqlite WAL full",
            note=(
                "LocalStore.put_many_atomic of 8 keys awaited one batch at a time, as a world "
                "flush writes: every temp's writeback started before the first fsync, one "
                "directory fsync per batch"
            ),
        ),
    ]


async def chunk_reads(work: Path, quick: bool) -> list[Figure]:
    regions = 8 if quick else 32
    codec = ChunkCodec("msgpack")
    store = await LocalStore.open(work / "reads")
    db = _sqlite(work / "reads.sqlite")
    keys = []
    async with store:
        for r in range(regions):
            data = _region_bytes(r, 0, 64, codec)
            await store.put_atomic(region_key(r, 0), data)
            keys.append((r, region_key(r, 0)))
        for r in range(regions):
            for i in range(64):
                rec = sample_chunk_record(r * 8 + i % 8, i // 8)
                db.execute(
                    "INSERT OR REPLACE INTO blobs VALUES (?, ?)",
                    (f"{rec.cx}.{rec.cy}", codec.encode(rec)),
                )
        rounds = 3 if quick else 10
        # Warm the page cache, then measure: one thread hop fetches every region's bytes
        # (as the runtime's loader batches), then each chunk is located by the index,
        # verified by its own xxh3 and decoded on the event loop thread.
        await store.get_many([k for _, k in keys])
        total = 0
        t0 = time.perf_counter()
        for _ in range(rounds):
            blobs = await store.get_many([k for _, k in keys])
            for (r, key), blob in zip(keys, blobs, strict=True):
                assert blob is not None
                index = decode_index(blob.data, rx=r, ry=0, path=key)
                assert not isinstance(index, int)
                for entry in index.entries.values():
                    frame = blob.data[entry.offset : entry.offset + entry.length]
                    payload = read_chunk(frame, entry, rx=r, ry=0, path=key)
                    codec.decode(payload, where=key)
                    total += 1
        ours = total / (time.perf_counter() - t0)

    def sqlite_reads() -> float:
        count = 0
        t0 = time.perf_counter()
        for _ in range(rounds):
            for r in range(regions):
                for i in range(64):
                    row = db.execute(
                        "SELECT data FROM blobs WHERE key = ?", (f"{r * 8 + i % 8}.{i // 8}",)
                    ).fetchone()
                    codec.decode(row[0], where="sqlite")
                    count += 1
        return count / (time.perf_counter() - t0)

    baseline = sqlite_reads()
    db.close()
    pread_us = cached_pread_us(work, 20000)
    decode_us = msgpack_decode_chunk_us(20000)
    limit = 1e6 / (pread_us / 8 + decode_us)  # a chunk frame is ~2 KiB: 1/8 of a 16 KiB pread
    return [
        Figure(
            name="chunk read+verify+decode",
            value=ours,
            unit="chunks/s",
            limit=limit,
            limit_name=f"pread {pread_us:.1f}us/16KiB + decode {decode_us:.1f}us",
            baseline=baseline,
            baseline_name="sqlite SELECT per chunk",
            goal_min=50_000,
            note="one core; page-cached region files; limit = cached read share + bare decode",
        )
    ]


def make_workdir() -> Path:
    base = Path(os.environ.get("STREAMER_BENCH_DIR", "var/bench"))
    base.mkdir(parents=True, exist_ok=True)
    import tempfile

    return Path(tempfile.mkdtemp(prefix="run-", dir=base))
