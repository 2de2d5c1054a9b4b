"""One exception hierarchy: each error carries its own HTTP status, code and headers (werkzeug-style)."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """Base class: a failure the caller is told about, with its status and code."""

    status = 500
    code = "internal"
    default_message = "internal error"

    def __init__(self, message: str | None = None, **details: Any) -> None:
        """`details` are extra fields of the error object (documented per code in models.ErrorDetail)."""
        super().__init__(message or self.default_message)
        self.message = message or self.default_message
        self.details = details

    def headers(self) -> dict[str, str]:
        """Response headers this error needs (like werkzeug's HTTPException.get_headers())."""
        return {}


class InvalidRequest(ApiError):
    """400: malformed JSON, missing, unknown or ill-typed fields, bad formats."""

    status = 400
    code = "invalid_request"
    default_message = "the request is not valid"


class InvalidSeal(ApiError):
    """400: the uploaded document is not a usable seal.svg."""

    status = 400
    code = "invalid_seal"
    default_message = "the uploaded document is not a usable seal.svg"


class Unauthenticated(ApiError):
    """401: identity or admin token missing, malformed, expired, wrong audience or unverified."""

    status = 401
    code = "unauthenticated"
    default_message = "authentication required"


class EntitlementExhausted(ApiError):
    """402: no runs left for the principal."""

    status = 402
    code = "entitlement_exhausted"
    default_message = "no runs left for this principal"


class Forbidden(ApiError):
    """403: authenticated, but not allowed to do this."""

    status = 403
    code = "forbidden"
    default_message = "not allowed"


class NotFound(ApiError):
    """404: no such endpoint, or no such grant among those the caller may see."""

    status = 404
    code = "not_found"
    default_message = "no such endpoint"


class MethodNotAllowed(ApiError):
    """405: wrong HTTP method."""

    status = 405
    code = "method_not_allowed"
    default_message = "method not allowed"

    def __init__(self, allowed: str, message: str | None = None) -> None:
        super().__init__(message or f"use {allowed}")
        self.allowed = allowed

    def headers(self) -> dict[str, str]:
        """The methods the endpoint answers."""
        return {"Allow": self.allowed}


class Conflict(ApiError):
    """409: the request contradicts recorded state (subclasses name how)."""

    status = 409
    code = "conflict"


class RunIdReused(Conflict):
    """409: the run_id was already started or completed."""

    code = "run_id_reused"
    default_message = "this run_id was already started or completed"


class RunStateConflict(Conflict):
    """409: the run was recorded with other metadata, or is already completed."""

    code = "run_state_conflict"
    default_message = "the run's recorded state contradicts this request"


class AlreadyRedeemed(Conflict):
    """409: this principal already redeemed this seal."""

    code = "already_redeemed"
    default_message = "this seal was already redeemed by this principal"


class IdempotencyConflict(Conflict):
    """409: the Idempotency-Key was used with another request body."""

    code = "idempotency_conflict"
    default_message = "this Idempotency-Key was used with another request body"


class NotEnoughRuns(Conflict):
    """409: fewer unused runs are left in the grant than the revoke asks for (nothing was revoked)."""

    code = "not_enough_runs"
    default_message = "the grant has fewer unused runs than asked for"


class PayloadTooLarge(ApiError):
    """413: body over the limit."""

    status = 413
    code = "payload_too_large"
    default_message = "request body too large"


class UnsupportedMediaType(ApiError):
    """415: wrong Content-Type."""

    status = 415
    code = "unsupported_media_type"
    default_message = "unsupported Content-Type"


class LifecycleViolation(ApiError):
    """422: a prerequisite step of the run lifecycle is missing."""

    status = 422
    code = "lifecycle_violation"
    default_message = "a prerequisite step of the run lifecycle is missing"


class SealInvalid(ApiError):
    """422: the seal does not verify."""

    status = 422
    code = "seal_invalid"
    default_message = "the seal does not verify"


class Unavailable(ApiError):
    """503: Firestore or KMS unavailable; the caller should retry after a pause."""

    status = 503
    code = "unavailable"
    default_message = "a backing service is unavailable; retry later"
    retry_after_seconds = 2

    def headers(self) -> dict[str, str]:
        """When to retry."""
        return {"Retry-After": str(self.retry_after_seconds)}
