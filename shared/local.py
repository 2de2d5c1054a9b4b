"""Local mode: a local identity issuer, and one server for every endpoint on the Firestore emulator.

Usage: python -m shared.local serve [--port P] | python -m shared.local token EMAIL
"""

from __future__ import annotations

import argparse
import datetime as dt
import fnmatch
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flask
import google.auth.crypt
import google.auth.jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from werkzeug.routing import Rule

from shared import client_wheel, errors, openapi, pubsub_emulator
from shared import config as config_module
from shared import emulator as emulator_module
from shared.endpoints import ENDPOINTS, Body
from shared.files import write_once
from shared.http import error_response

FUNCTIONS_DIR = config_module.REPO_ROOT / "functions"
PORTAL_DIR = config_module.REPO_ROOT / "portal"
FIREBASE_JSON = config_module.REPO_ROOT / "firebase.json"
ISSUER = "https://accounts.google.com"
TOKEN_LIFETIME_SECONDS = 3600


class LocalIssuer:
    """An RSA key standing in for Google's token signer; its certificates are read by the production verifier."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.key_path = folder / "issuer-key.pem"
        self.certs_path = folder / "certs.json"
        self._signer: tuple[bytes, google.auth.crypt.RSASigner] | None = None  # the key file's bytes and their signer

    def ensure(self) -> None:
        """Create the key and its certificate file once (race-safe: the first writer wins)."""
        if self.key_path.exists() and self.certs_path.exists():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        fresh = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = fresh.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        write_once(self.key_path, pem, mode=0o600)
        # Another process may have won the race: certify the key on disk, not ours.
        key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise RuntimeError(f"{self.key_path} does not hold an RSA key")
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gbx-local-issuer")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .sign(key, hashes.SHA256())
        )
        certs = {self._kid(key): cert.public_bytes(serialization.Encoding.PEM).decode()}
        write_once(self.certs_path, json.dumps(certs, indent=1).encode(), mode=0o644)

    @staticmethod
    def _kid(key: Any) -> str:
        spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return hashlib.sha256(spki).hexdigest()[:40]

    def signer(self) -> google.auth.crypt.RSASigner:
        """The google-auth signer for the issuer key, with its key id (loaded once per key: loading an RSA key checks it,
        tens of milliseconds of CPU, which hundreds of threads minting tokens at once would otherwise spend again each)."""
        self.ensure()
        pem = self.key_path.read_bytes()
        if self._signer is None or self._signer[0] != pem:
            key = serialization.load_pem_private_key(pem, password=None)
            self._signer = (pem, google.auth.crypt.RSASigner.from_string(pem, key_id=self._kid(key)))
        return self._signer[1]

    def claims(self, email: str, audience: str) -> dict[str, Any]:
        """The claims of a Google ID token for `email`."""
        now = int(time.time())
        return {
            "iss": ISSUER,
            "aud": audience,
            "azp": email,
            "sub": hashlib.sha256(email.encode()).hexdigest()[:21],
            "email": email,
            "email_verified": True,
            "iat": now,
            "exp": now + TOKEN_LIFETIME_SECONDS,
        }

    def token(self, email: str, /, *, audience: str = config_module.LOCAL_AUDIENCE, **overrides: Any) -> str:
        """A signed ID token; `overrides` replace claims (a value of None removes the claim)."""
        claims = {**self.claims(email, audience), **overrides}
        claims = {k: v for k, v in claims.items() if v is not None}
        return google.auth.jwt.encode(self.signer(), claims).decode()


def _load_function(entry: str) -> Callable[[flask.Request], Any] | None:
    """The entry point of functions/<entry>/main.py, or None when that endpoint is not built."""
    source = FUNCTIONS_DIR / entry / "main.py"
    if not source.is_file():
        return None
    spec = importlib.util.spec_from_file_location(f"gbx_function_{entry}", source)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, entry)


@functools.cache
def _hosting() -> dict[str, Any]:
    """firebase.json's Hosting section, read once per process (empty when the file or the section is missing)."""
    try:
        hosting: dict[str, Any] = json.loads(FIREBASE_JSON.read_text()).get("hosting", {})
    except (OSError, ValueError):
        return {}
    return hosting


