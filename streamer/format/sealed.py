"""Sealed JSON records: a record's own xxh3 checksum travels inside it.

Used for the files whose damage must be told apart from a missing file (``snapshot.json``,
the restore marker, the snapshot lineage, the journal-drops record): each carries
``type``, ``schemaVersion`` and ``checksum``, the xxh3 of the record without it, encoded
with sorted keys (so indentation does not matter to the checksum).
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from streamer.errors import ChecksumMismatch, MalformedFile, UnsupportedFormat
from streamer.format.checksum import hex64, xxh3

__all__ = ["seal", "unseal"]

_JSON: Final = msgspec.json.Encoder(order="sorted")


def seal(obj: msgspec.Struct, *, compact: bool = False) -> bytes:
    """``obj`` as JSON with its checksum filled in; indented unless ``compact`` (for large
    records rewritten often)."""
    body = msgspec.to_builtins(obj)
    body.pop("checksum", None)
    body["checksum"] = hex64(xxh3(_JSON.encode(body)))
    data = _JSON.encode(body)
    return (data if compact else msgspec.json.format(data, indent=2)) + b"\n"


def unseal(data: bytes, path: str, kind: str, *, newest: int = 1) -> dict[str, Any]:
    """The fields of a sealed ``kind`` record, checksum verified.

    :raises MalformedFile: not JSON, or not a ``kind`` record.
    :raises ChecksumMismatch: the content does not match its checksum.
    :raises UnsupportedFormat: ``schemaVersion`` is newer than ``newest``.
    """
    try:
        raw = msgspec.json.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise MalformedFile(f"{kind} is not valid JSON: {exc}", path=path) from None
    if not isinstance(raw, dict) or raw.get("type") != kind:
        raise MalformedFile(f"not a {kind} record (type != {kind!r})", path=path)
    stored = raw.pop("checksum", None)
    actual = hex64(xxh3(_JSON.encode(raw)))
    if stored != actual:
        raise ChecksumMismatch(
            f"{kind} record checksum mismatch", path=path, expected=str(stored), actual=actual
        )
    version = raw.get("schemaVersion")
    if not isinstance(version, int) or version > newest:
        raise UnsupportedFormat(
            f"{kind} record schemaVersion {version!r} is newer than this streamer reads ({newest})",
            path=path,
        )
    raw["checksum"] = stored
    return raw
