"""Migration benchmarks: batch throughput against the raw pipeline limit, and lazy-upgrade cost.

- **limit**: the same regions pushed through the bare pipeline, no streamer migration code in
  the way: get → verify (``decode_region``) → msgspec-decode every chunk → re-encode it
  unchanged → ``encode_region`` → ``put_atomic``, with the same number of concurrent jobs.
- **batch**: ``migrate_world`` on those regions (character v1 → v3, society v1 → v2), end to
  end: pre-migration snapshot, checkpoints, manifest update, and (at this size, with
  ``workers="auto"``) starting and stopping its worker processes. Goals: ≥ 50 % of the limit
  and ≥ 20,000 chunks/s.

The limit runs its CPU work in threads (one core, the GIL); the batch runs it in worker
processes when ``workers="auto"`` picks them (``PROCESS_MIN_REGIONS``), i.e. on up to
``JOBS`` cores. The note says which, and the first round's figure, which includes the fork
server's one-time start in this process.
- **lazy upgrade**: what ``ChunkCodec.decode`` of a v1 chunk costs over the same chunk stored
  at the current versions, in µs per chunk (what a live server pays on first load).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import anyio
import msgspec

from streamer.bench.report import Figure
from streamer.format.region import decode_region, encode_region, parse_region_key
from streamer.migrate.batch import _worker_processes, migrate_world
from streamer.migrate.synth import character_raw, chunk_raw, society_raw, write_world
from streamer.schema.codec import ChunkCodec
from streamer.schema.migrations import REGISTRY
from streamer.storage.base import BlobStore
from streamer.storage.local import LocalStore

__all__ = ["lazy_upgrade_us", "migration_bench"]

JOBS = 2


async def _raw_pipeline(store: BlobStore, jobs: int) -> tuple[int, float]:
    """The limit: read, verify, decode, re-encode, write every region. (chunks, seconds)."""
    keys = [k for k in await store.list("regions/") if parse_region_key(k) is not None]
    dec = msgspec.msgpack.Decoder()
    enc = msgspec.msgpack.Encoder()
    chunks = 0

    def work(key: str, data: bytes) -> tuple[bytes, int]:
        coords = parse_region_key(key)
        assert coords is not None
        rf = decode_region(data, rx=coords[0], ry=coords[1], path=key)
        out = {ck: enc.encode(dec.decode(p)) for ck, p in rf.chunks.items()}
        h = rf.header
        new = encode_region(
            rx=h.rx,
            ry=h.ry,
            last_processed_tick=h.last_processed_tick,
            generation=h.generation + 1,
            writer="bench",
            encoding=h.encoding,
            chunks=out,
            region_size=h.region_size,
        )
        return new, len(out)

    it = iter(keys)

    async def worker() -> None:
        nonlocal chunks
        for key in it:
            blob = await store.get(key)
            new, n = await anyio.to_thread.run_sync(work, key, blob.data)
            await store.put_atomic(key, new)
            chunks += n

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(jobs):
            tg.start_soon(worker)
    return chunks, time.perf_counter() - t0


def _copy2(base: Path, a: Path, b: Path) -> None:
    shutil.copytree(base, a)
    shutil.copytree(base, b)


def _rm2(a: Path, b: Path) -> None:
    shutil.rmtree(a)
    shutil.rmtree(b)


def lazy_upgrade_us(n: int) -> tuple[float, float]:
    """``ChunkCodec.decode`` µs per chunk: (v1 payload, current payload). Blocking."""
    codec = ChunkCodec("msgpack")
    chars = [character_raw(f"c-{i}", i, 0, 1, i) for i in range(3)]
    old_raw = chunk_raw(3, -2, characters=chars, societies=[society_raw("s", 0, 0, 1, ["t"])])
    old = msgspec.msgpack.encode(old_raw)
    current = codec.encode(codec.decode(old, where="bench").record)
    assert codec.decode(old, where="bench").upgraded
    assert not codec.decode(current, where="bench").upgraded

    def per_call(payload: bytes) -> float:
        codec.decode(payload, where="bench")
        t0 = time.perf_counter()
        for _ in range(n):
            codec.decode(payload, where="bench")
        return (time.perf_counter() - t0) / n * 1e6

    return per_call(old), per_call(current)


async def migration_bench(work: Path, quick: bool) -> list[Figure]:
    regions = 24 if quick else 96
    per_region = 64  # full regions (8x8): the per-file costs are shared by the most chunks
    rounds = 2 if quick else 3
    base = work / "base"
    total_chunks = await anyio.to_thread.run_sync(
        lambda: write_world(base, regions=regions, chunks_per_region=per_region)
    )
    # Shared machines make fsync latency swing by 10x between seconds: alternate limit and
    # batch runs on fresh copies and keep the best of each, so both see the same weather.
    limit_cps = batch_cps = batch_rps = 0.0
    records_per_chunk = 0.0
    first_round = ""
    for i in range(rounds):
        a, b = work / f"limit{i}", work / f"batch{i}"
        await anyio.to_thread.run_sync(_copy2, base, a, b)
        async with await LocalStore.open(a) as store:
            limit_chunks, limit_s = await _raw_pipeline(store, JOBS)
        async with await LocalStore.open(b) as store:
            report = await migrate_world(store, jobs=JOBS, where=str(b), workers="auto")
        if not report.ok:
            raise RuntimeError(f"benchmark migration failed: {report.failures}")
        assert limit_chunks == total_chunks == report.chunks_total
        limit_cps = max(limit_cps, limit_chunks / limit_s)
        if i == 0:
            first_round = (
                f"first round {report.chunks_total / report.elapsed_s:,.0f} chunks/s "
                f"({report.chunks_total / report.elapsed_s / (limit_chunks / limit_s):.0%})"
            )
        batch_cps = max(batch_cps, report.chunks_total / report.elapsed_s)
        batch_rps = max(batch_rps, report.records_total / report.elapsed_s)
        records_per_chunk = report.records_total / report.chunks_total
        await anyio.to_thread.run_sync(_rm2, a, b)
    n = 2000 if quick else 20000
    old_us, cur_us = await anyio.to_thread.run_sync(lazy_upgrade_us, n)
    shape = (
        f"{regions} regions x {per_region} chunks, {records_per_chunk:.1f} records/chunk, "
        f"jobs={JOBS}, fsync on, best of {rounds}"
    )
    processes = _worker_processes("auto", REGISTRY, JOBS, regions)
    cores = (
        f"batch CPU work in {processes} worker processes, the limit's in threads (1 core); "
        f"{first_round} incl. the fork server's one-time start"
        if processes
        else "batch and limit CPU work both in threads (1 core)"
    )
    return [
        Figure(
            name="migrate: batch chunks/s",
            value=batch_cps,
            unit="chunks/s",
            limit=limit_cps,
            limit_name="get+verify+decode+encode+put_atomic",
            goal_ratio=0.5,
            goal_min=20_000,
            note=(f"{shape}; end to end incl. pre-migration snapshot and checkpoints; {cores}"),
        ),
        Figure(
            name="migrate: batch records/s",
            value=batch_rps,
            unit="records/s",
            limit=limit_cps * records_per_chunk,
            limit_name="same pipeline, records",
            goal_ratio=0.5,
        ),
        Figure(
            name="migrate: lazy upgrade per chunk decode",
            value=old_us - cur_us,
            unit="µs",
            lower_is_better=True,
            note=(
                f"ChunkCodec.decode: v1 chunk {old_us:.1f} µs vs current {cur_us:.1f} µs "
                "(3 characters v1->v3, 1 society v1->v2, 2 features)"
            ),
        ),
    ]
