"""Cloud Function `redeem_seal_once`; its path, caller, models and statuses are declared once, in shared/endpoints.py."""

from shared.http import function

redeem_seal_once = function("redeem_seal_once")
