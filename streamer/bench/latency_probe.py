"""Where an open loop's acknowledgement latency goes: the diagnostic behind docs/performance.md.

``scripts/latency-probe [--seconds S] [--rate R] [--closed-first] [--preallocate]
[--no-sync-process]``
runs the benchmark's open loop (``runtime_bench._open_loop``: 16 shards, 64 tile edits a
batch, latency from each batch's scheduled time) against a fresh world and prints, beside
the benchmark's p50/p99/max:

- ``submit`` to acknowledgement alone (p50/p90/p99), without the schedule's timer lateness;
- event-loop lags: a task sleeps 1 ms in a loop; a wake more than 3 ms late is a lag;
- garbage collections over 0.5 ms (``gc.callbacks``), by generation;
- CPU: the event loop's thread (``time.thread_time``) and the whole process, in cores, and
  the loop's CPU per acknowledged batch: what every commit waits behind.

``--closed-first`` runs the benchmark's saturated closed loop first, as ``durable_deltas``
does, so the open loop starts from the same heap. ``--preallocate`` turns the journal's
preallocated segments on (``journal_preallocate``, off by default), for an A/B in one
checkout; the open loop then starts once the first spare is zero-filled (a server that has
run for a while has one ready). ``--no-sync-process`` commits in the journal's thread instead
of its sync process (``journal_sync_process``), the same kind of A/B.

A diagnostic, not a benchmark: it judges nothing and its figures are only comparable
between runs on the same stretch of the VM.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgspec

from streamer.bench import runtime_bench as rb
from streamer.coords import CHUNK_SIZE
from streamer.loadtest.stats import LatencyRecorder
from streamer.runtime.world import open_world

_SHARDS = 16
_BATCH = 64
_LAG_S = 0.003
_SLOW_GC_S = 0.0005


@dataclass
class ProbeResult:
    acked_per_s: float
    scheduled: LatencyRecorder
    submit_to_ack: LatencyRecorder
    worst_behind_s: float
    lags: list[float] = field(default_factory=list)
    slow_gcs: Counter[int] = field(default_factory=Counter)
    worst_gc_s: float = 0.0
    #: Journal segments opened during the open loop, how many from a zero-filled spare.
    segments_opened: int = 0
    segments_preallocated: int = 0
    #: Commits in the open loop, and how many of them the journal's sync process made.
    commits: int = 0
    commits_in_process: int = 0
    #: Over the open loop: CPU seconds of the loop's thread and of the process, wall seconds,
    #: batches acknowledged.
    loop_cpu_s: float = 0.0
    process_cpu_s: float = 0.0
    wall_s: float = 0.0
    batches: int = 0

    def lines(self) -> list[str]:
        s, a = self.scheduled, self.submit_to_ack
        wall = max(self.wall_s, 1e-9)
        gcs = ", ".join(f"gen{g}: {n}" for g, n in sorted(self.slow_gcs.items())) or "none"
        return [
            f"acknowledged      {self.acked_per_s:,.0f} deltas/s",
            f"from schedule     p50 {s.percentile_ms(50):.2f} ms, p99 {s.percentile_ms(99):.2f} ms,"
            f" max {s.max_s * 1e3:.1f} ms; worst send {self.worst_behind_s * 1e3:.1f} ms late",
            f"submit to ack     p50 {a.percentile_ms(50):.2f} ms, p90 {a.percentile_ms(90):.2f} ms,"
            f" p99 {a.percentile_ms(99):.2f} ms",
            f"loop lags > 3 ms  {len(self.lags)}, worst {max(self.lags, default=0.0) * 1e3:.1f} ms",
            f"gc over 0.5 ms    {gcs}; worst {self.worst_gc_s * 1e3:.1f} ms",
            f"journal segments  {self.segments_opened} opened in the open loop, "
            f"{self.segments_preallocated} of them from a zero-filled spare",
            f"journal commits    {self.commits:,}, {self.commits_in_process:,} of them by its sync "
            "process",
            f"cpu               loop {self.loop_cpu_s / wall:.2f} cores, process "
            f"{self.process_cpu_s / wall:.2f} cores; loop "
            f"{self.loop_cpu_s / max(self.batches, 1) * 1e6:.0f} µs per batch",
        ]


async def probe(
    work: Path,
    *,
    seconds: float = 6.0,
    rate: float = 200_000,
    closed_first: bool = False,
    preallocate: bool = False,
    sync_process: bool = True,
) -> ProbeResult:
    """One open loop against a new world under ``work`` (see the module docstring)."""
    world = work / "probe"
    await anyio.to_thread.run_sync(lambda: work.mkdir(parents=True, exist_ok=True))
    await rb._new_world(world)
    touched = {
        (t.x // CHUNK_SIZE, t.y // CHUNK_SIZE)
        for task in range(64 if closed_first else _SHARDS)
        for seq in range(16)
        for t in rb._submitter_batch(task, seq, 0, _BATCH)
    }
    first = await rb._populate(world, sorted(touched), edits_per_chunk=1) + 1
    config = rb._config()
    runtime = msgspec.structs.replace(
        config.runtime, journal_preallocate=preallocate, journal_sync_process=sync_process
    )
    async with open_world(world, msgspec.structs.replace(config, runtime=runtime)) as w:
        if closed_first:

            async def closed(task: int, seq: int) -> int:
                await w.submit(rb._submitter_batch(task, seq, first + seq, _BATCH))
                return _BATCH

            await rb._closed_loop(64, seconds, closed)
            await w.flush()
        if preallocate:
            with anyio.fail_after(60):
                # Polls a public stat: the world offers no event for it, nor needs one.
                while not w.stats().journal.spare_ready:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
        before = w.stats().journal
        tick0 = 1 << 40  # above every tick used before, in every region
        ready = rb._prebuild(_SHARDS, seconds, rate, _BATCH, lambda seq: tick0 + seq)
        submit_to_ack = LatencyRecorder()
        clock = time.monotonic

        async def paced(task: int, seq: int) -> int:
            t = clock()
            await w.submit(ready.pop((task, seq)))
            submit_to_ack.add(clock() - t)
            return _BATCH

        lags: list[float] = []
        slow: Counter[int] = Counter()
        worst_gc = [0.0]
        started = [0.0]

        def on_gc(phase: str, info: dict[str, Any]) -> None:
            if phase == "start":
                started[0] = time.perf_counter()
                return
            took = time.perf_counter() - started[0]
            if took > _SLOW_GC_S:
                slow[info["generation"]] += 1
                worst_gc[0] = max(worst_gc[0], took)

        done = False

        async def watch_loop() -> None:
            while not done:
                t = clock()
                await anyio.sleep(0.001)
                late = clock() - t - 0.001
                if late > _LAG_S:
                    lags.append(late)

        gc.callbacks.append(on_gc)
        cpu0, proc0, wall0 = time.thread_time(), time.process_time(), clock()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch_loop)
                acked, scheduled, behind = await rb._open_loop(
                    _SHARDS, seconds, rate, _BATCH, paced
                )
                done = True
        finally:
            gc.callbacks.remove(on_gc)
        loop_cpu, proc_cpu, wall = (
            time.thread_time() - cpu0,
            time.process_time() - proc0,
            clock() - wall0,
        )
        ready.clear()
        after = w.stats().journal
        return ProbeResult(
            acked_per_s=acked,
            scheduled=scheduled,
            submit_to_ack=submit_to_ack,
            worst_behind_s=behind,
            lags=lags,
            slow_gcs=slow,
            worst_gc_s=worst_gc[0],
            segments_opened=(after.segments + after.segments_deleted)
            - (before.segments + before.segments_deleted),
            segments_preallocated=after.segments_preallocated - before.segments_preallocated,
            commits=after.commits - before.commits,
            commits_in_process=after.commits_in_process - before.commits_in_process,
            loop_cpu_s=loop_cpu,
            process_cpu_s=proc_cpu,
            wall_s=wall,
            batches=submit_to_ack.count,
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="latency-probe", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rate", type=float, default=200_000, help="deltas/s offered")
    parser.add_argument("--closed-first", action="store_true")
    parser.add_argument(
        "--preallocate", action="store_true", help="journal segments from zero-filled spares"
    )
    parser.add_argument(
        "--no-sync-process",
        action="store_true",
        help="commits in the journal's thread, not its sync process",
    )
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.rate <= 0:
        parser.error("--seconds and --rate must be > 0")
    with tempfile.TemporaryDirectory(prefix="streamer-probe-") as tmp:
        result = anyio.run(
            lambda: probe(
                Path(tmp),
                seconds=args.seconds,
                rate=args.rate,
                closed_first=args.closed_first,
                preallocate=args.preallocate,
                sync_process=not args.no_sync_process,
            )
        )
    print("\n".join(result.lines()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
