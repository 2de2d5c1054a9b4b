"""The HTTP contract: methods, media types, body limits, malformed bodies (never a 500), error bodies."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests

from tests.conftest import RUNNER, Api, error_code

JSON_ENDPOINTS = ["/api/entitlement/check", "/api/entitlement/consume", "/api/entitlement/run_start", "/api/entitlement/issue"]


@pytest.mark.parametrize("path", JSON_ENDPOINTS)
def test_wrong_method_is_405(api: Api, path: str) -> None:
    for method in ("GET", "PUT", "DELETE"):
        response = requests.request(method, api.base_url + path, timeout=30)
        assert (response.status_code, error_code(response)) == (405, "method_not_allowed")
        assert response.headers["Allow"] == "POST"


@pytest.mark.parametrize("path", JSON_ENDPOINTS)
def test_wrong_content_type_is_415(api: Api, path: str) -> None:
    headers = {"Content-Type": "text/plain", "X-GBX-ADMIN-TOKEN": "test-admin-token-0123456789"}
    response = api.post(path, data='{"run_id": "a"}', headers=headers)
    assert (response.status_code, error_code(response)) == (415, "unsupported_media_type")


@pytest.mark.parametrize(
    "raw",
    [b"", b"not json", b"[]", b"null", b'"run"', b"{", b'{"run_id": "a"', b"\xff\xfe", b'{"run_id": "a", "run_id": 3}', b'{"run_id": ["a"]}', b'{"run_id": {"$gt": ""}}', b'{"run_id": "a", "extra": 1}', b"{}", b"1e999999"],
)
def test_malformed_bodies_are_400(api: Api, raw: bytes) -> None:
    api.issue(RUNNER, 1)
    response = api.post("/api/entitlement/consume", data=raw, headers={"Content-Type": "application/json"})
    assert (response.status_code, error_code(response)) == (400, "invalid_request")


def test_charset_parameter_is_accepted(api: Api) -> None:
    api.issue(RUNNER, 1)
    response = api.post("/api/entitlement/check", data=b'{"run_id": "a"}', headers={"Content-Type": "application/json; charset=utf-8"})
    assert response.status_code == 200


def test_body_over_64_kib_is_413(api: Api) -> None:
    big = json.dumps({"run_id": "a", "pad": "x" * (64 * 1024)})
    response = api.post("/api/entitlement/consume", data=big, headers={"Content-Type": "application/json"})
    assert (response.status_code, error_code(response)) == (413, "payload_too_large")


def test_chunked_body_over_limit_is_413(api: Api) -> None:
    def chunks():
        yield b'{"run_id": "a", "pad": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}'

    response = api.post("/api/entitlement/consume", data=chunks(), headers={"Content-Type": "application/json"})
    assert (response.status_code, error_code(response)) == (413, "payload_too_large")


def test_huge_numbers_and_deep_json_are_400(api: Api) -> None:
    api.issue(RUNNER, 1)
    deep = "[" * 5000 + "]" * 5000
    for raw in (deep, '{"run_id": "a", "x": ' + deep + "}", '{"run_id": ' + "9" * 5000 + "}"):
        response = api.post("/api/entitlement/consume", data=raw, headers={"Content-Type": "application/json"})
        assert (response.status_code, error_code(response)) == (400, "invalid_request")
    issue = api.post("/api/entitlement/issue", data='{"principal": "a@b.co", "runs_total": ' + "9" * 4000 + "}", as_user=None, headers={"Content-Type": "application/json", "X-GBX-ADMIN-TOKEN": "test-admin-token-0123456789"})
    assert (issue.status_code, error_code(issue)) == (400, "invalid_request")


def test_every_response_has_a_request_id(api: Api) -> None:
    ok = api.issue(RUNNER, 1)
    assert ok.status_code == 200 and len(ok.headers["X-Request-Id"]) == 32
    ids = {api.check("a").headers["X-Request-Id"] for _ in range(3)}
    assert len(ids) == 3


def test_unknown_path_is_404_json(api: Api) -> None:
    response = requests.get(api.base_url + "/api/nope", timeout=30)
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_healthz(api: Api) -> None:
    assert requests.get(api.base_url + "/healthz", timeout=30).json() == {"status": "ok"}


@pytest.mark.parametrize("endpoint", ["consume", "issue", "redeem"])
@pytest.mark.usefixtures("short_firestore_budgets")
def test_firestore_outage_is_a_503_with_retry_after_and_nothing_written(api: Api, monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    from shared import emulator, store

    seal_svg = api.sealed_run("sealed")["seal_svg"]
    api.issue(RUNNER, 1)
    calls = {
        "consume": lambda: api.consume("job-1"),
        "issue": lambda: api.issue(RUNNER, 5),
        "redeem": lambda: api.redeem(seal_svg),
    }
    # Point the service at a port where no Firestore answers, as in an outage. The calls are bounded
    # (the Firestore budgets of the configuration), so this ends in our 503 rather than the platform's timeout.
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", f"127.0.0.1:{emulator.free_port()}")
    store.client.cache_clear()
    try:
        response = calls[endpoint]()
    finally:
        monkeypatch.undo()
        store.client.cache_clear()
    assert (response.status_code, error_code(response)) == (503, "unavailable")
    assert response.headers["Retry-After"] == "2"
    assert store.read_run(RUNNER, "job-1") is None
    assert [g["runs_total"] for g in store.all_grants(RUNNER)] == [1, 1]  # the sealed run's and the fresh one
    assert api.verify(seal_svg).json()["redeemed"] is False


def test_internal_errors_are_500_without_detail(api: Api, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    from shared import entitlements

    def broken(principal: str) -> int:
        raise KeyError("secret-internal-detail")

    monkeypatch.setattr(entitlements, "current_balance", broken)
    response = api.check("job-1")
    assert (response.status_code, error_code(response)) == (500, "internal")
    assert response.json()["error"]["message"] == "internal error"
    assert "secret-internal-detail" not in response.text
    logged = [json.loads(line) for line in capfd.readouterr().out.splitlines() if line.startswith("{")]
    (error,) = [line for line in logged if line["severity"] == "ERROR" and "Traceback" in line["message"]]
    assert error["request_id"] == response.headers["X-Request-Id"] and "secret-internal-detail" in error["message"]


def test_multipart_with_too_many_parts_is_413(api: Api) -> None:
    files = [("seal", ("seal.svg", b"<svg/>", "image/svg+xml"))] + [(f"f{n}", (None, "x")) for n in range(12)]
    response = api.post("/api/seal/verify", files=files)
    assert (response.status_code, error_code(response)) == (413, "payload_too_large")


def test_options_and_head_on_a_post_endpoint_are_405_and_404_has_a_request_id(api: Api) -> None:
    for method in ("OPTIONS", "HEAD"):
        response = requests.request(method, api.base_url + "/api/entitlement/consume", timeout=30)
        assert response.status_code == 405 and response.headers["Allow"] == "POST"
    assert requests.get(api.base_url + "/nope", timeout=30).headers["X-Request-Id"]


def test_empty_authorization_beside_the_admin_token_is_401(api: Api) -> None:
    headers = {"X-GBX-ADMIN-TOKEN": "test-admin-token-0123456789", "Authorization": ""}
    response = api.post("/api/entitlement/issue", {"principal": RUNNER, "runs_total": 1}, as_user=None, headers=headers)
    assert (response.status_code, error_code(response)) == (401, "unauthenticated")


@pytest.mark.parametrize(
    "raw",
    [b'{"run_id": "a", "run_id": "b"}', b'{"run_id": 3, "run_id": "a"}', b'{"run_id": "a", "x": {"k": 1, "k": 2}}'],
)
def test_repeated_keys_are_400_whichever_comes_last(api: Api, raw: bytes) -> None:
    api.issue(RUNNER, 1)
    response = api.post("/api/entitlement/check", data=raw, headers={"Content-Type": "application/json"})
    assert (response.status_code, error_code(response)) == (400, "invalid_request")


def test_repeated_principal_in_issue_is_400(api: Api) -> None:
    raw = b'{"principal": "a@example.com", "runs_total": 1, "principal": "b@example.com"}'
    response = api.post("/api/entitlement/issue", data=raw, as_user=None, headers={"Content-Type": "application/json", "X-GBX-ADMIN-TOKEN": "test-admin-token-0123456789"})
    assert (response.status_code, error_code(response)) == (400, "invalid_request")
    from shared import store

    assert store.all_grants("b@example.com") == [] and store.all_grants("a@example.com") == []


def test_malformed_chunked_body_is_400(api: Api) -> None:
    import socket
    from urllib.parse import urlparse

    url = urlparse(api.base_url)
    token = api.token()
    request = (
        f"POST /api/entitlement/check HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {token}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nZZZ\r\n{}\r\n0\r\n\r\n"
    ).encode()
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(request)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    status_line, _, rest = reply.partition(b"\r\n")
    assert b" 400 " in status_line
    assert b'"code":"invalid_request"' in rest


@pytest.mark.parametrize("method", ["PROPFIND", "FOO", "TRACE"])
def test_any_unlisted_method_is_a_contract_405(api: Api, method: str) -> None:
    response = requests.request(method, api.base_url + "/api/entitlement/consume", timeout=30)
    assert (response.status_code, error_code(response)) == (405, "method_not_allowed")
    assert response.headers["Allow"] == "POST"


@pytest.mark.parametrize("path", ["/api/seal/public_keys", "/openapi.json", "/healthz"])
def test_head_on_a_get_endpoint_is_get_without_a_body(api: Api, path: str) -> None:
    get = requests.get(api.base_url + path, timeout=30)
    head = requests.head(api.base_url + path, timeout=30)
    assert (get.status_code, head.status_code) == (200, 200)
    assert head.content == b"" and get.content
    assert head.headers["Content-Type"] == get.headers["Content-Type"]


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({"Content-Type": "application/json", "Content-Encoding": "gzip"}, "Content-Encoding"),
        ({"Content-Type": "application/json", "Content-Encoding": "br"}, "Content-Encoding"),
        ({"Content-Type": "application/json; charset=utf-16"}, "UTF-8"),
        ({"Content-Type": "application/json; charset=latin-1"}, "UTF-8"),
    ],
)
def test_a_coding_or_charset_we_do_not_read_is_415(api: Api, headers: dict[str, str], reason: str) -> None:
    api.issue(RUNNER, 1)
    response = api.post("/api/entitlement/consume", data=b'{"run_id": "job-1"}', headers=headers)
    assert (response.status_code, error_code(response)) == (415, "unsupported_media_type")
    assert reason in response.json()["error"]["message"]
    assert api.check("job-1").json()["state"] == "new"  # nothing charged


@pytest.mark.parametrize("headers", [{"Content-Encoding": "identity"}, {"Content-Type": "application/json; charset=UTF-8"}])
def test_identity_coding_and_utf8_charset_are_accepted(api: Api, headers: dict[str, str]) -> None:
    api.issue(RUNNER, 1)
    response = api.post("/api/entitlement/check", data=b'{"run_id": "job-1"}', headers={"Content-Type": "application/json", **headers})
    assert response.status_code == 200, response.text


def test_a_gzip_coded_seal_upload_is_415(api: Api) -> None:
    svg = api.sealed_run()["seal_svg"]
    response = api.verify(svg, headers={"Content-Encoding": "gzip"})
    assert (response.status_code, error_code(response)) == (415, "unsupported_media_type")


@pytest.mark.parametrize("field", ["seal", "principal"])
def test_a_multipart_body_repeating_a_field_is_400(api: Api, field: str) -> None:
    svg = api.sealed_run()["seal_svg"].encode()
    files: list[tuple[str, Any]] = [("seal", ("seal.svg", svg, "image/svg+xml"))]
    files.append(("seal", ("seal.svg", svg, "image/svg+xml")) if field == "seal" else ("principal", (None, RUNNER)))
    if field == "principal":
        files.append(("principal", (None, RUNNER)))
    response = api.post("/api/entitlement/redeem_seal_once", files=files)
    assert (response.status_code, error_code(response)) == (400, "invalid_request")
    assert f"more than one `{field}`" in response.json()["error"]["message"]
    assert api.verify(svg).json()["redeemed"] is False


def test_log_lines_stay_whole_under_concurrent_requests(api: Api, capfd: pytest.CaptureFixture[str]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    api.issue(RUNNER, 10)
    capfd.readouterr()
    with ThreadPoolExecutor(max_workers=20) as pool:
        statuses = list(pool.map(lambda n: api.check(f"job-{n}").status_code, range(100)))
    assert statuses == [200] * 100
    out = capfd.readouterr().out
    lines = out.split("\n")
    assert lines[-1] == ""  # ends with a newline, and no line is empty or merged
    entries = [json.loads(line) for line in lines[:-1]]
    assert sum(1 for e in entries if e["endpoint"] == "check" and e["status"] == 200) == 100


def test_a_repeated_principal_query_parameter_is_400(api: Api) -> None:
    from tests.conftest import OPERATOR

    svg = api.sealed_run()["seal_svg"]
    response = api.redeem(svg, as_user=OPERATOR, params=[("principal", RUNNER), ("principal", "someone@else.example")])
    assert (response.status_code, error_code(response)) == (400, "invalid_request")
    assert api.verify(svg).json()["redeemed"] is False


def test_a_get_endpoint_allows_get_and_head(api: Api) -> None:
    response = requests.post(api.base_url + "/api/seal/public_keys", timeout=30)
    assert (response.status_code, error_code(response)) == (405, "method_not_allowed")
    assert response.headers["Allow"] == "GET, HEAD"


def test_a_stored_record_that_fails_its_model_is_a_500_not_the_callers_400(api: Api) -> None:
    from shared import store

    api.issue(RUNNER, 1)
    api.consume("job-1")
    # Damage the stored run (as a bad migration would): the caller's request is fine, so it is not a 400.
    store.client().collection(store.PRINCIPALS).document(RUNNER).collection(store.RUNS).document(store.run_doc_id("job-1")).update({"state": "lost"})
    response = api.check("job-1")
    assert (response.status_code, error_code(response)) == (500, "internal")
