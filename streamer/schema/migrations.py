"""Migration registry: ``(record type, from_version)`` → a pure step on plain data.

A step takes a record as plain data (the ``dict`` msgspec decodes to) at version *n* and
returns the record at version *n + 1*. The registry, not the step, writes ``schemaVersion``
and checks ``type``, so a step only describes the change of shape. Additive changes (a new
field with a default) need no step and no version bump.

Chains are checked once, in O(#steps), never by scanning records: a duplicate step or a step
past ``CURRENT_VERSIONS`` is refused at ``register``; a gap, or a chain that stops short of
``CURRENT_VERSIONS``, is refused by ``validate()`` (the shipped steps in ``upgrades.py`` call it
at import, and ``upgrade`` re-validates lazily after any later ``register``).

The shipped steps live in ``streamer.schema.upgrades``; importing ``streamer.schema`` (which
any import of a submodule does first) registers them on ``REGISTRY``.
"""

from __future__ import annotations

import copy
import reprlib
from collections.abc import Callable, Mapping
from typing import Any, Final

import msgspec

from streamer.errors import (
    MigrationFailed,
    MigrationRegistryError,
    SchemaError,
    UnknownSchemaVersion,
)
from streamer.schema.records import CURRENT_VERSIONS

__all__ = [
    "CHUNK_NESTED_FIELDS",
    "REGISTRY",
    "MalformedRecord",
    "MigrationRegistry",
    "RawRecord",
    "StepFn",
    "migration",
    "nested_record_versions",
]

RawRecord = dict[str, Any]
StepFn = Callable[[RawRecord], RawRecord]

#: ChunkRecord list field → the record type every element of it must have. A test checks
#: this against ``ChunkRecord`` itself, so adding a nested list there cannot be forgotten here.
CHUNK_NESTED_FIELDS: Final[Mapping[str, str]] = {
    "characters": "character",
    "structures": "structure",
    "features": "feature",
    "societies": "society",
}


class MalformedRecord(SchemaError):
    """A record's plain data is not shaped like a record (no int ``schemaVersion``, no ``type``,
    a nested list that is not a list of records).

    It belongs in ``streamer/errors.py`` next to its siblings; it is defined here until the
    owner of that module takes it. The codec translates it into ``MalformedFile``.
    """


#: Versions beyond this are corruption, not a future release; refusing them early also keeps
#: a 5,000-digit int from a JSON payload out of error messages (int → str is capped).
_MAX_VERSION: Final = 2**31


def refuse_newer_nested(rv: Mapping[Any, Any], current: Mapping[str, int], *, where: str) -> None:
    """Refuse a chunk whose ``record_versions`` map names a nested record type not in
    ``current`` (a list added by a newer release, whose records a rewrite would drop) or a
    newer version of one: shared by the upgrade below and the codec's load-time screen, so
    the two never disagree. Values that are not ints are left to the caller.

    :raises UnknownSchemaVersion: names the type, the version when it is one, and ``where``.
    """
    for rtype, v in rv.items():
        now = current.get(rtype) if isinstance(rtype, str) else None
        if now is None:
            raise UnknownSchemaVersion(
                "record_versions names a nested record type this code does not know: "
                f"{_short(rtype)} (written by a newer release?); refusing the chunk rather "
                "than dropping those records",
                record_type="chunk",
                where=where,
            )
        if type(v) is int and v > now:
            raise UnknownSchemaVersion(
                f"record_versions says {rtype} records are v{_short(v)}, newer than this code "
                f"knows (v{now}); refusing rather than downgrading",
                record_type=rtype,
                schema_version=v if v <= _MAX_VERSION else None,
                where=where,
            )


def _short(value: Any) -> str:
    """A bounded repr for error messages about untrusted data."""
    try:
        return reprlib.repr(value)
    except ValueError:  # an int too long to format
        return f"<{type(value).__name__}>"


def _record_id(raw: Mapping[str, Any]) -> str | None:
    return _id_text(raw.get("id"))


def _id_text(rid: Any) -> str | None:
    if rid is None:
        return None
    return rid[:200] if isinstance(rid, str) else _short(rid)


def _step_name(fn: StepFn) -> str:
    module = getattr(fn, "__module__", None)
    name = getattr(fn, "__qualname__", None) or repr(fn)
    return f"{module}.{name}" if module else name


#: The record types that live in a chunk's lists.
_NESTED_TYPES: Final = frozenset(CHUNK_NESTED_FIELDS.values())

_COPY_ENC: Final = msgspec.msgpack.Encoder()
_COPY_DEC: Final = msgspec.msgpack.Decoder()


