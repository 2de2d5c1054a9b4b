"""Cloud Function: POST /api/entitlement/consume (runner)."""

import functions_framework

from shared import entitlements
from shared.http import handle
from shared.models import ConsumeRequest


@functions_framework.http
def consume(request):
    """Consume one run from the caller's balance for run_id."""
    return handle(request, ConsumeRequest, entitlements.consume)
