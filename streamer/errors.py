"""The one error tree of streamer.

Outside exceptions (``OSError``, S3 client errors, ``msgspec.ValidationError``) are translated
into these at the storage and format boundary, never deeper. Every error names what it is
about: a path or key, a region, a record id.

::

    StreamerError
    ├── ConfigError                 bad TOML, unknown key, wrong type, out-of-range value
    ├── WorldError
    │   ├── WorldNotFound           no world.json at the path
    │   ├── WorldExists             `init` refuses to overwrite
    │   ├── WorldLocked             another process has the world open
    │   ├── UnsupportedFormat       written by a newer (or unknown) format version
    │   └── WorldClosed             API used after the world was closed
    ├── StorageError
    │   ├── NotFound                key does not exist
    │   ├── PreconditionFailed      put-if-match lost the compare-and-swap
    │   ├── StorageUnavailable      I/O error (EIO, ENOSPC, network); nothing was acknowledged
    │   └── InvalidKey              key escapes the store root or is malformed
    ├── IntegrityError              a checksum or length does not match
    │   ├── ChecksumMismatch        carries expected and actual checksum
    │   ├── TruncatedFile           file shorter (or longer) than its trailer says
    │   └── MalformedFile           structure unparseable (bad magic, bad header)
    ├── SchemaError
    │   ├── UnknownSchemaVersion    record newer than this code knows: never downgraded
    │   ├── MigrationFailed         a migration step raised; carries record id, type, version
    │   └── MigrationRegistryError  a gap or duplicate in the migration chain (import time)
    ├── DeltaError                  malformed delta, tick already processed, out of bounds
    │   └── TickAlreadyProcessed
    ├── RegionInactive              region marked inactive after unrecoverable corruption
    ├── SnapshotError               unknown snapshot id, snapshot failed verification
    │   └── UnknownSnapshot         no complete snapshot has that id (lists the ones there are)
    └── ProtocolError
        └── FrameTooLarge
"""

from __future__ import annotations


class StreamerError(Exception):
    """Base of every error streamer raises on purpose."""


class ConfigError(StreamerError):
    """Configuration is invalid. The message names the file, the key path and what was expected."""

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None) -> None:
        where = ""
        if path is not None:
            where = f"{path}: "
        if key is not None:
            where += f"{key}: "
        super().__init__(f"{where}{message}")
        self.path = path
        self.key = key


class WorldError(StreamerError):
    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(f"{path}: {message}" if path is not None else message)
        self.path = path


class WorldNotFound(WorldError):
    pass


class WorldExists(WorldError):
    pass


class WorldLocked(WorldError):
    pass


class UnsupportedFormat(WorldError):
    pass


class WorldClosed(WorldError):
    pass


class StorageError(StreamerError):
    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(f"{key}: {message}" if key is not None else message)
        self.key = key


class NotFound(StorageError):
    pass


class PreconditionFailed(StorageError):
    pass


class StorageUnavailable(StorageError):
    pass


class InvalidKey(StorageError):
    pass


class IntegrityError(StreamerError):
    """Stored bytes do not match their checksum or declared structure."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        expected: str | None = None,
        actual: str | None = None,
        region: tuple[int, int] | None = None,
    ) -> None:
        parts = [f"{path}: " if path is not None else "", message]
        if expected is not None or actual is not None:
            parts.append(f" (expected {expected}, actual {actual})")
        super().__init__("".join(parts))
        self.path = path
        self.expected = expected
        self.actual = actual
        self.region = region


class ChecksumMismatch(IntegrityError):
    pass


class TruncatedFile(IntegrityError):
    pass


class MalformedFile(IntegrityError):
    pass


class SchemaError(StreamerError):
    def __init__(
        self,
        message: str,
        *,
        record_type: str | None = None,
        record_id: str | None = None,
        schema_version: int | None = None,
        where: str | None = None,
    ) -> None:
        ctx = []
        if where is not None:
            ctx.append(where)
        if record_type is not None:
            ctx.append(f"type={record_type}")
        if record_id is not None:
            ctx.append(f"id={record_id}")
        if schema_version is not None:
            ctx.append(f"schemaVersion={schema_version}")
        super().__init__(f"{message} [{' '.join(ctx)}]" if ctx else message)
        self.record_type = record_type
        self.record_id = record_id
        self.schema_version = schema_version
        self.where = where


class UnknownSchemaVersion(SchemaError):
    pass


class MigrationFailed(SchemaError):
    pass


class MigrationRegistryError(SchemaError):
    pass


class DeltaError(StreamerError):
    pass


class TickAlreadyProcessed(DeltaError):
    pass


class RegionInactive(StreamerError):
    def __init__(self, rx: int, ry: int, reason: str = "") -> None:
        msg = f"region ({rx}, {ry}) is inactive"
        super().__init__(f"{msg}: {reason}" if reason else msg)
        self.region = (rx, ry)
        self.reason = reason


class SnapshotError(StreamerError):
    pass


class ProtocolError(StreamerError):
    pass


class FrameTooLarge(ProtocolError):
    pass


class UnknownSnapshot(SnapshotError):
    """No complete snapshot has this id; ``available`` lists the ids that do exist."""

    def __init__(self, snapshot_id: str, available: list[str]) -> None:
        listing = ", ".join(available) if available else "none"
        super().__init__(f"no snapshot {snapshot_id!r} (available: {listing})")
        self.snapshot_id = snapshot_id
        self.available = available
