"""The OpenAPI document: generated from the models, committed fresh, served by the local server."""

from __future__ import annotations

import json

import requests

from shared import openapi
from shared.config import REPO_ROOT
from shared.endpoints import ENDPOINTS
from tests.conftest import Api


def test_committed_openapi_json_is_fresh() -> None:
    committed = (REPO_ROOT / "openapi.json").read_text()
    assert committed == openapi.render(), "openapi.json is stale: run `make openapi` and commit it"


def test_every_endpoint_is_described_with_its_schemas_and_auth() -> None:
    document = openapi.build()
    assert set(document["paths"]) == {e.path for e in ENDPOINTS.values()}
    schemas = document["components"]["schemas"]
    for path, item in document["paths"].items():
        ((method, operation),) = item.items()
        assert operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].split("/")[-1] in schemas
        for status, response in operation["responses"].items():
            ref = response["content"]["application/json"]["schema"]["$ref"]
            assert ref.split("/")[-1] in schemas, (path, status)
        assert "405" in operation["responses"] and "500" in operation["responses"]
        if path != "/api/seal/public_keys":
            assert operation["security"], path
            assert "401" in operation["responses"] and "400" in operation["responses"]
    issue = document["paths"]["/api/entitlement/issue"]["post"]
    assert "idempotency_conflict" in issue["responses"]["409"]["description"]
    assert schemas["IssueRequest"]["additionalProperties"] is False
    assert schemas["IssueRequest"]["properties"]["runs_total"]["maximum"] == 1_000_000
    assert set(document["components"]["securitySchemes"]) == {"googleIdToken", "adminToken"}


def test_local_server_serves_it(api: Api) -> None:
    response = requests.get(api.base_url + "/openapi.json", timeout=30)
    assert response.status_code == 200 and response.json() == json.loads(openapi.render())
