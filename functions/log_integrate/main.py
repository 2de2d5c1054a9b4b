"""Cloud Function `log_integrate`; its path, caller, models and statuses are declared once, in shared/endpoints.py."""

from shared.http import function

log_integrate = function("log_integrate")
