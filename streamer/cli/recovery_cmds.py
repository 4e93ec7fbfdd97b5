"""Operator recovery commands: ``region rebuild``, ``regenerate``, ``salvage``, ``incidents``,
and the ``--repair`` option of ``check``.

Commands that change a world take its ``WorldLock`` first and refuse (exit 2) while another
process has it open. Destructive ones say what they will discard and want an explicit flag.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio.to_thread
import msgspec

from streamer.cli.common import (
    load_settings,
    note_settings,
    open_local_store,
    require_world_dir,
    world_checks,
)
from streamer.cli.main import EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, Handler, UsageError, run_async
from streamer.config import Config
from streamer.coords import CHUNK_SIZE
from streamer.errors import IntegrityError, NotFound
from streamer.format.journal import segment_keys
from streamer.format.region import decode_region, region_key
from streamer.recovery.inactive import load_inactive
from streamer.recovery.incidents import KINDS, Incident, IncidentLog
from streamer.recovery.rebuild import rebuild_region, regenerate_world, region_in_bounds
from streamer.recovery.repair import RepairReport, repair_world
from streamer.recovery.salvage import SALVAGE_NAME, salvage_files
from streamer.recovery.snapshots import list_snapshots
from streamer.storage.base import BlobStore
from streamer.worlddir import WorldLock, read_manifest

__all__ = ["add_repair_option", "cmd_check_repair", "register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("region", help="operate on one region (see `region rebuild`)")
    rsub = p.add_subparsers(dest="region_command", required=True, metavar="ACTION")
    r = rsub.add_parser(
        "rebuild",
        help="reset a region to generator defaults: terrain from the seed, default NPCs and "
        "features; clears its dynamic state and makes it active again",
    )
    r.add_argument("path", type=Path)
    r.add_argument("rx", type=int)
    r.add_argument("ry", type=int)
    r.add_argument(
        "--force",
        action="store_true",
        help="also rebuild a region that is active and verifies (its state is discarded)",
    )
    r.set_defaults(handler=cmd_region_rebuild)

    p = sub.add_parser(
        "regenerate",
        help="regenerate the whole world from its seed: ALL dynamic state is dropped "
        "(a pre-regenerate snapshot is taken first)",
    )
    p.add_argument("path", type=Path)
    p.add_argument("--yes", action="store_true", help="confirm: drop all dynamic state")
    p.set_defaults(handler=cmd_regenerate)

    p = sub.add_parser(
        "salvage",
        help="forensic recovery: extract every record whose own checksum verifies from raw "
        "(damaged) region files, as JSON lines",
    )
    p.add_argument("files", type=Path, nargs="+", metavar="FILE", help="files or directories")
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.set_defaults(handler=cmd_salvage)

    p = sub.add_parser("incidents", help="show the incident log")
    p.add_argument("path", type=Path)
    p.add_argument("--json", action="store_true")
    p.add_argument("--kind", action="append", help="only incidents of this kind (repeatable)")
    p.set_defaults(handler=cmd_incidents)


def add_repair_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--repair`` to the ``check`` parser; call after its ``set_defaults(handler=...)``.

    With ``--repair`` the check runs :func:`cmd_check_repair` instead of the plain handler.
    """
    parser.add_argument(
        "--repair",
        action="store_true",
        help="repair what fails: restore regions from snapshots or isolate them (inactive), "
        "with incidents; exit 0 only if the world checks clean afterwards",
    )
    plain: Handler | None = parser.get_default("handler")

    def handler(args: argparse.Namespace) -> int:
        if getattr(args, "repair", False):
            return cmd_check_repair(args)
        if plain is None:  # pragma: no cover - the lead wires check's handler first
            raise UsageError("check has no handler")
        return plain(args)

    parser.set_defaults(handler=handler)


# --- helpers -----------------------------------------------------------------------------


@asynccontextmanager
async def locked_world(path: Path, cfg: Config) -> AsyncIterator[BlobStore]:
    """The world's store, with its ``WorldLock`` held throughout.

    :raises WorldLocked: another process has the world open.
    """
    lock = WorldLock(path)
    await anyio.to_thread.run_sync(lock.acquire)
    try:
        async with await open_local_store(path, cfg) as store:
            yield store
    finally:
        await anyio.to_thread.run_sync(lock.release)


