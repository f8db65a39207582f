"""Known-answer vectors for every format that is hashed, signed or stored for auditors.

Each expected value is computed here from the formula in ``docs/audit.md`` with plain
``hashlib`` and ``json`` (never with the function under test), and some are pinned as fixed
hex, so that a change to a byte layout (byte order, separator, prefix, field set) fails here
even when it agrees with itself everywhere else. The Merkle roots and proofs pinned below are
the test vectors that Certificate Transparency implementations share (RFC 6962/9162 trees over
the eight leaves ``"", 00, 10, 2021, 3031, 40414243, 5051…57, 6061…6f``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ledger import audit, domain, log, merkle, postgres
from ledger.events import (
    MAPPER,
    AccountOpened,
    PendingTransferExpired,
    TransferPending,
    TransferPosted,
)
from ledger.money import Asset
from ledger.service import LedgerService

USD = Asset("USD", 2)
AT = "2026-11-24T12:00:00.000000+00:00"
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def sha(*parts: bytes) -> bytes:
    return hashlib.sha256(b"".join(parts)).digest()


def canonical(obj: Any) -> bytes:
    """Canonical JSON as docs/audit.md states it: keys sorted, no spaces, UTF-8 unescaped."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def h(text: str) -> bytes:
    return bytes.fromhex(text)


# --- The hash chain (ledger/log.py, schema.sql) ------------------------------------------------


def test_the_genesis_hash_is_sha256_of_the_prefix_and_the_ledger_name() -> None:
    assert log.genesis_hash("main") == sha(b"ledger-genesis:main")
    assert log.genesis_hash("main").hex() == (
        "d6846e7488160d73b08bbff346a88ed8d54237b1c6266683080eb5656e1bdf6e"
    )
    assert log.genesis_hash("caf\u00e9") == sha("ledger-genesis:caf\u00e9".encode())


def test_the_chain_hash_is_previous_position_big_endian_topic_zero_state() -> None:
    previous = bytes(range(32))
    state = b'{"a":1}'
    topic = "ledger.events:TransferPosted"
    expected = sha(previous, b"\0\0\0\0\0\0\0\x07", topic.encode(), b"\0", state)
    assert log.chain_hash(previous, 7, topic, state) == expected
    # Positions past one byte and past four bytes: all 8 bytes, most significant first.
    for position, eight in ((256, b"\0\0\0\0\0\0\x01\0"), (2**32 + 5, b"\0\0\0\x01\0\0\0\x05")):
        assert log.chain_hash(previous, position, "T", state) == sha(previous, eight, b"T\0", state)


def test_the_chain_hash_pins_fixed_values() -> None:
    genesis = log.genesis_hash("main")
    first = log.chain_hash(genesis, 1, "ledger.events:LedgerCreated", b"{}")
    second = log.chain_hash(first, 2, "ledger.events:AssetDefined", b'{"asset":"USD/2"}')
    assert first.hex() == "15a9dc66351bdb50bc20ccaaeea48df9a85b0a58fafd7cddb81ce7ee608749a4"
    assert second.hex() == "ea494c8f254fb3d24e2943d94fdeeef94ea8b64734a53bdab71985a098cc8f7a"


# --- Merkle trees (ledger/merkle.py, RFC 9162 §2.1) --------------------------------------------

