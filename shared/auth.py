"""Authentication: Google-signed OIDC ID tokens (verified with google-auth) and the admin token."""

from __future__ import annotations

import enum
import hmac
import json
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import google.auth.exceptions
import google.auth.jwt

from shared import errors
from shared.config import Config, get_config
from shared.models import PRINCIPAL_PATTERN

ADMIN_TOKEN_HEADER = "X-GBX-ADMIN-TOKEN"
# Google's certificates rotate over days and are served with max-age of hours; refetching on an
# unknown key id covers a fresh rotation, but no more often than this, so forged kids cannot
# turn every request into an outbound fetch.
DEFAULT_CERTS_TTL_SECONDS = 3600
MIN_REFRESH_INTERVAL_SECONDS = 60
CLOCK_SKEW_SECONDS = 10
# Google ID tokens are about 1 KB; anything far larger is refused before it is decoded.
MAX_TOKEN_CHARS = 16 * 1024
_MAX_AGE = re.compile(r"max-age=(\d+)")
# A runner sends one ID token for up to an hour: a token that verified is remembered until it expires,
# so its RS256 check is not repeated on every request (bounded, least recently used first out).
VERIFIED_CACHE_SIZE = 1024


@dataclass(frozen=True)
class Identity:
    """A caller whose Google ID token verified."""

    principal: str
    operator: bool


class Role(enum.Enum):
    """What a caller of a partner endpoint may do."""

    PARTNER = "partner"  # an identity in GBX_PARTNERS: its own grants only
    ADMIN = "admin"  # the X-GBX-ADMIN-TOKEN holder: every grant, as every partner
    OPERATOR = "operator"  # an identity in GBX_OPERATORS: reads and revokes every grant, issues nothing


# What a grant issued with the admin token alone records as its issuer (and grants written before
# `issued_by` existed read as).
ADMIN_ISSUER = "admin"


@dataclass(frozen=True)
class PartnerCaller:
    """A caller of a partner endpoint (issue, revoke, usage, export): a partner, the admin or an operator."""

    role: Role
    # The verified email of the ID token sent (None: the admin token alone).
    email: str | None

    @property
    def issued_by(self) -> str:
        """What a grant this caller issues records: the partner, or the admin token's ID-token email, else `admin`."""
        return self.email or ADMIN_ISSUER

    @property
    def partner(self) -> str | None:
        """The partner whose grants alone this caller sees and changes; None for the admin and operators (every grant)."""
        return self.email if self.role is Role.PARTNER else None

    @property
    def namespace(self) -> str:
        """Whose Idempotency-Keys these are: each partner's own; the admin token's one namespace; each operator's own."""
        return ADMIN_ISSUER if self.role is Role.ADMIN else f"{self.role.value}:{self.email}"

    @property
    def name(self) -> str:
        """Who acted, for the request log."""
        return self.email or ADMIN_ISSUER


class CertificateCache:
    """Signing certificates of the token issuer, fetched once and reused until they expire."""

    def __init__(self, source: str) -> None:
        self._source = source
        self._lock = threading.Lock()
        self._certs: dict[str, str] = {}
        self._expires = 0.0
        self._fetched = 0.0

    def get(self, *, refresh: bool = False) -> dict[str, str]:
        """The certificates by key id; `refresh` asks for a new copy (rate-limited)."""
        with self._lock:
            now = time.monotonic()
            stale = now >= self._expires
            may_refresh = refresh and now - self._fetched >= MIN_REFRESH_INTERVAL_SECONDS
            if stale or may_refresh:
                self._certs, ttl = self._fetch()
                self._fetched = now
                self._expires = now + ttl
            return self._certs

    def _fetch(self) -> tuple[dict[str, str], float]:
        """Read the certificates: from an https URL (production) or a local file (local mode, tests)."""
        if not self._source.startswith(("https://", "http://")):
            return json.loads(Path(self._source).read_text()), DEFAULT_CERTS_TTL_SECONDS
        import google.auth.transport.requests

        try:
            response = google.auth.transport.requests.Request()(self._source, method="GET", timeout=10)
        except google.auth.exceptions.TransportError as exc:
            raise errors.Unavailable("could not fetch the token signing certificates") from exc
        if response.status != 200:
            raise errors.Unavailable("could not fetch the token signing certificates")
        match = _MAX_AGE.search(response.headers.get("cache-control", ""))
        ttl = int(match.group(1)) if match else DEFAULT_CERTS_TTL_SECONDS
        return json.loads(response.data), ttl


_caches: dict[str, CertificateCache] = {}
_caches_lock = threading.Lock()


def _cache_for(source: str) -> CertificateCache:
    """One certificate cache per source, shared by all requests of the process."""
    with _caches_lock:
        if source not in _caches:
            _caches[source] = CertificateCache(source)
        return _caches[source]


