from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from streamer.cli.main import main
from streamer.format.manifest import decode_manifest, encode_manifest


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def world(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    path = tmp_path / "w"
    code, out, _ = run(capsys, "init", str(path), "--seed", "7", "--region-size", "4")
    assert code == 0, out
    return path


def test_init_info_check_happy_path(world: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "info", str(world), "--json")
    assert code == 0
    info = json.loads(out)
    assert info["seed"] == 7
    assert info["region_size"] == 4
    assert info["encoding"] == "msgpack"
    assert info["record_versions"]["character"] == 3
    code, out, _ = run(capsys, "check", str(world))
    assert code == 0
    assert "healthy" in out


def test_init_json_encoding(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, _ = run(capsys, "init", str(tmp_path / "j"), "--seed", "1", "--encoding", "json")
    assert code == 0
    code, out, _ = run(capsys, "info", str(tmp_path / "j"), "--json")
    assert json.loads(out)["encoding"] == "json"


def test_init_refuses_to_overwrite(world: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (world / "world.json").read_bytes()
    code, _, err = run(capsys, "init", str(world), "--seed", "8")
    assert code == 2
    assert "already exists" in err
    assert (world / "world.json").read_bytes() == before


def test_init_refuses_non_empty_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "stuff.txt").write_text("mine")
    code, _, err = run(capsys, "init", str(tmp_path), "--seed", "1")
    assert code == 2
    assert "not empty" in err
    assert (tmp_path / "stuff.txt").read_text() == "mine"


def test_init_bad_region_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "init", str(tmp_path / "x"), "--seed", "1", "--region-size", "0")
    assert code == 2
    assert "--region-size" in err


def test_missing_world(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for cmd in ("info", "check"):
        code, _, err = run(capsys, cmd, str(tmp_path / "nowhere"))
        assert code == 2
        assert "no such directory" in err
        assert str(tmp_path / "nowhere") in err


def test_check_non_world_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    code, _, err = run(capsys, "check", str(tmp_path))
    assert code == 2
    assert "not a streamer world" in err
    assert len(err.strip().splitlines()) == 1  # one clear line, no traceback


def rewrite_manifest(world: Path, **changes: object) -> None:
    m = decode_manifest((world / "world.json").read_bytes())
    (world / "world.json").write_bytes(encode_manifest(msgspec.structs.replace(m, **changes)))


def test_world_of_newer_format_version(world: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rewrite_manifest(world, format_version=99)
    code, _, err = run(capsys, "info", str(world))
    assert code == 1
    assert "format version 99" in err
    assert "world.json" in err


def test_corrupt_manifest_is_a_problem(world: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = (world / "world.json").read_bytes().replace(b'"seed": 7', b'"seed": 9')
    (world / "world.json").write_bytes(data)
    code, out, _ = run(capsys, "check", str(world))
    assert code == 1
    assert "world.json: checksum" in out
    code, _, err = run(capsys, "info", str(world))
    assert code == 1
    assert "checksum mismatch" in err


def test_check_reports_each_bad_region_on_its_own_line(
    world: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from streamer.format.region import encode_region

    regions = world / "regions"
    regions.mkdir()
    good = encode_region(
        rx=0,
        ry=0,
        last_processed_tick=5,
        generation=1,
        writer="t",
        encoding="msgpack",
        chunks={(0, 0): b"\x80"},
    )
    (regions / "r.0.0.region").write_bytes(good)
    (regions / "r.1.0.region").write_bytes(good)  # valid bytes under another region's name
    (regions / "r.2.0.region").write_bytes(good[: len(good) // 2])  # torn
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0x10
    (regions / "r.3.0.region").write_bytes(bytes(flipped))
    code, out, _ = run(capsys, "check", str(world), "--json")
    assert code == 1
    report = json.loads(out)
    assert report["healthy"] is False
    bad = sorted(p["file"] for p in report["problems"])
    assert bad == ["regions/r.1.0.region", "regions/r.2.0.region", "regions/r.3.0.region"]
    code, out, _ = run(capsys, "check", str(world))
    lines = [line for line in out.splitlines() if line.startswith("regions/")]
    assert len(lines) == 3


def test_region_written_by_newer_format(world: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from streamer.format.region import encode_region

    data = bytearray(
        encode_region(
            rx=0,
            ry=0,
            last_processed_tick=1,
            generation=1,
            writer="t",
            encoding="msgpack",
            chunks={},
        )
    )
    data[8:10] = (99).to_bytes(2, "little")  # format_version field follows the 8-byte magic
    (world / "regions").mkdir()
    (world / "regions" / "r.0.0.region").write_bytes(bytes(data))
    code, out, _ = run(capsys, "check", str(world))
    assert code == 1
    assert "regions/r.0.0.region: unsupported" in out


def test_bad_config_is_one_clear_line(
    world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[runtime]\ncache_byts = 1\n")
    code, _, err = run(capsys, "--config", str(cfg), "info", str(world))
    assert code == 2
    assert "runtime.cache_byts" in err
    assert str(cfg) in err
    assert "Traceback" not in err


def test_check_tells_a_torn_journal_tail_from_damage(
    world: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A torn end of the newest segment is a crash artefact (warning); a damaged frame with
    intact records after it is loss of acknowledged deltas (a problem)."""
    from streamer.format.journal import encode_frame

    frames = b"".join(encode_frame(f"batch {i}".encode()) for i in range(3))
    (world / "journal").mkdir()
    seg = world / "journal" / "00000000000000000001.wal"
    seg.write_bytes(frames + frames[:7])
    code, out, err = run(capsys, "check", str(world))
    assert code == 0
    assert "torn tail of 7 bytes" in err
    damaged = bytearray(frames)
    damaged[3] ^= 0x01  # inside the first frame: two intact frames follow
    seg.write_bytes(bytes(damaged))
    code, out, _ = run(capsys, "check", str(world))
    assert code == 1
    assert "journal/00000000000000000001.wal: checksum" in out
    assert "2 intact records after it" in out
    # With preallocation, in a segment with zeros after, a hole with intact records close
    # after it is the last commit persisted out of order: a warning (open cuts it). For an
    # appended journal the same bytes are damage.
    seg.write_bytes(bytes(damaged) + bytes(8192))
    code, out, _ = run(capsys, "check", str(world))
    assert code == 1 and "2 intact records after it" in out
    cfg = world.parent / "preallocate.toml"
    cfg.write_text("[runtime]\njournal_preallocate = true\n")
    code, out, err = run(capsys, "--config", str(cfg), "check", str(world))
    assert code == 0
    assert "with 2 intact records of the same unacknowledged commit after a hole" in err


def test_check_judges_the_same_journal_files_open_replays(
    world: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Open replays only 20-digit ``.wal`` names; check judges those and names the rest. A
    stray name sorting after the newest segment must not make that segment "older" (where a
    torn tail would read as damage)."""
    from streamer.format.journal import encode_frame

    frames = b"".join(encode_frame(f"batch {i}".encode()) for i in range(3))
    (world / "journal").mkdir()
    (world / "journal" / "00000000000000000001.wal").write_bytes(frames + frames[:7])
    (world / "journal" / "zz-copy.wal").write_bytes(b"garbage")
    (world / "journal" / "1.wal").write_bytes(b"")
    (world / "journal" / "spare.zero").write_bytes(bytes(4096))
    (world / "journal" / "00000000000000000001.wal.copy").write_bytes(b"half")
    code, out, err = run(capsys, "check", str(world))
    assert code == 0, out
    assert "torn tail of 7 bytes" in err
    assert "00000000000000000001.wal.copy: a copy left by an open that crashed" in err
    assert "journal/zz-copy.wal: not a journal segment" in err
    assert "journal/1.wal: not a journal segment" in err
    assert "spare.zero" not in err + out
