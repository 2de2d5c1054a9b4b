"""The endpoint registry: every endpoint declared once, everything else derived from it.

Each `Endpoint` names its function (the entry point, `functions/<name>/`, the OpenAPI operationId
and the log's `endpoint`), its path and method, who may call it, what its body holds, its request
and response models, whether it takes an Idempotency-Key, the errors it can answer, and which seal
keys it uses. From this table come: the local server's routes (shared/local.py), the OpenAPI
document (shared/openapi.py), deploy.sh's list and order (`python -m shared.endpoints`), the
Firebase Hosting rewrites (`python -m shared.endpoints rewrites --region R`) and the tests'
expectations. Services are named as "module:function" and imported on first use, so a function's
cold start imports only the service it serves.
"""

from __future__ import annotations

import enum
import functools
import importlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from shared import errors, log_models, models
from shared.errors import ApiError

FUNCTION_PREFIX = "gbx-"


class Caller(enum.Enum):
    """Who may call an endpoint."""

    USER = "user"  # a Google ID token (runner, user, operator)
    PARTNER = "partner"  # a partner's Google ID token (GBX_PARTNERS), or X-GBX-ADMIN-TOKEN (the admin)
    OPERATOR = "operator"  # an operator's Google ID token (or the audit's own service account's: GBX_AUDITORS)
    PARTNER_OR_OPERATOR = "partner_or_operator"  # as PARTNER, or an operator's Google ID token
    ANYONE = "anyone"  # no authentication


class Body(enum.Enum):
    """What an endpoint's request body holds."""

    JSON = "json"
    SEAL = "seal"  # a seal.svg, raw (image/svg+xml) or as the multipart field `seal`
    QUERY = "query"  # no body: the request model is read from the query string
    PATH = "path"  # no body: the endpoint serves every path below its own, given to the request model as `path`
    NONE = "none"


class Keys(enum.Enum):
    """Which seal keys an endpoint uses; it orders deploys so a new key version is trusted before it signs."""

    NONE = "none"
    VERIFY = "verify"
    SIGN = "sign"


# Deploy order: verifiers (and the key publisher) first, the signer last.
_DEPLOY_RANK = {Keys.VERIFY: 0, Keys.NONE: 1, Keys.SIGN: 2}


@dataclass(frozen=True)
class Endpoint:
    """One Cloud Function, as the API shows it and as it is deployed."""

    name: str
    path: str
    method: str
    summary: str
    service: str
    caller: Caller
    response: type[BaseModel]
    request: type[BaseModel] | None = None
    body: Body = Body.JSON
    idempotent: bool = False
    errors: tuple[type[ApiError], ...] = ()
    keys: Keys = Keys.NONE
    # The response model can also answer as CSV (its `csv()`), for a caller whose Accept prefers text/csv.
    csv: bool = False
    # Invoked only through Cloud Run's invoker IAM check by its own service account (Cloud Scheduler), not
    # through Firebase Hosting, which can only reach services that skip that check.
    internal: bool = False
    # The function's timeout in seconds (gen2 HTTP functions allow up to 3600).
    timeout: int = 60
    # What a 200 answers when it is not the response model as JSON (the seal log's resources: models.LogResource).
    media_type: str = "application/json"
    # An internal function's Cloud Scheduler schedule (cron, UTC).
    schedule: str = "0 * * * *"

    @property
    def function_name(self) -> str:
        """The Cloud Function (and Cloud Run service) name: `gbx-` and the name with hyphens."""
        return FUNCTION_PREFIX + self.name.replace("_", "-")

    @property
    def all_errors(self) -> tuple[type[ApiError], ...]:
        """Every error the endpoint can answer: its own, and those its caller, body and options imply."""
        implied: list[type[ApiError]] = [errors.MethodNotAllowed, errors.Unavailable, ApiError]
        if self.body in (Body.JSON, Body.SEAL):
            implied += [errors.InvalidRequest, errors.PayloadTooLarge, errors.UnsupportedMediaType]
        if self.body in (Body.QUERY, Body.PATH):
            implied.append(errors.InvalidRequest)
        if self.body is Body.SEAL:
            implied.append(errors.InvalidSeal)
        if self.caller is Caller.USER:
            implied.append(errors.Unauthenticated)
        if self.caller in (Caller.PARTNER, Caller.OPERATOR, Caller.PARTNER_OR_OPERATOR):
            implied += [errors.Unauthenticated, errors.Forbidden]
        if self.idempotent:
            implied += [errors.InvalidRequest, errors.IdempotencyConflict]
        return tuple(dict.fromkeys([*self.errors, *implied]))

    def run(self, *args: Any, **kwargs: Any) -> BaseModel:
        """Call the service (imported on first use)."""
        return _service(self.service)(*args, **kwargs)


