"""Cloud Function `seal_log`; its path, caller, models and statuses are declared once, in shared/endpoints.py."""

from shared.http import function

seal_log = function("seal_log")