def _hosting_portal_rewrites() -> dict[str, str]:
    """firebase.json's Hosting rewrites to a portal file (source path -> file), such as /v of the verification links."""
    rules: list[dict[str, Any]] = _hosting().get("rewrites", [])
    return {rule["source"]: rule["destination"].lstrip("/") for rule in rules if "source" in rule and "destination" in rule}


def _hosting_header_rules() -> list[dict[str, Any]]:
    """firebase.json's Hosting header rules (none when the file has none)."""
    rules: list[dict[str, Any]] = _hosting().get("headers", [])
    return rules


def _hosting_headers(path: str) -> dict[str, str]:
    """The headers firebase.json's Hosting section gives `path` in production, so the portal is served the same way."""
    headers: dict[str, str] = {}
    for rule in _hosting_header_rules():
        # Hosting matches a rule by glob (`source`) or by RE2 regular expression (`regex`).
        matched = fnmatch.fnmatchcase(path, rule["source"]) if "source" in rule else re.fullmatch(rule.get("regex", "(?!)"), path)
        if matched:
            headers.update({h["key"]: h["value"] for h in rule.get("headers", [])})
    return headers


def _static(folder: Path, path: str, url_path: str) -> flask.Response:
    """A file of `folder` with the production Hosting headers; the API's 404 for anything else, whatever the method."""
    target = (folder / path).resolve()
    if not target.is_file() or not target.is_relative_to(folder.resolve()):
        return error_response(errors.NotFound())
    if flask.request.method not in ("GET", "HEAD"):
        return error_response(errors.MethodNotAllowed("GET, HEAD"))
    response = flask.send_file(target, max_age=0)
    response.headers.update(_hosting_headers(url_path))
    return response


def _portal(path: str = "index.html") -> flask.Response:
    """A static file of the portal (portal/), as Hosting serves it at /."""
    return _static(PORTAL_DIR, path, "/" + path)


def _gbx(path: str = client_wheel.INDEX) -> flask.Response:
    """The gbx wheel and its index (/gbx/), built when the server started, as Hosting serves them."""
    return _static(config_module.get_config().local_dir / "gbx", path, "/gbx/" + path)


def _get_only(view: Callable[[], Any]) -> Callable[[], Any]:
    """A view of a fixed path that answers GET and HEAD, and the contract's 405 for any other method."""

    def answer() -> Any:
        if flask.request.method not in ("GET", "HEAD"):
            return error_response(errors.MethodNotAllowed("GET, HEAD"))
        return view()

    return answer


def _openapi() -> flask.Response:
    """The OpenAPI document, with the headers Hosting gives its static copy in production."""
    response = flask.Response(openapi.render(), mimetype="application/json")
    response.headers.update(_hosting_headers("/openapi.json"))
    return response


