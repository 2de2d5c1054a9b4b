"""Where gbx's Google ID token comes from: GBX_ID_TOKEN, a --token-command, or google-auth's fetch_id_token."""

from __future__ import annotations

import subprocess
import time
from typing import Protocol

from gbx_client.errors import ConfigError, Unreachable

# Google ID tokens live one hour; one older than this is replaced before it can expire mid-run.
TOKEN_MAX_AGE_SECONDS = 50 * 60
TOKEN_COMMAND_TIMEOUT_SECONDS = 60


class TokenSource(Protocol):
    """Anything that hands out a current ID token."""

    def token(self) -> str:
        """Return an ID token valid for the next request."""
        ...


class StaticToken:
    """A token given as is (GBX_ID_TOKEN): local mode and CI, where the caller mints it."""

    def __init__(self, value: str) -> None:
        self._value = value.strip()

    def token(self) -> str:
        """Return the token."""
        return self._value


class _Cached:
    """A token minted on first use and again once it is TOKEN_MAX_AGE_SECONDS old."""

    def __init__(self) -> None:
        self._token: str | None = None
        self._minted_at = 0.0

    def token(self) -> str:
        """Return the cached token, minting a new one when it is missing or old."""
        if self._token is None or time.monotonic() - self._minted_at > TOKEN_MAX_AGE_SECONDS:
            self._token = self._mint()
            self._minted_at = time.monotonic()
        return self._token

    def _mint(self) -> str:
        raise NotImplementedError


class CommandToken(_Cached):
    """A token printed on stdout by a shell command (e.g. `gcloud auth print-identity-token ...`)."""

    def __init__(self, command: str) -> None:
        super().__init__()
        self._command = command

    def _mint(self) -> str:
        try:
            # A shell, as credential helpers are run: the command may hold pipes or $VARIABLES.
            done = subprocess.run(
                self._command, shell=True, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=TOKEN_COMMAND_TIMEOUT_SECONDS, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise ConfigError(f"--token-command did not finish within {TOKEN_COMMAND_TIMEOUT_SECONDS} s") from exc
        if done.returncode != 0:
            raise ConfigError(f"--token-command exited with status {done.returncode}")
        token = done.stdout.decode("utf-8", "replace").strip()
        if not token or any(char.isspace() for char in token):
            raise ConfigError("--token-command printed no token (one line, no spaces, expected on stdout)")
        return token


class GoogleToken(_Cached):
    """A token from google-auth: the metadata server (Cloud Run, GCE, GKE Workload Identity) or a service-account key."""

    def __init__(self, audience: str) -> None:
        super().__init__()
        self._audience = audience

    def _mint(self) -> str:
        # Imported here: local mode and CI never pay for google-auth's transport.
        import google.auth.exceptions
        import google.auth.transport.requests
        import google.oauth2.id_token

        try:
            return google.oauth2.id_token.fetch_id_token(google.auth.transport.requests.Request(), self._audience)
        except google.auth.exceptions.DefaultCredentialsError as exc:
            raise ConfigError(
                "no Google credentials to mint an ID token (run on Google Cloud, set GOOGLE_APPLICATION_CREDENTIALS to a "
                f"service-account key, or use --token-command / GBX_ID_TOKEN): {exc}"
            ) from exc
        except google.auth.exceptions.TransportError as exc:
            raise Unreachable(f"cannot reach Google to mint an ID token: {exc}") from exc
        except google.auth.exceptions.GoogleAuthError as exc:
            raise ConfigError(f"cannot mint an ID token for audience {self._audience}: {exc}") from exc


def token_source(*, token_command: str | None, env_token: str | None, audience: str) -> TokenSource:
    """Pick the identity: --token-command first, then GBX_ID_TOKEN, then Google's credentials."""
    if token_command:
        return CommandToken(token_command)
    if env_token and env_token.strip():
        return StaticToken(env_token)
    return GoogleToken(audience)
