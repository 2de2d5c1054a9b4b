"""Cloud Function `seal_verify`; its path, caller, models and statuses are declared once, in shared/endpoints.py."""

from shared.http import function

seal_verify = function("seal_verify")
