"""Seal service: run_complete signs a seal; verify, redeem_seal_once and public_keys read it."""

from __future__ import annotations

import base64
import datetime as dt
import secrets
from dataclasses import dataclass
from typing import Any

from gbx_client.seal_format import (
    SealClaims,
    SealDocumentInvalid,
    SealPayloadInvalid,
    SealTooLarge,
    b64url_decode,
    canonical_json,
    decode_payload,
    read_seal_element,
    render_seal_svg,
    verify_link,
)
from shared import crossings, errors, events, sealog, store
from shared.auth import Identity
from shared.config import get_config
from shared.entitlements import current_balance
from shared.models import (
    PublicKeyInfo,
    PublicKeysResponse,
    RedeemResponse,
    RedeemUpload,
    RunCompleteRequest,
    SealBundle,
    SealUpload,
    VerifyChecks,
    VerifyResponse,
    format_time,
)
from shared.signing import PublicKey, Signer, get_signer, verify_signature

OK = "ok"
NOT_CHECKED = "not checked"
SEAL_ID_BYTES = 24  # 192 random bits
CHECK_ORDER = ("document", "key", "signature", "record")  # the contract's verification order


def _bundle(record: dict[str, Any]) -> SealBundle:
    """The seal bundle of a seal record; deterministic, so a retry returns identical bytes."""
    der = base64.b64decode(record["signature"])
    payload = record["payload"].encode()
    link = verify_link(get_config().public_url, payload=payload, signature=der)
    return SealBundle(
        seal_id=record["seal_id"],
        seal_json=record["payload"],
        signature=record["signature"],
        alg=record["alg"],
        key=record["key"],
        public_key_pem=record["public_key_pem"],
        seal_svg=render_seal_svg(payload=payload, signature=der, key=record["key"], alg=record["alg"], link=link),
        verify_link=link,
    )


def _sign_seal(principal: str, run: store.Run, outputs_sha256: str) -> tuple[dict[str, Any], dt.datetime]:
    """Build seal.json for a started run and sign it (KMS, outside any commit); returns the seal record."""
    signer = get_signer()
    data = run.record
    assert data.started_at is not None and data.project_id and data.container_image and data.inputs_sha256
    completed_at = dt.datetime.now(dt.UTC)
    claims = SealClaims(
        v=1,
        seal_id=secrets.token_urlsafe(SEAL_ID_BYTES),
        run_id=run.run_id,
        principal=principal,
        project_id=data.project_id,
        container_image=data.container_image,
        inputs_sha256=data.inputs_sha256,
        outputs_sha256=outputs_sha256,
        consumed_at=format_time(data.consumed_at),
        started_at=format_time(data.started_at),
        completed_at=format_time(completed_at),
        issuer=get_config().issuer,
        key=signer.key_version,
        # An absent manifest is left out of seal.json, not null: every claim of a seal is a string (or v).
        run_manifest_sha256=data.run_manifest_sha256 or None,
    )
    payload = canonical_json(claims.as_dict())
    signature = signer.sign(payload)
    record = {
        "seal_id": claims.seal_id,
        "principal": principal,
        "run_id": run.run_id,
        "payload": payload.decode(),
        "signature": base64.b64encode(signature.der).decode(),
        "key": signature.key,
        "alg": signature.alg,
        # Kept with the seal so that its bundle never depends on KMS again, even after the version is retired.
        "public_key_pem": _signing_public_key(signer, signature.key).pem,
        # A bonus rerun's seal is not redeemable: otherwise one purchase would chain into endless free runs.
        "redeemable": data.plan_id != store.SEAL_RERUN_PLAN,
    }
    return record, completed_at


def _signing_public_key(signer: Signer, key: str) -> PublicKey:
    """The signing version's public key (it is always trusted)."""
    public_key = signer.public_key(key)
    if public_key is None:
        raise RuntimeError(f"the signing key version {key} is not trusted")
    return public_key


