"""The ledger audit: every grant document's unused runs against the sum of its ledger, in pages, resuming from a cursor kept in Firestore.

One call checks pages of grant documents (all principals, in path order) until its time budget is spent, then
saves where it stopped in `audits/ledger`; the next call goes on from there, and the call that reaches the last
document completes the pass (the one after starts a new one). Each page is read, and each of its documents'
ledger summed, as of one instant (the page query's read time), so a consume committing meanwhile is never a false mismatch.
The sums are Firestore `sum` aggregations, one per document, run concurrently.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from shared import errors, ledger_store, log_audit, partner_store, store
from shared.auth import Identity
from shared.config import get_config
from shared.models import AuditResponse, LedgerMismatch, format_time

# Ledger sums summed at once per page: each is one small aggregation, mostly waiting on the network.
WORKERS = 16
# The `event` of the audit's ERROR line per mismatch: deploy.sh's log-based metric counts these lines.
MISMATCH_EVENT = "ledger_mismatch"
# The answer lists at most this many mismatches (every one is logged); the counts are exact.
MAX_LISTED = 1000


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def check_documents(snaps: Sequence[Any]) -> list[LedgerMismatch]:
    """Each grant document whose `remaining` differs from the sum of its ledger, both as of the instant the documents were read.

    The documents come from one query, so they share its read time (Firestore's clock, not ours); each ledger sum is
    aggregated as of that read time.
    """

    def check(snap: Any) -> LedgerMismatch | None:
        data = snap.to_dict() or {}
        # The principal is the one the document is filed under (principals/{p}/grants/{id}).
        principal = snap.reference.parent.parent.id
        expected = ledger_store.ledger_sum_for_shard(principal, snap.id, read_time)
        found = data.get("remaining")
        if found == expected:
            return None
        return LedgerMismatch(principal=principal, grant_id=str(data.get("group", snap.id)), shard=snap.id, expected=expected, found=int(found or 0))

    if not snaps:
        return []
    read_time = snaps[0].read_time
    with ThreadPoolExecutor(max_workers=min(WORKERS, len(snaps))) as pool:
        return [mismatch for mismatch in pool.map(check, snaps) if mismatch is not None]


def run_audit(*, page_size: int, budget_seconds: float) -> AuditResponse:
    """Check pages of grant documents from the saved cursor until the budget is spent or the pass completes; save the cursor."""
    from shared.http import log  # only the endpoint logs; the ledger tool shares check_documents, not this

    started = time.monotonic()
    state, update_time = ledger_store.read_audit_state()
    cursor: str | None = state.get("cursor")
    if cursor is None:
        pass_started_at, pass_checked, pass_mismatches = format_time(_now()), 0, 0
    else:
        pass_started_at, pass_checked, pass_mismatches = state["pass_started_at"], state["pass_checked_grants"], state["pass_mismatches"]
    checked, found = 0, []
    complete = False
    while True:
        page = store.read_grant_page(cursor, page_size)
        found += check_documents(page)
        for snap in page:
            # A revoke's fence that outlived its revoke (it died between fence and commit): its runs back into spending.
            if (snap.to_dict() or {}).get("fence") and partner_store.lift_stale_fence(snap, _now()):
                log({"severity": "WARNING", "message": f"lifted a stale revoke fence on {snap.reference.path}", "event": "stale_fence_lifted"})
        checked += len(page)
        if len(page) < page_size:
            complete = True
            break
        cursor = page[-1].reference.path
        if time.monotonic() - started >= budget_seconds:
            break
    for mismatch in found:
        log({
            "severity": "ERROR",
            "message": f"ledger mismatch: principal {mismatch.principal} grant {mismatch.grant_id} document {mismatch.shard}: "
                       f"the ledger sums to {mismatch.expected}, the document holds {mismatch.found}",
            "event": MISMATCH_EVENT,
            **mismatch.model_dump(),
        })
    pass_checked += checked
    pass_mismatches += len(found)
    if complete:
        log({"severity": "INFO", "message": f"ledger audit pass complete: {pass_checked} grant documents, {pass_mismatches} mismatches",
             "event": "ledger_audit_pass", "pass_started_at": pass_started_at, "checked_grants": pass_checked, "mismatches": pass_mismatches})
    saved: dict[str, Any] = {
        "cursor": None if complete else cursor,
        "pass_started_at": pass_started_at,
        "pass_checked_grants": pass_checked,
        "pass_mismatches": pass_mismatches,
        "saved_at": format_time(_now()),
    }
    if complete:
        saved = {**saved, "pass_started_at": None, "pass_checked_grants": 0, "pass_mismatches": 0,
                 "last_pass": {"started_at": pass_started_at, "finished_at": saved["saved_at"], "checked_grants": pass_checked, "mismatches": pass_mismatches}}
    try:
        ledger_store.commit_audit_state(saved, update_time)
    except store.Contended:
        # Another audit call saved the cursor meanwhile (overlapping calls): its cursor stands; what this call found is logged.
        log({"severity": "WARNING", "message": "ledger audit: another audit call moved the cursor meanwhile; this call's cursor is dropped"})
    except store.CommitUncertain as exc:
        raise errors.Unavailable() from exc
    # The seal log is checked whole once per pass, by the call that completes it.
    log_check = log_audit.check_log() if complete else None
    return AuditResponse(
        log=log_check,
        checked_grants=checked,
        mismatches=found[:MAX_LISTED],
        pass_complete=complete,
        pass_started_at=pass_started_at,
        pass_checked_grants=pass_checked,
        pass_mismatches=pass_mismatches,
    )


def ledger_audit(caller: Identity) -> AuditResponse:
    """POST /api/ledger/audit: the next slice of the current pass (see the module docstring)."""
    config = get_config()
    return run_audit(page_size=config.audit_page_size, budget_seconds=config.audit_budget_seconds)
