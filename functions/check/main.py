"""Cloud Function: POST /api/entitlement/check (runner)."""

import functions_framework

from shared import entitlements
from shared.http import handle
from shared.models import CheckRequest


@functions_framework.http
def check(request):
    """Confirm that a run_id may run; writes nothing."""
    return handle(request, CheckRequest, entitlements.check)
