"""Forensic salvage: every record whose own checksum verifies, from raw (damaged) files.

Nothing in the input is trusted: no preamble, header, index or trailer is needed. Chunk frames
are found by ``format.region.scan_chunk_frames``, which checks each frame's own xxh3 under the
region the frame names, so a file with a destroyed header still yields every intact chunk, and
a file with one damaged chunk yields all the others.

Each verified payload is decoded as plain data (MessagePack first, then JSON: the header that
names the encoding may be gone). Records are written as they are stored (no migration, no
validation against the current schema), one JSON object per line in ``salvage.jsonl``::

    {"file": ..., "offset": 1234, "region": [rx, ry], "chunk": [cx, cy],
     "encoding": "msgpack", "type": "character", "id": "npc:0:0:3", "schemaVersion": 3,
     "record": {...}}

The chunk's own line (``type == "chunk"``, ``id == "cx,cy"``) carries the chunk-level fields
(tile overrides as base64, generator fingerprint) without the nested lists, plus
``valid`` / ``problem``: whether the current code would load the chunk as it is. Each nested
character, structure, feature and society follows on its own line. A payload that verifies
but does not decode is reported, never fatal; so is an unreadable input file.

``salvage-report.json`` beside it summarises what was found per file.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import anyio.to_thread
import msgspec

from streamer.errors import MalformedFile, StreamerError
from streamer.format.region import scan_chunk_frames
from streamer.schema.codec import ChunkCodec, Encoding
from streamer.schema.migrations import CHUNK_NESTED_FIELDS

__all__ = [
    "REPORT_NAME",
    "SALVAGE_NAME",
    "FileSalvage",
    "SalvageFailure",
    "SalvageReport",
    "SalvagedRecord",
    "salvage_bytes",
    "salvage_files",
    "summarize_records",
]

SALVAGE_NAME: Final = "salvage.jsonl"
REPORT_NAME: Final = "salvage-report.json"

_CODECS: Final[tuple[ChunkCodec, ...]] = (ChunkCodec("msgpack"), ChunkCodec("json"))
_CODEC_BY: Final = {c.encoding: c for c in _CODECS}
_JSON: Final = msgspec.json.Encoder(order="sorted")


class SalvagedRecord(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One line of ``salvage.jsonl``: a record and where it was found."""

    file: str
    #: Byte offset of the chunk frame holding the record.
    offset: int
    region: tuple[int, int]
    chunk: tuple[int, int]
    encoding: Encoding
    type: str
    id: str | None
    schemaVersion: int | None
    record: dict[str, Any]
    #: Chunk lines only: the current code would load this chunk as stored.
    valid: bool | None = None
    problem: str | None = None


class SalvageFailure(msgspec.Struct, frozen=True, kw_only=True):
    file: str
    offset: int | None = None
    region: tuple[int, int] | None = None
    chunk: tuple[int, int] | None = None
    error: str


class FileSalvage(msgspec.Struct, kw_only=True):
    file: str
    size: int = 0
    #: Chunk frames whose checksum verified.
    chunks: int = 0
    #: Lines written (chunk lines + nested records).
    records: int = 0
    failed_chunks: int = 0
    #: The file could not be read at all.
    error: str | None = None


