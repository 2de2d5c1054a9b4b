"""Cloud Function `export`; its path, caller, models and statuses are declared once, in shared/endpoints.py."""

from shared.http import function

export = function("export")
