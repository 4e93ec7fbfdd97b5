"""CLI entry point: --debug in either position, one-line OS errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from streamer.cli.main import main


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # No ambient settings: the working directory holds no config/streamer.toml.
    monkeypatch.delenv("STREAMER_CONFIG", raising=False)
    for name in list(os.environ):
        if name.startswith("STREAMER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def world(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    path = tmp_path / "w"
    code, _, err = run(capsys, "init", str(path), "--seed", "7", "--region-size", "2")
    assert code == 0, err
    return path


@pytest.fixture
def not_a_dir(tmp_path: Path) -> Path:
    """A regular file used as a parent directory: creating anything under it fails with
    ENOTDIR, even for root (who ignores permission bits)."""
    f = tmp_path / "plain-file"
    f.write_text("")
    return f


# --- --debug --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--debug", "init", "{parent}/w", "--seed", "1"],
        ["init", "{parent}/w", "--seed", "1", "--debug"],
    ],
    ids=["before-command", "after-command"],
)
def test_debug_before_or_after_the_command_shows_the_traceback(
    not_a_dir: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    code, _, err = run(capsys, *(a.format(parent=not_a_dir) for a in argv))
    assert code == 1
    assert "Traceback" in err and "NotADirectoryError" in err
    assert err.rstrip().splitlines()[-1] == f"streamer init: error: {not_a_dir}/w: Not a directory"


def test_debug_after_a_nested_command(world: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "region", "rebuild", str(world), "0", "0", "--debug")
    assert code == 0, err


def test_debug_before_the_command_survives_the_subcommand_parser(
    world: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The subcommand's own --debug defaults to "not given", not False.
    import streamer.cli.main as cli_main

    args = cli_main._build_parser().parse_args(["--debug", "check", str(world)])
    assert args.debug is True
    args = cli_main._build_parser().parse_args(["check", str(world)])
    assert args.debug is False


# --- OS errors ------------------------------------------------------------------------------


def test_init_under_a_file_is_one_line(not_a_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "init", str(not_a_dir / "w"), "--seed", "1")
    assert code == 1 and out == ""
    assert err == f"streamer init: error: {not_a_dir}/w: Not a directory\n"


def test_salvage_out_under_a_file_is_one_line(
    world: Path, not_a_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "salvage", str(world), "--out", str(not_a_dir / "out"))
    assert code == 1
    assert "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if "error" in ln]
    assert line.startswith("streamer salvage: error: ") and str(not_a_dir) in line
    assert "Not a directory" in line
