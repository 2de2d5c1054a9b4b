"""Entitlement service: issue grants, check availability, consume runs (balances and the ledger)."""

from __future__ import annotations

import datetime as dt
import json
import random
import secrets
from typing import Any

from shared import errors, events, store
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


def current_balance(principal: str) -> int:
    """Sum of unused runs of the principal's unexpired grants (one aggregation)."""
    return store.read_balance(principal, _now())


def check(caller: Identity, req: CheckRequest) -> CheckResponse:
    """May this run_id run now? Writes nothing."""
    # Grants before the run: a run missing *after* an empty balance was read was missing then too,
    # so a concurrent consume of this very run_id can never make us answer 402.
    balance = current_balance(caller.principal)
    run = store.read_run(caller.principal, req.run_id)
    if run is not None and run.state != "consumed":
        raise errors.RunIdReused(f"run_id {req.run_id!r} is already {run.state}", state=run.state)
    if run is None and balance < 1:
        raise errors.EntitlementExhausted(f"no runs left for {caller.principal}")
    return CheckResponse(
        run_id=req.run_id, principal=caller.principal, available=True, balance=balance, state="new" if run is None else "consumed"
    )


def consume(caller: Identity, req: ConsumeRequest) -> ConsumeResponse:
    """Charge one run for run_id, exactly once however often and however concurrently it is asked.

    Each attempt reads the first open shard in spending order (one indexed query of one document), the run
    record, one open shard drawn at random among all those that expire with it (another), the balance (one
    aggregation), and commits on the drawn shard, preconditioned on its update time. A lost race draws
    again: hundreds of consumers of one principal spread over the shards instead of re-reading them all.
    Grants that expire at the same moment are spent in any order.
    """
    principal = caller.principal
    # Marks this request's charge, so that its own commit, applied but unanswered, reads back as not replayed.
    charge_id = secrets.token_hex(12)

    def attempt() -> ConsumeResponse:
        now = _now()
        # Grants before the run (see check): a retry racing its twin for the last run replays, never 402s.
        first = store.read_first_to_spend(principal, now)
        run = store.read_run(principal, req.run_id)
        if run is not None:
            # Our own charge (applied, reply lost) is ours whatever happened to the run since.
            replayed = run.record.charge_id != charge_id
            if replayed and run.state != "consumed":
                raise errors.RunIdReused(f"run_id {req.run_id!r} is already {run.state}", state=run.state)
            return ConsumeResponse(run_id=req.run_id, principal=principal, balance=current_balance(principal), state="consumed", replayed=replayed)
        if first is None:
            raise errors.EntitlementExhausted(f"no runs left for {caller.principal}")
        if not first.usable(now):
            # Marked open with no runs left (written by a version that did not keep `open`): close it, read again.
            store.commit_close_shard(principal, first)
            raise store.Contended("closed a spent shard still marked open")
        # Half upwards, half downwards from a random slot: a closed shard's share goes to both its neighbours.
        drawn = store.read_open_shard_at(principal, first.spend_key, random.random(), upwards=random.random() < 0.5)
        # Past the last slot (or a shard that ran dry since the query's index read it): the first one, as read.
        grant = drawn if drawn is not None and drawn.usable(now) else first
        # Read after the charged shard, whose precondition holds at the commit: it counts this run, so ≥ 1. With events,
        # the charged partner's balance (and near its low line its documents) is read meanwhile, for the crossing.
        balance, guard = events.with_guard(
            lambda: store.read_balance(principal, now), principal, grant.issued_by, now, delta=-1, closes=grant.remaining <= 1
        )

        def recorded(batch: Any) -> None:
            data = {"run_id": req.run_id, "principal": principal, "grant_id": grant.group}
            events.record(batch, type=events.RUN_CONSUMED, principal=principal, partner=grant.issued_by, data=data, ref=req.run_id, time=now)
            events.record_balance_change(batch, guard, delta=-1, changed=[grant], ref=f"consume|{req.run_id}", time=now)

        store.commit_consume(principal, req.run_id, grant, charge_id=charge_id, consumed_at=now, extra=recorded)
        return ConsumeResponse(run_id=req.run_id, principal=principal, balance=balance - 1, state="consumed", replayed=False)

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
    # The partner: the ID token's email beside the admin token, else "admin".
    issued_by = caller.issued_by or "admin"
    tried: list[IssueResponse] = []  # the response of the last commit tried, to answer when it turns out applied

    def attempt() -> IssueResponse:
        if key_hash is not None:
            record = store.read_issuance(key_hash)
            if record is not None:
                # A replay returns the first response even once its expires_at has passed.
                return _replay(record, fingerprint, grant_id)
        elif tried and store.grant_exists(req.principal, grant_id):
            return tried[-1]
        now = _now()
        if req.expires_at is not None and req.expires_at <= now:
            raise errors.InvalidRequest("expires_at: must be in the future")
        balance, guard = events.with_guard(lambda: current_balance(req.principal), req.principal, issued_by, now, delta=req.runs_total)
        response = IssueResponse(
            grant_id=grant_id,
            principal=req.principal,
            plan_id=req.plan_id,
            runs_total=req.runs_total,
            expires_at=format_time(req.expires_at) if req.expires_at else None,
            balance=balance + req.runs_total,
            replayed=False,
        )
        tried.append(response)
        data = {
            "grant_id": grant_id, "principal": req.principal, "plan_id": req.plan_id, "runs_total": req.runs_total,
            "expires_at": response.expires_at, "issued_by": issued_by,
        }

        def recorded(batch: Any) -> None:
            events.record(batch, type=events.GRANT_ISSUED, principal=req.principal, partner=issued_by, data=data, ref=grant_id, time=now)
            events.record_issue(batch, guard, runs=req.runs_total)

        store.commit_issue(
            principal=req.principal,
            grant_id=grant_id,
            plan_id=req.plan_id,
            runs_total=req.runs_total,
            expires_at=req.expires_at,
            issued_by=issued_by,
            idempotency_key_hash=key_hash,
            fingerprint=fingerprint,
            response=response.model_dump(mode="json"),
            # The guard's writes share the commit's 500 (see events.record_issue).
            max_shards=events.max_shards_beside(guard),
            extra=recorded,
        )
        return response

    return store.optimistic(attempt)
