"""Cloud Function: POST /api/entitlement/run_start (runner)."""

import functions_framework

from shared import runs
from shared.http import handle
from shared.models import RunStartRequest


@functions_framework.http
def run_start(request):
    """Record run-start metadata: image, project, input hash."""
    return handle(request, RunStartRequest, runs.run_start)
