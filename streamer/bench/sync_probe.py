"""What a journal commit's sync costs on this disk, appended or written over preallocated zeros.

``scripts/sync-probe [--seconds S] [--mode append|preallocated|both] [--no-regions] [--dir D]``

A bare loop, no streamer code in it: 4 KiB records, each followed by its sync, 0.5 ms apart.
``append`` appends and fsyncs (what the journal does by default); ``preallocated`` writes in
place over a 64 MiB file zero-filled and synced beforehand, then fdatasyncs (what
``journal_preallocate`` does). Beside it, unless ``--no-regions``, a thread rewrites 200
region-sized files by atomic replace (write, fsync, rename, directory fsync), as flushes
do. Prints p50/p99/p99.9/max per mode. The directory (default: a temporary one) should be
on the file system the worlds live on. The figures in docs/performance.md came from it.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from streamer.bench.limits import raw_atomic_replace

_RECORD = 4096
_SEGMENT = 64 * 1024 * 1024
_REGION_BYTES = 150_000
_GAP_S = 0.0005


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rewrite_regions(directory: Path, stop: threading.Event, count: list[int]) -> None:
    blob = os.urandom(_REGION_BYTES)
    directory.mkdir(exist_ok=True)
    dfd = os.open(directory, os.O_RDONLY)
    i = 0
    try:
        while not stop.is_set():
            raw_atomic_replace(
                directory / f"r{i % 200}.tmp", directory / f"r{i % 200}.region", blob, dfd
            )
            i += 1
    finally:
        os.close(dfd)
    count.append(i)


def _open_segment(path: Path, preallocated: bool) -> int:
    if not preallocated:
        return os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    zeros = bytes(1 << 20)
    for _ in range(_SEGMENT >> 20):
        os.write(fd, zeros)
    os.fsync(fd)
    _fsync_dir(path.parent)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def measure(directory: Path, mode: str, seconds: float, regions: bool) -> str:
    """One run of ``mode`` in ``directory``; returns its line of figures."""
    work = Path(tempfile.mkdtemp(prefix=f"sync-{mode}-", dir=directory))
    fd = _open_segment(work / "segment.wal", preallocated=mode == "preallocated")
    sync = os.fdatasync if mode == "preallocated" else os.fsync
    stop, done = threading.Event(), list[int]()
    writer = threading.Thread(target=_rewrite_regions, args=(work / "regions", stop, done))
    if regions:
        writer.start()
    record = os.urandom(_RECORD)
    took: list[float] = []
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end and len(took) * _RECORD < _SEGMENT:
            t = time.perf_counter()
            os.write(fd, record)
            sync(fd)
            took.append(time.perf_counter() - t)
            time.sleep(_GAP_S)
    finally:
        stop.set()
        if writer.is_alive():
            writer.join()
        os.close(fd)
    took.sort()
    n = len(took)

    def ms(q: float) -> str:
        return f"{took[min(n - 1, int(n * q))] * 1e3:.3f}"

    beside = f", {sum(done)} region rewrites beside" if regions else ""
    return (
        f"{mode:12s} {n} syncs: p50 {ms(0.5)} ms, p99 {ms(0.99)} ms, p99.9 {ms(0.999)} ms, "
        f"max {took[-1] * 1e3:.1f} ms{beside}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sync-probe", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="per run")
    parser.add_argument("--mode", choices=["append", "preallocated", "both"], default="both")
    parser.add_argument("--no-regions", action="store_true", help="no region rewrites beside")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (a temp dir)")
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        parser.error("--seconds must be > 0")
    if args.dir is not None and not args.dir.is_dir():
        parser.error(f"--dir {args.dir}: not a directory")
    modes = ["append", "preallocated"] if args.mode == "both" else [args.mode]
    with tempfile.TemporaryDirectory(prefix="streamer-sync-probe-", dir=args.dir) as tmp:
        for mode in modes:
            print(measure(Path(tmp), mode, args.seconds, regions=not args.no_regions))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
