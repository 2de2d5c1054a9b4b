"""Session fixtures: the real Firestore emulator, a local token issuer, and the service over HTTP."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from werkzeug.serving import make_server

from shared import auth, config, emulator, events, log_signing, pubsub_emulator, sealog, signing, store
from shared.local import LocalIssuer
from tests.kms_server import LOG_VERSION_1, VERSION_1, FakeKms, fake_kms_server

# One project per xdist worker: workers sharing one emulator (firebase emulators:exec) clear only their own data.
PROJECT = "gbx-test" + (f"-{os.environ['PYTEST_XDIST_WORKER']}" if os.environ.get("PYTEST_XDIST_WORKER") else "")
AUDIENCE = "https://gbx-test.example"
ADMIN_TOKEN = "test-admin-token-0123456789"
OPERATOR = "operator@example.com"
PARTNER = "partner-a@example.com"
PARTNER_B = "partner-b@example.com"
RUNNER = "runner@acme-prod.iam.gserviceaccount.com"
DIGEST = "0123456789abcdef" * 4
IMAGE = f"europe-docker.pkg.dev/acme/jobs/render:1.4@sha256:{DIGEST}"


@pytest.fixture(scope="session")
def service_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of the session's keys and logs."""
    return tmp_path_factory.mktemp("gbx")


@pytest.fixture(scope="session")
def issuer(service_dir: Path) -> LocalIssuer:
    """The test identity issuer; the service verifies its tokens with the production code path."""
    issuer = LocalIssuer(service_dir / "issuer")
    issuer.ensure()
    return issuer


@pytest.fixture(scope="session")
def firestore_emulator(service_dir: Path) -> Iterator[emulator.Emulator]:
    """Google's Firestore emulator: the one FIRESTORE_EMULATOR_HOST names when the suite runs under
    `firebase emulators:exec`, else one started once per session in its own process group."""
    outside = os.environ.get("FIRESTORE_EMULATOR_HOST")
    if outside:
        yield emulator.Emulator(host=outside, process=None, project=PROJECT)
        return
    try:
        instance = emulator.start(project=PROJECT, log_path=service_dir / "firestore-emulator.log")
    except emulator.EmulatorMissing as exc:
        pytest.exit(str(exc), returncode=3)
    os.environ["FIRESTORE_EMULATOR_HOST"] = instance.host
    yield instance
    instance.stop()


@pytest.fixture(scope="session")
def pubsub(service_dir: Path) -> Iterator[pubsub_emulator.PubSubEmulator]:
    """Google's Pub/Sub emulator: the one PUBSUB_EMULATOR_HOST names, else one started once per session in its own process group."""
    outside = os.environ.get("PUBSUB_EMULATOR_HOST")
    if outside:
        yield pubsub_emulator.PubSubEmulator(host=outside, process=None)
        return
    try:
        instance = pubsub_emulator.start(log_path=service_dir / "pubsub-emulator.log")
    except emulator.EmulatorMissing as exc:
        pytest.exit(str(exc), returncode=3)
    os.environ["PUBSUB_EMULATOR_HOST"] = instance.host
    yield instance
    instance.stop()


@pytest.fixture(scope="session")
def fake_kms() -> Iterator[FakeKms]:
    """A local gRPC server speaking the Cloud KMS protocol, reached through the real google-cloud-kms client."""
    with fake_kms_server() as server:
        yield server


@pytest.fixture
def kms(fake_kms: FakeKms) -> FakeKms:
    """The session's KMS with fresh keys, no fault and no recorded calls."""
    fake_kms.reset()
    return fake_kms