def run_complete(caller: Identity, req: RunCompleteRequest) -> SealBundle:
    """Complete a started run and return its seal; a retry (or a concurrent twin) gets the same seal."""
    principal = caller.principal
    signed: list[tuple[dict[str, Any], dt.datetime]] = []

    def attempt() -> SealBundle:
        run = store.read_run(principal, req.run_id)
        if run is None or run.state == "consumed":
            raise errors.LifecycleViolation(f"run_id {req.run_id!r} was not started by this principal")
        if run.state == "completed":
            # Ours (a commit applied, reply lost) or a concurrent twin's: the same bundle either way.
            if run.record.outputs_sha256 != req.outputs_sha256:
                raise errors.RunStateConflict(f"run_id {req.run_id!r} was completed with other outputs")
            existing = store.read_seal(run.record.seal_id or "")
            if existing is None:
                raise RuntimeError(f"completed run {req.run_id!r} has no seal record")
            return _bundle(existing)
        if not signed:
            # Signed once, before the commit: a KMS failure leaves the run started (503, retry succeeds).
            signed.append(_sign_seal(principal, run, req.outputs_sha256))
        record, completed_at = signed[0]
        bundle = _bundle(record)
        partner = crossings.run_partner(principal, run.record) if events.enabled() else None
        data = {"run_id": run.run_id, "principal": principal, "seal_id": bundle.seal_id, "verify_link": bundle.verify_link}

        def sealed(batch: Any) -> None:
            events.record(batch, type=events.RUN_SEALED, principal=principal, partner=partner, data=data, ref=bundle.seal_id, time=completed_at)

        store.commit_run_complete(principal, run, outputs_sha256=req.outputs_sha256, completed_at=completed_at, seal=record, extra=sealed)
        return bundle

    bundle = store.optimistic(attempt)
    # The seal's log entry was created with it: sequenced after this answer, never before it (see shared/sealog.py).
    sealog.integrate_in_background(bundle.seal_id)
    return bundle


@dataclass(frozen=True)
class Verification:
    """The outcome of verifying a seal.svg."""

    checks: VerifyChecks
    claims: dict[str, Any]
    record: dict[str, Any] | None
    # The seal's own principal's redemption of it, read with the record (None when absent or not read).
    redemption: dict[str, Any] | None = None

    @property
    def verified(self) -> bool:
        """True only when every check passed."""
        return all(value == OK for value in self.checks.model_dump().values())

    def first_failure(self) -> str:
        """The first failing check, as `name: reason`."""
        checks = self.checks.model_dump()
        return next(f"{name}: {checks[name]}" for name in CHECK_ORDER if checks[name] != OK)


def verify_seal(svg: bytes, link: str | None = None) -> Verification:
    """Run the contract's checks in order, on a seal.svg or a verification link; each failure is reported by name and stops the later checks."""
    checks = {"document": NOT_CHECKED, "key": NOT_CHECKED, "signature": NOT_CHECKED, "record": NOT_CHECKED}
    claims: dict[str, Any] = {}
    record: dict[str, Any] | None = None
    redemption: dict[str, Any] | None = None

    def done() -> Verification:
        return Verification(checks=VerifyChecks(**checks), claims=claims, record=record, redemption=redemption)

    try:
        # A link is a seal too, once its fragment is inflated: a tampered one is INVALID, not a 400.
        element = read_seal_element(svg=svg, link=link)
        claims, payload = decode_payload(element.payload)
    except SealTooLarge as exc:
        raise errors.PayloadTooLarge(str(exc)) from exc
    except SealDocumentInvalid as exc:
        raise errors.InvalidSeal(exc.reason) from exc
    except SealPayloadInvalid as exc:
        checks["document"] = exc.reason
        return done()
    if claims["key"] != element.key:
        checks["document"] = "payload key differs from the seal element's key"
        return done()
    checks["document"] = OK
    public_key = get_signer().public_key(element.key)
    if public_key is None:
        checks["key"] = "key version is not trusted"
        return done()
    checks["key"] = OK
    try:
        der = b64url_decode(element.signature)
    except ValueError:
        checks["signature"] = "signature is not base64url"
        return done()
    if not verify_signature(public_key, payload, der):
        checks["signature"] = "signature does not match the payload"
        return done()
    checks["signature"] = OK
    # The redemption with the record, in one round trip: verify answers `redeemed` from it.
    record, redemption = store.read_seal_and_redemption(claims["seal_id"], claims["principal"])
    if record is None:
        checks["record"] = "no seal with this id was issued here"
    elif record["payload"].encode() != payload:
        checks["record"] = "the issued seal differs from this payload"
    elif base64.b64decode(record["signature"]) != der:
        # ECDSA signatures are malleable ((r, s) and (r, n - s) both verify): only the issued one counts.
        checks["record"] = "the issued seal has another signature"
    else:
        checks["record"] = OK
    return done()


