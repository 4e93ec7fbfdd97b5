"""SimulatedFileSystem: the durability model, crash and fault injection, and equivalence with
OsFileSystem on the success path (and on the common error paths)."""

from __future__ import annotations

import errno
import itertools
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from streamer.errors import InvalidKey
from streamer.storage.faultfs import MUTATING_OPS, SimulatedCrash, SimulatedFileSystem
from streamer.storage.fs import FileSystem, OsFileSystem


def write_file(fs: FileSystem, path: str, data: bytes, *, sync: bool = True) -> None:
    h = fs.create(path)
    fs.write(h, data)
    if sync:
        fs.fsync(h)
    fs.close(h)


# -- durability model ------------------------------------------------------------------------


def test_unsynced_file_data_is_lost_but_synced_entry_survives() -> None:
    fs = SimulatedFileSystem()
    write_file(fs, "f", b"data", sync=False)
    fs.fsync_dir("")
    assert fs.durable_image().tree() == {"f": b""}


def test_synced_data_without_dir_sync_loses_the_name() -> None:
    fs = SimulatedFileSystem()
    write_file(fs, "f", b"data")
    assert fs.durable_image().tree() == {}
    fs.fsync_dir("")
    assert fs.durable_image().tree() == {"f": b"data"}


def test_rename_is_durable_only_after_dir_sync() -> None:
    fs = SimulatedFileSystem()
    write_file(fs, "f", b"old")
    fs.fsync_dir("")
    write_file(fs, ".f.tmp", b"new")
    fs.replace(".f.tmp", "f")
    assert fs.tree() == {"f": b"new"}
    assert fs.durable_image().tree() == {"f": b"old"}
    fs.fsync_dir("")
    assert fs.durable_image().tree() == {"f": b"new"}


def test_unlink_is_durable_only_after_dir_sync() -> None:
    fs = SimulatedFileSystem()
    write_file(fs, "f", b"x")
    fs.fsync_dir("")
    fs.unlink("f")
    assert fs.durable_image().tree() == {"f": b"x"}
    fs.fsync_dir("")
    assert fs.durable_image().tree() == {}


def test_dir_sync_is_per_directory() -> None:
    fs = SimulatedFileSystem()
    fs.makedirs("a/b")  # syncs "" and "a" as each gains an entry
    write_file(fs, "a/b/f", b"x")
    fs.fsync_dir("a")  # the wrong directory
    assert fs.durable_image().tree() == {}
    assert fs.durable_image().dirs() == ["a", "a/b"]
    fs.fsync_dir("a/b")
    assert fs.durable_image().tree() == {"a/b/f": b"x"}


def test_mkdir_without_parent_sync_is_lost() -> None:
    fs = SimulatedFileSystem()
    fs.inject("fsync_dir", errno.EIO, once=False)
    with pytest.raises(OSError):
        fs.makedirs("a")
    assert fs.isdir("a")
    assert fs.durable_image().dirs() == []


def test_hard_links_stay_shared_in_the_image() -> None:
    fs = SimulatedFileSystem()
    write_file(fs, "a", b"x")
    fs.link("a", "b")
    fs.fsync_dir("")
    image = fs.durable_image()
    h = image.open_append("a")
    image.write(h, b"y")
    image.close(h)
    assert image.read("b") == b"xy"


def test_torn_image_keeps_a_prefix_of_unsynced_appends() -> None:
    fs = SimulatedFileSystem()
    write_file(fs, "log", b"durable|")
    fs.fsync_dir("")
    h = fs.open_append("log")
    fs.write(h, b"0123456789")
    assert fs.durable_image().read("log") == b"durable|"
    seen = set()
    for seed in range(40):
        data = fs.durable_image(torn=True, rng=random.Random(seed)).read("log")
        assert (b"durable|0123456789").startswith(data)
        assert data.startswith(b"durable|")
        seen.add(len(data))
    assert len(seen) > 3


