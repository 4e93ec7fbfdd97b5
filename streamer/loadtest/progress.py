"""Live progress of a demo run: a rich progress bar on a terminal, a line now and then
otherwise, and the final summary as text or one JSON object."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Literal, TextIO

import anyio
import msgspec

from streamer.loadtest.driver import DemoSummary, LiveStats

__all__ = ["ProgressMode", "choose_mode", "render_summary", "report_progress", "summary_json"]

ProgressMode = Literal["rich", "lines", "none"]

#: Seconds between two progress lines when stderr is not a terminal (logs, CI).
_LINE_EVERY_S = 2.0
_RICH_EVERY_S = 0.25


def choose_mode(as_json: bool, stream: TextIO | None = None) -> ProgressMode:
    if as_json:
        return "none"
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    return "rich" if isatty is not None and isatty() else "lines"


class _Rates:
    """Per-second rates over the last reporting interval, not since the start."""

    def __init__(self) -> None:
        self._last: LiveStats | None = None

    def update(self, s: LiveStats) -> tuple[float, float]:
        last, self._last = self._last, s
        if last is None or s.elapsed_s <= last.elapsed_s:
            return 0.0, 0.0
        dt = s.elapsed_s - last.elapsed_s
        return (s.chunk_loads - last.chunk_loads) / dt, (s.deltas_acked - last.deltas_acked) / dt


def _describe(s: LiveStats, loads_s: float, deltas_s: float) -> str:
    return (
        f"{s.players_active} players  {loads_s:,.0f} loads/s  {deltas_s:,.0f} deltas/s  "
        f"{s.flushes} flushes  queue {s.queue_depth:,}  cache hits {s.cache_hit_rate:.0%}"
    )


async def report_progress(
    mode: ProgressMode, live: Callable[[], LiveStats], done: anyio.Event
) -> None:
    """Show ``live()`` until ``done`` is set (progress goes to stderr: stdout is the summary)."""
    if mode == "none":
        await done.wait()
        return
    rates = _Rates()
    rates.update(live())
    if mode == "lines":
        while not done.is_set():
            with anyio.move_on_after(_LINE_EVERY_S):
                await done.wait()
            if done.is_set():
                break
            s = live()
            text = _describe(s, *rates.update(s))
            print(
                f"[{s.elapsed_s:6.1f}s / {s.duration_s:.0f}s] {text}", file=sys.stderr, flush=True
            )
        return

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    # auto_refresh=False: redraw from this task instead of rich's own thread.
    with Progress(
        TextColumn("demo"),
        BarColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=console,
        auto_refresh=False,
        transient=True,
    ) as bar:
        task = bar.add_task("starting", total=None)
        while not done.is_set():
            s = live()
            bar.update(
                task,
                total=s.duration_s,
                completed=min(s.elapsed_s, s.duration_s),
                description=_describe(s, *rates.update(s)),
            )
            bar.refresh()
            with anyio.move_on_after(_RICH_EVERY_S):
                await done.wait()


def summary_json(summary: DemoSummary) -> str:
    return msgspec.json.encode(summary).decode()


def render_summary(summary: DemoSummary) -> str:
    s = summary
    how = "interrupted" if s.interrupted else "finished"
    rows = [
        ("world", f"{s.world}{' (created)' if s.created else ''}"),
        ("run", f"{how} after {s.elapsed_s:.1f} s, {s.players} players, {s.steps:,} steps"),
        ("settings", f"durability={s.durability}, view radius {s.view_radius} chunks"),
        ("chunk loads", f"{s.chunk_loads:,} ({s.chunk_loads_per_s:,.0f}/s)"),
        (
            "chunk ready",
            f"p50 {s.chunk_ready_p50_ms:.2f} ms, p99 {s.chunk_ready_p99_ms:.2f} ms "
            f"({s.chunk_waits:,} chunk entries)",
        ),
        (
            "deltas acked",
            f"{s.deltas_acked:,} in {s.submits:,} batches ({s.deltas_per_s:,.0f}/s)",
        ),
        (
            "ack latency",
            f"p50 {s.ack_p50_ms:.2f} ms, p99 {s.ack_p99_ms:.2f} ms, max {s.ack_max_ms:.2f} ms",
        ),
        ("character moves", f"{s.character_moves:,} (tick retries {s.tick_retries})"),
        (
            "flushes",
            f"{s.flushes:,} ({s.flushes_per_s:,.1f}/s, {s.flush_errors} errors), "
            f"{s.journal_fsyncs:,} journal fsyncs",
        ),
        ("cache hit rate", f"{s.cache_hit_rate:.1%}"),
        ("peak memory", f"{s.peak_rss_mib:,.0f} MiB"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
