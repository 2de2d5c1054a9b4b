"""Cloud Function `entitlement_usage`; its path, caller, models and statuses are declared once, in shared/endpoints.py."""

from shared.http import function

entitlement_usage = function("entitlement_usage")
