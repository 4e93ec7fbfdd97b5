"""The shipped migration steps, registered on ``REGISTRY`` at import.

Each step is pure: it builds a new dict and never edits its argument. It raises (``TypeError``
/ ``ValueError``) on data it cannot convert faithfully rather than guess; the registry turns
that into ``MigrationFailed`` naming the record. ``schemaVersion`` and ``type`` are written by
the registry, so a step only reshapes fields.

Keep old steps even after a batch migration: a snapshot restored from before it still holds
old records, and lazy upgrade on load must read them.
"""

from __future__ import annotations

from typing import Any

from streamer.schema.migrations import REGISTRY, RawRecord, migration

__all__ = ["character_v1_to_v2", "character_v2_to_v3", "society_v1_to_v2"]


def _is_int(v: Any) -> bool:
    return type(v) is int


@migration("character", 1)
def character_v1_to_v2(rec: RawRecord) -> RawRecord:
    """Split ``name`` into ``given_name`` / ``family_name`` on the first space.

    v1: ``{id, x, y, player_id?, name: str, hp?, inventory: {item: count}, society_id?}``
    v2: ``{id, x, y, player_id?, given_name: str, family_name: str, hp?,
    inventory: {item: count}, society_id?}``

    ``"Ada King Lovelace"`` → ``"Ada"`` / ``"King Lovelace"``; ``"Ada"`` → ``"Ada"`` / ``""``.
    A missing name gives two empty names (v1 defaulted it to empty).
    """
    name = rec.get("name", "")
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, got {type(name).__name__}")
    given, _, family = name.partition(" ")
    out = {k: v for k, v in rec.items() if k != "name"}
    out["given_name"] = given
    out["family_name"] = family
    return out


@migration("character", 2)
def character_v2_to_v3(rec: RawRecord) -> RawRecord:
    """Turn the ``inventory`` map into a list of item stacks.

    v2: ``inventory: {item: count}`` (e.g. ``{"wood": 3, "axe": 1, "rope": 0}``)
    v3: ``inventory: [{"item": str, "count": int}]`` sorted by item, empty stacks dropped
    (``[{"item": "axe", "count": 1}, {"item": "wood", "count": 3}]``).

    A count of 0 or less meant "none" in v2, so it is dropped rather than kept as a stack.
    """
    inventory = rec.get("inventory", {})
    if not isinstance(inventory, dict):
        raise TypeError(f"inventory must be a map of item to count, got {type(inventory).__name__}")
    stacks: list[dict[str, Any]] = []
    for item, count in inventory.items():
        if not isinstance(item, str) or not _is_int(count):
            raise TypeError(f"inventory entry {item!r}: {count!r} is not item (str) → count (int)")
        if count > 0:
            stacks.append({"item": item, "count": count})
    stacks.sort(key=lambda s: str(s["item"]))
    out = dict(rec)
    out["inventory"] = stacks
    return out


@migration("society", 1)
def society_v1_to_v2(rec: RawRecord) -> RawRecord:
    """Replace the ``allies`` list by a ``relations`` map of standings.

    v1: ``{id, name, x, y, members: [str], allies: [society_id]}``
    v2: ``{id, name, x, y, members: [str], relations: {society_id: standing}}``

    Every v1 ally becomes standing 100 (the top of the scale); duplicates collapse.
    """
    allies = rec.get("allies", [])
    if not isinstance(allies, list) or not all(isinstance(a, str) for a in allies):
        raise TypeError(f"allies must be a list of society ids, got {allies!r}")
    out = {k: v for k, v in rec.items() if k != "allies"}
    out["relations"] = dict.fromkeys(allies, 100)
    return out


# Import-time check: a gap or a chain short of CURRENT_VERSIONS fails loudly at startup, not
# on the first old record that happens to be loaded in production.
REGISTRY.validate()
