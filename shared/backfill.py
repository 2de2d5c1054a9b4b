"""Operator tool: give grant documents written by earlier versions the fields this version's queries read.

- `open`, `spend_key`, `slot` (the fan-out design): without them the indexed query that finds the grant to spend
  first does not see a grant, so its runs would not count.
- `issued_by` (partners, v1.1): a grant written before partners existed was the admin's (`admin`; a bonus grant has
  none), so a partner's per-partner balance, usage and export never count it as theirs.
- `lead` and `shards`: the export lists issued grants by one indexed query of their lead documents; a grant without
  them is missing from the export.

And it gives seals recorded before the seal log existed (v1.2) their pending entries, which the next integration
appends to the log (the ledger audit reports a seal that is in no log as a mismatch).

Run this once after deploying the functions of this version, before partners use the export (it is idempotent; run
it again if an older instance issued grants or seals meanwhile).
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable
from typing import Any

from shared import ledger, log_store, partner_store, store

PAGE_SIZE = 500


def missing_fields(doc_id: str, data: dict[str, Any], *, shards: Callable[[str, str], int]) -> dict[str, Any]:
    """The fields a grant document lacks, with their values (empty when it has them all); `shards` counts a grant's documents."""
    fields: dict[str, Any] = {}
    group = data.get("group", doc_id)
    if not {"open", "spend_key", "slot"} <= data.keys():
        fields |= {"group": group, **store.spending_fields(remaining=data["remaining"], expires_at=data.get("expires_at"), slot=random.random())}
    if data.get("issued_by") is None and data.get("plan_id") != store.SEAL_RERUN_PLAN:
        fields["issued_by"] = store.grant_issued_by(data)
    if "lead" not in data:
        fields["lead"] = group == doc_id
    if "shards" not in data:
        # Only a lead document's count is read (by the export); a shard's is written for uniformity.
        fields["shards"] = shards(group, data["principal"]) if group == doc_id and "group" in data else 1
    return fields


def _documents_of(group: str, principal: str) -> int:
    grant = partner_store.read_grant(principal, group)
    return len(grant.documents) if grant is not None else 1


def backfill(*, page_size: int = PAGE_SIZE) -> int:
    """Add the missing fields to every grant document that lacks them; return how many were updated."""
    updated = 0
    after: str | None = None
    while True:
        page = store.read_grant_page(after, page_size)
        for snap in page:
            data = snap.to_dict() or {}
            fields = missing_fields(snap.id, data, shards=_documents_of)
            if not fields:
                continue
            try:
                # Preconditioned on the document as read: one that a consume changed meanwhile is left for the next run.
                store.commit_spending_fields(snap.reference.path, fields, snap.update_time)
                updated += 1
            except (store.Contended, store.CommitUncertain):
                print(f"backfill: {snap.reference.path} changed while being read, or the write went unanswered; run the tool again", file=sys.stderr)
        if len(page) < page_size:
            return updated
        after = page[-1].reference.path


def backfill_log(*, page_size: int = PAGE_SIZE) -> int:
    """Give every seal recorded before the seal log a pending entry (SHA-256 of its seal.json, as run_complete writes
    it); the next integration sequences them. Return how many were added."""
    added = 0
    after: str | None = None
    while page := log_store.read_seal_payloads_page(after, page_size):
        after = page[-1][0]
        payloads = dict(page)
        missing = log_store.unlogged(list(payloads))
        if missing:
            try:
                log_store.commit_backfilled({seal_id: payloads[seal_id] for seal_id in missing})
                added += len(missing)
            except (store.Contended, store.CommitUncertain):
                print("backfill: another backfill added some of these seals' entries, or the write went unanswered; run the tool again", file=sys.stderr)
        if len(page) < page_size:
            break
    return added


def _backfill_all() -> tuple[int, int]:
    return backfill(), backfill_log()


def main(argv: list[str] | None = None) -> int:
    """Backfill and say how many grants were updated and seals added to the log."""
    parser = argparse.ArgumentParser(prog="python -m shared.backfill", description=__doc__.splitlines()[0])
    parser.add_argument("--project", help=ledger.PROJECT_HELP)
    args = parser.parse_args(argv)
    counts = ledger.on_firestore("backfill", args.project, _backfill_all)
    if counts is None:
        return ledger.EXIT_COULD_NOT_RUN
    updated, logged = counts
    print(f"backfill: {updated} grant documents updated, {logged} seals from before the seal log queued for it")
    return ledger.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
