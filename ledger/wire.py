"""What crosses the writer process's socket: length-prefixed orjson frames of commands and
outcomes (``ledger serve --workers N``, ADR 0017).

A frame is a 4-byte big-endian length and that many bytes of JSON, at most
``limits.writer_frame_bytes_max``; a longer length is refused before anything is read (the peer
is broken, and the connection is closed). No pickle: a frame can only ever become the commands,
events and errors listed here, through their own constructors (so a command is validated again
on the writer's side). Integers that may exceed 64 bits (amounts) travel as strings of digits,
as they do in events.

Each dataclass field type of a command has one codec below; a command with a field of a type
not listed makes this module fail at import, so that a new field cannot be dropped silently.
"""

from __future__ import annotations

import dataclasses
import struct
import typing
from collections.abc import Callable
from datetime import date, datetime
from typing import Any

import orjson

from ledger import domain, errors, limits
from ledger.events import EVENT_CLASSES, LedgerEvent
from ledger.log import Committed, Outcome
from ledger.money import parse_asset

HEADER = struct.Struct(">I")


class FrameTooLarge(Exception):
    """A peer announced a frame over ``limits.writer_frame_bytes_max``: the connection is
    closed (a well-behaved peer never sends one: a request is bounded by the body limits)."""


def frame(message: Any) -> bytes:
    """One message as a frame: its length, then its JSON."""
    body = orjson.dumps(message)
    if len(body) > limits.writer_frame_bytes_max:
        raise FrameTooLarge(f"a frame of {len(body)} bytes")
    return HEADER.pack(len(body)) + body


