"""Cloud Function `events_sweep`; its path, caller, models and statuses are declared once, in shared/endpoints.py."""

from shared.http import function

events_sweep = function("events_sweep")
