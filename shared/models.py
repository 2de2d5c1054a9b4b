"""Pydantic models: the only schema of requests and responses (the OpenAPI document is generated from them)."""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, TypeAdapter, WithJsonSchema, model_validator
from pydantic.config import JsonDict

RUN_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
IMAGE_PATTERN = r"^[a-z0-9]+(?:[._-][a-z0-9]+)*(?:(?::[0-9]{1,5})?/[a-z0-9]+(?:[._-][a-z0-9]+)*)*(?:/[a-z0-9]+(?:[._-]+[a-z0-9]+)*)*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?@sha256:[0-9a-f]{64}$"
PROJECT_ID_PATTERN = r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$"
SHA256_PATTERN = r"^[0-9a-fA-F]{64}$"
# A principal is an email address (service accounts and users); '/' would break document paths.
PRINCIPAL_PATTERN = r"^[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+$"
PLAN_ID_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
# Grant ids are 128 random bits in hex (issue and redeem choose them).
GRANT_ID_PATTERN = r"^[0-9a-f]{32}$"


RFC3339_UTC_PATTERN = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$"

# What each pattern asks for, in words: a 400 says this instead of quoting the regular expression.
PATTERN_WORDS = {
    RUN_ID_PATTERN: "1 to 128 characters of A-Z, a-z, 0-9, '.', '_', ':' and '-'",
    IMAGE_PATTERN: "a digest-pinned image, NAME[:TAG]@sha256:<64 lower-case hex> (a bare tag proves nothing)",
    PROJECT_ID_PATTERN: "a Google Cloud project id: 6 to 30 characters of a-z, 0-9 and '-', starting with a letter, not ending with '-'",
    SHA256_PATTERN: "64 hex characters",
    PRINCIPAL_PATTERN: "an email address",
    PLAN_ID_PATTERN: "1 to 64 characters of A-Z, a-z, 0-9, '.', '_' and '-'",
    GRANT_ID_PATTERN: "a grant id: 32 lower-case hex characters",
    RFC3339_UTC_PATTERN: "an RFC 3339 UTC time such as 2030-01-01T00:00:00Z",
}


def _rfc3339_utc(value: object) -> dt.datetime:
    """Accept only the contract's time format, RFC 3339 UTC with `Z` (no epoch numbers, no offsets, no spaces)."""
    if isinstance(value, dt.datetime) and value.tzinfo is not None:
        return value.astimezone(dt.UTC)
    if not isinstance(value, str) or not re.fullmatch(RFC3339_UTC_PATTERN, value):
        raise ValueError("time must be RFC 3339 UTC with Z, e.g. 2030-01-01T00:00:00Z")
    return dt.datetime.fromisoformat(value[:-1]).replace(tzinfo=dt.UTC)  # ValueError for 2030-02-30


def format_time(value: dt.datetime) -> str:
    """RFC 3339 UTC with `Z`: seconds, plus microseconds when there are any."""
    value = value.astimezone(dt.UTC)
    spec = "microseconds" if value.microsecond else "seconds"
    return value.replace(tzinfo=None).isoformat(timespec=spec) + "Z"


RunId = Annotated[str, StringConstraints(pattern=RUN_ID_PATTERN), Field(description="Caller-chosen run id, unique per run.", examples=["nightly-2026-11-28"])]
Sha256Hex = Annotated[str, StringConstraints(pattern=SHA256_PATTERN, to_lower=True), Field(description="64 hex characters (stored lower-case).")]
Principal = Annotated[str, StringConstraints(pattern=PRINCIPAL_PATTERN, to_lower=True, max_length=254), Field(description="Service-account or user email (lower-cased).")]
# The schema says what the validator enforces, so a client generated from it sends only what is accepted.
UtcTime = Annotated[
    dt.datetime,
    BeforeValidator(_rfc3339_utc),
    WithJsonSchema({"type": "string", "format": "date-time", "pattern": RFC3339_UTC_PATTERN, "examples": ["2030-01-01T00:00:00Z"]}),
]
# JSON Schema counts 3.0 as an integer; the server (strict) does not: say so, and mark it for generators.
INTEGER_LITERAL: JsonDict = {"x-integer-literal": True}