class Frames:
    """Cuts a byte stream into messages (``feed`` returns every complete one)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        self._buffer += data
        messages = []
        start = 0
        buffer = self._buffer
        while len(buffer) - start >= HEADER.size:
            (size,) = HEADER.unpack_from(buffer, start)
            if size > limits.writer_frame_bytes_max:
                raise FrameTooLarge(f"a frame of {size} bytes announced")
            end = start + HEADER.size + size
            if len(buffer) < end:
                break
            messages.append(orjson.loads(memoryview(buffer)[start + HEADER.size : end]))
            start = end
        if start:
            del self._buffer[:start]
        return messages


# --- Commands ------------------------------------------------------------------------------

Encode = Callable[[Any], Any]
Decode = Callable[[Any], Any]


def _same(value: Any) -> Any:
    return value


def _optional(encode: Encode, decode: Decode) -> tuple[Encode, Decode]:
    return (
        lambda v: None if v is None else encode(v),
        lambda v: None if v is None else decode(v),
    )


def _postings_out(postings: tuple[domain.Posting, ...]) -> list[list[str]]:
    return [[p.debit, p.credit, str(p.asset), str(p.amount)] for p in postings]


def _postings_in(rows: list[list[str]]) -> tuple[domain.Posting, ...]:
    return tuple(domain.Posting(d, c, parse_asset(a), int(n)) for d, c, a, n in rows)


_CODECS: dict[str, tuple[Encode, Decode]] = {
    "str": (_same, _same),
    "bool": (_same, _same),
    "AccountType": (_same, _same),
    "GuardRule": (_same, _same),
    "dict[str, Any]": (_same, _same),
    "int | None": _optional(str, int),
    "datetime | None": _optional(datetime.isoformat, datetime.fromisoformat),
    "date": (date.isoformat, date.fromisoformat),
    "Asset": (str, parse_asset),
    "tuple[int, ...] | None": _optional(
        lambda t: [str(v) for v in t], lambda t: tuple(int(v) for v in t)
    ),
    "dict[str, int]": (
        lambda d: {k: str(v) for k, v in d.items()},
        lambda d: {k: int(v) for k, v in d.items()},
    ),
    "tuple[Posting, ...]": (_postings_out, _postings_in),
}

_FIELD_TYPES: dict[str, str] = {
    "key": "str",
    "postings": "tuple[Posting, ...]",
    "metadata": "dict[str, Any]",
    "pending": "bool",
    "timeout_s": "int | None",
    "effective_at": "datetime | None",
    "linked": "bool",
    "pending_key": "str",
    "amount": "int | None",
    "amounts": "tuple[int, ...] | None",
    "original_key": "str",
    "name": "str",
    "type": "AccountType",
    "account": "str",
    "rule": "GuardRule",
    "limits": "dict[str, int]",
    "frozen": "bool",
    "asset": "Asset",
    "posting_amount_max": "int | None",
    "transfer_key": "str",
    "through": "date",
    "reason": "str",
    "from_date": "date",
}
"""Each command field's type as ``ledger/domain.py`` declares it, by name (a name has one type
in every command). Stated here because compiled (setup.py, ``LEDGER_COMPILE=1``) a dataclass's
annotations are erased to classes (``tuple``, ``dict``); in pure Python each is checked
against the declaration below, at import, so this cannot drift from it."""

_COMMANDS: dict[str, tuple[type[Any], list[tuple[str, Encode, Decode]]]] = {}
for _cls in typing.get_args(domain.Command):
    _fields = []
    for _field in dataclasses.fields(_cls):
        if not _field.init:
            continue
        _type = _FIELD_TYPES.get(_field.name, "")
        declared = _field.type if isinstance(_field.type, str) else _type  # a str: pure Python
        if declared != _type or _type not in _CODECS:  # a new field: state it, give it a codec
            raise TypeError(f"ledger.wire: no codec for {_cls.__name__}.{_field.name}: {declared}")
        _fields.append((_field.name, *_CODECS[_type]))
    _COMMANDS[_cls.__name__] = (_cls, _fields)


def encode_command(command: domain.Command) -> list[Any]:
    """``[class name, field, field, ...]``, the fields in their declared order."""
    _, fields = _COMMANDS[type(command).__name__]
    return [type(command).__name__, *(out(getattr(command, name)) for name, out, _ in fields)]


def decode_command(data: list[Any]) -> domain.Command:
    """The command, through its constructor (which checks it again)."""
    cls, fields = _COMMANDS[data[0]]
    if len(data) != len(fields) + 1:
        raise ValueError(f"{data[0]} with {len(data) - 1} fields")
    command: domain.Command = cls(
        **{name: into(value) for (name, _, into), value in zip(fields, data[1:], strict=True)}
    )
    return command


# --- Outcomes: a committed event, or the error that refused the command --------------------

_EVENTS: dict[str, type[LedgerEvent]] = {cls.__name__: cls for cls in EVENT_CLASSES}
_ERRORS: dict[str, type[errors.LedgerError]] = {c.code: c for c in errors.all_error_classes()}


def encode_error(error: errors.LedgerError) -> list[Any]:
    return [error.code, error.detail, error.extra]


def decode_error(data: list[Any]) -> errors.LedgerError:
    code, detail, extra = data
    cls = _ERRORS.get(code, errors.LedgerError)
    error = cls(detail, **extra)
    if cls is errors.LedgerError:  # a code this side does not know (a newer writer?)
        error = errors.Unavailable(f"{code}: {detail}", **extra)
    return error


def encode_outcome(outcome: Outcome) -> list[Any]:
    """``["c", event class, event fields, hash hex, replayed]`` or ``["e", code, detail,
    extra]``."""
    if isinstance(outcome, Committed):
        event = outcome.event
        return ["c", type(event).__name__, vars(event), outcome.hash.hex(), outcome.replayed]
    return ["e", *encode_error(outcome)]


def decode_outcome(data: list[Any]) -> Outcome:
    if data[0] == "c":
        event = _EVENTS[data[1]](**data[2])
        return Committed(event, bytes.fromhex(data[3]), bool(data[4]))
    return decode_error(data[1:])
