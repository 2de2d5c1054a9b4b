"""Cloud Function: POST /api/entitlement/redeem_seal_once (user or operator)."""

import functions_framework

from shared import seals
from shared.http import Body, handle


@functions_framework.http
def redeem_seal_once(request):
    """Grant one bonus run for a verified seal, once per (principal, seal)."""
    return handle(request, None, seals.redeem_seal_once, body=Body.SEAL)
