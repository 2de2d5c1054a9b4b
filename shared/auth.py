"""Authentication: Google-signed OIDC ID tokens (verified with google-auth) and the admin token."""

from __future__ import annotations

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


@dataclass(frozen=True)
class Admin:
    """A caller holding the admin token; `issued_by` is the email of an accompanying ID token."""

    issued_by: str | None


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


def authenticate_admin(admin_token: str | None, authorization: str | None) -> Admin:
    """Check X-GBX-ADMIN-TOKEN in constant time; an accompanying ID token must verify too."""
    config = get_config()
    if not admin_token:
        raise errors.Unauthenticated(f"missing {ADMIN_TOKEN_HEADER}")
    expected = config.admin_token.encode()
    # An unset secret must never match an empty or any other token.
    if not expected or not hmac.compare_digest(admin_token.encode(), expected):
        raise errors.Forbidden("the admin token is not valid")
    # An Authorization header that is present must verify, even an empty one.
    issued_by = authenticate(authorization).principal if authorization is not None else None
    return Admin(issued_by=issued_by)


def authenticate_operator(authorization: str | None) -> Identity:
    """An operator's (or the audit's own service account's) verified identity: 401 without a valid token, 403 for anyone else."""
    identity = authenticate(authorization)
    if not identity.operator and identity.principal not in get_config().auditors:
        raise errors.Forbidden("only operators may call this")
    return identity


def authenticate_admin_or_operator(admin_token: str | None, authorization: str | None) -> Admin | Identity:
    """The partner's admin token (checked as for issue), or else an operator's ID token; 401 when neither is sent."""
    if admin_token is not None:
        return authenticate_admin(admin_token, authorization)
    if authorization is None:
        raise errors.Unauthenticated(f"send {ADMIN_TOKEN_HEADER} or an operator's ID token")
    identity = authenticate(authorization)
    if not identity.operator:
        raise errors.Forbidden("only the partner's admin token or an operator may call this")
    return identity