class Model(BaseModel):
    """Base of every request and response: unknown fields rejected, instances immutable, no coercion."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class RunRecord(BaseModel):
    """A run document, `principals/{principal}/runs/r:{run_id}`: consumed → started → completed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str
    principal: str
    state: Literal["consumed", "started", "completed"]
    grant_id: str = Field(description="The issued grant the run was charged to.")
    shard: str = Field(description="The grant document charged (the grant's own unless it is sharded).")
    plan_id: str
    charge_id: str = Field(description="Marks the consume request that charged it (recognises its own lost reply).")
    consumed_at: dt.datetime
    started_at: dt.datetime | None = None
    container_image: str | None = None
    project_id: str | None = None
    inputs_sha256: str | None = None
    run_manifest_sha256: str | None = None
    completed_at: dt.datetime | None = None
    outputs_sha256: str | None = None
    seal_id: str | None = None
    partner: str | None = Field(None, description="The `issued_by` of the grant charged (None for a bonus grant, and in runs consumed before events).")


class RunIdRequest(Model):
    """Body of check and consume."""

    run_id: RunId


class CheckRequest(RunIdRequest):
    """POST /api/entitlement/check: may this run_id run now?"""


class ConsumeRequest(RunIdRequest):
    """POST /api/entitlement/consume: take one run for this run_id."""


class RunStartRequest(Model):
    """POST /api/entitlement/run_start: what is about to run, and on what."""

    run_id: RunId
    container_image: Annotated[str, StringConstraints(pattern=IMAGE_PATTERN, max_length=512)] = Field(
        description="Digest-pinned image, NAME[:TAG]@sha256:<64 hex>; a bare tag is rejected.",
        examples=["europe-docker.pkg.dev/acme/jobs/render:1.4@sha256:" + "a" * 64],
    )
    project_id: Annotated[str, StringConstraints(pattern=PROJECT_ID_PATTERN)] = Field(description="Google Cloud project the job runs in.")
    inputs_sha256: Sha256Hex = Field(description="SHA-256 of the run's inputs.")
    run_manifest_sha256: Sha256Hex | None = Field(default=None, description="SHA-256 of the run manifest, when there is one.")


class RunCompleteRequest(Model):
    """POST /api/entitlement/run_complete: the run succeeded with these outputs."""

    run_id: RunId
    outputs_sha256: Sha256Hex = Field(description="SHA-256 of the run's outputs.")


class IssueRequest(Model):
    """POST /api/entitlement/issue: grant runs to a principal."""

    principal: Principal
    runs_total: int = Field(
        ge=1, le=1_000_000, description="Runs in the grant, 1 to 1,000,000, as an integer literal (3, not 3.0 or \"3\").", json_schema_extra=INTEGER_LITERAL
    )
    plan_id: Annotated[str, StringConstraints(pattern=PLAN_ID_PATTERN)] = Field(default="standard", description="Partner's plan name.")
    expires_at: UtcTime | None = Field(default=None, description="RFC 3339 expiry in the future; null or absent: never expires.")

# Bodies are validated with `model_validate_json`: strict mode still reads RFC 3339 strings into datetimes
# there, while refusing "3" for an int or 1 for a bool.


class CheckResponse(Model):
    """200 from check."""

    run_id: str
    principal: str
    available: bool = Field(description="Always true on 200 (otherwise 402 or 409).")
    balance: int = Field(description="Unused runs of unexpired grants.")
    state: Literal["new", "consumed"] = Field(description="`consumed`: charged earlier, resumable, no new charge.")


class ConsumeResponse(Model):
    """200 from consume."""

    run_id: str
    principal: str
    balance: int = Field(
        description="Balance after this charge: the balance read just before the commit, less this charge. Exact unless other consumes "
        "of the principal commit at the same moment, whose runs it may then still count."
    )
    state: Literal["consumed"]
    replayed: bool = Field(description="True when the run was charged by an earlier request (no new charge).")


class RunStartResponse(Model):
    """200 from run_start."""

    run_id: str
    state: Literal["started"]
    started_at: str


class IssueResponse(Model):
    """200 from issue."""

    grant_id: str
    principal: str
    plan_id: str
    runs_total: int
    expires_at: str | None
    issued_by: str = Field(description="Who issued the grant: the partner's email; with the admin token, its ID token's email, else `admin`.")
    balance: int = Field(description="The principal's balance right after this grant was issued (to a partner: of its own grants only).")
    replayed: bool = Field(description="True when an earlier request with this Idempotency-Key issued the grant.")


