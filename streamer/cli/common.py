"""Helpers shared by CLI commands."""

from __future__ import annotations

import argparse
from pathlib import Path

from streamer.cli.main import UsageError
from streamer.config import Config, default_config_path, load_config
from streamer.recovery.check import ExtraCheck
from streamer.recovery.inactive import check_inactive
from streamer.recovery.incidents import check_incident_log
from streamer.recovery.snapshots import snapshot_check
from streamer.storage.base import BlobStore
from streamer.storage.local import LocalStore


def load_settings(args: argparse.Namespace) -> Config:
    path = args.config if args.config else default_config_path()
    return load_config(path)


def require_world_dir(path: Path) -> Path:
    """A path given to a command that reads a world must be an existing directory."""
    if not path.exists():
        raise UsageError(f"{path}: no such directory")
    if not path.is_dir():
        raise UsageError(f"{path}: not a directory")
    if not (path / "world.json").exists():
        raise UsageError(f"{path}: not a streamer world (no world.json); see `streamer init`")
    return path


async def open_local_store(path: Path, cfg: Config) -> BlobStore:
    return await LocalStore.open(path, fsync=cfg.storage.fsync)


def world_checks(cfg: Config) -> list[ExtraCheck]:
    """Verifiers `check` runs beyond regions and journal: snapshots, incident log, inactive list."""
    return [snapshot_check(cfg.snapshots.min_valid), check_incident_log, check_inactive]
