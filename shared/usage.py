"""Usage for partners: a principal's grants and balance, and the runs consumed and granted as bonus in a time range."""

from __future__ import annotations

import datetime as dt
from typing import Any

from shared import entitlements, store
from shared.auth import Admin, Identity
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


def usage(caller: Admin | Identity, req: UsageQuery) -> UsageResponse:
    """GET /api/entitlement/usage (the partner's admin token, or an operator)."""
    docs = store.all_grants(req.principal)
    return UsageResponse(
        principal=req.principal,
        balance=entitlements.current_balance(req.principal),
        consumed=store.count_ledger_entries(req.principal, CONSUMED, req.from_, req.to),
        bonus=store.count_ledger_entries(req.principal, BONUS, req.from_, req.to),
        counted_from=format_time(req.from_) if req.from_ is not None else None,
        counted_to=format_time(req.to) if req.to is not None else None,
        grants=grants_of(docs),
    )
