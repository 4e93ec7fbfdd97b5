"""`streamer` command line: operator tools, the demo/main job and benchmarks.

Exit codes: 0 success (healthy), 1 problems found or the command failed, 2 usage error
(bad arguments, not a world, world open in another process).
Errors print one clear line; ``--debug`` (before or after the command) or
``STREAMER_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
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
    _accept_debug_after_command(sub)
    return parser


def _accept_debug_after_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Let ``--debug`` follow the command too (``streamer check W --debug``), as the docs show.

    ``SUPPRESS`` keeps a subcommand that did not see the flag from resetting the value the
    top-level parser already stored.
    """
    for parser in set(sub.choices.values()):
        parser.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show tracebacks on errors",
        )
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                _accept_debug_after_command(action)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    return run_command(args, args.handler)


def run_command(args: argparse.Namespace, handler: Handler) -> int:
    """``handler(args)`` with the exit codes and one-line errors of the module docstring
    (``args.command`` names the command in them; ``args.debug`` or ``STREAMER_DEBUG`` shows
    tracebacks). Also for ``python -m streamer.cli.migrate_cmd``."""
    # For wrappers (cron, systemd units) where adding a flag is harder than an environment line.
    off = ("", "0", "false", "no", "off")
    args.debug = args.debug or os.environ.get("STREAMER_DEBUG", "").strip().lower() not in off
    try:
        return handler(args)
    except UsageError as exc:
        print(f"streamer {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        hint = ""
        if args.command == "migrate" and not getattr(args, "dry_run", False):
            hint = (
                "; regions finished are kept: if a checkpoint was written "
                "(state/migrate.json), run the same command with --resume to go on"
            )
        print(f"streamer {args.command}: interrupted{hint}", file=sys.stderr)
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
    except OSError as exc:
        # Paths the operator named (init's directory, salvage's --out) are touched directly,
        # not through a store that would translate the error.
        if args.debug:
            traceback.print_exc()
        print(f"streamer {args.command}: error: {describe_os_error(exc)}", file=sys.stderr)
        return EXIT_PROBLEMS


def describe_os_error(exc: OSError) -> str:
    """``FILE: reason`` for an ``OSError``, naming both files of a failed rename or link."""
    reason = exc.strerror or str(exc)
    if exc.filename is None:
        return reason
    if exc.filename2 is not None:
        return f"{exc.filename} -> {exc.filename2}: {reason}"
    return f"{exc.filename}: {reason}"


def run_async(fn: Callable[[], Awaitable[int]]) -> int:
    """Run an async command body on asyncio and return its exit code."""
    return anyio.run(fn)


if __name__ == "__main__":
    sys.exit(main())
