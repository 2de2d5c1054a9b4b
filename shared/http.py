"""The one HTTP wrapper: method, size, media type, parsing, auth, errors → status, and a log line per request.

Everything HTTP stays here: services get plain, validated values and raise ApiErrors.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import threading
import time
import traceback
import uuid
from typing import Any

import flask
import functions_framework
import google.auth.exceptions
import pydantic
from google.api_core import exceptions as gexc
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.formparser import FormDataParser

from shared import auth, errors, store
from shared.config import get_config
from shared.endpoints import ENDPOINTS, Body, Caller, Endpoint
from shared.models import PATTERN_WORDS, ErrorBody, ErrorDetail

MAX_JSON_BYTES = 64 * 1024
# Multipart framing (boundaries, part headers, the principal field) around a seal of the maximum size.
MULTIPART_OVERHEAD_BYTES = 8 * 1024
IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
REQUEST_ID_HEADER = "X-Request-Id"

# Backing-service failures that a retry may cure: 503 with Retry-After, never 500.
UNAVAILABLE_ERRORS = (
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


def _json_response(body: str, status: int, request_id: str) -> flask.Response:
    """Every answer of the API: a JSON body, its request id, never cached."""
    # The trailing newline keeps a shell prompt off the end of `curl` output.
    response = flask.Response(body + "\n", status=status, mimetype="application/json")
    response.headers[REQUEST_ID_HEADER] = request_id
    response.headers["Cache-Control"] = "no-store"
    return response


def error_response(exc: errors.ApiError, request_id: str | None = None) -> flask.Response:
    """The contract's error body for an ApiError, with its status and its own headers: every error is rendered here."""
    detail = ErrorDetail(code=exc.code, message=exc.message, status=exc.status, **exc.details)
    response = _json_response(ErrorBody(error=detail).model_dump_json(exclude_none=True), exc.status, request_id or uuid.uuid4().hex)
    response.headers.update(exc.headers())
    return response


def _describe_validation(exc: pydantic.ValidationError) -> str:
    """A short message naming the offending fields, without echoing their values."""
    parts = []
    for item in exc.errors(include_input=False, include_url=False)[:5]:
        if item["type"] == "json_invalid":
            return "the body is not valid JSON"
        where = ".".join(str(p) for p in item["loc"]) or "body"
        pattern = str((item.get("ctx") or {}).get("pattern", ""))
        words = PATTERN_WORDS.get(pattern) if item["type"] == "string_pattern_mismatch" else None
        parts.append(f"{where}: must be {words}" if words else f"{where}: {item['msg']}")
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


def _check_encoding(request: flask.Request) -> None:
    """415 for a content coding or charset we do not decode: reading such bytes as plain UTF-8 would read another request."""
    coding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if coding not in ("", "identity"):
        raise errors.UnsupportedMediaType("send the body without Content-Encoding (identity only)")
    charset = request.mimetype_params.get("charset")
    if charset is not None and charset.strip().lower() not in ("utf-8", "utf8"):
        raise errors.UnsupportedMediaType("the only charset accepted is UTF-8")


def _parse_json(request: flask.Request, model: type[pydantic.BaseModel]) -> pydantic.BaseModel:
    """A JSON body validated into its request model."""
    if request.mimetype != "application/json":
        raise errors.UnsupportedMediaType("send Content-Type: application/json")
    _check_encoding(request)
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
    # Not JSON (or absurdly deep): pydantic reports it as invalid with its own message.
    with contextlib.suppress(ValueError, RecursionError):
        json.loads(raw, object_pairs_hook=_no_duplicates)