@functools.cache
def _service(target: str) -> Callable[..., BaseModel]:
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


ENDPOINTS: dict[str, Endpoint] = {
    endpoint.name: endpoint
    for endpoint in (
        Endpoint(
            "issue", "/api/entitlement/issue", "POST", "Issue runs to a customer principal",
            "shared.entitlements:issue", Caller.PARTNER, models.IssueResponse, models.IssueRequest, idempotent=True,
        ),
        Endpoint(
            "revoke", "/api/entitlement/revoke", "POST", "Take back all or some unused runs of one grant",
            "shared.partners:revoke", Caller.PARTNER_OR_OPERATOR, models.RevokeResponse, models.RevokeRequest, idempotent=True,
            errors=(errors.NotFound, errors.NotEnoughRuns),
        ),
        Endpoint(
            "check", "/api/entitlement/check", "POST", "Confirm entitlement availability for a run_id; writes nothing",
            "shared.entitlements:check", Caller.USER, models.CheckResponse, models.CheckRequest,
            errors=(errors.EntitlementExhausted, errors.RunIdReused),
        ),
        Endpoint(
            "consume", "/api/entitlement/consume", "POST", "Consume one run for run_id (retries replay without charge)",
            "shared.entitlements:consume", Caller.USER, models.ConsumeResponse, models.ConsumeRequest,
            errors=(errors.EntitlementExhausted, errors.RunIdReused),
        ),
        Endpoint(
            "run_start", "/api/entitlement/run_start", "POST", "Record run-start metadata",
            "shared.runs:run_start", Caller.USER, models.RunStartResponse, models.RunStartRequest,
            errors=(errors.RunStateConflict, errors.LifecycleViolation),
        ),
        Endpoint(
            "run_complete", "/api/entitlement/run_complete", "POST", "Record the outputs and return the signed seal bundle",
            "shared.seals:run_complete", Caller.USER, models.SealBundle, models.RunCompleteRequest,
            errors=(errors.RunStateConflict, errors.LifecycleViolation), keys=Keys.SIGN,
        ),
        Endpoint(
            "seal_verify", "/api/seal/verify", "POST", "Verify an uploaded seal.svg",
            "shared.seals:verify", Caller.USER, models.VerifyResponse, models.SealUpload, body=Body.SEAL, keys=Keys.VERIFY,
        ),
        Endpoint(
            "redeem_seal_once", "/api/entitlement/redeem_seal_once", "POST", "One bonus run for a verified (principal, seal_id) pair",
            "shared.seals:redeem_seal_once", Caller.USER, models.RedeemResponse, models.RedeemUpload, body=Body.SEAL,
            idempotent=True, errors=(errors.Forbidden, errors.AlreadyRedeemed, errors.SealInvalid), keys=Keys.VERIFY,
        ),
        Endpoint(
            "public_keys", "/api/seal/public_keys", "GET", "Public keys that seals are signed with",
            "shared.seals:public_keys", Caller.ANYONE, models.PublicKeysResponse, body=Body.NONE, keys=Keys.VERIFY,
        ),
        Endpoint(
            "entitlement_usage", "/api/entitlement/usage", "GET", "A principal's grants, balance, and runs consumed and granted as bonus in a time range",
            "shared.usage:usage", Caller.PARTNER_OR_OPERATOR, models.UsageResponse, models.UsageQuery, body=Body.QUERY, csv=True,
        ),
        Endpoint(
            "export", "/api/entitlement/export", "GET", "Billing export: one row per grant the caller may see, with the runs consumed and revoked in a time range",
            "shared.partners:export", Caller.PARTNER_OR_OPERATOR, models.ExportResponse, models.ExportQuery, body=Body.QUERY, csv=True,
        ),
        Endpoint(
            "log_proof", "/api/log/proof", "GET", "A c2sp.org/tlog-proof@v1 that the seal is in the seal log (waits up to 10 s for a seal not yet integrated)",
            "shared.sealog:log_proof", Caller.ANYONE, log_models.LogResource, log_models.LogProofQuery, body=Body.QUERY,
            errors=(errors.NotFound,), media_type="text/plain",
        ),
        Endpoint(
            "seal_log", "/log/", "GET", "The seal log as C2SP tlog-tiles serves it: /log/checkpoint, /log/tile/<L>/<N>[.p/<W>], /log/tile/entries/<N>[.p/<W>]",
            "shared.sealog:seal_log", Caller.ANYONE, log_models.LogResource, log_models.LogPath, body=Body.PATH,
            errors=(errors.NotFound,), media_type="application/octet-stream",
        ),
        Endpoint(
            "log_integrate", "/api/log/integrate", "POST", "Sequence the seal log's waiting entries into a new signed checkpoint (the scheduled catch-up)",
            "shared.sealog:log_integrate", Caller.OPERATOR, log_models.LogIntegrateResponse, body=Body.NONE, internal=True,
            schedule="* * * * *",
        ),
        Endpoint(
            "ledger_audit", "/api/ledger/audit", "POST", "Check the next pages of grant documents against their ledger (a pass resumes where the last call stopped)",
            "shared.audit:ledger_audit", Caller.OPERATOR, models.AuditResponse, body=Body.NONE, internal=True, timeout=1800,
        ),
        Endpoint(
            "events_sweep", "/api/events/sweep", "POST", "Publish the partners' events that their requests left unpublished, in commit order",
            "shared.events:events_sweep", Caller.OPERATOR, models.SweepResponse, body=Body.NONE, internal=True, timeout=120,
            schedule="* * * * *",
        ),
    )
}


