"""Cloud Function `run_complete`; its path, caller, models and statuses are declared once, in shared/endpoints.py."""

from shared.http import function

run_complete = function("run_complete")