CT_LEAVES = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    bytes(range(0x50, 0x58)),
    bytes(range(0x60, 0x70)),
]
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
# (leaf index, tree size) -> audit path; (first size, second size) -> consistency proof.
CT_INCLUSION = {
    (0, 1): [],
    (0, 8): [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (5, 8): [
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
    (2, 3): ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
    (1, 5): [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    ],
}
CT_CONSISTENCY = {
    (1, 1): [],
    (1, 8): CT_INCLUSION[(0, 8)],
    (6, 8): [
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
    (2, 5): [
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    ],
}


def rfc_leaf(data: bytes) -> bytes:
    return sha(b"\x00", data)


def rfc_split(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def rfc_mth(data: list[bytes]) -> bytes:
    """MTH(D[n]) over leaf data, RFC 9162 §2.1.1, recursively."""
    if not data:
        return sha(b"")
    if len(data) == 1:
        return rfc_leaf(data[0])
    k = rfc_split(len(data))
    return sha(b"\x01", rfc_mth(data[:k]), rfc_mth(data[k:]))


def rfc_path(m: int, data: list[bytes]) -> list[bytes]:
    """PATH(m, D[n]), RFC 9162 §2.1.3.1."""
    if len(data) == 1:
        return []
    k = rfc_split(len(data))
    if m < k:
        return [*rfc_path(m, data[:k]), rfc_mth(data[k:])]
    return [*rfc_path(m - k, data[k:]), rfc_mth(data[:k])]


def rfc_subproof(m: int, data: list[bytes], complete: bool) -> list[bytes]:
    """SUBPROOF(m, D[n], b), RFC 9162 §2.1.4.1."""
    n = len(data)
    if m == n:
        return [] if complete else [rfc_mth(data)]
    k = rfc_split(n)
    if m <= k:
        return [*rfc_subproof(m, data[:k], complete), rfc_mth(data[k:])]
    return [*rfc_subproof(m - k, data[k:], False), rfc_mth(data[:k])]


def test_the_merkle_leaf_and_node_hashes_use_prefixes_zero_and_one() -> None:
    assert merkle.leaf_hash(b"abc") == sha(b"\x00abc")
    assert merkle.node_hash(b"L" * 32, b"R" * 32) == sha(b"\x01", b"L" * 32, b"R" * 32)
    assert merkle.leaf_hash(b"").hex() == CT_ROOTS[0]


def test_a_merkle_leaf_is_position_big_endian_topic_zero_state() -> None:
    data = merkle.leaf_data(258, "ledger.events:TransferPosted", b'{"k":"v"}')
    assert data == b"\0\0\0\0\0\0\x01\x02ledger.events:TransferPosted\x00" + b'{"k":"v"}'


def test_the_merkle_roots_are_the_certificate_transparency_vectors() -> None:
    hashes = [merkle.leaf_hash(d) for d in CT_LEAVES]
    for n in range(1, 9):
        assert merkle.root(hashes[:n]).hex() == CT_ROOTS[n - 1] == rfc_mth(CT_LEAVES[:n]).hex()
    assert merkle.root([]) == sha(b"")


def test_inclusion_proofs_are_the_certificate_transparency_vectors() -> None:
    hashes = [merkle.leaf_hash(d) for d in CT_LEAVES]
    for (index, size), path in CT_INCLUSION.items():
        proof = merkle.inclusion_proof(index, hashes[:size])
        assert (
            [p.hex() for p in proof] == path == [p.hex() for p in rfc_path(index, CT_LEAVES[:size])]
        )
        top = h(CT_ROOTS[size - 1])
        assert merkle.verify_inclusion(hashes[index], index, size, [h(p) for p in path], top)


def test_consistency_proofs_are_the_certificate_transparency_vectors() -> None:
    for (first, second), path in CT_CONSISTENCY.items():
        hashes = [merkle.leaf_hash(d) for d in CT_LEAVES[:second]]
        proof = merkle.consistency_proof(first, hashes)
        independent = rfc_subproof(first, CT_LEAVES[:second], True)
        assert [p.hex() for p in proof] == path == [p.hex() for p in independent]
        assert merkle.verify_consistency(
            first, second, h(CT_ROOTS[first - 1]), h(CT_ROOTS[second - 1]), [h(p) for p in path]
        )


def test_every_proof_up_to_seventeen_leaves_matches_the_rfc_definitions() -> None:
    data = [b"leaf %d" % i for i in range(17)]
    hashes = [rfc_leaf(d) for d in data]
    for n in range(1, 18):
        top = rfc_mth(data[:n])
        assert merkle.root(hashes[:n]) == top
        for i in range(n):
            path = rfc_path(i, data[:n])
            assert merkle.inclusion_proof(i, hashes[:n]) == path
            assert merkle.verify_inclusion(hashes[i], i, n, path, top)
        for m in range(1, n + 1):
            proof = rfc_subproof(m, data[:n], True)
            assert merkle.consistency_proof(m, hashes[:n]) == proof
            assert merkle.verify_consistency(m, n, rfc_mth(data[:m]), top, proof)


# --- Canonical event bytes (ledger/events.py) -------------------------------------------------


def test_a_stored_event_is_its_fields_as_canonical_json_without_ledger_and_position() -> None:
    event = TransferPosted(
        originator_id="main",
        originator_version=5,
        recorded_at=AT,
        meta={"request_id": "r1", "actor": "k1"},
        key="deposit-1",
        postings=[{"debit": "bank", "credit": "users:alice", "asset": "USD/2", "amount": "1500"}],
        metadata={"z": 1, "note": "caf\u00e9", "a": [True, None]},
        effective_at=AT,
    )
    stored = MAPPER.to_stored_event(event)
    assert stored.originator_id == "main" and stored.originator_version == 5
    assert stored.topic == "ledger.events:TransferPosted"
    expected = (
        b'{"effective_at":"2026-11-24T12:00:00.000000+00:00","key":"deposit-1",'
        b'"meta":{"actor":"k1","request_id":"r1"},'
        b'"metadata":{"a":[true,null],"note":"caf\xc3\xa9","z":1},'
        b'"postings":[{"amount":"1500","asset":"USD/2","credit":"users:alice","debit":"bank"}],'
        b'"recorded_at":"2026-11-24T12:00:00.000000+00:00"}'
    )
    assert stored.state == expected
    fields = {
        k: v for k, v in vars(event).items() if k not in ("originator_id", "originator_version")
    }
    assert stored.state == canonical(fields)


@pytest.mark.parametrize(
    "event",
    [
        TransferPending(
            originator_id="m",
            originator_version=9,
            recorded_at=AT,
            meta={},
            key="h",
            postings=[{"debit": "a", "credit": "b", "asset": "BTC/8", "amount": "1"}],
            metadata={},
            effective_at=AT,
            expires_at=None,
        ),
        PendingTransferExpired(
            originator_id="m",
            originator_version=10,
            recorded_at=AT,
            meta={},
            pending_key="h",
            expires_at=AT,
        ),
        AccountOpened(
            originator_id="m",
            originator_version=3,
            recorded_at=AT,
            meta={},
            account="a:b",
            type="asset",
            metadata={"\u00e9": "\u2028", "ctl": "\n"},
        ),
    ],
)
def test_every_event_kind_stores_canonical_json_of_its_fields(event: Any) -> None:
    stored = MAPPER.to_stored_event(event)
    fields = {
        k: v for k, v in vars(event).items() if k not in ("originator_id", "originator_version")
    }
    assert stored.state == canonical(fields)
    assert stored.topic == f"ledger.events:{type(event).__name__}"


def test_canonical_json_writes_exponents_without_leading_zeros_and_escapes_only_controls() -> None:
    event = AccountOpened(
        originator_id="m",
        originator_version=3,
        recorded_at=AT,
        meta={},
        account="a",
        type="asset",
        metadata={"f": 1.5e-7, "g": 1e16, "s": '\x1f\u2028/"\\'},
    )
    state = MAPPER.to_stored_event(event).state
    assert b'"metadata":{"f":1.5e-7,"g":1e+16,"s":"\\u001f\xe2\x80\xa8/\\"\\\\"}' in state


# --- Every event kind as the write path makes it ---------------------------------------------
#
# One command of each kind through the write path's group (ledger/log.py ``_Group``, in memory):
# the stored bytes of each event, and the chain over them recomputed with hashlib.


def scripted_group() -> tuple[log._Group, list[domain.Command]]:
    accounts = {n: domain.Account(i + 1, n, "liability", {}, i + 2) for i, n in enumerate("abc")}
    state = domain.LedgerState({"USD": 2}, accounts, {})
    loaded = log._Loaded(4, bytes(32), NOW, {}, state, {"USD": 1}, [], [9])
    group = log._Group(log.LedgerRef(1, "main"), loaded)

    def one(debit: str, credit: str, amount: int) -> tuple[domain.Posting, ...]:
        return (domain.Posting(debit, credit, USD, amount),)

    commands: list[domain.Command] = [
        domain.DefineAsset(Asset("XAU", 4), 1000),
        domain.OpenAccount("d", "asset", {"n": 1}),
        domain.SetGuard("a", "debits_must_not_exceed_credits", {"USD": 500}),
        domain.PostTransfer("t1", one("a", "b", 150), {"o": 1}),
        domain.PostTransfer(
            "h1",
            one("b", "c", 40),
            pending=True,
            timeout_s=60,
            effective_at=NOW - timedelta(hours=1),
        ),
        domain.PostPending("p1", "h1", 30, {"m": 2}),
        domain.PostTransfer("h2", one("b", "c", 5), pending=True),
        domain.VoidPending("v1", "h2"),
        domain.ReverseTransfer("r1", "t1", 50),
        domain.SetFrozen("c", True),
        domain.SetFrozen("c", False),
        domain.UpdateAccountMetadata("d", {"x": "y"}),
        domain.CloseAccount("d"),
        domain.PostTransfer("h3", one("a", "c", 7), pending=True, timeout_s=1),
        domain.ExpirePending("h3"),
    ]
    return group, commands


SCRIPTED_EVENTS = [
    (
        "AssetDefined",
        b'{"asset":"XAU/4","class_version":2,"meta":{"actor":"k"},'
        b'"posting_amount_max":"1000",'
        b'"recorded_at":"2026-11-24T12:00:00.000000+00:00"}',
    ),
    (
        "AccountOpened",
        b'{"account":"d","meta":{"actor":"k"},"metadata":{"n":1},'
        b'"recorded_at":"2026-11-24T12:00:00.000000+00:00","type":"asset"}',
    ),
    (
        "AccountGuardSet",
        b'{"account":"a","limits":{"USD/2":"500"},"meta":{"actor":"k"},'
        b'"recorded_at":"2026-11-24T12:00:00.000000+00:00",'
        b'"rule":"debits_must_not_exceed_credits"}',
    ),
    (
        "TransferPosted",
        b'{"effective_at":"2026-11-24T12:00:00.000000+00:00","key":"t1",'
        b'"meta":{"actor":"k"},"metadata":{"o":1},"postings":[{"amount":"150",'
        b'"asset":"USD/2","credit":"b","debit":"a"}],'
        b'"recorded_at":"2026-11-24T12:00:00.000000+00:00"}',
    ),
    (
        "TransferPending",
        b'{"effective_at":"2026-11-24T11:00:00.000000+00:00",'
        b'"expires_at":"2026-11-24T12:01:00.000000+00:00","key":"h1",'
        b'"meta":{"actor":"k"},"metadata":{},"postings":[{"amount":"40",'
        b'"asset":"USD/2","credit":"c","debit":"b"}],'
        b'"recorded_at":"2026-11-24T12:00:00.000000+00:00"}',
    ),
    (
        "PendingTransferPosted",
        b'{"effective_at":"2026-11-24T12:00:00.000000+00:00","key":"p1",'
        b'"meta":{"actor":"k"},"metadata":{"m":2},"pending_key":"h1",'
        b'"postings":[{"amount":"30","asset":"USD/2","credit":"c","debit":"b"}],'
        b'"recorded_at":"2026-11-24T12:00:00.000000+00:00"}',
    ),
    (
        "TransferPending",
        b'{"effective_at":"2026-11-24T12:00:00.000000+00:00","expires_at":null,'
        b'"key":"h2","meta":{"actor":"k"},"metadata":{},"postings":[{"amount":"5",'
        b'"asset":"USD/2","credit":"c","debit":"b"}],'
        b'"recorded_at":"2026-11-24T12:00:00.000000+00:00"}',
    ),
    (
        "PendingTransferVoided",
        b'{"key":"v1","meta":{"actor":"k"},"metadata":{},"pending_key":"h2",'
        b'"recorded_at":"2026-11-24T12:00:00.000000+00:00"}',
    ),
    (
        "TransferReversed",
        b'{"effective_at":"2026-11-24T12:00:00.000000+00:00","key":"r1",'
        b'"meta":{"actor":"k"},"metadata":{},"original_key":"t1",'
        b'"postings":[{"amount":"50","asset":"USD/2","credit":"a","debit":"b"}],'
        b'"recorded_at":"2026-11-24T12:00:00.000000+00:00"}',
    ),
    (
        "AccountFrozen",
        b'{"account":"c","meta":{"actor":"k"},"recorded_at":"2026-11-24T12:00:00.000000+00:00"}',
    ),
    (
        "AccountUnfrozen",
        b'{"account":"c","meta":{"actor":"k"},"recorded_at":"2026-11-24T12:00:00.000000+00:00"}',
    ),
    (
        "AccountMetadataUpdated",
        b'{"account":"d","meta":{"actor":"k"},"metadata":{"x":"y"},'
        b'"recorded_at":"2026-11-24T12:00:00.000000+00:00"}',
    ),
    (
        "AccountClosed",
        b'{"account":"d","meta":{"actor":"k"},"recorded_at":"2026-11-24T12:00:00.000000+00:00"}',
    ),
    (
        "TransferPending",
        b'{"effective_at":"2026-11-24T12:00:00.000000+00:00",'
        b'"expires_at":"2026-11-24T12:00:01.000000+00:00","key":"h3",'
        b'"meta":{"actor":"k"},"metadata":{},"postings":[{"amount":"7",'
        b'"asset":"USD/2","credit":"c","debit":"a"}],'
        b'"recorded_at":"2026-11-24T12:00:00.000000+00:00"}',
    ),
    (
        "PendingTransferExpired",
        b'{"expires_at":"2026-11-24T12:00:01.000000+00:00","meta":{"actor":"k"},'
        b'"pending_key":"h3","recorded_at":"2026-11-24T12:00:00.000000+00:00"}',
    ),
]
SCRIPTED_HEAD = "b00d516299fd4c3b84312b0f8d88035f587a755e9f741ace44fbf5c7c284dcb9"


def test_every_event_kind_is_stored_as_these_bytes_and_chained_by_the_formula() -> None:
    group, commands = scripted_group()
    for command in commands:
        outcome = group.decide(command, {"actor": "k"})
        assert isinstance(outcome, log.Committed), outcome
    stored = [(a.event.position, a.stored.topic, a.stored.state, a.hash) for a in group.accepted]
    assert [(t, s) for _, t, s, _ in stored] == [
        (f"ledger.events:{name}", state) for name, state in SCRIPTED_EVENTS
    ]
    previous = bytes(32)  # the head the group started from, at position 4
    for position, topic, state, digest in stored:
        previous = sha(previous, position.to_bytes(8, "big"), topic.encode(), b"\0", state)
        assert digest == previous, position
    assert [p for p, _, _, _ in stored] == list(range(5, 5 + len(commands)))
    assert group.hash == previous and group.position == 4 + len(commands)
    assert group.hash.hex() == SCRIPTED_HEAD


# --- Idempotency request hashes (ledger/domain.py request_hash) -------------------------------

POSTING = domain.Posting("alice", "bob", USD, 150)
POSTING_JSON = b'{"amount":"150","asset":"USD/2","credit":"bob","debit":"alice"}'

REQUEST_BYTES: list[tuple[domain.Idempotent, bytes]] = [
    (
        domain.PostTransfer("k", (POSTING,)),
        b'{"metadata":{},"postings":[' + POSTING_JSON + b"]}",
    ),
    (
        domain.PostTransfer(
            "k",
            (POSTING,),
            {"order": "A-1"},
            pending=True,
            timeout_s=3600,
            effective_at=datetime(2026, 11, 24, 11, 0, tzinfo=UTC),
        ),
        b'{"effective_at":"2026-11-24T11:00:00.000000+00:00","metadata":{"order":"A-1"},'
        b'"pending":true,"postings":[' + POSTING_JSON + b'],"timeout_seconds":3600}',
    ),
    (domain.PostPending("k", "hold-1"), b'{"metadata":{},"post_pending":"hold-1"}'),
    (
        domain.PostPending("k", "hold-1", 450, {"n": 1}),
        b'{"amount":"450","metadata":{"n":1},"post_pending":"hold-1"}',
    ),
    (domain.VoidPending("k", "hold-1"), b'{"metadata":{},"void_pending":"hold-1"}'),
    (domain.ReverseTransfer("k", "t-1"), b'{"metadata":{},"reverse":"t-1"}'),
    (
        domain.ReverseTransfer("k", "t-1", 25),
        b'{"amount":"25","metadata":{},"reverse":"t-1"}',
    ),
    (
        domain.OpenAccount("x", "asset", {"n": 1}, key="k"),
        b'{"metadata":{"n":1},"open_account":"x","type":"asset"}',
    ),
    (
        domain.SetGuard("a", "debits_must_not_exceed_credits", {"USD": 5}, key="k"),
        b'{"limits":{"USD":"5"},"rule":"debits_must_not_exceed_credits","set_guard":"a"}',
    ),
    (domain.SetFrozen("a", True, key="k"), b'{"freeze":"a"}'),
    (domain.SetFrozen("a", False, key="k"), b'{"unfreeze":"a"}'),
    (domain.CloseAccount("a", key="k"), b'{"close":"a"}'),
    (
        domain.UpdateAccountMetadata("a", {"x": 1}, key="k"),
        b'{"metadata":{"x":1},"set_metadata":"a"}',
    ),
    (
        domain.PostPending("k", "hold-1", amounts=(450, 0)),
        b'{"amounts":["450","0"],"metadata":{},"post_pending":"hold-1"}',
    ),
    (
        domain.ReverseTransfer("k", "t-1", amounts=(0, 25)),
        b'{"amounts":["0","25"],"metadata":{},"reverse":"t-1"}',
    ),
    (
        domain.AmendTransferMetadata("k", "t-1", {"n": 1}),
        b'{"amend_metadata":"t-1","metadata":{"n":1}}',
    ),
    (
        domain.ClosePeriod(date(2026, 10, 31), "month end", "k"),
        b'{"close_period":"2026-10-31","reason":"month end"}',
    ),
    (
        domain.ReopenPeriod(date(2026, 10, 1), "fix", "k"),
        b'{"reason":"fix","reopen_period":"2026-10-01"}',
    ),
]


@pytest.mark.parametrize("command, request_bytes", REQUEST_BYTES)
def test_the_request_hash_of_each_command_kind_is_sha256_of_its_canonical_fields(
    command: domain.Idempotent, request_bytes: bytes
) -> None:
    assert canonical(command.request_fields()) == request_bytes
    assert command.request_hash() == sha(request_bytes)


def test_the_request_hashes_pin_fixed_values() -> None:
    assert [c.request_hash().hex()[:16] for c, _ in REQUEST_BYTES] == PINNED_REQUEST_HASHES


PINNED_REQUEST_HASHES = [
    "abd355867681ad39",
    "58c4eebffead7308",
    "3c0b55769b0d2122",
    "091aa09dea8d43fc",
    "59ed8095f3c73449",
    "5e9242f8c3edc5fa",
    "032f99fea95b8983",
    "1b7b3d497b9a64bf",
    "57999da3ba33d45f",
    "0bdfb01d34a0fe26",
    "ec0dc27f453a1f1d",
    "ff703d2c9c0c364b",
    "f383e0ef99e6ac30",
    "4d36e51d8176c76e",
    "73c78d6e21c74bcb",
    "d21ace4c520064ba",
    "0223f0c0863e1477",
    "0be60976634bb177",
]


def group_with(known: dict[str, tuple[int, bytes]]) -> log._Group:
    """A write path group over an in-memory state: the idempotency decision, without Postgres."""
    state = domain.LedgerState({"USD": 2, "EUR": 2}, {}, {})
    loaded = log._Loaded(1, bytes(32), NOW, known, state, {}, [], [])
    return log._Group(log.LedgerRef(1, "main"), loaded)


def reused(first: domain.Idempotent, second: domain.Idempotent) -> str:
    """What the write path makes of ``second`` arriving with the key ``first`` committed with."""
    group = group_with({first.key: (42, first.request_hash())})
    outcome = group.decide(second, {})  # type: ignore[arg-type]
    assert outcome == 42, outcome  # never decided anew: the key is taken
    return "conflict" if group.conflicts else "replay"


BASE = domain.PostTransfer(
    "k",
    (POSTING, domain.Posting("bob", "carol", USD, 5)),
    {"order": "A-1"},
    pending=True,
    timeout_s=60,
    effective_at=datetime(2026, 11, 24, 11, 0, tzinfo=UTC),
)
EUR = Asset("EUR", 2)


def _with_posting(index: int, **change: Any) -> domain.PostTransfer:
    postings = list(BASE.postings)
    postings[index] = domain.Posting(**{**vars_of(postings[index]), **change})
    return domain.PostTransfer(
        "k", tuple(postings), BASE.metadata, True, BASE.timeout_s, BASE.effective_at
    )


def vars_of(p: domain.Posting) -> dict[str, Any]:
    return {"debit": p.debit, "credit": p.credit, "asset": p.asset, "amount": p.amount}


TRANSFER_CHANGES = {
    "debit": _with_posting(1, debit="dave"),
    "credit": _with_posting(1, credit="dave"),
    "asset": _with_posting(1, asset=EUR),
    "amount": _with_posting(1, amount=6),
    "postings order": domain.PostTransfer(
        "k", BASE.postings[::-1], BASE.metadata, True, 60, BASE.effective_at
    ),
    "postings count": domain.PostTransfer(
        "k", BASE.postings[:1], BASE.metadata, True, 60, BASE.effective_at
    ),
    "metadata": domain.PostTransfer(
        "k", BASE.postings, {"order": "A-2"}, True, 60, BASE.effective_at
    ),
    "pending": domain.PostTransfer(
        "k", BASE.postings, BASE.metadata, effective_at=BASE.effective_at
    ),
    "timeout_seconds": domain.PostTransfer(
        "k", BASE.postings, BASE.metadata, True, 61, BASE.effective_at
    ),
    "timeout_seconds omitted": domain.PostTransfer(
        "k", BASE.postings, BASE.metadata, True, None, BASE.effective_at
    ),
    "effective_at": domain.PostTransfer(
        "k", BASE.postings, BASE.metadata, True, 60, datetime(2026, 11, 24, 11, 1, tzinfo=UTC)
    ),
    "effective_at omitted": domain.PostTransfer("k", BASE.postings, BASE.metadata, True, 60),
}


@pytest.mark.parametrize("field", list(TRANSFER_CHANGES))
def test_a_reused_transfer_key_with_one_field_changed_is_a_conflict(field: str) -> None:
    assert reused(BASE, TRANSFER_CHANGES[field]) == "conflict"


def test_a_reused_key_with_the_same_request_is_a_replay_whatever_the_link() -> None:
    same = domain.PostTransfer("k", BASE.postings, dict(BASE.metadata), True, 60, BASE.effective_at)
    assert reused(BASE, same) == "replay"
    linked = domain.PostTransfer(
        "k", BASE.postings, BASE.metadata, True, 60, BASE.effective_at, linked=True
    )
    assert reused(BASE, linked) == "replay"  # linked is how a batch groups items, not the request


AMEND_CHANGES: list[tuple[domain.Idempotent, domain.Idempotent]] = [
    (domain.PostPending("k", "p"), domain.PostPending("k", "q")),
    (domain.PostPending("k", "p"), domain.PostPending("k", "p", 5)),
    (domain.PostPending("k", "p", amounts=(1, 0)), domain.PostPending("k", "p", amounts=(0, 1))),
    (domain.ReverseTransfer("k", "t", 1), domain.ReverseTransfer("k", "t", amounts=(1,))),
    (domain.AmendTransferMetadata("k", "t", {}), domain.AmendTransferMetadata("k", "u", {})),
    (domain.AmendTransferMetadata("k", "t", {}), domain.AmendTransferMetadata("k", "t", {"a": 1})),
    (
        domain.ClosePeriod(date(2026, 1, 1), "x", "k"),
        domain.ClosePeriod(date(2026, 1, 2), "x", "k"),
    ),
    (
        domain.ClosePeriod(date(2026, 1, 1), "x", "k"),
        domain.ClosePeriod(date(2026, 1, 1), "y", "k"),
    ),
    (
        domain.ReopenPeriod(date(2026, 1, 1), "x", "k"),
        domain.ReopenPeriod(date(2026, 1, 2), "x", "k"),
    ),
    (
        domain.ReopenPeriod(date(2026, 1, 1), "x", "k"),
        domain.ReopenPeriod(date(2026, 1, 1), "y", "k"),
    ),
    (domain.PostPending("k", "p", 5), domain.PostPending("k", "p", 6)),
    (domain.PostPending("k", "p"), domain.PostPending("k", "p", metadata={"a": 1})),
    (domain.VoidPending("k", "p"), domain.VoidPending("k", "q")),
    (domain.VoidPending("k", "p"), domain.VoidPending("k", "p", {"a": 1})),
    (domain.ReverseTransfer("k", "t"), domain.ReverseTransfer("k", "u")),
    (domain.ReverseTransfer("k", "t"), domain.ReverseTransfer("k", "t", 5)),
    (domain.ReverseTransfer("k", "t", 5), domain.ReverseTransfer("k", "t", 4)),
    (domain.ReverseTransfer("k", "t"), domain.ReverseTransfer("k", "t", metadata={"a": 1})),
    (domain.OpenAccount("x", "asset", key="k"), domain.OpenAccount("y", "asset", key="k")),
    (domain.OpenAccount("x", "asset", key="k"), domain.OpenAccount("x", "equity", key="k")),
    (domain.OpenAccount("x", "asset", key="k"), domain.OpenAccount("x", "asset", {"a": 1}, "k")),
    (domain.SetGuard("a", "none", key="k"), domain.SetGuard("b", "none", key="k")),
    (
        domain.SetGuard("a", "none", key="k"),
        domain.SetGuard("a", "credits_must_not_exceed_debits", key="k"),
    ),
    (domain.SetGuard("a", "none", {"USD": 1}, "k"), domain.SetGuard("a", "none", {"USD": 2}, "k")),
    (domain.SetFrozen("a", True, "k"), domain.SetFrozen("a", False, "k")),
    (domain.SetFrozen("a", True, "k"), domain.SetFrozen("b", True, "k")),
    (domain.CloseAccount("a", "k"), domain.CloseAccount("b", "k")),
    (
        domain.UpdateAccountMetadata("a", {"x": 1}, "k"),
        domain.UpdateAccountMetadata("a", {"x": 2}, "k"),
    ),
    (domain.CloseAccount("a", "k"), domain.SetFrozen("a", True, "k")),
    # Another kind of command under the same key and target.
    (domain.PostPending("k", "p"), domain.VoidPending("k", "p")),
    (domain.ReverseTransfer("k", "p"), domain.PostPending("k", "p")),
]


@pytest.mark.parametrize("first, second", AMEND_CHANGES)
def test_a_reused_key_for_any_other_command_with_a_change_is_a_conflict(
    first: domain.Idempotent, second: domain.Idempotent
) -> None:
    assert reused(first, second) == "conflict"
    assert reused(first, first) == "replay"


# --- Checkpoint signatures (ledger/audit.py) ---------------------------------------------------

SEED = bytes(range(32))
PUBLIC_HEX = "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"
ROOT = b"\xab" * 32
SIGNED_AT = "2026-11-24T12:00:00+00:00"
TREE_HEAD = (
    b'{"ledger":"main","root":"' + b"ab" * 32 + b'","signed_at":"2026-11-24T12:00:00+00:00",'
    b'"tree_size":3}'
)
SIGNATURE_HEX = (
    "1a81a4700f66346822e1cfadffc5981f7cbdeea55bc2380f87074c3eee09d596"
    "fa993a39f0bbdec154c7699da931942e0ea153e0f7511ff6c9cb6807111a7a05"
)


def test_a_checkpoint_signs_the_canonical_json_of_ledger_root_time_and_size() -> None:
    body = {"ledger": "main", "root": ROOT.hex(), "signed_at": SIGNED_AT, "tree_size": 3}
    assert audit.tree_head("main", 3, ROOT, SIGNED_AT) == TREE_HEAD == canonical(body)


def test_a_checkpoint_signature_is_ed25519_over_the_tree_head_and_pins_a_fixed_value() -> None:
    key = Ed25519PrivateKey.from_private_bytes(SEED)
    assert audit.public_hex(key.public_key()) == PUBLIC_HEX
    public = Ed25519PublicKey.from_public_bytes(h(PUBLIC_HEX))
    public.verify(h(SIGNATURE_HEX), TREE_HEAD)  # raises if not
    checkpoint = audit.Checkpoint(
        "main", 3, ROOT, SIGNED_AT, audit.key_id(public), h(SIGNATURE_HEX)
    )
    assert checkpoint.signed_by(audit.load_public_key(PUBLIC_HEX))
    assert checkpoint.key_id == sha(h(PUBLIC_HEX)).hex()[:16]
    assert key.sign(audit.tree_head("main", 3, ROOT, SIGNED_AT)).hex() == SIGNATURE_HEX


@pytest.mark.parametrize(
    "change",
    [
        {"ledger": "mainx"},
        {"tree_size": 4},
        {"root": b"\xac" + ROOT[1:]},
        {"signed_at": "2026-11-24T12:00:01+00:00"},
        {"signature": bytes([h(SIGNATURE_HEX)[0] ^ 1]) + h(SIGNATURE_HEX)[1:]},
    ],
)
def test_a_checkpoint_with_any_signed_field_changed_does_not_verify(change: dict[str, Any]) -> None:
    fields = {
        "ledger": "main",
        "tree_size": 3,
        "root": ROOT,
        "signed_at": SIGNED_AT,
        "key_id": "x",
        "signature": h(SIGNATURE_HEX),
        **change,
    }
    checkpoint = audit.Checkpoint(**fields)
    assert not checkpoint.signed_by(audit.load_public_key(PUBLIC_HEX))
    with pytest.raises(InvalidSignature):
        Ed25519PublicKey.from_public_bytes(h(PUBLIC_HEX)).verify(
            fields["signature"],
            canonical(
                {
                    "ledger": fields["ledger"],
                    "root": fields["root"].hex(),
                    "signed_at": fields["signed_at"],
                    "tree_size": fields["tree_size"],
                }
            ),
        )


# --- What a real ledger stores --------------------------------------------------------------


def test_a_real_ledgers_stored_hashes_and_merkle_root_follow_the_documented_formulas(
    database_url: str, ledger_name: str
) -> None:
    """The stored events of a ledger written through the service, rechecked with hashlib only."""

    async def body() -> None:
        pool = postgres.async_pool(database_url, 2)
        await pool.open()
        svc = LedgerService(pool)
        try:
            await svc.create_ledger(ledger_name, [USD], {})
            for name in ("a", "b"):
                await svc.open_account(ledger_name, domain.OpenAccount(name, "liability"), {})
            posting = domain.Posting("a", "b", USD, 150)
            await svc.post_transfer(ledger_name, domain.PostTransfer("t1", (posting,)), {})
        finally:
            await svc.close()
            await pool.close()

    asyncio.run(body())
    key = Ed25519PrivateKey.from_private_bytes(SEED)
    with postgres.connect(database_url) as conn:
        checkpoint = audit.seal(conn, ledger_name, key)
        rows = conn.execute(
            "SELECT e.position, e.topic, e.state, e.hash, l.head_hash FROM events e"
            " JOIN ledgers l ON l.id = e.ledger_id WHERE l.name = %s ORDER BY e.position",
            (ledger_name,),
        ).fetchall()
    previous = sha(b"ledger-genesis:" + ledger_name.encode())
    leaves = []
    for position, topic, state, stored_hash, _ in rows:
        data = position.to_bytes(8, "big") + topic.encode() + b"\x00" + bytes(state)
        previous = sha(previous, data)
        assert bytes(stored_hash) == previous, position
        leaves.append(data)
    assert [r[0] for r in rows] == [1, 2, 3, 4]
    assert bytes(rows[-1][4]) == previous  # the head is the last hash
    assert checkpoint.tree_size == 4 and checkpoint.root == rfc_mth(leaves)
    Ed25519PublicKey.from_public_bytes(h(PUBLIC_HEX)).verify(
        checkpoint.signature,
        canonical(
            {
                "ledger": ledger_name,
                "root": rfc_mth(leaves).hex(),
                "signed_at": checkpoint.signed_at,
                "tree_size": 4,
            }
        ),
    )
