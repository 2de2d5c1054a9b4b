"""The seal log's checkpoint signer: Ed25519 in Cloud KMS (EC_SIGN_ED25519, a key of its own, never the seal key), or a local key in local mode."""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared import config, errors
from shared.files import write_once
from shared.signing import KMS_RETRY_SECONDS, KMS_TIMEOUT_SECONDS, _crc32c, _short_retry, kms_client

if TYPE_CHECKING:
    from google.cloud import kms_v1

KMS_ALGORITHM = "EC_SIGN_ED25519"
LOCAL_KEY_FILE = "log-signing-key.pem"


@runtime_checkable
class LogSigner(Protocol):
    """Signs checkpoint notes with Ed25519 (PureEdDSA over the note text) and names its public key."""

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of `data`; `errors.Unavailable` when the key cannot be reached."""
        ...

    def public_key(self) -> bytes:
        """The 32-byte Ed25519 public key (fetched once, then cached)."""
        ...


def _raw_public_key(pem: bytes) -> bytes:
    """The 32 raw bytes of an Ed25519 SPKI PEM; RuntimeError when it is another kind of key (a misconfiguration)."""
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise RuntimeError("the seal log's key is not an Ed25519 key")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class KmsLogSigner:
    """Signs with a Cloud KMS EC_SIGN_ED25519 key version: the data itself is sent (Ed25519 signs messages, not digests), with the CRC32C checks."""

    def __init__(self, *, key_version: str, client: kms_v1.KeyManagementServiceClient,
                 timeout_seconds: float = KMS_TIMEOUT_SECONDS, retry_seconds: float = KMS_RETRY_SECONDS) -> None:
        """Sign with `key_version` through `client`."""
        self.key_version = key_version
        self._client = client
        self._timeout = timeout_seconds
        self._retry = _short_retry(retry_seconds)
        self._public_key: bytes | None = None
        self._lock = threading.Lock()

    def sign(self, data: bytes) -> bytes:
        """AsymmetricSign with `data` and its CRC32C, checked as Google's samples check a signature."""
        response = self._call(self._client.asymmetric_sign, {"name": self.key_version, "data": data, "data_crc32c": _crc32c(data)})
        if not response.verified_data_crc32c:
            raise errors.Unavailable("KMS did not verify the data checksum; retry")
        if response.name != self.key_version:
            raise errors.Unavailable("KMS answered for another key version; retry")
        if response.signature_crc32c != _crc32c(response.signature):
            raise errors.Unavailable("KMS signature checksum mismatch; retry")
        return bytes(response.signature)

    def public_key(self) -> bytes:
        """GetPublicKey once, with the name, CRC32C and algorithm checks."""
        with self._lock:
            if self._public_key is None:
                from google.cloud import kms_v1

                response = self._call(self._client.get_public_key, {"name": self.key_version})
                if response.name != self.key_version:
                    raise errors.Unavailable("KMS answered for another key version; retry")
                if response.pem_crc32c != _crc32c(response.pem.encode("utf-8")):
                    raise errors.Unavailable("KMS public key checksum mismatch; retry")
                if response.algorithm != kms_v1.CryptoKeyVersion.CryptoKeyVersionAlgorithm.EC_SIGN_ED25519:
                    algorithm = kms_v1.CryptoKeyVersion.CryptoKeyVersionAlgorithm(response.algorithm).name
                    raise RuntimeError(f"KMS key version {self.key_version} is {algorithm}, expected {KMS_ALGORITHM}")
                self._public_key = _raw_public_key(response.pem.encode("utf-8"))
            return self._public_key

    def _call(self, method: Any, request: dict[str, Any]) -> Any:
        import grpc
        from google.api_core import exceptions as core_exceptions

        try:
            return method(request=request, retry=self._retry, timeout=self._timeout)
        except (core_exceptions.GoogleAPIError, grpc.RpcError) as exc:
            raise errors.Unavailable(f"KMS unavailable ({type(exc).__name__}); retry later") from exc


class LocalLogSigner:
    """An Ed25519 key in local mode's folder (PEM, PKCS#8), created on first use; every process ends up with the same one."""

    def __init__(self, key_dir: Path) -> None:
        """Keep the key in `key_dir/log-signing-key.pem`."""
        self.key_path = Path(key_dir) / LOCAL_KEY_FILE
        self._key: Ed25519PrivateKey | None = None
        self._lock = threading.Lock()

    def _private_key(self) -> Ed25519PrivateKey:
        with self._lock:
            if self._key is None:
                if not self.key_path.exists():
                    self.key_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                    pem = Ed25519PrivateKey.generate().private_bytes(
                        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                    )
                    write_once(self.key_path, pem, mode=0o600)
                key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
                if not isinstance(key, Ed25519PrivateKey):
                    raise RuntimeError(f"{self.key_path} does not hold an Ed25519 private key")
                self._key = key
            return self._key

    def sign(self, data: bytes) -> bytes:
        """Ed25519 signature of `data`."""
        return self._private_key().sign(data)

    def public_key(self) -> bytes:
        """The key's 32-byte public half."""
        return self._private_key().public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@functools.cache
def get_log_signer() -> LogSigner:
    """The process-wide checkpoint signer chosen by configuration (tests call `get_log_signer.cache_clear()`)."""
    settings = config.get_config()
    if settings.signer == "local":
        return LocalLogSigner(settings.local_dir)
    if not settings.log_key_version:
        raise RuntimeError(f"{config.ENV_SIGNER} is kms but {config.ENV_LOG_KEY_VERSION} names no EC_SIGN_ED25519 CryptoKeyVersion")
    return KmsLogSigner(key_version=settings.log_key_version, client=kms_client(settings.kms_endpoint))