def create_app() -> flask.Flask:
    """One Flask app serving every registered endpoint at its /api path, /openapi.json, /healthz and the portal at /."""
    app = flask.Flask("gbx-local", static_folder=None)
    for endpoint in ENDPOINTS.values():
        function = _load_function(endpoint.name)
        if function is None:
            continue

        def view(function: Callable[[flask.Request], Any] = function, **_path: str) -> Any:
            return function(flask.request)

        # A rule without methods matches every method, as functions-framework routes them: the function answers 405.
        # An endpoint of a subtree (the seal log's /log/) serves every path below its own, as Hosting's /log/** does.
        rule = endpoint.path + "<path:subpath>" if endpoint.body is Body.PATH else endpoint.path
        app.url_map.add(Rule(rule, endpoint=endpoint.name))
        app.view_functions[endpoint.name] = view
    # These rules match every method, so that an unknown path is 404 whatever the method, and a known one 405.
    static_routes: list[tuple[str, str, Callable[..., Any]]] = [
        ("/healthz", "healthz", _get_only(lambda: {"status": "ok"})),
        ("/openapi.json", "openapi", _get_only(_openapi)),
        ("/gbx", "gbx_folder", _get_only(lambda: flask.redirect("/gbx/", 301))),
        ("/gbx/", "gbx_index", _gbx),
        ("/gbx/<path:path>", "gbx", _gbx),
        ("/", "portal_index", _portal),
    ]
    # Hosting's rewrites to the portal (the verification link's /v), served the same way here.
    for source, destination in _hosting_portal_rewrites().items():
        static_routes.append((source, f"portal_rewrite_{source}", functools.partial(_portal, destination)))
    static_routes.append(("/<path:path>", "portal", _portal))
    for rule, name, static_view in static_routes:
        app.url_map.add(Rule(rule, endpoint=name))
        app.view_functions[name] = static_view

    @app.errorhandler(404)
    def not_found(_: Exception) -> flask.Response:
        return error_response(errors.NotFound())

    @app.errorhandler(405)
    def not_allowed(_: Exception) -> flask.Response:
        return error_response(errors.MethodNotAllowed("GET, HEAD"))

    return app


def configure_local_environment(local_dir: Path | None = None) -> None:
    """Environment of local mode: local signer, issuer, admin token and operators unless already set."""
    os.environ[config_module.ENV_LOCAL_MODE] = "1"
    if local_dir is not None:
        os.environ[config_module.ENV_LOCAL_DIR] = str(local_dir)
    config_module.get_config.cache_clear()
    LocalIssuer(config_module.get_config().local_dir).ensure()


def refuse_in_cloud() -> None:
    """Local mode trusts local keys: never let it start inside Cloud Functions or Cloud Run."""
    if os.environ.get("K_SERVICE") or os.environ.get("FUNCTION_TARGET") or os.environ.get("CLOUD_RUN_JOB"):
        sys.exit("refusing to start local mode inside Cloud Functions / Cloud Run (K_SERVICE is set)")


