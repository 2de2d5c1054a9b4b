"""Seal signing behind a small Protocol: Cloud KMS in production, a local P-256 key in local mode."""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from shared import config, errors
from shared.files import write_once

if TYPE_CHECKING:
    # Only for annotations: importing google.cloud.kms costs a cold start that never signs.
    from google.api_core.retry import Retry
    from google.cloud import kms_v1

ALG = "ES256"
KMS_ALGORITHM = "EC_SIGN_P256_SHA256"
LOCAL_KEY_FILE = "seal-signing-key.pem"
LOCAL_KEY_NAME = "projects/local/locations/local/keyRings/gbx/cryptoKeys/seal/cryptoKeyVersions/1"

# Overall budget of one KMS call, retries included: run_complete answers 503 rather than hang.
KMS_TIMEOUT_SECONDS = 10.0
# Retry a transient UNAVAILABLE briefly; a longer outage is the caller's 503 + Retry-After.
KMS_RETRY_SECONDS = 2.0


@dataclass(frozen=True)
class Signature:
    """A DER-encoded ECDSA signature and the key version that made it."""

    key: str
    alg: str
    der: bytes


@dataclass(frozen=True)
class PublicKey:
    """A trusted key version's public key (SPKI PEM)."""

    key: str
    alg: str
    pem: str


@runtime_checkable
class Signer(Protocol):
    """Signs seals and lists the public keys that seals verify against."""

    key_version: str
    """CryptoKeyVersion name that `sign` signs with (written into a seal before it is signed)."""

    def sign(self, data: bytes) -> Signature:
        """ECDSA P-256 SHA-256 signature over `data` (SHA-256 of it, signed)."""
        ...

    def public_keys(self) -> list[PublicKey]:
        """One public key per trusted key version, the signing one included."""
        ...

    def public_key(self, key: str) -> PublicKey | None:
        """The public key of one trusted version (fetched once, cached); None when `key` is not trusted."""
        ...


def _crc32c(data: bytes) -> int:
    """CRC32C as Cloud KMS computes it, for the integrity checks of its responses."""
    import google_crc32c

    return int(google_crc32c.value(data))


def _short_retry(seconds: float) -> Retry | None:
    """Retry transient KMS failures for `seconds` (the library's default backs off for 60 s); 0: no retry."""
    if seconds <= 0:
        return None
    from google.api_core import exceptions as core_exceptions
    from google.api_core import retry as retries

    return retries.Retry(
        initial=0.1,
        maximum=0.5,
        multiplier=2.0,
        timeout=seconds,
        predicate=retries.if_exception_type(core_exceptions.ServiceUnavailable, core_exceptions.DeadlineExceeded),
    )


class KmsSigner:
    """Signs with a Cloud KMS EC_SIGN_P256_SHA256 key version, checking CRC32Cs as Google's samples do."""

    def __init__(
        self,
        *,
        key_version: str,
        trusted_versions: Sequence[str],
        client: kms_v1.KeyManagementServiceClient,
        timeout_seconds: float = KMS_TIMEOUT_SECONDS,
        retry_seconds: float = KMS_RETRY_SECONDS,
    ) -> None:
        """Sign with `key_version`; trust it and `trusted_versions` (in that order, deduplicated)."""
        if not key_version:
            raise ValueError("key_version is required")
        self.key_version = key_version
        # The signing version always verifies its own seals, whatever the configuration lists.
        self.trusted_versions: tuple[str, ...] = tuple(dict.fromkeys([key_version, *trusted_versions]))
        self._client = client
        self._timeout = timeout_seconds
        self._retry = _short_retry(retry_seconds)
        self._public_keys: dict[str, PublicKey] = {}
        self._lock = threading.Lock()

    def sign(self, data: bytes) -> Signature:
        """Sign SHA-256(data) with the configured key version; KMS failures are `errors.Unavailable`."""
        digest = hashlib.sha256(data).digest()
        response = self._call(
            self._client.asymmetric_sign,
            {"name": self.key_version, "digest": {"sha256": digest}, "digest_crc32c": _crc32c(digest)},
        )
        # The three integrity checks of Google's sign_asymmetric.py sample.
        if not response.verified_digest_crc32c:
            raise errors.Unavailable("KMS did not verify the digest checksum; retry")
        if response.name != self.key_version:
            raise errors.Unavailable("KMS answered for another key version; retry")
        if response.signature_crc32c != _crc32c(response.signature):
            raise errors.Unavailable("KMS signature checksum mismatch; retry")
        return Signature(key=response.name, alg=ALG, der=bytes(response.signature))

    def public_keys(self) -> list[PublicKey]:
        """Public keys of every trusted version, each fetched from KMS once and then cached."""
        # One lock for all fetches: concurrent cold requests make one GetPublicKey per version, not many.
        return [key for key in map(self.public_key, self.trusted_versions) if key is not None]

    def public_key(self, key: str) -> PublicKey | None:
        """One trusted version's key, fetched on first use: verifying a seal needs no other version reachable."""
        if key not in self.trusted_versions:
            return None
        with self._lock:
            if key not in self._public_keys:
                self._public_keys[key] = self._fetch_public_key(key)
            return self._public_keys[key]

    def _fetch_public_key(self, version: str) -> PublicKey:
        """GetPublicKey for one version, with the sample's name and pem_crc32c checks."""
        from google.cloud import kms_v1

        response = self._call(self._client.get_public_key, {"name": version})
        if response.name != version:
            raise errors.Unavailable("KMS answered for another key version; retry")
        if response.pem_crc32c != _crc32c(response.pem.encode("utf-8")):
            raise errors.Unavailable("KMS public key checksum mismatch; retry")
        expected = kms_v1.CryptoKeyVersion.CryptoKeyVersionAlgorithm.EC_SIGN_P256_SHA256
        if response.algorithm != expected:
            # A misconfigured deployment, not an outage: surfaces as a logged 500.
            algorithm = kms_v1.CryptoKeyVersion.CryptoKeyVersionAlgorithm(response.algorithm).name
            raise RuntimeError(f"KMS key version {version} is {algorithm}, expected {KMS_ALGORITHM}")
        return PublicKey(key=version, alg=ALG, pem=response.pem)

    def _call(self, method: Any, request: dict[str, Any]) -> Any:
        """Call a KMS method with a bounded timeout; every transport or API failure becomes a 503."""
        import grpc
        from google.api_core import exceptions as core_exceptions

        try:
            return method(request=request, retry=self._retry, timeout=self._timeout)
        except (core_exceptions.GoogleAPIError, grpc.RpcError) as exc:
            # GoogleAPIError covers every GoogleAPICallError and the RetryError of an exhausted retry.
            raise errors.Unavailable(f"KMS unavailable ({type(exc).__name__}); retry later") from exc