def test_torn_image_keeps_any_pages_of_unsynced_writes_in_place() -> None:
    fs = SimulatedFileSystem()
    page = 4096
    write_file(fs, "seg", b"head|" + bytes(4 * page))  # preallocated: zeros after a head
    fs.fsync_dir("")
    h = fs.open_write("seg")
    fs.write(h, b"head|")
    fs.fdatasync(h)
    new = bytes(range(1, 251)) * 60  # 15,000 bytes over pages 0-3, none of them zero
    fs.write(h, new)  # in place over the zeros, not synced
    assert fs.durable_image().read("seg") == b"head|" + bytes(4 * page)
    kept = set()
    for seed in range(40):
        data = fs.durable_image(torn=True, rng=random.Random(seed)).read("seg")
        assert len(data) == 5 + 4 * page  # an overwrite never changes the size
        assert data[:5] == b"head|"
        pages = []
        for p in range(4):
            lo, hi = max(5, p * page), min(5 + len(new), (p + 1) * page)
            got = data[lo:hi]
            assert got in (new[lo - 5 : hi - 5], bytes(hi - lo))  # a page is old or new
            pages.append(got != bytes(hi - lo))
        kept.add(tuple(pages))
    # Out of order too: a later page without an earlier one.
    assert any(not a and b for k in kept for a, b in itertools.pairwise(k))
    assert len(kept) > 4
    fs.fdatasync(h)
    assert fs.durable_image(torn=True).read("seg") == b"head|" + new + bytes(4 * page - len(new))


def test_failed_fsync_drops_the_data_and_a_retry_does_not_bring_it_back() -> None:
    fs = SimulatedFileSystem()
    h = fs.create("f")
    fs.write(h, b"data")
    fs.inject("fsync", errno.EIO)
    with pytest.raises(OSError) as info:
        fs.fsync(h)
    assert info.value.errno == errno.EIO
    fs.fsync(h)  # "succeeds", like Linux after marking the failed pages clean
    fs.close(h)
    fs.fsync_dir("")
    assert fs.read("f") == b"data"
    # The size is metadata and persists; the dropped page's bytes never do.
    assert fs.durable_image().tree() == {"f": b"\0\0\0\0"}
    assert fs.durable_image(torn=True).tree() == {"f": b"\0\0\0\0"}


def test_after_a_failed_fsync_later_writes_persist_and_rewriting_brings_data_back() -> None:
    """As on Linux, the failed pages are clean, not poisoned: bytes written after the
    failure are written back by the next fsync, the same bytes written again included. The
    model tracks bytes, not pages (Linux would persist the whole page ``cccc`` redirties):
    it errs on the side of losing data."""
    fs = SimulatedFileSystem()
    h = fs.create("f")
    fs.write(h, b"aaaa")
    fs.fsync(h)
    fs.write(h, b"bbbb")
    fs.inject("fsync", errno.EIO)
    with pytest.raises(OSError):
        fs.fsync(h)
    fs.write(h, b"cccc")
    fs.fsync(h)
    fs.fsync_dir("")
    assert fs.read("f") == b"aaaabbbbcccc"
    assert fs.durable_image().read("f") == b"aaaa\0\0\0\0cccc"
    h2 = fs.open_write("f")
    fs.write(h2, b"aaaabbbb")  # the same bytes again: dirty, so written back
    fs.fdatasync(h2)
    assert fs.durable_image().read("f") == b"aaaabbbbcccc"


def test_a_truncate_after_a_failed_sync_persists_the_size_but_not_the_dropped_pages() -> None:
    fs = SimulatedFileSystem()
    write_file(fs, "seg", b"acked|" + bytes(20))  # synced: a preallocated segment's head
    fs.fsync_dir("")
    h = fs.open_write("seg")
    fs.write(h, b"acked|unacked")
    fs.inject("fdatasync", errno.EIO)
    with pytest.raises(OSError):
        fs.fdatasync(h)
    fs.truncate("seg", 6)  # the journal cuts back to what was acknowledged
    assert fs.durable_image().read("seg") == b"acked|"
    fs.truncate("seg", 8)  # growing: zeros, never the dropped bytes
    assert fs.durable_image().read("seg") == b"acked|\0\0"


# -- crash and fault injection -----------------------------------------------------------------


def test_crash_after_k_refuses_the_next_op_and_freezes() -> None:
    fs = SimulatedFileSystem()
    fs.crash_after(2)
    h = fs.create("f")
    fs.write(h, b"x")
    with pytest.raises(SimulatedCrash):
        fs.fsync(h)
    assert fs.crashed
    assert fs.crashed_op is not None and fs.crashed_op.name == "fsync"
    assert [op.name for op in fs.ops] == ["create", "write"]
    for call in (lambda: fs.read("f"), lambda: fs.close(h), lambda: fs.listdir("")):
        with pytest.raises(SimulatedCrash):
            call()
    assert fs.durable_image().tree() == {}


