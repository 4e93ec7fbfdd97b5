"""`streamer migrate`: upgrade every stored record of a closed world to the current schema.

Exit codes: 0 migrated (or a dry run found nothing wrong); 1 the migration failed and was
rolled back (or a dry run found records that would fail); 2 usage: not a world, world open
in another process, ``--resume`` with nothing to resume, an interrupted run without
``--resume``.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import msgspec

from streamer.cli.common import load_settings, note_settings, open_local_store, require_world_dir
from streamer.cli.main import (
    EXIT_OK,
    EXIT_PROBLEMS,
    UsageError,
    run_async,
    run_command,
)
from streamer.errors import WorldLocked
from streamer.migrate import CheckpointError, MigrationReport, migrate_world
from streamer.worlddir import LOCK_NAME, WorldLock

_LIVE_HINT = (
    "it is open in another process (a running server?). A live server migrates regions "
    "lazily as it loads them, so nothing needs to run while it is up; to migrate everything "
    "at once, stop the server and run `streamer migrate` again, or have the server call "
    "`World.migrate()`, which migrates the open world in process (see docs/migrations.md, "
    "'Live migration')."
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "migrate",
        help="upgrade every stored record to the current schema (snapshot first, resumable)",
        description=(
            "Migrate a closed world region by region. Takes a pre-migration snapshot; on a "
            "failing record halts, rolls back to it and records an incident."
        ),
    )
    _add_arguments(p)
    p.set_defaults(handler=cmd_migrate)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="report record counts per type and version and the first failures; write nothing",
    )
    p.add_argument("--resume", action="store_true", help="finish an interrupted migration")
    p.add_argument(
        "--jobs", type=int, default=None, help="regions migrated concurrently (migration.jobs)"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")


class _RichProgress:
    """Bar, regions done/total, chunks/s and ETA on stderr (stdout stays for the report)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("migrating"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("regions"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._task: Any = None
        self._chunks = 0
        self._t0 = time.monotonic()

    def __enter__(self) -> _RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def start(self, *, total_regions: int, skipped_regions: int) -> None:
        self._t0 = time.monotonic()
        self._task = self._progress.add_task(
            "migrate", total=total_regions, completed=skipped_regions, rate="- chunks/s"
        )

    def advance(self, *, regions: int, chunks: int) -> None:
        self._chunks += chunks
        elapsed = max(time.monotonic() - self._t0, 1e-6)
        self._progress.update(
            self._task, advance=regions, rate=f"{self._chunks / elapsed:,.0f} chunks/s"
        )


def _locked_by_other(path: Path) -> bool:
    """Whether a live process holds the world lock, without creating ``.lock`` (dry runs
    promise to write nothing). Blocking: call from a worker thread."""
    try:
        fd = os.open(path / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return True
        raise
    finally:
        os.close(fd)  # also drops our shared lock
    return False


def _fmt_counts(report: MigrationReport) -> list[str]:
    lines = []
    for rtype, by_version in report.counts.items():
        target = report.target_versions.get(rtype)
        for version, n in by_version.items():
            change = "current" if version == target else f"v{version} -> v{target}"
            lines.append(f"  {rtype:<10} v{version:<3} {n:>10,} records  ({change})")
    return lines


def print_report(report: MigrationReport, *, as_json: bool) -> None:
    if as_json:
        out = msgspec.to_builtins(report)
        out["ok"] = report.ok
        print(msgspec.json.encode(out).decode())
        return
    verb = "would rewrite" if report.dry_run else "rewrote"
    head = "dry run (nothing written)" if report.dry_run else report.status
    print(f"{report.world}: {head} in {report.elapsed_s:.2f} s")
    failed = f", {report.regions_failed} failed" if report.regions_failed else ""
    print(
        f"  regions: {report.regions_total} ({verb} {report.regions_rewritten}, "
        f"{report.regions_current} already current, {report.regions_skipped} done by an "
        f"earlier run{failed})"
    )
    print(
        f"  chunks:  {report.chunks_total:,} ({report.chunks_upgraded:,} changed); "
        f"records: {report.records_total:,} ({report.records_upgraded:,} upgraded)"
    )
    print("  records read, by type and schemaVersion:")
    for line in _fmt_counts(report):
        print(line)
    if report.dry_run and report.failures:
        print(f"  first failures ({len(report.failures)} of {report.failures_total}):")
        for f in report.failures:
            print(f"    {f.describe()}")
    if report.snapshot_id is not None and report.status == "completed":
        print(
            f"  pre-migration snapshot {report.snapshot_id} is kept: restore it to undo "
            "the migration"
        )


def _print_failure(report: MigrationReport) -> None:
    for f in report.failures[:1]:
        print(f"streamer migrate: migration FAILED at {f.describe()}", file=sys.stderr)
    if report.rolled_back:
        print(
            f"streamer migrate: rolled back to pre-migration snapshot {report.snapshot_id}; "
            f"the world is as it was before (incident {report.incident_id}). Fix the "
            "migration step or the data, then run `streamer migrate` again.",
            file=sys.stderr,
        )


def cmd_migrate(args: argparse.Namespace) -> int:
    cfg = load_settings(args)
    jobs: int = args.jobs if args.jobs is not None else cfg.migration.jobs
    if not 1 <= jobs <= 256:
        raise UsageError(f"--jobs must be between 1 and 256, got {jobs}")
    if args.dry_run and args.resume:
        raise UsageError("--dry-run and --resume exclude each other")
    path = require_world_dir(args.path)
    note_settings(args, "migrate")
    migrate_log = logging.getLogger("streamer.migrate")
    if not args.debug and not logging.getLogger().handlers and not migrate_log.handlers:
        # The failure is printed below as one line; keep logging's last-resort handler from
        # repeating it with a traceback (--debug shows it).
        migrate_log.addHandler(logging.NullHandler())

    async def body() -> int:
        lock = WorldLock(path)
        if args.dry_run:
            if await anyio.to_thread.run_sync(_locked_by_other, path):
                print(
                    f"streamer migrate: note: {path} is open in another process; the dry run "
                    "reads a live world, so counts may already be stale",
                    file=sys.stderr,
                )
        else:
            try:
                await anyio.to_thread.run_sync(lock.acquire)
            except WorldLocked:
                raise WorldLocked(f"refusing to migrate: {_LIVE_HINT}", path=str(path)) from None
        try:
            async with await open_local_store(path, cfg) as store:
                show = not args.json and sys.stderr.isatty()
                progress = _RichProgress() if show else None
                try:
                    if progress is not None:
                        progress.__enter__()
                    report = await migrate_world(
                        store,
                        jobs=jobs,
                        dry_run=args.dry_run,
                        resume=args.resume,
                        progress=progress,
                        where=str(path),
                        snapshot_keep=cfg.snapshots.keep,
                        workers="auto",
                    )
                except CheckpointError as exc:
                    raise UsageError(str(exc)) from None
                finally:
                    if progress is not None:
                        progress.__exit__(None, None, None)
        finally:
            if lock.held:
                await anyio.to_thread.run_sync(lock.release)
        print_report(report, as_json=args.json)
        if not report.ok and not report.dry_run:
            _print_failure(report)
        return EXIT_OK if report.ok else EXIT_PROBLEMS

    return run_async(body)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m streamer.cli.migrate_cmd PATH ...``: the same command outside ``streamer``,
    with its error handling (``streamer.cli.main.run_command``)."""
    parser = argparse.ArgumentParser(prog="streamer migrate", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--config", metavar="FILE", help="settings file")
    _add_arguments(parser)
    args = parser.parse_args(argv)
    args.command = "migrate"
    return run_command(args, cmd_migrate)


if __name__ == "__main__":
    sys.exit(main())