def deploy_order() -> list[Endpoint]:
    """Verifiers first, the signer last; otherwise as declared."""
    return sorted(ENDPOINTS.values(), key=lambda e: _DEPLOY_RANK[e.keys])


def hosting_rewrites(region: str) -> list[dict[str, Any]]:
    """Firebase Hosting rewrites: each contract path to its gen2 function's Cloud Run service (internal ones excepted)."""
    return [{"source": route_glob(e), "run": {"serviceId": e.function_name, "region": region}} for e in ENDPOINTS.values() if not e.internal]


def route_glob(endpoint: Endpoint) -> str:
    """The Hosting glob of an endpoint: its path, or every path below it (`/log/**`) for one that serves a subtree."""
    return endpoint.path + "**" if endpoint.body is Body.PATH else endpoint.path


def main(argv: list[str] | None = None) -> None:
    """Print the registry for deploy.sh: one tab-separated line per function, or the Hosting rewrites as JSON."""
    import argparse  # the command line only: a function's cold start does not import it

    parser = argparse.ArgumentParser(prog="python -m shared.endpoints", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command")
    commands.add_parser(
        "list", help="NAME FUNCTION METHOD PATH CALLER KEYS TIMEOUT ACCESS (public or internal) SCHEDULE, one line per endpoint in deploy order (the default)"
    )
    rewrites = commands.add_parser("rewrites", help="the Firebase Hosting rewrites of every path, as JSON")
    rewrites.add_argument("--region", required=True, help="region the functions are deployed in")
    args = parser.parse_args(argv)
    if args.command == "rewrites":
        json.dump(hosting_rewrites(args.region), sys.stdout, indent=2)
        print()
        return
    for e in deploy_order():
        access = "internal" if e.internal else "public"
        print("\t".join((e.name, e.function_name, e.method, e.path, e.caller.value, e.keys.value, str(e.timeout), access, e.schedule)))


if __name__ == "__main__":
    main()