@pytest.fixture(scope="session")
def service_env(
    service_dir: Path, issuer: LocalIssuer, firestore_emulator: emulator.Emulator, pubsub: pubsub_emulator.PubSubEmulator, fake_kms: FakeKms
) -> Iterator[None]:
    """The service's configuration for the whole session (read once, like in production)."""
    values = {
        config.ENV_PROJECT: PROJECT,
        config.ENV_AUDIENCES: f"{AUDIENCE},https://other-service.example",
        config.ENV_CERTS_URL: str(issuer.certs_path),
        config.ENV_ADMIN_TOKEN: ADMIN_TOKEN,
        config.ENV_OPERATORS: OPERATOR,
        config.ENV_PARTNERS: f"{PARTNER},{PARTNER_B}",
        config.ENV_SIGNER: "kms",
        config.ENV_KMS_ENDPOINT: fake_kms.endpoint,
        config.ENV_KMS_KEY_VERSION: VERSION_1,
        config.ENV_LOG_KEY_VERSION: LOG_VERSION_1,
        config.ENV_LOCAL_DIR: str(service_dir / "local"),
        config.ENV_ISSUER: "gbx-test",
        config.ENV_PUBLIC_URL: AUDIENCE,
    }
    os.environ.update(values)
    os.environ.pop(config.ENV_LOCAL_MODE, None)
    config.get_config.cache_clear()
    store.client.cache_clear()
    events.ensure_topic()
    yield


