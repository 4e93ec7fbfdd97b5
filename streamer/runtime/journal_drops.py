"""``state/journal_drops.json``: which journaled ticks left the world with a deleted segment.

The journal deletes a segment once every region it holds has folded past it
(:meth:`Journal.collect`), in any order. A region restored from an older snapshot copy then
gets back only what the journal still holds: whatever left with a deleted segment is gone.
This record is what lets recovery tell "the journal holds every delta above the snapshot's
tick" from "some left with a deleted segment" (``recovery/journal_loss.py``).

Format: one checksummed JSON object::

    {"type": "journal_drops", "schemaVersion": 1, "epoch": "<16 hex>", "since": "<ISO time>",
     "dropped": {"rx.ry": <highest tick of that region that left with a deleted segment>},
     "pending": [{"seq": <segment>, "ticks": {"rx.ry": <tick>}}], "checksum": "<16 hex>"}

``checksum`` is the xxh3-64 of the canonical JSON (sorted keys, no whitespace) without it
(``format/sealed.py``).

Protocol. Before ``collect`` unlinks segments it writes the record (``put_atomic``) with
those segments under ``pending``; a later write (or the next open) moves each pending
segment that is gone from the journal into ``dropped`` and forgets those still there. So:

- a crash before the write: nothing was deleted, nothing recorded;
- a crash after the write, before or during the unlinks: the next open finds which pending
  segments are still on disk (those are replayed, not lost) and which are gone: exact;
- a reader while the world runs treats a pending segment as gone unless it read that segment
  itself (``dropped_through``): it may over-report a deletion in progress, never miss one.

``epoch`` names one unbroken run of tracking. It starts when the record is first made (a
world from before this record, or one whose record was damaged or could not be written):
deletions before it are unknown. Snapshots copy ``state/*``, so a snapshot taken during an
epoch holds a record of that epoch; a snapshot without one (or of another epoch) predates
the tracking, and a loss judged against it is "unknown", never "nothing".

Never blocks the journal: a damaged or unreadable record is replaced by a new epoch with a
warning. If the record cannot be written before a deletion, it is removed instead (losses
are then reported as unknown); only if that fails too does the deletion wait.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import Final, Literal

import anyio.to_thread
import msgspec

from streamer.errors import (
    IntegrityError,
    MalformedFile,
    NotFound,
    StorageUnavailable,
    StreamerError,
    UnsupportedFormat,
)
from streamer.format.sealed import seal, unseal
from streamer.storage.base import BlobStore

__all__ = [
    "DROPS_KEY",
    "DropLog",
    "DropRecord",
    "PendingDrop",
    "decode_drops",
    "encode_drops",
    "read_drops",
]

log = logging.getLogger(__name__)

DROPS_KEY: Final = "state/journal_drops.json"

RegionKey = tuple[int, int]


class PendingDrop(msgspec.Struct, frozen=True, kw_only=True):
    """A segment ``collect`` is deleting: its sequence number and highest tick per region."""

    seq: int
    ticks: dict[str, int]


class DropRecord(msgspec.Struct, frozen=True, kw_only=True):
    type: Literal["journal_drops"] = "journal_drops"
    schemaVersion: int = 1
    epoch: str
    since: str
    dropped: dict[str, int] = msgspec.field(default_factory=dict)
    pending: list[PendingDrop] = msgspec.field(default_factory=list)

    def dropped_through(self, region: RegionKey, present: Iterable[int] = ()) -> int:
        """The highest tick of ``region`` that may have left with a deleted segment (-1:
        none). ``present``: segments the caller read itself; pending ones among them are
        not gone."""
        label = _label(region)
        seen = set(present)
        high = self.dropped.get(label, -1)
        for p in self.pending:
            if p.seq not in seen:
                high = max(high, p.ticks.get(label, -1))
        return high


def _label(region: RegionKey) -> str:
    return f"{region[0]}.{region[1]}"


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_record() -> DropRecord:
    return DropRecord(epoch=secrets.token_hex(8), since=_now_iso())


def encode_drops(record: DropRecord) -> bytes:
    # Compact: one entry per region ever collected, rewritten at every collect.
    return seal(record, compact=True)


def decode_drops(data: bytes, *, path: str = DROPS_KEY) -> DropRecord:
    """:raises MalformedFile, ChecksumMismatch: the record does not verify (one from a newer
    release included: like damage, it starts a new epoch rather than block the journal)."""
    try:
        raw = unseal(data, path, "journal_drops")
    except UnsupportedFormat as exc:
        raise MalformedFile(str(exc), path=path) from None
    try:
        return msgspec.convert(raw, DropRecord)
    except msgspec.ValidationError as exc:
        raise MalformedFile(f"journal-drops record: {exc}", path=path) from None


async def read_drops(store: BlobStore, key: str = DROPS_KEY) -> DropRecord | None:
    """The record at ``key``; None if there is none.

    :raises IntegrityError: it does not verify.
    :raises StorageUnavailable: it could not be read.
    """
    try:
        blob = await store.get(key)
    except NotFound:
        return None
    # In a worker thread: at 100k regions the record is ~2 MB, tens of ms to verify.
    return await anyio.to_thread.run_sync(partial(decode_drops, blob.data, path=key))


def _resolve(
    record: DropRecord, live: set[int], adding: Sequence[PendingDrop], *, keep_live: bool
) -> DropRecord:
    """Pending segments gone from ``live`` move to ``dropped``; those still live stay pending
    if ``keep_live`` (a collection may still be deleting them) unless ``adding`` names them
    again, else they are forgotten (at open: they are replayed like any other);
    ``adding`` becomes pending."""
    dropped = dict(record.dropped)
    new_seqs = {p.seq for p in adding}
    pending: list[PendingDrop] = []
    for p in record.pending:
        if p.seq in live:
            if keep_live and p.seq not in new_seqs:
                pending.append(p)
            continue
        for label, tick in p.ticks.items():
            if tick > dropped.get(label, -1):
                dropped[label] = tick
    pending.extend(adding)
    return msgspec.structs.replace(record, dropped=dropped, pending=pending)


class DropLog:
    """The journal's side of the record: keeps it current across segment deletions."""

    def __init__(self, store: BlobStore, key: str = DROPS_KEY) -> None:
        self._store = store
        self._key = key
        #: The record as durably written; None while nothing of this epoch is on disk.
        self.record: DropRecord | None = None
        #: Highest segment number the record on disk lists as pending when opened. New
        #: segments must be numbered above it: if that record could not be settled, a reused
        #: number would look "still on disk" at the next open and its loss be forgotten.
        self.pending_high = 0

    async def open(self, on_disk: Iterable[int]) -> None:
        """Load the record, settle what a crash left pending against the segments now
        ``on_disk``, or start a new epoch. Never raises a ``StreamerError``: a record that
        cannot be read or written is logged; losses are then reported as unknown."""
        live = set(on_disk)
        try:
            current = await read_drops(self._store, self._key)
        except IntegrityError as exc:
            log.warning(
                "%s does not verify (%s): starting a new record; a journal gap left before "
                "now is reported as an unknown loss",
                self._key,
                exc,
            )
            current = None
        except StorageUnavailable as exc:
            log.warning(
                "%s cannot be read (%s): starting a new record; a journal gap left before "
                "now is reported as an unknown loss",
                self._key,
                exc,
            )
            current = None
        if current is not None and not current.pending:
            self.record = current
            return
        if current is not None:
            self.pending_high = max(p.seq for p in current.pending)
        record = new_record() if current is None else _resolve(current, live, (), keep_live=False)
        try:
            await self._store.put_atomic(self._key, encode_drops(record))
        except StreamerError as exc:
            log.warning(
                "%s cannot be written (%s); segment deletions will try again; until then a "
                "journal gap is reported as an unknown loss",
                self._key,
                exc,
            )
            return
        if current is None:
            log.info("%s: tracking deleted journal segments (epoch %s)", self._key, record.epoch)
        self.record = record

    async def before_delete(
        self, segments: Sequence[tuple[int, Mapping[RegionKey, int]]], live: Iterable[int]
    ) -> None:
        """Durably note ``segments`` (seq, highest tick per region) as being deleted;
        ``live``: the journal's segments now, these included.

        :raises StorageUnavailable: neither recorded nor the record removed; the caller
            must not delete them.
        """
        adding = [
            PendingDrop(seq=seq, ticks={_label(r): t for r, t in sorted(ticks.items())})
            for seq, ticks in segments
        ]
        base = self.record if self.record is not None else new_record()
        live_set = set(live)

        def build() -> tuple[DropRecord, bytes]:
            record = _resolve(base, live_set, adding, keep_live=True)
            return record, encode_drops(record)

        # The record has an entry per region ever collected (2 MB, ~30 ms to merge and
        # encode at 100k regions): off the event loop, where acknowledgements wait.
        record, data = await anyio.to_thread.run_sync(build)
        try:
            await self._store.put_atomic(self._key, data)
        except StreamerError as exc:
            self.record = None
            try:
                await self._store.delete(self._key)
            except StreamerError as gone:
                raise StorageUnavailable(
                    f"cannot record the journal segments about to be deleted ({exc}) nor "
                    f"remove the stale record ({gone}); they are kept",
                    key=self._key,
                ) from gone
            log.warning(
                "%s cannot be written (%s); removed it, so a journal gap is reported as an "
                "unknown loss from now until a new record is written",
                self._key,
                exc,
            )
            return
        if self.record is None:
            log.info("%s: tracking deleted journal segments (epoch %s)", self._key, record.epoch)
        self.record = record
