"""Signing through the real google-cloud-kms client against a local gRPC KMS, and the local key signer."""

from __future__ import annotations

import hashlib
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from shared import config, errors, signing
from shared.signing import ALG, KmsSigner, LocalSigner, PublicKey, Signature, verify_signature
from tests.kms_server import VERSION_1, VERSION_2, FakeKms

DATA = b'{"seal_id":"abc","v":1}'
OPENSSL = "/usr/bin/openssl"
REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def signer(kms: FakeKms) -> KmsSigner:
    """A KMS signer for VERSION_1 through the real client."""
    return KmsSigner(key_version=VERSION_1, trusted_versions=[VERSION_1], client=signing.kms_client(kms.endpoint))


@pytest.fixture
def fresh_config(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Clear the config and signer caches around a test that sets GBX_* variables."""
    for name in (config.ENV_SIGNER, config.ENV_KMS_KEY_VERSION, config.ENV_TRUSTED_KEY_VERSIONS,
                 config.ENV_KMS_ENDPOINT, config.ENV_LOCAL_DIR, config.ENV_LOCAL_MODE):
        monkeypatch.delenv(name, raising=False)
    config.get_config.cache_clear()
    signing.get_signer.cache_clear()
    yield monkeypatch
    config.get_config.cache_clear()
    signing.get_signer.cache_clear()


def key_for(signer: signing.Signer, version: str) -> PublicKey:
    """The public key a signer lists for `version`."""
    (key,) = [k for k in signer.public_keys() if k.key == version]
    return key


def openssl_verifies(tmp_path: Path, pem: str, data: bytes, der: bytes) -> bool:
    """The API's offline check: `openssl dgst -sha256 -verify public_key.pem -signature seal.sig seal.json`."""
    (tmp_path / "public_key.pem").write_text(pem)
    (tmp_path / "seal.sig").write_bytes(der)
    (tmp_path / "seal.json").write_bytes(data)
    result = subprocess.run(
        [OPENSSL, "dgst", "-sha256", "-verify", "public_key.pem", "-signature", "seal.sig", "seal.json"],
        cwd=tmp_path, capture_output=True, text=True, check=False,
    )
    assert result.returncode in (0, 1), result.stderr
    return result.returncode == 0 and result.stdout.strip() == "Verified OK"


# --- Cloud KMS through the real client -------------------------------------------------------------


def test_kms_signature_verifies_with_cryptography_and_openssl(signer: KmsSigner, kms: FakeKms, tmp_path: Path) -> None:
    signature = signer.sign(DATA)

    assert signature == Signature(key=VERSION_1, alg="ES256", der=signature.der)
    assert ALG == "ES256"
    (public_key,) = signer.public_keys()
    assert public_key == PublicKey(key=VERSION_1, alg="ES256", pem=kms.public_pem(VERSION_1))
    assert verify_signature(public_key, DATA, signature.der)
    # Independently of shared.signing: the PEM is a P-256 SPKI key that verifies the DER signature.
    loaded = serialization.load_pem_public_key(public_key.pem.encode())
    assert isinstance(loaded, ec.EllipticCurvePublicKey) and isinstance(loaded.curve, ec.SECP256R1)
    loaded.verify(signature.der, DATA, ec.ECDSA(hashes.SHA256()))
    assert openssl_verifies(tmp_path, public_key.pem, DATA, signature.der)
    assert not openssl_verifies(tmp_path, public_key.pem, DATA + b" ", signature.der)


def test_kms_sends_the_sha256_digest_and_its_crc(signer: KmsSigner, kms: FakeKms) -> None:
    # The fake answers INVALID_ARGUMENT to a wrong digest_crc32c and leaves verified_digest_crc32c
    # false without one, so a successful sign proves both were sent.
    signer.sign(DATA)
    assert kms.calls["AsymmetricSign"] == 1
    assert kms.requests == [("AsymmetricSign", VERSION_1)]


def test_public_keys_fetched_once_per_version(signer: KmsSigner, kms: FakeKms) -> None:
    first = signer.public_keys()
    for _ in range(5):
        assert signer.public_keys() == first
    signer.sign(DATA)
    assert kms.calls["GetPublicKey"] == 1


def test_public_keys_fetched_once_under_concurrency(kms: FakeKms) -> None:
    kms.add_version(VERSION_2)
    cold = KmsSigner(key_version=VERSION_2, trusted_versions=[VERSION_1], client=signing.kms_client(kms.endpoint))

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda _: cold.public_keys(), range(64)))

    assert all(result == results[0] for result in results)
    assert [k.key for k in results[0]] == [VERSION_2, VERSION_1]
    assert sorted(kms.requests) == [("GetPublicKey", VERSION_1), ("GetPublicKey", VERSION_2)]


