"""Evidence bundles: a few events with proof that they are what the signed digests sealed.

An investigator hands a court or an auditor the events of one actor, one
resource or one trace without the rest of their hours: each event comes with
its RFC 6962 inclusion proof in the tree of the digest that covers it, that
digest as signed, and the public key. `verify --bundle` needs nothing else.

The zip holds:
  events.jsonl   the selected rows, in the query export's format
  proofs.jsonl   per row: the digest's sequence number, leaf index, tree size, audit path
  digests.jsonl  the covering digests (signed notes)
  public-key.txt the verifier key(s) the digests were signed with, for reference only
  README.txt     what the above are and how to check them

Building one needs read access and the verifier (public) key, never the sealing
key: the covering digests are checked against the keys given before the bundle
is written. Checking one needs a key the checker trusts, never the bundle's own
public-key.txt: anyone can make a key pair and sign a bundle with it.
"""

from __future__ import annotations

import base64
import json
import zipfile
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import pg8000.native

from . import integrity, query, sealing, store
from .integrity import HOUR, Digest, IntegrityError, VerifierKey

README = """Evidence bundle from the OpenG2P audit trail ({origin})

Selected: {selection}
Events: {count}, in hours {hours}

events.jsonl holds the selected audit rows exactly as stored (the query
export's JSON lines). For each, proofs.jsonl gives the RFC 6962 inclusion
proof of its leaf, SHA-256(0x00 || RFC 8785 canonical JSON of the row), in the
Merkle tree of one hourly digest in digests.jsonl. Each digest is a C2SP signed
note (Ed25519). public-key.txt names the keys that signed them, for reference
only: a bundle cannot vouch for itself. Check it with the verifier key that the
operator of {origin} publishes (`openg2p-audit integrity public-key`), obtained
from the operator, not from this bundle:

  openg2p-audit verify --bundle THIS.zip --public-key OPERATOR-KEY.pub
"""


class EvidenceError(ValueError):
    """A bundle that cannot be built as asked."""


def _select(conn, filters: query.Filters) -> list[str]:
    clause, params = query.where(filters)
    sql = f"SELECT {query._JSON_LINE} FROM {store.TABLE} WHERE {clause} ORDER BY occurred_at, id"
    return [r[0] for r in conn.run(sql, **params)]


def _hour_digests(conn, hour: datetime) -> list[tuple[Digest, str]]:
    rows = conn.run(
        f"SELECT note FROM {sealing.DIGESTS} WHERE hour = :h AND kind <> 'retired' ORDER BY seq",
        h=hour,
    )
    return [(Digest.parse(n.rpartition("\n\n")[0] + "\n"), n) for (n,) in rows]


