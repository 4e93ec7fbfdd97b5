"""The runtime benchmarks' harness: tiny sizes, checked for sane figures (never for speed)."""

from __future__ import annotations

import gc
import math
from pathlib import Path

import anyio
import pytest

from streamer.bench import runtime_bench as rb
from streamer.bench.report import Figure, render
from streamer.bench.runner import _registry


def _check(figures: list[Figure]) -> None:
    assert figures
    for f in figures:
        assert math.isfinite(f.value) and f.value > 0, f.name
        assert f.limit is not None and f.limit > 0, f.name
        assert f.baseline is not None and f.baseline > 0, f.name
        # Every runtime figure carries a goal, except rows that say they are not goal rows.
        assert f.goal_met is not None or f.note.startswith("not a goal row"), f.name
    assert all(f.name in render(figures) for f in figures)


async def test_chunk_loads(tmp_path: Path) -> None:
    figures = await rb.chunk_loads(
        tmp_path, True, sizes=rb.LoadSizes(regions=1, rounds=1, callers=4)
    )
    _check(figures)
    assert figures[0].unit == "chunks/s"


async def test_durable_deltas(tmp_path: Path) -> None:
    sizes = rb.DeltaSizes(
        submitters=4, batch=8, seconds=0.3, probe_fsyncs=10, goal_rate=640, goal_submitters=2
    )
    figures = await rb.durable_deltas(tmp_path, True, sizes=sizes)
    _check(figures)
    assert [f.unit for f in figures] == ["deltas/s", "ms", "ms"]
    assert all(f.lower_is_better for f in figures[1:])
    # The paced row is judged; the closed loop at twice the rate only reported.
    assert figures[1].goal_min == 5.0 and figures[2].goal_min is None
    assert "640 deltas/s" in figures[1].name


async def test_open_loop_counts_latency_from_the_schedule() -> None:
    """A stall delays every batch scheduled behind it, and the open loop charges each of
    them the whole delay (no coordinated omission)."""
    stalled = False

    async def submit(task: int, seq: int) -> int:
        nonlocal stalled
        if seq == 2 and not stalled:
            stalled = True
            await anyio.sleep(0.2)  # one shard's send takes 0.2 s once
        return 8

    rate, lat, behind = await rb._open_loop(1, 0.5, 8 / 0.01, 8, submit)  # a batch per 10 ms
    # The stalled batch and the ~20 scheduled during the stall each count >= 0.1 s late.
    assert lat.count >= 40
    assert lat.max_s >= 0.19 and lat.percentile_ms(85) >= 100
    assert behind >= 0.15
    assert rate > 0


@pytest.mark.parametrize(("shards", "seconds", "rate"), [(1, 0.3, 800.0), (4, 0.25, 3200.0)])
async def test_open_loop_batches_cover_every_send(shards: int, seconds: float, rate: float) -> None:
    """The durable-deltas bench builds an open loop's batches beforehand: every batch the
    loop sends must be among them, and not many more are built."""
    counts = rb._open_loop_batches(shards, seconds, rate, 8)
    sent: dict[int, int] = {}

    async def submit(task: int, seq: int) -> int:
        assert seq < counts[task], (task, seq, counts)
        sent[task] = max(sent.get(task, 0), seq + 1)
        return 8

    await rb._open_loop(shards, seconds, rate, 8, submit)
    assert set(sent) == set(range(shards))
    assert all(counts[t] - 2 <= sent[t] for t in sent), (counts, sent)


async def test_region_flushes(tmp_path: Path) -> None:
    sizes = rb.FlushSizes(regions=2, rounds=2, chunks_per_region=2)
    figures = await rb.region_flushes(tmp_path, True, sizes=sizes)
    _check(figures)
    assert figures[0].unit == "regions/s"


def test_registered() -> None:
    registry = _registry()
    assert registry["chunk-loads"] is rb.chunk_loads
    assert registry["durable-deltas"] is rb.durable_deltas
    assert registry["region-flushes"] is rb.region_flushes


def test_prebuilt_batches_are_out_of_the_collectors_sight() -> None:
    """The open loop's prebuilt batches must not be walked by the garbage collector in the
    timed window: each is an untracked tuple, and so is the dict holding them."""
    ready = rb._prebuild(2, 0.05, 4000.0, 8, lambda seq: 100 + seq)
    counts = rb._open_loop_batches(2, 0.05, 4000.0, 8)
    assert set(ready) == {(t, s) for t, n in enumerate(counts) for s in range(n)}
    assert all(len(b) == 8 and all(d.tick == 100 + s for d in b) for (_, s), b in ready.items())
    assert not any(gc.is_tracked(b) for b in ready.values())
    assert not gc.is_tracked(ready)