class LocalSigner:
    """Signs with a P-256 key kept in a local folder (local mode); created on first use."""

    def __init__(self, key_dir: Path) -> None:
        """Keep the key in `key_dir/seal-signing-key.pem`; nothing is read or written until first use."""
        self.key_dir = Path(key_dir)
        self.key_version = LOCAL_KEY_NAME
        self.key_path = self.key_dir / LOCAL_KEY_FILE
        self._key: ec.EllipticCurvePrivateKey | None = None
        self._lock = threading.Lock()

    def sign(self, data: bytes) -> Signature:
        """ECDSA P-256 SHA-256 signature over `data`, DER-encoded."""
        der = self._private_key().sign(data, ec.ECDSA(hashes.SHA256()))
        return Signature(key=LOCAL_KEY_NAME, alg=ALG, der=der)

    def public_keys(self) -> list[PublicKey]:
        """The local key's public half, the only trusted key in local mode."""
        pem = (
            self._private_key()
            .public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode("ascii")
        )
        return [PublicKey(key=LOCAL_KEY_NAME, alg=ALG, pem=pem)]

    def public_key(self, key: str) -> PublicKey | None:
        """The local key's public half when `key` names it, else None."""
        return self.public_keys()[0] if key == LOCAL_KEY_NAME else None

    def _private_key(self) -> ec.EllipticCurvePrivateKey:
        """Load the key, creating it first if no process has yet."""
        with self._lock:
            if self._key is None:
                self._key = self._load_or_create()
            return self._key

    def _load_or_create(self) -> ec.EllipticCurvePrivateKey:
        """Read the key file; if missing, publish a new key atomically so every process ends up with one key."""
        if not self.key_path.exists():
            self.key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            # Every process ends up with one key: the first to publish it wins, the others read the winner's.
            write_once(self.key_path, pem, mode=0o600)
        key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
            raise RuntimeError(f"{self.key_path} does not hold a P-256 private key")
        return key


@functools.lru_cache(maxsize=64)
def _load_public_key(pem: str) -> ec.EllipticCurvePublicKey | None:
    """Parse an SPKI PEM once; None unless it is a P-256 public key."""
    try:
        key = serialization.load_pem_public_key(pem.encode("utf-8"))
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        return None
    return key


def verify_signature(public_key: PublicKey, data: bytes, der: bytes) -> bool:
    """True iff `der` is a valid ES256 signature of `data` under `public_key`; never raises on bad input."""
    if public_key.alg != ALG or not isinstance(public_key.pem, str) or not isinstance(der, bytes | bytearray):
        return False
    key = _load_public_key(public_key.pem)
    if key is None:
        return False
    try:
        key.verify(bytes(der), data, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def kms_client(endpoint: str = "") -> kms_v1.KeyManagementServiceClient:
    """Google's KMS client; with "host:port", one over a plaintext channel to a test server (no credentials)."""
    from google.cloud import kms_v1

    if not endpoint:
        return kms_v1.KeyManagementServiceClient()
    import grpc
    from google.cloud.kms_v1.services.key_management_service.transports.grpc import (
        KeyManagementServiceGrpcTransport,
    )

    # A ready-made channel makes the transport skip google.auth.default(): tests need no credentials.
    transport = KeyManagementServiceGrpcTransport(channel=grpc.insecure_channel(endpoint))
    return kms_v1.KeyManagementServiceClient(transport=transport)


@functools.cache
def get_signer() -> Signer:
    """The process-wide signer chosen by configuration (tests call `get_signer.cache_clear()`)."""
    settings = config.get_config()
    if settings.signer == "local":
        return LocalSigner(settings.local_dir)
    if settings.signer == "kms":
        if not settings.kms_key_version:
            raise RuntimeError(f"{config.ENV_SIGNER} is kms but {config.ENV_KMS_KEY_VERSION} names no CryptoKeyVersion")
        return KmsSigner(
            key_version=settings.kms_key_version,
            trusted_versions=settings.trusted_key_versions,
            client=kms_client(settings.kms_endpoint),
        )
    raise RuntimeError(f"{config.ENV_SIGNER} must be 'kms' or 'local', not {settings.signer!r}")
