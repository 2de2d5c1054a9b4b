"""Configuration, read once from environment variables into a frozen model."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

# Environment variable names, in one place.
ENV_PROJECT = "GOOGLE_CLOUD_PROJECT"
ENV_ISSUER = "GBX_ISSUER"
ENV_PUBLIC_URL = "GBX_PUBLIC_URL"
ENV_AUDIENCES = "GBX_AUDIENCES"
ENV_CERTS_URL = "GBX_CERTS_URL"
ENV_ADMIN_TOKEN = "GBX_ADMIN_TOKEN"
ENV_OPERATORS = "GBX_OPERATORS"
ENV_PARTNERS = "GBX_PARTNERS"
ENV_SIGNER = "GBX_SIGNER"
ENV_KMS_KEY_VERSION = "GBX_KMS_KEY_VERSION"
ENV_TRUSTED_KEY_VERSIONS = "GBX_TRUSTED_KEY_VERSIONS"
ENV_KMS_ENDPOINT = "GBX_KMS_ENDPOINT"
ENV_LOCAL_DIR = "GBX_LOCAL_DIR"
ENV_LOCAL_MODE = "GBX_LOCAL_MODE"
ENV_FIRESTORE_TIMEOUT = "GBX_FIRESTORE_TIMEOUT_SECONDS"
ENV_FIRESTORE_RETRY = "GBX_FIRESTORE_RETRY_SECONDS"
ENV_AUDITORS = "GBX_AUDITORS"
ENV_FIRESTORE_DATABASE = "GBX_FIRESTORE_DATABASE"
ENV_AUDIT_PAGE_SIZE = "GBX_AUDIT_PAGE_SIZE"
ENV_AUDIT_BUDGET = "GBX_AUDIT_BUDGET_SECONDS"
ENV_LOG_KEY_VERSION = "GBX_LOG_KEY_VERSION"
ENV_EVENTS = "GBX_EVENTS"
ENV_EVENTS_TOPIC = "GBX_EVENTS_TOPIC"
ENV_LOW_BALANCE = "GBX_LOW_BALANCE"
ENV_EVENTS_EXACT_MARGIN = "GBX_EVENTS_EXACT_MARGIN"
ENV_EVENTS_SWEEP_GRACE = "GBX_EVENTS_SWEEP_GRACE_SECONDS"
ENV_EVENTS_PARTNER_TOPICS = "GBX_EVENTS_PARTNER_TOPICS"

GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"
GOOGLE_ISSUERS = ("accounts.google.com", "https://accounts.google.com")
LOCAL_AUDIENCE = "gbx-local"
LOCAL_PROJECT = "gbx-local"
LOCAL_ADMIN_TOKEN = "local-admin-token"
LOCAL_OPERATORS = "operator@gbx.local"
LOCAL_PARTNERS = "partner@gbx.local,partner2@gbx.local"
LOCAL_PUBLIC_URL = "http://127.0.0.1:8080"
REPO_ROOT = Path(__file__).resolve().parent.parent


def _split(value: str) -> tuple[str, ...]:
    """Split a comma-separated setting into its non-empty, stripped parts."""
    return tuple(part.strip() for part in value.split(",") if part.strip())


class Config(BaseModel):
    """Everything the service is configured with; never holds per-request state."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    project: str = Field(description="Google Cloud project that holds Firestore.")
    issuer: str = Field(description="Deployment name written into every seal's `issuer` claim.")
    public_url: str = Field(description="The deployment's public base URL (Hosting's), where seals' verification links point.")
    audiences: tuple[str, ...] = Field(description="ID-token audiences accepted (the service URLs).")
    certs_url: str = Field(description="Where the ID-token signing certificates are read (https URL or file path).")
    token_issuers: tuple[str, ...] = Field(description="Accepted `iss` claims.")
    admin_token: str = Field(repr=False, description="Secret compared with X-GBX-ADMIN-TOKEN.")
    operators: frozenset[str] = Field(description="Identities that may act for the principal a seal names, and read and revoke every grant.")
    partners: frozenset[str] = Field(description="Identities that issue, read, revoke and export their own grants (GBX_PARTNERS).")
    signer: str = Field(description="`kms` (Cloud KMS) or `local` (a local P-256 key).")
    kms_key_version: str = Field(description="CryptoKeyVersion that signs new seals (kms signer).")
    trusted_key_versions: tuple[str, ...] = Field(description="Key versions whose seals verify, the signing one included.")
    kms_endpoint: str = Field(description="host:port of a KMS endpoint reached without TLS (tests only); empty for Google's.")
    local_dir: Path = Field(description="Untracked folder holding local mode's keys.")
    local_mode: bool = Field(description="True when served by `python -m shared.local`.")
    firestore_timeout_seconds: float = Field(gt=0, description="Timeout of one Firestore call.")
    firestore_retry_seconds: float = Field(gt=0, description="Budget of a Firestore read's retries on transient errors.")
    firestore_database: str = Field(description="The Firestore database: `(default)`, or a restored one put in service (see the restore drill).")
    auditors: frozenset[str] = Field(description="Identities that may call the ledger audit besides the operators (the scheduler's service account).")
    audit_page_size: int = Field(ge=1, le=1000, description="Grant documents the ledger audit reads per page.")
    audit_budget_seconds: float = Field(gt=0, description="How long one ledger audit call checks pages before it saves its cursor and answers.")
    log_key_version: str = Field(description="The EC_SIGN_ED25519 CryptoKeyVersion that signs the seal log's checkpoints (kms signer); never the seal key.")
    events: bool = Field(description="Record every committed change as an event and publish it to Pub/Sub (GBX_EVENTS=0 turns it off).")
    events_topic: str = Field(description="The Pub/Sub topic of the partners' events (in the configured project).")
    low_balance: int = Field(ge=0, description="`balance.low` fires when a partner's runs left for a principal fall to this or below.")
    events_exact_margin: int = Field(ge=1, description="Within this many runs above the low line a consume decides the crossing exactly (see docs/design.md).")
    events_sweep_grace_seconds: float = Field(ge=0, description="The sweeper leaves events younger than this to the request that recorded them.")
    events_partner_topics: bool = Field(description="Also publish each event to a topic of its partner (local mode: emulators before SDK 555 ignore subscription filters).")