class SalvageReport(msgspec.Struct, kw_only=True):
    out: str
    files: list[FileSalvage] = msgspec.field(default_factory=list)
    chunks: int = 0
    records: int = 0
    #: Lines written per record type.
    by_type: dict[str, int] = msgspec.field(default_factory=dict)
    failures: list[SalvageFailure] = msgspec.field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Every file was read and every verified chunk decoded."""
        return not self.failures


def _decode_payload(payload: bytes, where: str) -> tuple[Encoding, dict[str, Any]]:
    errors: list[str] = []
    for codec in _CODECS:
        try:
            return codec.encoding, codec.decode_raw(payload, where=where)
        except MalformedFile as exc:
            errors.append(f"{codec.encoding}: {exc}")
    raise MalformedFile("payload decodes neither as msgpack nor as json: " + "; ".join(errors))


def _jsonable(value: Any, depth: int = 0) -> Any:
    """Plain data any JSON encoder accepts (msgpack allows keys and types JSON does not)."""
    if depth > 200:
        return "<nested too deeply>"
    if isinstance(value, dict):
        return {
            k if isinstance(k, str) else repr(k): _jsonable(v, depth + 1) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_jsonable(v, depth + 1) for v in value]
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, msgspec.msgpack.Ext):
        return {"msgpack_ext": value.code, "data": base64.b64encode(value.data).decode("ascii")}
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return repr(value)


def _encode_line(rec: SalvagedRecord) -> bytes:
    try:
        return _JSON.encode(rec) + b"\n"
    except (TypeError, msgspec.EncodeError, RecursionError, ValueError):
        return _JSON.encode(msgspec.structs.replace(rec, record=_jsonable(rec.record))) + b"\n"


def _int_or_none(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def salvage_bytes(
    data: bytes, *, source: str
) -> tuple[list[SalvagedRecord], list[SalvageFailure], int]:
    """Records of every verified chunk frame in ``data``: ``(records, failures, chunks)``.

    Pure and synchronous (CPU only): callers run it in a worker thread. Never raises for
    any input.
    """
    records: list[SalvagedRecord] = []
    failures: list[SalvageFailure] = []
    chunks = 0
    for frame in scan_chunk_frames(data):
        chunks += 1
        region = (frame.rx, frame.ry)
        chunk = (frame.cx, frame.cy)
        where = f"{source} offset {frame.offset} chunk {chunk}"
        try:
            encoding, raw = _decode_payload(frame.payload, where)
        except MalformedFile as exc:
            failures.append(
                SalvageFailure(
                    file=source, offset=frame.offset, region=region, chunk=chunk, error=str(exc)
                )
            )
            continue
        problem: str | None = None
        try:
            decoded = _CODEC_BY[encoding].decode(frame.payload, where=where).record
            if (decoded.cx, decoded.cy) != chunk:
                problem = f"record names chunk ({decoded.cx}, {decoded.cy}), frame says {chunk}"
        except StreamerError as exc:
            problem = f"{type(exc).__name__}: {exc}"
        except RecursionError:
            problem = "record nested too deeply"
        chunk_fields = {k: v for k, v in raw.items() if k not in CHUNK_NESTED_FIELDS}
        records.append(
            SalvagedRecord(
                file=source,
                offset=frame.offset,
                region=region,
                chunk=chunk,
                encoding=encoding,
                type=str(raw.get("type", "chunk")),
                id=f"{frame.cx},{frame.cy}",
                schemaVersion=_int_or_none(raw.get("schemaVersion")),
                record=chunk_fields,
                valid=problem is None,
                problem=problem,
            )
        )
        for field, rtype in CHUNK_NESTED_FIELDS.items():
            items = raw.get(field)
            if not isinstance(items, list):
                continue
            for item in items:
                if not isinstance(item, dict):
                    failures.append(
                        SalvageFailure(
                            file=source,
                            offset=frame.offset,
                            region=region,
                            chunk=chunk,
                            error=f"an element of {field} is a {type(item).__name__}, not a record",
                        )
                    )
                    continue
                rid = item.get("id")
                records.append(
                    SalvagedRecord(
                        file=source,
                        offset=frame.offset,
                        region=region,
                        chunk=chunk,
                        encoding=encoding,
                        type=str(item.get("type", rtype)),
                        id=None if rid is None else str(rid),
                        schemaVersion=_int_or_none(item.get("schemaVersion")),
                        record=item,
                    )
                )
    return records, failures, chunks


def summarize_records(records: Sequence[SalvagedRecord]) -> dict[str, list[str]]:
    """Record ids per type (``"chunk"`` ids are ``"cx,cy"``), sorted and de-duplicated."""
    out: dict[str, set[str]] = {}
    for r in records:
        out.setdefault(r.type, set()).add(r.id if r.id is not None else "<no id>")
    return {t: sorted(ids) for t, ids in sorted(out.items())}


def _salvage_blocking(paths: Sequence[Path], out_dir: Path) -> SalvageReport:
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / SALVAGE_NAME
    if final.exists():
        raise FileExistsError(f"{final} already exists; choose another --out directory")
    tmp = out_dir / f".{SALVAGE_NAME}.tmp-{os.getpid()}"
    report = SalvageReport(out=str(final))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with os.fdopen(fd, "wb") as out:
            for path in paths:
                for line in _salvage_one(path, report):
                    out.write(line)
            out.flush()
            os.fsync(out.fileno())
        # link() refuses to replace, so a concurrent salvage into the same directory can
        # never overwrite the other's output.
        os.link(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    (out_dir / REPORT_NAME).write_bytes(msgspec.json.format(_JSON.encode(report), indent=2) + b"\n")
    dfd = os.open(out_dir, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return report


def _salvage_one(path: Path, report: SalvageReport) -> Iterator[bytes]:
    entry = FileSalvage(file=str(path))
    report.files.append(entry)
    try:
        data = path.read_bytes()
    except OSError as exc:
        entry.error = f"cannot read: {exc.strerror or exc}"
        report.failures.append(SalvageFailure(file=str(path), error=entry.error))
        return
    entry.size = len(data)
    records, failures, chunks = salvage_bytes(data, source=str(path))
    entry.chunks = chunks
    entry.records = len(records)
    entry.failed_chunks = chunks - sum(1 for r in records if r.valid is not None)
    report.chunks += chunks
    report.records += len(records)
    report.failures.extend(failures)
    for rec in records:
        report.by_type[rec.type] = report.by_type.get(rec.type, 0) + 1
        yield _encode_line(rec)


async def salvage_files(paths: Sequence[Path], out_dir: Path) -> SalvageReport:
    """Salvage ``paths`` into ``out_dir/salvage.jsonl`` (+ ``salvage-report.json``).

    All file work happens in one worker-thread hop. Unreadable inputs and undecodable chunks
    are listed in ``SalvageReport.failures``; they never stop the run.

    :raises FileExistsError: ``out_dir`` already holds a ``salvage.jsonl`` (never overwritten).
    :raises OSError: ``out_dir`` cannot be created or written.
    """
    return await anyio.to_thread.run_sync(_salvage_blocking, list(paths), out_dir)
