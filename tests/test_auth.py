"""Token attacks, each 401, through the production verifier with local test certificates."""

from __future__ import annotations

import base64
import json
import time

import google.auth.jwt
import pytest

from shared.local import LocalIssuer
from tests.conftest import AUDIENCE, RUNNER, Api, error_code


def _consume_with(api: Api, token: str) -> tuple[int, str]:
    response = api.post("/api/entitlement/consume", {"run_id": "job-1"}, as_user=None, headers={"Authorization": f"Bearer {token}"})
    return response.status_code, (error_code(response) if response.status_code != 200 else "")


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


@pytest.fixture
def funded(api: Api) -> Api:
    api.issue(RUNNER, 5)
    return api


def test_valid_token_is_accepted_and_email_lower_cased(funded: Api) -> None:
    token = funded.token("Runner@ACME-prod.iam.gserviceaccount.com")
    response = funded.post("/api/entitlement/consume", {"run_id": "job-1"}, as_user=None, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200 and response.json()["principal"] == RUNNER


def test_either_configured_audience_and_either_google_issuer_is_accepted(funded: Api) -> None:
    for claims in ({"audience": "https://other-service.example"}, {"iss": "accounts.google.com"}):
        assert _consume_with(funded, funded.token(**claims))[0] == 200


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": int(time.time()) - 120, "iat": int(time.time()) - 3720},
        {"audience": "https://attacker.example"},
        {"iss": "https://evil.example"},
        {"email_verified": False},
        {"email_verified": "true"},
        {"email": None},
        {"email": ""},
        {"email": "a/b@example.com"},
        {"iat": int(time.time()) + 3600, "exp": int(time.time()) + 7200},
    ],
    ids=["expired", "wrong-audience", "wrong-issuer", "email-unverified", "email-verified-string", "no-email", "empty-email", "slash-email", "issued-in-future"],
)
def test_bad_claims_are_401(funded: Api, claims: dict) -> None:
    assert _consume_with(funded, funded.token(**claims)) == (401, "unauthenticated")


def test_unknown_key_id_is_401(funded: Api, tmp_path) -> None:
    stranger = LocalIssuer(tmp_path / "stranger")
    token = stranger.token(RUNNER, audience=AUDIENCE)
    assert _consume_with(funded, token) == (401, "unauthenticated")


def test_key_id_of_trusted_key_with_foreign_signature_is_401(funded: Api, issuer: LocalIssuer, tmp_path) -> None:
    stranger = LocalIssuer(tmp_path / "stranger")
    forged = stranger.token(RUNNER, audience=AUDIENCE)
    header, payload, signature = forged.split(".")
    # Re-head the forged token with the trusted key id: the signature must still be checked.
    trusted_header = google.auth.jwt.decode_header(funded.token())
    header = _b64({**json.loads(base64.urlsafe_b64decode(header + "==")), "kid": trusted_header["kid"]})
    assert _consume_with(funded, f"{header}.{payload}.{signature}") == (401, "unauthenticated")


def test_bad_signature_is_401(funded: Api) -> None:
    header, payload, signature = funded.token().split(".")
    tampered_payload = _b64({**json.loads(base64.urlsafe_b64decode(payload + "==")), "email": "victim@example.com"})
    assert _consume_with(funded, f"{header}.{tampered_payload}.{signature}") == (401, "unauthenticated")
    flipped = signature[:-4] + ("AAAA" if not signature.endswith("AAAA") else "BBBB")
    assert _consume_with(funded, f"{header}.{payload}.{flipped}") == (401, "unauthenticated")


def test_alg_none_is_401(funded: Api) -> None:
    header, payload, _ = funded.token().split(".")
    unsigned_header = _b64({"alg": "none", "typ": "JWT", "kid": google.auth.jwt.decode_header(funded.token())["kid"]})
    assert _consume_with(funded, f"{unsigned_header}.{payload}.") == (401, "unauthenticated")
    assert _consume_with(funded, f"{_b64({'alg': 'none'})}.{payload}.") == (401, "unauthenticated")


def test_hs256_with_public_certificate_as_secret_is_401(funded: Api, issuer: LocalIssuer) -> None:
    header, payload, signature = funded.token().split(".")
    hs_header = _b64({"alg": "HS256", "typ": "JWT"})
    assert _consume_with(funded, f"{hs_header}.{payload}.{signature}") == (401, "unauthenticated")


@pytest.mark.parametrize("authorization", ["", "Bearer", "Bearer ", "Basic abc", "Bearer a.b", "Bearer ....", "Bearer !!!.???.###", "token"])
def test_malformed_authorization_is_401(funded: Api, authorization: str) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    response = funded.post("/api/entitlement/consume", {"run_id": "job-1"}, as_user=None, headers=headers)
    assert (response.status_code, error_code(response)) == (401, "unauthenticated")


def test_no_request_is_charged_by_a_rejected_token(funded: Api) -> None:
    _consume_with(funded, funded.token(audience="https://attacker.example"))
    assert funded.check("job-1").json() == {"run_id": "job-1", "principal": RUNNER, "available": True, "balance": 5, "state": "new"}


@pytest.mark.parametrize("segment", ["header", "payload"])
def test_deeply_nested_token_segments_are_401(funded: Api, segment: str) -> None:
    header, payload, signature = funded.token().split(".")
    deep = base64.urlsafe_b64encode(b"[" * 5000).rstrip(b"=").decode()
    token = f"{deep}.{payload}.{signature}" if segment == "header" else f"{header}.{deep}.{signature}"
    assert _consume_with(funded, token) == (401, "unauthenticated")


def test_oversized_token_is_401(funded: Api) -> None:
    assert _consume_with(funded, "a" * 20000 + ".b.c") == (401, "unauthenticated")


def test_a_verified_token_is_not_verified_again_until_it_expires(funded: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    from shared import auth

    decoded: list[str] = []
    real_decode = google.auth.jwt.decode

    def counting_decode(token: str, *args: object, **kwargs: object) -> object:
        decoded.append(token)
        return real_decode(token, *args, **kwargs)

    monkeypatch.setattr(google.auth.jwt, "decode", counting_decode)
    token = funded.token()
    for run in ("job-1", "job-2", "job-3"):
        assert funded.post("/api/entitlement/consume", {"run_id": run}, as_user=None, headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert decoded == [token]  # one RS256 check for three requests
    # A token that failed is never remembered: each attempt is checked (and refused) again.
    forged = token[:-5] + "AAAAA"
    assert _consume_with(funded, forged) == (401, "unauthenticated")
    assert _consume_with(funded, forged) == (401, "unauthenticated")
    assert decoded.count(forged) == 2
    # Another configuration (other audiences) does not reuse what this one verified.
    other = auth.get_config().model_copy(update={"audiences": ("https://elsewhere.example",)})
    with pytest.raises(auth.errors.Unauthenticated):
        auth.verify_id_token(token, other)


def test_the_verified_cache_forgets_at_exp_and_beyond_its_size() -> None:
    from shared import auth
    from shared.config import load_config

    config = load_config({"GBX_LOCAL_MODE": "1"})
    cache = auth.VerifiedTokens(size=2)
    alice = auth.Identity(principal="alice@example.com", operator=False)
    cache.put("expired", config, alice, time.time() - 1)
    assert cache.get("expired", config) is None
    for name in ("a", "b", "c"):
        cache.put(name, config, alice, time.time() + 60)
    assert [cache.get(name, config) for name in ("a", "b", "c")] == [None, alice, alice]
