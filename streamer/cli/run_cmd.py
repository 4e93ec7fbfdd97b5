"""`streamer run`: the main job (what ./scripts/run starts).

Creates the configured world if absent, then drives a modest demo load on it (simulated
players walking, loading chunks and editing tiles; see ``streamer demo``) and prints what
it measured.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from streamer.cli.common import load_settings, note_settings
from streamer.cli.demo_cmd import add_load_options, demo_options, run_demo
from streamer.cli.main import UsageError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        help="main job: create the configured world if absent and run a short demo load on it",
    )
    p.add_argument(
        "--path", type=Path, default=None, help="world directory (default: [world].path)"
    )
    add_load_options(p, players=8, duration=10.0)
    p.set_defaults(handler=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    options = demo_options(args)
    cfg = load_settings(args)
    path: Path = args.path if args.path is not None else Path(cfg.world.path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{path}: exists and is not a directory")
    note_settings(args, "run")
    return run_demo(path, cfg, options, as_json=args.json)
