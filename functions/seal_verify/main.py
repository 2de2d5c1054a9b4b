"""Cloud Function: POST /api/seal/verify (user, operator, portal)."""

import functions_framework

from shared import seals
from shared.http import Body, handle


@functions_framework.http
def seal_verify(request):
    """Verify an uploaded seal.svg."""
    return handle(request, None, seals.verify, body=Body.SEAL)
