"""Cloud Function `log_proof`; its path, caller, models and statuses are declared once, in shared/endpoints.py."""

from shared.http import function

log_proof = function("log_proof")
