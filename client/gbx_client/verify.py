"""Offline verification of a seal: the document, the key it names, the signature, and optionally the outputs it seals."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gbx_client import hashing
from gbx_client.errors import GbxError, UsageError
from gbx_client.seal_format import (
    SEAL_ALG,
    SealDocumentInvalid,
    SealPayloadInvalid,
    SealTooLarge,
    b64url_decode,
    decode_payload,
    read_seal_element,
)

OK = "ok"
NOT_CHECKED = "not checked"
SEAL_FILES = ("seal.json", "seal.sig", "seal.svg", "public_key.pem", "verify_link.txt", "VERIFY.md")
LINK_FILE = "verify_link.txt"


@dataclass(frozen=True)
class SealFiles:
    """A seal as found on disk (the svg, and when SEAL is a seal directory its other files), or a verification link."""

    source: Path | str
    svg: bytes
    seal_json: bytes | None = None
    seal_sig: bytes | None = None
    public_key_pem: bytes | None = None
    link: str | None = None  # a seal given as its link BASE/v#P.S (then svg is empty), or a seal directory's link file
    unreadable: str | None = None  # why a picture holds no seal (no QR code, several, not a link): the document check's failure
    tlog_proof: bytes | None = None  # a seal directory's seal.tlog-proof: the seal log's proof that it is logged


def is_link(text: str) -> bool:
    """Whether a SEAL argument is a verification link rather than a path."""
    return text.startswith(("http://", "https://"))


def link_seal(link: str) -> SealFiles:
    """A seal given as its verification link."""
    return SealFiles(source=link, svg=b"", link=link)


@dataclass(frozen=True)
class KeyRing:
    """The public keys a seal may name: by CryptoKeyVersion name, or one key trusted whatever the name."""

    source: str
    by_name: dict[str, str] = field(default_factory=dict)
    any_name: str | None = None
    log_vkey: str | None = None  # the seal log's verifier key, when the keys document (or --log-key) gives it

    def find(self, name: str) -> str | None:
        """The PEM for a key name, or None when it is not trusted."""
        return self.any_name if self.any_name is not None else self.by_name.get(name)


@dataclass
class Verification:
    """The checks in the order they ran (each "ok", a reason, or "not checked") and the claims."""

    checks: dict[str, str]
    claims: dict[str, Any]
    logged: tuple[int, int] | None = None  # (index, tree size) of a verified seal.tlog-proof

    @property
    def verified(self) -> bool:
        """True only when every check passed."""
        return all(value == OK for value in self.checks.values())

    @property
    def seal_id(self) -> str | None:
        """The payload's seal_id, when it decoded."""
        value = self.claims.get("seal_id")
        return value if isinstance(value, str) else None

    def first_failure(self) -> str:
        """The first failing check as "name: reason"."""
        return next((f"{name}: {value}" for name, value in self.checks.items() if value != OK), "")

    def as_json(self) -> dict[str, Any]:
        """The machine-readable form (`--json`), shaped like the service's verify answer."""
        return {"status": "VERIFIED" if self.verified else "INVALID", "seal_id": self.seal_id, "checks": self.checks, "seal": self.claims}


def load_seal(path: Path) -> SealFiles:
    """Read a seal.svg, or a seal directory's files; UsageError when there is nothing to read."""
    try:
        if path.is_dir():
            return SealFiles(
                source=path,
                svg=(path / "seal.svg").read_bytes(),
                seal_json=_read_optional(path / "seal.json"),
                seal_sig=_read_optional(path / "seal.sig"),
                public_key_pem=_read_optional(path / "public_key.pem"),
                link=_read_link(path / LINK_FILE),
                tlog_proof=_read_optional(path / "seal.tlog-proof"),
            )
        return SealFiles(source=path, svg=path.read_bytes())
    except OSError as exc:
        raise UsageError(f"cannot read the seal {path}: {exc.strerror or exc}") from exc


