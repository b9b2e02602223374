"""Tamper evidence: leaves, RFC 6962 trees, signed notes and the chain of hourly digests.

Nothing here touches the database or the network: the sealer (`sealing`), the
offline verifier and the evidence bundles all build on these definitions, so
the bytes a court is shown are computed by the same code that sealed them.

A row's leaf is SHA-256(0x00 ‖ RFC 8785 canonical JSON of the whole stored
row), where "the row" is exactly one line of the query export (`query._JSON_LINE`,
built by PostgreSQL): every column present, NULL as JSON `null`, times as the
export writes them (RFC 3339, UTC, always six fraction digits, `Z`), and
`details` as the JSON object PostgreSQL stored. Starting from the export's
text rather than from driver values means the verifier, which only has the
export, cannot disagree with the sealer about a type conversion.

Numbers: RFC 8785 only defines I-JSON numbers (IEEE 754 doubles). An integer
beyond +/-(2^53 - 1) inside `details` is written as its decimal string before
canonicalisation; both sides apply the same rule, so the leaf stays defined.

The tree over an hour's leaves, ordered by (ingested_at, id, occurred_at, source) with
codepoint string order, is RFC 6962's Merkle tree hash, and proofs are its
audit paths. Digests are C2SP signed notes (Ed25519) whose body starts like a
C2SP tlog checkpoint (origin, tree size, base64 root) and goes on with the
hour, the sequence number, the kind, the SHA-256 of the previous digest's
whole note and the key id, so each digest pins the one before it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

HOUR = timedelta(hours=1)
EMPTY_ROOT = hashlib.sha256(b"").digest()
NO_PREVIOUS = "none"

KINDS = ("sealed", "supplement", "retired")

# The C2SP signed-note signature type byte for Ed25519.
_ED25519 = b"\x01"
_SIG_PREFIX = "\u2014 "  # an em dash and a space start every signature line
_MAX_INT = 2**53 - 1


class IntegrityError(ValueError):
    """Evidence that does not hold: names what failed, the hour and the row when known."""

    def __init__(self, message: str, hour: str | None = None, row_id: str | None = None):
        super().__init__(message)
        self.message = message
        self.hour = hour
        self.row_id = row_id

    def __str__(self) -> str:
        where = f"hour {self.hour}: " if self.hour else ""
        row = f" (row id {self.row_id!r})" if self.row_id is not None else ""
        return f"{where}{self.message}{row}"


# --------------------------------------------------------------------------- leaves


def _i_json(value):
    """Integers outside I-JSON's exact range as decimal strings; everything else as it is."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return str(value) if abs(value) > _MAX_INT else value
    if isinstance(value, dict):
        return {k: _i_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_i_json(v) for v in value]
    return value


class _Slow(Exception):
    """A value the fast encoder may write differently from RFC 8785."""


def _no_float(text: str):
    raise _Slow


def _small_int(text: str) -> int:
    value = int(text)
    if abs(value) > _MAX_INT:
        raise _Slow
    return value


_DECODE = json.JSONDecoder(parse_float=_no_float, parse_int=_small_int, parse_constant=_no_float)
# Sorted keys, no whitespace, non-ASCII as it is, control characters as \u00xx (lowercase):
# for strings, integers within I-JSON's range, booleans and null, exactly RFC 8785's output.
_ENCODE = json.JSONEncoder(ensure_ascii=False, sort_keys=True, separators=(",", ":"))
# RFC 8785 sorts keys by UTF-16 code units, Python by code points: they differ only
# when characters beyond the BMP are involved.
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")


