"""Operator tool: give grants written before the fan-out design the fields consume's spending query reads.

Grants issued by earlier versions lack `open`, `spend_key` and `slot`, so the indexed query that finds the
grant to spend first does not see them: their runs would not count. Run this once after deploying the
functions of this version (it is idempotent; run it again if an older instance issued grants meanwhile).
"""

from __future__ import annotations

import argparse
import os
import random
import sys

import google.auth.exceptions
from google.api_core import exceptions as gexc

from shared import config, store

EXIT_OK = 0
EXIT_COULD_NOT_RUN = 2
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
    parser.add_argument("--project", help=f"Google Cloud project (default: ${config.ENV_PROJECT}; on the emulator, local mode's {config.LOCAL_PROJECT!r})")
    args = parser.parse_args(argv)
    project = args.project or os.environ.get(config.ENV_PROJECT) or (config.LOCAL_PROJECT if os.environ.get("FIRESTORE_EMULATOR_HOST") else "")
    if not project:
        print(f"backfill: could not run: no project (pass --project or set {config.ENV_PROJECT})", file=sys.stderr)
        return EXIT_COULD_NOT_RUN
    os.environ[config.ENV_PROJECT] = project
    config.get_config.cache_clear()
    store.client.cache_clear()
    try:
        updated = backfill()
    except (gexc.GoogleAPIError, google.auth.exceptions.GoogleAuthError) as exc:
        print(f"backfill: could not run: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}", file=sys.stderr)
        return EXIT_COULD_NOT_RUN
    print(f"backfill: {updated} grant documents updated")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