def build(
    settings, conn: pg8000.native.Connection, filters: query.Filters, output: str | Path,
    keys: Sequence[VerifierKey],
) -> int:  # fmt: skip
    """Write the bundle; return how many events it holds. Every event must be sealed, and
    every covering digest must verify with one of `keys` (the verifier keys)."""
    if not keys:
        raise EvidenceError(
            "no verifier key: give --public-key FILE or set INTEGRITY_VERIFIER_KEYS "
            "(the key `openg2p-audit integrity public-key` prints)"
        )
    lines = _select(conn, filters)
    if not lines:
        raise EvidenceError("no event matches the selection")
    by_hour: dict[str, list[str]] = {}
    for line in lines:
        by_hour.setdefault(integrity.hour_of(json.loads(line)["ingested_at"]), []).append(line)
    proofs, notes, signed_by = [], {}, {}
    for hour_text, selected in sorted(by_hour.items()):
        hour = integrity.parse_hour(hour_text)
        digests = _hour_digests(conn, hour)
        if not digests:
            raise EvidenceError(f"hour {hour_text} is not sealed yet: seal it first")
        claimed = {h: d for d, _ in digests for h in d.leaves}
        sealed = next(d for d, _ in digests if d.kind == "sealed")
        trees: dict[int, list[bytes]] = {d.seq: [] for d, _ in digests}
        for line in sealing.event_lines(conn, hour, hour + HOUR):
            leaf = integrity.leaf_hash(line)
            trees[claimed.get(leaf, sealed).seq].append(leaf)
        for line in selected:
            leaf = integrity.leaf_hash(line)
            digest = claimed.get(leaf, sealed)
            tree = trees[digest.seq]
            index = tree.index(leaf)
            row = json.loads(line)
            proofs.append({
                "id": row["id"], "occurred_at": row["occurred_at"], "hour": hour_text,
                "seq": digest.seq, "index": index, "size": len(tree),
                "proof": [base64.b64encode(p).decode()
                          for p in integrity.inclusion_proof(tree, index)],
            })  # fmt: skip
        for d, note in digests:
            try:
                signed_by[d.seq] = integrity.open_note(note, keys)[1]
            except IntegrityError as exc:
                raise EvidenceError(f"digest {d.seq} (hour {d.hour}) does not verify with the "
                                    f"given verifier keys: {exc.message}") from None  # fmt: skip
            notes[d.seq] = note
    public = sorted({str(k) for k in signed_by.values()})
    selection = ", ".join(f"{k}={v}" for k, v in filters.as_params().items())
    with zipfile.ZipFile(output, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("events.jsonl", "".join(line + "\n" for line in lines))
        z.writestr("proofs.jsonl", "".join(json.dumps(p) + "\n" for p in proofs))
        covering = sealing.digest_lines([notes[seq] for seq in sorted(notes)])
        z.writestr("digests.jsonl", "".join(line + "\n" for line in covering))
        z.writestr("public-key.txt", "\n".join(public) + "\n")
        z.writestr("README.txt", README.format(
            origin=settings.integrity_origin, selection=selection, count=len(lines),
            hours=f"{min(by_hour)} .. {max(by_hour)}"))  # fmt: skip
    return len(lines)


def verify_bundle(path: str | Path, keys: Sequence[VerifierKey]) -> str:
    """Check every event of a bundle against its proof and signed digest; one line if all hold.

    `keys` are the keys the checker trusts; the bundle's own public-key.txt is
    only named in the error when its keys are not among them.
    """
    if not keys:
        raise ValueError("no trusted verifier key")
    try:
        with zipfile.ZipFile(path) as z:
            files = {n: z.read(n).decode() for n in z.namelist()}
    except (OSError, zipfile.BadZipFile) as exc:
        raise ValueError(f"not an evidence bundle: {exc}") from None
    for name in ("events.jsonl", "proofs.jsonl", "digests.jsonl", "public-key.txt"):
        if name not in files:
            raise ValueError(f"not an evidence bundle: {name} is missing")
    trusted = {str(k) for k in keys}
    shipped = [x.strip() for x in files["public-key.txt"].splitlines()
               if x.strip() and not x.startswith("#")]  # fmt: skip
    untrusted = [k for k in shipped if k not in trusted]
    digests: dict[int, Digest] = {}
    for note in integrity.read_digest_lines(files["digests.jsonl"].splitlines()):
        try:
            body, _ = integrity.open_note(note, keys)
        except IntegrityError as exc:
            hint = (f" (the bundle names its own key {', '.join(untrusted)}, which is not a "
                    "trusted one)") if untrusted else ""  # fmt: skip
            raise IntegrityError(f"digest signature: {exc.message}{hint}",
                                 integrity._peek_hour(note)) from None  # fmt: skip
        d = Digest.parse(body)
        digests[d.seq] = d
    proofs = [json.loads(x) for x in files["proofs.jsonl"].splitlines() if x.strip()]
    events = [x for x in files["events.jsonl"].splitlines() if x.strip()]
    if len(proofs) != len(events):
        raise IntegrityError(f"{len(events)} event(s) but {len(proofs)} proof(s)")
    by_key = {(p["id"], p["occurred_at"]): p for p in proofs}
    for line in events:
        row = json.loads(line)
        p = by_key.get((row["id"], row["occurred_at"]))
        hour = integrity.hour_of(row["ingested_at"])
        if p is None:
            raise IntegrityError("an event without its proof", hour, row["id"])
        d = digests.get(p["seq"])
        if d is None or d.hour != p["hour"] or p["hour"] != hour:
            raise IntegrityError(f"no signed digest {p['seq']} for this hour", hour, row["id"])
        if p["size"] != d.count:
            raise IntegrityError(f"the proof's tree size {p['size']} is not digest {d.seq}'s "
                                 f"{d.count}", hour, row["id"])  # fmt: skip
        path = [base64.b64decode(x) for x in p["proof"]]
        root = integrity.root_from_proof(integrity.leaf_hash(line), p["index"], p["size"], path)
        if root != d.root:
            raise IntegrityError(f"the event does not match digest {d.seq}: it was changed",
                                 hour, row["id"])  # fmt: skip
    return (f"OK: {len(events)} event(s) proven included in {len(digests)} signed digest(s)"
            f" of {next(iter(digests.values())).origin}")  # fmt: skip