def test_simulated_crash_is_not_an_exception() -> None:
    fs = SimulatedFileSystem()
    fs.crash_after(0)
    with pytest.raises(SimulatedCrash):
        try:
            fs.create("f")
        except Exception:  # what careless code does; the crash must get through
            pytest.fail("SimulatedCrash was caught as an Exception")


def test_non_mutating_ops_are_not_counted() -> None:
    fs = SimulatedFileSystem()
    fs.crash_after(1)
    fs.makedirs("")  # nothing to create: no op
    fs.listdir("")
    fs.exists("x")
    h = fs.create("f")
    fs.read("f")
    fs.close(h)
    with pytest.raises(SimulatedCrash):
        fs.open_append("g")  # creating is a mutation
    assert [op.name for op in fs.ops] == ["create"]
    assert {op.name for op in fs.ops} <= MUTATING_OPS


def test_inject_once_persistent_and_by_path() -> None:
    fs = SimulatedFileSystem()
    fs.inject("create", errno.ENOSPC, path_contains="big")
    write_file(fs, "small", b"1")
    with pytest.raises(OSError) as info:
        fs.create("big")
    assert info.value.errno == errno.ENOSPC
    write_file(fs, "big", b"2")  # once: gone
    fs.inject("read", errno.EIO, once=False)
    for _ in range(3):
        with pytest.raises(OSError):
            fs.read("small")
    fs.clear_faults()
    assert fs.read("small") == b"1"


def test_replace_and_link_faults_match_either_path() -> None:
    fs = SimulatedFileSystem()
    write_file(fs, "a", b"1")
    fs.inject("replace", errno.EIO, path_contains="dst")
    with pytest.raises(OSError):
        fs.replace("a", "dst")
    fs.replace("a", "dst")
    assert fs.tree() == {"dst": b"1"}


# -- equivalence with OsFileSystem -----------------------------------------------------------

Outcome = tuple[str, Any]


def _run(fs: FileSystem, program: list[tuple[Any, ...]]) -> list[Outcome]:
    """Run a program of (method, *args); ("h", i) arguments refer to the i-th handle opened.
    Returns each call's result or (exception class, errno)."""
    handles: list[int] = []
    out: list[Outcome] = []
    for name, *args in program:
        real = [handles[a[1]] if isinstance(a, tuple) else a for a in args]
        try:
            result = getattr(fs, name)(*real)
        except OSError as exc:
            out.append(("err", (type(exc).__name__, exc.errno)))
            continue
        except InvalidKey:
            out.append(("err", ("InvalidKey", None)))
            continue
        if name in ("create", "open_append", "open_write"):
            handles.append(result)
            result = "handle"
        out.append(("ok", result))
    for h in handles:
        try:
            fs.close(h)
        except OSError:
            pass
    return out


def _tree(fs: FileSystem, d: str = "") -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for name in fs.listdir(d):
        p = f"{d}/{name}" if d else name
        if fs.isdir(p):
            out[p] = None
            out.update(_tree(fs, p))
        else:
            out[p] = fs.read(p)
    return out


