"""Firestore access for the ledger's reads (the audit's, usage's, the export's, the ledger tool's) and the audit's cursor.

The ledger itself is written by the commits in shared/store.py (every balance change with its entry, in one commit);
this module only reads it, by principal, grant or document, and keeps the audit's cursor in `audits/ledger`.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from google.cloud import firestore
from google.cloud.firestore_v1.base_query import FieldFilter

from shared import store
from shared.store import LEDGER, _aggregate, _rpc, client

# The audit's cursor and pass totals: one document, written once per audit call.
AUDITS = "audits"
LEDGER_AUDIT = "ledger"


def ledger_for_principal(principal: str, limit: int = 100) -> list[dict[str, Any]]:
    """A principal's ledger, newest first (composite index: principal ASC, at DESC)."""
    query = (
        client()
        .collection(LEDGER)
        .where(filter=FieldFilter("principal", "==", principal))
        .order_by("at", direction=firestore.Query.DESCENDING)
        .limit(limit)
    )
    return [snap.to_dict() or {} for snap in query.get(**_rpc())]


def ledger_for_grant(grant_id: str) -> list[dict[str, Any]]:
    """An issued grant's ledger (all its shards), oldest first (composite index: grant ASC, at ASC)."""
    query = client().collection(LEDGER).where(filter=FieldFilter("grant", "==", grant_id)).order_by("at")
    return [snap.to_dict() or {} for snap in query.get(**_rpc())]


def ledger_sum_for_shard(principal: str, shard: str, read_time: dt.datetime | None = None) -> int:
    """The sum of the deltas of the principal's ledger entries on one grant document, as of `read_time`: one `sum`
    aggregation (composite index: principal ASC, shard ASC, delta ASC)."""
    query = (
        client()
        .collection(LEDGER)
        .where(filter=FieldFilter("principal", "==", principal))
        .where(filter=FieldFilter("shard", "==", shard))
    )
    return _aggregate(query.sum("delta"), read_time=read_time)


def count_ledger_entries(principal: str, reason: str, start: dt.datetime | None, end: dt.datetime | None) -> int:
    """How many of the principal's ledger entries have this reason, with `at` in [start, end): one `count` aggregation
    (composite index: principal ASC, reason ASC, at ASC)."""
    query = (
        client()
        .collection(LEDGER)
        .where(filter=FieldFilter("principal", "==", principal))
        .where(filter=FieldFilter("reason", "==", reason))
    )
    if start is not None:
        query = query.where(filter=FieldFilter("at", ">=", start))
    if end is not None:
        query = query.where(filter=FieldFilter("at", "<", end))
    return _aggregate(query.count())


def read_audit_state() -> tuple[dict[str, Any], Any]:
    """The ledger audit's cursor and pass totals (empty before the first audit), with the update time to precondition on."""
    snap = client().collection(AUDITS).document(LEDGER_AUDIT).get(**_rpc())
    return (snap.to_dict() or {}, snap.update_time) if snap.exists else ({}, None)


def commit_audit_state(state: dict[str, Any], update_time: Any) -> None:
    """Save the audit's cursor and totals, unless another audit call saved them since they were read (then Contended)."""
    batch = client().batch()
    ref = client().collection(AUDITS).document(LEDGER_AUDIT)
    if update_time is None:
        batch.create(ref, state)
    else:
        batch.update(ref, state, option=client().write_option(last_update_time=update_time))
    store._commit(batch)


def ledger_runs(grant_id: str, reason: str, start: dt.datetime, end: dt.datetime) -> int:
    """Runs that left the grant for `reason` with `at` in [start, end), as a positive number: one `sum` aggregation
    (composite index: grant ASC, reason ASC, at ASC, delta ASC)."""
    query = (
        client()
        .collection(LEDGER)
        .where(filter=FieldFilter("grant", "==", grant_id))
        .where(filter=FieldFilter("reason", "==", reason))
        .where(filter=FieldFilter("at", ">=", start))
        .where(filter=FieldFilter("at", "<", end))
    )
    return -_aggregate(query.sum("delta"))
