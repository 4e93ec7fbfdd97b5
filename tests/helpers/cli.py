"""Shared checks for the diagnostics' command lines."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest


def assert_refused(
    main: Callable[[Sequence[str]], int],
    argv: list[str],
    needle: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``main(argv)`` exits with argparse's usage error (2), naming ``needle`` on stderr."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert needle in capsys.readouterr().err
