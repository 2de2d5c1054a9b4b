"""gbx and the seal log: gbx run keeps seal.tlog-proof, gbx verify checks it offline, gbx log check monitors the log."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from gbx_client import tlog
from shared import sealog
from tests.conftest import RUNNER, Api
from tests.test_client import Job, job  # noqa: F401 - the fixture

__all__ = ["job"]


@pytest.fixture(autouse=True)
def background_done() -> Iterator[None]:
    yield
    assert sealog.join_background(40.0)


def run_sealed(api: Api, job: Job, run_id: str) -> None:  # noqa: F811
    result = job.gbx(*job.args(run_id=run_id), *job.writes_outputs())
    assert result.code == 0, result.stderr
    assert "seal.tlog-proof (logged: entry" in result.stderr


def test_gbx_run_keeps_the_proof_and_verify_says_logged(api: Api, job: Job) -> None:  # noqa: F811
    """A new user's walk: gbx run, seal.tlog-proof is there, gbx verify says logged (offline, keys by URL)."""
    api.issue(RUNNER, 2)
    run_sealed(api, job, "job-1")
    proof = (job.seal_dir / "seal.tlog-proof").read_bytes()
    assert proof.startswith(b"c2sp.org/tlog-proof@v1\nindex 0\n")
    keys_url = f"{api.base_url}/api/seal/public_keys"
    verified = job.gbx("verify", str(job.seal_dir), "--keys", keys_url, "--require-log")
    assert verified.code == 0, verified.stderr
    assert "  log        ok" in verified.stdout and "logged: entry 1 of 1" in verified.stdout
    as_json = json.loads(job.gbx("verify", str(job.seal_dir), "--keys", keys_url, "--json").stdout)
    assert as_json["checks"]["log"] == "ok" and as_json["logged"] == {"entry": 1, "of": 1}
    # --log-key instead of a keys document's; --public-key alone knows no log key: the proof is not checked (said).
    vkey = requests.get(keys_url, timeout=10).json()["log"]["vkey"]
    pem = str(job.seal_dir / "public_key.pem")
    assert "logged: entry 1 of 1" in job.gbx("verify", str(job.seal_dir), "--public-key", pem, "--log-key", vkey).stdout
    quiet = job.gbx("verify", str(job.seal_dir), "--public-key", pem)
    assert quiet.code == 0 and "seal.tlog-proof not checked: no log key" in quiet.stderr
    # A second run: entry 2 of 2, and the first seal's proof (of a smaller tree) still verifies.
    run_sealed(api, job, "job-2")
    second = job.gbx("verify", str(job.seal_dir), "--keys", keys_url)
    assert "logged: entry 2 of 2" in second.stdout


def test_a_bad_or_missing_proof_is_invalid(api: Api, job: Job) -> None:  # noqa: F811
    """A proof of another entry, a damaged one, or none with --require-log: exit 1, saying why."""
    api.issue(RUNNER, 2)
    run_sealed(api, job, "job-1")
    first = (job.seal_dir / "seal.tlog-proof").read_bytes()
    keys_url = f"{api.base_url}/api/seal/public_keys"
    run_sealed(api, job, "job-2")
    (job.seal_dir / "seal.tlog-proof").write_bytes(first)  # the other seal's proof
    wrong = job.gbx("verify", str(job.seal_dir), "--keys", keys_url)
    assert wrong.code == 1 and "log: seal.tlog-proof does not verify" in wrong.stderr
    (job.seal_dir / "seal.tlog-proof").write_bytes(first.replace(b"index 0", b"index 7"))
    assert job.gbx("verify", str(job.seal_dir), "--keys", keys_url).code == 1
    (job.seal_dir / "seal.tlog-proof").unlink()
    assert job.gbx("verify", str(job.seal_dir), "--keys", keys_url).code == 0
    required = job.gbx("verify", str(job.seal_dir), "--keys", keys_url, "--require-log")
    assert required.code == 1 and "no seal.tlog-proof" in required.stderr
    # seal.svg given alone with its proof beside it: still no proof read, and the message names the directory to give.
    (job.seal_dir / "seal.tlog-proof").write_bytes(first)
    alone = job.gbx("verify", str(job.seal_dir / "seal.svg"), "--keys", keys_url, "--require-log")
    assert alone.code == 1 and f"give the seal directory ({job.seal_dir})" in alone.stderr, alone.stderr


def test_log_check_passes_as_the_log_grows_and_fails_on_a_forged_checkpoint(api: Api, job: Job) -> None:  # noqa: F811
    """gbx log check: first use keeps the checkpoint; it passes twice as the log grows; a kept checkpoint swapped for a
    forged one (another key, or the log's own key on another history) fails with exit 1."""
    api.issue(RUNNER, 4)
    run_sealed(api, job, "job-1")
    state = job.root / "log-state"
    first = job.gbx("log", "check", "--url", api.base_url, "--state", str(state))
    assert first.code == 0, first.stderr
    assert "first use" in first.stdout and state.read_bytes() == requests.get(api.base_url + "/log/checkpoint", timeout=10).content
    run_sealed(api, job, "job-2")
    run_sealed(api, job, "job-3")
    grown = job.gbx("log", "check", "--url", api.base_url, "--state", str(state))
    assert grown.code == 0, grown.stderr
    assert "consistent: 1 -> 3 entries" in grown.stdout
    run_sealed(api, job, "job-4")
    again = job.gbx("log", "check", "--url", api.base_url, "--state", str(state))
    assert again.code == 0 and "consistent: 3 -> 4 entries" in again.stdout
    kept = state.read_bytes()

    # A checkpoint signed by another key under the log's name.
    other = Ed25519PrivateKey.generate()
    raw = other.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    forged = tlog.sign_note(tlog.Checkpoint(sealog.origin(), 2, hashlib.sha256(b"x").digest()).text(), name=sealog.origin(), public_key=raw, sign=other.sign)
    state.write_bytes(forged)
    bad = job.gbx("log", "check", "--url", api.base_url, "--state", str(state))
    assert bad.code == 1 and "INCONSISTENT" in bad.stdout and "does not verify" in bad.stderr
    # The log's own key on another history (a split view): signed, but not a prefix of the log.
    state.write_bytes(sealog.sign_checkpoint(tlog.Checkpoint(sealog.origin(), 2, hashlib.sha256(b"another history").digest())))
    fork = job.gbx("log", "check", "--url", api.base_url, "--state", str(state))
    assert fork.code == 1 and "not consistent" in fork.stderr
    state.write_bytes(kept[:-5])
    assert job.gbx("log", "check", "--url", api.base_url, "--state", str(state)).code == 1
    assert job.gbx("log", "check", "--url", api.base_url).code == 2
    assert job.gbx("log", "check", "--url", api.base_url, "--state", str(state), "--log-key", "nonsense").code == 2