SCRIPT: list[tuple[Any, ...]] = [
    ("listdir", ""),
    ("read", "missing"),
    ("makedirs", "d/e"),
    ("makedirs", "d/e"),
    ("create", "d/f"),
    ("write", ("h", 0), b"hello "),
    ("write", ("h", 0), b"world"),
    ("fsync", ("h", 0)),
    ("close", ("h", 0)),
    ("create", "d/f"),
    ("open_write", "d/f"),
    ("write", ("h", 1), b"J"),
    ("fdatasync", ("h", 1)),
    ("close", ("h", 1)),
    ("open_write", "d/missing"),
    ("open_write", "d"),
    ("read", "d/f"),
    ("pread", "d/f", 6, 100),
    ("pread", "d/f", 100, 5),
    ("pread", "d/f", -1, 5),
    ("pread", "d", 0, 0),
    ("size", "d/f"),
    ("size", "d"),
    ("exists", "d/f"),
    ("exists", "d/f/x"),
    ("isdir", "d"),
    ("isdir", "d/f"),
    ("listdir", "d"),
    ("listdir", "d/f"),
    ("listdir", "nope"),
    ("read", "d"),
    ("read", "d/f/x"),
    ("create", "d/f/x"),
    ("create", "nope/x"),
    ("makedirs", "d/f"),
    ("makedirs", "d/f/g"),
    ("open_append", "d/log"),
    ("write", ("h", 1), b"ab"),
    ("open_append", "d/log"),
    ("write", ("h", 2), b"cd"),
    ("write", ("h", 1), b"ef"),
    ("read", "d/log"),
    ("truncate", "d/log", 3),
    ("write", ("h", 1), b"X"),
    ("read", "d/log"),
    ("truncate", "d/log", 6),
    ("read", "d/log"),
    ("truncate", "d", 0),
    ("truncate", "missing", 0),
    ("open_append", "d"),
    ("link", "d/f", "d/g"),
    ("link", "d/f", "d/g"),
    ("link", "d", "d/h"),
    ("link", "missing", "d/h"),
    ("replace", "d/g", "d/f"),
    ("read", "d/f"),
    ("listdir", "d"),
    ("replace", "d/f", "d/e"),
    ("replace", "d/e", "d/f"),
    ("replace", "d", "d/e/x"),
    ("replace", "missing", "d/z"),
    ("replace", "d/f", "d/f"),
    ("makedirs", "m/n"),
    ("replace", "m", "d/e"),
    ("listdir", "d/e"),
    ("unlink", "d/e"),
    ("unlink", "missing"),
    ("rmdir", "d"),
    ("rmdir", "d/f"),
    ("rmdir", "d/e/n"),
    ("rmdir", "missing"),
    ("fsync_dir", "d"),
    ("fsync_dir", ""),
    ("fsync_dir", "d/f"),
    ("fsync_dir", "missing"),
    ("read", "../x"),
    ("read", "/abs"),
    ("read", "a//b"),
    ("read", "a\\b"),
    ("read", "a\0b"),
    ("create", ""),
    ("unlink", ""),
]


def test_script_gives_identical_results_on_both(tmp_path: Path) -> None:
    sim = SimulatedFileSystem()
    real = OsFileSystem(tmp_path)
    assert _run(sim, SCRIPT) == _run(real, SCRIPT)
    assert _tree(sim) == _tree(real)


PATHS = ["a", "b", "d", "d/a", "d/b", "d/e", "d/e/f", "a/x", "e"]


def _random_program(rng: random.Random, length: int) -> list[tuple[Any, ...]]:
    program: list[tuple[Any, ...]] = []
    n_handles = 0
    for _ in range(length):
        p, q = rng.choice(PATHS), rng.choice(PATHS)
        op = rng.choice(
            [
                "read", "pread", "size", "exists", "isdir", "listdir", "makedirs", "makedirs",
                "create", "create", "open_append", "open_write", "write", "write", "fsync",
                "fdatasync", "truncate",
                "replace", "link", "unlink", "rmdir", "fsync_dir",
            ]
        )  # fmt: skip
        if op in ("write", "fsync", "fdatasync"):
            if not n_handles:
                continue
            h = ("h", rng.randrange(n_handles))
            program.append((op, h, rng.randbytes(rng.randint(0, 5))) if op == "write" else (op, h))
        elif op == "pread":
            program.append((op, p, rng.randint(0, 6), rng.randint(0, 6)))
        elif op == "truncate":
            program.append((op, p, rng.randint(0, 8)))
        elif op in ("replace", "link"):
            program.append((op, p, q))
        else:
            program.append((op, p))
        if op in ("create", "open_append", "open_write"):
            n_handles += 1
    return program


