"""Partner service: revoke unused runs of a grant, and the billing export of every grant the caller may see.

Who may see and change what (shared/auth.py names the callers): a partner only the grants it issued; the admin
(X-GBX-ADMIN-TOKEN) and operators every grant, bonus (`seal_rerun`) grants included. A grant the caller may not
see answers 404 exactly as an absent one, so grant ids do not leak across partners.
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import secrets
from typing import Any

from google.cloud.firestore import DocumentSnapshot

from shared import crossings, entitlements, errors, events, ledger_store, partner_store, store
from shared.auth import PartnerCaller
from shared.config import get_config
from shared.models import ExportQuery, ExportResponse, ExportRow, RevokeRequest, RevokeResponse, format_time
from shared.partner_store import REVOKE, IssuedGrant

CONSUME = "consume"
# The ledger reads of one export page run side by side (each is one aggregation query).
EXPORT_READERS = 16


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def may_see(caller: PartnerCaller, grant: IssuedGrant) -> bool:
    """A partner sees the grants it issued; the admin and operators every grant."""
    return caller.partner is None or grant.issued_by == caller.partner


def _takes(grant: IssuedGrant, runs: int) -> list[tuple[store.Grant, int]]:
    """Which documents give the runs: the fullest first, so a partial revoke touches (and races on) as few as it can."""
    takes = []
    for doc in sorted(grant.documents, key=lambda d: (-d.remaining, d.grant_id)):
        if runs == 0:
            break
        if doc.remaining > 0:
            take = min(runs, doc.remaining)
            takes.append((doc, take))
            runs -= take
    return takes


# Races a revoke loses to consumers before it fences the grant's documents (see partner_store.commit_fence).
FENCE_AFTER_LOST_RACES = 3


def revoke(caller: PartnerCaller, req: RevokeRequest, *, idempotency_key: str | None = None) -> RevokeResponse:
    """Take back all (or exactly `runs`) unused runs of one grant, in one commit with their ledger entries.

    The commit is preconditioned on every document it takes from, so under a fan-out on that very grant it can lose
    races to consumers; after a few, the revoke fences the documents (no consume can take from them meanwhile), and its
    next commit, which also lifts the fence, cannot lose to one. Whatever ends the request otherwise lifts the fence too.
    """
    fingerprint = entitlements.body_fingerprint(req)
    # One id for every attempt: a commit applied but unanswered is recognised on the re-read, never revoked twice.
    revoke_id = secrets.token_hex(16)
    if idempotency_key is not None:
        record_id = entitlements.idempotency_key_id(caller, "revoke", idempotency_key)
    else:
        record_id = store.sha256_hex(f"revoke|{revoke_id}")
    tried: list[RevokeResponse] = []
    fenced: list[IssuedGrant] = []

    def attempt() -> RevokeResponse:
        # At once, one round trip: the key's record (a replay answers from it), the balance and the grant's documents,
        # so that the window in which a consume can make this attempt lose its race is that one round trip.
        record, before, grant = store.at_once(
            lambda: partner_store.read_revocation(record_id) if idempotency_key is not None or tried else None,
            lambda: entitlements.balance_for(caller, req.principal),
            lambda: partner_store.read_grant(req.principal, req.grant_id, revoke_fields_only=True),
        )
        if record is not None:
            if record["fingerprint"] != fingerprint:
                raise errors.IdempotencyConflict()
            return RevokeResponse.model_validate({**record["response"], "replayed": record["revoke_id"] != revoke_id})
        if grant is None or not may_see(caller, grant):
            raise errors.NotFound(f"no grant {req.grant_id} of {req.principal}")
        if len(tried) >= FENCE_AFTER_LOST_RACES and not fenced:
            partner_store.commit_fence(grant, revoke_id=revoke_id, now=_now())
            fenced.append(grant)
            grant = partner_store.read_grant(req.principal, req.grant_id, revoke_fields_only=True)
            assert grant is not None, "a fence deletes nothing"
        unused = grant.remaining
        runs = unused if req.runs is None else req.runs
        if runs > unused:
            raise errors.NotEnoughRuns(f"the grant has {unused} unused runs, fewer than the {runs} asked for; nothing was revoked", remaining=unused)
        counted = grant.expires_at is None or grant.expires_at > _now()
        # As consume's: the balance read in this attempt, less what this commit takes (an expired grant counts for nothing).
        balance = before - (runs if counted else 0)
        response = RevokeResponse(
            grant_id=grant.grant_id, principal=req.principal, revoked=runs, remaining=unused - runs, balance=max(balance, 0), replayed=False
        )
        tried.append(response)
        takes = _takes(grant, runs)
        written = partner_store.written_by_revoke(grant, takes, revoke_id)
        now = _now()
        # The partner's crossing of its low line (and of 0), decided in this commit: see shared/events.py.
        closes = any(doc.remaining == taken for doc, taken in takes)
        guard = crossings.read_guard(req.principal, grant.issued_by, now, delta=-runs, closes=closes) if runs else None
        data = {"grant_id": grant.grant_id, "principal": req.principal, "revoked": runs, "remaining": unused - runs}

        def recorded(batch: Any) -> None:
            events.record(batch, type=events.GRANT_REVOKED, principal=req.principal, partner=grant.issued_by, data=data, ref=f"revoke|{revoke_id}", time=now)
            crossings.record_balance_change(batch, guard, delta=-runs, changed=written, ref=f"revoke|{revoke_id}", time=now)

        partner_store.commit_revoke(
            grant, takes, revoke_id=revoke_id, record_id=record_id, fingerprint=fingerprint, response=response.model_dump(mode="json"), extra=recorded
        )
        return response

    try:
        return store.optimistic(attempt)
    finally:
        if fenced:
            _lift_fence(req, revoke_id)


def _lift_fence(req: RevokeRequest, revoke_id: str) -> None:
    """After the revoke ended (its commit lifted the fence), or failed: lift what is left of its fence, best effort (the
    ledger audit lifts a fence older than partner_store.FENCE_SECONDS)."""
    with contextlib.suppress(Exception):
        grant = partner_store.read_grant(req.principal, req.grant_id)
        if grant is not None and revoke_id in grant.fenced.values():
            partner_store.commit_unfence(grant, revoke_id=revoke_id)


# ---------------------------------------------------------------- the export


def _page_key() -> bytes:
    """The key page tokens are signed with: derived from the admin token's secret (a deployment's one secret), so a
    token cannot be forged or moved to another caller's query. Rotating the admin token ends the pages in flight."""
    config = get_config()
    return hashlib.sha256(f"gbx export page tokens|{config.project}|{config.admin_token}".encode()).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _bound_to(caller: PartnerCaller, req: ExportQuery) -> bytes:
    """What a page token belongs to: the caller's view and the query's range."""
    return f"{caller.namespace}|{format_time(req.from_)}|{format_time(req.to)}".encode()


