"""The tamper-evidence primitives against published vectors, and the leaf's definition.

Roots, proofs and notes are checked against other implementations' published
values: a tree or a signature nobody else can recompute proves nothing in court.
"""

from __future__ import annotations

import base64
import json

import pytest
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from openg2p_audit import integrity
from openg2p_audit.integrity import (
    Digest,
    IntegrityError,
    Signer,
    TreeBuilder,
    VerifierKey,
    inclusion_proof,
    merkle_root,
    root_from_proof,
)

# RFC 6962 reference leaves and tree heads, as published by certificate-transparency-go
# and transparency-dev/merkle (testonly): the root of the first n leaves for n = 0..8.
CT_LEAVES = ["", "00", "10", "2021", "3031", "40414243", "5051525354555657",
             "606162636465666768696a6b6c6d6e6f"]  # fmt: skip
CT_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
# Their published inclusion proofs in the tree of 8.
CT_PROOFS = {
    0: ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"],
    5: ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"],
}  # fmt: skip

# golang.org/x/mod/sumdb/note's example: key, text and the note Go signs.
GO_SIGNER = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_VERIFIER = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
GO_NOTE = (
    GO_TEXT + "\n\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2"
    "pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
)


def _ct_leaf_hashes() -> list[bytes]:
    import hashlib

    return [hashlib.sha256(b"\x00" + bytes.fromhex(x)).digest() for x in CT_LEAVES]


def _go_signer() -> Signer:
    seed = base64.b64decode(GO_SIGNER.split("+", 4)[4])[1:]
    return Signer("PeterNeumann", Ed25519PrivateKey.from_private_bytes(seed))


def test_roots_match_rfc6962_reference_vectors():
    leaves = _ct_leaf_hashes()
    for n in range(len(leaves) + 1):
        assert merkle_root(leaves[:n]).hex() == CT_ROOTS[n], n
        builder = TreeBuilder()
        for leaf in leaves[:n]:
            builder.add(leaf)
        assert builder.root().hex() == CT_ROOTS[n], n
        assert builder.count == n


def test_inclusion_proofs_match_the_published_ones_and_verify():
    leaves = _ct_leaf_hashes()
    for index, expected in CT_PROOFS.items():
        proof = inclusion_proof(leaves, index)
        assert [p.hex() for p in proof] == expected
        assert root_from_proof(leaves[index], index, 8, proof).hex() == CT_ROOTS[8]


def test_every_proof_in_every_size_verifies_and_a_wrong_one_does_not():
    import hashlib

    many = [hashlib.sha256(bytes([i])).digest() for i in range(37)]
    for n in range(1, len(many) + 1):
        tree = many[:n]
        root = merkle_root(tree)
        for i in range(n):
            proof = inclusion_proof(tree, i)
            assert root_from_proof(tree[i], i, n, proof) == root
            if n > 1:
                other = (i + 1) % n
                assert root_from_proof(tree[other], i, n, proof) != root
    with pytest.raises(IntegrityError, match="longer"):
        root_from_proof(many[0], 0, 1, [many[1]])
    with pytest.raises(IntegrityError, match="shorter"):
        root_from_proof(many[0], 0, 4, [many[1]])


def test_signed_note_is_byte_for_byte_what_go_sumdb_note_signs():
    signer = _go_signer()
    assert str(signer.verifier) == GO_VERIFIER
    assert signer.sign(GO_TEXT) == GO_NOTE
    body, key = integrity.open_note(GO_NOTE, [VerifierKey.parse(GO_VERIFIER)])
    assert body == GO_TEXT and str(key) == GO_VERIFIER


def test_a_changed_note_or_another_key_does_not_open():
    key = VerifierKey.parse(GO_VERIFIER)
    with pytest.raises(IntegrityError, match="does not verify"):
        integrity.open_note(GO_NOTE.replace("answer", "Answer"), [key])
    other = Signer("PeterNeumann", Ed25519PrivateKey.generate())
    with pytest.raises(IntegrityError, match="not among the given public keys"):
        integrity.open_note(other.sign(GO_TEXT), [key])