@pytest.fixture(scope="session")
def server_url(service_env: None) -> Iterator[str]:
    """Every endpoint served over HTTP by the local server's app (threaded, like concurrent instances)."""
    from shared.local import create_app

    server = make_server("127.0.0.1", 0, create_app(), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture
def short_firestore_budgets(service_env: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Firestore calls bounded at 2 s, retried within 3 s (production: 5 s and 10 s), for tests that wait out
    an outage or a stalled commit. The rest of the suite keeps production's budgets: under the load of
    100 concurrent consumers on a 2-core machine, a read can take seconds."""
    monkeypatch.setenv(config.ENV_FIRESTORE_TIMEOUT, "2")
    monkeypatch.setenv(config.ENV_FIRESTORE_RETRY, "3")
    config.get_config.cache_clear()
    yield
    monkeypatch.undo()
    config.get_config.cache_clear()


@pytest.fixture
def db(firestore_emulator: emulator.Emulator, service_env: None) -> emulator.Emulator:
    """An empty Firestore for this test (the events of the test before published or given up first)."""
    # No seal log integration of an earlier test runs on into this one's database (or into its KMS calls).
    sealog.stop_background()
    events.publisher().flush(timeout=15)
    firestore_emulator.clear()
    return firestore_emulator


@pytest.fixture
def stoppable_db(db: emulator.Emulator, service_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[emulator.Emulator]:
    """An empty Firestore whose process this test may stop (SIGSTOP): the session's own emulator, or, when the
    session uses one started outside it, an emulator of this test's own, which the service uses meanwhile."""
    if db.process is not None:
        yield db
        return
    own = emulator.start(project=PROJECT, log_path=service_dir / "stoppable-emulator.log")
    try:
        monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", own.host)
        store.client.cache_clear()
        yield own
    finally:
        monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", db.host)
        store.client.cache_clear()
        own.stop()


@dataclass
class Api:
    """A caller of the service over HTTP."""

    base_url: str
    issuer: LocalIssuer

    def token(self, email: str = RUNNER, /, **overrides: Any) -> str:
        """An ID token for email, audience the service's, with claim overrides."""
        return self.issuer.token(email, **{"audience": AUDIENCE, **overrides})

    def post(self, path: str, body: Any = None, *, as_user: str | None = RUNNER, headers: dict[str, str] | None = None, **kwargs: Any) -> requests.Response:
        """POST JSON (or raw `data=`) as a user (default the runner; None: no Authorization)."""
        all_headers = {}
        if as_user is not None:
            all_headers["Authorization"] = f"Bearer {self.token(as_user)}"
        all_headers.update(headers or {})
        if body is not None:
            kwargs["json"] = body
        return requests.post(self.base_url + path, headers=all_headers, timeout=60, **kwargs)

    def issue(self, principal: str = RUNNER, runs_total: int = 1, *, key: str | None = None, partner: str | None = None, **fields: Any) -> requests.Response:
        """Issue runs with the admin token, or as `partner` (its ID token)."""
        headers = {"X-GBX-ADMIN-TOKEN": ADMIN_TOKEN} if partner is None else {}
        if key is not None:
            headers["Idempotency-Key"] = key
        return self.post("/api/entitlement/issue", {"principal": principal, "runs_total": runs_total, **fields}, as_user=partner, headers=headers)

    def revoke(self, principal: str, grant_id: str, runs: int | None = None, *, partner: str | None = None, key: str | None = None) -> requests.Response:
        """Revoke runs of a grant with the admin token, or as `partner` (a partner's or operator's ID token)."""
        headers = {"X-GBX-ADMIN-TOKEN": ADMIN_TOKEN} if partner is None else {}
        if key is not None:
            headers["Idempotency-Key"] = key
        body: dict[str, Any] = {"principal": principal, "grant_id": grant_id} | ({} if runs is None else {"runs": runs})
        return self.post("/api/entitlement/revoke", body, as_user=partner, headers=headers)

    def get(self, path: str, params: dict[str, Any] | None = None, *, partner: str | None = None, headers: dict[str, str] | None = None) -> requests.Response:
        """GET with the admin token, or as `partner` (a partner's or operator's ID token)."""
        all_headers = {"X-GBX-ADMIN-TOKEN": ADMIN_TOKEN} if partner is None else {"Authorization": f"Bearer {self.token(partner)}"}
        all_headers.update(headers or {})
        return requests.get(self.base_url + path, params=params, headers=all_headers, timeout=60)

    def check(self, run_id: str, as_user: str = RUNNER) -> requests.Response:
        return self.post("/api/entitlement/check", {"run_id": run_id}, as_user=as_user)

    def consume(self, run_id: str, as_user: str = RUNNER) -> requests.Response:
        return self.post("/api/entitlement/consume", {"run_id": run_id}, as_user=as_user)

    def run_complete(self, run_id: str, outputs_sha256: str = "cd" * 32, as_user: str = RUNNER) -> requests.Response:
        return self.post("/api/entitlement/run_complete", {"run_id": run_id, "outputs_sha256": outputs_sha256}, as_user=as_user)

    def sealed_run(self, run_id: str = "job-1", as_user: str = RUNNER) -> dict[str, Any]:
        """Issue, consume, start and complete a run; the seal bundle."""
        self.issue(as_user, 1)
        for step in (self.consume(run_id, as_user), self.run_start(run_id, as_user), self.run_complete(run_id, as_user=as_user)):
            assert step.status_code == 200, step.text
        return step.json()

    def upload(self, path: str, svg: str | bytes, *, as_user: str | None = RUNNER, **kwargs: Any) -> requests.Response:
        """POST a seal.svg raw (image/svg+xml)."""
        data = svg.encode() if isinstance(svg, str) else svg
        return self.post(path, data=data, as_user=as_user, headers={"Content-Type": "image/svg+xml", **kwargs.pop("headers", {})}, **kwargs)

    def verify(self, svg: str | bytes, **kwargs: Any) -> requests.Response:
        return self.upload("/api/seal/verify", svg, **kwargs)

    def redeem(self, svg: str | bytes, **kwargs: Any) -> requests.Response:
        return self.upload("/api/entitlement/redeem_seal_once", svg, **kwargs)

    def run_start(self, run_id: str, as_user: str = RUNNER, **fields: Any) -> requests.Response:
        body = {"run_id": run_id, "container_image": IMAGE, "project_id": "acme-prod", "inputs_sha256": "ab" * 32, **fields}
        return self.post("/api/entitlement/run_start", body, as_user=as_user)


@pytest.fixture
def api(server_url: str, issuer: LocalIssuer, db: emulator.Emulator, kms: FakeKms) -> Api:
    """The service over HTTP, on an empty database, with fresh KMS keys (and the signer's key cache emptied)."""
    config.get_config.cache_clear()
    signing.get_signer.cache_clear()
    log_signing.get_log_signer.cache_clear()
    auth.verified_tokens.clear()
    return Api(base_url=server_url, issuer=issuer)


def error_code(response: requests.Response) -> str:
    """The contract error code of a response (asserting the error body's shape on the way)."""
    body = response.json()
    assert set(body) == {"error"}
    # A 409 adds what the caller needs to act on it, and only the fields documented for its code.
    extra = {"run_id_reused": {"state"}, "already_redeemed": {"redeemed_at", "grant_id"}, "not_enough_runs": {"remaining"}}.get(body["error"].get("code"), set())
    assert set(body["error"]) == {"code", "message", "status"} | extra
    assert body["error"]["status"] == response.status_code
    assert response.headers.get("X-Request-Id")
    return body["error"]["code"]