def test_rotation_keeps_old_seals_verifying(kms: FakeKms) -> None:
    kms.add_version(VERSION_2)
    client = signing.kms_client(kms.endpoint)
    before = KmsSigner(key_version=VERSION_1, trusted_versions=[VERSION_1], client=client).sign(DATA)

    rotated = KmsSigner(key_version=VERSION_2, trusted_versions=[VERSION_2, VERSION_1], client=client)
    after = rotated.sign(DATA)

    keys = rotated.public_keys()
    assert [k.key for k in keys] == [VERSION_2, VERSION_1]
    assert [k.pem for k in keys] == [kms.public_pem(VERSION_2), kms.public_pem(VERSION_1)]
    assert after.key == VERSION_2 and before.key == VERSION_1
    assert verify_signature(key_for(rotated, VERSION_1), DATA, before.der)
    assert verify_signature(key_for(rotated, VERSION_2), DATA, after.der)
    # Each signature verifies only under its own key.
    assert not verify_signature(key_for(rotated, VERSION_2), DATA, before.der)
    assert not verify_signature(key_for(rotated, VERSION_1), DATA, after.der)


def test_signing_version_is_always_trusted(kms: FakeKms) -> None:
    kms.add_version(VERSION_2)
    signer = KmsSigner(key_version=VERSION_2, trusted_versions=[VERSION_1, VERSION_2, VERSION_1],
                       client=signing.kms_client(kms.endpoint))
    assert signer.trusted_versions == (VERSION_2, VERSION_1)
    assert [k.key for k in signer.public_keys()] == [VERSION_2, VERSION_1]


@pytest.mark.parametrize("fault", ["unavailable", "bad_signature_crc", "unverified_digest", "wrong_name"])
def test_sign_faults_are_unavailable(signer: KmsSigner, kms: FakeKms, fault: str) -> None:
    kms.set_fault(fault)  # type: ignore[arg-type]

    with pytest.raises(errors.Unavailable) as caught:
        signer.sign(DATA)

    assert caught.value.status == 503
    if fault == "unavailable":
        assert caught.value.__cause__ is not None
        # Retried before giving up, within the short budget: backoff from 0.1 s with full jitter over
        # KMS_RETRY_SECONDS makes about 5 to 25 calls (13 seen); the library's 60 s default makes hundreds.
        assert 2 <= kms.calls["AsymmetricSign"] <= signing.KMS_RETRY_SECONDS / 0.05
    else:
        assert kms.calls["AsymmetricSign"] == 1  # a corrupted answer is not retried blindly
    kms.set_fault(None)
    assert verify_signature(key_for(signer, VERSION_1), DATA, signer.sign(DATA).der)


def test_one_transient_unavailable_is_retried(signer: KmsSigner, kms: FakeKms) -> None:
    kms.set_fault("unavailable", calls=1)
    signature = signer.sign(DATA)
    assert kms.calls["AsymmetricSign"] == 2
    assert verify_signature(key_for(signer, VERSION_1), DATA, signature.der)


@pytest.mark.parametrize("fault", ["unavailable", "bad_pem_crc", "wrong_name"])
def test_public_key_faults_are_unavailable_and_not_cached(kms: FakeKms, fault: str) -> None:
    # A shorter retry than the default: the sign test above already times the default one.
    signer = KmsSigner(key_version=VERSION_1, trusted_versions=[], client=signing.kms_client(kms.endpoint),
                       retry_seconds=0.3)
    kms.set_fault(fault)  # type: ignore[arg-type]
    with pytest.raises(errors.Unavailable):
        signer.public_keys()
    kms.set_fault(None)
    assert signer.public_keys() == [PublicKey(key=VERSION_1, alg=ALG, pem=kms.public_pem(VERSION_1))]