def _resolve_handles(program: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Drop opens that fail (on the simulated fs) and renumber handle references so every
    ("h", i) names a handle that exists: closed or never-opened fds must not be used on the
    real fs, where the number may belong to another file."""
    sim = SimulatedFileSystem()
    out: list[tuple[Any, ...]] = []
    handles: list[int] = []
    for step in program:
        name, *args = step
        if any(isinstance(a, tuple) for a in args):
            if not handles:
                continue
            args = [("h", a[1] % len(handles)) if isinstance(a, tuple) else a for a in args]
            real = [handles[a[1]] if isinstance(a, tuple) else a for a in args]
        else:
            real = list(args)
        try:
            result = getattr(sim, name)(*real)
        except OSError:
            result = None
        if name in ("create", "open_append", "open_write") and result is not None:
            handles.append(result)
        elif name in ("create", "open_append", "open_write"):
            continue  # the failed open is dropped, keeping handle numbering dense
        out.append((name, *args))
    return out


def test_random_programs_give_identical_results_on_both(tmp_path: Path, torture: bool) -> None:
    rng = random.Random(1234)
    for i in range(2000 if torture else 60):
        program = _resolve_handles(_random_program(rng, 60))
        root = tmp_path / f"p{i}"
        root.mkdir()
        sim = SimulatedFileSystem()
        real = OsFileSystem(root)
        got_sim, got_real = _run(sim, program), _run(real, program)
        assert got_sim == got_real, f"program {i}: {program}"
        assert _tree(sim) == _tree(real)


# -- OsFileSystem confinement --------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["../x", "/abs", "a//b", "a\\b", "a/\0", "a/../b", "./a", "a/"])
def test_os_fs_rejects_paths_outside_the_root(tmp_path: Path, bad: str) -> None:
    fs = OsFileSystem(tmp_path / "root")
    fs.makedirs("")
    for call in (
        lambda: fs.read(bad),
        lambda: fs.create(bad),
        lambda: fs.makedirs(bad),
        lambda: fs.unlink(bad),
        lambda: fs.replace("x", bad),
    ):
        with pytest.raises(InvalidKey) as info:
            call()
        assert bad in str(info.value) or repr(bad) in str(info.value) or "\0" in bad


def test_os_fs_refuses_symlinks_that_escape(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"s")
    fs = OsFileSystem(root)
    fs.makedirs("inner")
    os.symlink(outside, root / "out")
    os.symlink(root / "inner", root / "in")
    os.symlink(outside / "secret", root / "inner" / "leak")
    escapes: list[Callable[[], object]] = [
        lambda: fs.read("out/secret"),
        lambda: fs.create("out/new"),
        lambda: fs.listdir("out"),
        lambda: fs.read("inner/leak"),
        lambda: fs.read("in/leak"),
        lambda: fs.fsync_dir("out"),
    ]
    for call in escapes:
        with pytest.raises(InvalidKey, match="symlink"):
            call()
    assert not (outside / "new").exists()
    write_file(fs, "in/ok", b"fine")  # a symlink that stays inside is followed
    assert (root / "inner" / "ok").read_bytes() == b"fine"
    fs.fsync_dir("in")


def test_os_fs_handles_are_real_fds(tmp_path: Path) -> None:
    fs = OsFileSystem(tmp_path)
    h = fs.create("f")
    assert os.fstat(h).st_size == 0
    fs.write(h, b"abc")
    fs.fsync(h)
    fs.close(h)
    assert (tmp_path / "f").read_bytes() == b"abc"


def test_os_fs_makedirs_creates_the_root(tmp_path: Path) -> None:
    fs = OsFileSystem(tmp_path / "x" / "y")
    fs.makedirs("")
    fs.makedirs("a/b")
    assert (tmp_path / "x" / "y" / "a" / "b").is_dir()
    write_file(fs, "f", b"")
    with pytest.raises(NotADirectoryError):
        fs.makedirs("f/g")
    with pytest.raises(NotADirectoryError):
        fs.makedirs("f")
    assert fs.exists("") and fs.isdir("")


def test_a_sync_makes_durable_exactly_what_reads_see() -> None:
    """Syncs copy only the range written since the last one: the durable image must still
    equal a full copy taken at every sync, whatever mix of writes in place, appends,
    writes past the end and truncations came before."""
    rng = random.Random(99)
    for _ in range(30):
        fs = SimulatedFileSystem()
        write_file(fs, "f", rng.randbytes(rng.randint(0, 40)))
        fs.fsync_dir("")
        expected = fs.read("f")
        handles = [fs.open_write("f"), fs.open_append("f")]
        for _ in range(40):
            op = rng.choice(["write", "write", "write", "sync", "datasync", "truncate", "reopen"])
            if op == "write":
                fs.write(rng.choice(handles), rng.randbytes(rng.randint(0, 9)))
            elif op == "reopen":  # a new in-place handle starts at 0 again
                handles[0] = fs.open_write("f")
            elif op == "truncate":
                fs.truncate("f", rng.randint(0, 60))
                expected = fs.read("f")
            else:
                (fs.fsync if op == "sync" else fs.fdatasync)(rng.choice(handles))
                expected = fs.read("f")
            assert fs.durable_image().read("f") == expected
