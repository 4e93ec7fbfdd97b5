"""Checking that bad values of one runtime setting are refused with a clear ConfigError."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest

from streamer.config import load_config
from streamer.errors import ConfigError


def assert_runtime_setting_refused(
    tmp_path: Path, name: str, cases: Iterable[tuple[str, str]]
) -> Path:
    """Each ``(toml value, expected text)`` in ``cases`` is refused naming ``runtime.<name>``.

    Returns the config file's path, for the caller's checks of good values.
    """
    path = tmp_path / "streamer.toml"
    for bad, needle in cases:
        path.write_text(f"[runtime]\n{name} = {bad}\n")
        with pytest.raises(ConfigError) as info:
            load_config(path, env={})
        assert info.value.key == f"runtime.{name}", info.value
        assert needle in str(info.value)
    return path
