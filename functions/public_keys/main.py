"""Cloud Function `public_keys`; its path, caller, models and statuses are declared once, in shared/endpoints.py."""

from shared.http import function

public_keys = function("public_keys")