class ErrorDetail(Model):
    """The error object; a 409 may add what the caller needs to act on it (absent otherwise)."""

    code: str
    message: str
    status: int
    state: Literal["started", "completed"] | None = Field(default=None, description="run_id_reused: the run's state.")
    redeemed_at: str | None = Field(default=None, description="already_redeemed: when the pair was redeemed.")
    grant_id: str | None = Field(default=None, description="already_redeemed: the grant the redemption gave.")
    remaining: int | None = Field(default=None, description="not_enough_runs: the grant's unused runs now.")


class ErrorBody(Model):
    """Every error response body."""

    error: ErrorDetail


class SealUpload(Model):
    """A seal upload (verify): a seal.svg raw (image/svg+xml) or as the multipart field `seal`, or a verification link (text/uri-list)."""

    svg: bytes = Field(default=b"", description="The seal.svg bytes (empty when a link was sent).")
    link: str | None = Field(default=None, description="The verification link BASE/v#P.S, when sent as text/uri-list.")


class RedeemUpload(SealUpload):
    """A seal.svg upload for redeem_seal_once, and the principal an operator names (multipart field, else ?principal=)."""

    principal: Principal | None = Field(default=None, description="Operators only: the principal to redeem for.")


class SealBundle(Model):
    """200 from run_complete: the seal and everything needed to check it offline."""

    seal_id: str = Field(description="Opaque, URL-safe, unguessable seal id.")
    seal_json: str = Field(description="The canonical seal.json that was signed.")
    signature: str = Field(description="Base64 (standard) of the DER ECDSA signature over SHA-256(seal_json).")
    alg: Literal["ES256"]
    key: str = Field(description="CryptoKeyVersion resource name that signed the seal.")
    public_key_pem: str | None = Field(description="SPKI PEM of `key` (null only once that version is no longer trusted).")
    seal_svg: str = Field(description="The seal.svg badge carrying the signed payload in its metadata, and the verification link as a QR code.")
    verify_link: str = Field(
        description="BASE/v#P.S: P is base64url (no padding) of the raw DEFLATE of seal_json's bytes, S of the DER signature. "
        "Opening it in a browser verifies the seal there; POST /api/seal/verify takes it as text/uri-list."
    )


class VerifyChecks(Model):
    """Each check is `ok` or a short reason; later checks are `not checked` once one fails. Listed in the order they run."""

    document: str
    key: str
    signature: str
    record: str


# The claims stay the payload's own dict (an absent manifest stays absent); the schema is SealClaims'.
SealClaimsOrEmpty = Annotated[
    dict[str, Any],
    WithJsonSchema(
        {
            "anyOf": [
                {"$ref": "#/components/schemas/SealClaims"},
                {"type": "object", "maxProperties": 0, "description": "The payload does not decode."},
            ]
        }
    ),
]


def seal_claims_schema() -> dict[str, Any]:
    """The JSON schema of seal.json's claims, from the format module's SealClaims (for the OpenAPI document)."""
    # Imported here: only the OpenAPI generator needs it, and a function's cold start should not.
    from gbx_client.seal_format import SealClaims

    schema = TypeAdapter(SealClaims).json_schema()
    schema["properties"]["run_manifest_sha256"] = {"type": "string", "description": "Absent when the run had no manifest."}
    schema["properties"]["v"] = {"const": 1}
    schema["additionalProperties"] = False
    return schema


class VerifyResponse(Model):
    """200 from verify."""

    status: Literal["VERIFIED", "INVALID"]
    seal_id: str | None = Field(description="The payload's seal_id, when the payload decodes.")
    checks: VerifyChecks
    seal: SealClaimsOrEmpty = Field(description="The payload's claims (empty when the payload does not decode).")
    redeemed: bool = Field(description="Whether the seal's own principal has redeemed it; false unless the seal is VERIFIED.")


class RedeemResponse(Model):
    """200 from redeem_seal_once."""

    seal_id: str
    principal: str
    granted_runs: Literal[1]
    grant_id: str = Field(description="The one-run `seal_rerun` grant the redemption gave.")
    balance: int = Field(description="The principal's balance right after the redemption.")
    replayed: bool = Field(description="True when an earlier request with this Idempotency-Key redeemed the seal.")


class PublicKeyInfo(Model):
    """One trusted signing key version."""

    key: str = Field(description="CryptoKeyVersion resource name.")
    alg: Literal["ES256"]
    pem: str = Field(description="SPKI PEM public key.")


