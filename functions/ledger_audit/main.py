"""Cloud Function `ledger_audit`; its path, caller, models and statuses are declared once, in shared/endpoints.py."""

from shared.http import function

ledger_audit = function("ledger_audit")
