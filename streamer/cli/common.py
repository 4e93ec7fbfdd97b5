"""Helpers shared by CLI commands."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import msgspec

from streamer.cli.main import UsageError
from streamer.config import Config, default_config_path, load_config
from streamer.recovery.check import ExtraCheck
from streamer.recovery.inactive import check_inactive
from streamer.recovery.incidents import check_incident_log
from streamer.recovery.snapshots import snapshot_check
from streamer.storage.base import BlobStore
from streamer.storage.local import LocalStore


def _settings_path(args: argparse.Namespace) -> str | os.PathLike[str] | None:
    path: str | os.PathLike[str] | None = args.config if args.config else default_config_path()
    return path


def load_settings(args: argparse.Namespace) -> Config:
    """The settings for this run: ``--config``, else ``$STREAMER_CONFIG``, else
    ``./config/streamer.toml`` if present, else built-in defaults; ``STREAMER_*`` on top."""
    return load_config(_settings_path(args))


def note_settings(args: argparse.Namespace, command: str) -> None:
    """Say on stderr which settings :func:`load_settings` used, once the arguments are valid.

    The search depends on the working directory, so the same command run from cron or from
    another directory can silently fall back to defaults (another ``snapshots.keep``, say).
    For commands whose outcome depends on settings; stdout stays clean for ``--json``.
    """
    print(f"streamer {command}: {_settings_source(_settings_path(args))}", file=sys.stderr)


def _settings_source(path: str | os.PathLike[str] | None) -> str:
    if path is None:
        source = (
            "using built-in default settings (no --config, no $STREAMER_CONFIG, "
            "no ./config/streamer.toml)"
        )
    else:
        source = f"using settings from {Path(path).resolve()}"
    sections = tuple(f"STREAMER_{f.name.upper()}_" for f in msgspec.structs.fields(Config))
    overrides = sorted(
        name
        for name in os.environ
        if name.startswith("STREAMER_") and name.upper().startswith(sections)
    )
    if overrides:
        source += f", overridden by {', '.join(overrides)}"
    return source


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