def _uri_list_link(raw: bytes) -> str:
    """The one URI of a text/uri-list body (RFC 2483: CRLF lines, `#` comment lines); 400 invalid_seal otherwise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise errors.InvalidSeal("the text/uri-list body is not UTF-8") from exc
    uris = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if len(uris) != 1:
        raise errors.InvalidSeal("send exactly one verification link (BASE/v#P.S) as text/uri-list")
    return uris[0]


def _parse_seal(request: flask.Request, model: type[pydantic.BaseModel]) -> pydantic.BaseModel:
    """A seal.svg sent raw (image/svg+xml) or as the multipart field `seal`, or a verification link (text/uri-list),
    with the principal an operator names."""
    # Imported on first use: only the seal endpoints load the format (and defusedxml) at all.
    from gbx_client.seal_format import MAX_SEAL_BYTES

    _check_encoding(request)
    if len(request.args.getlist("principal")) > 1:
        raise errors.InvalidRequest("the query repeats `principal`")
    principal = request.args.get("principal")
    link: str | None = None
    svg = b""
    if request.mimetype == "image/svg+xml":
        svg = _read_body(request, MAX_SEAL_BYTES)
    elif request.mimetype == "text/uri-list":
        link = _uri_list_link(_read_body(request, MAX_SEAL_BYTES))
    elif request.mimetype == "multipart/form-data":
        raw = _read_body(request, MAX_SEAL_BYTES + MULTIPART_OVERHEAD_BYTES)
        parser = FormDataParser(max_form_memory_size=MAX_SEAL_BYTES + MULTIPART_OVERHEAD_BYTES, max_form_parts=8, silent=False)
        try:
            _, form, files = parser.parse(io.BytesIO(raw), request.mimetype, len(raw), request.mimetype_params)
        except RequestEntityTooLarge as exc:
            raise errors.PayloadTooLarge("the multipart body has too many or too large parts") from exc
        except ValueError as exc:
            raise errors.InvalidRequest("the multipart body is malformed") from exc
        # Two parts of one name: which one a proxy or an audit log reads is anybody's guess.
        for name in ("seal", "principal"):
            if len(files.getlist(name)) + len(form.getlist(name)) > 1:
                raise errors.InvalidRequest(f"the multipart body has more than one `{name}` field")
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
        raise errors.UnsupportedMediaType("send the seal as image/svg+xml, multipart/form-data field `seal`, or its link as text/uri-list")
    fields: dict[str, Any] = {"svg": svg, "link": link}
    if "principal" in model.model_fields and principal is not None:
        fields["principal"] = principal.strip()
    return model.model_validate(fields)


def _parse_query(request: flask.Request, model: type[pydantic.BaseModel]) -> pydantic.BaseModel:
    """The query string validated into its request model; a repeated parameter is 400, as a repeated JSON key is."""
    fields: dict[str, Any] = {}
    for name in request.args:
        values = request.args.getlist(name)
        if len(values) > 1:
            raise errors.InvalidRequest(f"the query repeats `{name}`")
        fields[name] = values[0]
    return model.model_validate(fields)


def _parse_path(endpoint: Endpoint) -> Any:
    """A parser of the path below the endpoint's own (`/log/tile/0/000` -> `tile/0/000`), as the request model's `path`."""

    def parse(request: flask.Request, model: type[pydantic.BaseModel]) -> pydantic.BaseModel:
        # Through Hosting (and make run) the path is the public one, /log/...; at the function's own URL it is what follows it.
        path = request.path
        below = path[len(endpoint.path):] if path.startswith(endpoint.path) else path.lstrip("/")
        return model.model_validate({"path": below})

    return parse


def _resource_response(resource: Any, request_id: str) -> flask.Response:
    """A log resource (checkpoint, tile, proof) as it is, with its media type and caching."""
    response = flask.Response(resource.body, status=200, mimetype=None, content_type=resource.media_type)
    response.headers[REQUEST_ID_HEADER] = request_id
    response.headers["Cache-Control"] = resource.cache_control
    return response


def _prefers_csv(request: flask.Request) -> bool:
    """True when the Accept header ranks text/csv above JSON (JSON when it names neither, or no Accept is sent)."""
    return request.accept_mimetypes.best_match(["application/json", "text/csv"]) == "text/csv"


def _csv_response(body: str, request_id: str) -> flask.Response:
    """A CSV answer, with the same request id and caching as every JSON answer."""
    response = flask.Response(body, status=200, mimetype="text/csv")
    response.headers[REQUEST_ID_HEADER] = request_id
    response.headers["Cache-Control"] = "no-store"
    return response


def _log_request(*, request: flask.Request, request_id: str, endpoint: str, principal: str | None, status: int, started: float, writes: list[str]) -> None:
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
    if writes:
        # Commits tried and races lost: contention on a principal shows in Cloud Logging; round trips to Firestore
        # one after another (reads made at once count as one), what a request's latency is made of.
        entry["commits"] = writes.count("commit")
        entry["races_lost"] = writes.count("contended")
        entry["round_trips"] = writes.count("read") + writes.count("commit")
    _emit(entry, request)


_LOG_LOCK = threading.Lock()


def _emit(entry: dict[str, Any], request: flask.Request) -> None:
    """Write one JSON log line (Cloud Logging reads stdout), tied to the request's trace."""
    trace_id = request.headers.get("X-Cloud-Trace-Context", "").split("/", 1)[0]
    config = get_config()
    if trace_id and trace_id.isalnum() and config.project:
        entry["logging.googleapis.com/trace"] = f"projects/{config.project}/traces/{trace_id}"
    log(entry)


