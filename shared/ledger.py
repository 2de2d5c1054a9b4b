"""Operator tool: print a principal's grants and ledger, and check that each grant's ledger sums to its unused runs."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import google.auth.exceptions
from google.api_core import exceptions as gexc

from shared import config, ledger_store, store
from shared.audit import check_documents
from shared.models import format_time

T = TypeVar("T")

EXIT_OK = 0
EXIT_MISMATCH = 1
EXIT_COULD_NOT_RUN = 2

EPILOG = f"""\
Reads Firestore with Application Default Credentials (`gcloud auth application-default login`; the
account needs roles/datastore.viewer), or the Firestore emulator when FIRESTORE_EMULATOR_HOST is set.

Local mode (with `make run` running, its emulator's address is printed at start-up):
  FIRESTORE_EMULATOR_HOST=127.0.0.1:PORT .venv/bin/python -m shared.ledger ci-runner@acme-prod.iam.gserviceaccount.com

Output: one JSON line per grant ({{"grant": ...}}) then per ledger entry, newest first ({{"ledger": ...}});
each grant whose ledger disagrees with it is named on stderr.

Exit status:
  {EXIT_OK}  every grant agrees with its ledger
  {EXIT_MISMATCH}  a grant's ledger does not sum to its unused runs (named on stderr)
  {EXIT_COULD_NOT_RUN}  the check could not run (no project, no credentials, Firestore unreachable): one line on stderr says why
"""


def _jsonable(value: Any) -> Any:
    return format_time(value) if hasattr(value, "tzinfo") and hasattr(value, "isoformat") else value


def audit(principal: str, limit: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """The principal's grants, newest ledger entries, and any grant document whose ledger disagrees with it.

    The check is the ledger audit's own (shared.audit.check_documents), on this principal's grant documents.
    """
    snaps = store.read_principal_grant_docs(principal)
    grants = [{"grant_id": snap.id, **(snap.to_dict() or {})} for snap in snaps]
    problems = [
        f"grant {m.grant_id} (document {m.shard}): ledger sums to {m.expected}, grant holds {m.found}" for m in check_documents(snaps)
    ]
    return grants, ledger_store.ledger_for_principal(principal, limit), problems


PROJECT_HELP = f"Google Cloud project (default: ${config.ENV_PROJECT}; on the emulator, local mode's {config.LOCAL_PROJECT!r})"


def _project(explicit: str | None) -> str:
    """The project to read: --project, $GOOGLE_CLOUD_PROJECT, or local mode's project on the emulator."""
    project = explicit or os.environ.get(config.ENV_PROJECT, "")
    if not project and os.environ.get("FIRESTORE_EMULATOR_HOST"):
        project = config.LOCAL_PROJECT
    return project


def on_firestore(prog: str, explicit_project: str | None, work: Callable[[], T]) -> T | None:
    """Run an operator tool's `work` against the project's Firestore; None (after one line on stderr saying why) when it could not run."""
    project = _project(explicit_project)
    if not project:
        print(f"{prog}: could not run: no project (pass --project or set {config.ENV_PROJECT})", file=sys.stderr)
        return None
    os.environ[config.ENV_PROJECT] = project
    config.get_config.cache_clear()
    store.client.cache_clear()
    try:
        return work()
    except google.auth.exceptions.DefaultCredentialsError:
        print(f"{prog}: could not run: no Google credentials (run `gcloud auth application-default login`, or set FIRESTORE_EMULATOR_HOST)", file=sys.stderr)
    except (gexc.GoogleAPIError, google.auth.exceptions.GoogleAuthError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else ""
        print(f"{prog}: could not run: Firestore answered {type(exc).__name__}: {reason[:200]}", file=sys.stderr)
    return None


def main(argv: list[str] | None = None) -> int:
    """Print the audit as JSON lines; the exit status says whether the ledger agrees (see --help)."""
    parser = argparse.ArgumentParser(
        prog="python -m shared.ledger", description=__doc__.splitlines()[0], epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("principal", help="the principal (service-account or user email) to audit")
    parser.add_argument("--limit", type=int, default=100, help="how many of the newest ledger entries to print (default 100)")
    parser.add_argument("--project", help=PROJECT_HELP)
    args = parser.parse_args(argv)
    result = on_firestore("ledger", args.project, lambda: audit(args.principal.lower(), args.limit))
    if result is None:
        return EXIT_COULD_NOT_RUN
    grants, ledger, problems = result
    for grant in grants:
        print(json.dumps({"grant": {k: _jsonable(v) for k, v in grant.items()}}, sort_keys=True))
    for entry in ledger:
        print(json.dumps({"ledger": {k: _jsonable(v) for k, v in entry.items()}}, sort_keys=True))
    for problem in problems:
        print(problem, file=sys.stderr)
    return EXIT_MISMATCH if problems else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
