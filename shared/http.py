"""The one HTTP wrapper: method, size, media type, parsing, auth, errors → status, and a log line per request."""

from __future__ import annotations

import enum
import io
import json
import re
import sys
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import flask
import google.auth.exceptions
import pydantic
from google.api_core import exceptions as gexc
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.formparser import FormDataParser

from shared import auth, errors
from shared.config import get_config
from shared.models import PRINCIPAL_PATTERN, ErrorBody, ErrorDetail
from gbx_client.seal_format import MAX_SEAL_BYTES

MAX_JSON_BYTES = 64 * 1024
# Multipart framing (boundaries, part headers, the principal field) around a seal of the maximum size.
MULTIPART_OVERHEAD_BYTES = 8 * 1024
IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
REQUEST_ID_HEADER = "X-Request-Id"

# Backing-service failures that a retry may cure: 503 with Retry-After, never 500.
_UNAVAILABLE = (
    gexc.ServiceUnavailable,
    gexc.DeadlineExceeded,
    gexc.RetryError,
    gexc.InternalServerError,
    gexc.Aborted,
    gexc.ResourceExhausted,
    gexc.Cancelled,
    google.auth.exceptions.TransportError,
    google.auth.exceptions.RefreshError,
)


class Auth(enum.Enum):
    """Who may call an endpoint."""

    USER = "user"
    ADMIN = "admin"
    NONE = "none"


class Body(enum.Enum):
    """What an endpoint's body holds."""

    JSON = "json"
    SEAL = "seal"
    NONE = "none"


@dataclass(frozen=True)
class SealUpload:
    """An uploaded seal.svg, and the principal an operator names (multipart field or ?principal=)."""

    svg: bytes
    principal: str | None


def _error_response(exc: errors.ApiError, request_id: str) -> flask.Response:
    """The contract's error body for an ApiError, with its status and headers."""
    body = ErrorBody(error=ErrorDetail(code=exc.code, message=exc.message, status=exc.status))
    response = flask.Response(body.model_dump_json() + "\n", status=exc.status, mimetype="application/json")
    if isinstance(exc, errors.Unavailable):
        response.headers["Retry-After"] = str(exc.retry_after_seconds)
    if isinstance(exc, errors.MethodNotAllowed):
        response.headers["Allow"] = exc.allowed
    return response


def _describe_validation(exc: pydantic.ValidationError) -> str:
    """A short message naming the offending fields, without echoing their values."""
    parts = []
    for item in exc.errors(include_input=False, include_url=False)[:5]:
        if item["type"] == "json_invalid":
            return "the body is not valid JSON"
        where = ".".join(str(p) for p in item["loc"]) or "body"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


def _read_body(request: flask.Request, limit: int) -> bytes:
    """Read at most `limit` bytes of the body; 413 beyond, before reading it all."""
    if request.content_length is not None and request.content_length > limit:
        raise errors.PayloadTooLarge(f"the body is over {limit // 1024} KiB")
    try:
        data = request.stream.read(limit + 1)
    except (OSError, HTTPException) as exc:
        # A broken chunked encoding or a client that went away: the body is unusable, not our bug.
        raise errors.InvalidRequest("the request body could not be read") from exc
    if len(data) > limit:
        raise errors.PayloadTooLarge(f"the body is over {limit // 1024} KiB")
    return data


def _parse_json(request: flask.Request, model: type[pydantic.BaseModel]) -> pydantic.BaseModel:
    """A JSON body validated into its request model."""
    if request.mimetype != "application/json":
        raise errors.UnsupportedMediaType("send Content-Type: application/json")
    raw = _read_body(request, MAX_JSON_BYTES)
    _reject_duplicate_keys(raw)
    return model.model_validate_json(raw)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(keys) != len(set(keys)):
        raise errors.InvalidRequest("the body repeats a key")
    return dict(pairs)


def _reject_duplicate_keys(raw: bytes) -> None:
    """400 for a repeated key: parsers disagree on which one wins, so a proxy could read another request."""
    try:
        json.loads(raw, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError):
        pass  # not JSON (or absurdly deep): pydantic reports it as invalid with its own message


def _parse_seal(request: flask.Request) -> SealUpload:
    """A seal.svg sent raw (image/svg+xml) or as the multipart field `seal`."""
    principal = request.args.get("principal")
    if request.mimetype == "image/svg+xml":
        svg = _read_body(request, MAX_SEAL_BYTES)
    elif request.mimetype == "multipart/form-data":
        raw = _read_body(request, MAX_SEAL_BYTES + MULTIPART_OVERHEAD_BYTES)
        parser = FormDataParser(max_form_memory_size=MAX_SEAL_BYTES + MULTIPART_OVERHEAD_BYTES, max_form_parts=8, silent=False)
        try:
            _, form, files = parser.parse(io.BytesIO(raw), request.mimetype, len(raw), request.mimetype_params)
        except RequestEntityTooLarge as exc:
            raise errors.PayloadTooLarge("the multipart body has too many or too large parts") from exc
        except ValueError as exc:
            raise errors.InvalidRequest("the multipart body is malformed") from exc
        upload = files.get("seal")
        svg = upload.read() if upload is not None else form.get("seal", "").encode()
        if not svg:
            raise errors.InvalidRequest("the multipart body has no `seal` field")
        if len(svg) > MAX_SEAL_BYTES:
            raise errors.PayloadTooLarge(f"the seal is over {MAX_SEAL_BYTES // 1024} KiB")
        # The multipart field wins over the query parameter, even when it is empty (then it is invalid).
        if "principal" in form or "principal" in files:
            principal = form.get("principal", "")
    else:
        raise errors.UnsupportedMediaType("send the seal as image/svg+xml or multipart/form-data field `seal`")
    return SealUpload(svg=svg, principal=principal)