def _read_optional(path: Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


def _read_link(path: Path) -> str | None:
    data = _read_optional(path)
    return data.decode("utf-8", "replace").strip() if data is not None else None


def keys_document(document: Any, source: str) -> KeyRing:
    """A KeyRing from GET /api/seal/public_keys's document: {"keys": [{"key", "alg", "pem"}]}."""
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise UsageError(f"{source} is not a public keys document ({{\"keys\": [...]}})")
    by_name = {
        entry["key"]: entry["pem"]
        for entry in entries
        if isinstance(entry, dict) and entry.get("alg") == SEAL_ALG and isinstance(entry.get("key"), str) and isinstance(entry.get("pem"), str)
    }
    log = document.get("log")
    log_vkey = log.get("vkey") if isinstance(log, dict) and isinstance(log.get("vkey"), str) else None
    return KeyRing(source=source, by_name=by_name, log_vkey=log_vkey)


def keys_file(path: Path) -> KeyRing:
    """A KeyRing from a saved public keys document."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read the public keys document {path}: {exc}") from exc
    return keys_document(document, str(path))


def single_key(pem: bytes | str, source: str) -> KeyRing:
    """A KeyRing of one PEM, trusted whatever key name the seal gives."""
    return KeyRing(source=source, any_name=pem.decode("utf-8", "replace") if isinstance(pem, bytes) else pem)


def verify_seal(
    seal: SealFiles,
    keys: KeyRing,
    *,
    outputs: Path | None = None,
    expected: dict[str, str | None] | None = None,
    online: Callable[[SealFiles], str] | None = None,
    require_log: bool = False,
) -> Verification:
    """Run the checks in order (document, key, signature, log, then claims, outputs, online); a failure stops the later ones.

    `log` runs when the seal comes with its seal.tlog-proof and the keys give the log's vkey, or when `require_log`.
    """
    names = ["document", "key", "signature"]
    if require_log or (seal.tlog_proof is not None and keys.log_vkey is not None):
        names.append("log")
    if expected is not None:
        names.append("claims")
    if outputs is not None:
        names.append("outputs")
    if online is not None:
        names.append("online")
    checks = dict.fromkeys(names, NOT_CHECKED)
    result = Verification(checks=checks, claims={})

    if seal.unreadable is not None:
        checks["document"] = seal.unreadable
        return result
    try:
        # A link is a seal once its fragment inflates: a tampered one fails here or at the signature.
        # A seal given as its link has no svg; a seal directory's link file is checked against its svg below.
        element = read_seal_element(svg=seal.svg, link=seal.link if not seal.svg else None)
    except (SealDocumentInvalid, SealTooLarge) as exc:
        checks["document"] = str(exc)
        return result
    except SealPayloadInvalid as exc:
        checks["document"] = exc.reason
        return result
    try:
        claims, payload = decode_payload(element.payload)
    except SealPayloadInvalid as exc:
        checks["document"] = exc.reason
        return result
    result.claims = claims
    # A signature that does not decode is the signature check's failure, as the service reports it.
    der: bytes | None
    try:
        der = b64url_decode(element.signature)
    except ValueError:
        der = None
    document_problem = _document_problem(seal, claims, element.key, payload, der)
    checks["document"] = document_problem or OK
    if document_problem:
        return result

    pem = keys.find(element.key)
    if pem is None:
        # The service's words; the CLI names where the trusted keys came from beside the checks.
        checks["key"] = "key version is not trusted"
        return result
    public_key = _load_p256(pem)
    if public_key is None:
        checks["key"] = f"the key from {keys.source} is not a P-256 public key"
        return result
    checks["key"] = OK

    if der is None:
        checks["signature"] = "signature is not base64url"
        return result
    try:
        public_key.verify(der, payload, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        checks["signature"] = "signature does not match the payload"
        return result
    checks["signature"] = OK

    if "log" in checks:
        checks["log"] = _log_check(seal, keys, payload, result)
        if checks["log"] != OK:
            return result
    if expected is not None:
        differing = sorted(name for name, value in expected.items() if claims.get(name) != value)
        checks["claims"] = f"the seal names other {', '.join(differing)}" if differing else OK
        if differing:
            return result
    if outputs is not None:
        checks["outputs"] = _outputs_check(outputs, claims["outputs_sha256"])
        if checks["outputs"] != OK:
            return result
    if online is not None:
        checks["online"] = online(seal)
    return result


def _log_check(seal: SealFiles, keys: KeyRing, payload: bytes, result: Verification) -> str:
    """Whether the seal's tlog-proof puts its seal.json in a checkpoint the log's key signed (offline)."""
    from gbx_client import logproof, tlog

    if seal.tlog_proof is None:
        source = seal.source
        if isinstance(source, Path) and source.is_file() and (source.parent / "seal.tlog-proof").is_file():
            # A seal.svg given alone: the proof beside it may belong to another seal, so it is not read unasked.
            return f"no seal.tlog-proof with the seal (--require-log): give the seal directory ({source.parent}) to check the seal.tlog-proof beside {source.name}"
        return "no seal.tlog-proof with the seal (--require-log)"
    if keys.log_vkey is None:
        return "no log key to check seal.tlog-proof against (--keys, --online or --log-key)"
    try:
        result.logged = logproof.check_proof(seal.tlog_proof, seal_json=payload, vkey=keys.log_vkey)
    except (tlog.LogFormatError, tlog.LogVerificationError) as exc:
        return f"seal.tlog-proof does not verify: {exc}"
    return OK


def _document_problem(seal: SealFiles, claims: dict[str, Any], key: str, payload: bytes, der: bytes | None) -> str:
    """Why the document is inconsistent (its key, or a seal directory's files against the svg), or ""."""
    if claims["key"] != key:
        return "payload key differs from the seal element's key"
    # A seal directory must agree with itself: openssl checks seal.json and seal.sig, gbx the svg.
    if seal.seal_json is not None and seal.seal_json != payload:
        return "seal.json differs from the payload in seal.svg"
    if seal.seal_sig is not None and der is not None and seal.seal_sig != der:
        return "seal.sig differs from the signature in seal.svg"
    if seal.link is not None and seal.svg and not _link_matches(seal.link, payload, der):
        return f"{LINK_FILE} is not the link of seal.svg's payload and signature"
    return ""


def _link_matches(link: str, payload: bytes, der: bytes | None) -> bool:
    """Whether a seal directory's link carries exactly the svg's payload and signature."""
    try:
        element = read_seal_element(link=link)
        return b64url_decode(element.payload) == payload and b64url_decode(element.signature) == der
    except (SealDocumentInvalid, SealPayloadInvalid, ValueError):
        return False


def _outputs_check(outputs: Path, sealed: str) -> str:
    """Whether the files at `outputs` are the sealed outputs."""
    try:
        found = hashing.canonical_hash(outputs).sha256
    except GbxError as exc:
        return f"cannot hash {outputs}: {exc}"
    if found != sealed.lower():
        return f"{outputs} hashes to {found}, the seal names {sealed}"
    return OK


def _load_p256(pem: str) -> ec.EllipticCurvePublicKey | None:
    """A P-256 public key from SPKI PEM, or None."""
    try:
        key = serialization.load_pem_public_key(pem.encode("utf-8"))
    except (ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        return None
    return key