class LogKeyInfo(Model):
    """The seal log's identity: its checkpoints' origin and the verifier key that signs them."""

    origin: str = Field(description="The log's origin (the base URL without scheme, plus /log): every checkpoint's first line.")
    vkey: str = Field(description="The signed-note verifier key of its checkpoints: origin+hex(key ID)+base64(0x01 || Ed25519 public key).")


class PublicKeysResponse(Model):
    """200 from public_keys."""

    keys: list[PublicKeyInfo]
    log: LogKeyInfo | None = Field(default=None, description="The seal log's origin and checkpoint key (absent while its key cannot be read).")


class LedgerMismatch(Model):
    """A grant document whose unused runs disagree with its ledger."""

    principal: str = Field(description="The principal the grant belongs to.")
    grant_id: str = Field(description="The issued grant (its `group`).")
    shard: str = Field(description="The grant document that disagrees (the grant's own id unless the grant is sharded).")
    expected: int = Field(description="What the ledger says: the sum of the deltas of its entries for this document.")
    found: int = Field(description="What the document holds: its `remaining`.")


class LogAudit(Model):
    """The seal log's part of an audit pass: every seal in the log exactly once, the tiles hashing to the latest checkpoint."""

    size: int = Field(description="Entries in the log's latest checkpoint.")
    seals: int = Field(description="Seal records checked.")
    pending: int = Field(description="Seals whose entries wait to be integrated (not a problem: the next checkpoint covers them).")
    problems: list[str] = Field(description="What disagrees (at most 100 listed; every one is logged): a seal missing from the log or in it twice, "
                                            "tiles that do not hash to the checkpoint's root, a checkpoint that does not verify.")
    problem_count: int = Field(description="How many problems were found.")


class AuditResponse(Model):
    """200 from the ledger audit: what this call checked, and where the pass it belongs to stands."""

    checked_grants: int = Field(description="Grant documents checked by this call.")
    mismatches: list[LedgerMismatch] = Field(description="Every grant document this call found disagreeing with its ledger.")
    pass_complete: bool = Field(description="True when this call reached the last grant document: the next call starts a new pass.")
    pass_started_at: str = Field(description="When the pass this call belongs to started.")
    pass_checked_grants: int = Field(description="Grant documents checked by the pass so far, this call included.")
    pass_mismatches: int = Field(description="Mismatches found by the pass so far, this call included.")
    log: LogAudit | None = Field(default=None, description="The seal log's check, run by the call that completes a pass.")


class UsageQuery(Model):
    """GET /api/entitlement/usage: the query string."""

    principal: Principal
    from_: UtcTime | None = Field(default=None, alias="from", description="Count ledger entries at or after this time (RFC 3339 UTC).")
    to: UtcTime | None = Field(default=None, description="Count ledger entries before this time (RFC 3339 UTC).")

    @model_validator(mode="after")
    def _ordered(self) -> UsageQuery:
        if self.from_ is not None and self.to is not None and self.from_ > self.to:
            raise ValueError("`from` must not be after `to`")
        return self


class UsageGrant(Model):
    """One issued grant, its shards summed."""

    grant_id: str
    plan_id: str
    runs_total: int = Field(description="Runs the grant was issued with.")
    remaining: int = Field(description="Its unused runs (expired or not).")
    expires_at: str | None = Field(description="RFC 3339 expiry; null: never expires.")


USAGE_CSV_COLUMNS = ("row", "principal", "grant_id", "plan_id", "runs_total", "remaining", "expires_at", "balance", "consumed", "bonus", "counted_from", "counted_to")


class UsageResponse(Model):
    """200 from usage (also as text/csv: a header row, one row per grant, then a `total` row)."""

    principal: str
    balance: int = Field(description="Unused runs of unexpired grants, now.")
    consumed: int = Field(description="Runs consumed between `from` and `to` (ledger time).")
    bonus: int = Field(description="Bonus runs granted by redeemed seals between `from` and `to` (ledger time).")
    counted_from: str | None = Field(description="The `from` the counts start at, or null (the first entry).")
    counted_to: str | None = Field(description="The `to` the counts end before, or null (now).")
    grants: list[UsageGrant] = Field(description="Every grant of the principal, oldest first.")

    def csv(self) -> str:
        """The same as CSV: a header row, one `grant` row per grant, and a `total` row holding the totals."""
        import csv
        import io

        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=USAGE_CSV_COLUMNS, lineterminator="\r\n")
        writer.writeheader()
        for grant in self.grants:
            writer.writerow({"row": "grant", "principal": self.principal, **grant.model_dump()})
        writer.writerow(
            {
                "row": "total",
                "principal": self.principal,
                "runs_total": sum(g.runs_total for g in self.grants),
                "remaining": sum(g.remaining for g in self.grants),
                "balance": self.balance,
                "consumed": self.consumed,
                "bonus": self.bonus,
                "counted_from": self.counted_from,
                "counted_to": self.counted_to,
            }
        )
        return out.getvalue()


