"""Migration registry: chain validation, the shipped steps, errors, purity."""

from __future__ import annotations

import copy
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamer.errors import (
    MigrationFailed,
    MigrationRegistryError,
    SchemaError,
    UnknownSchemaVersion,
)
from streamer.schema.migrations import (
    CHUNK_NESTED_FIELDS,
    REGISTRY,
    MalformedRecord,
    MigrationRegistry,
)
from streamer.schema.records import (
    CURRENT_VERSIONS,
    NESTED_TYPES,
    Character,
    ChunkRecord,
    ItemStack,
    Society,
)


def _bump(rec: dict[str, Any]) -> dict[str, Any]:
    return dict(rec)


# -- chain validation -------------------------------------------------------------------


def test_gap_is_refused() -> None:
    reg = MigrationRegistry({"widget": 4})
    reg.register("widget", 1, _bump)
    reg.register("widget", 3, _bump)
    with pytest.raises(MigrationRegistryError, match=r"widget: gap .*v2→v3"):
        reg.validate()


def test_gap_is_found_lazily_by_upgrade_too() -> None:
    reg = MigrationRegistry({"widget": 4})
    reg.register("widget", 1, _bump)
    reg.register("widget", 3, _bump)
    with pytest.raises(MigrationRegistryError, match="gap"):
        reg.upgrade({"type": "widget", "schemaVersion": 1}, where="t")


def test_duplicate_is_refused_at_registration() -> None:
    reg = MigrationRegistry({"widget": 3})
    reg.register("widget", 1, _bump)
    with pytest.raises(MigrationRegistryError, match=r"duplicate step v1→v2.*_bump"):
        reg.register("widget", 1, _bump)


def test_step_past_current_is_refused() -> None:
    reg = MigrationRegistry({"widget": 3})
    with pytest.raises(MigrationRegistryError, match="must end exactly at v3"):
        reg.register("widget", 3, _bump)


def test_chain_short_of_current_is_refused() -> None:
    reg = MigrationRegistry({"widget": 4})
    reg.register("widget", 1, _bump)
    reg.register("widget", 2, _bump)
    with pytest.raises(MigrationRegistryError, match=r"chain ends at v3 .* current version is v4"):
        reg.validate()


def test_missing_chain_is_refused() -> None:
    reg = MigrationRegistry({"widget": 2, "gadget": 1})
    with pytest.raises(MigrationRegistryError, match=r"widget: chain ends at v1"):
        reg.validate()


def test_unknown_type_and_bad_version_are_refused() -> None:
    reg = MigrationRegistry({"widget": 3})
    with pytest.raises(MigrationRegistryError, match="CURRENT_VERSIONS"):
        reg.register("gizmo", 1, _bump)
    with pytest.raises(MigrationRegistryError, match=">= 1"):
        reg.register("widget", 0, _bump)


def test_decorator_registers_and_returns_function() -> None:
    reg = MigrationRegistry({"widget": 2})

    @reg.migration("widget", 1)
    def add_colour(rec: dict[str, Any]) -> dict[str, Any]:
        return {**rec, "colour": "red"}

    assert add_colour({"a": 1}) == {"a": 1, "colour": "red"}
    reg.validate()
    out, changed = reg.upgrade({"type": "widget", "schemaVersion": 1, "id": "w"}, where="t")
    assert changed
    assert out == {"type": "widget", "schemaVersion": 2, "id": "w", "colour": "red"}


def test_shipped_registry_is_valid_and_covers_every_type() -> None:
    REGISTRY.validate()
    assert dict(REGISTRY.current_versions) == CURRENT_VERSIONS


def test_chunk_nested_fields_match_chunk_record() -> None:
    info = mi.type_info(ChunkRecord)
    assert isinstance(info, mi.StructType)
    lists = {}
    for f in info.fields:
        if isinstance(f.type, mi.ListType) and isinstance(f.type.item_type, mi.StructType):
            lists[f.name] = f.type.item_type.cls
    assert {k: NESTED_TYPES[v] for k, v in CHUNK_NESTED_FIELDS.items()} == lists


