"""The OpenAPI 3.1 document, generated from the pydantic models (`python -m shared.openapi > openapi.json`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from shared import errors, models

REF = "#/components/schemas/{model}"


@dataclass(frozen=True)
class Endpoint:
    """One Cloud Function as the API shows it."""

    path: str
    method: str
    function: str
    summary: str
    request: type[BaseModel] | None
    response: type[BaseModel]
    security: str | None
    errors: tuple[type[errors.ApiError], ...]
    seal_upload: bool = False


_COMMON = (errors.InvalidRequest, errors.Unauthenticated, errors.MethodNotAllowed, errors.PayloadTooLarge, errors.UnsupportedMediaType, errors.Unavailable)
ENDPOINTS = (
    Endpoint("/api/entitlement/check", "post", "check", "Confirm entitlement availability for a run_id; writes nothing",
             models.CheckRequest, models.CheckResponse, "googleIdToken", (*_COMMON, errors.EntitlementExhausted, errors.RunIdReused)),
    Endpoint("/api/entitlement/consume", "post", "consume", "Consume one run for run_id (retries replay without charge)",
             models.ConsumeRequest, models.ConsumeResponse, "googleIdToken", (*_COMMON, errors.EntitlementExhausted, errors.RunIdReused)),
    Endpoint("/api/entitlement/run_start", "post", "run_start", "Record run-start metadata",
             models.RunStartRequest, models.RunStartResponse, "googleIdToken", (*_COMMON, errors.RunStateConflict, errors.LifecycleViolation)),
    Endpoint("/api/entitlement/run_complete", "post", "run_complete", "Record the outputs and return the signed seal bundle",
             models.RunCompleteRequest, models.SealBundle, "googleIdToken", (*_COMMON, errors.RunStateConflict, errors.LifecycleViolation)),
    Endpoint("/api/seal/verify", "post", "seal_verify", "Verify an uploaded seal.svg",
             None, models.VerifyResponse, "googleIdToken", (*_COMMON, errors.InvalidSeal), seal_upload=True),
    Endpoint("/api/entitlement/redeem_seal_once", "post", "redeem_seal_once", "One bonus run for a verified (principal, seal_id) pair",
             None, models.RedeemResponse, "googleIdToken", (*_COMMON, errors.InvalidSeal, errors.Forbidden, errors.AlreadyRedeemed, errors.SealInvalid), seal_upload=True),
    Endpoint("/api/entitlement/issue", "post", "issue", "Issue runs to a customer principal",
             models.IssueRequest, models.IssueResponse, "adminToken", (*_COMMON, errors.Forbidden, errors.IdempotencyConflict)),
    Endpoint("/api/seal/public_keys", "get", "public_keys", "Public keys that seals are signed with",
             None, models.PublicKeysResponse, None, (errors.MethodNotAllowed, errors.Unavailable)),
)


def _seal_body() -> dict[str, Any]:
    """The request body of seal uploads: raw SVG, or multipart with `seal` (and an operator's `principal`)."""
    return {
        "required": True,
        "content": {
            "image/svg+xml": {"schema": {"type": "string", "format": "binary", "maxLength": 256 * 1024}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["seal"],
                    "properties": {
                        "seal": {"type": "string", "format": "binary", "description": "The seal.svg."},
                        "principal": {"type": "string", "description": "Operators only: the principal to redeem for (wins over ?principal=)."},
                    },
                }
            },
        },
    }


def _responses(endpoint: Endpoint) -> dict[str, Any]:
    """200 with the response model, and every error status the endpoint can answer, with its codes."""
    responses: dict[str, Any] = {
        "200": {"description": "OK", "content": {"application/json": {"schema": {"$ref": REF.format(model=endpoint.response.__name__)}}}}
    }
    by_status: dict[int, list[str]] = {}
    error: type[errors.ApiError]
    for error in (*endpoint.errors, errors.ApiError):
        by_status.setdefault(error.status, []).append(error.code)
    for status, codes in sorted(by_status.items()):
        responses[str(status)] = {
            "description": "error codes: " + ", ".join(sorted(set(codes))),
            "content": {"application/json": {"schema": {"$ref": REF.format(model="ErrorBody")}}},
        }
        if status == 503:
            responses[str(status)]["headers"] = {"Retry-After": {"schema": {"type": "integer"}}}
    return responses


def build() -> dict[str, Any]:
    """The whole OpenAPI document."""
    used = {e.response for e in ENDPOINTS} | {e.request for e in ENDPOINTS if e.request} | {models.ErrorBody}
    _, schema = models_json_schema([(m, "serialization" if m.__name__.endswith(("Response", "Bundle", "Body")) else "validation") for m in sorted(used, key=lambda m: m.__name__)], ref_template=REF)
    paths: dict[str, Any] = {}
    for endpoint in ENDPOINTS:
        operation: dict[str, Any] = {
            "operationId": endpoint.function,
            "summary": endpoint.summary,
            "security": [{endpoint.security: []}] if endpoint.security else [],
            "parameters": [],
            "responses": _responses(endpoint),
        }
        if endpoint.request is not None:
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": {"$ref": REF.format(model=endpoint.request.__name__)}}}}
        if endpoint.seal_upload:
            operation["requestBody"] = _seal_body()
            operation["parameters"] = [{"name": "principal", "in": "query", "required": False, "schema": {"type": "string"}, "description": "Operators only: the principal to act for."}]
        if endpoint.function == "issue":
            operation["parameters"] = [{"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string", "minLength": 1, "maxLength": 255}}]
            operation["security"] = [{"adminToken": []}, {"adminToken": [], "googleIdToken": []}]
        if not operation["parameters"]:
            del operation["parameters"]
        paths[endpoint.path] = {endpoint.method: operation}
    return {
        "openapi": "3.1.0",
        "info": {"title": "GBX Entitlements", "version": "1.0.0", "description": "Meters and seals runs of a licensed containerised job. Generated from shared/models.py by `make openapi`."},
        "paths": paths,
        "components": {
            "schemas": schema["$defs"],
            "securitySchemes": {
                "googleIdToken": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT", "description": "Google-signed OIDC ID token whose audience is the service URL."},
                "adminToken": {"type": "apiKey", "in": "header", "name": "X-GBX-ADMIN-TOKEN"},
            },
        },
    }


def render() -> str:
    """The document as committed: sorted keys, two-space indent, trailing newline."""
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    print(render(), end="")