def _deep_copy(raw: RawRecord) -> RawRecord:
    # Plain decoded data survives a msgpack round trip exactly and it runs in C, several times
    # faster than copy.deepcopy (which dominated the slow decode path). Values msgpack cannot
    # carry (ints beyond 64 bits from a JSON payload) fall back to deepcopy.
    try:
        out = _COPY_DEC.decode(_COPY_ENC.encode(raw))
    except (OverflowError, TypeError, RecursionError):
        return copy.deepcopy(raw)
    assert isinstance(out, dict)
    return out


def _version_of(raw: Mapping[str, Any], *, record_type: str | None, where: str) -> int:
    version = raw.get("schemaVersion")
    # bool is an int subclass; True must not pass for version 1.
    if type(version) is not int or not 1 <= version <= _MAX_VERSION:
        raise MalformedRecord(
            f"record has no valid schemaVersion (got {_short(version)})",
            record_type=record_type,
            record_id=_record_id(raw),
            where=where,
        )
    return version


def nested_record_versions(raw_chunk: Mapping[str, Any]) -> dict[str, int]:
    """Lowest ``schemaVersion`` per nested record type present in a plain-data chunk.

    Elements that are not shaped like records are skipped; ``upgrade_chunk`` reports them.
    """
    out: dict[str, int] = {}
    for field, rtype in CHUNK_NESTED_FIELDS.items():
        items = raw_chunk.get(field)
        if not isinstance(items, list):
            continue
        for item in items:
            if not isinstance(item, dict):
                continue
            v = item.get("schemaVersion")
            if type(v) is int and (rtype not in out or v < out[rtype]):
                out[rtype] = v
    return out


