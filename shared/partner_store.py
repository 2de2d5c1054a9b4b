"""Firestore access for the partner endpoints: one grant's documents, revocations, and the export's pages.

The grants and ledger collections themselves are described in shared/store.py; this module adds the
`revocations` collection (the record of each revoke, which makes Idempotency-Key replays exact) and the
reads that list grants across principals.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from google.cloud import firestore
from google.cloud.firestore_v1.base_query import FieldFilter

from shared import store

REVOCATIONS = "revocations"
# The ledger reason of a revoked run (the delta is minus the runs taken from the document).
REVOKE = "revoke"


@dataclass(frozen=True)
class IssuedGrant:
    """An issued grant as read: its documents (shards) at one read time, and who issued it."""

    grant_id: str
    principal: str
    plan_id: str
    issued_by: str | None
    expires_at: dt.datetime | None
    created_at: dt.datetime | None
    documents: tuple[store.Grant, ...]
    # Runs that left its documents by consume and by revoke, and when the last one did; None for a grant with a
    # document written before these counters existed (then only the ledger can tell).
    consumed: int | None
    revoked: int | None
    spent_at: dt.datetime | None
    # Documents a revoke took out of spending (see commit_fence), by the revoke's id.
    fenced: dict[str, str] = field(default_factory=dict)

    @property
    def runs_total(self) -> int:
        """Runs it was issued with."""
        return sum(doc.runs_total for doc in self.documents)

    @property
    def remaining(self) -> int:
        """Its unused runs (expired or not)."""
        return sum(doc.remaining for doc in self.documents)


# The fields a revoke decides on. A revoke reads only these (a projection): a 1,000,000-run grant is 240 documents,
# and each field is decoded 240 times, the timestamps dearest; the export's counters and the spending queries' fields
# are no part of a revoke (measured: the query of a whole 240-document grant 30% faster, see docs/performance.md).
REVOKE_FIELDS = ("group", "principal", "plan_id", "runs_total", "remaining", "expires_at", "issued_by", "fence")


def read_grant(principal: str, grant_id: str, *, revoke_fields_only: bool = False) -> IssuedGrant | None:
    """Every document of one issued grant, in one query (one read time), or None when the principal has no such grant.

    `revoke_fields_only`: read REVOKE_FIELDS only; the documents then carry no creation time, slot or counters (the
    grant's `consumed`, `revoked`, `spent_at` and `created_at` are None), which a revoke never reads."""
    query = store.client().collection(store.PRINCIPALS).document(principal).collection(store.GRANTS).where(filter=FieldFilter("group", "==", grant_id))
    if revoke_fields_only:
        query = query.select(REVOKE_FIELDS)
    snaps = query.get(**store._rpc())
    if not snaps:
        return None
    return _issued(snaps)


def _issued(snaps: list[firestore.DocumentSnapshot]) -> IssuedGrant:
    all_data = [snap.to_dict() or {} for snap in snaps]
    documents = tuple(store.grant_from_snapshot(snap, data) for snap, data in zip(snaps, all_data, strict=True))
    data = next((d for snap, d in zip(snaps, all_data, strict=True) if snap.id == documents[0].group), all_data[0])
    counted = all(d.get("counts") is True for d in all_data)
    spent = [d["spent_at"] for d in all_data if d.get("spent_at") is not None]
    return IssuedGrant(
        grant_id=documents[0].group,
        principal=data["principal"],
        plan_id=data["plan_id"],
        issued_by=store.grant_issued_by(data),
        expires_at=data.get("expires_at"),
        created_at=data.get("created_at"),
        documents=documents,
        consumed=sum(d["consumed"] for d in all_data) if counted else None,
        revoked=sum(d["revoked"] for d in all_data) if counted else None,
        spent_at=max(spent) if spent else None,
        fenced={snap.id: d["fence"]["revoke"] for snap, d in zip(snaps, all_data, strict=True) if d.get("fence")},
    )


def read_revocation(record_id: str) -> dict[str, Any] | None:
    """The record of a revoke (by its Idempotency-Key's id, or the request's own id), or None."""
    snap = store.client().collection(REVOCATIONS).document(record_id).get(**store._rpc())
    return snap.to_dict() if snap.exists else None


def written_by_revoke(grant: IssuedGrant, takes: list[tuple[store.Grant, int]], revoke_id: str) -> list[store.Grant]:
    """The documents a revoke's commit writes: those it takes runs from, and those its own fence put out of spending."""
    taken = {doc.grant_id for doc, runs in takes if runs}
    return [doc for doc in grant.documents if doc.grant_id in taken or grant.fenced.get(doc.grant_id) == revoke_id]


def commit_revoke(
    grant: IssuedGrant,
    takes: list[tuple[store.Grant, int]],
    *,
    revoke_id: str,
    record_id: str,
    fingerprint: str,
    response: dict[str, Any],
    extra: store.Extra = None,
) -> None:
    """One commit: take `runs` from each document (unchanged since read, else Contended) with its ledger entry, and the
    revocation's record (create: a second one for the same key fails). A run is never both consumed and revoked: a consume
    that commits on a document in between moves its update time, and this commit is decided again. Documents this revoke
    fenced are put back into spending (those with runs left) in the same commit."""
    client = store.client()
    batch = client.batch()
    taken = {doc.grant_id: runs for doc, runs in takes}
    for doc in grant.documents:
        runs = taken.get(doc.grant_id, 0)
        fenced = grant.fenced.get(doc.grant_id) == revoke_id
        if not runs and not fenced:
            continue
        change: dict[str, Any] = {}
        if runs:
            change |= {"remaining": firestore.Increment(-runs), "revoked": firestore.Increment(runs), "spent_at": firestore.SERVER_TIMESTAMP}
        if fenced:
            change |= {"open": doc.remaining > runs, "fence": firestore.DELETE_FIELD}
        elif doc.remaining == runs:
            change["open"] = False
        batch.update(store.grant_ref(grant.principal, doc.grant_id), change, option=client.write_option(last_update_time=doc.update_time))
        if runs:
            store._ledger(batch, principal=grant.principal, grant_id=grant.grant_id, shard=doc.grant_id, delta=-runs, reason=REVOKE, ref=f"{revoke_id}:{doc.grant_id}")
    batch.create(
        client.collection(REVOCATIONS).document(record_id),
        {
            "revoke_id": revoke_id,
            "principal": grant.principal,
            "grant_id": grant.grant_id,
            "fingerprint": fingerprint,
            "response": response,
            "created_at": firestore.SERVER_TIMESTAMP,
        },
    )
    if extra is not None:
        extra(batch)  # the revoke's events (shared/events.py)
    store._commit(batch)


# How long a fence may stand before the ledger audit puts its documents back into spending (a revoke that died
# between its fence and its commit; a live one finishes in well under a second).
FENCE_SECONDS = 60


def commit_fence(grant: IssuedGrant, *, revoke_id: str, now: dt.datetime) -> None:
    """Take the grant's documents that hold runs out of spending (`open: false`), marked with this revoke, so that no
    consume can move them while the revoke decides: its next commit cannot lose a race to a consumer.

    No precondition, so it cannot lose a race itself; it changes no balance (no ledger entry) and makes any consume
    that read these documents before it fail its own precondition and draw elsewhere."""
    client = store.client()
    batch = client.batch()
    fence = {"revoke": revoke_id, "until": now + dt.timedelta(seconds=FENCE_SECONDS)}
    for doc in grant.documents:
        if doc.remaining > 0:
            batch.update(store.grant_ref(grant.principal, doc.grant_id), {"open": False, "fence": fence})
    store._commit(batch)


def commit_unfence(grant: IssuedGrant, *, revoke_id: str | None = None) -> None:
    """Put fenced documents (this revoke's, or every one) back into spending, each unchanged since read."""
    client = store.client()
    batch = client.batch()
    for doc in grant.documents:
        if doc.grant_id in grant.fenced and revoke_id in (None, grant.fenced[doc.grant_id]):
            batch.update(
                store.grant_ref(grant.principal, doc.grant_id),
                {"open": doc.remaining > 0, "fence": firestore.DELETE_FIELD},
                option=client.write_option(last_update_time=doc.update_time),
            )
    store._commit(batch)


def lift_stale_fence(snap: firestore.DocumentSnapshot, now: dt.datetime) -> bool:
    """Put a grant document back into spending when a revoke's fence on it outlived FENCE_SECONDS (the revoke died
    between its fence and its commit); preconditioned on the document as read. True when it did."""
    data = snap.to_dict() or {}
    fence = data.get("fence")
    if not fence or fence["until"] > now:
        return False
    batch = store.client().batch()
    batch.update(snap.reference, {"open": data["remaining"] > 0, "fence": firestore.DELETE_FIELD}, option=store.client().write_option(last_update_time=snap.update_time))
    try:
        store._commit(batch)
    except (store.Contended, store.CommitUncertain):
        return False  # changed meanwhile (its revoke finished), or unknown: the next audit looks again
    return True


# ---------------------------------------------------------------- the export


def read_export_page(*, partner: str | None, before: dt.datetime, after: tuple[dt.datetime, str] | None, limit: int) -> list[firestore.DocumentSnapshot]:
    """Up to `limit` lead grant documents (one per issued grant) of every principal issued before `before` (of `partner`
    only, when given), in issue order then path, after the cursor `after` (created_at, document path): one query.

    Composite indexes (collection group `grants`): lead ASC, created_at ASC; lead ASC, issued_by ASC, created_at ASC.
    """
    query = store.client().collection_group(store.GRANTS).where(filter=FieldFilter("lead", "==", True))
    if partner is not None:
        query = query.where(filter=FieldFilter("issued_by", "==", partner))
    query = query.where(filter=FieldFilter("created_at", "<", before)).order_by("created_at").order_by("__name__").limit(limit)
    if after is not None:
        created_at, path = after
        query = query.start_after({"created_at": created_at, "__name__": store.client().document(path)})
    return list(query.get(**store._rpc()))


def issued_grant_of(lead: firestore.DocumentSnapshot) -> IssuedGrant:
    """The issued grant a lead document stands for: itself, or (a sharded grant) all its documents, read at once."""
    data = lead.to_dict() or {}
    if data.get("shards", 1) <= 1:
        return _issued([lead])
    grant = read_grant(data["principal"], data.get("group", lead.id))
    assert grant is not None, "a lead document's grant has at least the lead"
    return grant
