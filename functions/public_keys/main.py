"""Cloud Function: GET /api/seal/public_keys (anyone)."""

import functions_framework

from shared import seals
from shared.http import Auth, Body, handle


@functions_framework.http
def public_keys(request):
    """The public keys that seals are signed with."""
    return handle(request, None, seals.public_keys, auth_mode=Auth.NONE, body=Body.NONE, method="GET")
