"""Operator tool: give grants written before the fan-out design the fields consume's spending query reads.

Grants issued by earlier versions lack `open`, `spend_key` and `slot`, so the indexed query that finds the
grant to spend first does not see them: their runs would not count. Run this once after deploying the
functions of this version (it is idempotent; run it again if an older instance issued grants meanwhile).
"""

from __future__ import annotations

import argparse
import random
import sys

from shared import ledger, store

PAGE_SIZE = 500


def backfill(*, page_size: int = PAGE_SIZE) -> int:
    """Add the missing fields to every grant document that lacks them; return how many were updated."""
    updated = 0
    after: str | None = None
    while True:
        page = store.read_grant_page(after, page_size)
        for snap in page:
            data = snap.to_dict() or {}
            if {"open", "spend_key", "slot"} <= data.keys():
                continue
            fields = {
                "group": data.get("group", snap.id),
                **store.spending_fields(remaining=data["remaining"], expires_at=data.get("expires_at"), slot=random.random()),
            }
            try:
                # Preconditioned on the document as read: one that a consume changed meanwhile is left for the next run.
                store.commit_spending_fields(snap.reference.path, fields, snap.update_time)
                updated += 1
            except (store.Contended, store.CommitUncertain):
                print(f"backfill: {snap.reference.path} changed while being read, or the write went unanswered; run the tool again", file=sys.stderr)
        if len(page) < page_size:
            return updated
        after = page[-1].reference.path


def main(argv: list[str] | None = None) -> int:
    """Backfill and say how many grants were updated."""
    parser = argparse.ArgumentParser(prog="python -m shared.backfill", description=__doc__.splitlines()[0])
    parser.add_argument("--project", help=ledger.PROJECT_HELP)
    args = parser.parse_args(argv)
    updated = ledger.on_firestore("backfill", args.project, backfill)
    if updated is None:
        return ledger.EXIT_COULD_NOT_RUN
    print(f"backfill: {updated} grant documents updated")
    return ledger.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