# -- shipped steps ----------------------------------------------------------------------


CHAR_V1: dict[str, Any] = {
    "type": "character",
    "schemaVersion": 1,
    "id": "npc-7",
    "x": 10,
    "y": -3,
    "player_id": None,
    "name": "Ada King Lovelace",
    "hp": 80,
    "inventory": {"wood": 3, "axe": 1, "rope": 0, "debt": -2},
    "society_id": "s1",
}


def _as_character(raw: dict[str, Any]) -> Character:
    return msgspec.convert(raw, Character)


def test_character_v1_to_v3() -> None:
    out, changed = REGISTRY.upgrade(CHAR_V1, where="t")
    assert changed
    assert "name" not in out
    assert _as_character(out) == Character(
        id="npc-7",
        x=10,
        y=-3,
        given_name="Ada",
        family_name="King Lovelace",
        hp=80,
        inventory=[ItemStack("axe", 1), ItemStack("wood", 3)],
        society_id="s1",
    )


@pytest.mark.parametrize(
    ("name", "given", "family"),
    [("Ada", "Ada", ""), ("", "", ""), ("Ada Lovelace", "Ada", "Lovelace"), (None, "", "")],
)
def test_character_name_split(name: str | None, given: str, family: str) -> None:
    rec = {k: v for k, v in CHAR_V1.items() if k != "name"}
    if name is not None:
        rec["name"] = name
    out = _as_character(REGISTRY.upgrade(rec, where="t")[0])
    assert (out.given_name, out.family_name) == (given, family)


def test_character_v2_to_v3() -> None:
    v2 = {k: v for k, v in CHAR_V1.items() if k != "name"}
    v2 |= {"schemaVersion": 2, "given_name": "Ada", "family_name": "L", "inventory": {"b": 2}}
    out, changed = REGISTRY.upgrade(v2, where="t")
    assert changed
    assert out["schemaVersion"] == 3
    assert out["inventory"] == [{"item": "b", "count": 2}]
    assert _as_character(out).given_name == "Ada"


def test_society_v1_to_v2() -> None:
    v1 = {
        "type": "society",
        "schemaVersion": 1,
        "id": "s1",
        "name": "Guild",
        "x": 1,
        "y": 2,
        "members": ["a"],
        "allies": ["s2", "s3", "s2"],
    }
    out, changed = REGISTRY.upgrade(v1, where="t")
    assert changed
    assert "allies" not in out
    assert msgspec.convert(out, Society) == Society(
        id="s1", name="Guild", x=1, y=2, members=["a"], relations={"s2": 100, "s3": 100}
    )


def test_current_record_is_returned_unchanged() -> None:
    rec = {"type": "feature", "schemaVersion": 1, "id": "f", "kind": "tree", "x": 0, "y": 0}
    out, changed = REGISTRY.upgrade(rec, where="t")
    assert out is rec
    assert not changed


# -- errors -----------------------------------------------------------------------------


def test_newer_version_is_refused() -> None:
    rec = dict(CHAR_V1, schemaVersion=4)
    with pytest.raises(UnknownSchemaVersion) as ei:
        REGISTRY.upgrade(rec, where="regions/r.0.0.region")
    err = ei.value
    assert (err.record_type, err.record_id, err.schema_version) == ("character", "npc-7", 4)
    assert err.where == "regions/r.0.0.region"
    assert "downgrade" in str(err)


def test_unknown_type_is_refused() -> None:
    with pytest.raises(UnknownSchemaVersion, match="unknown record type"):
        REGISTRY.upgrade({"type": "vehicle", "schemaVersion": 1}, where="t")


@pytest.mark.parametrize(
    "rec",
    [
        {"type": "character", "id": "a"},
        {"type": "character", "schemaVersion": "1"},
        {"type": "character", "schemaVersion": True},
        {"type": "character", "schemaVersion": 0},
        {"type": "character", "schemaVersion": 10**5000},
        {"schemaVersion": 1},
        {"type": 5, "schemaVersion": 1},
    ],
)
def test_malformed_record(rec: dict[str, Any]) -> None:
    with pytest.raises(MalformedRecord) as ei:
        REGISTRY.upgrade(rec, where="here")
    assert isinstance(ei.value, SchemaError)
    assert "here" in str(ei.value)


