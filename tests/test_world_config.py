from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from streamer import open_world
from streamer.config import Config, StorageSettings
from streamer.errors import ConfigError
from streamer.storage.local import LocalStore
from streamer.worlddir import create_world


async def test_open_world_refuses_a_backend_it_cannot_serve(tmp_path: Path) -> None:
    async with await LocalStore.open(tmp_path) as store:
        await create_world(store, seed=1)
    for backend in ("memory", "s3"):
        cfg = msgspec.structs.replace(Config(), storage=StorageSettings(backend=backend))
        with pytest.raises(ConfigError) as info:
            async with open_world(tmp_path, cfg):
                pass
        assert info.value.key == "storage.backend"
        assert backend in str(info.value)
    assert not (tmp_path / "journal").exists() or not any((tmp_path / "journal").iterdir())


async def test_open_world_refuses_while_a_batch_migration_is_interrupted(tmp_path: Path) -> None:
    """Edits served now would be rolled back if the resumed batch fails: finish it first."""
    from streamer.migrate.batch import CHECKPOINT_KEY, MigrationInProgress

    async with await LocalStore.open(tmp_path) as store:
        await create_world(store, seed=1)
        await store.put_atomic(CHECKPOINT_KEY, b"{}")
    with pytest.raises(MigrationInProgress, match="--resume"):
        async with open_world(tmp_path):
            pass
    async with await LocalStore.open(tmp_path) as store:
        await store.delete(CHECKPOINT_KEY)
    async with open_world(tmp_path) as world:
        assert not world.closed