def _port_is_free(port: int) -> bool:
    """Whether 127.0.0.1:port can be listened on now, bound as werkzeug binds it (SO_REUSEADDR: a port in TIME_WAIT is free)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def serve(port: int) -> None:
    """Serve every endpoint on 127.0.0.1:port until Ctrl-C or SIGTERM, with an emulator unless one is given."""
    refuse_in_cloud()
    # Seals' verification links point at this server unless a public URL is configured.
    os.environ.setdefault(config_module.ENV_PUBLIC_URL, f"http://127.0.0.1:{port}")
    configure_local_environment()
    config = config_module.get_config()
    running: list[Any] = []  # the server, once it exists
    stop_requested: list[int] = []

    def stop(signum: int, _frame: Any) -> None:
        # Only a flag while starting: raising here could interrupt Popen and orphan the emulator.
        stop_requested.append(signum)
        if running:
            threading.Thread(target=running[0].shutdown, daemon=True).start()

    # Handlers first: a signal at any point after this leaves no emulator behind.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if not _port_is_free(port):
        # Before the emulator starts: a busy port is the commonest first-run mistake, and needs no emulator to report.
        sys.exit(f"Port {port} is in use on 127.0.0.1: stop what serves it, or pick another port (make run PORT={port + 1})")
    emulator = None
    pubsub: pubsub_emulator.PubSubEmulator | None = None
    sweeping = threading.Event()
    try:
        if not os.environ.get("FIRESTORE_EMULATOR_HOST"):
            log_path = config.local_dir / "firestore-emulator.log"
            emulator = emulator_module.start(project=config.project, log_path=log_path, cancelled=lambda: bool(stop_requested))
            os.environ["FIRESTORE_EMULATOR_HOST"] = emulator.host
            print(f"Firestore emulator on {emulator.host}", flush=True)
        if config.events:
            pubsub = _start_events(config, cancelled=lambda: bool(stop_requested), stop=sweeping)
        # /gbx/ serves the runner client's wheel, built from this checkout as deploy.sh builds it for Hosting.
        wheel = client_wheel.build(config.local_dir / "gbx", base_url=f"http://127.0.0.1:{port}")
        print(f"gbx wheel: /gbx/{wheel.name}  sha256 {wheel.sha256}", flush=True)
        from werkzeug.serving import make_server

        # The service writes one structured line per request; werkzeug's access log would repeat it.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        # A busy port makes werkzeug say so and exit; the `finally` still stops the emulator.
        running.append(make_server("127.0.0.1", port, create_app(), threaded=True))
        if stop_requested:
            return  # asked to stop while starting
        print(f"GBX Entitlements (local mode) on http://127.0.0.1:{port}  (GET /healthz; Ctrl-C stops)", flush=True)
        print(
            f"Partners: {', '.join(sorted(config.partners))}; operators: {', '.join(sorted(config.operators))}"
            " (an ID token: .venv/bin/python -m shared.local token EMAIL); admin token: $GBX_ADMIN_TOKEN or local-admin-token",
            flush=True,
        )
        # A signal from here on shuts the server down, even one that lands before serve_forever starts.
        running[0].serve_forever()
    except (emulator_module.EmulatorMissing, client_wheel.WheelBuildFailed) as exc:
        sys.exit(str(exc))
    except emulator_module.StartCancelled:
        pass
    finally:
        sweeping.set()
        if pubsub is not None:
            pubsub.stop()
        if emulator is not None:
            emulator.stop()
        print("stopped", flush=True)


# Local mode's sweeper runs this often (production: Cloud Scheduler, every minute).
LOCAL_SWEEP_SECONDS = 10.0


def _start_events(config: config_module.Config, *, cancelled: Callable[[], bool], stop: threading.Event) -> pubsub_emulator.PubSubEmulator | None:
    """Events in local mode: the Pub/Sub emulator (started unless PUBSUB_EMULATOR_HOST names one), the topic, and a sweeper
    thread; the emulator's address is written for `python -m shared.events subscribe`."""
    from shared import events

    started = None
    if not os.environ.get("PUBSUB_EMULATOR_HOST"):
        started = pubsub_emulator.start(log_path=config.local_dir / "pubsub-emulator.log", cancelled=cancelled)
        os.environ["PUBSUB_EMULATOR_HOST"] = started.host
    host = os.environ["PUBSUB_EMULATOR_HOST"]
    (config.local_dir / events.LOCAL_PUBSUB_HOST_FILE).write_text(host + "\n")
    try:
        events.ensure_topic()
    except Exception:
        if started is not None:
            started.stop()
        raise
    print(f"Pub/Sub emulator on {host}, topic {events.topic_path()}  (python -m shared.events subscribe EMAIL)", flush=True)

    def sweep_forever() -> None:
        while not stop.wait(LOCAL_SWEEP_SECONDS):
            try:
                events.sweep()
            except Exception as exc:  # noqa: BLE001 - the next sweep tries again
                print(f"events sweep failed: {type(exc).__name__}", file=sys.stderr, flush=True)

    threading.Thread(target=sweep_forever, name="gbx-events-sweeper", daemon=True).start()
    return started


def main(argv: list[str] | None = None) -> None:
    """Command line of local mode."""
    parser = argparse.ArgumentParser(prog="python -m shared.local", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="serve every endpoint locally")
    serve_parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")))
    token_parser = commands.add_parser("token", help="print an ID token that local servers of this checkout accept")
    token_parser.add_argument("email")
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.port)
    else:
        configure_local_environment()
        print(LocalIssuer(config_module.get_config().local_dir).token(args.email))


if __name__ == "__main__":
    main()
