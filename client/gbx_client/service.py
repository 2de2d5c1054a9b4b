"""The service over HTTP: every call bounded by a deadline and retried by urllib3's Retry, honouring Retry-After."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import MaxRetryError, ProtocolError
from urllib3.util.retry import RequestHistory, Retry

from gbx_client.errors import ProtocolViolation, Unreachable, UsageError
from gbx_client.identity import TokenSource

# Transient answers: the contract's outage reply (503 + Retry-After), what a front door (load
# balancer, Firebase Hosting) says when the function behind it did not answer, and the 429 that
# Cloud Run and Hosting answer to a burst (hundreds of tasks of one job starting at once).
RETRY_STATUSES = frozenset({429, 502, 503, 504})
USER_AGENT = "gbx-client/1.0"


@dataclass(frozen=True)
class RetryPolicy:
    """How long one call keeps trying, and how long each attempt may take."""

    timeout: float = 120.0  # seconds from the first attempt; then the call fails
    attempt_timeout: float = 65.0  # connect and read, per attempt: above a Cloud Function's 60 s default
    backoff: float = 0.25  # urllib3's backoff_factor: waits of 0.5, 1, 2, 4 s… plus jitter
    backoff_max: float = 10.0
    attempts_per_chain: int = 50  # urllib3 retries recursively; send() chains at most this many before starting afresh


class DeadlineRetry(Retry):
    """urllib3's Retry bounded by a deadline rather than a count, capping every wait at the deadline and reporting it."""

    deadline: float = math.inf
    report: Callable[[str], None] | None = None

    def new(self, **kw: Any) -> DeadlineRetry:
        """Carry the deadline and reporter into the next Retry (urllib3 makes a new one per attempt)."""
        retry = super().new(**kw)
        retry.deadline = self.deadline
        retry.report = self.report
        return retry

    def is_retry(self, method: str, status_code: int, has_retry_after: bool = False) -> bool:
        """Only the transient statuses (429 among them): a 413 with Retry-After is an answer, not an outage."""
        return status_code in self.status_forcelist

    def is_exhausted(self) -> bool:
        """Out of retries once the deadline has passed."""
        return super().is_exhausted() or time.monotonic() >= self.deadline

    def sleep(self, response: Any = None) -> None:
        """Wait urllib3's exponential backoff, or longer when the service's Retry-After asks; never past the deadline."""
        delay = self.get_backoff_time()
        if response is not None and self.respect_retry_after_header:
            # Never sooner than the service asks; never a tight loop when it says "Retry-After: 0".
            with contextlib.suppress(Exception):  # an unparseable Retry-After leaves the backoff
                delay = max(delay, self.get_retry_after(response) or 0.0)
        delay = max(0.0, min(delay, self.deadline - time.monotonic()))
        if self.report is not None and self.history:
            self.report(f"{_describe(self.history[-1])}; retrying in {delay:.1f} s")
        if delay > 0:
            time.sleep(delay)


def _describe(attempt: RequestHistory) -> str:
    """What went wrong with one attempt, in a few words."""
    if attempt.status is not None:
        return f"HTTP {attempt.status}"
    error = attempt.error
    while isinstance(error, (ProtocolError, MaxRetryError)) and error.args and isinstance(error.args[-1], Exception):
        error = error.args[-1]
    return _short(error) if error is not None else "no answer"


@dataclass(frozen=True)
class Reply:
    """A final (non-retryable) answer of the service."""

    status: int
    body: Any
    text: str
    content: bytes = b""  # the raw body (the seal log's tiles and notes are not JSON)

    @property
    def error_code(self) -> str:
        """The contract's error code, or "" when the body is not an error body."""
        error = self.body.get("error") if isinstance(self.body, dict) else None
        return str(error.get("code", "")) if isinstance(error, dict) else ""

    @property
    def error_state(self) -> str:
        """The run's state a 409 run_id_reused names ("started" or "completed"), or ""."""
        error = self.body.get("error") if isinstance(self.body, dict) else None
        return str(error.get("state", "")) if isinstance(error, dict) else ""

    @property
    def message(self) -> str:
        """The error message, or the start of the body."""
        error = self.body.get("error") if isinstance(self.body, dict) else None
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return f"{error.get('code', '')}: {error['message']}"
        return self.text[:200] or "(empty body)"

    def json_object(self, step: str) -> dict[str, Any]:
        """The body as a JSON object, or ProtocolViolation."""
        if not isinstance(self.body, dict):
            raise ProtocolViolation(f"{step}: HTTP {self.status} with a body that is not a JSON object: {self.text[:200]!r}")
        return self.body


