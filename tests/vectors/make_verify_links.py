"""Writes verify_links.json beside it, the link vectors shared by the service, gbx and the portal: `.venv/bin/python -m tests.vectors.make_verify_links`."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

from gbx_client.seal_format import MAX_LINK_PAYLOAD_BYTES, b64url_encode, canonical_json

OUT = Path(__file__).resolve().parent / "verify_links.json"

KEY = "projects/gbx-prod/locations/global/keyRings/seals/cryptoKeys/seal/cryptoKeyVersions/3"
claims: dict[str, object] = {"v": 1, "seal_id": "q3Jx8WZrT0mB5vK2nYdL7A", "run_id": "nightly-2024-05-01.r42",
  "principal": "build-bot@acme.iam.gserviceaccount.com", "project_id": "acme-analytics-prod",
  "container_image": "europe-west1-docker.pkg.dev/acme/pipelines/extract:v2@sha256:" + "3f9a1c0b7e6d5a4f" + "0123456789abcdef" * 2 + "89abcdef01234567",
  "inputs_sha256": "a" * 64, "outputs_sha256": "b" * 64, "consumed_at": "2024-05-01T12:00:00Z",
  "started_at": "2024-05-01T12:00:05Z", "completed_at": "2024-05-01T12:34:56.789Z", "issuer": "gbx-prod", "key": KEY}
SIG = bytes.fromhex("3045022100") + bytes(range(1, 33)) + bytes.fromhex("0220") + bytes(range(32, 64))
S = b64url_encode(SIG)

def raw(data: bytes, level: int = 9) -> bytes:
    """Raw DEFLATE (no zlib header) of data."""
    deflate = zlib.compressobj(level, zlib.DEFLATED, -15)
    return deflate.compress(data) + deflate.flush()


payload = canonical_json(claims)
P = b64url_encode(raw(payload))
vectors: list[dict[str, str]] = []


def add(name: str, fragment: str, document: str, payload_bytes: bytes | None = None) -> None:
    """One vector: a fragment and the document check it gives (and the bytes it inflates to, when it does)."""
    v = {"name": name, "fragment": fragment, "document": document}
    if payload_bytes is not None:
        v["payload_hex"] = payload_bytes.hex()
    vectors.append(v)

add("genuine", f"{P}.{S}", "ok", payload)
add("stored blocks (level 0) inflate to the same bytes", f"{b64url_encode(raw(payload, 0))}.{S}", "ok", payload)
add("no signature part", P, "the link is damaged or incomplete (cut off when copied?): its part after # is not payload.signature")
add("three parts", f"{P}.{S}.{S}", "the link is damaged or incomplete (cut off when copied?): its part after # is not payload.signature")
add("empty fragment", "", "the link is damaged or incomplete (cut off when copied?): its part after # is not payload.signature")
add("padded base64url", f"{b64url_encode(raw(payload))}==.{S}" if len(b64url_encode(raw(payload))) % 4 == 2 else f"{P}=.{S}", "payload is not base64url")
add("standard base64 alphabet", f"{P[:10]}+/{P[12:]}.{S}", "payload is not base64url")
add("zlib header instead of raw DEFLATE", f"{b64url_encode(zlib.compress(payload))}.{S}", "payload does not inflate (raw DEFLATE)")
add("truncated DEFLATE stream", f"{b64url_encode(raw(payload)[:-8])}.{S}", "payload does not inflate (raw DEFLATE)")
add("bytes after the DEFLATE stream", f"{b64url_encode(raw(payload) + b'junk')}.{S}", "payload does not inflate (raw DEFLATE)")
add("empty payload", f".{S}", "payload does not inflate (raw DEFLATE)")
add("inflates beyond the limit", f"{b64url_encode(raw(b' ' * (MAX_LINK_PAYLOAD_BYTES + 1)))}.{S}", f"payload inflates to more than {MAX_LINK_PAYLOAD_BYTES} bytes")
add("not canonical JSON", f"{b64url_encode(raw(json.dumps(claims).encode()))}.{S}", "payload is not canonical JSON")
BAD = b64url_encode(raw(bytes([0xff, 0xfe])))
add("not UTF-8", f"{BAD}.{S}", "payload is not UTF-8 JSON")
add("a claim missing", f"{b64url_encode(raw(canonical_json({k: v for k, v in claims.items() if k != 'issuer'})))}.{S}", "payload lacks claims: issuer")
add("an unknown claim", f"{b64url_encode(raw(canonical_json({**claims, 'extra': 'x'})))}.{S}", "payload has unknown claims: extra")
add("not an object", f"{b64url_encode(raw(b'[]'))}.{S}", "payload is not a JSON object")
doc = {"_comment": "Verification link fragments (P.S of BASE/v#P.S) and the document check each must give, in the service, gbx and the portal. "
       "payload_hex: the exact bytes a fragment inflates to. The signature is not a real one: the key check never passes.",
       "key": KEY, "vectors": vectors}
OUT.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
