"""Entitlement service: issue grants, check availability, consume runs (balances and the ledger)."""

from __future__ import annotations

import datetime as dt
import json
import random
import secrets
from typing import Any

from pydantic import BaseModel

from shared import crossings, errors, events, store
from shared.auth import Identity, PartnerCaller
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


def balance_for(caller: PartnerCaller, principal: str) -> int:
    """The balance a partner endpoint answers: of the partner's own grants to a partner, the whole one to the admin and operators."""
    partner = caller.partner
    return current_balance(principal) if partner is None else store.read_partner_balance(principal, partner, _now())


def idempotency_key_id(caller: PartnerCaller, endpoint: str, key: str) -> str:
    """Document id of a partner endpoint's Idempotency-Key: namespaced by the caller (each partner its own, the admin
    token one) and by the endpoint, so two partners' `order-1` never meet. The admin's issue keys keep the id they
    had before partners existed (the key's hash alone), so a retry that spans the upgrade still replays."""
    if endpoint == "issue" and caller.namespace == "admin":
        return store.sha256_hex(key)
    return store.sha256_hex(f"{endpoint}|{caller.namespace}|{key}")


def check(caller: Identity, req: CheckRequest) -> CheckResponse:
    """May this run_id run now? Writes nothing."""
    balance, run = store.at_once(lambda: current_balance(caller.principal), lambda: store.read_run(caller.principal, req.run_id))
    if run is None and balance < 1:
        # Read at once, the run may have been read before the balance: a twin consume of this very run_id that took
        # the last run in between would read as "no run, no balance". A 402 is answered only when the run is still
        # missing on a read made after the empty balance was read (one more round trip, on this path alone).
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

    Each attempt makes three round trips, one after another: (1) at once, the first open shard in spending order
    (one indexed query of one document), the run record and the balance (one aggregation); (2) one open shard drawn
    at random among all those that expire with the first (another query of one document: it needs the first's
    expiry) and, with events on, at once with it the first's partner's balance (and near the low line what deciding
    a crossing reads); (3) the commit on the drawn shard, preconditioned on its update time. A lost race draws again: hundreds
    of consumers of one principal spread over the shards instead of re-reading them all. Grants that expire at the
    same moment are spent in any order.
    """
    principal = caller.principal
    # Marks this request's charge, so that its own commit, applied but unanswered, reads back as not replayed.
    charge_id = secrets.token_hex(12)

    def answer_for(run: store.Run, balance: int) -> ConsumeResponse:
        # Our own charge (applied, reply lost) is ours whatever happened to the run since.
        replayed = run.record.charge_id != charge_id
        if replayed and run.state != "consumed":
            raise errors.RunIdReused(f"run_id {req.run_id!r} is already {run.state}", state=run.state)
        return ConsumeResponse(run_id=req.run_id, principal=principal, balance=balance, state="consumed", replayed=replayed)

    def attempt() -> ConsumeResponse:
        now = _now()
        first, run, balance = store.at_once(
            lambda: store.read_first_to_spend(principal, now), lambda: store.read_run(principal, req.run_id), lambda: store.read_balance(principal, now)
        )
        if run is not None:
            return answer_for(run, balance)
        if first is None:
            # Read at once, the run may have been read before the grants: a twin retry that took the last run in
            # between reads as "no run, no grant". 402 only when the run is still missing on a read made after the
            # grants were read empty (as check does); a retry racing its twin for the last run replays, never 402s.
            run = store.read_run(principal, req.run_id)
            if run is not None:
                return answer_for(run, balance)
            raise errors.EntitlementExhausted(f"no runs left for {caller.principal}")
        if not first.usable(now):
            # Marked open with no runs left (written by a version that did not keep `open`): close it, read again.
            store.commit_close_shard(principal, first)
            raise store.Contended("closed a spent shard still marked open")
        # The draw among the open shards of the first's partner that expire with it (half upwards, half downwards
        # from a random slot: a closed shard's share goes to both its neighbours) and, at once, that partner's balance
        # for the events' crossing: drawing within one partner is what lets both go in one round trip.
        # Near the low line (the principal's balance says whether the partner's may be), the alert and the partner's
        # open documents that the exact mode needs go in the same round trip: events add no round trip to a consume.
        partner = first.issued_by
        with_events = partner is not None and events.enabled()
        near_reads = crossings.near_reads(principal, partner, now) if with_events and crossings.may_be_near(balance, delta=-1) else ()
        drawn, partner_balance, *near = store.at_once(
            lambda: store.read_open_shard_at(principal, first.spend_key, random.random(), upwards=random.random() < 0.5, issued_by=partner),
            lambda: store.read_partner_balance(principal, partner, now) if with_events else None,
            *near_reads,
        )
        # Past the last slot (or a shard that ran dry since the query's index read it): the first one, as read.
        grant = drawn if drawn is not None and drawn.usable(now) else first
        # Only near a partner's low line, while an alert is armed, does the guard use them (see crossings.guard_from_balance).
        guard = None
        if partner_balance is not None:
            ahead = crossings.Near(near[0], list(near[1])) if near else None
            guard = crossings.guard_from_balance(principal, partner, now, partner_balance, delta=-1, closes=grant.remaining <= 1, near=ahead)

        def recorded(batch: Any) -> None:
            data = {"run_id": req.run_id, "principal": principal, "grant_id": grant.group}
            events.record(batch, type=events.RUN_CONSUMED, principal=principal, partner=grant.issued_by, data=data, ref=req.run_id, time=now)
            crossings.record_balance_change(batch, guard, delta=-1, changed=[grant], ref=f"consume|{req.run_id}", time=now)

        store.commit_consume(principal, req.run_id, grant, charge_id=charge_id, consumed_at=now, extra=recorded)
        # The balance as read with the first shard, before this charge's commit; the charged shard (whose precondition
        # holds at the commit) is part of it, so it counts at least that shard's runs, whatever a read at once missed.
        balance = max(balance, grant.remaining)
        return ConsumeResponse(run_id=req.run_id, principal=principal, balance=balance - 1, state="consumed", replayed=False)

    return store.optimistic(attempt)


def body_fingerprint(req: BaseModel) -> str:
    """A stable hash of a parsed body: equal for requests that mean the same thing (Idempotency-Key replays compare it)."""
    return store.sha256_hex(json.dumps(req.model_dump(mode="json"), sort_keys=True, separators=(",", ":")))


def _replay(record: dict, fingerprint: str, grant_id: str) -> IssueResponse:
    """The first response for an idempotency key (not a replay if it was this request's), or 409 when this body differs."""
    if record["fingerprint"] != fingerprint:
        raise errors.IdempotencyConflict()
    # Answers recorded before `issued_by` existed were the admin's.
    return IssueResponse.model_validate({"issued_by": "admin", **record["response"], "replayed": record["grant_id"] != grant_id})


def issue(caller: PartnerCaller, req: IssueRequest, *, idempotency_key: str | None = None) -> IssueResponse:
    """Issue runs to a principal, recording who issued them; with an Idempotency-Key, at most once per key (and caller)."""
    fingerprint = body_fingerprint(req)
    key_hash = idempotency_key_id(caller, "issue", idempotency_key) if idempotency_key is not None else None
    # One id for every attempt: a commit applied but unanswered is recognised on the re-read, never issued twice.
    grant_id = secrets.token_hex(16)
    # The partner (events' ce-partner): the partner's email; with the admin token, its ID token's email, else "admin".
    issued_by = caller.issued_by
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
        # The answer's balance (a partner's own, or the whole one) and, at once, what the events' crossing needs.
        balance, guard = crossings.with_guard(lambda: balance_for(caller, req.principal), req.principal, issued_by, now, delta=req.runs_total)
        response = IssueResponse(
            grant_id=grant_id,
            principal=req.principal,
            plan_id=req.plan_id,
            runs_total=req.runs_total,
            expires_at=format_time(req.expires_at) if req.expires_at else None,
            issued_by=issued_by,
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
            crossings.record_issue(batch, guard, runs=req.runs_total)

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
            # The guard's writes share the commit's 500 (see crossings.record_issue).
            max_shards=crossings.max_shards_beside(guard),
            extra=recorded,
        )
        return response

    return store.optimistic(attempt)
