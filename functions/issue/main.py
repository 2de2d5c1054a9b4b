"""Cloud Function: POST /api/entitlement/issue (partner/admin)."""

import functions_framework

from shared import entitlements
from shared.http import Auth, handle
from shared.models import IssueRequest


@functions_framework.http
def issue(request):
    """Issue runs to a customer principal."""
    return handle(request, IssueRequest, entitlements.issue, auth_mode=Auth.ADMIN, idempotency=True)