def page_token(caller: PartnerCaller, req: ExportQuery, last: tuple[dt.datetime, str]) -> str:
    """An opaque token for the page after `last` (created_at, document path) of this caller's query."""
    created_at, path = last
    payload = json.dumps({"v": 1, "after": [created_at.isoformat(), path]}, separators=(",", ":")).encode()
    mac = hmac.new(_page_key(), _bound_to(caller, req) + b"|" + payload, hashlib.sha256).digest()
    return f"{_b64(payload)}.{_b64(mac)}"


def read_page_token(caller: PartnerCaller, req: ExportQuery, token: str) -> tuple[dt.datetime, str]:
    """The cursor a page token carries; 400 for one that was altered, or that another caller or query was given."""
    invalid = errors.InvalidRequest("page_token: not a page token of this query (send the `next_page_token` of its previous page)")
    try:
        encoded_payload, _, encoded_mac = token.partition(".")
        payload, mac = _unb64(encoded_payload), _unb64(encoded_mac)
    except (ValueError, binascii.Error) as exc:
        raise invalid from exc
    expected = hmac.new(_page_key(), _bound_to(caller, req) + b"|" + payload, hashlib.sha256).digest()
    if not hmac.compare_digest(mac, expected):
        raise invalid
    created_at, path = json.loads(payload)["after"]
    return dt.datetime.fromisoformat(created_at), path


def _counts(grant: IssuedGrant, req: ExportQuery) -> tuple[int, int]:
    """Runs consumed and revoked from the grant with ledger `at` in [from, to).

    Every run that leaves a document is counted on it (`consumed`, `revoked`) in the commit that writes its ledger
    entry, which also sets `spent_at` to that commit's time, the entry's `at`. So the ledger is read only when the
    range cuts through the grant's activity, which lies between its issue (`created_at`) and `spent_at`.
    """
    if grant.remaining == grant.runs_total or (grant.spent_at is not None and grant.spent_at < req.from_):
        return 0, 0  # no run ever left it, or none since `from`
    inside = grant.created_at is not None and grant.spent_at is not None and grant.created_at >= req.from_ and grant.spent_at < req.to
    if inside and grant.consumed is not None and grant.revoked is not None:
        return grant.consumed, grant.revoked
    return ledger_store.ledger_runs(grant.grant_id, CONSUME, req.from_, req.to), ledger_store.ledger_runs(grant.grant_id, REVOKE, req.from_, req.to)


def _row(grant: IssuedGrant, req: ExportQuery) -> ExportRow:
    """One grant's row: its runs now, and the runs its ledger says were consumed and revoked in [from, to)."""
    consumed, revoked = _counts(grant, req)
    return ExportRow(
        principal=grant.principal,
        grant_id=grant.grant_id,
        plan_id=grant.plan_id,
        issued_by=grant.issued_by,
        runs_total=grant.runs_total,
        remaining=grant.remaining,
        expires_at=format_time(grant.expires_at) if grant.expires_at is not None else None,
        consumed=consumed,
        revoked=revoked,
        bonus=grant.plan_id == store.SEAL_RERUN_PLAN,
    )


def export(caller: PartnerCaller, req: ExportQuery) -> ExportResponse:
    """GET /api/entitlement/export: a page of rows, one per grant issued before `to`, in issue order.

    Pages are stable while grants are issued and spent: the order (issue time, then document path) never changes
    for a grant already issued, and a grant issued later sorts after every one already listed.
    """
    after = read_page_token(caller, req, req.page_token) if req.page_token is not None else None
    leads = partner_store.read_export_page(partner=caller.partner, before=req.to, after=after, limit=req.page_size + 1)
    more, leads = len(leads) > req.page_size, leads[: req.page_size]

    def row(lead: DocumentSnapshot) -> ExportRow:
        return _row(partner_store.issued_grant_of(lead), req)

    with concurrent.futures.ThreadPoolExecutor(max_workers=EXPORT_READERS) as pool:
        rows = list(pool.map(row, leads))
    last = leads[-1] if leads else None
    next_token = page_token(caller, req, ((last.to_dict() or {})["created_at"], last.reference.path)) if more and last is not None else None
    return ExportResponse.model_validate({"from": format_time(req.from_), "to": format_time(req.to), "rows": rows, "next_page_token": next_token})
