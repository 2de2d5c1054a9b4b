"""The OpenAPI 3.1 document, generated from the pydantic models (`python -m shared.openapi > openapi.json`)."""

from __future__ import annotations

import json
from typing import Any

from pydantic.json_schema import models_json_schema

from shared import errors, models
from shared.endpoints import ENDPOINTS, Body, Caller, Endpoint

REF = "#/components/schemas/{model}"


def _seal_body(endpoint: Endpoint) -> dict[str, Any]:
    """The request body of seal uploads: raw SVG, multipart with `seal` (and an operator's `principal`), or the seal's verification link."""
    assert endpoint.request is not None
    properties: dict[str, Any] = {"seal": {"type": "string", "format": "binary", "description": "The seal.svg."}}
    if "principal" in endpoint.request.model_fields:
        properties["principal"] = {"type": "string", "pattern": models.PRINCIPAL_PATTERN, "description": "Operators only: the principal to redeem for (wins over ?principal=)."}
    return {
        "required": True,
        "content": {
            "image/svg+xml": {"schema": {"type": "string", "format": "binary", "maxLength": 256 * 1024}},
            "text/uri-list": {
                "schema": {
                    "type": "string",
                    "maxLength": 256 * 1024,
                    "description": "One verification link BASE/v#P.S (run_complete's `verify_link`, or the badge's QR code): the same checks.",
                }
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["seal"],
                    "properties": properties,
                }
            },
        },
    }


def _responses(endpoint: Endpoint) -> dict[str, Any]:
    """200 with the response model, and every error status the endpoint can answer, with its codes."""
    responses: dict[str, Any] = {
        "200": {"description": "OK", "content": {"application/json": {"schema": {"$ref": REF.format(model=endpoint.response.__name__)}}}}
    }
    if endpoint.media_type != "application/json":
        # The seal log's resources are served as they are: a signed note or a tlog-proof (text), a tile (bytes).
        responses["200"] = {"description": endpoint.summary, "content": {endpoint.media_type: {"schema": {"type": "string", "format": "binary"}}}}
    if endpoint.csv:
        # Answered when the Accept header ranks text/csv above application/json.
        responses["200"]["content"]["text/csv"] = {
            "schema": {"type": "string", "description": "A header row, one `grant` row per grant, then a `total` row with the totals."}
        }
    by_status: dict[int, list[str]] = {}
    error: type[errors.ApiError]
    for error in endpoint.all_errors:
        by_status.setdefault(error.status, []).append(error.code)
    for status, codes in sorted(by_status.items()):
        responses[str(status)] = {
            "description": "error codes: " + ", ".join(sorted(set(codes))),
            "content": {"application/json": {"schema": {"$ref": REF.format(model="ErrorBody")}}},
        }
        if status == 503:
            responses[str(status)]["headers"] = {"Retry-After": {"schema": {"type": "integer"}}}
    return responses


def _parameters(endpoint: Endpoint) -> list[dict[str, Any]]:
    """Header and query parameters."""
    parameters: list[dict[str, Any]] = []
    if endpoint.idempotent:
        parameters.append({"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                           "description": "The same key with the same request answers the first response again (replayed: true)."})
    if endpoint.request is not None and "principal" in endpoint.request.model_fields and endpoint.body is Body.SEAL:
        parameters.append({"name": "principal", "in": "query", "required": False, "schema": {"type": "string", "pattern": models.PRINCIPAL_PATTERN},
                           "description": "Operators only: the principal to act for."})
    if endpoint.body is Body.PATH:
        parameters.append({"name": "path", "in": "path", "required": True, "schema": {"type": "string"},
                           "description": "The resource below the path: checkpoint, tile/<L>/<N>[.p/<W>] or tile/entries/<N>[.p/<W>] (C2SP tlog-tiles)."})
    if endpoint.body is Body.QUERY:
        assert endpoint.request is not None
        schema = endpoint.request.model_json_schema(ref_template=REF)
        for name, field in schema["properties"].items():
            # An optional parameter is absent, never null: keep the value's own schema.
            variants = [v for v in field.get("anyOf", []) if v.get("type") != "null"]
            if variants:
                field = {**variants[0], "description": field.get("description", "")}
            parameters.append({"name": name, "in": "query", "required": name in schema.get("required", []), "schema": field,
                               "description": field.get("description", "")})
    return parameters


def _security(endpoint: Endpoint) -> list[dict[str, list[str]]]:
    if endpoint.caller in (Caller.USER, Caller.OPERATOR):
        return [{"googleIdToken": []}]
    if endpoint.caller in (Caller.PARTNER, Caller.PARTNER_OR_OPERATOR):
        # A partner's (or operator's) ID token, or the admin token; an ID token sent with the admin token names the admin.
        return [{"googleIdToken": []}, {"adminToken": []}, {"adminToken": [], "googleIdToken": []}]
    return []


def build() -> dict[str, Any]:
    """The whole OpenAPI document."""
    json_models = [e.request for e in ENDPOINTS.values() if e.request is not None and e.body is Body.JSON]
    used = {e.response for e in ENDPOINTS.values() if e.media_type == "application/json"} | set(json_models) | {models.ErrorBody}
    _, schema = models_json_schema([(m, "serialization" if m.__name__.endswith(("Response", "Bundle", "Body")) else "validation") for m in sorted(used, key=lambda m: m.__name__)], ref_template=REF)
    paths: dict[str, Any] = {}
    for endpoint in ENDPOINTS.values():
        operation: dict[str, Any] = {
            "operationId": endpoint.name,
            "summary": endpoint.summary,
            "security": _security(endpoint),
            "responses": _responses(endpoint),
        }
        if parameters := _parameters(endpoint):
            operation["parameters"] = parameters
        if endpoint.body is Body.JSON:
            assert endpoint.request is not None
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": {"$ref": REF.format(model=endpoint.request.__name__)}}}}
        elif endpoint.body is Body.SEAL:
            operation["requestBody"] = _seal_body(endpoint)
        paths[openapi_path(endpoint)] = {endpoint.method.lower(): operation}
    return {
        "openapi": "3.1.0",
        "info": {"title": "GBX Entitlements", "version": "1.1.0", "description": "Meters and seals runs of a licensed containerised job. Generated from shared/endpoints.py and shared/models.py by `make openapi`."},
        "paths": paths,
        "components": {
            "schemas": {**schema["$defs"], "SealClaims": models.seal_claims_schema()},
            "securitySchemes": {
                "googleIdToken": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT", "description": "Google-signed OIDC ID token whose audience is the service URL."},
                "adminToken": {"type": "apiKey", "in": "header", "name": "X-GBX-ADMIN-TOKEN", "description": "The deployment's admin secret: the admin, who may do what any partner may, on every grant. Partners (GBX_PARTNERS) send their own ID token instead."},
            },
        },
    }


def openapi_path(endpoint: Endpoint) -> str:
    """The endpoint's path in the document: `/log/{path}` for one that serves every path below its own."""
    return endpoint.path + "{path}" if endpoint.body is Body.PATH else endpoint.path


def render() -> str:
    """The document as committed: sorted keys, two-space indent, trailing newline."""
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    print(render(), end="")
