"""firestore.rules keeps Firestore server-only: every client request is denied, the server's are not."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from shared import emulator
from shared.config import REPO_ROOT

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "firestore.rules"
PROJECT = "demo-gbx-rules"
SERVER = {"Authorization": "Bearer owner"}  # the emulator's admin credential: rules do not apply
FIELDS = {"fields": {"marker": {"stringValue": "server"}}}

# One document per collection the service writes (shared/store.py), plus one that no block names.
DOCUMENTS = [
    "principals/alice@example.com",
    "principals/alice@example.com/grants/g1",
    "principals/alice@example.com/runs/r:1",
    "ledger/entry1",
    "seals/seal1",
    "redemptions/0f1e2d",
    "issuances/3c4b5a",
    "redemption_keys/9a8b7c",
    "audits/ledger",
    "revocations/5d6e7f",
    "events/1a2b3c",
    "alerts/4d5e6f",
    "log_pending/seal1",
    "log_entries/seal1",
    "log_tiles/0.0",
    "log/state",
    "not_a_gbx_collection/doc1",
]
COLLECTIONS = ["principals", "grants", "runs", "ledger", "seals", "redemptions", "issuances", "redemption_keys", "audits", "revocations",
               "events", "alerts",
               "log_pending", "log_entries", "log_tiles", "log"]


def _unsigned_jwt(claims: dict[str, object]) -> str:
    """An unsigned ("alg": "none") token, which the emulator accepts as a signed-in client."""

    def encode(part: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode()

    return f"{encode({'alg': 'none', 'typ': 'JWT'})}.{encode(claims)}."


def _signed_in_client() -> dict[str, str]:
    """Headers of a client that looks signed in with Firebase Auth, email verified."""
    now = int(time.time())
    token = _unsigned_jwt({
        "iss": f"https://securetoken.google.com/{PROJECT}", "aud": PROJECT, "sub": "alice", "user_id": "alice",
        "email": "alice@example.com", "email_verified": True, "iat": now, "auth_time": now, "exp": now + 3600,
        "firebase": {"sign_in_provider": "password", "identities": {}},
    })
    return {"Authorization": f"Bearer {token}"}


CLIENTS = {"anonymous": {}, "signed_in": _signed_in_client()}


def _start(rules: Path, log: Path) -> emulator.Emulator:
    return emulator.start(project=PROJECT, rules=rules, log_path=log)


@pytest.fixture(scope="module")
def documents_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The REST base URL of an emulator of its own that enforces firestore.rules."""
    emu = _start(RULES, tmp_path_factory.mktemp("rules") / "emulator.log")
    try:
        yield f"http://{emu.host}/v1/projects/{PROJECT}/databases/(default)/documents"
    finally:
        emu.stop()


def _assert_denied(response: requests.Response) -> None:
    assert response.status_code == 403, response.text
    assert response.json()["error"]["status"] == "PERMISSION_DENIED"


@pytest.mark.parametrize("client", sorted(CLIENTS))
@pytest.mark.parametrize("path", DOCUMENTS)
def test_clients_can_neither_read_nor_write(documents_url: str, path: str, client: str) -> None:
    headers = CLIENTS[client]
    url = f"{documents_url}/{path}"
    created = requests.patch(url, json=FIELDS, headers=SERVER, timeout=10)
    assert created.status_code == 200, created.text

    _assert_denied(requests.get(url, headers=headers, timeout=10))
    _assert_denied(requests.patch(url, json={"fields": {"marker": {"stringValue": "client"}}}, headers=headers, timeout=10))
    _assert_denied(requests.patch(f"{url}-new", json=FIELDS, headers=headers, timeout=10))  # a create
    _assert_denied(requests.delete(url, headers=headers, timeout=10))
    _assert_denied(requests.get(url.rsplit("/", 1)[0], headers=headers, timeout=10))  # list the collection

    after = requests.get(url, headers=SERVER, timeout=10)
    assert after.status_code == 200, after.text
    assert after.json()["fields"] == FIELDS["fields"]
    assert requests.get(f"{url}-new", headers=SERVER, timeout=10).status_code == 404


@pytest.mark.parametrize("client", sorted(CLIENTS))
@pytest.mark.parametrize("collection", COLLECTIONS)
def test_clients_cannot_query_collection_groups(documents_url: str, collection: str, client: str) -> None:
    query = {"structuredQuery": {"from": [{"collectionId": collection, "allDescendants": True}]}}
    _assert_denied(requests.post(f"{documents_url}:runQuery", json=query, headers=CLIENTS[client], timeout=10))


def test_the_server_writes_and_reads_every_collection(documents_url: str) -> None:
    for path in DOCUMENTS:
        url = f"{documents_url}/{path}"
        assert requests.patch(url, json=FIELDS, headers=SERVER, timeout=10).status_code == 200
        response = requests.get(url, headers=SERVER, timeout=10)
        assert response.status_code == 200, response.text
        assert response.json()["name"].endswith(f"/documents/{path}")


def test_every_collection_the_service_reads_or_writes_is_listed_here() -> None:
    """Every `collection(NAME)` / `collection_group(NAME)` in shared/ names a constant whose value is listed above."""
    import importlib

    used: set[str] = set()
    for path in sorted((REPO_ROOT / "shared").glob("*.py")):
        names = set(re.findall(r"collection(?:_group)?\((?:store\.)?([A-Z_]+)\)", path.read_text()))
        if not names:
            continue
        module = importlib.import_module(f"shared.{path.stem}")
        from shared import store

        for name in names:
            used.add(getattr(module, name, None) or getattr(store, name))
    assert used == set(COLLECTIONS)


def test_every_collection_of_the_contract_has_its_own_block() -> None:
    text = RULES.read_text(encoding="utf-8")
    assert text.startswith("rules_version = '2';")
    for collection in COLLECTIONS:
        assert re.search(rf"match /{collection}/\{{\w+\}}", text), collection
    assert "match /{document=**}" in text
    # Nothing is ever allowed: every allow statement is unconditionally false.
    allows = re.findall(r"allow [^;]*;", text)
    assert allows and all(allow == "allow read, write: if false;" for allow in allows), allows


def test_the_signed_in_client_is_really_signed_in(tmp_path: Path) -> None:
    """The denials above come from firestore.rules, not from a token the emulator ignores."""
    rules = tmp_path / "signed_in_only.rules"
    rules.write_text(
        "rules_version = '2';\n"
        "service cloud.firestore {\n"
        "  match /databases/{database}/documents {\n"
        "    match /{document=**} {\n"
        "      allow read: if request.auth != null && request.auth.token.email == 'alice@example.com';\n"
        "    }\n"
        "  }\n"
        "}\n",
        encoding="utf-8",
    )
    emu = _start(rules, tmp_path / "emulator.log")
    try:
        url = f"http://{emu.host}/v1/projects/{PROJECT}/databases/(default)/documents/ledger/entry1"
        assert requests.patch(url, json=FIELDS, headers=SERVER, timeout=10).status_code == 200
        assert requests.get(url, headers=CLIENTS["signed_in"], timeout=10).status_code == 200
        _assert_denied(requests.get(url, headers=CLIENTS["anonymous"], timeout=10))
    finally:
        emu.stop()
