"""Operator tool: print a principal's grants and ledger, and check that each grant's ledger sums to its unused runs.

Usage: GOOGLE_CLOUD_PROJECT=P python -m shared.ledger PRINCIPAL [--limit N]
(uses Application Default Credentials, or the emulator when FIRESTORE_EMULATOR_HOST is set)
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from shared import store
from shared.models import format_time


def _jsonable(value: Any) -> Any:
    return format_time(value) if hasattr(value, "tzinfo") and hasattr(value, "isoformat") else value


def audit(principal: str, limit: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """The principal's grants, newest ledger entries, and any grant whose ledger disagrees with it."""
    grants = store.all_grants(principal)
    problems = []
    for group in sorted({grant.get("group", grant["grant_id"]) for grant in grants}):
        entries = store.ledger_for_grant(group)
        # Per shard document (a grant that is not sharded is its own single shard).
        for grant in (g for g in grants if g.get("group", g["grant_id"]) == group):
            total = sum(entry["delta"] for entry in entries if entry.get("shard", entry["grant"]) == grant["grant_id"])
            if total != grant["remaining"]:
                problems.append(f"grant {grant['grant_id']}: ledger sums to {total}, grant holds {grant['remaining']}")
    return grants, store.ledger_for_principal(principal, limit), problems


def main(argv: list[str] | None = None) -> int:
    """Print the audit as JSON lines; exit 1 when a grant and its ledger disagree."""
    parser = argparse.ArgumentParser(prog="python -m shared.ledger", description=__doc__.splitlines()[0])
    parser.add_argument("principal")
    parser.add_argument("--limit", type=int, default=100)
    args = parser.parse_args(argv)
    grants, ledger, problems = audit(args.principal.lower(), args.limit)
    for grant in grants:
        print(json.dumps({"grant": {k: _jsonable(v) for k, v in grant.items()}}, sort_keys=True))
    for entry in ledger:
        print(json.dumps({"ledger": {k: _jsonable(v) for k, v in entry.items()}}, sort_keys=True))
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
