"""The writer encodes each event's state itself (``events.encode``), from the fields it builds the
event with: the bytes must be the eventsourcing mapper's, byte for byte, or the hash chain and
every stored event would change (``tests/test_vectors.py`` pins them for known events)."""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import events

text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)
json_objects = st.dictionaries(text, json_values, max_size=4)
BY_TYPE: dict[str, st.SearchStrategy[Any]] = {
    "str": text,
    "str | None": st.none() | text,
    "list[str]": st.lists(text, max_size=3),
    "dict[str, Any]": json_objects,
    "dict[str, str]": st.dictionaries(text, text, max_size=3),
    "list[dict[str, str]]": st.lists(st.dictionaries(text, text, max_size=4), max_size=3),
}
COMMON = {"originator_id", "originator_version", "recorded_at", "meta"}


def test_every_event_field_has_a_strategy() -> None:
    for cls in events.EVENT_CLASSES:
        for field in dataclasses.fields(cls):
            assert field.name in COMMON or field.type in BY_TYPE, (cls, field)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(events.EVENT_CLASSES), json_objects, text, st.data())
def test_the_writers_encoding_is_the_mappers_for_every_event_class(
    cls: type[events.LedgerEvent], meta: dict[str, Any], recorded_at: str, data: st.DataObject
) -> None:
    fields = {
        f.name: data.draw(BY_TYPE[str(f.type)])
        for f in dataclasses.fields(cls)
        if f.name not in COMMON
    }
    event = cls(
        originator_id="main", originator_version=7, recorded_at=recorded_at, meta=meta, **fields
    )
    stored = events.MAPPER.to_stored_event(event)
    assert events.encode(cls, recorded_at, meta, fields) == stored.state


def test_a_versioned_event_stores_its_class_version() -> None:
    fields = {"asset": "USD/2", "posting_amount_max": None}
    state = events.encode(events.AssetDefined, "t", {}, fields)
    assert b'"class_version":2' in state
    assert b"class_version" not in events.encode(events.AccountFrozen, "t", {}, {"account": "a"})
