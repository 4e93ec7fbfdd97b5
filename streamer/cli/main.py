"""`streamer` command line: operator tools, the demo/main job and benchmarks.

Exit codes: 0 success (healthy), 1 problems found or the command failed, 2 usage error.
Errors print one clear line; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Awaitable, Callable, Sequence

import anyio

from streamer.errors import ConfigError, StreamerError, UnsupportedFormat, WorldError

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """Raised by a command for bad arguments: printed as one line, exit code 2."""


def _build_parser() -> argparse.ArgumentParser:
    from streamer.cli import (
        bench_cmd,
        demo_cmd,
        migrate_cmd,
        recovery_cmds,
        run_cmd,
        snapshot_cmds,
        world_cmds,
    )

    parser = argparse.ArgumentParser(prog="streamer", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="settings file (default: $STREAMER_CONFIG or ./config/streamer.toml if present)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    world_cmds.register(sub)
    snapshot_cmds.register(sub)
    migrate_cmd.register(sub)
    recovery_cmds.register(sub)
    run_cmd.register(sub)
    demo_cmd.register(sub)
    bench_cmd.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except UsageError as exc:
        print(f"streamer {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"streamer {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ConfigError, WorldError) as exc:
        if args.debug:
            traceback.print_exc()
        print(f"streamer {args.command}: error: {exc}", file=sys.stderr)
        # A path that is not a world, or a config typo, is the caller's input at fault.
        return EXIT_PROBLEMS if isinstance(exc, UnsupportedFormat) else EXIT_USAGE
    except StreamerError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"streamer {args.command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_PROBLEMS


def run_async(fn: Callable[[], Awaitable[int]]) -> int:
    """Run an async command body on asyncio and return its exit code."""
    return anyio.run(fn)


if __name__ == "__main__":
    sys.exit(main())