# --- region rebuild ---------------------------------------------------------------------

#: Chunk coordinates the runtime addresses in an unbounded world: ``-2**30 <= c < 2**30``
#: (``World._check_chunk``), so tiles stay within ``±2**36`` and every chunk and region
#: coordinate fits the int32 fields of the region format.
CHUNK_LIMIT = 1 << 30


def _region_addressable(region_size: int, rx: int, ry: int) -> bool:
    """Whether every chunk of region ``(rx, ry)`` is one the runtime can load."""
    return all(
        -CHUNK_LIMIT <= v * region_size and (v + 1) * region_size - 1 < CHUNK_LIMIT
        for v in (rx, ry)
    )


async def _verifies(store: BlobStore, rx: int, ry: int) -> IntegrityError | None:
    """The fault of the stored region file, or None when it verifies.

    :raises NotFound: the region has no file.
    """
    key = region_key(rx, ry)
    blob = await store.get(key)
    try:
        await anyio.to_thread.run_sync(lambda: decode_region(blob.data, rx=rx, ry=ry, path=key))
    except IntegrityError as exc:
        return exc
    return None


def cmd_region_rebuild(args: argparse.Namespace) -> int:
    cfg = load_settings(args)
    path = require_world_dir(args.path)
    rx, ry = args.rx, args.ry

    async def body() -> int:
        async with locked_world(path, cfg) as store:
            manifest = await read_manifest(store, where=str(path))
            span = manifest.region_size * CHUNK_SIZE
            if not region_in_bounds(manifest, rx, ry):
                raise UsageError(
                    f"region ({rx}, {ry}) is outside this world: it is bounded to |x|, |y| < "
                    f"{manifest.bound_tiles} tiles ({span} tiles per region)"
                )
            if not _region_addressable(manifest.region_size, rx, ry):
                limit = CHUNK_LIMIT // manifest.region_size
                raise UsageError(
                    f"region ({rx}, {ry}) is outside the addressable world: with "
                    f"{manifest.region_size}x{manifest.region_size}-chunk regions, region "
                    f"coordinates run from {-limit} to {limit - 1} (tiles |x|, |y| < 2**36)"
                )
            inactive = await load_inactive(store)
            if (rx, ry) not in inactive and not args.force:
                try:
                    fault = await _verifies(store, rx, ry)
                except NotFound:
                    pass
                else:
                    if fault is not None:
                        raise UsageError(
                            f"region ({rx}, {ry}) fails verification ({fault}) but is not "
                            f"isolated yet; run `streamer check {path} --repair` first: it "
                            "restores the region from a snapshot when one holds a valid copy "
                            "(keeping its state), else marks it inactive, and then this "
                            "command rebuilds it. Pass --force to rebuild it now, discarding "
                            "everything it holds"
                        )
                    raise UsageError(
                        f"region ({rx}, {ry}) is active and has stored state; rebuilding "
                        "discards its player edits, characters, structures and societies "
                        "(the file is kept in quarantine/). Pass --force to do it anyway"
                    )
            res = await rebuild_region(store, manifest, rx, ry, incidents=IncidentLog(store))
        print(
            f"rebuilt region ({rx}, {ry}): {res.npcs} default NPCs, {res.features} features "
            f"in {res.chunks} chunk(s); lastProcessedTick {res.last_processed_tick}"
        )
        if res.quarantine:
            print(f"previous file kept in {res.quarantine}")
        if res.players_removed:
            print(f"players to respawn at the spawn point: {', '.join(res.players_removed)}")
        print(
            ("region was inactive; now active" if res.was_inactive else "region is active")
            + f" (incident {res.incident})"
        )
        return EXIT_OK

    return run_async(body)


# --- regenerate -------------------------------------------------------------------------


