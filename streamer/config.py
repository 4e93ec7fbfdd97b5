"""Settings: TOML decoded and validated by msgspec, overridable from the environment.

Every setting is documented in ``config/streamer.toml``. An unknown key, a wrong type or an
out-of-range value raises ``ConfigError`` naming the file, the key path and what was expected.
``STREAMER_<SECTION>_<KEY>`` overrides one setting (``STREAMER_RUNTIME_CACHE_BYTES=1000000``);
the value is parsed as TOML when it can be (numbers, booleans) and taken as a string otherwise.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec

from streamer.errors import ConfigError

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class WorldSettings(_Section):
    #: World directory used by `streamer run` / `scripts/run` (relative to the working dir).
    path: str = "var/world"
    seed: int = 20261126
    region_size: Annotated[int, msgspec.Meta(ge=1, le=64)] = 8
    encoding: Literal["msgpack", "json"] = "msgpack"
    #: Half-width of the world in tiles; 0 means unbounded (limited only by int32 coordinates).
    bound_tiles: NonNegInt = 0


class StorageSettings(_Section):
    backend: Literal["local", "memory", "s3"] = "local"
    #: fsync data and directories. Turning it off is for throwaway load tests only.
    fsync: bool = True
    #: Worker threads doing blocking file I/O.
    io_threads: Annotated[int, msgspec.Meta(ge=1, le=256)] = 8
    s3_endpoint: str = ""
    s3_bucket: str = ""
    s3_prefix: str = ""
    s3_region: str = "us-east-1"


class RuntimeSettings(_Section):
    #: Chunk cache budget in bytes (tiles + records). Pinned and dirty chunks may exceed it.
    cache_bytes: PositiveInt = 256 * 1024 * 1024
    #: Chunks within this Chebyshev radius of a player are loaded and pinned.
    view_radius: Annotated[int, msgspec.Meta(ge=0, le=64)] = 4
    #: A chunk is released only once it is this many chunks beyond the view radius.
    hysteresis: Annotated[int, msgspec.Meta(ge=0, le=16)] = 1
    load_workers: Annotated[int, msgspec.Meta(ge=1, le=256)] = 4
    #: Worker processes generating terrain for chunk loads, off this process's GIL. "auto":
    #: one if the machine has two or more cores, else none; 0: terrain in threads only.
    terrain_processes: Annotated[int, msgspec.Meta(ge=0, le=64)] | Literal["auto"] = "auto"
    #: Dirty regions being folded and written at once, across every flush of the world
    #: (the timer's, ``flush()``, live migration's), in batches of up to 16.
    flush_concurrency: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 16
    #: A dirty region is folded into its file at most this long after its first delta.
    flush_interval_ms: PositiveInt = 1000
    #: Deltas waiting in one region's queue before submit() blocks (back-pressure).
    queue_max_deltas: PositiveInt = 100_000
    #: "sync": submit() returns after the journal fsync; "interval": fsync every N ms.
    durability: Literal["sync", "interval"] = "sync"
    fsync_interval_ms: PositiveInt = 10
    journal_segment_bytes: Annotated[int, msgspec.Meta(ge=4096)] = 64 * 1024 * 1024
    #: Make each journal segment from a zero-filled spare, prepared in the background, so
    #: a commit's sync writes data in place and skips the file system's journal. Off by
    #: default: see docs/deviations.md (a power loss can persist one commit's pages out of
    #: order, which open then takes for lost acknowledged data).
    journal_preallocate: bool = False
    #: Write and sync commits to an open journal segment in a small process of the
    #: journal's own (runtime/sync_process.py), off this process's GIL: a commit's system
    #: calls then never wait for the event loop to let go of it. Linux, asyncio, fsync on;
    #: elsewhere, or if the process is lost, commits go through the journal's thread.
    journal_sync_process: bool = True


class SnapshotSettings(_Section):
    keep: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 5
    #: `check` and the scrubber warn when fewer valid snapshots exist.
    min_valid: NonNegInt = 1
    #: Seconds between automatic snapshots by the runtime; 0 disables them.
    interval_s: NonNegFloat = 0.0


class ScrubSettings(_Section):
    #: Seconds between full scrubs of every region when idle; 0 disables the scrubber.
    interval_s: NonNegFloat = 3600.0
    #: Upper bound on regions verified per second, so live loads keep priority.
    regions_per_s: Annotated[float, msgspec.Meta(gt=0)] = 50.0
    #: Optional command run on an alert, with the alert as JSON on stdin.
    alert_command: str = ""


class MigrationSettings(_Section):
    jobs: Annotated[int, msgspec.Meta(ge=1, le=256)] = 2


class Config(_Section):
    world: WorldSettings = msgspec.field(default_factory=WorldSettings)
    storage: StorageSettings = msgspec.field(default_factory=StorageSettings)
    runtime: RuntimeSettings = msgspec.field(default_factory=RuntimeSettings)
    snapshots: SnapshotSettings = msgspec.field(default_factory=SnapshotSettings)
    scrub: ScrubSettings = msgspec.field(default_factory=ScrubSettings)
    migration: MigrationSettings = msgspec.field(default_factory=MigrationSettings)


_SECTIONS = {f.name: f.type for f in msgspec.structs.fields(Config)}
_PATH_RE = re.compile(r"at `\$((?:\.\w+|\[\d+\])*)`")


def _from_mapping(data: Mapping[str, Any], source: str) -> Config:
    try:
        return msgspec.convert(data, Config, strict=True)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        match = _PATH_RE.search(msg)
        key = match.group(1).lstrip(".") if match else None
        detail = _PATH_RE.sub("", msg).strip().rstrip("-").strip()
        unknown = re.search(r"unknown field `([^`]+)`", msg)
        if unknown:
            key = f"{key}.{unknown.group(1)}" if key else unknown.group(1)
            detail = "unknown key (check the spelling against config/streamer.toml)"
        raise ConfigError(detail, path=source, key=key) from None


#: ``STREAMER_*`` variables that are not settings: the config file's path, the CLI's
#: tracebacks, and the benchmarks' and the S3 tests' own switches. Any other name must be a
#: setting, so a misspelt override fails loudly instead of being ignored.
_NOT_SETTINGS: Final = frozenset({"config", "debug", "bench_dir", "weed"})


def _env_overrides(env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, raw in env.items():
        if not name.startswith("STREAMER_"):
            continue
        rest = name[len("STREAMER_") :].lower()
        section = next((s for s in _SECTIONS if rest.startswith(s + "_")), None)
        if section is None:
            if rest in _NOT_SETTINGS:
                continue
            raise ConfigError(
                f"environment override names no section (expected one of {sorted(_SECTIONS)})",
                path="environment",
                key=name,
            )
        key = rest[len(section) + 1 :]
        try:
            value: Any = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out.setdefault(section, {})[key] = value
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in over.items():
        current = merged.get(section)
        if current is None:
            merged[section] = dict(values)
        elif isinstance(current, dict):
            current.update(values)
    return merged


def load_config(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Config:
    """Load settings from ``path`` (TOML) with environment overrides applied on top.

    ``path=None`` uses only defaults and the environment.

    :raises ConfigError: unreadable file, TOML syntax error, unknown key, wrong type, or an
        out-of-range value; the message names the file and the key path.
    """
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file: {exc.strerror}", path=source) from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"invalid TOML: {exc}", path=source) from None
    overrides = _env_overrides(env)
    if overrides:
        _from_mapping(_merge(data, {}), source)  # the file's own errors name the file
        data = _merge(data, overrides)
        source = f"{source} + environment"
    return _from_mapping(data, source)


def default_config_path() -> Path | None:
    """``$STREAMER_CONFIG`` if set, else ``config/streamer.toml`` in the working dir if present."""
    explicit = os.environ.get("STREAMER_CONFIG")
    if explicit:
        return Path(explicit)
    candidate = Path("config/streamer.toml")
    return candidate if candidate.is_file() else None