@pytest.mark.parametrize(
    "text, problem",
    [
        ("PeterNeumann+c74f20a3", "name\\+hash\\+base64"),
        ("PeterNeumann+c74f20a4+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "does not match"),
        ("Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "no spaces"),
        ("PeterNeumann+c74f20a3+ApSc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "Ed25519"),
    ],
)
def test_bad_verifier_keys_are_refused_with_the_reason(text, problem):
    with pytest.raises(ValueError, match=problem):
        VerifierKey.parse(text)


def test_a_signing_key_that_is_not_ed25519_is_refused(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(ValueError, match="must be Ed25519"):
        Signer.from_pem("x", pem)
    with pytest.raises(ValueError, match="not an unencrypted PEM"):
        Signer.from_pem("x", b"hello")
    with pytest.raises(ValueError, match="cannot read"):
        Signer.from_file("x", tmp_path / "absent.pem")
    assert Signer.from_pem("x", integrity.generate_pem()).verifier.name == "x"


# --------------------------------------------------------------------------- leaves

ROW = {
    "id": "e-1", "occurred_at": "2026-03-01T10:00:00.000000Z", "source": "/registry",
    "type": "org.openg2p.audit.beneficiary.update", "subject": None, "actor_type": "user",
    "actor_id": "u-7", "resource_type": "beneficiary", "resource_id": "b-9",
    "action": "update", "outcome": "success", "reason": None, "trace_id": None,
    "details": {"changes": [{"field": "name", "old": "Ä", "new": "B"}], "context": {"n": 3}},
    "ingested_at": "2026-03-01T10:00:01.250000Z",
}  # fmt: skip


def test_the_leaf_is_rfc8785_of_the_whole_row_times_as_exported_and_nulls_kept():
    canonical = integrity.canonical_row(json.dumps(ROW))
    text = canonical.decode()
    # Keys sorted, no whitespace, every column present, NULL as null, times as the export
    # writes them: UTC, six fraction digits, Z.
    assert text.startswith('{"action":"update","actor_id":"u-7","actor_type":"user",')
    assert '"reason":null' in text and '"subject":null' in text and '"trace_id":null' in text
    assert '"occurred_at":"2026-03-01T10:00:00.000000Z"' in text
    assert '"ingested_at":"2026-03-01T10:00:01.250000Z"' in text
    assert '"old":"Ä"' in text  # UTF-8 as it is, not \u escapes
    assert canonical == rfc8785.dumps(ROW)
    import hashlib

    assert integrity.leaf_hash(json.dumps(ROW)) == hashlib.sha256(b"\x00" + canonical).digest()
    # A NULL column is not the same row as a missing column or an empty string.
    assert integrity.leaf_hash({**ROW, "reason": ""}) != integrity.leaf_hash(ROW)


def test_numbers_rfc8785_cannot_carry_are_written_as_decimal_strings():
    row = {**ROW, "details": {"big": 2**64, "float": 1.0, "neg": -(2**60)}}
    text = integrity.canonical_row(json.dumps(row)).decode()
    assert '"big":"18446744073709551616"' in text
    assert '"float":1' in text and '"neg":"-1152921504606846976"' in text


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(details=st.none() | st.dictionaries(st.text(), _json_values, max_size=5), actor=st.text())
def test_the_fast_path_writes_exactly_what_rfc8785_writes(details, actor):
    line = json.dumps({**ROW, "actor_id": actor, "details": details}, ensure_ascii=False)
    assert integrity.canonical_row(line) == integrity.canonical_row_reference(line)
    line = json.dumps({**ROW, "actor_id": actor, "details": details}, ensure_ascii=True)
    assert integrity.canonical_row(line) == integrity.canonical_row_reference(line)


def test_digest_body_round_trips_and_reads_like_a_tlog_checkpoint():
    d = Digest(origin="audit.example.org/prod", seq=3, kind="supplement",
               hour="2026-03-01T10:00:00Z", count=2, root=b"\x01" * 32, previous="abc=",
               key_id="0011aabb", leaves=(b"\x02" * 32,))  # fmt: skip
    body = d.body()
    lines = body.splitlines()
    assert lines[:3] == ["audit.example.org/prod", "2", base64.b64encode(b"\x01" * 32).decode()]
    assert Digest.parse(body) == d
    with pytest.raises(IntegrityError, match="unknown digest kind"):
        Digest.parse(body.replace("kind supplement", "kind other"))