def cmd_regenerate(args: argparse.Namespace) -> int:
    cfg = load_settings(args)
    path = require_world_dir(args.path)

    async def explain() -> int:
        async with await open_local_store(path, cfg) as store:
            m = await read_manifest(store, where=str(path))
            regions = len(await store.list("regions/"))
            journal = len(segment_keys(await store.list("journal/")))
            players = bool(await store.list("players.idx"))
            snaps = await list_snapshots(store)
        print(
            f"streamer regenerate: refusing without --yes. Regenerating {path} from seed "
            f"{m.seed} drops ALL dynamic state:\n"
            f"  {regions} region file(s): every player edit, character, structure, society "
            "and dynamic feature\n"
            f"  {journal} journal segment(s): deltas not yet folded into regions\n"
            f"  {'the player index (players.idx)' if players else 'no player index'}\n"
            "Terrain and default NPCs/features come back from the seed. A pre-regenerate "
            f"snapshot is taken first ({len(snaps)} snapshot(s) now, "
            f"{cfg.snapshots.keep} kept: the oldest may rotate away).\n"
            "Consider `streamer salvage` first. Re-run with --yes to proceed.",
            file=sys.stderr,
        )
        return EXIT_USAGE

    async def body() -> int:
        async with locked_world(path, cfg) as store:
            m = await read_manifest(store, where=str(path))
            res = await regenerate_world(
                store, m, incidents=IncidentLog(store), keep=cfg.snapshots.keep
            )
        print(f"world regenerated from seed {m.seed}")
        print(
            f"removed {res.regions_removed} region file(s), {res.journal_segments_removed} "
            f"journal segment(s), {res.players_removed} player index entr(y/ies); "
            f"{res.inactive_cleared} inactive region(s) cleared"
        )
        print(f"previous world: snapshot {res.snapshot} (`streamer restore` brings it back)")
        if res.quarantined:
            print(
                f"{len(res.quarantined)} damaged region file(s) could not go into the snapshot; "
                "kept in quarantine for `streamer salvage`:"
            )
        for key, q in sorted(res.quarantined.items()):
            print(f"  {key} -> {q}")
        print(f"incident {res.incident}; notify players")
        return EXIT_OK

    return run_async(body if args.yes else explain)


# --- salvage ----------------------------------------------------------------------------


