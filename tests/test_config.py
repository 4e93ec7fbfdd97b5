from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from streamer.config import Config, load_config
from streamer.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "streamer.toml"
    p.write_text(text)
    return p


def test_shipped_config_is_the_defaults_and_documents_every_key() -> None:
    shipped = ROOT / "config" / "streamer.toml"
    assert load_config(shipped, env={}) == Config()
    text = shipped.read_text()
    for section in msgspec.structs.fields(Config):
        assert f"[{section.name}]" in text
        for field in msgspec.structs.fields(section.type):
            assert f"\n{field.name} = " in text, f"{section.name}.{field.name} undocumented"


@pytest.mark.parametrize(
    ("text", "key", "needle"),
    [
        ("[runtime]\ncache_byts = 5\n", "runtime.cache_byts", "unknown key"),
        ("[bogus]\nx = 1\n", "bogus", "unknown key"),
        ("[runtime]\ncache_bytes = 'big'\n", "runtime.cache_bytes", "Expected `int`"),
        ("[runtime]\ncache_bytes = 0\n", "runtime.cache_bytes", ">= 1"),
        ("[runtime]\ndurability = 'maybe'\n", "runtime.durability", "Invalid enum value"),
        ("[world]\nregion_size = 65\n", "world.region_size", "<= 64"),
        ("[storage]\nfsync = 1\n", "storage.fsync", "Expected `bool`"),
    ],
)
def test_bad_config_names_file_key_and_expectation(
    tmp_path: Path, text: str, key: str, needle: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    msg = str(info.value)
    assert str(path) in msg
    assert f"{key}:" in msg
    assert needle in msg
    assert info.value.key == key


def test_toml_syntax_error_names_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[runtime\n")
    with pytest.raises(ConfigError, match="invalid TOML") as info:
        load_config(path, env={})
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.toml", env={})


def test_environment_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "[runtime]\ncache_bytes = 1000\n")
    cfg = load_config(
        path,
        env={
            "STREAMER_RUNTIME_CACHE_BYTES": "2048",
            "STREAMER_RUNTIME_DURABILITY": "interval",
            "STREAMER_STORAGE_FSYNC": "false",
            "UNRELATED": "x",
            # Ours, but not settings: the benchmarks' directory, the S3 tests' server binary.
            "STREAMER_BENCH_DIR": "/tmp/bench",
            "STREAMER_WEED": "/usr/bin/weed",
        },
    )
    assert cfg.runtime.cache_bytes == 2048
    assert cfg.runtime.durability == "interval"
    assert cfg.storage.fsync is False


def test_bad_environment_override_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, env={"STREAMER_RUNTIME_CACHE_BYTES": "-3"})
    assert "environment" in str(info.value)
    assert info.value.key == "runtime.cache_bytes"
    with pytest.raises(ConfigError, match="STREAMER_NOSUCH_KEY"):
        load_config(None, env={"STREAMER_NOSUCH_KEY": "1"})
