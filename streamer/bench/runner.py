"""Runs the benchmarks and prints figures with their ratios to limits and baselines."""

from __future__ import annotations

import gc
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

from streamer.bench.report import Figure, render, to_json

Bench = Callable[[Path, bool], Awaitable[list[Figure]]]


def _registry() -> dict[str, Bench]:
    from streamer.bench import runtime_bench, storage_bench
    from streamer.migrate.bench import migration_bench

    return {
        "region-writes": storage_bench.region_writes,
        "chunk-reads": storage_bench.chunk_reads,
        "migrate": migration_bench,
        "chunk-loads": runtime_bench.chunk_loads,
        "durable-deltas": runtime_bench.durable_deltas,
        "region-flushes": runtime_bench.region_flushes,
    }


def _settle(sub: Path) -> None:
    shutil.rmtree(sub, ignore_errors=True)
    os.sync()


def run_benchmarks(*, quick: bool, only: list[str], as_json: bool) -> int:
    from streamer.bench.storage_bench import make_workdir

    registry = _registry()
    unknown = [name for name in only if name not in registry]
    if unknown:
        from streamer.cli.main import UsageError

        raise UsageError(f"unknown benchmark(s) {unknown}; choose from {sorted(registry)}")
    selected = only or list(registry)
    work = make_workdir()
    figures: list[Figure] = []

    async def body() -> None:
        for name in selected:
            if not as_json:
                print(f"running {name} ...", flush=True)
            sub = work / name
            sub.mkdir()
            figures.extend(await registry[name](sub, quick))
            # The next benchmark starts on a quiet disk: this one's files deleted and every
            # dirty page written now, not during the next one's timed rounds (its journal
            # segments alone are hundreds of MiB, and unlinks discard online here).
            await anyio.to_thread.run_sync(_settle, sub)
            gc.collect()

    try:
        anyio.run(body)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(to_json(figures) if as_json else render(figures))
    return 0
