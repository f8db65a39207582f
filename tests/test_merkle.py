"""RFC 9162 Merkle proofs, including verifiers fed forged or truncated proofs."""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st

from ledger import merkle


def leaves(n: int) -> list[bytes]:
    return [merkle.leaf_hash(b"event %d" % i) for i in range(n)]


def reference_root(hashes: list[bytes]) -> bytes:
    """The RFC's recursive definition, written as plainly as possible."""
    if len(hashes) == 1:
        return hashes[0]
    k = 1
    while k * 2 < len(hashes):
        k *= 2
    return merkle.node_hash(reference_root(hashes[:k]), reference_root(hashes[k:]))


@given(st.integers(1, 70))
def test_the_root_matches_the_rfc_definition(n: int) -> None:
    assert merkle.root(leaves(n)) == reference_root(leaves(n))


def test_the_empty_tree_hashes_the_empty_string() -> None:
    assert merkle.root([]) == hashlib.sha256(b"").digest()


def test_leaves_and_nodes_hash_with_distinct_prefixes() -> None:
    a, b = merkle.leaf_hash(b"a"), merkle.leaf_hash(b"b")
    assert merkle.leaf_hash(a + b) != merkle.node_hash(a, b)


@given(st.data(), st.integers(1, 70))
def test_every_leaf_has_an_inclusion_proof_that_verifies(data: st.DataObject, n: int) -> None:
    hashes = leaves(n)
    index = data.draw(st.integers(0, n - 1))
    proof = merkle.inclusion_proof(index, hashes)
    assert merkle.verify_inclusion(hashes[index], index, n, proof, merkle.root(hashes))


@given(st.data(), st.integers(2, 70))
def test_a_forged_inclusion_proof_is_refused(data: st.DataObject, n: int) -> None:
    hashes = leaves(n)
    index = data.draw(st.integers(0, n - 1))
    proof = merkle.inclusion_proof(index, hashes)
    top = merkle.root(hashes)
    other = data.draw(st.integers(0, n - 1).filter(lambda i: i != index))
    assert not merkle.verify_inclusion(hashes[other], index, n, proof, top)  # another leaf
    assert not merkle.verify_inclusion(merkle.leaf_hash(b"forged"), index, n, proof, top)
    if proof:
        assert not merkle.verify_inclusion(hashes[index], index, n, proof[:-1], top)  # cut short
        assert not merkle.verify_inclusion(hashes[index], index, n, [*proof, proof[-1]], top)
        flipped = [bytes([proof[0][0] ^ 1]) + proof[0][1:], *proof[1:]]
        assert not merkle.verify_inclusion(hashes[index], index, n, flipped, top)
    assert not merkle.verify_inclusion(hashes[index], n, n, proof, top)  # index past the end
    # (A root alone does not encode its tree size; the signed tree head binds the two.)


@given(st.data(), st.integers(1, 70))
def test_every_prefix_has_a_consistency_proof_that_verifies(data: st.DataObject, n: int) -> None:
    hashes = leaves(n)
    m = data.draw(st.integers(1, n))
    proof = merkle.consistency_proof(m, hashes)
    assert merkle.verify_consistency(m, n, merkle.root(hashes[:m]), merkle.root(hashes), proof)


@given(st.data(), st.integers(2, 70))
def test_a_rewritten_history_fails_the_consistency_proof(data: st.DataObject, n: int) -> None:
    hashes = leaves(n)
    m = data.draw(st.integers(1, n - 1))
    forged = list(hashes)
    forged[data.draw(st.integers(0, m - 1))] = merkle.leaf_hash(b"rewritten")
    proof = merkle.consistency_proof(m, forged)
    # The auditor kept the first root from before the rewrite.
    assert not merkle.verify_consistency(m, n, merkle.root(hashes[:m]), merkle.root(forged), proof)
    honest = merkle.consistency_proof(m, hashes)
    if honest:
        assert not merkle.verify_consistency(
            m, n, merkle.root(hashes[:m]), merkle.root(hashes), honest[:-1]
        )