def log(entry: dict[str, Any]) -> None:
    """Write one structured log line to stdout (Cloud Logging parses it): for services' own events, and every request's."""
    line = json.dumps(entry) + "\n"
    # One write of one whole line, under a lock: concurrent requests of one instance never interleave.
    # A log line that cannot be written (stdout closed under the process: a test's capture ending while a request is in
    # flight) never turns an answered request into a 500: the answer matters more than its log line.
    with _LOG_LOCK, contextlib.suppress(OSError, ValueError):
        sys.stdout.write(line)
        sys.stdout.flush()


def _authenticate(caller: Caller, request: flask.Request) -> auth.Identity | auth.PartnerCaller | None:
    """Who calls, as the endpoint's kind of caller must prove it (None for an endpoint anyone may call)."""
    authorization, admin_token = request.headers.get("Authorization"), request.headers.get(auth.ADMIN_TOKEN_HEADER)
    if caller is Caller.USER:
        return auth.authenticate(authorization)
    if caller in (Caller.PARTNER, Caller.PARTNER_OR_OPERATOR):
        return auth.authenticate_partner(admin_token, authorization, operators=caller is Caller.PARTNER_OR_OPERATOR)
    if caller is Caller.OPERATOR:
        return auth.authenticate_operator(authorization)
    return None


def handle(request: flask.Request, endpoint: Endpoint) -> flask.Response:
    """Run one endpoint: every outcome, expected or not, becomes a contract response."""
    started = time.monotonic()
    request_id = uuid.uuid4().hex
    principal: str | None = None
    writes: list[str] = []
    try:
        # HEAD is GET without a body (werkzeug drops the body of a HEAD response).
        if request.method != endpoint.method and not (request.method == "HEAD" and endpoint.method == "GET"):
            raise errors.MethodNotAllowed("GET, HEAD" if endpoint.method == "GET" else endpoint.method)
        args: list[Any] = []
        caller = _authenticate(endpoint.caller, request)
        if caller is not None:
            # The log names who acted: an identity's principal; a partner, an operator, or `admin` (the admin token alone).
            principal = caller.name if isinstance(caller, auth.PartnerCaller) else caller.principal
            args.append(caller)
        if endpoint.body is not Body.NONE:
            assert endpoint.request is not None
            parse = {Body.JSON: _parse_json, Body.SEAL: _parse_seal, Body.QUERY: _parse_query, Body.PATH: _parse_path(endpoint)}[endpoint.body]
            try:
                args.append(parse(request, endpoint.request))
            except pydantic.ValidationError as exc:
                # Only the request's own validation is the caller's 400; a stored record that fails its
                # model later is our bug, and falls through to the 500 below.
                raise errors.InvalidRequest(_describe_validation(exc)) from exc
        kwargs: dict[str, Any] = {}
        if endpoint.idempotent:
            key = request.headers.get(IDEMPOTENCY_KEY_HEADER)
            if key is not None and not 1 <= len(key) <= 255:
                raise errors.InvalidRequest("Idempotency-Key must be 1 to 255 characters")
            kwargs["idempotency_key"] = key
        with store.recording_attempts() as writes:
            result = endpoint.run(*args, **kwargs)
        if endpoint.media_type != "application/json":
            response = _resource_response(result, request_id)
        elif endpoint.csv and _prefers_csv(request):
            response = _csv_response(result.csv(), request_id)  # type: ignore[attr-defined]
            # A paged answer's next page token travels in a header beside the CSV rows.
            response.headers.update(getattr(result, "csv_headers", dict)())
        else:
            response = _json_response(result.model_dump_json(), 200, request_id)
    except errors.ApiError as exc:
        response = error_response(exc, request_id)
    except UNAVAILABLE_ERRORS as exc:
        _emit({"severity": "WARNING", "message": f"backing service unavailable: {type(exc).__name__}", "request_id": request_id, "endpoint": endpoint.name}, request)
        response = error_response(errors.Unavailable(), request_id)
    except Exception:  # noqa: BLE001 - the one place that turns a bug into a 500 without detail
        # The traceback goes to the log (Error Reporting reads it from `message`), never to the caller.
        _emit({"severity": "ERROR", "message": traceback.format_exc(), "request_id": request_id, "endpoint": endpoint.name}, request)
        response = error_response(errors.ApiError(), request_id)
    _log_request(request=request, request_id=request_id, endpoint=endpoint.name, principal=principal, status=response.status_code, started=started, writes=writes)
    return response


def function(name: str) -> Any:
    """The Cloud Function entry point of a registered endpoint: `check = function("check")` in functions/check/main.py."""
    endpoint = ENDPOINTS[name]

    def entry_point(request: flask.Request) -> flask.Response:
        return handle(request, endpoint)

    entry_point.__name__ = entry_point.__qualname__ = name
    entry_point.__doc__ = f"{endpoint.method} {endpoint.path}: {endpoint.summary}."
    return functions_framework.http(entry_point)
