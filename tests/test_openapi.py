"""The OpenAPI document: generated from the models, committed fresh, served by the local server."""

from __future__ import annotations

import json

import requests

from shared import openapi
from shared.config import REPO_ROOT
from shared.endpoints import ENDPOINTS, Caller
from tests.conftest import Api


def test_committed_openapi_json_is_fresh() -> None:
    committed = (REPO_ROOT / "openapi.json").read_text()
    assert committed == openapi.render(), "openapi.json is stale: run `make openapi` and commit it"


def test_every_endpoint_is_described_with_its_schemas_and_auth() -> None:
    document = openapi.build()
    assert set(document["paths"]) == {openapi.openapi_path(e) for e in ENDPOINTS.values()}
    schemas = document["components"]["schemas"]
    public = {openapi.openapi_path(e) for e in ENDPOINTS.values() if e.caller is Caller.ANYONE}
    resources = {openapi.openapi_path(e): e.media_type for e in ENDPOINTS.values() if e.media_type != "application/json"}
    for path, item in document["paths"].items():
        ((method, operation),) = item.items()
        if path in resources:
            # The seal log's resources are served as they are; their errors are the API's JSON.
            assert set(operation["responses"].pop("200")["content"]) == {resources[path]}
        else:
            assert operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].split("/")[-1] in schemas
        for status, response in operation["responses"].items():
            ref = response["content"]["application/json"]["schema"]["$ref"]
            assert set(response["content"]) <= {"application/json", "text/csv"}
            assert ref.split("/")[-1] in schemas, (path, status)
        assert "405" in operation["responses"] and "500" in operation["responses"]
        if path not in public:
            assert operation["security"], path
            assert "401" in operation["responses"]
            # Only the endpoints that read nothing from the request (the audit, the log's catch-up, the events sweeper) have no 400.
            assert ("400" in operation["responses"]) == (path not in ("/api/ledger/audit", "/api/log/integrate", "/api/events/sweep")), path
    issue = document["paths"]["/api/entitlement/issue"]["post"]
    assert "idempotency_conflict" in issue["responses"]["409"]["description"]
    assert schemas["IssueRequest"]["additionalProperties"] is False
    assert schemas["IssueRequest"]["properties"]["runs_total"]["maximum"] == 1_000_000
    assert set(document["components"]["securitySchemes"]) == {"googleIdToken", "adminToken"}


def test_usage_documents_its_query_csv_and_both_kinds_of_caller() -> None:
    document = openapi.build()
    usage = document["paths"]["/api/entitlement/usage"]["get"]
    assert {(p["name"], p["in"], p["required"]) for p in usage["parameters"]} == {
        ("principal", "query", True), ("from", "query", False), ("to", "query", False)}
    assert all("anyOf" not in p["schema"] for p in usage["parameters"]), "an absent parameter is never null"
    assert set(usage["responses"]["200"]["content"]) == {"application/json", "text/csv"}
    assert {frozenset(s) for s in usage["security"]} == {frozenset({"adminToken"}), frozenset({"googleIdToken"}),
                                                         frozenset({"adminToken", "googleIdToken"})}
    assert {"400", "401", "403"} <= set(usage["responses"])
    audit = document["paths"]["/api/ledger/audit"]["post"]
    assert audit["security"] == [{"googleIdToken": []}] and {"401", "403"} <= set(audit["responses"])
    assert "requestBody" not in audit and "parameters" not in audit


def test_local_server_serves_it(api: Api) -> None:
    response = requests.get(api.base_url + "/openapi.json", timeout=30)
    assert response.status_code == 200 and response.json() == json.loads(openapi.render())


def test_the_document_is_as_strict_as_the_server_on_formats() -> None:
    from shared import models

    document = openapi.build()
    schemas = document["components"]["schemas"]
    (expires,) = [s for s in schemas["IssueRequest"]["properties"]["expires_at"]["anyOf"] if s.get("type") == "string"]
    assert expires["pattern"] == models.RFC3339_UTC_PATTERN
    assert schemas["IssueRequest"]["properties"]["runs_total"]["x-integer-literal"] is True
    redeem = document["paths"]["/api/entitlement/redeem_seal_once"]["post"]
    (principal,) = [p for p in redeem["parameters"] if p["name"] == "principal"]
    assert principal["schema"]["pattern"] == models.PRINCIPAL_PATTERN
    assert {p["name"] for p in redeem["parameters"]} == {"principal", "Idempotency-Key"}
    # verify has no principal to name: it is not documented there.
    assert "parameters" not in document["paths"]["/api/seal/verify"]["post"]


def test_responses_are_derived_from_the_registry() -> None:
    document = openapi.build()
    for endpoint in ENDPOINTS.values():
        operation = document["paths"][openapi.openapi_path(endpoint)][endpoint.method.lower()]
        assert operation["operationId"] == endpoint.name
        documented = {int(status) for status in operation["responses"]} - {200}
        assert documented == {error.status for error in endpoint.all_errors}
    conflict = document["paths"]["/api/entitlement/check"]["post"]["responses"]["409"]
    assert "run_id_reused" in conflict["description"]
    assert document["components"]["schemas"]["ErrorDetail"]["properties"]["state"]["anyOf"][0]["enum"] == ["started", "completed"]


def test_the_seal_log_is_documented() -> None:
    """The proof's query and text answer, the tiles' path parameter, the log in public_keys."""
    document = openapi.build()
    proof = document["paths"]["/api/log/proof"]["get"]
    assert [p["name"] for p in proof["parameters"]] == ["seal_id"] and proof["parameters"][0]["required"] is True
    assert set(proof["responses"]["200"]["content"]) == {"text/plain"} and {"400", "404", "503"} <= set(proof["responses"])
    tiles = document["paths"]["/log/{path}"]["get"]
    assert tiles["parameters"][0]["in"] == "path" and set(tiles["responses"]["200"]["content"]) == {"application/octet-stream"}
    assert "log" in document["components"]["schemas"]["PublicKeysResponse"]["properties"]