def canonical_row(row: str | dict) -> bytes:
    """RFC 8785 bytes of one export line (or its parsed object).

    The `rfc8785` package defines the bytes; it runs in pure Python, at about
    half the sealing target's speed. Lines holding nothing but strings, small
    integers, booleans and null (nearly every audit row) take the C JSON
    encoder, whose output for those is the same bytes (tests/test_integrity.py
    checks both paths against each other); anything else (a float, a huge
    integer, a character beyond the BMP) goes to `rfc8785`.
    """
    if isinstance(row, str):
        if not _ASTRAL.search(row):
            try:
                return _ENCODE.encode(_DECODE.decode(row)).encode()
            except _Slow:
                pass
        row = json.loads(row)
    try:
        return rfc8785.dumps(row)
    except rfc8785.IntegerDomainError:
        return rfc8785.dumps(_i_json(row))


def canonical_row_reference(row: str | dict) -> bytes:
    """The same bytes through `rfc8785` alone: the definition the fast path is tested against."""
    obj = json.loads(row) if isinstance(row, str) else row
    try:
        return rfc8785.dumps(obj)
    except rfc8785.IntegerDomainError:
        return rfc8785.dumps(_i_json(obj))


def leaf_hash(row: str | dict) -> bytes:
    """SHA-256(0x00 ‖ canonical JSON): RFC 6962's leaf hash of the row."""
    return hashlib.sha256(b"\x00" + canonical_row(row)).digest()


def leaf_order(row: dict) -> tuple[str, str, str, str]:
    """The sort key of a leaf: the export's fixed-width times sort as the instants do.

    `source` is the last tie-breaker: the table's key is (id, source, occurred_at), and
    before source joined it (id, occurred_at) was unique, so older hours keep their order.
    """
    return (row["ingested_at"], row["id"], row["occurred_at"], row["source"])


def hour_of(ingested_at: str) -> str:
    """The sealed hour an export time belongs to, as `YYYY-MM-DDTHH:00:00Z`."""
    return ingested_at[:13] + ":00:00Z"


