"""Entitlement service: issue grants, check availability, consume runs (balances and the ledger)."""

from __future__ import annotations

import datetime as dt
import json
import random
import secrets

from shared import errors, store
from shared.auth import Admin, Identity
from shared.models import (
    CheckRequest,
    CheckResponse,
    ConsumeRequest,
    ConsumeResponse,
    IssueRequest,
    IssueResponse,
    format_time,
)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def spendable_grants(grants: list[store.Grant], now: dt.datetime) -> list[store.Grant]:
    """Usable grants in spending order: earliest expiry first, never-expiring last, then oldest first."""
    far = dt.datetime.max.replace(tzinfo=dt.UTC)
    usable = [g for g in grants if g.usable(now)]
    return sorted(usable, key=lambda g: (g.expires_at or far, g.created_at or far, g.group, g.grant_id))


def grant_to_spend(grants: list[store.Grant]) -> store.Grant:
    """The grant to charge: the first in spending order, or any shard of it, so concurrent consumers spread out."""
    first = grants[0]
    return random.choice([g for g in grants if g.group == first.group])


def current_balance(principal: str) -> int:
    """Sum of unused runs of the principal's unexpired grants."""
    return sum(g.remaining for g in spendable_grants(store.read_grants_with_runs_left(principal), _now()))


def check(caller: Identity, req: CheckRequest) -> CheckResponse:
    """May this run_id run now? Writes nothing."""
    # Grants before the run: a run missing *after* an empty balance was read was missing then too,
    # so a concurrent consume of this very run_id can never make us answer 402.
    balance = current_balance(caller.principal)
    run = store.read_run(caller.principal, req.run_id)
    if run is not None and run.state != "consumed":
        raise errors.RunIdReused(f"run_id {req.run_id!r} is already {run.state}", state=run.state)
    if run is None and balance < 1:
        raise errors.EntitlementExhausted()
    return CheckResponse(
        run_id=req.run_id, principal=caller.principal, available=True, balance=balance, state="new" if run is None else "consumed"
    )


def consume(caller: Identity, req: ConsumeRequest) -> ConsumeResponse:
    """Charge one run for run_id, exactly once however often and however concurrently it is asked."""
    principal = caller.principal
    # Marks this request's charge, so that its own commit, applied but unanswered, reads back as not replayed.
    charge_id = secrets.token_hex(12)

    def attempt() -> ConsumeResponse:
        # Grants before the run (see check): a retry racing its twin for the last run replays, never 402s.
        grants = spendable_grants(store.read_grants_with_runs_left(principal), _now())
        run = store.read_run(principal, req.run_id)
        if run is not None:
            # Our own charge (applied, reply lost) is ours whatever happened to the run since.
            replayed = run.record.charge_id != charge_id
            if replayed and run.state != "consumed":
                raise errors.RunIdReused(f"run_id {req.run_id!r} is already {run.state}", state=run.state)
            # The grants read just above are the current balance: no second read.
            balance = sum(g.remaining for g in grants)
            return ConsumeResponse(run_id=req.run_id, principal=principal, balance=balance, state="consumed", replayed=replayed)
        if not grants:
            raise errors.EntitlementExhausted()
        grant = grant_to_spend(grants)
        store.commit_consume(principal, req.run_id, grant, charge_id=charge_id, consumed_at=_now())
        if sum(g.group == grant.group for g in grants) == 1:
            # The commit was preconditioned on this grant as read: the balance after it is exact for it.
            balance = sum(g.remaining for g in grants) - 1
        else:
            # Shards of one grant commit independently: read the balance again rather than overstate it.
            balance = current_balance(principal)
        return ConsumeResponse(run_id=req.run_id, principal=principal, balance=balance, state="consumed", replayed=False)

    return store.optimistic(attempt)


def _fingerprint(req: IssueRequest) -> str:
    """A stable hash of the parsed body: equal for requests that mean the same thing."""
    return store.sha256_hex(json.dumps(req.model_dump(mode="json"), sort_keys=True, separators=(",", ":")))


def _replay(record: dict, fingerprint: str, grant_id: str) -> IssueResponse:
    """The first response for an idempotency key (not a replay if it was this request's), or 409 when this body differs."""
    if record["fingerprint"] != fingerprint:
        raise errors.IdempotencyConflict()
    return IssueResponse.model_validate({**record["response"], "replayed": record["grant_id"] != grant_id})


def issue(caller: Admin, req: IssueRequest, *, idempotency_key: str | None = None) -> IssueResponse:
    """Issue runs to a principal; with an Idempotency-Key, at most once per key."""
    fingerprint = _fingerprint(req)
    key_hash = store.sha256_hex(idempotency_key) if idempotency_key is not None else None
    # One id for every attempt: a commit applied but unanswered is recognised on the re-read, never issued twice.
    grant_id = secrets.token_hex(16)
    tried: list[IssueResponse] = []  # the response of the last commit tried, to answer when it turns out applied

    def attempt() -> IssueResponse:
        if key_hash is not None:
            record = store.read_issuance(key_hash)
            if record is not None:
                # A replay returns the first response even once its expires_at has passed.
                return _replay(record, fingerprint, grant_id)
        elif tried and store.grant_exists(req.principal, grant_id):
            return tried[-1]
        if req.expires_at is not None and req.expires_at <= _now():
            raise errors.InvalidRequest("expires_at: must be in the future")
        response = IssueResponse(
            grant_id=grant_id,
            principal=req.principal,
            plan_id=req.plan_id,
            runs_total=req.runs_total,
            expires_at=format_time(req.expires_at) if req.expires_at else None,
            balance=current_balance(req.principal) + req.runs_total,
            replayed=False,
        )
        tried.append(response)
        store.commit_issue(
            principal=req.principal,
            grant_id=grant_id,
            plan_id=req.plan_id,
            runs_total=req.runs_total,
            expires_at=req.expires_at,
            issued_by=caller.issued_by,
            idempotency_key_hash=key_hash,
            fingerprint=fingerprint,
            response=response.model_dump(mode="json"),
        )
        return response

    return store.optimistic(attempt)