def _expand(paths: list[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.exists():
            out.append(p)
        else:
            raise UsageError(f"{p}: no such file or directory")
    return out


def cmd_salvage(args: argparse.Namespace) -> int:
    files = _expand(args.files)
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    if (out / SALVAGE_NAME).exists():
        raise UsageError(f"--out {out}: already holds {SALVAGE_NAME}; choose another directory")

    async def body() -> int:
        try:
            report = await salvage_files(files, out)
        except FileExistsError as exc:
            raise UsageError(str(exc)) from None
        for f in report.files:
            if f.error:
                print(f"{f.file}: {f.error}")
            else:
                bad = f", {f.failed_chunks} undecodable" if f.failed_chunks else ""
                print(
                    f"{f.file}: {f.size} bytes, {f.chunks} intact chunk(s){bad}, "
                    f"{f.records} record(s)"
                )
        for fail in report.failures:
            if fail.chunk is not None:
                print(
                    f"warning: {fail.file} offset {fail.offset} chunk {fail.chunk}: {fail.error}",
                    file=sys.stderr,
                )
        types = ", ".join(f"{n} {t}" for t, n in sorted(report.by_type.items())) or "nothing"
        print(
            f"salvaged {report.records} record(s) ({types}) from {report.chunks} chunk(s) "
            f"into {report.out}"
        )
        return EXIT_OK if report.complete else EXIT_PROBLEMS

    return run_async(body)


# --- incidents --------------------------------------------------------------------------


def _format_record(details: dict[str, Any]) -> str | None:
    """The failing record of a ``migration_failed`` incident, as the migrate command prints it."""
    parts = []
    if details.get("chunk") is not None:
        cx, cy = details["chunk"]
        parts.append(f"chunk ({cx}, {cy})")
    for key, label in (
        ("record_id", "id"),
        ("record_type", "type"),
        ("schema_version", "schemaVersion"),
    ):
        if details.get(key) is not None:
            parts.append(f"{label}={details[key]}")
    return " ".join(parts) if parts else None


def _format_incident(inc: Incident) -> str:
    where = []
    if inc.region is not None:
        where.append(f"region ({inc.region[0]}, {inc.region[1]})")
    if inc.file:
        where.append(inc.file)
    head = f"{inc.time}  {inc.kind:<22} {'  '.join(where)}".rstrip()
    lines = [head, f"    id {inc.id}"]
    if inc.action:
        lines.append(f"    {inc.action}")
    record = _format_record(inc.details)
    if record is not None:
        lines.append(f"    record: {record}")
    if inc.details.get("error") is not None:
        kind = inc.details.get("error_type")
        lines.append(f"    error: {kind + ': ' if kind else ''}{inc.details['error']}")
    for key in ("lost", "snapshot", "quarantine", "snapshot_ids", "expected", "actual"):
        if key in inc.details and inc.details[key] is not None:
            lines.append(f"    {key}: {inc.details[key]}")
    return "\n".join(lines)


def cmd_incidents(args: argparse.Namespace) -> int:
    unknown = sorted(set(args.kind or ()) - KINDS)
    if unknown:
        # Else a typo filters everything out and reads as "no incidents".
        raise UsageError(
            f"--kind {', '.join(unknown)}: unknown incident kind; valid kinds: "
            f"{', '.join(sorted(KINDS))}"
        )
    cfg = load_settings(args)
    path = require_world_dir(args.path)

    async def body() -> int:
        async with await open_local_store(path, cfg) as store:
            scan = await IncidentLog(store).read()
        shown = [i for i in scan.incidents if not args.kind or i.kind in args.kind]
        torn = set(scan.torn_lines)
        for n in scan.damaged_lines:
            what = (
                "crash fragment (an append interrupted by a crash; never acknowledged)"
                if n in torn
                else "damaged: an acknowledged incident is unreadable"
            )
            print(f"warning: incidents.log line {n}: {what}", file=sys.stderr)
        if args.json:
            doc: dict[str, Any] = {
                "incidents": msgspec.to_builtins(shown),
                "damaged_lines": scan.damaged_lines,
                "torn_lines": scan.torn_lines,
                "lost_lines": scan.lost_lines,
            }
            print(json.dumps(doc, sort_keys=True))
        else:
            for inc in shown:
                print(_format_incident(inc))
            print(
                f"{len(shown)} incident(s)"
                + (f", {len(scan.lost_lines)} damaged line(s)" if scan.lost_lines else "")
            )
        return EXIT_PROBLEMS if scan.lost_lines else EXIT_OK

    return run_async(body)


# --- check --repair ---------------------------------------------------------------------


def _print_repair(report: RepairReport) -> None:
    for a in report.actions:
        print(f"{a.file}: {a.kind}: {a.fault}")
        verb = {
            "restored": "restored",
            "inactive": "isolated",
            "already_recovered": "already recovered",
            "rebuilt": "rebuilt",
            "not_repaired": "NOT REPAIRED",
        }[a.outcome]
        refs = f" (incidents {', '.join(a.incidents)})" if a.incidents else ""
        print(f"  -> {verb}: {a.detail}{refs}")
    for w in report.after.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for p in report.after.problems:
        print(f"still failing: {p.file}: {p.kind}: {p.fault}")
    fixed = sum(1 for a in report.actions if a.outcome != "not_repaired")
    status = "healthy" if report.after.healthy else f"{len(report.after.problems)} problem(s)"
    print(
        f"found {len(report.before.problems)} problem(s); repaired or isolated {fixed}; "
        f"re-check of {report.after.files_checked} files "
        f"({report.after.regions_checked} regions): {status}"
    )


def cmd_check_repair(args: argparse.Namespace) -> int:
    """``check PATH --repair`` (``--json`` prints the whole repair report)."""
    cfg = load_settings(args)
    path = require_world_dir(args.path)
    note_settings(args, "check")

    async def body() -> int:
        async with locked_world(path, cfg) as store:
            report = await repair_world(store, where=str(path), extra=world_checks(cfg))
        if getattr(args, "json", False):
            out = msgspec.to_builtins(report)
            out["ok"] = report.ok
            print(json.dumps(out, sort_keys=True))
        else:
            _print_repair(report)
        return EXIT_OK if report.ok else EXIT_PROBLEMS

    return run_async(body)