class MigrationRegistry:
    """Steps per record type, validated into one chain per type ending at the current version."""

    def __init__(self, current_versions: Mapping[str, int] | None = None) -> None:
        # A copy: tests build registries with their own version tables, and a later change to
        # the shared table must not silently re-target an already validated chain.
        self._current: dict[str, int] = dict(
            CURRENT_VERSIONS if current_versions is None else current_versions
        )
        self._current_nested = {t: v for t, v in self._current.items() if t in _NESTED_TYPES}
        self._steps: dict[str, dict[int, StepFn]] = {}
        # chain[type][n - 1] is the step n → n+1; built by validate().
        self._chains: dict[str, tuple[StepFn, ...]] | None = None

    @property
    def current_versions(self) -> Mapping[str, int]:
        return self._current

    def register(self, record_type: str, from_version: int, fn: StepFn) -> None:
        """Add the step ``from_version → from_version + 1`` for ``record_type``.

        :raises MigrationRegistryError: unknown type, version < 1, a step that would go past the
            current version, or a second step for the same ``(type, from_version)``.
        """
        current = self._current.get(record_type)
        if current is None:
            raise MigrationRegistryError(
                f"no current version is known for record type {record_type!r}; "
                "add it to CURRENT_VERSIONS first",
                record_type=record_type,
                schema_version=from_version,
            )
        if type(from_version) is not int or from_version < 1:
            raise MigrationRegistryError(
                f"from_version must be an int >= 1, got {from_version!r}",
                record_type=record_type,
            )
        if from_version >= current:
            raise MigrationRegistryError(
                f"step v{from_version}→v{from_version + 1} ({_step_name(fn)}) goes past the "
                f"current version v{current}: the chain must end exactly at v{current}",
                record_type=record_type,
                schema_version=from_version,
            )
        steps = self._steps.setdefault(record_type, {})
        if from_version in steps:
            raise MigrationRegistryError(
                f"duplicate step v{from_version}→v{from_version + 1}: "
                f"{_step_name(steps[from_version])} is already registered, "
                f"refusing {_step_name(fn)}",
                record_type=record_type,
                schema_version=from_version,
            )
        steps[from_version] = fn
        self._chains = None

    def migration(self, record_type: str, from_version: int) -> Callable[[StepFn], StepFn]:
        """Decorator form of :meth:`register`; returns the function unchanged."""

        def deco(fn: StepFn) -> StepFn:
            self.register(record_type, from_version, fn)
            return fn

        return deco

    def validate(self) -> None:
        """Check every chain runs v1 → current with no gap. O(#steps + #types).

        :raises MigrationRegistryError: naming every type whose chain is broken and how.
        """
        problems: list[str] = []
        chains: dict[str, tuple[StepFn, ...]] = {}
        for rtype, current in sorted(self._current.items()):
            steps = self._steps.get(rtype, {})
            missing = [v for v in range(1, current) if v not in steps]
            if missing:
                have = ", ".join(f"v{v}→v{v + 1}" for v in sorted(steps)) or "no steps"
                top = max(steps, default=0)
                gaps = [v for v in missing if v < top]
                short = [v for v in missing if v > top]
                if gaps:
                    problems.append(
                        f"{rtype}: gap in the chain, no step from "
                        + ", ".join(f"v{v}→v{v + 1}" for v in gaps)
                        + f" (have {have})"
                    )
                if short:
                    problems.append(
                        f"{rtype}: chain ends at v{top + 1} but the current version is "
                        f"v{current}; missing "
                        + ", ".join(f"v{v}→v{v + 1}" for v in short)
                        + f" (have {have})"
                    )
                continue
            chains[rtype] = tuple(steps[v] for v in range(1, current))
        if problems:
            raise MigrationRegistryError("invalid migration chains: " + "; ".join(problems))
        self._chains = chains

    def _chain(self, record_type: str) -> tuple[StepFn, ...] | None:
        if self._chains is None:
            self.validate()
        assert self._chains is not None
        return self._chains.get(record_type)

    def upgrade(
        self, raw: RawRecord, *, where: str, consume: bool = False
    ) -> tuple[RawRecord, bool]:
        """Bring one record (plain data) to its current version.

        Pure: ``raw`` is never mutated. Returns ``(raw, False)`` — the same object — when it is
        already current, else ``(new_dict, True)``.

        Purity is the registry's job, not the steps': the first step receives a private deep
        copy of ``raw``, so even a step that edits its argument cannot reach the caller's data.
        A caller that hands ``raw`` over with ``consume=True`` (it was just decoded, nothing
        else refers to it, and the caller never reads it again) skips that copy: the steps
        then run on ``raw`` itself, which may be left modified. The batch migration and the
        codec's lazy decode do this; the result is the same either way.

        :raises MalformedRecord: no ``type`` string or no int ``schemaVersion`` >= 1.
        :raises UnknownSchemaVersion: the type is unknown, or the version is newer than current
            (never downgraded).
        :raises MigrationFailed: a step raised or returned something that is not the record;
            names the record id, type, version and step, chained to the original exception.
        """
        if not isinstance(raw, dict):
            raise MalformedRecord(f"record is not a map (got {type(raw).__name__})", where=where)
        rtype = raw.get("type")
        if not isinstance(rtype, str):
            raise MalformedRecord(
                f"record has no type string (got {_short(rtype)})",
                record_id=_record_id(raw),
                where=where,
            )
        version = _version_of(raw, record_type=rtype, where=where)
        current = self._current.get(rtype)
        if current is None:
            raise UnknownSchemaVersion(
                "unknown record type: written by newer code? refusing to touch it",
                record_type=rtype,
                record_id=_record_id(raw),
                schema_version=version,
                where=where,
            )
        if version == current:
            return raw, False
        if version > current:
            raise UnknownSchemaVersion(
                f"record is newer (v{version}) than this code knows (v{current}); "
                "refusing to downgrade or overwrite it",
                record_type=rtype,
                record_id=_record_id(raw),
                schema_version=version,
                where=where,
            )
        return self._run_chain(raw, rtype, version, current, where=where, consume=consume), True

    def _run_chain(
        self, raw: RawRecord, rtype: str, version: int, current: int, *, where: str, consume: bool
    ) -> RawRecord:
        """Steps ``version`` → ``current`` on a record already checked by :meth:`upgrade`."""
        chain = self._chain(rtype)
        assert chain is not None  # validate() guarantees a full chain for every version < current
        # Read before any step runs: a step that edits a consumed record must not blur which
        # record an error names.
        rid = raw.get("id")
        if consume:
            out = raw
        else:
            try:
                out = _deep_copy(raw)
            except RecursionError as exc:
                raise MalformedRecord(
                    "record is nested too deeply to migrate",
                    record_type=rtype,
                    record_id=_id_text(rid),
                    schema_version=version,
                    where=where,
                ) from exc
        for v in range(version, current):
            fn = chain[v - 1]
            try:
                nxt = fn(out)
            except Exception as exc:
                raise MigrationFailed(
                    f"migration step {_step_name(fn)} (v{v}→v{v + 1}) failed: {exc!r}",
                    record_type=rtype,
                    record_id=_id_text(rid),
                    schema_version=v,
                    where=where,
                ) from exc
            if not isinstance(nxt, dict) or nxt.get("type", rtype) != rtype:
                raise MigrationFailed(
                    f"migration step {_step_name(fn)} (v{v}→v{v + 1}) returned "
                    f"{type(nxt).__name__} that is not a {rtype!r} record",
                    record_type=rtype,
                    record_id=_id_text(rid),
                    schema_version=v,
                    where=where,
                )
            nxt["type"] = rtype
            nxt["schemaVersion"] = v + 1
            out = nxt
        return out

    def upgrade_chunk(
        self, raw_chunk: RawRecord, *, where: str, consume: bool = False
    ) -> tuple[RawRecord, bool]:
        """Upgrade a chunk record and every record nested in its lists; fix ``record_versions``.

        The chunk itself is upgraded first, so nested lists are read under the current chunk
        layout. ``changed`` is True when anything was rewritten, including a stale or missing
        ``record_versions`` (the stored bytes must be rewritten either way). Pure, like
        :meth:`upgrade`; returns the same object when nothing changed. ``consume=True`` hands
        ``raw_chunk`` over as in :meth:`upgrade`: no copies are made, and ``raw_chunk`` (and
        the records in it) may be left modified or be the returned object.

        :raises MalformedRecord: a nested list is not a list of records of its type.
        :raises UnknownSchemaVersion: a record, or ``record_versions``, names a newer version or
            an unknown nested type (data this code could not preserve on rewrite).
        :raises MigrationFailed: as :meth:`upgrade`.
        """
        # Checked before upgrading: another record type in a chunk slot is a misplaced or
        # corrupt payload, not a record from newer code.
        if not isinstance(raw_chunk, dict) or raw_chunk.get("type") != "chunk":
            got = raw_chunk.get("type") if isinstance(raw_chunk, dict) else raw_chunk
            raise MalformedRecord(f"expected a chunk record, got {_short(got)}", where=where)
        chunk, changed = self.upgrade(raw_chunk, where=where, consume=consume)
        stored_rv = chunk.get("record_versions", {})
        if not isinstance(stored_rv, dict):
            raise MalformedRecord(
                f"record_versions is not a map (got {type(stored_rv).__name__})",
                record_type="chunk",
                where=where,
            )
        # Dropping an entry we do not understand would drop the records it describes.
        refuse_newer_nested(stored_rv, self._current_nested, where=where)

        new_lists: dict[str, list[Any]] = {}
        # Lowest version per nested type present: after the loop every record is current
        # (or the loop raised), so this is what ``nested_record_versions`` would compute.
        fresh_rv: dict[str, int] = {}
        for field, rtype in CHUNK_NESTED_FIELDS.items():
            items = chunk.get(field)
            if items is None:
                continue
            if not isinstance(items, list):
                raise MalformedRecord(
                    f"chunk field {field!r} is not a list (got {type(items).__name__})",
                    record_type="chunk",
                    where=where,
                )
            if not items:
                continue
            current = self._current.get(rtype)
            new_items: list[Any] | None = None
            for i, item in enumerate(items):
                if not isinstance(item, dict) or item.get("type") != rtype:
                    got = item.get("type") if isinstance(item, dict) else type(item).__name__
                    raise MalformedRecord(
                        f"chunk field {field!r}[{i}] is not a {rtype!r} record (got {_short(got)})",
                        record_type=rtype,
                        record_id=_record_id(item) if isinstance(item, dict) else None,
                        where=where,
                    )
                v = item.get("schemaVersion")
                if type(v) is int and current is not None and 1 <= v <= current:
                    if v == current:
                        # Current: exactly what upgrade() would find, without the call.
                        if new_items is not None:
                            new_items.append(item)
                        continue
                    # Old: upgrade()'s checks are the ones just made.
                    up = self._run_chain(item, rtype, v, current, where=where, consume=consume)
                else:
                    up, _ = self.upgrade(item, where=where, consume=consume)  # raises
                if consume:
                    items[i] = up
                    changed = True
                    continue
                if new_items is None:
                    new_items = list(items[:i])
                new_items.append(up)
            if new_items is not None:
                new_lists[field] = new_items
            assert current is not None  # else upgrade() raised for the first record
            fresh_rv[rtype] = current

        if new_lists or changed:
            if chunk is raw_chunk and not consume:
                chunk = dict(chunk)
            chunk.update(new_lists)
            changed = True
        if fresh_rv != stored_rv:
            if chunk is raw_chunk and not consume:
                chunk = dict(chunk)
            chunk["record_versions"] = fresh_rv
            changed = True
        return chunk, changed


#: The process-wide registry; the shipped steps (``streamer.schema.upgrades``) register here.
REGISTRY: Final = MigrationRegistry()


def migration(record_type: str, from_version: int) -> Callable[[StepFn], StepFn]:
    """Register the decorated pure function as ``record_type`` step
    ``from_version → from_version + 1`` on :data:`REGISTRY`."""
    return REGISTRY.migration(record_type, from_version)