def load_config(env: dict[str, str] | os._Environ[str] | None = None) -> Config:
    """Build the configuration from an environment mapping (default: the process environment)."""
    env = os.environ if env is None else env
    local_mode = env.get(ENV_LOCAL_MODE, "") == "1"
    project = env.get(ENV_PROJECT) or (LOCAL_PROJECT if local_mode else "")
    local_dir = Path(env.get(ENV_LOCAL_DIR) or REPO_ROOT / ".gbx-local")
    signer = env.get(ENV_SIGNER) or ("local" if local_mode else "kms")
    kms_key_version = env.get(ENV_KMS_KEY_VERSION, "")
    trusted = _split(env.get(ENV_TRUSTED_KEY_VERSIONS, ""))
    if kms_key_version and kms_key_version not in trusted:
        trusted = (kms_key_version, *trusted)
    return Config(
        project=project,
        issuer=env.get(ENV_ISSUER) or ("local" if local_mode else project),
        # Hosting's default site is the project's (deploy.sh --site); local mode's server sets its own URL.
        public_url=(env.get(ENV_PUBLIC_URL) or (LOCAL_PUBLIC_URL if local_mode else f"https://{project}.web.app")).rstrip("/"),
        audiences=_split(env.get(ENV_AUDIENCES, "")) or ((LOCAL_AUDIENCE,) if local_mode else ()),
        certs_url=env.get(ENV_CERTS_URL) or (str(local_dir / "certs.json") if local_mode else GOOGLE_CERTS_URL),
        token_issuers=GOOGLE_ISSUERS,
        admin_token=env.get(ENV_ADMIN_TOKEN) or (LOCAL_ADMIN_TOKEN if local_mode else ""),
        operators=frozenset(op.lower() for op in _split(env.get(ENV_OPERATORS) or (LOCAL_OPERATORS if local_mode else ""))),
        partners=frozenset(p.lower() for p in _split(env.get(ENV_PARTNERS) or (LOCAL_PARTNERS if local_mode else ""))),
        signer=signer,
        kms_key_version=kms_key_version,
        trusted_key_versions=trusted,
        kms_endpoint=env.get(ENV_KMS_ENDPOINT, ""),
        local_dir=local_dir,
        local_mode=local_mode,
        # 5 s per call, retried within 10 s: an outage ends in our 503 well inside a function's 60 s timeout.
        firestore_timeout_seconds=float(env.get(ENV_FIRESTORE_TIMEOUT) or 5.0),
        firestore_retry_seconds=float(env.get(ENV_FIRESTORE_RETRY) or 10.0),
        firestore_database=env.get(ENV_FIRESTORE_DATABASE) or "(default)",
        auditors=frozenset(a.lower() for a in _split(env.get(ENV_AUDITORS, ""))),
        audit_page_size=int(env.get(ENV_AUDIT_PAGE_SIZE) or 300),
        # deploy.sh gives the audit function a 30-minute timeout; a call stops checking well before it.
        audit_budget_seconds=float(env.get(ENV_AUDIT_BUDGET) or 1500.0),
        log_key_version=env.get(ENV_LOG_KEY_VERSION, ""),
        events=env.get(ENV_EVENTS, "1") != "0",
        events_topic=env.get(ENV_EVENTS_TOPIC) or "gbx-events",
        low_balance=int(env.get(ENV_LOW_BALANCE) or 5),
        events_exact_margin=int(env.get(ENV_EVENTS_EXACT_MARGIN) or 50),
        events_sweep_grace_seconds=float(env.get(ENV_EVENTS_SWEEP_GRACE) or 10.0),
        events_partner_topics=env.get(ENV_EVENTS_PARTNER_TOPICS, "1" if local_mode else "0") == "1",
    )


@functools.cache
def get_config() -> Config:
    """The process-wide configuration, read on first use (tests call `get_config.cache_clear()`)."""
    return load_config()
