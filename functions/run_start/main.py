"""Cloud Function `run_start`; its path, caller, models and statuses are declared once, in shared/endpoints.py."""

from shared.http import function

run_start = function("run_start")
