"""Operator tool: give grants written before the fan-out design the fields consume's spending query reads.

Grants issued by earlier versions lack `open`, `spend_key` and `slot`, so the indexed query that finds the
grant to spend first does not see them: their runs would not count. Run this once after deploying the
functions of this version (it is idempotent; run it again if an older instance issued grants meanwhile).
"""

from __future__ import annotations

import argparse
import random
import sys

from google.api_core import exceptions as gexc

from shared import ledger, store

PAGE_SIZE = 500


def backfill(*, page_size: int = PAGE_SIZE) -> int:
    """Add the missing fields to every grant document that lacks them; return how many were updated."""
    grants = store.client().collection_group(store.GRANTS)
    updated = 0
    cursor = None
    while True:
        query = grants.order_by("__name__").limit(page_size)
        if cursor is not None:
            query = query.start_after(cursor)
        page = query.get(**store._rpc())
        for snap in page:
            data = snap.to_dict() or {}
            if {"open", "spend_key", "slot"} <= data.keys():
                continue
            fields = {
                "group": data.get("group", snap.id),
                "open": data["remaining"] > 0,
                "spend_key": data.get("expires_at") or store.FAR_FUTURE,
                "slot": random.random(),
            }
            try:
                # Preconditioned on the document as read: one that a consume changed meanwhile is left for the next run.
                snap.reference.update(fields, option=store.client().write_option(last_update_time=snap.update_time))
                updated += 1
            except gexc.FailedPrecondition:
                print(f"backfill: {snap.reference.path} changed while being read; run the tool again", file=sys.stderr)
        if len(page) < page_size:
            return updated
        cursor = page[-1]


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