def test_public_key_of_another_algorithm_is_a_configuration_error(signer: KmsSigner, kms: FakeKms) -> None:
    kms.set_fault("wrong_algorithm")
    with pytest.raises(RuntimeError, match="EC_SIGN_P384_SHA384"):
        signer.public_keys()


def test_unknown_key_version_is_unavailable(kms: FakeKms) -> None:
    signer = KmsSigner(key_version=f"{VERSION_1}9", trusted_versions=[], client=signing.kms_client(kms.endpoint))
    with pytest.raises(errors.Unavailable) as caught:
        signer.sign(DATA)
    assert caught.value.__cause__ is not None


def test_unreachable_kms_is_unavailable_quickly() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on the port once the probe is closed.
    signer = KmsSigner(key_version=VERSION_1, trusted_versions=[], client=signing.kms_client(f"127.0.0.1:{port}"),
                       retry_seconds=0.3)
    with pytest.raises(errors.Unavailable) as caught:
        signer.sign(DATA)
    assert caught.value.__cause__ is not None


def test_test_client_needs_no_credentials(kms: FakeKms, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Were google.auth.default() consulted, this missing credentials file would make it fail.
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    signer = KmsSigner(key_version=VERSION_1, trusted_versions=[], client=signing.kms_client(kms.endpoint))
    assert verify_signature(key_for(signer, VERSION_1), DATA, signer.sign(DATA).der)


# --- verify_signature on bad input ----------------------------------------------------------------


def test_tampered_data_or_swapped_signature_fails(signer: KmsSigner) -> None:
    key = key_for(signer, VERSION_1)
    first, second = signer.sign(DATA), signer.sign(b"another seal")

    assert verify_signature(key, DATA, first.der)
    assert not verify_signature(key, DATA + b"x", first.der)
    assert not verify_signature(key, DATA.replace(b"abc", b"abd"), first.der)
    assert not verify_signature(key, DATA, second.der)
    assert not verify_signature(key, b"another seal", first.der)


@pytest.mark.parametrize(
    "der",
    [b"", b"garbage", b"\x30\x00", b"\x30\x06\x02\x01\x00\x02\x01\x00", b"\x00" * 72, b"\x30" + b"\xff" * 80],
)
def test_garbage_der_is_false(signer: KmsSigner, der: bytes) -> None:
    assert verify_signature(key_for(signer, VERSION_1), DATA, der) is False


def test_trailing_bytes_after_der_are_false(signer: KmsSigner) -> None:
    signature = signer.sign(DATA)
    assert verify_signature(key_for(signer, VERSION_1), DATA, signature.der + b"\x00") is False


@pytest.mark.parametrize(
    "pem",
    [
        "",
        "not a pem",
        "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        # A valid key on another curve is not an ES256 key.
        ec.generate_private_key(ec.SECP384R1()).public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode(),
    ],
)
def test_garbage_pem_is_false(signer: KmsSigner, pem: str) -> None:
    signature = signer.sign(DATA)
    assert verify_signature(PublicKey(key=VERSION_1, alg=ALG, pem=pem), DATA, signature.der) is False


def test_other_alg_is_false(signer: KmsSigner) -> None:
    key = key_for(signer, VERSION_1)
    assert verify_signature(PublicKey(key=key.key, alg="RS256", pem=key.pem), DATA, signer.sign(DATA).der) is False


# --- Local signer ---------------------------------------------------------------------------------


def test_local_signer_creates_its_key_once_with_mode_0600(tmp_path: Path) -> None:
    key_dir = tmp_path / "not" / "yet"
    signer = LocalSigner(key_dir)
    assert not key_dir.exists()  # nothing happens before first use

    signature = signer.sign(DATA)

    key_file = key_dir / "seal-signing-key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key_file.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8
    assert sorted(p.name for p in key_dir.iterdir()) == ["seal-signing-key.pem"]  # no temp file left
    content = key_file.read_bytes()
    signer.sign(DATA)
    assert key_file.read_bytes() == content
    (public_key,) = signer.public_keys()
    assert public_key.key == "projects/local/locations/local/keyRings/gbx/cryptoKeys/seal/cryptoKeyVersions/1"
    assert signature.key == public_key.key and signature.alg == public_key.alg == "ES256"
    assert verify_signature(public_key, DATA, signature.der)
    assert not verify_signature(public_key, DATA + b"x", signature.der)


def test_local_signers_on_one_folder_share_the_key(tmp_path: Path) -> None:
    first, second = LocalSigner(tmp_path), LocalSigner(tmp_path)
    signature = first.sign(DATA)
    assert second.public_keys() == first.public_keys()
    assert verify_signature(second.public_keys()[0], DATA, signature.der)


def test_local_signature_verifies_with_openssl(tmp_path: Path) -> None:
    signer = LocalSigner(tmp_path / "keys")
    signature = signer.sign(DATA)
    assert openssl_verifies(tmp_path, signer.public_keys()[0].pem, DATA, signature.der)


def test_concurrent_local_signers_end_up_with_one_key(tmp_path: Path) -> None:
    key_dir = tmp_path / "keys"
    script = "import sys; from pathlib import Path; from shared.signing import LocalSigner; " \
             "print(LocalSigner(Path(sys.argv[1])).public_keys()[0].pem, end='')"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    processes = [
        subprocess.Popen([sys.executable, "-c", script, str(key_dir)], stdout=subprocess.PIPE, env=env, cwd=REPO_ROOT)
        for _ in range(6)
    ]
    with ThreadPoolExecutor(max_workers=8) as pool:
        in_process = list(pool.map(lambda _: LocalSigner(key_dir).public_keys()[0].pem, range(8)))
    pems = {p.communicate(timeout=60)[0].decode() for p in processes} | set(in_process)

    assert all(p.returncode == 0 for p in processes)
    assert len(pems) == 1
    assert sorted(p.name for p in key_dir.iterdir()) == ["seal-signing-key.pem"]


# --- get_signer from configuration ----------------------------------------------------------------


def test_get_signer_local(fresh_config: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fresh_config.setenv(config.ENV_SIGNER, "local")
    fresh_config.setenv(config.ENV_LOCAL_DIR, str(tmp_path))
    signer = signing.get_signer()
    assert isinstance(signer, LocalSigner) and signer.key_dir == tmp_path
    assert signing.get_signer() is signer
    assert verify_signature(signer.public_keys()[0], DATA, signer.sign(DATA).der)


def test_get_signer_kms(fresh_config: pytest.MonkeyPatch, kms: FakeKms) -> None:
    kms.add_version(VERSION_2)
    fresh_config.setenv(config.ENV_SIGNER, "kms")
    fresh_config.setenv(config.ENV_KMS_KEY_VERSION, VERSION_2)
    fresh_config.setenv(config.ENV_TRUSTED_KEY_VERSIONS, VERSION_1)
    fresh_config.setenv(config.ENV_KMS_ENDPOINT, kms.endpoint)
    signer = signing.get_signer()
    assert isinstance(signer, KmsSigner) and isinstance(signer, signing.Signer)
    signature = signer.sign(DATA)
    assert signature.key == VERSION_2
    assert [k.key for k in signer.public_keys()] == [VERSION_2, VERSION_1]
    assert verify_signature(key_for(signer, VERSION_2), DATA, signature.der)


def test_get_signer_kms_without_key_version_is_a_clear_error(fresh_config: pytest.MonkeyPatch) -> None:
    fresh_config.setenv(config.ENV_SIGNER, "kms")
    with pytest.raises(RuntimeError, match=config.ENV_KMS_KEY_VERSION):
        signing.get_signer()


def test_signature_is_over_the_sha256_of_the_data(signer: KmsSigner) -> None:
    # KMS signs the digest; verification hashes the data: both must agree on SHA-256(data).
    signature = signer.sign(DATA)
    key = serialization.load_pem_public_key(key_for(signer, VERSION_1).pem.encode())
    assert isinstance(key, ec.EllipticCurvePublicKey)
    from cryptography.hazmat.primitives.asymmetric import utils

    key.verify(signature.der, hashlib.sha256(DATA).digest(), ec.ECDSA(utils.Prehashed(hashes.SHA256())))
