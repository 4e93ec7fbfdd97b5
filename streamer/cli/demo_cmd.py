"""`streamer demo PATH`: simulated players walk, load chunks and edit a world; then a summary.

Loop-back only: the players run in this process against the world opened from PATH (created
from the configured ``[world]`` settings if absent). Ctrl-C stops the players and still
prints the summary; a second Ctrl-C cancels what they are waiting for.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Literal

import anyio
import msgspec

from streamer.cli.common import load_settings, note_settings
from streamer.cli.main import EXIT_OK, UsageError, run_async
from streamer.config import Config
from streamer.loadtest import MAX_DURATION_S, MAX_PLAYERS, Demo, DemoOptions, ensure_world
from streamer.loadtest.progress import choose_mode, render_summary, report_progress, summary_json
from streamer.runtime.world import open_world


def add_load_options(p: argparse.ArgumentParser, *, players: int, duration: float) -> None:
    p.add_argument(
        "--players",
        type=int,
        default=players,
        help=f"simulated players, 1..{MAX_PLAYERS} (default {players})",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=duration,
        metavar="S",
        help=f"seconds to run (default {duration:g})",
    )
    p.add_argument("--json", action="store_true", help="print only the summary, as one JSON object")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo", help="drive simulated players against a world (created if absent); summarise"
    )
    p.add_argument("path", type=Path, help="world directory")
    add_load_options(p, players=8, duration=10.0)
    p.add_argument("--seed", type=int, default=1, help="seed of the players' walks and edits")
    p.add_argument(
        "--view-radius",
        type=int,
        default=None,
        help="chunks loaded around each player (default: [runtime].view_radius)",
    )
    p.add_argument(
        "--durability",
        choices=["sync", "interval"],
        default=None,
        help="journal acknowledgement policy (default: [runtime].durability)",
    )
    p.set_defaults(handler=cmd_demo)


def demo_options(args: argparse.Namespace) -> DemoOptions:
    """:raises UsageError: a count or duration out of range."""
    if not 1 <= args.players <= MAX_PLAYERS:
        raise UsageError(f"--players must be between 1 and {MAX_PLAYERS}, got {args.players}")
    if not 0 < args.duration <= MAX_DURATION_S:
        raise UsageError(
            f"--duration must be > 0 and <= {MAX_DURATION_S:.0f} seconds, got {args.duration:g}"
        )
    return DemoOptions(
        players=args.players, duration_s=args.duration, seed=getattr(args, "seed", 1)
    )


def with_runtime(
    cfg: Config,
    *,
    view_radius: int | None = None,
    durability: Literal["sync", "interval"] | None = None,
) -> Config:
    """``cfg`` with command-line runtime overrides applied.

    :raises UsageError: a value outside what the settings file would accept.
    """
    rt = cfg.runtime
    if view_radius is not None:
        if not 0 <= view_radius <= 64:
            raise UsageError(f"--view-radius must be between 0 and 64, got {view_radius}")
        rt = msgspec.structs.replace(rt, view_radius=view_radius)
    if durability is not None:
        rt = msgspec.structs.replace(rt, durability=durability)
    return msgspec.structs.replace(cfg, runtime=rt)


def cmd_demo(args: argparse.Namespace) -> int:
    options = demo_options(args)
    cfg = with_runtime(
        load_settings(args),
        view_radius=args.view_radius,
        durability=args.durability,
    )
    path: Path = args.path
    if path.exists() and not path.is_dir():
        raise UsageError(f"{path}: exists and is not a directory")
    note_settings(args, "demo")
    return run_demo(path, cfg, options, as_json=args.json)


def run_demo(path: Path, cfg: Config, options: DemoOptions, *, as_json: bool) -> int:
    """Create the world if absent, run the demo on it, print the summary (the CLI body)."""
    mode = choose_mode(as_json)

    async def body() -> int:
        created = await ensure_world(path, cfg)
        if mode != "none":
            print(
                f"{'created' if created else 'opened'} world at {path}; "
                f"{options.players} players for {options.duration_s:g} s (Ctrl-C stops early)",
                file=sys.stderr,
            )
        async with open_world(path, cfg) as world:
            demo = Demo(world, options)
            stop = anyio.Event()
            done = anyio.Event()
            async with anyio.create_task_group() as tg:
                if threading.current_thread() is threading.main_thread():
                    tg.start_soon(_interrupts, stop, demo, mode != "none")
                tg.start_soon(report_progress, mode, demo.live, done)
                try:
                    summary = await demo.run(stop)
                finally:
                    done.set()
                    tg.cancel_scope.cancel()
            summary.created = created
        # Printed only once the world is closed: everything summarised is in its files.
        print(summary_json(summary) if as_json else render_summary(summary), flush=True)
        return EXIT_OK

    return run_async(body)


async def _interrupts(stop: anyio.Event, demo: Demo, verbose: bool) -> None:
    """First Ctrl-C (or SIGTERM): players stop after their step. Second: cancel them now."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            if not stop.is_set():
                stop.set()
                if verbose:
                    print("stopping; Ctrl-C again to abort", file=sys.stderr, flush=True)
            else:
                demo.abort()
