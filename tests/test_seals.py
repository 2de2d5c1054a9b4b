"""Seals end to end: run_complete, verify, redeem_seal_once and public_keys over HTTP, KMS via its test server."""

from __future__ import annotations

import base64
import json
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from gbx_client.seal_format import b64url_decode, b64url_encode, canonical_json, parse_seal_svg, render_seal_svg
from shared import config, ledger_store, signing, store
from tests.conftest import IMAGE, OPERATOR, RUNNER, Api, error_code
from tests.kms_server import VERSION_1, VERSION_2, FakeKms

OTHER = "someone@else.example"


def _payload_of(svg: str) -> dict:
    return json.loads(b64url_decode(parse_seal_svg(svg.encode()).payload))


def _resign(kms: FakeKms, version: str, payload: bytes) -> bytes:
    """A genuine signature by a KMS-held key over any payload (what a forger with key access could make)."""
    signer = signing.KmsSigner(key_version=version, trusted_versions=[version], client=signing.kms_client(kms.endpoint))
    return signer.sign(payload).der


def test_lifecycle_to_a_seal(api: Api) -> None:
    bundle = api.sealed_run("job-1")
    assert set(bundle) == {"seal_id", "seal_json", "signature", "alg", "key", "public_key_pem", "seal_svg", "verify_link"}
    assert bundle["alg"] == "ES256" and bundle["key"] == VERSION_1
    assert len(b64url_decode(bundle["seal_id"])) >= 16
    claims = json.loads(bundle["seal_json"])
    assert canonical_json(claims).decode() == bundle["seal_json"]
    run = store.read_run(RUNNER, "job-1").record.model_dump()
    assert claims == {
        "v": 1,
        "seal_id": bundle["seal_id"],
        "run_id": "job-1",
        "principal": RUNNER,
        "project_id": "acme-prod",
        "container_image": IMAGE,
        "inputs_sha256": "ab" * 32,
        "outputs_sha256": "cd" * 32,
        "consumed_at": claims["consumed_at"],
        "started_at": claims["started_at"],
        "completed_at": claims["completed_at"],
        "issuer": "gbx-test",
        "key": VERSION_1,
    }
    assert claims["consumed_at"] < claims["started_at"] < claims["completed_at"]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z", claims[k]) for k in ("consumed_at", "started_at", "completed_at"))
    assert run["state"] == "completed" and run["seal_id"] == bundle["seal_id"]
    # The svg carries exactly this payload and signature.
    element = parse_seal_svg(bundle["seal_svg"].encode())
    assert b64url_decode(element.payload).decode() == bundle["seal_json"]
    assert b64url_decode(element.signature) == base64.b64decode(bundle["signature"])
    assert element.key == VERSION_1


def test_manifest_hash_is_sealed_when_given(api: Api) -> None:
    api.issue(RUNNER, 1)
    api.consume("job-1")
    api.run_start("job-1", run_manifest_sha256="EF" * 32)
    claims = json.loads(api.run_complete("job-1").json()["seal_json"])
    assert claims["run_manifest_sha256"] == "ef" * 32