def bearer_token(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer …` header, or 401."""
    if not authorization:
        raise errors.Unauthenticated("missing Authorization: Bearer <Google ID token>")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise errors.Unauthenticated("Authorization must be 'Bearer <Google ID token>'")
    return token.strip()


class VerifiedTokens:
    """Identities of tokens that verified, until each token's `exp`; safe for concurrent requests."""

    def __init__(self, size: int = VERIFIED_CACHE_SIZE) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, Config], tuple[Identity, float]] = OrderedDict()

    def get(self, token: str, config: Config) -> Identity | None:
        """The identity a still-valid token verified as under this configuration, or None."""
        with self._lock:
            entry = self._entries.get((token, config))
            if entry is None:
                return None
            identity, expires = entry
            if time.time() >= expires:
                del self._entries[(token, config)]
                return None
            self._entries.move_to_end((token, config))
            return identity

    def clear(self) -> None:
        """Forget every token (tests start each case from a cold instance)."""
        with self._lock:
            self._entries.clear()

    def put(self, token: str, config: Config, identity: Identity, expires: float) -> None:
        """Remember a token that verified, until `expires` (its exp claim)."""
        with self._lock:
            self._entries[(token, config)] = (identity, expires)
            self._entries.move_to_end((token, config))
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)


verified_tokens = VerifiedTokens()


def verify_id_token(token: str, config: Config | None = None) -> Identity:
    """Verify signature, exp, aud, iss and email_verified of an ID token; 401 on any failure."""
    config = config or get_config()
    if len(token) > MAX_TOKEN_CHARS:
        raise errors.Unauthenticated("the ID token is not valid")
    cached = verified_tokens.get(token, config)
    if cached is not None:
        return cached
    identity, expires = _verify(token, config)
    verified_tokens.put(token, config, identity, expires)
    return identity


def _verify(token: str, config: Config) -> tuple[Identity, float]:
    """The full verification of a token not seen before: its identity and its exp."""
    if not config.audiences:
        # A deployment without audiences would accept tokens minted for any service.
        raise errors.Unauthenticated("the service has no audiences configured")
    cache = _cache_for(config.certs_url)
    try:
        kid = google.auth.jwt.decode_header(token).get("kid")
        certs = cache.get()
        if kid is not None and kid not in certs:
            certs = cache.get(refresh=True)
        claims = google.auth.jwt.decode(
            token, certs=certs, audience=list(config.audiences), clock_skew_in_seconds=CLOCK_SKEW_SECONDS
        )
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError, google.auth.exceptions.GoogleAuthError) as exc:
        # RecursionError: google-auth json-decodes the segments, and a crafted one can nest arbitrarily deep.
        raise errors.Unauthenticated("the ID token is not valid") from exc
    if claims.get("iss") not in config.token_issuers:
        raise errors.Unauthenticated("the ID token has the wrong issuer")
    email = claims.get("email")
    if not isinstance(email, str) or not email:
        raise errors.Unauthenticated("the ID token has no email claim")
    if claims.get("email_verified") is not True:
        raise errors.Unauthenticated("the ID token's email is not verified")
    principal = email.lower()
    if not re.fullmatch(PRINCIPAL_PATTERN, principal):
        raise errors.Unauthenticated("the ID token's email is not a usable principal")
    return Identity(principal=principal, operator=principal in config.operators), float(claims["exp"])


def authenticate(authorization: str | None) -> Identity:
    """The verified caller of a request, from its Authorization header."""
    return verify_id_token(bearer_token(authorization))


def authenticate_partner(admin_token: str | None, authorization: str | None, *, operators: bool) -> PartnerCaller:
    """The caller of a partner endpoint: the admin token (compared in constant time; an ID token sent with it must
    verify too, and names the admin), else a partner's ID token, else (where `operators`) an operator's.
    401 without a credential or with one that does not verify; 403 for anyone else."""
    config = get_config()
    if admin_token == "":
        raise errors.Unauthenticated(f"{ADMIN_TOKEN_HEADER} is empty")
    if admin_token is not None:
        expected = config.admin_token.encode()
        # An unset secret must never match an empty or any other token.
        if not expected or not hmac.compare_digest(admin_token.encode(), expected):
            raise errors.Forbidden("the admin token is not valid")
        # An Authorization header that is present must verify, even an empty one.
        email = authenticate(authorization).principal if authorization is not None else None
        return PartnerCaller(role=Role.ADMIN, email=email)
    if authorization is None:
        raise errors.Unauthenticated(f"send a partner's ID token (Authorization: Bearer) or {ADMIN_TOKEN_HEADER}")
    identity = authenticate(authorization)
    # An operator who is also a partner reads and revokes as an operator (every grant), and issues as the partner.
    if operators and identity.operator:
        return PartnerCaller(role=Role.OPERATOR, email=identity.principal)
    if identity.principal in config.partners:
        return PartnerCaller(role=Role.PARTNER, email=identity.principal)
    raise errors.Forbidden(f"{identity.principal} is not a partner" + (" nor an operator" if operators else ""))


def authenticate_operator(authorization: str | None) -> Identity:
    """An operator's (or the audit's own service account's) verified identity: 401 without a valid token, 403 for anyone else."""
    identity = authenticate(authorization)
    if not identity.operator and identity.principal not in get_config().auditors:
        raise errors.Forbidden("only operators may call this")
    return identity
