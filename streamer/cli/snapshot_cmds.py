"""`streamer snapshot | snapshots | restore`: take, list and restore world snapshots."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio.to_thread

from streamer.cli.common import load_settings, note_settings, open_local_store, require_world_dir
from streamer.cli.main import EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, UsageError, run_async
from streamer.config import Config
from streamer.errors import SnapshotError, UnknownSnapshot, WorldLocked
from streamer.recovery.incidents import IncidentLog
from streamer.recovery.snapshots import (
    create_snapshot,
    restore_snapshot,
    scan_snapshots,
    verify_snapshot,
)
from streamer.worlddir import WorldLock


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("snapshot", help="flush the world and take a verified snapshot")
    p.add_argument("path", type=Path)
    p.add_argument("--reason", default="manual", help="recorded in the snapshot (default manual)")
    p.set_defaults(handler=cmd_snapshot)

    p = sub.add_parser("snapshots", help="list snapshots, verifying each")
    p.add_argument("path", type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_snapshots)

    p = sub.add_parser(
        "restore", help="restore the world to a snapshot (the current state is snapshotted first)"
    )
    p.add_argument("path", type=Path)
    p.add_argument("snapshot_id", metavar="SNAPSHOT_ID")
    p.set_defaults(handler=cmd_restore)


def _find_open_world() -> Callable[..., Any] | None:
    """``streamer.open_world`` when the runtime provides it.

    Without it the closed world is snapshotted as it lies, journal included: nothing is lost,
    the unfolded journal records are simply replayed after a restore rather than before.
    """
    try:
        module = importlib.import_module("streamer")
    except ImportError:
        return None
    fn = getattr(module, "open_world", None)
    return fn if callable(fn) else None


def _refuse_locked(command: str, exc: WorldLocked) -> int:
    """Exit 2, like every command that finds the world open elsewhere: nothing was tried."""
    print(
        f"streamer {command}: error: {exc}; stop the server (or wait for the other "
        "command) and try again",
        file=sys.stderr,
    )
    return EXIT_USAGE


async def _acquire(path: Path) -> WorldLock:
    lock = WorldLock(path)
    await anyio.to_thread.run_sync(lock.acquire)
    return lock


async def _flush_world(path: Path, cfg: Config) -> None:
    """Open the world (which replays its journal), flush every region, close it again."""
    open_world = _find_open_world()
    if open_world is None:
        return
    async with open_world(path, cfg) as world:
        await world.flush()


def cmd_snapshot(args: argparse.Namespace) -> int:
    cfg = load_settings(args)
    path = require_world_dir(args.path)
    note_settings(args, "snapshot")

    async def body() -> int:
        try:
            await _flush_world(path, cfg)
            # Held from here to the end: nobody may open the world between flush and copy.
            lock = await _acquire(path)
        except WorldLocked as exc:
            return _refuse_locked("snapshot", exc)
        try:
            async with await open_local_store(path, cfg) as store:
                try:
                    info = await create_snapshot(store, keep=cfg.snapshots.keep, reason=args.reason)
                except SnapshotError as exc:
                    await IncidentLog(store).record(
                        "snapshot_failed",
                        details={"error": str(exc), "reason": args.reason},
                        action="no snapshot was taken; run `streamer check` and repair the "
                        "named file (restore it from an older snapshot) before retrying",
                    )
                    raise
        finally:
            lock.release()
        print(info.id)
        print(
            f"snapshot {info.id}: {info.file_count} files, {info.total_bytes} bytes "
            f"(keeping the newest {cfg.snapshots.keep})",
            file=sys.stderr,
        )
        return EXIT_OK

    return run_async(body)


def cmd_snapshots(args: argparse.Namespace) -> int:
    cfg = load_settings(args)
    path = require_world_dir(args.path)

    async def body() -> int:
        rows: list[dict[str, Any]] = []
        async with await open_local_store(path, cfg) as store:
            scan = await scan_snapshots(store)
            for info in scan.snapshots:
                problems = await verify_snapshot(store, info.id)
                rows.append(
                    {
                        "id": info.id,
                        "created_at": info.created_at,
                        "reason": info.reason,
                        "files": info.file_count,
                        "bytes": info.total_bytes,
                        "valid": not problems and not info.raw,
                        "raw": info.raw,
                        "problems": [f"{p.file}: {p.fault}" for p in problems],
                        "damaged_source_files": info.damaged_files,
                        "record_versions": info.record_versions,
                    }
                )
        valid = sum(1 for r in rows if r["valid"])
        if args.json:
            out = {
                "snapshots": rows,
                "incomplete": scan.incomplete,
                "damaged": scan.damaged,
                "valid": valid,
                "min_valid": cfg.snapshots.min_valid,
            }
            print(json.dumps(out, sort_keys=True))
        else:
            _print_table(rows)
            for sid in scan.incomplete:
                print(f"warning: {sid}: incomplete (crash during creation)", file=sys.stderr)
            for sid, fault in scan.damaged.items():
                print(f"warning: {sid}: snapshot.json damaged: {fault}", file=sys.stderr)
            for r in rows:
                for problem in r["problems"]:
                    print(f"{r['id']}: {problem}", file=sys.stderr)
        if valid < cfg.snapshots.min_valid:
            print(
                f"warning: {valid} valid snapshot(s), fewer than the minimum of "
                f"{cfg.snapshots.min_valid}",
                file=sys.stderr,
            )
        return EXIT_OK if valid == len(rows) and not scan.damaged else EXIT_PROBLEMS

    return run_async(body)


def _print_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("no snapshots")
        return
    header = ("ID", "CREATED (UTC)", "REASON", "FILES", "BYTES", "VALID")
    table = [header] + [
        (
            r["id"],
            r["created_at"],
            r["reason"],
            str(r["files"]),
            str(r["bytes"]),
            "yes" if r["valid"] else ("raw" if r["raw"] and not r["problems"] else "NO"),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def cmd_restore(args: argparse.Namespace) -> int:
    cfg = load_settings(args)
    path = require_world_dir(args.path)
    note_settings(args, "restore")
    snapshot_id: str = args.snapshot_id

    async def body() -> int:
        try:
            lock = await _acquire(path)
        except WorldLocked as exc:
            return _refuse_locked("restore", exc)
        try:
            async with await open_local_store(path, cfg) as store:
                result = await restore_snapshot(store, snapshot_id, keep=cfg.snapshots.keep)
        except UnknownSnapshot as exc:
            # A mistyped argument, like an unknown path: a usage error, and nothing changed.
            listing = ", ".join(exc.available) if exc.available else "none"
            raise UsageError(
                f"no snapshot {exc.snapshot_id!r} in {path}; available: {listing} "
                f"(`streamer snapshots {path}` lists them)"
            ) from None
        finally:
            lock.release()
        raw = " (holds damaged files, kept for salvage)" if result.pre_restore_raw else ""
        print(
            f"restored {path} to snapshot {result.snapshot}; the previous state is snapshot "
            f"{result.pre_restore}{raw}"
        )
        return EXIT_OK

    return run_async(body)
