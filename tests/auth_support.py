"""Bad bearer tokens, built the way an attacker builds them; shared by every auth test.

No JOSE by hand beyond what forging needs: `alg: none` and the HS256 key
confusion cannot be made with PyJWT (it refuses to), so those two are
assembled from base64 segments here.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import jwt

from openg2p_audit.devservices.issuer import LocalIssuer


def _b64(data: bytes | dict) -> str:
    if isinstance(data, dict):
        data = json.dumps(data).encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(issuer: LocalIssuer, audience: str | None = None) -> dict[str, str]:
    """Every kind of bad token, by name."""
    now = int(time.time())
    good = issuer.claims("mallory", ("audit.read", "audit.export"))
    if audience is not None:
        good["aud"] = audience
    other = LocalIssuer(issuer.url)
    unsigned = f"{_b64({'alg': 'none', 'typ': 'JWT', 'kid': issuer.kid})}.{_b64(good)}."
    # Key confusion: HS256 with the issuer's public key as the HMAC secret, which a
    # verifier that lets the token choose the algorithm would accept.
    head = f"{_b64({'alg': 'HS256', 'typ': 'JWT', 'kid': issuer.kid})}.{_b64(good)}"
    mac = hmac.new(issuer.public_pem(), head.encode(), hashlib.sha256).digest()
    confused = f"{head}.{_b64(mac)}"
    signed = issuer.sign(good).split(".")
    return {
        "malformed": "not-a-token",
        "malformed_segments": "a.b.c",
        "garbage_base64": f"{_b64(b'{')}.{_b64(b'x')}.{_b64(b'y')}",
        "expired": issuer.sign({**good, "exp": now - 120, "iat": now - 3600}),
        "not_yet_valid": issuer.sign({**good, "nbf": now + 600}),
        "wrong_issuer": issuer.sign({**good, "iss": "https://evil.example/realms/openg2p"}),
        "wrong_audience": issuer.sign({**good, "aud": "some-other-client"}),
        "no_audience": issuer.sign({k: v for k, v in good.items() if k != "aud"}),
        "no_expiry": issuer.sign({k: v for k, v in good.items() if k != "exp"}),
        "no_subject": issuer.sign({k: v for k, v in good.items() if k != "sub"}),
        "unknown_kid": other.mint("mallory", ("audit.read",)),
        "other_key_same_kid": other.sign(good, {"kid": issuer.kid}),
        "no_kid": jwt.encode(good, issuer.key, algorithm="RS256"),
        "alg_none": unsigned,
        "hs256_with_public_key": confused,
        "tampered_payload": f"{signed[0]}.{_b64({**good, 'sub': 'admin'})}.{signed[2]}",
        "oversized": "a" * 20_000,
    }
