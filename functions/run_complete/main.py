"""Cloud Function: POST /api/entitlement/run_complete (runner)."""

import functions_framework

from shared import seals
from shared.http import handle
from shared.models import RunCompleteRequest


@functions_framework.http
def run_complete(request):
    """Record the outputs, mark the run completed and return its signed seal bundle."""
    return handle(request, RunCompleteRequest, seals.run_complete)
