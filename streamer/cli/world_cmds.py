"""`streamer init | info | check`: create, describe and verify a world."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from streamer.cli.common import (
    load_settings,
    note_settings,
    open_local_store,
    require_world_dir,
    world_checks,
)
from streamer.cli.main import EXIT_OK, EXIT_PROBLEMS, UsageError, run_async
from streamer.cli.recovery_cmds import add_repair_option
from streamer.errors import WorldExists
from streamer.format.manifest import WorldManifest
from streamer.recovery.check import check_world
from streamer.worlddir import create_world, read_manifest


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("init", help="create a new world (refuses to overwrite one)")
    p.add_argument("path", type=Path)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--region-size", type=int, default=None, help="chunks per region side")
    p.add_argument("--encoding", choices=["msgpack", "json"], default=None)
    p.set_defaults(handler=cmd_init)

    p = sub.add_parser("info", help="describe a world")
    p.add_argument("path", type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_info)

    p = sub.add_parser("check", help="verify every file; exit 0 healthy, 1 problems, 2 usage")
    p.add_argument("path", type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_check)
    add_repair_option(p)


def cmd_init(args: argparse.Namespace) -> int:
    cfg = load_settings(args)
    region_size = args.region_size if args.region_size is not None else cfg.world.region_size
    if not 1 <= region_size <= 64:
        raise UsageError(f"--region-size must be between 1 and 64, got {region_size}")
    encoding = args.encoding or cfg.world.encoding
    path: Path = args.path
    if path.exists() and not path.is_dir():
        raise UsageError(f"{path}: exists and is not a directory")
    if path.is_dir() and (path / "world.json").exists():
        raise WorldExists("a world already exists here; refusing to overwrite it", path=str(path))
    if path.is_dir() and any(path.iterdir()):
        raise UsageError(f"{path}: directory is not empty and holds no world; refusing to use it")
    note_settings(args, "init")

    async def body() -> int:
        path.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - CLI startup, loop idle
        async with await open_local_store(path, cfg) as store:
            m = await create_world(
                store,
                seed=args.seed,
                region_size=region_size,
                encoding=encoding,
                bound_tiles=cfg.world.bound_tiles,
                where=str(path),
            )
        print(
            f"created world {m.world_id} at {path} (seed {m.seed}, "
            f"region {m.region_size}x{m.region_size} chunks, {m.encoding})"
        )
        return EXIT_OK

    return run_async(body)


def manifest_summary(path: Path, m: WorldManifest, regions: int) -> dict[str, Any]:
    return {
        "path": str(path),
        "world_id": m.world_id,
        "seed": m.seed,
        "generator": f"{m.generator} v{m.generator_version}",
        "generator_params": m.generator_params,
        "chunk_size": m.chunk_size,
        "region_size": m.region_size,
        "encoding": m.encoding,
        "format_version": m.format_version,
        "record_versions": m.record_versions,
        "bound_tiles": m.bound_tiles,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(m.created_at)),
        "regions_stored": regions,
    }


def print_summary(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, sort_keys=True))
        return
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        print(f"{key.ljust(width)}  {value}")


def cmd_info(args: argparse.Namespace) -> int:
    cfg = load_settings(args)
    path = require_world_dir(args.path)

    async def body() -> int:
        async with await open_local_store(path, cfg) as store:
            m = await read_manifest(store, where=str(path))
            regions = len(await store.list("regions/"))
        print_summary(manifest_summary(path, m, regions), args.json)
        return EXIT_OK

    return run_async(body)


def cmd_check(args: argparse.Namespace) -> int:
    cfg = load_settings(args)
    path = require_world_dir(args.path)
    note_settings(args, "check")

    async def body() -> int:
        async with await open_local_store(path, cfg) as store:
            report = await check_world(
                store,
                where=str(path),
                extra=world_checks(cfg),
                journal_preallocated=cfg.runtime.journal_preallocate,
            )
        if args.json:
            out = msgspec.to_builtins(report)
            out["healthy"] = report.healthy
            print(json.dumps(out, sort_keys=True))
        else:
            for w in report.warnings:
                print(f"warning: {w}", file=sys.stderr)
            for p in report.problems:
                print(f"{p.file}: {p.kind}: {p.fault}")
            status = "healthy" if report.healthy else f"{len(report.problems)} problem(s)"
            print(
                f"checked {report.files_checked} files ({report.regions_checked} regions): {status}"
            )
        return EXIT_OK if report.healthy else EXIT_PROBLEMS

    return run_async(body)