def principal_named(upload: SealUpload) -> str | None:
    """The principal an upload names, lower-cased; 400 when it is not an email address."""
    if upload.principal is None:
        return None
    principal = upload.principal.strip().lower()
    if not re.fullmatch(PRINCIPAL_PATTERN, principal):
        raise errors.InvalidRequest("principal: not an email address")
    return principal


def _log_request(*, request: flask.Request, request_id: str, endpoint: str, principal: str | None, status: int, started: float) -> None:
    """One structured JSON line per request for Cloud Logging (no tokens, no bodies)."""
    severity = "ERROR" if status >= 500 else "WARNING" if status >= 400 else "INFO"
    entry: dict[str, Any] = {
        "severity": severity,
        "message": f"{request.method} {endpoint} {status}",
        "request_id": request_id,
        "endpoint": endpoint,
        "principal": principal,
        "status": status,
        "latency_ms": round((time.monotonic() - started) * 1000, 1),
    }
    _emit(entry, request)


def _emit(entry: dict[str, Any], request: flask.Request) -> None:
    """Write one JSON log line (Cloud Logging reads stdout), tied to the request's trace."""
    trace_id = request.headers.get("X-Cloud-Trace-Context", "").split("/", 1)[0]
    config = get_config()
    if trace_id and trace_id.isalnum() and config.project:
        entry["logging.googleapis.com/trace"] = f"projects/{config.project}/traces/{trace_id}"
    print(json.dumps(entry), file=sys.stdout, flush=True)


def handle(
    request: flask.Request,
    model: type[pydantic.BaseModel] | None,
    service: Callable[..., pydantic.BaseModel],
    *,
    auth_mode: Auth = Auth.USER,
    body: Body = Body.JSON,
    method: str = "POST",
    idempotency: bool = False,
) -> flask.Response:
    """Run one endpoint: every outcome, expected or not, becomes a contract response."""
    started = time.monotonic()
    request_id = uuid.uuid4().hex
    endpoint = getattr(service, "__name__", "endpoint")
    principal: str | None = None
    try:
        if request.method != method:
            raise errors.MethodNotAllowed(method)
        args: list[Any] = []
        if auth_mode is Auth.USER:
            identity = auth.authenticate(request.headers.get("Authorization"))
            principal = identity.principal
            args.append(identity)
        elif auth_mode is Auth.ADMIN:
            admin = auth.authenticate_admin(request.headers.get(auth.ADMIN_TOKEN_HEADER), request.headers.get("Authorization"))
            principal = admin.issued_by
            args.append(admin)
        if body is Body.JSON:
            assert model is not None
            args.append(_parse_json(request, model))
        elif body is Body.SEAL:
            args.append(_parse_seal(request))
        kwargs: dict[str, Any] = {}
        if idempotency:
            key = request.headers.get(IDEMPOTENCY_KEY_HEADER)
            if key is not None and not 1 <= len(key) <= 255:
                raise errors.InvalidRequest("Idempotency-Key must be 1 to 255 characters")
            kwargs["idempotency_key"] = key
        result = service(*args, **kwargs)
        # The trailing newline keeps a shell prompt off the end of `curl` output.
        response = flask.Response(result.model_dump_json() + "\n", status=200, mimetype="application/json")
    except errors.ApiError as exc:
        response = _error_response(exc, request_id)
    except pydantic.ValidationError as exc:
        response = _error_response(errors.InvalidRequest(_describe_validation(exc)), request_id)
    except _UNAVAILABLE as exc:
        _emit({"severity": "WARNING", "message": f"backing service unavailable: {type(exc).__name__}", "request_id": request_id, "endpoint": endpoint}, request)
        response = _error_response(errors.Unavailable(), request_id)
    except Exception:  # noqa: BLE001 - the one place that turns a bug into a 500 without detail
        # The traceback goes to the log (Error Reporting reads it from `message`), never to the caller.
        _emit({"severity": "ERROR", "message": traceback.format_exc(), "request_id": request_id, "endpoint": endpoint}, request)
        response = _error_response(errors.ApiError(), request_id)
    response.headers[REQUEST_ID_HEADER] = request_id
    response.headers["Cache-Control"] = "no-store"
    _log_request(request=request, request_id=request_id, endpoint=endpoint, principal=principal, status=response.status_code, started=started)
    return response
