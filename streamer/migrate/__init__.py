"""Batch schema migration of a stored world (``streamer migrate``); see ``docs/migrations.md``."""

from __future__ import annotations

from streamer.migrate.batch import (
    BOOKKEEPING_DIRS,
    BOOKKEEPING_FILES,
    CHECKPOINT_KEY,
    Checkpoint,
    CheckpointError,
    LiveHooks,
    MigrationInProgress,
    MigrationProgress,
    MigrationReport,
    NoCheckpoint,
    RecordFailure,
    RecoverySnapshots,
    RollbackFailed,
    SnapshotOps,
    is_bookkeeping,
    migrate_world,
    read_checkpoint,
)

__all__ = [
    "BOOKKEEPING_DIRS",
    "BOOKKEEPING_FILES",
    "CHECKPOINT_KEY",
    "Checkpoint",
    "CheckpointError",
    "LiveHooks",
    "MigrationInProgress",
    "MigrationProgress",
    "MigrationReport",
    "NoCheckpoint",
    "RecordFailure",
    "RecoverySnapshots",
    "RollbackFailed",
    "SnapshotOps",
    "is_bookkeeping",
    "migrate_world",
    "read_checkpoint",
]