def test_signature_verifies_independently(api: Api, kms: FakeKms, tmp_path: Path) -> None:
    bundle = api.sealed_run()
    der = base64.b64decode(bundle["signature"])
    assert bundle["public_key_pem"] == kms.public_pem(VERSION_1)
    key = load_pem_public_key(bundle["public_key_pem"].encode())
    key.verify(der, bundle["seal_json"].encode(), ec.ECDSA(hashes.SHA256()))  # raises if invalid
    (tmp_path / "public_key.pem").write_text(bundle["public_key_pem"])
    (tmp_path / "seal.sig").write_bytes(der)
    (tmp_path / "seal.json").write_bytes(bundle["seal_json"].encode())
    ok = subprocess.run(["openssl", "dgst", "-sha256", "-verify", "public_key.pem", "-signature", "seal.sig", "seal.json"], cwd=tmp_path, capture_output=True, text=True)
    assert ok.returncode == 0 and "Verified OK" in ok.stdout
    (tmp_path / "seal.json").write_bytes(bundle["seal_json"].replace("job-1", "job-2").encode())
    bad = subprocess.run(["openssl", "dgst", "-sha256", "-verify", "public_key.pem", "-signature", "seal.sig", "seal.json"], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 1


def test_run_complete_retry_returns_the_identical_bundle(api: Api) -> None:
    bundle = api.sealed_run()
    again = api.run_complete("job-1")
    assert again.status_code == 200 and again.json() == bundle
    conflict = api.run_complete("job-1", outputs_sha256="00" * 32)
    assert (conflict.status_code, error_code(conflict)) == (409, "run_state_conflict")
    started = api.run_start("job-1")
    assert (started.status_code, error_code(started)) == (409, "run_state_conflict")


def test_run_complete_before_start_is_422(api: Api) -> None:
    api.issue(RUNNER, 1)
    unknown = api.run_complete("job-1")
    assert (unknown.status_code, error_code(unknown)) == (422, "lifecycle_violation")
    api.consume("job-1")
    consumed = api.run_complete("job-1")
    assert (consumed.status_code, error_code(consumed)) == (422, "lifecycle_violation")
    bad = api.post("/api/entitlement/run_complete", {"run_id": "job-1", "outputs_sha256": "xyz"})
    assert (bad.status_code, error_code(bad)) == (400, "invalid_request")


@pytest.mark.parametrize("fault", ["unavailable", "bad_signature_crc", "unverified_digest", "wrong_name"])
def test_signing_failure_is_503_and_leaves_the_run_started(api: Api, kms: FakeKms, fault: str) -> None:
    api.issue(RUNNER, 1)
    api.consume("job-1")
    api.run_start("job-1")
    kms.set_fault(fault)
    failed = api.run_complete("job-1")
    assert (failed.status_code, error_code(failed)) == (503, "unavailable")
    assert failed.headers["Retry-After"].isdigit()
    assert store.read_run(RUNNER, "job-1").state == "started"
    kms.set_fault(None)
    retried = api.run_complete("job-1")
    assert retried.status_code == 200
    assert api.verify(retried.json()["seal_svg"]).json()["status"] == "VERIFIED"


def test_10_concurrent_run_completes_make_one_seal(api: Api) -> None:
    api.issue(RUNNER, 1)
    api.consume("job-1")
    api.run_start("job-1")
    with ThreadPoolExecutor(max_workers=10) as pool:
        responses = list(pool.map(lambda _: api.run_complete("job-1"), range(10)))
    assert [r.status_code for r in responses] == [200] * 10
    assert len({r.json()["seal_id"] for r in responses}) == 1
    assert len({json.dumps(r.json(), sort_keys=True) for r in responses}) == 1
    assert len(list(store.client().collection("seals").get())) == 1


def test_verify_a_genuine_seal(api: Api) -> None:
    bundle = api.sealed_run()
    for response in (api.verify(bundle["seal_svg"]), api.verify(bundle["seal_svg"], as_user=OTHER)):
        assert response.status_code == 200
        body = response.json()
        assert body["status"] == "VERIFIED"
        assert body["checks"] == {"document": "ok", "signature": "ok", "key": "ok", "record": "ok"}
        assert body["seal_id"] == bundle["seal_id"] and body["seal"] == json.loads(bundle["seal_json"])
        assert body["redeemed"] is False


def test_verify_multipart_upload(api: Api) -> None:
    bundle = api.sealed_run()
    files = {"seal": ("seal.svg", bundle["seal_svg"].encode(), "image/svg+xml")}
    response = api.post("/api/seal/verify", files=files)
    assert response.status_code == 200 and response.json()["status"] == "VERIFIED"
    missing = api.post("/api/seal/verify", files={"other": ("x.svg", b"<svg/>", "image/svg+xml")})
    assert (missing.status_code, error_code(missing)) == (400, "invalid_request")


def test_verify_needs_authentication_and_the_right_media_type(api: Api) -> None:
    bundle = api.sealed_run()
    anonymous = api.verify(bundle["seal_svg"], as_user=None)
    assert (anonymous.status_code, error_code(anonymous)) == (401, "unauthenticated")
    wrong_type = api.post("/api/seal/verify", data=bundle["seal_svg"], headers={"Content-Type": "application/json"})
    assert (wrong_type.status_code, error_code(wrong_type)) == (415, "unsupported_media_type")
    get = requests.get(api.base_url + "/api/seal/verify", timeout=30)
    assert (get.status_code, error_code(get)) == (405, "method_not_allowed")


def _invalid(api: Api, svg: str) -> dict:
    response = api.verify(svg)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "INVALID"
    return body["checks"]


def test_tampered_payload_is_invalid(api: Api) -> None:
    bundle = api.sealed_run()
    element = parse_seal_svg(bundle["seal_svg"].encode())
    claims = json.loads(bundle["seal_json"])
    forged = canonical_json({**claims, "outputs_sha256": "ee" * 32})
    svg = render_seal_svg(payload=forged, signature=b64url_decode(element.signature), key=element.key)
    checks = _invalid(api, svg)
    assert checks == {"document": "ok", "key": "ok", "signature": "signature does not match the payload", "record": "not checked"}


def test_swapped_signature_is_invalid(api: Api) -> None:
    first = api.sealed_run("job-1")
    second = api.sealed_run("job-2")
    svg = render_seal_svg(payload=first["seal_json"].encode(), signature=base64.b64decode(second["signature"]), key=VERSION_1)
    assert _invalid(api, svg)["signature"] == "signature does not match the payload"
    garbage = first["seal_svg"].replace(parse_seal_svg(first["seal_svg"].encode()).signature, "not*base64")
    assert _invalid(api, garbage)["signature"] == "signature is not base64url"


def test_untrusted_key_version_is_invalid(api: Api, kms: FakeKms) -> None:
    bundle = api.sealed_run()
    kms.add_version(VERSION_2)
    claims = {**json.loads(bundle["seal_json"]), "key": VERSION_2}
    payload = canonical_json(claims)
    svg = render_seal_svg(payload=payload, signature=_resign(kms, VERSION_2, payload), key=VERSION_2)
    checks = _invalid(api, svg)
    assert checks == {"document": "ok", "key": "key version is not trusted", "signature": "not checked", "record": "not checked"}


def test_validly_signed_seal_never_issued_is_invalid(api: Api, kms: FakeKms) -> None:
    bundle = api.sealed_run()
    claims = {**json.loads(bundle["seal_json"]), "seal_id": "never-issued-seal-0123456789"}
    payload = canonical_json(claims)
    svg = render_seal_svg(payload=payload, signature=_resign(kms, VERSION_1, payload), key=VERSION_1)
    assert _invalid(api, svg)["record"] == "no seal with this id was issued here"
    # Same seal_id as a real seal, other (validly signed) content: the record does not match.
    other = canonical_json({**json.loads(bundle["seal_json"]), "outputs_sha256": "ff" * 32})
    svg = render_seal_svg(payload=other, signature=_resign(kms, VERSION_1, other), key=VERSION_1)
    assert _invalid(api, svg)["record"] == "the issued seal differs from this payload"


def test_non_canonical_payload_is_invalid(api: Api, kms: FakeKms) -> None:
    bundle = api.sealed_run()
    claims = json.loads(bundle["seal_json"])
    for payload in (json.dumps(claims).encode(), json.dumps(claims, sort_keys=True, indent=1).encode()):
        svg = render_seal_svg(payload=payload, signature=_resign(kms, VERSION_1, payload), key=VERSION_1)
        assert _invalid(api, svg) == {"document": "payload is not canonical JSON", "key": "not checked", "signature": "not checked", "record": "not checked"}


def test_payload_lacking_claims_or_with_another_key_is_invalid(api: Api) -> None:
    bundle = api.sealed_run()
    claims = json.loads(bundle["seal_json"])
    del claims["outputs_sha256"]
    svg = render_seal_svg(payload=canonical_json(claims), signature=b"x", key=VERSION_1)
    assert _invalid(api, svg)["document"].startswith("payload lacks claims")
    element_key_differs = render_seal_svg(payload=bundle["seal_json"].encode(), signature=base64.b64decode(bundle["signature"]), key=VERSION_2)
    assert _invalid(api, element_key_differs)["document"] == "payload key differs from the seal element's key"


def test_changed_visible_text_still_verifies_because_only_metadata_is_trusted(api: Api) -> None:
    bundle = api.sealed_run()
    svg = bundle["seal_svg"]
    shown = "acme-prod"
    assert shown in svg
    # Rewrite every visible text node, keeping the metadata element intact.
    start, end = svg.index("<metadata>"), svg.index("</metadata>") + len("</metadata>")
    edited = svg[:start].replace(shown, "evil-project") + svg[start:end] + svg[end:].replace(shown, "evil-project")
    assert edited != svg and "evil-project" in edited
    body = api.verify(edited).json()
    assert body["status"] == "VERIFIED"
    assert body["seal"]["project_id"] == "acme-prod"  # the claims come from the signed payload, not the picture


@pytest.mark.parametrize(
    "document",
    [
        b"not xml at all",
        b'<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY xxe SYSTEM "file:///etc/passwd">]><svg xmlns="http://www.w3.org/2000/svg">&xxe;</svg>',
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;"><!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]><svg xmlns="http://www.w3.org/2000/svg">&lol3;</svg>',
        b'<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY a "' + b"x" * 20000 + b'">]><svg xmlns="http://www.w3.org/2000/svg">' + b"&a;" * 5000 + b"</svg>",
        b'<?xml version="1.0"?><!DOCTYPE svg SYSTEM "http://127.0.0.1:9/evil.dtd"><svg xmlns="http://www.w3.org/2000/svg"/>',
        b'<svg xmlns="http://www.w3.org/2000/svg">' + b"<g>" * 30000 + b"</g>" * 30000 + b"</svg>",
        b"<html><metadata/></html>",
        b'<svg xmlns="http://www.w3.org/2000/svg"><metadata/></svg>',
        b'<svg xmlns="http://www.w3.org/2000/svg"><metadata><seal xmlns="urn:other" version="1" alg="ES256" key="k" payload="p" signature="s"/></metadata></svg>',
    ],
    ids=["not-xml", "xxe", "billion-laughs", "quadratic-blowup", "external-dtd", "deep-nesting", "not-svg", "no-seal", "wrong-namespace"],
)
def test_hostile_documents_are_400(api: Api, document: bytes) -> None:
    response = api.verify(document)
    assert (response.status_code, error_code(response)) == (400, "invalid_seal")


def test_two_seals_are_400(api: Api) -> None:
    svg = api.sealed_run()["seal_svg"]
    start, end = svg.index("<metadata>"), svg.index("</metadata>") + len("</metadata>")
    doubled = svg[:end] + svg[start:end] + svg[end:]
    response = api.verify(doubled)
    assert (response.status_code, error_code(response)) == (400, "invalid_seal")


def test_seal_over_256_kib_is_413(api: Api) -> None:
    svg = api.sealed_run()["seal_svg"]
    padded = svg.replace("</svg>", "<!--" + "x" * (256 * 1024) + "--></svg>")
    for response in (api.verify(padded), api.post("/api/seal/verify", files={"seal": ("s.svg", padded.encode(), "image/svg+xml")})):
        assert (response.status_code, error_code(response)) == (413, "payload_too_large")


def test_key_rotation(api: Api, kms: FakeKms, monkeypatch: pytest.MonkeyPatch) -> None:
    old = api.sealed_run("job-1")
    kms.add_version(VERSION_2)

    def configure(signing_version: str, trusted: str) -> None:
        monkeypatch.setenv(config.ENV_KMS_KEY_VERSION, signing_version)
        monkeypatch.setenv(config.ENV_TRUSTED_KEY_VERSIONS, trusted)
        config.get_config.cache_clear()
        signing.get_signer.cache_clear()

    configure(VERSION_2, VERSION_1)  # rotated: v2 signs, v1 still trusted
    new = api.sealed_run("job-2")
    assert new["key"] == VERSION_2
    keys = requests.get(api.base_url + "/api/seal/public_keys", timeout=30).json()["keys"]
    assert [k["key"] for k in keys] == [VERSION_2, VERSION_1]
    assert api.verify(old["seal_svg"]).json()["status"] == "VERIFIED"
    assert api.verify(new["seal_svg"]).json()["status"] == "VERIFIED"
    configure(VERSION_2, "")  # v1 retired
    body = api.verify(old["seal_svg"]).json()
    assert body["status"] == "INVALID" and body["checks"]["key"] == "key version is not trusted"
    assert api.verify(new["seal_svg"]).json()["status"] == "VERIFIED"
    config.get_config.cache_clear()
    signing.get_signer.cache_clear()


def test_public_keys(api: Api, kms: FakeKms) -> None:
    response = requests.get(api.base_url + "/api/seal/public_keys", timeout=30)
    assert response.status_code == 200
    body = response.json()
    assert body["keys"] == [{"key": VERSION_1, "alg": "ES256", "pem": kms.public_pem(VERSION_1)}]
    # The seal log's origin and checkpoint key (its own Ed25519 key, never the seal key): see test_sealog.py.
    assert set(body["log"]) == {"origin", "vkey"} and body["log"]["vkey"].startswith("gbx-test.example/log+")
    for _ in range(3):
        requests.get(api.base_url + "/api/seal/public_keys", timeout=30)
    assert kms.calls["GetPublicKey"] == 2  # the seal key and the log key: each fetched once, then cached
    post = requests.post(api.base_url + "/api/seal/public_keys", timeout=30)
    assert (post.status_code, error_code(post)) == (405, "method_not_allowed")


def test_redeem_once(api: Api) -> None:
    bundle = api.sealed_run()
    assert api.check("next").status_code == 402
    first = api.redeem(bundle["seal_svg"])
    assert first.status_code == 200
    grant_id = first.json()["grant_id"]
    assert first.json() == {"seal_id": bundle["seal_id"], "principal": RUNNER, "granted_runs": 1, "grant_id": grant_id, "balance": 1, "replayed": False}
    second = api.redeem(bundle["seal_svg"])
    assert (second.status_code, error_code(second)) == (409, "already_redeemed")
    # The 409 says when the pair was redeemed and which grant it gave, so a caller can tell it was its own.
    assert second.json()["error"]["grant_id"] == grant_id
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", second.json()["error"]["redeemed_at"])
    assert api.verify(bundle["seal_svg"], as_user=OTHER).json()["redeemed"] is True
    grants = [g for g in store.all_grants(RUNNER) if g["plan_id"] == "seal_rerun"]
    assert [g["grant_id"] for g in grants] == [grant_id]
    assert [(g["runs_total"], g["remaining"], g["expires_at"]) for g in grants] == [(1, 1, None)]
    assert sum(e["delta"] for e in ledger_store.ledger_for_grant(grants[0]["grant_id"])) == 1
    assert api.consume("bonus-run").status_code == 200


def test_redeem_of_a_seal_that_does_not_verify_is_422(api: Api) -> None:
    bundle = api.sealed_run()
    claims = json.loads(bundle["seal_json"])
    forged = render_seal_svg(payload=canonical_json({**claims, "run_id": "x"}), signature=base64.b64decode(bundle["signature"]), key=VERSION_1)
    response = api.redeem(forged)
    assert (response.status_code, error_code(response)) == (422, "seal_invalid")
    assert not [g for g in store.all_grants(RUNNER) if g["plan_id"] == "seal_rerun"]


def test_users_redeem_only_their_own_seals(api: Api) -> None:
    bundle = api.sealed_run()
    stranger = api.redeem(bundle["seal_svg"], as_user=OTHER)
    assert (stranger.status_code, error_code(stranger)) == (403, "forbidden")
    naming = api.redeem(bundle["seal_svg"], as_user=OTHER, params={"principal": RUNNER})
    assert (naming.status_code, error_code(naming)) == (403, "forbidden")
    assert api.redeem(bundle["seal_svg"], params={"principal": RUNNER}).status_code == 200


def test_operators_redeem_for_the_seal_principal(api: Api) -> None:
    bundle = api.sealed_run()
    wrong = api.redeem(bundle["seal_svg"], as_user=OPERATOR, params={"principal": OTHER})
    assert (wrong.status_code, error_code(wrong)) == (403, "forbidden")
    # The multipart field wins over the query parameter.
    files = {"seal": ("seal.svg", bundle["seal_svg"].encode(), "image/svg+xml")}
    response = api.post("/api/entitlement/redeem_seal_once", as_user=OPERATOR, files=files, data={"principal": RUNNER}, params={"principal": OTHER})
    assert response.status_code == 200 and response.json()["principal"] == RUNNER
    again = api.redeem(bundle["seal_svg"], as_user=OPERATOR)  # defaults to the seal's principal
    assert (again.status_code, error_code(again)) == (409, "already_redeemed")
    bad = api.redeem(bundle["seal_svg"], as_user=OPERATOR, params={"principal": "not an email"})
    assert (bad.status_code, error_code(bad)) == (400, "invalid_request")
    # An empty multipart field still wins over the query parameter (and is invalid).
    empty = api.post("/api/entitlement/redeem_seal_once", as_user=OPERATOR, files=files, data={"principal": ""}, params={"principal": RUNNER})
    assert (empty.status_code, error_code(empty)) == (400, "invalid_request")
    # verify ignores a principal it does not use.
    assert api.verify(bundle["seal_svg"], params={"principal": "\xff"}).status_code == 200


def test_20_concurrent_redeems_grant_one_run(api: Api) -> None:
    bundle = api.sealed_run()
    with ThreadPoolExecutor(max_workers=20) as pool:
        responses = list(pool.map(lambda _: api.redeem(bundle["seal_svg"]), range(20)))
    assert sorted(r.status_code for r in responses) == [200] + [409] * 19
    assert all(error_code(r) == "already_redeemed" for r in responses if r.status_code == 409)
    reruns = [g for g in store.all_grants(RUNNER) if g["plan_id"] == "seal_rerun"]
    assert len(reruns) == 1
    assert [e["reason"] for e in ledger_store.ledger_for_principal(RUNNER)].count("seal_rerun") == 1
    assert len(list(store.client().collection("redemptions").get())) == 1


def test_seal_ids_are_unguessable_and_url_safe(api: Api) -> None:
    api.issue(RUNNER, 3)
    ids = set()
    for n in range(3):
        api.consume(f"j{n}")
        api.run_start(f"j{n}")
        ids.add(api.run_complete(f"j{n}").json()["seal_id"])
    assert len(ids) == 3
    for seal_id in ids:
        assert re.fullmatch(r"[A-Za-z0-9_-]{32}", seal_id) and b64url_encode(b64url_decode(seal_id)) == seal_id


def test_high_s_twin_of_a_genuine_signature_is_invalid(api: Api) -> None:
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

    bundle = api.sealed_run()
    r, s = decode_dss_signature(base64.b64decode(bundle["signature"]))
    order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # P-256 group order
    twin = encode_dss_signature(r, order - s)
    key = load_pem_public_key(bundle["public_key_pem"].encode())
    key.verify(twin, bundle["seal_json"].encode(), ec.ECDSA(hashes.SHA256()))  # mathematically valid too
    svg = render_seal_svg(payload=bundle["seal_json"].encode(), signature=twin, key=VERSION_1)
    assert _invalid(api, svg) == {"document": "ok", "key": "ok", "signature": "ok", "record": "the issued seal has another signature"}


def test_a_bonus_rerun_seal_cannot_be_redeemed(api: Api) -> None:
    bundle = api.sealed_run("paid")
    assert api.redeem(bundle["seal_svg"]).status_code == 200
    for step in (api.consume("bonus"), api.run_start("bonus"), api.run_complete("bonus")):
        assert step.status_code == 200
    rerun_seal = step.json()["seal_svg"]
    assert api.verify(rerun_seal).json()["status"] == "VERIFIED"
    response = api.redeem(rerun_seal)
    assert (response.status_code, error_code(response)) == (403, "forbidden")
    assert [g["plan_id"] for g in store.all_grants(RUNNER) if g["plan_id"] == "seal_rerun"] == ["seal_rerun"]


def test_completed_bundle_survives_its_key_leaving_kms(api: Api, kms: FakeKms, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = api.sealed_run()
    kms.add_version(VERSION_2)
    monkeypatch.setenv(config.ENV_KMS_KEY_VERSION, VERSION_2)
    config.get_config.cache_clear()
    signing.get_signer.cache_clear()
    kms.set_fault("unavailable")  # KMS down entirely: a retry of a completed run still gets its bundle
    again = api.run_complete("job-1")
    assert again.status_code == 200 and again.json() == bundle
    kms.set_fault(None)
    config.get_config.cache_clear()
    signing.get_signer.cache_clear()


def test_verify_fetches_only_the_key_version_it_needs(api: Api, kms: FakeKms, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = api.sealed_run()
    monkeypatch.setenv(config.ENV_TRUSTED_KEY_VERSIONS, f"{VERSION_1},{VERSION_2}")  # v2 does not exist in KMS
    config.get_config.cache_clear()
    signing.get_signer.cache_clear()
    assert api.verify(bundle["seal_svg"]).json()["status"] == "VERIFIED"
    assert ("GetPublicKey", VERSION_2) not in kms.requests
    listing = requests.get(api.base_url + "/api/seal/public_keys", timeout=30)
    assert (listing.status_code, error_code(listing)) == (503, "unavailable")  # an honest 503, not a partial list
    config.get_config.cache_clear()
    signing.get_signer.cache_clear()


def test_verify_lists_checks_in_the_order_they_run(api: Api) -> None:
    bundle = api.sealed_run()
    response = api.verify(bundle["seal_svg"])
    assert list(response.json()["checks"]) == ["document", "key", "signature", "record"]
    assert '"checks":{"document":"ok","key":"ok","signature":"ok","record":"ok"}' in response.text


def test_a_redeemed_seal_with_a_forged_signature_is_not_reported_redeemed(api: Api) -> None:
    bundle = api.sealed_run()
    assert api.redeem(bundle["seal_svg"]).status_code == 200
    der = base64.b64decode(bundle["signature"])
    forged = render_seal_svg(payload=bundle["seal_json"].encode(), signature=der[:-1] + bytes([der[-1] ^ 1]), key=bundle["key"])
    body = api.verify(forged).json()
    assert body["status"] == "INVALID" and body["checks"]["signature"] == "signature does not match the payload"
    # The claims still name a redeemed seal, but an upload that does not verify says nothing about it.
    assert body["redeemed"] is False
    assert api.verify(bundle["seal_svg"]).json()["redeemed"] is True


def test_redeem_with_an_idempotency_key_replays_and_refuses_another_seal(api: Api) -> None:
    first_seal = api.sealed_run("job-1")["seal_svg"]
    second_seal = api.sealed_run("job-2")["seal_svg"]
    first = api.redeem(first_seal, headers={"Idempotency-Key": "bonus-1"})
    assert first.status_code == 200 and first.json()["replayed"] is False
    replay = api.redeem(first_seal, headers={"Idempotency-Key": "bonus-1"})
    assert replay.status_code == 200 and replay.json() == {**first.json(), "replayed": True}
    other = api.redeem(second_seal, headers={"Idempotency-Key": "bonus-1"})
    assert (other.status_code, error_code(other)) == (409, "idempotency_conflict")
    assert api.verify(second_seal).json()["redeemed"] is False
    # A new key redeems the other seal.
    assert api.redeem(second_seal, headers={"Idempotency-Key": "bonus-2"}).status_code == 200
    assert len([g for g in store.all_grants(RUNNER) if g["plan_id"] == "seal_rerun"]) == 2


def test_concurrent_redeems_with_one_key_grant_one_run_and_all_answer_200(api: Api) -> None:
    svg = api.sealed_run()["seal_svg"]
    with ThreadPoolExecutor(max_workers=20) as pool:
        responses = list(pool.map(lambda _: api.redeem(svg, headers={"Idempotency-Key": "k"}), range(20)))
    assert [r.status_code for r in responses] == [200] * 20
    assert sorted(r.json()["replayed"] for r in responses) == [False] + [True] * 19
    assert len({r.json()["grant_id"] for r in responses}) == 1
    assert len([g for g in store.all_grants(RUNNER) if g["plan_id"] == "seal_rerun"]) == 1


def test_redeem_keys_belong_to_the_caller_not_to_the_seal_owner(api: Api) -> None:
    by_operator = api.sealed_run("job-1")["seal_svg"]
    by_runner = api.sealed_run("job-2")["seal_svg"]
    operator = api.redeem(by_operator, as_user=OPERATOR, headers={"Idempotency-Key": "job-43"})
    assert operator.status_code == 200 and operator.json()["principal"] == RUNNER
    # The runner never sent this key: its first request with it is its own, not a conflict with the operator's.
    runner = api.redeem(by_runner, headers={"Idempotency-Key": "job-43"})
    assert runner.status_code == 200 and runner.json()["replayed"] is False
    assert runner.json()["grant_id"] != operator.json()["grant_id"]
    # And each caller's replay is its own first answer.
    assert api.redeem(by_operator, as_user=OPERATOR, headers={"Idempotency-Key": "job-43"}).json() == {**operator.json(), "replayed": True}
    assert api.redeem(by_runner, headers={"Idempotency-Key": "job-43"}).json() == {**runner.json(), "replayed": True}
