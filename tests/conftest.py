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

from shared import config, emulator, store
from shared.local import LocalIssuer

PROJECT = "gbx-test"
AUDIENCE = "https://gbx-test.example"
ADMIN_TOKEN = "test-admin-token-0123456789"
OPERATOR = "operator@example.com"
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
    """Google's Firestore emulator, once per session, in its own process group."""
    try:
        instance = emulator.start(project=PROJECT, log_path=service_dir / "firestore-emulator.log")
    except emulator.EmulatorMissing as exc:
        pytest.exit(str(exc), returncode=3)
    os.environ["FIRESTORE_EMULATOR_HOST"] = instance.host
    yield instance
    instance.stop()


@pytest.fixture(scope="session")
def service_env(service_dir: Path, issuer: LocalIssuer, firestore_emulator: emulator.Emulator) -> Iterator[None]:
    """The service's configuration for the whole session (read once, like in production)."""
    values = {
        config.ENV_PROJECT: PROJECT,
        config.ENV_AUDIENCES: f"{AUDIENCE},https://other-service.example",
        config.ENV_CERTS_URL: str(issuer.certs_path),
        config.ENV_ADMIN_TOKEN: ADMIN_TOKEN,
        config.ENV_OPERATORS: OPERATOR,
        config.ENV_SIGNER: "local",
        config.ENV_LOCAL_DIR: str(service_dir / "local"),
        config.ENV_ISSUER: "gbx-test",
    }
    os.environ.update(values)
    os.environ.pop(config.ENV_LOCAL_MODE, None)
    config.get_config.cache_clear()
    store.client.cache_clear()
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
def db(firestore_emulator: emulator.Emulator, service_env: None) -> emulator.Emulator:
    """An empty Firestore for this test."""
    firestore_emulator.clear()
    return firestore_emulator


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

    def issue(self, principal: str = RUNNER, runs_total: int = 1, *, key: str | None = None, **fields: Any) -> requests.Response:
        """Issue runs with the admin token."""
        headers = {"X-GBX-ADMIN-TOKEN": ADMIN_TOKEN}
        if key is not None:
            headers["Idempotency-Key"] = key
        return self.post("/api/entitlement/issue", {"principal": principal, "runs_total": runs_total, **fields}, as_user=None, headers=headers)

    def check(self, run_id: str, as_user: str = RUNNER) -> requests.Response:
        return self.post("/api/entitlement/check", {"run_id": run_id}, as_user=as_user)

    def consume(self, run_id: str, as_user: str = RUNNER) -> requests.Response:
        return self.post("/api/entitlement/consume", {"run_id": run_id}, as_user=as_user)

    def run_start(self, run_id: str, as_user: str = RUNNER, **fields: Any) -> requests.Response:
        body = {"run_id": run_id, "container_image": IMAGE, "project_id": "acme-prod", "inputs_sha256": "ab" * 32, **fields}
        return self.post("/api/entitlement/run_start", body, as_user=as_user)


@pytest.fixture
def api(server_url: str, issuer: LocalIssuer, db: emulator.Emulator) -> Api:
    """The service over HTTP, on an empty database."""
    return Api(base_url=server_url, issuer=issuer)


def error_code(response: requests.Response) -> str:
    """The contract error code of a response (asserting the error body's shape on the way)."""
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "status"}
    assert body["error"]["status"] == response.status_code
    assert response.headers.get("X-Request-Id")
    return body["error"]["code"]
