"""The runtime benchmarks' harness: tiny sizes, checked for sane figures (never for speed)."""

from __future__ import annotations

import math
from pathlib import Path

from streamer.bench import runtime_bench as rb
from streamer.bench.report import Figure, render
from streamer.bench.runner import _registry


def _check(figures: list[Figure]) -> None:
    assert figures
    for f in figures:
        assert math.isfinite(f.value) and f.value > 0, f.name
        assert f.limit is not None and f.limit > 0, f.name
        assert f.baseline is not None and f.baseline > 0, f.name
        assert f.goal_met is not None, f.name  # every runtime figure carries a goal
    assert all(f.name in render(figures) for f in figures)


async def test_chunk_loads(tmp_path: Path) -> None:
    figures = await rb.chunk_loads(
        tmp_path, True, sizes=rb.LoadSizes(regions=1, rounds=1, callers=4)
    )
    _check(figures)
    assert figures[0].unit == "chunks/s"


async def test_durable_deltas(tmp_path: Path) -> None:
    sizes = rb.DeltaSizes(submitters=4, batch=8, seconds=0.3, probe_fsyncs=10, light_submitters=2)
    figures = await rb.durable_deltas(tmp_path, True, sizes=sizes)
    _check(figures)
    assert [f.unit for f in figures] == ["deltas/s", "ms", "ms"]
    assert all(f.lower_is_better for f in figures[1:])


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