# --------------------------------------------------------------------------- RFC 6962


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """RFC 6962's MTH over leaf hashes.

    Pairing each level left to right and carrying an odd last node up unchanged
    builds the same left-balanced tree as the RFC's split at the largest power
    of two, without recursion (an hour can hold millions of leaves).
    """
    if not leaves:
        return EMPTY_ROOT
    level = list(leaves)
    while len(level) > 1:
        paired = [_node(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


class TreeBuilder:
    """RFC 6962's MTH computed as leaves stream in: memory is one hash per level.

    The stack holds the roots of the perfect subtrees so far, largest first;
    folding them right to left at the end is the RFC's split at the largest
    power of two, applied recursively.
    """

    __slots__ = ("_stack", "count")

    def __init__(self) -> None:
        self._stack: list[tuple[int, bytes]] = []
        self.count = 0

    def add(self, leaf: bytes) -> None:
        size, node = 1, leaf
        stack = self._stack
        while stack and stack[-1][0] == size:
            node = _node(stack.pop()[1], node)
            size *= 2
        stack.append((size, node))
        self.count += 1

    def root(self) -> bytes:
        if not self._stack:
            return EMPTY_ROOT
        node = self._stack[-1][1]
        for _, left in reversed(self._stack[:-1]):
            node = _node(left, node)
        return node


def _split(n: int) -> int:
    """The largest power of two smaller than n (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """RFC 6962's PATH(m, D[n]): the audit path of leaf `index`, nearest sibling first."""
    if not 0 <= index < len(leaves):
        raise IndexError(f"leaf {index} is not in a tree of {len(leaves)}")
    path: list[bytes] = []
    lo, hi, m = 0, len(leaves), index
    stack: list[tuple[int, int, bool]] = []
    while hi - lo > 1:
        k = _split(hi - lo)
        if m < k:
            stack.append((lo + k, hi, True))
            hi = lo + k
        else:
            stack.append((lo, lo + k, False))
            lo, m = lo + k, m - k
    for start, end, _ in reversed(stack):
        path.append(merkle_root(leaves[start:end]))
    return path


def root_from_proof(leaf: bytes, index: int, size: int, proof: Sequence[bytes]) -> bytes:
    """The root a proof leads to (RFC 9162 §2.1.3.2); IntegrityError if the proof is malformed."""
    if not 0 <= index < size:
        raise IntegrityError(f"leaf index {index} is outside a tree of {size}")
    fn, sn = index, size - 1
    r = leaf
    for p in proof:
        if sn == 0:
            raise IntegrityError("the inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = _node(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = _node(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise IntegrityError("the inclusion proof is shorter than the tree is deep")
    return r


# --------------------------------------------------------------------------- keys and notes


def _key_hash(name: str, public: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + _ED25519 + public).digest()[:4]


def _check_name(name: str) -> str:
    if not name or any(c.isspace() for c in name) or "+" in name:
        raise ValueError(f"a key name has no spaces and no '+': {name!r}")
    return name


@dataclass(frozen=True)
class VerifierKey:
    """An Ed25519 public key under its C2SP name: `name+hash+base64(0x01 ‖ key)`."""

    name: str
    public: bytes

    @property
    def key_hash(self) -> bytes:
        return _key_hash(self.name, self.public)

    @property
    def key_id(self) -> str:
        return self.key_hash.hex()

    def __str__(self) -> str:
        return f"{self.name}+{self.key_id}+{base64.b64encode(_ED25519 + self.public).decode()}"

    @classmethod
    def parse(cls, text: str) -> VerifierKey:
        parts = text.strip().split("+", 2)  # the base64 may hold "+" itself
        if len(parts) != 3:
            raise ValueError("a verifier key reads name+hash+base64 (one per line)")
        name, hexhash, blob = parts
        try:
            raw = base64.b64decode(blob, validate=True)
            wanted = bytes.fromhex(hexhash)
        except ValueError:
            raise ValueError("a verifier key's hash is hex and its key base64") from None
        if len(raw) != 33 or raw[:1] != _ED25519:
            raise ValueError("only Ed25519 verifier keys (type 0x01, 32 bytes) are accepted")
        key = cls(_check_name(name), raw[1:])
        if key.key_hash != wanted:
            raise ValueError(f"verifier key {name}: its hash does not match its key")
        return key

    def verify(self, message: bytes, signature: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.public).verify(signature, message)
        except InvalidSignature:
            return False
        return True


def read_verifier_keys(text: str) -> list[VerifierKey]:
    """Every key in a public-key file: one per line, so old keys stay beside new ones."""
    keys = [VerifierKey.parse(line) for line in text.splitlines() if line.strip()]
    if not keys:
        raise ValueError("no verifier key in the file")
    return keys


@dataclass(frozen=True)
class Signer:
    """The sealing key: an Ed25519 private key and the name its signatures carry."""

    name: str
    private: Ed25519PrivateKey = field(repr=False)

    @property
    def verifier(self) -> VerifierKey:
        raw = self.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return VerifierKey(self.name, raw)

    def sign(self, body: str) -> str:
        """The signed note: the body, a blank line, one signature line."""
        check_body(body)
        signature = self.private.sign(body.encode())
        blob = base64.b64encode(self.verifier.key_hash + signature).decode()
        return f"{body}\n{_SIG_PREFIX}{self.name} {blob}\n"

    @classmethod
    def from_pem(cls, name: str, pem: bytes) -> Signer:
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"not an unencrypted PEM private key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("the signing key must be Ed25519 (openssl genpkey -algorithm ed25519)")
        return cls(_check_name(name), key)

    @classmethod
    def from_file(cls, name: str, path: str | Path) -> Signer:
        try:
            pem = Path(path).read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read the signing key {path}: {exc.strerror}") from None
        return cls.from_pem(name, pem)


def generate_pem() -> bytes:
    """A new Ed25519 key as unencrypted PKCS#8 PEM, the form the Secret holds."""
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def check_body(body: str) -> None:
    if not body.endswith("\n") or "\n\n" in body or "\r" in body:
        raise ValueError("a note body is non-empty lines, each ending in a newline")


def open_note(note: str, keys: Iterable[VerifierKey]) -> tuple[str, VerifierKey]:
    """The body of a signed note and the key that signed it; IntegrityError otherwise.

    A key is its name and its material together (the key hash covers both). When
    no given key signed the note, the error says what is nearest: a given key whose
    material did sign it under another name (a key printed with another
    INTEGRITY_ORIGIN), or given keys with the signer's name but other material
    (a rotated key), so that a wrong setting is not taken for a forgery.
    """
    keys = list(keys)
    body, sep, signatures = note.rpartition("\n\n")
    if not sep:
        raise IntegrityError("the digest is not a signed note (no blank line before signatures)")
    body += "\n"
    by_hash = {(k.name, k.key_hash): k for k in keys}
    signers: list[str] = []
    renamed: list[tuple[str, VerifierKey]] = []
    for line in signatures.splitlines():
        if not line.startswith(_SIG_PREFIX):
            raise IntegrityError("a signed note's signature line starts with an em dash")
        name, _, blob = line[len(_SIG_PREFIX) :].partition(" ")
        try:
            raw = base64.b64decode(blob, validate=True)
        except ValueError:
            raise IntegrityError("a signature is not base64") from None
        key = by_hash.get((name, raw[:4]))
        if key is None:
            signers.append(f"{name}+{raw[:4].hex()}")
            renamed += [
                (name, k) for k in keys
                if k.name != name and _key_hash(name, k.public) == raw[:4]
                and k.verify(body.encode(), raw[4:])
            ]  # fmt: skip
            continue
        if key.verify(body.encode(), raw[4:]):
            return body, key
        raise IntegrityError(f"the signature of key {name}+{key.key_id} does not verify")
    if renamed:
        name, k = renamed[0]
        raise IntegrityError(
            f"signed by {name}+{_key_hash(name, k.public).hex()}: the given key {k} has the "
            f"same key material but the name {k.name!r}, not {name!r} (a verifier key printed "
            f"with another INTEGRITY_ORIGIN); print it again with INTEGRITY_ORIGIN={name}"
        )
    named = sorted(str(k) for k in keys if any(s.startswith(k.name + "+") for s in signers))
    if named:
        raise IntegrityError(
            f"signed by {', '.join(signers)}, which is not among the given public keys; those "
            f"named alike are other keys ({', '.join(k.split('+')[1] for k in named)}): give "
            "the key that signed it too (an earlier key, before a rotation?)"
        )
    raise IntegrityError(
        f"signed by {', '.join(signers) or 'no key'}, which is none of the given public keys"
        f" ({', '.join(f'{k.name}+{k.key_id}' for k in keys) or 'none'})"
    )


# --------------------------------------------------------------------------- digests


def note_hash(note: str) -> str:
    """SHA-256 of a digest's whole note, signatures included (base64): what the next one pins."""
    return base64.b64encode(hashlib.sha256(note.encode()).digest()).decode()


def hour_text(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:00:00Z")


def parse_hour(text: str) -> datetime:
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:00:00Z", text):
        raise ValueError(f"not an hour (YYYY-MM-DDTHH:00:00Z): {text!r}")
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass(frozen=True)
class Digest:
    """One link of the chain.

    sealed: every row of `hour` committed when it was sealed. supplement: rows
    of an already sealed `hour` that committed later, listed by leaf hash.
    retired: `month`'s partition was dropped; `last` is the sequence number of
    the last digest covering it, so a verifier knows the gap is deliberate.
    """

    origin: str
    seq: int
    kind: str
    hour: str
    count: int
    root: bytes
    previous: str
    key_id: str
    leaves: tuple[bytes, ...] = ()
    month: str | None = None
    last: int | None = None
    through: str | None = None

    def body(self) -> str:
        lines = [
            self.origin,
            str(self.count),
            base64.b64encode(self.root).decode(),
            f"seq {self.seq}",
            f"kind {self.kind}",
            f"hour {self.hour}",
            f"previous {self.previous}",
            f"key {self.key_id}",
        ]
        if self.month is not None:
            lines.append(f"month {self.month}")
        if self.last is not None:
            lines.append(f"last {self.last}")
        if self.through is not None:
            lines.append(f"through {self.through}")
        lines += [f"leaf {base64.b64encode(h).decode()}" for h in self.leaves]
        return "\n".join(lines) + "\n"

    @classmethod
    def parse(cls, body: str) -> Digest:
        lines = body.rstrip("\n").split("\n")
        if len(lines) < 8:
            raise IntegrityError("a digest body has at least eight lines")
        origin, count, root = lines[:3]
        fields: dict[str, str] = {}
        leaves: list[bytes] = []
        for line in lines[3:]:
            name, _, value = line.partition(" ")
            if name == "leaf":
                leaves.append(base64.b64decode(value))
            elif name in fields:
                raise IntegrityError(f"a digest repeats its {name} line")
            else:
                fields[name] = value
        try:
            digest = cls(
                origin=origin,
                seq=int(fields["seq"]),
                kind=fields["kind"],
                hour=fields["hour"],
                count=int(count),
                root=base64.b64decode(root, validate=True),
                previous=fields["previous"],
                key_id=fields["key"],
                leaves=tuple(leaves),
                month=fields.get("month"),
                last=int(fields["last"]) if "last" in fields else None,
                through=fields.get("through"),
            )
        except (KeyError, ValueError) as exc:
            raise IntegrityError(f"a digest body cannot be read: {exc}") from None
        if digest.kind not in KINDS:
            raise IntegrityError(f"unknown digest kind {digest.kind!r}")
        return digest


@dataclass(frozen=True)
class SignedDigest:
    digest: Digest
    note: str

    def as_json(self) -> dict:
        """A JSON lines record: convenience fields beside the note, which alone is trusted."""
        d = self.digest
        return {"seq": d.seq, "kind": d.kind, "hour": d.hour, "count": d.count, "note": self.note}


def read_digest_lines(lines: Iterable[str]) -> list[str]:
    """The notes of a digests JSONL file, in file order."""
    notes = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            notes.append(record["note"])
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"digests line {number} is not a digest record") from None
    return notes


# --------------------------------------------------------------------------- verifying


@dataclass
class ChainReport:
    digests: list[Digest]
    keys_used: set[str]
    retired: list[Digest]


def verify_chain(notes: Sequence[str], keys: Sequence[VerifierKey]) -> ChainReport:
    """Signatures, then the chain: consecutive seq, each pinning its predecessor, hours in order.

    A gap, a fork, a swap or a digest from another key all break one of those
    links, and the error names the hour of the first digest that does not fit.
    """
    if not notes:
        raise IntegrityError("no digests to verify against")
    digests: list[Digest] = []
    used: set[str] = set()
    previous_note: str | None = None
    last_sealed: datetime | None = None
    sealed_hours: set[str] = set()
    for note in notes:
        try:
            body, key = open_note(note, keys)
        except IntegrityError as exc:
            hour = _peek_hour(note)
            raise IntegrityError(f"digest signature: {exc.message}", hour) from None
        d = Digest.parse(body)
        if d.key_id != key.key_id:
            raise IntegrityError(f"digest {d.seq} names key {d.key_id} but {key.key_id} signed it",
                                 d.hour)  # fmt: skip
        used.add(str(key))
        if digests:
            prev = digests[-1]
            if d.origin != prev.origin:
                raise IntegrityError(f"digest {d.seq} is from origin {d.origin!r}, not "
                                     f"{prev.origin!r}", d.hour)  # fmt: skip
            if d.seq != prev.seq + 1:
                # The missing digest's hour, when the sealed hours show it; else this one's.
                gap_hour = d.hour
                sealed_after_gap = d.kind == "sealed" and last_sealed is not None
                if sealed_after_gap and parse_hour(d.hour) > last_sealed + HOUR:
                    gap_hour = hour_text(last_sealed + HOUR)
                raise IntegrityError(
                    f"chain gap: digest {d.seq} follows digest {prev.seq}"
                    f" (digests {prev.seq + 1}..{d.seq - 1} are missing)"
                    if d.seq > prev.seq + 1
                    else f"chain out of order: digest {d.seq} follows digest {prev.seq}",
                    gap_hour,
                )
            if d.previous != note_hash(previous_note or ""):
                raise IntegrityError(
                    f"chain broken: digest {d.seq} does not pin digest {prev.seq}"
                    " (a fork or a replaced digest)",
                    d.hour,
                )
        elif d.seq != 0 and d.previous == NO_PREVIOUS:
            raise IntegrityError(f"digest {d.seq} claims to start the chain", d.hour)
        if d.kind == "sealed":
            hour = parse_hour(d.hour)
            if last_sealed is not None and hour != last_sealed + HOUR:
                missing = hour_text(last_sealed + HOUR)
                raise IntegrityError(
                    f"hour {missing} has no digest (sealed hours jump from "
                    f"{hour_text(last_sealed)} to {d.hour})"
                    if hour > last_sealed + HOUR
                    else f"sealed out of order after {hour_text(last_sealed)}",
                    missing if hour > last_sealed + HOUR else d.hour,
                )
            last_sealed = hour
            sealed_hours.add(d.hour)
        elif d.kind == "supplement" and d.hour not in sealed_hours and digests:
            raise IntegrityError(f"supplement digest {d.seq} for an hour not sealed before it",
                                 d.hour)  # fmt: skip
        digests.append(d)
        previous_note = note
    return ChainReport(digests, used, [d for d in digests if d.kind == "retired"])


def _peek_hour(note: str) -> str | None:
    m = re.search(r"^hour (\S+)$", note, re.MULTILINE)
    return m.group(1) if m else None


@dataclass
class HourRows:
    """An hour's rows as the verifier holds them: leaf hash, id, sort key."""

    leaves: list[tuple[tuple[str, str, str, str], bytes, str]] = field(default_factory=list)

    def add(self, row: dict, line: str | None = None) -> None:
        # From the line when there is one: the text takes the fast canonical path.
        self.leaves.append((leaf_order(row), leaf_hash(line or row), row["id"]))


def rows_by_hour(lines: Iterable[str]) -> dict[str, HourRows]:
    """Export lines grouped by sealed hour; a line that is not a row is an error naming it."""
    hours: dict[str, HourRows] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            hour = hour_of(row["ingested_at"])
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"events line {number} is not an exported audit row") from None
        hours.setdefault(hour, HourRows()).add(row, line)
    return hours


def check_hour(hour: str, rows: HourRows | None, digests: Sequence[Digest]) -> None:
    """Recompute an hour's trees (the sealed one and each supplement) against its digests."""
    entries = sorted(rows.leaves) if rows else []
    claimed: dict[bytes, int] = {}
    sealed = [d for d in digests if d.kind == "sealed"]
    if not sealed:
        raise IntegrityError("supplement digests without the hour's sealed digest", hour)
    supplements = [d for d in digests if d.kind == "supplement"]
    for i, d in enumerate(supplements):
        for h in d.leaves:
            claimed[h] = i
    main = [(k, h, rid) for k, h, rid in entries if h not in claimed]
    groups: list[list[tuple]] = [[] for _ in supplements]
    for entry in entries:
        if entry[1] in claimed:
            groups[claimed[entry[1]]].append(entry)
    for d, group in [(sealed[0], main), *zip(supplements, groups, strict=True)]:
        leaves = [h for _, h, _ in group]
        if merkle_root(leaves) == d.root and len(leaves) == d.count:
            continue
        raise IntegrityError(_explain(d, group), hour, _suspect(d, group))


def _explain(d: Digest, group: list[tuple]) -> str:
    what = f"the {d.kind} digest {d.seq}"
    if len(group) != d.count:
        return (f"{what} covers {d.count} row(s) but {len(group)} are present"
                f" ({'some deleted' if len(group) < d.count else 'some added'})")  # fmt: skip
    return f"{what}'s root does not match the rows (a row was changed)"


def _suspect(d: Digest, group: list[tuple]) -> str | None:
    """The row a mismatch points at, when the digest lists its leaves (supplements)."""
    if d.leaves:
        listed = set(d.leaves)
        for _, h, rid in group:
            if h not in listed:
                return rid
    return None


@dataclass
class VerifyResult:
    digests: int
    hours: int
    rows: int
    first_hour: str | None
    last_hour: str | None
    retired: list[str]
    keys: int
    unsealed_rows: int = 0

    def summary(self) -> str:
        span = f"{self.first_hour} .. {self.last_hour}" if self.first_hour else "no hours"
        text = (
            f"OK: {self.rows} row(s) in {self.hours} hour(s) ({span}) match"
            f" {self.digests} signed digest(s) from {self.keys} key(s); chain intact"
        )
        if self.retired:
            text += "; not recomputed, partitions dropped by retention: " + ", ".join(self.retired)
        if self.unsealed_rows:
            text += f"; {self.unsealed_rows} newer row(s) not sealed yet"
        return text


def retired_spans(digests: Iterable[Digest]) -> list[tuple[str, str, str]]:
    """(month, first hour, last hour) of each dropped partition's rows, from retired digests."""
    return [(d.month or "?", d.hour, d.through) for d in digests
            if d.kind == "retired" and d.through is not None]  # fmt: skip


def verify(
    event_lines: Iterable[str], notes: Sequence[str], keys: Sequence[VerifierKey]
) -> VerifyResult:
    """The offline check: the chain, then every sealed hour's rows against its digests.

    Rows of hours the digests do not reach are an error (nothing vouches for
    them), except those after the last sealed hour, which are simply not sealed
    yet. Hours that held rows of a partition dropped by retention (a retired
    digest names them) cannot be recomputed, and the summary says so.
    """
    report = verify_chain(notes, keys)
    hours = rows_by_hour(event_lines)
    by_hour: dict[str, list[Digest]] = {}
    for d in report.digests:
        if d.kind != "retired":
            by_hour.setdefault(d.hour, []).append(d)
    spans = retired_spans(report.retired)

    def retired(hour: str) -> bool:
        return any(start <= hour <= end for _, start, end in spans)

    sealed = sorted(by_hour)
    first, last = (sealed[0], sealed[-1]) if sealed else (None, None)
    checked_rows = checked_hours = 0
    for hour in sealed:
        if retired(hour):
            continue
        check_hour(hour, hours.get(hour), by_hour[hour])
        checked_hours += 1
        checked_rows += len(hours[hour].leaves) if hour in hours else 0
    unsealed = 0
    for hour, rows in sorted(hours.items()):
        if hour in by_hour or retired(hour):
            continue
        if last is not None and hour > last:
            unsealed += len(rows.leaves)
            continue
        raise IntegrityError(f"{len(rows.leaves)} row(s) that no digest covers", hour,
                             sorted(rows.leaves)[0][2])  # fmt: skip
    return VerifyResult(
        digests=len(report.digests),
        hours=checked_hours,
        rows=checked_rows,
        first_hour=first,
        last_hour=last,
        retired=[f"{m} (hours {a} .. {b})" for m, a, b in spans],
        keys=len(report.keys_used),
        unsealed_rows=unsealed,
    )
