"""A local gRPC Cloud KMS (AsymmetricSign, GetPublicKey) with P-256 keys, Ed25519 keys (the seal log's) and fault modes, for tests."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Literal

import google_crc32c
import grpc
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, utils
from google.cloud import kms_v1

SERVICE = "google.cloud.kms.v1.KeyManagementService"
KEY = "projects/gbx-test/locations/global/keyRings/gbx/cryptoKeys/seal"
VERSION_1 = f"{KEY}/cryptoKeyVersions/1"
VERSION_2 = f"{KEY}/cryptoKeyVersions/2"
# The seal log's checkpoint key: EC_SIGN_ED25519, a key of its own.
LOG_VERSION_1 = "projects/gbx-test/locations/global/keyRings/gbx/cryptoKeys/seal-log/cryptoKeyVersions/1"

# unavailable: every call aborts with UNAVAILABLE. wrong_name: responses name another version.
# bad_signature_crc / unverified_digest: AsymmetricSign only. bad_pem_crc / wrong_algorithm: GetPublicKey only.
Fault = Literal["unavailable", "bad_signature_crc", "unverified_digest", "wrong_name", "bad_pem_crc", "wrong_algorithm"]


def _crc32c(data: bytes) -> int:
    """CRC32C, as KMS puts it in its requests and responses."""
    return int(google_crc32c.value(data))


class FakeKms:
    """Serves KeyManagementService's AsymmetricSign and GetPublicKey on 127.0.0.1 with real CRC32Cs."""

    def __init__(self, versions: tuple[str, ...] = (VERSION_1,), ed25519_versions: tuple[str, ...] = (LOG_VERSION_1,)) -> None:
        """Hold one P-256 key per version name (and one Ed25519 key per `ed25519_versions` name); call start() (or use `with`) to serve."""
        self.fault: Fault | None = None
        # How many more calls the fault applies to; None: until cleared.
        self.fault_calls: int | None = None
        # The key versions the fault applies to (None: every version).
        self.fault_versions: frozenset[str] | None = None
        self.calls: Counter[str] = Counter()
        self.requests: list[tuple[str, str]] = []
        self.endpoint = ""
        self._initial_versions = versions
        self._initial_ed25519 = ed25519_versions
        self._keys: dict[str, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey] = {}
        self._lock = threading.Lock()
        self._server: grpc.Server | None = None
        for name in versions:
            self.add_version(name)
        for name in ed25519_versions:
            self.add_ed25519_version(name)

    def add_ed25519_version(self, name: str) -> str:
        """Create an EC_SIGN_ED25519 key version with a fresh key; returns its name."""
        with self._lock:
            self._keys[name] = ed25519.Ed25519PrivateKey.generate()
        return name

    def add_version(self, name: str) -> str:
        """Create a key version with a fresh P-256 key; returns its name."""
        with self._lock:
            self._keys[name] = ec.generate_private_key(ec.SECP256R1())
        return name

    def public_pem(self, name: str) -> str:
        """The SPKI PEM of a version, as GetPublicKey returns it."""
        return (
            self._keys[name]
            .public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode("ascii")
        )

    def set_fault(self, fault: Fault | None, calls: int | None = None, *, versions: tuple[str, ...] | None = None) -> None:
        """Inject `fault` for the next `calls` calls (None: until cleared with set_fault(None)), on `versions` only when given."""
        with self._lock:
            self.fault = fault
            self.fault_calls = calls
            self.fault_versions = frozenset(versions) if versions is not None else None

    def reset(self) -> None:
        """Back to the initial versions (fresh keys), no fault and no recorded calls; between tests."""
        with self._lock:
            self.fault = None
            self.fault_calls = None
            self.fault_versions = None
            self.calls.clear()
            self.requests.clear()
            self._keys.clear()
        for name in self._initial_versions:
            self.add_version(name)
        for name in self._initial_ed25519:
            self.add_ed25519_version(name)

    def start(self) -> FakeKms:
        """Serve on a free port of 127.0.0.1; sets `endpoint` to "127.0.0.1:PORT"."""
        handler = grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "AsymmetricSign": grpc.unary_unary_rpc_method_handler(
                    self._asymmetric_sign,
                    request_deserializer=kms_v1.AsymmetricSignRequest.deserialize,
                    response_serializer=kms_v1.AsymmetricSignResponse.serialize,
                ),
                "GetPublicKey": grpc.unary_unary_rpc_method_handler(
                    self._get_public_key,
                    request_deserializer=kms_v1.GetPublicKeyRequest.deserialize,
                    response_serializer=kms_v1.PublicKey.serialize,
                ),
            },
        )
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._server = server
        self.endpoint = f"127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        """Stop serving at once (in-flight calls are cancelled)."""
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None

    def __enter__(self) -> FakeKms:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _begin(self, method: str, name: str, context: grpc.ServicerContext) -> tuple[ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey, Fault | None]:
        """Record the call, apply the fault budget, abort on UNAVAILABLE or an unknown version."""
        with self._lock:
            self.calls[method] += 1
            self.requests.append((method, name))
            fault = self.fault if self.fault_versions is None or name in self.fault_versions else None
            if fault is not None and self.fault_calls is not None:
                self.fault_calls -= 1
                if self.fault_calls <= 0:
                    self.fault, self.fault_calls = None, None
            key = self._keys.get(name)
        if fault == "unavailable":
            context.abort(grpc.StatusCode.UNAVAILABLE, "fake KMS: service unavailable")
        if key is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"fake KMS: {name} not found")
        assert key is not None
        return key, fault

    def _asymmetric_sign(self, request: kms_v1.AsymmetricSignRequest, context: grpc.ServicerContext) -> kms_v1.AsymmetricSignResponse:
        """Sign a SHA-256 digest as KMS does, checking the request's digest_crc32c when sent."""
        key, fault = self._begin("AsymmetricSign", request.name, context)
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return self._sign_ed25519(key, fault, request, context)
        digest = request.digest.sha256
        if len(digest) != 32 or "sha384" in request.digest or "sha512" in request.digest:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "fake KMS: EC_SIGN_P256_SHA256 needs a SHA-256 digest")
        crc_sent = "digest_crc32c" in request
        if crc_sent and request.digest_crc32c != _crc32c(digest):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "fake KMS: digest_crc32c mismatch")
        signature = key.sign(digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        signature_crc32c = _crc32c(signature)
        if fault == "bad_signature_crc":
            signature_crc32c ^= 1
        return kms_v1.AsymmetricSignResponse(
            signature=signature,
            signature_crc32c=signature_crc32c,
            verified_digest_crc32c=crc_sent and fault != "unverified_digest",
            name=request.name + "0" if fault == "wrong_name" else request.name,
            protection_level=kms_v1.ProtectionLevel.HSM,
        )

    def _sign_ed25519(self, key: ed25519.Ed25519PrivateKey, fault: Fault | None, request: kms_v1.AsymmetricSignRequest,
                      context: grpc.ServicerContext) -> kms_v1.AsymmetricSignResponse:
        """EC_SIGN_ED25519 as KMS does it: PureEdDSA over `data` (a digest is refused), checking data_crc32c when sent."""
        if "digest" in request or "data" not in request:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "fake KMS: EC_SIGN_ED25519 signs data, not a digest")
        crc_sent = "data_crc32c" in request
        if crc_sent and request.data_crc32c != _crc32c(request.data):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "fake KMS: data_crc32c mismatch")
        signature = key.sign(request.data)
        signature_crc32c = _crc32c(signature)
        if fault == "bad_signature_crc":
            signature_crc32c ^= 1
        return kms_v1.AsymmetricSignResponse(
            signature=signature,
            signature_crc32c=signature_crc32c,
            verified_data_crc32c=crc_sent and fault != "unverified_digest",
            name=request.name + "0" if fault == "wrong_name" else request.name,
            protection_level=kms_v1.ProtectionLevel.HSM,
        )

    def _get_public_key(self, request: kms_v1.GetPublicKeyRequest, context: grpc.ServicerContext) -> kms_v1.PublicKey:
        """The version's SPKI PEM with its CRC32C and algorithm."""
        _key, fault = self._begin("GetPublicKey", request.name, context)
        algorithms = kms_v1.CryptoKeyVersion.CryptoKeyVersionAlgorithm
        pem = self.public_pem(request.name)
        algorithm = algorithms.EC_SIGN_ED25519 if isinstance(_key, ed25519.Ed25519PrivateKey) else algorithms.EC_SIGN_P256_SHA256
        pem_crc32c = _crc32c(pem.encode("utf-8"))
        if fault == "bad_pem_crc":
            pem_crc32c ^= 1
        return kms_v1.PublicKey(
            pem=pem,
            pem_crc32c=pem_crc32c,
            algorithm=algorithms.EC_SIGN_P384_SHA384 if fault == "wrong_algorithm" else algorithm,
            name=request.name + "0" if fault == "wrong_name" else request.name,
            protection_level=kms_v1.ProtectionLevel.HSM,
        )


@contextmanager
def fake_kms_server(versions: tuple[str, ...] = (VERSION_1,), ed25519_versions: tuple[str, ...] = (LOG_VERSION_1,)) -> Iterator[FakeKms]:
    """A started FakeKms for a `with` block or a pytest fixture's `yield`; stopped afterwards."""
    with FakeKms(versions, ed25519_versions) as server:
        yield server