def test_failing_step_names_record_and_chains_cause() -> None:
    rec = dict(CHAR_V1, id="hero", name=42)
    with pytest.raises(MigrationFailed) as ei:
        REGISTRY.upgrade(rec, where="regions/r.1.2.region")
    err = ei.value
    assert (err.record_type, err.record_id, err.schema_version) == ("character", "hero", 1)
    assert err.where == "regions/r.1.2.region"
    assert "character_v1_to_v2" in str(err)
    assert isinstance(err.__cause__, TypeError)


def test_failing_second_step_names_its_version() -> None:
    rec = dict(CHAR_V1, inventory=["not", "a", "map"])
    with pytest.raises(MigrationFailed) as ei:
        REGISTRY.upgrade(rec, where="t")
    assert ei.value.schema_version == 2
    assert "character_v2_to_v3" in str(ei.value)


def test_step_returning_garbage_fails() -> None:
    reg = MigrationRegistry({"widget": 2})
    reg.register("widget", 1, lambda rec: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(MigrationFailed, match="NoneType"):
        reg.upgrade({"type": "widget", "schemaVersion": 1, "id": "w"}, where="t")
    reg2 = MigrationRegistry({"widget": 2})
    reg2.register("widget", 1, lambda rec: {**rec, "type": "gadget"})
    with pytest.raises(MigrationFailed, match="not a 'widget' record"):
        reg2.upgrade({"type": "widget", "schemaVersion": 1, "id": "w"}, where="t")


# -- purity -----------------------------------------------------------------------------


def test_upgrade_does_not_mutate_input() -> None:
    rec = copy.deepcopy(CHAR_V1)
    REGISTRY.upgrade(rec, where="t")
    assert rec == CHAR_V1


def test_upgrade_protects_input_from_a_mutating_step() -> None:
    reg = MigrationRegistry({"widget": 2})

    def sloppy(rec: dict[str, Any]) -> dict[str, Any]:
        rec["tags"].append("x")
        rec["new"] = 1
        return rec

    reg.register("widget", 1, sloppy)
    rec = {"type": "widget", "schemaVersion": 1, "tags": ["a"]}
    out, _ = reg.upgrade(rec, where="t")
    assert rec == {"type": "widget", "schemaVersion": 1, "tags": ["a"]}
    assert out == {"type": "widget", "schemaVersion": 2, "tags": ["a", "x"], "new": 1}


def test_consume_gives_the_same_result_without_copying() -> None:
    pure, changed = REGISTRY.upgrade(copy.deepcopy(CHAR_V1), where="t")
    handed_over = copy.deepcopy(CHAR_V1)
    consumed, changed2 = REGISTRY.upgrade(handed_over, where="t", consume=True)
    assert changed and changed2 and consumed == pure
    # Current records are returned as they are either way.
    cur, changed3 = REGISTRY.upgrade(pure, where="t", consume=True)
    assert cur is pure and not changed3


def test_consume_names_the_record_even_if_a_step_mangles_it() -> None:
    reg = MigrationRegistry({"widget": 2})

    def mangle_then_fail(rec: dict[str, Any]) -> dict[str, Any]:
        rec.pop("id")
        raise ValueError("boom")

    reg.register("widget", 1, mangle_then_fail)
    with pytest.raises(MigrationFailed, match="boom") as ei:
        reg.upgrade({"type": "widget", "schemaVersion": 1, "id": "w-1"}, where="t", consume=True)
    assert ei.value.record_id == "w-1" and ei.value.schema_version == 1


def test_upgrade_chunk_consume_matches_pure() -> None:
    current_char = msgspec.to_builtins(Character(id="c", x=0, y=0))
    raw = _chunk(
        characters=[current_char, CHAR_V1],
        societies=[
            {
                "type": "society",
                "schemaVersion": 1,
                "id": "s",
                "name": "s",
                "x": 0,
                "y": 0,
                "allies": ["t"],
            }
        ],
        record_versions={"character": 1},
    )
    pure, changed = REGISTRY.upgrade_chunk(copy.deepcopy(raw), where="t")
    consumed, changed2 = REGISTRY.upgrade_chunk(copy.deepcopy(raw), where="t", consume=True)
    assert changed and changed2 and consumed == pure
    assert pure["record_versions"] == {"character": 3, "society": 2}


@settings(deadline=None)
@given(
    name=st.text(max_size=20),
    inventory=st.dictionaries(st.text(max_size=6), st.integers(-5, 5), max_size=6),
)
def test_character_v1_upgrade_property(name: str, inventory: dict[str, int]) -> None:
    rec = dict(CHAR_V1, name=name, inventory=inventory)
    before = copy.deepcopy(rec)
    out = _as_character(REGISTRY.upgrade(rec, where="t")[0])
    assert rec == before
    assert out.given_name == name.partition(" ")[0]
    assert out.family_name == name.partition(" ")[2]
    assert [s.item for s in out.inventory] == sorted(k for k, v in inventory.items() if v > 0)
    assert all(s.count == inventory[s.item] for s in out.inventory)


# -- upgrade_chunk ----------------------------------------------------------------------


def _chunk(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "chunk",
        "schemaVersion": 1,
        "cx": 0,
        "cy": 0,
        "generator": "g",
        "generator_version": 1,
        "base_fingerprint": 0,
        "characters": [],
        "structures": [],
        "features": [],
        "societies": [],
        "record_versions": {},
    }
    base.update(kw)
    return base


def test_upgrade_chunk_upgrades_nested_and_fixes_record_versions() -> None:
    current_char = msgspec.to_builtins(Character(id="c", x=0, y=0))
    raw = _chunk(
        characters=[current_char, CHAR_V1],
        record_versions={"character": 1},
    )
    before = copy.deepcopy(raw)
    out, changed = REGISTRY.upgrade_chunk(raw, where="t")
    assert changed
    assert raw == before
    assert out["characters"][0] == current_char
    assert out["characters"][1]["schemaVersion"] == 3
    assert out["record_versions"] == {"character": 3}
    rec = msgspec.convert(out, ChunkRecord)
    assert rec.characters[1].given_name == "Ada"


def test_upgrade_chunk_current_is_unchanged() -> None:
    char = msgspec.to_builtins(Character(id="c", x=0, y=0))
    raw = _chunk(characters=[char], record_versions={"character": 3})
    out, changed = REGISTRY.upgrade_chunk(raw, where="t")
    assert out is raw
    assert not changed


def test_upgrade_chunk_stale_record_versions_is_a_change() -> None:
    raw = _chunk(record_versions={"character": 1})
    out, changed = REGISTRY.upgrade_chunk(raw, where="t")
    assert changed
    assert out["record_versions"] == {}
    assert raw["record_versions"] == {"character": 1}


@pytest.mark.parametrize(
    ("raw", "exc", "match"),
    [
        (_chunk(record_versions={"vehicle": 1}), UnknownSchemaVersion, "does not know"),
        (_chunk(record_versions={"character": 9}), UnknownSchemaVersion, "newer"),
        (_chunk(characters=[dict(CHAR_V1, schemaVersion=9)]), UnknownSchemaVersion, "npc-7"),
        (_chunk(schemaVersion=2), UnknownSchemaVersion, "newer"),
        (_chunk(characters={"a": 1}), MalformedRecord, "not a list"),
        (
            _chunk(characters=[{"type": "feature", "schemaVersion": 1}]),
            MalformedRecord,
            "'feature'",
        ),
        (_chunk(characters=[7]), MalformedRecord, "not a 'character'"),
        (_chunk(record_versions=[1]), MalformedRecord, "not a map"),
        (dict(CHAR_V1, schemaVersion=3), MalformedRecord, "expected a chunk"),
    ],
)
def test_upgrade_chunk_errors(raw: dict[str, Any], exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        REGISTRY.upgrade_chunk(raw, where="t")