class Service:
    """One base URL of the service, called with an ID token; each call retried until the policy's deadline."""

    def __init__(self, base_url: str, *, identity: TokenSource | None, policy: RetryPolicy, report: Callable[[str], None]) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise UsageError(f"--url must start with http:// or https://, not {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.policy = policy
        self._identity = identity
        self._report = report
        self._adapter = HTTPAdapter()
        self._session = requests.Session()
        self._session.mount("http://", self._adapter)
        self._session.mount("https://", self._adapter)

    def post_json(self, path: str, body: dict[str, Any], *, step: str) -> Reply:
        """POST a JSON body to a path of the base URL."""
        data = json.dumps(body, separators=(",", ":")).encode()
        return self.send("POST", self.base_url + path, step=step, data=data, content_type="application/json")

    def post_svg(self, path: str, svg: bytes, *, step: str) -> Reply:
        """POST a seal.svg as image/svg+xml."""
        return self.send("POST", self.base_url + path, step=step, data=svg, content_type="image/svg+xml")

    def send(self, method: str, url: str, *, step: str, data: bytes | None = None, content_type: str | None = None, auth: bool = True) -> Reply:
        """Send one call: urllib3 retries connection errors, timeouts and 502/503/504 until the deadline; a reply cut short too."""
        deadline = time.monotonic() + self.policy.timeout
        retry = self._retry(step, deadline)
        while True:
            # Each call gets its own Retry (and deadline): the adapter's is replaced, never shared across calls.
            self._adapter.max_retries = retry
            headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
            if content_type:
                headers["Content-Type"] = content_type
            if auth and self._identity is not None:
                headers["Authorization"] = f"Bearer {self._identity.token()}"
            try:
                response = self._session.request(
                    method, url, data=data, headers=headers, allow_redirects=False,
                    timeout=(self.policy.attempt_timeout, self.policy.attempt_timeout),
                )
            except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError) as exc:
                # requests reads the body after urllib3 returned, outside its retries: a reply cut off
                # mid-body is fed to the same Retry, so it counts against the same deadline and backoff.
                try:
                    retry = retry.increment(method, url, error=ProtocolError(f"reply cut short: {exc}"))
                except MaxRetryError as final:
                    if time.monotonic() >= deadline:
                        raise Unreachable(f"{step}: {url}: replies kept being cut short for {self.policy.timeout:g} s") from final
                    retry = self._next_chain(step, deadline, "replies cut short")
                    continue
                retry.sleep()
                continue
            except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema) as exc:
                raise UsageError(f"{step}: invalid URL {url}: {exc}") from exc
            except requests.RequestException as exc:
                if time.monotonic() >= deadline:
                    raise Unreachable(f"{step}: {url} unreachable for {self.policy.timeout:g} s: {_reason(exc)}") from exc
                retry = self._next_chain(step, deadline, _reason(exc))
                continue
            if response.status_code in RETRY_STATUSES:
                if time.monotonic() >= deadline:
                    raise Unreachable(f"{step}: {url} still answers HTTP {response.status_code} after {self.policy.timeout:g} s")
                retry = self._next_chain(step, deadline, f"HTTP {response.status_code}")
                continue
            break
        try:
            body = response.json()
        except ValueError:
            body = None
        return Reply(status=response.status_code, body=body, text=response.text, content=response.content)

    def _next_chain(self, step: str, deadline: float, problem: str) -> DeadlineRetry:
        """After a chain of attempts_per_chain retries (urllib3 retries by recursion), wait the longest backoff and start another."""
        pause = max(0.0, min(self.policy.backoff_max, deadline - time.monotonic()))
        self._report(f"{step}: {problem} after {self.policy.attempts_per_chain} retries; retrying in {pause:.1f} s")
        time.sleep(pause)
        return self._retry(step, deadline)

    def _retry(self, step: str, deadline: float) -> DeadlineRetry:
        """A Retry bounded by the call's deadline (and a chain length), POST included: every call is idempotent per run_id."""
        retry = DeadlineRetry(
            # urllib3 retries by calling itself: a count bounds the recursion; send() starts a new chain after it.
            total=self.policy.attempts_per_chain,
            redirect=0,
            # POST too: check and verify write nothing, consume replays, run_start and run_complete
            # answer an identical retry as before, so a retry never charges or seals twice.
            allowed_methods=None,
            status_forcelist=RETRY_STATUSES,
            backoff_factor=self.policy.backoff,
            backoff_max=self.policy.backoff_max,
            backoff_jitter=self.policy.backoff,
            raise_on_status=False,
            raise_on_redirect=False,
            respect_retry_after_header=True,
        )
        retry.deadline = deadline
        retry.report = lambda text: self._report(f"{step}: {text}")
        return retry


def _reason(exc: BaseException) -> str:
    """The innermost cause of a requests error, briefly."""
    inner: BaseException = exc
    while True:
        nested = inner.args[0] if inner.args and isinstance(inner.args[0], BaseException) else getattr(inner, "reason", None)
        if not isinstance(nested, BaseException) or nested is inner:
            break
        inner = nested
    return _short(inner)


def _short(error: BaseException) -> str:
    """An error's class and reason, without the connection repr urllib3 puts before the OS's reason."""
    text = str(error)
    if "[Errno" in text:
        text = text[text.index("[Errno") :]
    return f"{type(error).__name__}: {text}"[:300]
