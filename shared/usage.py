"""Usage for partners: a principal's grants and balance, and the runs consumed and granted as bonus in a time range."""

from __future__ import annotations

import datetime as dt
from typing import Any

from shared import entitlements, ledger_store, store
from shared.auth import PartnerCaller
from shared.models import UsageGrant, UsageQuery, UsageResponse, format_time

# The ledger reasons usage counts; any other (an internal move such as a split) nets to zero and counts as nothing.
CONSUMED = "consume"
BONUS = store.SEAL_RERUN_PLAN
_EPOCH = dt.datetime.min.replace(tzinfo=dt.UTC)


def grants_of(docs: list[dict[str, Any]]) -> list[UsageGrant]:
    """The principal's issued grants, each the sum of its documents (shards), oldest first."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        groups.setdefault(doc.get("group", doc["grant_id"]), []).append(doc)
    grants = []
    for group, shards in groups.items():
        # The group's first document holds the grant as issued; its shards share plan and expiry.
        first = next((d for d in shards if d["grant_id"] == group), shards[0])
        expires_at = first.get("expires_at")
        grants.append((
            first.get("created_at") or _EPOCH,
            UsageGrant(
                grant_id=group,
                plan_id=first["plan_id"],
                runs_total=sum(d["runs_total"] for d in shards),
                remaining=sum(d["remaining"] for d in shards),
                expires_at=format_time(expires_at) if expires_at is not None else None,
            ),
        ))
    return [grant for _, grant in sorted(grants, key=lambda item: (item[0], item[1].grant_id))]


def _partner_consumed(docs: list[dict[str, Any]], req: UsageQuery) -> int:
    """Runs consumed in the range from the grants among `docs` (one partner's): a ledger sum per grant any run left."""
    start, end = req.from_ or _EPOCH, req.to or dt.datetime.max.replace(tzinfo=dt.UTC)
    touched = {doc.get("group", doc["grant_id"]) for doc in docs if doc["remaining"] < doc["runs_total"]}
    return sum(ledger_store.ledger_runs(grant_id, CONSUMED, start, end) for grant_id in sorted(touched))


def usage(caller: PartnerCaller, req: UsageQuery) -> UsageResponse:
    """GET /api/entitlement/usage: to a partner, as if the principal had no grants but the partner's own (no bonus ones);
    to the admin and operators, every grant."""
    docs = store.all_grants(req.principal)
    partner = caller.partner
    if partner is not None:
        docs = [doc for doc in docs if store.grant_issued_by(doc) == partner]
    return UsageResponse(
        principal=req.principal,
        balance=entitlements.balance_for(caller, req.principal),
        consumed=ledger_store.count_ledger_entries(req.principal, CONSUMED, req.from_, req.to) if partner is None else _partner_consumed(docs, req),
        bonus=ledger_store.count_ledger_entries(req.principal, BONUS, req.from_, req.to) if partner is None else 0,
        counted_from=format_time(req.from_) if req.from_ is not None else None,
        counted_to=format_time(req.to) if req.to is not None else None,
        grants=grants_of(docs),
    )