def verify(caller: Identity, upload: SealUpload) -> VerifyResponse:
    """Verify an uploaded seal.svg or verification link for any authenticated caller."""
    result = verify_seal(upload.svg, upload.link)
    seal_id: str | None = result.claims.get("seal_id")
    # Only a seal that verifies is a seal of ours: an INVALID upload's claims say nothing about redemptions.
    redeemed = result.verified and seal_id is not None and result.redemption is not None
    return VerifyResponse(
        status="VERIFIED" if result.verified else "INVALID",
        seal_id=seal_id,
        checks=result.checks,
        seal=result.claims,
        redeemed=redeemed,
    )


def redeem_seal_once(caller: Identity, upload: RedeemUpload, *, idempotency_key: str | None = None) -> RedeemResponse:
    """Grant one bonus run for a verified seal, once per (principal, seal)."""
    result = verify_seal(upload.svg, upload.link)
    if not result.verified:
        raise errors.SealInvalid(f"the seal does not verify ({result.first_failure()})")
    seal_id = result.claims["seal_id"]
    owner = result.claims["principal"]
    named = upload.principal
    if caller.operator:
        principal = named or owner
    elif named not in (None, caller.principal):
        raise errors.Forbidden("only operators may name a principal")
    else:
        principal = caller.principal
    if principal != owner:
        raise errors.Forbidden("this seal belongs to another principal")
    assert result.record is not None  # a verified seal has its record
    if not result.record.get("redeemable", True):
        raise errors.Forbidden("the seal of a bonus rerun cannot be redeemed")
    # One grant id for every attempt: our own applied commit reads back as ours.
    grant_id = secrets.token_hex(16)
    # The caller's key, not the seal owner's: an operator's keys and the customer's never collide.
    key_hash = store.redemption_key_id(caller.principal, idempotency_key) if idempotency_key is not None else None
    tried: list[RedeemResponse] = []

    def attempt() -> RedeemResponse:
        # The redemption and the key at one read time: both are created in one commit, so a redemption made with
        # this key shows with its key record (read apart, the key first could 409 a twin).
        (redemption, first), balance = store.at_once(
            lambda: store.read_redemption_and_key(principal, seal_id, key_hash), lambda: current_balance(principal)
        )
        if first is not None:
            if first["seal_id"] != seal_id:
                raise errors.IdempotencyConflict("this Idempotency-Key was used to redeem another seal")
            return RedeemResponse.model_validate({**first["response"], "replayed": first["grant_id"] != grant_id})
        if redemption is not None:
            if redemption["grant_id"] == grant_id and tried:
                return tried[-1]
            raise errors.AlreadyRedeemed(redeemed_at=format_time(redemption["at"]), grant_id=redemption["grant_id"])
        # The balance read before the commit plus the run it grants, as issue answers.
        response = RedeemResponse(seal_id=seal_id, principal=principal, granted_runs=1, grant_id=grant_id, balance=balance + 1, replayed=False)
        tried.append(response)
        data = {"seal_id": seal_id, "principal": principal, "grant_id": grant_id}

        def redeemed(batch: Any) -> None:
            # Its grant is the bonus grant: no partner.
            events.record(batch, type=events.SEAL_REDEEMED, principal=principal, partner=None, data=data, ref=seal_id)

        store.commit_redeem(principal, seal_id, grant_id, key_hash=key_hash, response=response.model_dump(mode="json"), extra=redeemed)
        return response

    return store.optimistic(attempt)


def public_keys() -> PublicKeysResponse:
    """The trusted seal signing keys, for offline verification."""
    keys = [PublicKeyInfo.model_validate({"key": k.key, "alg": k.alg, "pem": k.pem}) for k in get_signer().public_keys()]
    try:
        log = sealog.log_key_info()
    except RuntimeError:
        log = None  # a deployment without a log key (GBX_LOG_KEY_VERSION unset) publishes none; it logs why when integrating
    return PublicKeysResponse(keys=keys, log=log)
