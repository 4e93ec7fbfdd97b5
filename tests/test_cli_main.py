"""CLI entry point: --debug in either position, one-line OS errors, which settings were used,
and ``python -m streamer``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_cli_world import run


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # No ambient settings: the working directory holds no config/streamer.toml.
    monkeypatch.delenv("STREAMER_CONFIG", raising=False)
    for name in list(os.environ):
        if name.startswith("STREAMER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


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
    assert err.splitlines() == [
        "streamer init: using built-in default settings (no --config, no $STREAMER_CONFIG, "
        "no ./config/streamer.toml)",
        f"streamer init: error: {not_a_dir}/w: Not a directory",
    ]


def test_salvage_out_under_a_file_is_one_line(
    world: Path, not_a_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "salvage", str(world), "--out", str(not_a_dir / "out"))
    assert code == 1
    assert "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if "error" in ln]
    assert line.startswith("streamer salvage: error: ") and str(not_a_dir) in line
    assert "Not a directory" in line


# --- which settings -------------------------------------------------------------------------


def test_check_says_it_uses_built_in_defaults(
    world: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "check", str(world), "--json")
    assert code in (0, 1)
    json.loads(out)  # the note stays off stdout
    assert err.splitlines()[0] == (
        "streamer check: using built-in default settings (no --config, no $STREAMER_CONFIG, "
        "no ./config/streamer.toml)"
    )


def test_check_names_the_settings_file_and_overrides(
    world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "streamer.toml").write_text("[snapshots]\nmin_valid = 0\n")
    monkeypatch.setenv("STREAMER_SNAPSHOTS_KEEP", "3")
    code, _, err = run(capsys, "check", str(world))
    assert code == 0, err
    assert err.splitlines()[0] == (
        f"streamer check: using settings from {tmp_path / 'config' / 'streamer.toml'}, "
        "overridden by STREAMER_SNAPSHOTS_KEEP"
    )
    other = tmp_path / "other.toml"
    other.write_text("")
    code, _, err = run(capsys, "--config", str(other), "check", str(world), "--repair")
    assert err.startswith(f"streamer check: using settings from {other}, overridden by ")


def test_read_only_commands_stay_quiet_about_settings(
    world: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in (["info", str(world)], ["incidents", str(world)], ["snapshots", str(world)]):
        _, _, err = run(capsys, *argv)
        assert "settings" not in err, argv


# --- python -m streamer ---------------------------------------------------------------------


def test_python_dash_m_streamer(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "streamer", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: streamer ")
    proc = subprocess.run(
        [sys.executable, "-m", "streamer", "info", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and "no such directory" in proc.stderr


def test_streamer_debug_in_the_environment_shows_the_traceback(
    not_a_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STREAMER_DEBUG", "1")
    code, _, err = run(capsys, "init", str(not_a_dir / "w"), "--seed", "1")
    assert code == 1 and "Traceback" in err
    for off in ("0", "false", "No"):
        monkeypatch.setenv("STREAMER_DEBUG", off)
        code, _, err = run(capsys, "init", str(not_a_dir / "w"), "--seed", "1")
        assert code == 1 and "Traceback" not in err, off


def test_an_interrupted_migrate_says_how_to_go_on(
    world: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import streamer.cli.migrate_cmd as migrate_cmd

    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(migrate_cmd, "cmd_migrate", interrupted)
    code, _, err = run(capsys, "migrate", str(world))
    assert code == 130
    assert "interrupted" in err and "--resume" in err
    code, _, err = run(capsys, "migrate", str(world), "--dry-run")
    assert code == 130 and "--resume" not in err  # a dry run cannot be resumed
    code, _, err = run(capsys, "check", str(world))
    assert code == 0


def test_the_standalone_migrate_command_handles_errors_as_streamer_does(
    world: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``python -m streamer.cli.migrate_cmd`` shares ``streamer``'s error handling (it had
    its own copy, which lacked the interrupted hint and ``--debug``)."""
    import streamer.cli.migrate_cmd as migrate_cmd

    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(migrate_cmd, "cmd_migrate", interrupted)
    assert migrate_cmd.main([str(world)]) == 130
    assert "--resume" in capsys.readouterr().err

    def denied(args: object) -> int:
        raise PermissionError(13, "Permission denied", "/srv/w/state")

    monkeypatch.setattr(migrate_cmd, "cmd_migrate", denied)
    assert migrate_cmd.main([str(world), "--debug"]) == 1
    err = capsys.readouterr().err
    assert "streamer migrate: error: /srv/w/state: Permission denied" in err
    assert "Traceback" in err  # --debug
