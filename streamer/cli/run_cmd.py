"""`streamer run`: the main job on the embedded local store (what ./scripts/run starts)."""

from __future__ import annotations

import argparse
from pathlib import Path

from streamer.cli.common import load_settings, open_local_store
from streamer.cli.main import EXIT_OK, run_async
from streamer.cli.world_cmds import manifest_summary, print_summary
from streamer.errors import WorldNotFound
from streamer.worlddir import create_world, read_manifest


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="main job: create the configured world if absent and serve it")
    p.add_argument(
        "--path", type=Path, default=None, help="world directory (default: [world].path)"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_settings(args)
    path: Path = args.path if args.path is not None else Path(cfg.world.path)

    async def body() -> int:
        path.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - CLI startup, loop idle
        async with await open_local_store(path, cfg) as store:
            try:
                m = await read_manifest(store, where=str(path))
                created = False
            except WorldNotFound:
                m = await create_world(
                    store,
                    seed=cfg.world.seed,
                    region_size=cfg.world.region_size,
                    encoding=cfg.world.encoding,
                    bound_tiles=cfg.world.bound_tiles,
                    where=str(path),
                )
                created = True
            regions = len(await store.list("regions/"))
        if not args.json:
            print(f"{'created' if created else 'opened'} world at {path}")
        print_summary(manifest_summary(path, m, regions), args.json)
        return EXIT_OK

    return run_async(body)