GrantId = Annotated[str, StringConstraints(pattern=GRANT_ID_PATTERN), Field(description="A grant id, as issue (or redeem) answered it.")]


class RevokeRequest(Model):
    """POST /api/entitlement/revoke: take back unused runs of one grant."""

    principal: Principal
    grant_id: GrantId
    runs: int | None = Field(
        default=None, ge=1, le=1_000_000, description="Exactly this many unused runs (else 409 not_enough_runs); absent: all of them.",
        json_schema_extra=INTEGER_LITERAL,
    )


class RevokeResponse(Model):
    """200 from revoke."""

    grant_id: str
    principal: str
    revoked: int = Field(description="Runs taken back by this revoke (0 when the grant had none left and `runs` was absent).")
    remaining: int = Field(description="The grant's unused runs after it.")
    balance: int = Field(description="The principal's balance after it (to a partner: of its own grants only).")
    replayed: bool = Field(description="True when an earlier request with this Idempotency-Key made the revocation.")


class ExportQuery(Model):
    """GET /api/entitlement/export: the query string."""

    from_: UtcTime = Field(alias="from", description="Count ledger entries at or after this time (RFC 3339 UTC).")
    to: UtcTime = Field(description="Count ledger entries before this time, and list grants issued before it (RFC 3339 UTC).")
    page_size: int = Field(default=500, ge=1, le=1000, description="Rows per page, 1 to 1000.")
    page_token: str | None = Field(default=None, max_length=2048, description="The `next_page_token` of the previous page of the same query.")

    @model_validator(mode="before")
    @classmethod
    def _page_size_from_query(cls, data: Any) -> Any:
        # A query string carries text: page_size=10 arrives as "10" (and only digits are a number here).
        if isinstance(data, dict) and isinstance(data.get("page_size"), str):
            text = data["page_size"]
            if not re.fullmatch(r"[0-9]{1,7}", text):
                raise ValueError("page_size: must be an integer from 1 to 1000")
            data = {**data, "page_size": int(text)}
        return data

    @model_validator(mode="after")
    def _ordered(self) -> ExportQuery:
        if self.from_ >= self.to:
            raise ValueError("`from` must be before `to`")
        return self


class ExportRow(Model):
    """One grant in the export."""

    principal: str
    grant_id: str
    plan_id: str
    issued_by: str | None = Field(description="The partner (or `admin`) that issued it; null for a bonus grant.")
    runs_total: int
    remaining: int = Field(description="Its unused runs now (expired or not).")
    expires_at: str | None
    consumed: int = Field(description="Runs consumed from it in [from, to) (ledger time).")
    revoked: int = Field(description="Runs revoked from it in [from, to) (ledger time).")
    bonus: bool = Field(description="True for the one-run grant a redeemed seal gave (`seal_rerun`).")


EXPORT_CSV_COLUMNS = tuple(ExportRow.model_fields)


class ExportResponse(Model):
    """200 from export (also as text/csv: a header row and the rows; the next page token in X-Next-Page-Token)."""

    from_: str = Field(alias="from", serialization_alias="from")
    to: str
    rows: list[ExportRow] = Field(description="The grants of this page, oldest first (issue time, then id).")
    next_page_token: str | None = Field(description="Pass as `page_token` for the next page; null on the last page.")

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True, serialize_by_alias=True)

    def csv(self) -> str:
        """The rows as CSV: a header row, then one row per grant."""
        import csv
        import io

        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=EXPORT_CSV_COLUMNS, lineterminator="\r\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow(row.model_dump())
        return out.getvalue()

    def csv_headers(self) -> dict[str, str]:
        """The next page token beside a CSV page (absent on the last page)."""
        return {"X-Next-Page-Token": self.next_page_token} if self.next_page_token else {}


class SweepResponse(Model):
    """The events sweeper's answer: what one sweep published."""

    published: int = Field(description="Events published (and marked published) by this sweep.")
    failed: int = Field(description="Events whose publish failed (left for the next sweep).")
    unpublished: int = Field(description="Events still unpublished after this sweep (the younger ones wait for their own request's publish).")
