"""The seal portal (portal/) in a real browser: Debian's headless Chromium driven by selenium, against the local server.

The page checks seals with its own JavaScript mirror of the seal format, so every vector here is also
sent to the service's /api/seal/verify: the browser must reach the same verdict, check for check, with
the same reason. Chromium and chromedriver come from tools/ensure-browser.sh; without them these tests
fail (they never skip). Screenshots of the VERIFIED and INVALID states go to $GBX_PORTAL_SCREENSHOTS
(default: a pytest temporary folder).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import tempfile
import threading
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait
from werkzeug.serving import make_server

from gbx_client import hashing
from gbx_client import verify as client_verify
from gbx_client.seal_format import (
    MAX_SEAL_BYTES,
    SEAL_NS,
    SVG_NS,
    SealDocumentInvalid,
    SealTooLarge,
    b64url_encode,
    canonical_json,
    parse_seal_svg,
    render_seal_svg,
)
from shared import signing
from tests.conftest import AUDIENCE, RUNNER, Api
from tests.kms_server import VERSION_1, VERSION_2, FakeKms

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)
# What Hosting serves the portal with (firebase.json). Should a header be missing there, the browser tests'
# server adds it, so the page is always exercised under a strict policy (no inline script or style).
STRICT_PORTAL_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; object-src 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
# After the offline checks the page asks for the seal's log proof (by its public seal id; see test_portal_log.py).
LOG_PROOF = ("GET", "/api/log/proof")
FIREBASE_JSON = Path(__file__).resolve().parent.parent / "firebase.json"
# The vendored QR decoder (ZXing-C++ as WebAssembly, tools/refresh-qr-decoder.sh): what the page loads for a picture.
(DECODER_DIR,) = (Path(__file__).resolve().parent.parent / "portal" / "vendor").glob("barcode-detector-*")
DECODER_FILES = tuple(f"/vendor/{DECODER_DIR.name}/{name}" for name in ("ponyfill.js", "zxing-exported.js", "zxing_reader.wasm"))
PORTAL_FILES = ("/", "/v", "/app.js", "/tlog.js", "/style.css", "/favicon.svg", *DECODER_FILES)
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
NOT_CHECKED = "not checked"
STREAM_THRESHOLD = 16 * 1024 * 1024  # app.js hashes larger files with its own streaming SHA-256
WAIT_SECONDS = 30
POLL_SECONDS = 0.02  # the page answers in milliseconds; selenium's default poll (0.5 s) would dominate


# --- the browser and the server it talks to ---------------------------------------


class PortalServer:
    """WSGI middleware around the local app: records what the page asks for and supplies missing portal headers."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ.get("PATH_INFO", "")
        with self._lock:
            self.requests.append((environ["REQUEST_METHOD"], path))

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            if not path.startswith("/api/"):
                present = {name.lower() for name, _ in headers}
                headers = headers + [(k, v) for k, v in STRICT_PORTAL_HEADERS.items() if k.lower() not in present]
            return start_response(status, headers, exc_info)

        return self.app(environ, start)

    def take_requests(self) -> list[tuple[str, str]]:
        """The requests since the last call."""
        with self._lock:
            taken, self.requests = self.requests, []
        return taken


@dataclass
class Portal:
    """The portal's base URL, its request log and the module's browser."""

    url: str
    server: PortalServer
    browser: webdriver.Chrome
    screenshots: Path


@pytest.fixture(scope="module")
def portal_server(service_env: None) -> Iterator[tuple[str, PortalServer]]:
    """The local server's app (the same process, emulator and KMS as `server_url`) behind PortalServer."""
    from shared.local import create_app

    wrapped = PortalServer(create_app())
    server = make_server("127.0.0.1", 0, wrapped, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", wrapped
    server.shutdown()


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    """One headless Chromium for the module: Debian's, through its chromedriver (nothing is downloaded)."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        pytest.fail(
            f"the portal's browser tests need {' and '.join(missing)}: run tools/ensure-browser.sh as root "
            "(it runs apt-get install -y chromium chromium-driver)",
            pytrace=False,
        )
    profile = tempfile.mkdtemp(prefix="gbx-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager is never consulted, so nothing is fetched.
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_window_size(1100, 1400)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: $GBX_PORTAL_SCREENSHOTS, or a temporary folder."""
    folder = Path(os.environ.get("GBX_PORTAL_SCREENSHOTS") or tmp_path_factory.mktemp("portal-screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def portal(portal_server: tuple[str, PortalServer], browser: webdriver.Chrome, screenshots: Path) -> Portal:
    """The portal freshly loaded, with an empty request log and browser console."""
    url, server = portal_server
    browser.set_window_size(1100, 1400)
    browser.get(url + "/")
    WebDriverWait(browser, WAIT_SECONDS, poll_frequency=POLL_SECONDS).until(lambda d: d.execute_script("return document.documentElement.dataset.ready === 'true'"))
    browser.get_log("browser")  # start each test with an empty console
    server.take_requests()
    return Portal(url=url, server=server, browser=browser, screenshots=screenshots)


# --- driving the page -----------------------------------------------------------------


@dataclass
class PageVerdict:
    """What the page shows after checking a seal."""

    verdict: str
    detail: str
    checks: dict[str, str]
    results: dict[str, str]
    claims: dict[str, str]


def check_in_browser(portal: Portal, document: bytes | str, tmp_path: Path, name: str = "seal.svg") -> PageVerdict:
    """Pick `document` in the seal input and return the page's verdict once it is shown."""
    data = document.encode() if isinstance(document, str) else document
    folder = tmp_path / f"pick-{len(list(tmp_path.glob('pick-*')))}"
    folder.mkdir()
    path = folder / name
    path.write_bytes(data)
    driver = portal.browser
    driver.execute_script("document.getElementById('result').dataset.state = 'stale'")
    driver.find_element(By.ID, "seal-file").send_keys(str(path))
    WebDriverWait(driver, WAIT_SECONDS, poll_frequency=POLL_SECONDS).until(lambda d: d.execute_script("return document.getElementById('result').dataset.state") == "done")
    return read_verdict(portal)


def pick_outputs(portal: Portal, path: Path, *, folder: bool) -> dict[str, str]:
    """Pick an outputs folder (or one file) and return the comparison the page shows once hashing is done."""
    driver = portal.browser
    driver.execute_script("const box = document.getElementById('outputs-result'); box.dataset.match = 'stale'; box.textContent = '';")
    driver.find_element(By.ID, "outputs-folder" if folder else "outputs-file").send_keys(str(path))
    WebDriverWait(driver, WAIT_SECONDS, poll_frequency=POLL_SECONDS).until(
        lambda d: d.execute_script("return document.getElementById('outputs-result').dataset.match") not in ("stale", "")
    )
    return driver.execute_script(
        """
        const box = document.getElementById('outputs-result');
        return {match: box.dataset.match, text: box.textContent, hash: document.getElementById('outputs-hash').textContent,
                sealed: document.getElementById('sealed-hash').textContent,
                progressHidden: document.getElementById('outputs-progress-block').hidden};
        """
    )


def save_screenshot(portal: Portal, name: str, *, width: int = 1100, phone: bool = False) -> Path:
    """A screenshot of the whole page laid out `width` CSS pixels wide (as a phone lays it out, with `phone`)."""
    driver = portal.browser

    def metrics(height: int) -> None:
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": phone}
        )

    metrics(800)
    metrics(driver.execute_script("return document.documentElement.scrollHeight"))
    path = portal.screenshots / name
    path.write_bytes(base64.b64decode(driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})["data"]))
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    return path


# Chromium styles the <parsererror> block it puts into a document that fails to parse with an inline
# style; under the page's CSP the console reports it blocked. Expected for broken uploads, and harmless.
PARSER_ERROR_STYLE = "Applying inline style violates the following Content Security Policy directive"


def severe_console_messages(portal: Portal, *, broken_uploads: bool = False) -> list[str]:
    """Console errors since the last call (a CSP violation, a failed load or an exception would show here)."""
    messages = [entry["message"] for entry in portal.browser.get_log("browser") if entry["level"] == "SEVERE"]
    if broken_uploads:
        messages = [m for m in messages if not (PARSER_ERROR_STYLE in m and "/app.js " in m)]
    return messages


# --- the service's verdict, for comparison ----------------------------------------------


def service_checks(api: Api, document: bytes) -> dict[str, str]:
    """The service's checks for a document (a refused document: its reason as the document check)."""
    response = api.verify(document)
    if response.status_code == 200:
        checks = response.json()["checks"]
        return {name: checks[name] for name in ("document", "key", "signature")} | {"record": checks["record"]}
    assert response.status_code in (400, 413), response.text
    return {"document": response.json()["error"]["message"], "key": NOT_CHECKED, "signature": NOT_CHECKED, "record": NOT_CHECKED}


def reference_document_reason(document: bytes) -> str | None:
    """The seal format's own reason for refusing a document, or None when it parses."""
    try:
        parse_seal_svg(document)
    except (SealDocumentInvalid, SealTooLarge) as exc:
        return getattr(exc, "reason", str(exc))
    return None


def as_displayed(text: str) -> str:
    """Text as the page shows it: controls, bidi overrides and other invisible characters replaced, as the badge does."""
    return "".join("\ufffd" if unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp") or char in "\ufffe\uffff" else char for char in text)


def resign(kms: FakeKms, version: str, payload: bytes) -> bytes:
    """A genuine KMS signature over any payload (what the service's key would sign)."""
    signer = signing.KmsSigner(key_version=version, trusted_versions=[version], client=signing.kms_client(kms.endpoint))
    return signer.sign(payload).der


@dataclass
class Seal:
    """The parts of a genuine seal, to build vectors from."""

    svg: str
    claims: dict[str, Any]
    payload: bytes
    der: bytes
    key: str

    def render(self, *, claims: dict[str, Any] | None = None, payload: bytes | None = None, der: bytes | None = None, key: str | None = None) -> bytes:
        """The seal.svg of changed parts (the rest genuine)."""
        raw = payload if payload is not None else canonical_json(claims) if claims is not None else self.payload
        return render_seal_svg(payload=raw, signature=self.der if der is None else der, key=self.key if key is None else key).encode()

    def with_seal_element(self, element: str) -> bytes:
        """The genuine badge with its seal element replaced by `element` (markup)."""
        start = self.svg.index("<gbx:seal ")
        end = self.svg.index("/>", start) + 2
        return (self.svg[:start] + element + self.svg[end:]).encode()

    def element(self, **attributes: str | None) -> str:
        """A seal element with the genuine attributes unless overridden (None drops one)."""
        values: dict[str, str | None] = {
            "version": "1",
            "alg": "ES256",
            "key": self.key,
            "payload": b64url_encode(self.payload),
            "signature": b64url_encode(self.der),
        }
        values.update(attributes)
        attrs = " ".join(f'{name}="{value}"' for name, value in values.items() if value is not None)
        return f'<gbx:seal xmlns:gbx="{SEAL_NS}" {attrs}/>'


def make_seal(api: Api, run_id: str = "job-1", *, outputs_sha256: str | None = None) -> Seal:
    """A genuine seal from the service: issue, consume, start and complete a run."""
    if outputs_sha256 is None:
        bundle = api.sealed_run(run_id)
    else:
        assert api.issue(RUNNER, 1).status_code == 200
        for step in (api.consume(run_id), api.run_start(run_id), api.run_complete(run_id, outputs_sha256)):
            assert step.status_code == 200, step.text
        bundle = step.json()
    return Seal(
        svg=bundle["seal_svg"],
        claims=json.loads(bundle["seal_json"]),
        payload=bundle["seal_json"].encode(),
        der=base64.b64decode(bundle["signature"]),
        key=bundle["key"],
    )


def twin_signature(der: bytes) -> bytes:
    """The other valid encoding of an ECDSA signature: (r, n - s)."""
    r, s = decode_dss_signature(der)
    return encode_dss_signature(r, P256_ORDER - s)


def der_integer(value: int) -> bytes:
    """A positive integer as DER writes it: big-endian, minimal, a leading zero only when the top bit is set."""
    return value.to_bytes(value.bit_length() // 8 + 1, "big")


def non_minimal_der(der: bytes) -> bytes:
    """The same (r, s) with a needless leading zero byte in r: not DER, which OpenSSL refuses."""
    r, s = decode_dss_signature(der)
    r_bytes, s_bytes = b"\x00" + der_integer(r), der_integer(s)
    body = b"\x02" + bytes([len(r_bytes)]) + r_bytes + b"\x02" + bytes([len(s_bytes)]) + s_bytes
    return b"\x30" + bytes([len(body)]) + body


def svg_doc(inner: str, *, prolog: str = "") -> bytes:
    """A minimal SVG document around inner markup."""
    return f'{prolog}<svg xmlns="{SVG_NS}" width="10" height="10">{inner}</svg>'.encode()


# --- the verdicts ----------------------------------------------------------------------


def test_a_genuine_seal_is_verified_and_its_claims_shown_as_the_badge_shows_them(api: Api, portal: Portal, tmp_path: Path) -> None:
    seal = make_seal(api)
    assert service_checks(api, seal.svg.encode())["signature"] == "ok"

    shown = check_in_browser(portal, seal.svg, tmp_path)

    assert shown.verdict == "VERIFIED"
    assert shown.checks == {"document": "ok", "key": "ok", "signature": "ok"}
    image, digest = seal.claims["container_image"].rsplit("@", 1)
    date, time = seal.claims["completed_at"].split(".")[0].rstrip("Z").split("T")
    assert shown.claims == {
        "Seal ID": seal.claims["seal_id"],
        "Run ID": "job-1",
        "Image": image,
        "Digest": digest,
        "Project": "acme-prod",
        "Principal": RUNNER,
        "Completed": f"{date} {time} UTC",
        "Issuer": "gbx-test",
    }
    # Nothing but the published keys (and the page's own files) was asked for: the seal stayed in the browser.
    asked = set(portal.server.take_requests())
    assert ("GET", "/api/seal/public_keys") in asked
    assert asked <= {("GET", "/api/seal/public_keys"), LOG_PROOF} | {("GET", path) for path in PORTAL_FILES}
    assert severe_console_messages(portal) == []
    save_screenshot(portal, "portal-verified.png")
    save_screenshot(portal, "portal-verified-phone.png", width=390, phone=True)


def test_a_seal_dropped_on_the_zone_is_checked(api: Api, portal: Portal) -> None:
    seal = make_seal(api)
    driver = portal.browser
    driver.execute_script(
        """
        const transfer = new DataTransfer();
        transfer.items.add(new File([arguments[0]], 'dropped-seal.svg', {type: 'image/svg+xml'}));
        const zone = document.getElementById('drop-zone');
        for (const type of ['dragenter', 'dragover', 'drop']) {
          zone.dispatchEvent(new DragEvent(type, {dataTransfer: transfer, bubbles: true, cancelable: true}));
        }
        """,
        seal.svg,
    )
    WebDriverWait(driver, WAIT_SECONDS, poll_frequency=POLL_SECONDS).until(lambda d: d.execute_script("return document.getElementById('result').dataset.state") == "done")
    assert driver.find_element(By.ID, "verdict").text == "VERIFIED"
    assert "dropped-seal.svg" in driver.find_element(By.ID, "checked-file").text
    assert "drag-over" not in (driver.find_element(By.ID, "drop-zone").get_attribute("class") or "")


def test_a_changed_claim_is_invalid_at_the_signature(api: Api, portal: Portal, tmp_path: Path) -> None:
    seal = make_seal(api)
    forged = seal.render(claims={**seal.claims, "outputs_sha256": "ee" * 32})

    shown = check_in_browser(portal, forged, tmp_path)

    assert shown.verdict == "INVALID"
    assert shown.checks == {"document": "ok", "key": "ok", "signature": "signature does not match the payload"}
    assert shown.results == {"document": "ok", "key": "ok", "signature": "failed"}
    assert shown.claims["Run ID"] == "job-1"  # shown, but marked as not verified
    trust = portal.browser.find_element(By.ID, "claims-trust").text
    assert "NOT verified" in trust
    assert service_checks(api, forged)["signature"] == "signature does not match the payload"
    save_screenshot(portal, "portal-invalid.png")


def test_a_changed_signature_is_invalid(api: Api, portal: Portal, tmp_path: Path) -> None:
    seal = make_seal(api)
    r, s = decode_dss_signature(seal.der)
    changed = seal.render(der=encode_dss_signature(r ^ 1, s))

    shown = check_in_browser(portal, changed, tmp_path)

    assert (shown.verdict, shown.checks["signature"]) == ("INVALID", "signature does not match the payload")
    assert service_checks(api, changed)["signature"] == "signature does not match the payload"


def test_a_seal_signed_by_an_unknown_key_version_is_not_trusted(api: Api, kms: FakeKms, portal: Portal, tmp_path: Path) -> None:
    seal = make_seal(api)
    kms.add_version(VERSION_2)  # a real key in KMS, but not one the service publishes or trusts
    payload = canonical_json({**seal.claims, "key": VERSION_2})
    other = seal.render(payload=payload, der=resign(kms, VERSION_2, payload), key=VERSION_2)

    shown = check_in_browser(portal, other, tmp_path)

    assert shown.verdict == "INVALID"
    assert shown.checks == {"document": "ok", "key": "key version is not trusted", "signature": NOT_CHECKED}
    assert shown.results == {"document": "ok", "key": "failed", "signature": "skipped"}
    assert service_checks(api, other)["key"] == "key version is not trusted"
    published = requests.get(portal.url + "/api/seal/public_keys", timeout=30).json()["keys"]
    assert [key["key"] for key in published] == [VERSION_1]


@pytest.mark.parametrize(
    ("prolog", "reason"),
    [
        ('<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" "http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd">\n', "the document has a DTD"),
        ('<?xml version="1.0"?>\n<!-- hi --><!DOCTYPE svg [<!ENTITY run "job-1">]>\n', "the document has a DTD"),
    ],
)
def test_a_doctype_is_refused(api: Api, portal: Portal, tmp_path: Path, prolog: str, reason: str) -> None:
    seal = make_seal(api)
    body = seal.svg.split("?>\n", 1)[1]  # the genuine badge without its XML declaration
    document = (prolog + body).encode()

    shown = check_in_browser(portal, document, tmp_path)

    assert shown.verdict == "INVALID"
    assert shown.checks == {"document": reason, "key": NOT_CHECKED, "signature": NOT_CHECKED}
    assert "not a usable seal.svg" in shown.detail
    assert shown.claims == {}
    assert service_checks(api, document)["document"] == reason


@pytest.mark.parametrize(
    ("name", "document", "reason"),
    [
        ("seal.bin", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01", "the document is not well-formed XML"),
        ("seal.txt", b"this is not a seal\n", "the document is not well-formed XML"),
        ("seal.html", b'<html xmlns="http://www.w3.org/1999/xhtml"><body>hi</body></html>', "the document is not an SVG image"),
        ("empty.svg", b"", "the document is not well-formed XML"),
    ],
)
def test_a_file_that_is_not_an_svg_is_refused(api: Api, portal: Portal, tmp_path: Path, name: str, document: bytes, reason: str) -> None:
    shown = check_in_browser(portal, document, tmp_path, name=name)

    assert shown.verdict == "INVALID"
    assert shown.checks == {"document": reason, "key": NOT_CHECKED, "signature": NOT_CHECKED}
    assert service_checks(api, document)["document"] == reason


def test_the_uploaded_svg_is_never_shown_or_run(api: Api, portal: Portal, tmp_path: Path) -> None:
    seal = make_seal(api)
    hostile = seal.svg.replace(
        "</svg>",
        '<script>window.gbxPwned = true</script><image href="/pwned.png" width="1" height="1"/>'
        '<foreignObject><p xmlns="http://www.w3.org/1999/xhtml">INJECTED TEXT</p></foreignObject></svg>',
    )

    shown = check_in_browser(portal, hostile, tmp_path)

    assert shown.verdict == "VERIFIED"  # only the metadata counts
    driver = portal.browser
    assert driver.execute_script("return window.gbxPwned") is None
    assert driver.execute_script("return document.querySelectorAll('svg, image, foreignObject').length") == 0
    assert "INJECTED TEXT" not in driver.find_element(By.TAG_NAME, "body").text
    assert ("GET", "/pwned.png") not in portal.server.take_requests()


def test_a_signature_twin_verifies_offline_and_only_the_service_tells_it_apart(api: Api, portal: Portal, tmp_path: Path) -> None:
    seal = make_seal(api)
    twin = seal.render(der=twin_signature(seal.der))

    shown = check_in_browser(portal, twin, tmp_path)

    # (r, n - s) is as valid as (r, s): an offline check cannot know which one was issued.
    assert shown.verdict == "VERIFIED"
    assert service_checks(api, twin) == {"document": "ok", "key": "ok", "signature": "ok", "record": "the issued seal has another signature"}


def test_the_keys_cannot_be_fetched_so_nothing_is_claimed(api: Api, portal: Portal, tmp_path: Path) -> None:
    seal = make_seal(api)
    # The page fetches the keys of its own origin; a page opened from elsewhere cannot reach them.
    portal.browser.execute_script("window.fetch = () => Promise.reject(new TypeError('Failed to fetch'))")

    shown = check_in_browser(portal, seal.svg, tmp_path)

    assert shown.verdict == "NOT CHECKED"
    assert shown.checks == {
        "document": "ok",
        "key": "could not fetch the published keys (Failed to fetch)",
        "signature": NOT_CHECKED,
    }
    assert shown.results == {"document": "ok", "key": "unavailable", "signature": "skipped"}


# --- the same vectors as the service ---------------------------------------------------


def seal_vectors(seal: Seal, kms: FakeKms) -> dict[str, bytes]:
    """Documents built from one genuine seal: hostile, broken, re-encoded and re-signed ones."""

    def signed(raw: bytes) -> bytes:
        return seal.render(payload=raw, der=resign(kms, VERSION_1, raw))

    def claims(**overrides: Any) -> dict[str, Any]:
        changed = {**seal.claims, **overrides}
        return {name: value for name, value in changed.items() if value is not _DROP}

    element = seal.with_seal_element
    genuine = seal.svg.encode()
    body = seal.svg.split("?>\n", 1)[1]
    metadata = f"<metadata>{seal.element()}</metadata>"
    laughs = "".join(f'<!ENTITY l{i} "{("&l" + str(i - 1) + ";") * 10 if i else "lol"}">' for i in range(10))
    return {
        "genuine": genuine,
        "genuine with a UTF-8 BOM": b"\xef\xbb\xbf" + genuine,
        "genuine without the XML declaration": body.encode(),
        "genuine in a busy document": seal.svg.replace("<metadata>", "<!-- c --><?pi x?><g><rect width='1' height='1'/></g><metadata><other xmlns='urn:x'/>").encode(),
        "genuine at the size limit": genuine[:-7] + b"<!--" + b"x" * (MAX_SEAL_BYTES - len(genuine) - 7) + b"-->" + genuine[-7:],
        "over the size limit": genuine[:-7] + b"<!--" + b"x" * (MAX_SEAL_BYTES - len(genuine) - 6) + b"-->" + genuine[-7:],
        # Signature encodings
        "signature twin (high S)": seal.render(der=twin_signature(seal.der)),
        "signature not DER (needless zero)": seal.render(der=non_minimal_der(seal.der)),
        "signature with a trailing byte": seal.render(der=seal.der + b"\x00"),
        "signature empty": seal.render(der=b""),
        "signature not base64url": element(seal.element(signature="MEUCIQ+/")),
        "signature padded": element(seal.element(signature=b64url_encode(seal.der) + "=")),
        # Keys
        "element key differs from the payload's": seal.render(key=VERSION_2),
        "unknown key in both": seal.render(claims={**seal.claims, "key": VERSION_2}, key=VERSION_2),
        # Payloads, genuinely signed: the document check must still refuse them, as the service does
        "signed: spaces": signed(json.dumps(seal.claims, sort_keys=True).encode()),
        "signed: keys out of order": signed(json.dumps(seal.claims, separators=(",", ":")).encode()),
        "signed: trailing newline": signed(canonical_json(seal.claims) + b"\n"),
        "signed: escaped non-ASCII": signed(json.dumps(claims(issuer="Zo\u00eb"), sort_keys=True, separators=(",", ":")).encode()),
        "signed: raw non-ASCII and escapes": signed(canonical_json(claims(issuer="Zo\u00eb \u6f22 \U0001f600 \"q\" \\ \n\t\x01"))),
        "signed: duplicate key": signed(canonical_json(seal.claims)[:-1] + b',"v":1}'),
        "signed: lone surrogate": signed(canonical_json(claims(issuer="X")).replace(b'"issuer":"X"', b'"issuer":"\\ud800"')),
        "signed: lacks claims": signed(canonical_json(claims(principal=_DROP, key=_DROP))),
        "signed: unknown claims, code point order": signed(canonical_json(claims(**{"\uff01": "a", "\U0001f600": "b", "zz": "c"}))),
        "signed: an unknown claim named with a bidi override": signed(canonical_json(claims(**{"evil\u202etxt.exe": "x"}))),
        "signed: many long unknown claims": signed(canonical_json(claims(**{f"x{i}" + "y" * 50: "" for i in range(8)}))),
        "signed: v is 2": signed(canonical_json(claims(v=2))),
        "signed: v is true": signed(canonical_json(claims(v=True))),
        "signed: v is 1.0": signed(canonical_json(claims(v=1.0))),
        "signed: v is -0": signed(canonical_json(seal.claims).replace(b'"v":1', b'"v":-0')),
        "signed: v is 1e0": signed(canonical_json(seal.claims).replace(b'"v":1', b'"v":1e0')),
        "signed: v is \"1\"": signed(canonical_json(claims(v="1"))),
        "signed: a claim is a number": signed(canonical_json(claims(principal=5))),
        "signed: a claim is a big float": signed(canonical_json(claims(principal=1e16, issuer=1.5e-7, run_id=0.0001, project_id=-0.0))),
        "signed: a claim overflows": signed(canonical_json(seal.claims).replace(b'"v":1', b'"v":1,"x":1e400')),
        "signed: a claim is null": signed(canonical_json(claims(run_manifest_sha256=None))),
        "signed: a claim is an object": signed(canonical_json(claims(run_id={"b": [1, 2.5], "a": None}))),
        "signed: an array": signed(b"[1,2]"),
        "signed: a string": signed(b'"seal"'),
        "signed: not JSON": signed(b"not json"),
        "signed: NaN": signed(b'{"v":NaN}'),
        "signed: BOM": signed(b"\xef\xbb\xbf" + canonical_json(seal.claims)),
        "signed: UTF-16": signed("{}".encode("utf-16")),
        "signed: deep": signed(b"[" * 5000),
        "signed: with the optional manifest claim": signed(canonical_json(claims(run_manifest_sha256="ab" * 32))),
        "payload not base64url": element(seal.element(payload="e30=")),
        "payload empty": element(seal.element(payload="")),
        # Documents
        "DTD with entities": svg_doc(metadata, prolog=f"<!DOCTYPE svg [{laughs}]>"),
        "DTD after a comment": f"<?xml version='1.0'?><!-- x --><!DOCTYPE svg>{body}".encode(),
        "undeclared entity": svg_doc("&undeclared;" + metadata),
        "truncated": genuine[:-40],
        "NUL byte": b"<svg>\x00</svg>",
        "unknown encoding": svg_doc(metadata, prolog='<?xml version="1.0" encoding="x-no-such-encoding"?>'),
        "multi-byte encoding": svg_doc(metadata, prolog='<?xml version="1.0" encoding="shift_jis"?>'),
        "invalid UTF-8": genuine.replace(b"<title", b"<!-- \xff --><title"),
        "html root": f'<html xmlns="{SVG_NS}">{metadata}</html>'.encode(),
        "svg without namespace": f"<svg>{metadata}</svg>".encode(),
        "no seal": svg_doc("<metadata/>"),
        "two seals": element(seal.element() + seal.element()),
        "two metadata seals": svg_doc(metadata + metadata),
        "seal in another namespace": element(seal.element().replace(SEAL_NS, "urn:gbx:seal:v2")),
        "seal outside metadata": svg_doc(seal.element()),
        "metadata in another namespace": svg_doc(f'<metadata xmlns="urn:other">{seal.element()}</metadata>'),
        "version 2": element(seal.element(version="2")),
        "alg none": element(seal.element(alg="none")),
        "lacks payload and key": element(seal.element(payload=None, key=None)),
        "namespaced attribute": element(seal.element(version=None).replace("<gbx:seal ", '<gbx:seal gbx:version="1" ')),
        "nested 80 deep": svg_doc("<g>" * 80 + metadata + "</g>" * 80),
        "nested 37000 deep": svg_doc("<g>" * 37_000 + "</g>" * 37_000),
    }


_DROP = object()


def test_the_browser_and_the_service_agree_on_every_vector(api: Api, kms: FakeKms, portal: Portal, tmp_path: Path, subtests: Any) -> None:
    seal = make_seal(api)
    vectors = seal_vectors(seal, kms)
    keys = client_verify.keys_document(requests.get(portal.url + "/api/seal/public_keys", timeout=30).json(), "the service")
    verdicts: dict[str, str] = {}
    for name, document in vectors.items():
        with subtests.test(msg=name):
            expected = service_checks(api, document)
            refused_for = reference_document_reason(document)
            if refused_for is not None:
                # Refused before verification: the format's own reason (the HTTP layer words the size limit its own way).
                assert expected["key"] == NOT_CHECKED
                expected["document"] = refused_for
            shown = check_in_browser(portal, document, tmp_path)
            assert shown.checks == {name: as_displayed(expected[name]) for name in ("document", "key", "signature")}
            offline_ok = all(expected[name] == "ok" for name in ("document", "key", "signature"))
            assert shown.verdict == ("VERIFIED" if offline_ok else "INVALID")
            # gbx verify, offline with the same published keys, reaches the same verdict for the same reasons.
            by_gbx = client_verify.verify_seal(client_verify.SealFiles(source=Path(name), svg=document), keys)
            assert by_gbx.verified == offline_ok
            assert {check: by_gbx.checks[check] for check in ("document", "key", "signature")} == {check: expected[check] for check in ("document", "key", "signature")}
            verdicts[name] = shown.verdict
    # The table covers both outcomes and the browser never failed to answer.
    assert {"VERIFIED", "INVALID"} <= set(verdicts.values())
    assert verdicts["genuine"] == "VERIFIED"
    assert severe_console_messages(portal, broken_uploads=True) == []


# --- outputs ---------------------------------------------------------------------------


def canonical_outputs_hash(path: Path) -> str:
    """The canonical hash as the contract defines it, computed by the coreutils pipeline it names."""
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    listing = subprocess.run(
        "find . -type f -print0 | LC_ALL=C sort -z | xargs -0r sha256sum",
        shell=True, cwd=path, check=True, capture_output=True,
    ).stdout
    return hashlib.sha256(listing).hexdigest()


def make_outputs(folder: Path) -> Path:
    """An outputs folder whose bytewise order differs from a locale's, with a file large enough to stream."""
    files = {
        "B.txt": b"upper case sorts first bytewise\n",
        "a.txt": b"alpha\n",
        "a-b.txt": b"hyphen\n",
        "a_b.txt": b"underscore\n",
        "with space.txt": b"space\n",
        "\u00e9t\u00e9.txt": "\u00e9t\u00e9\n".encode(),
        ".hidden": b"dotfile\n",
        "empty.bin": b"",
        "sub-file.txt": b"before sub/ bytewise\n",
        "sub/dir/deep.txt": b"deep\n",
        "sub/Z.txt": b"zed\n",
    }
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (folder / "big.bin").write_bytes(bytes(range(256)) * (STREAM_THRESHOLD // 256) + b"tail")  # streamed in chunks
    return folder


def test_an_outputs_folder_matches_and_one_changed_byte_does_not(api: Api, portal: Portal, tmp_path: Path) -> None:
    outputs = make_outputs(tmp_path / "outputs")
    expected = canonical_outputs_hash(outputs)
    assert hashing.canonical_hash(outputs).sha256 == expected  # gbx hash agrees with coreutils
    seal = make_seal(api, outputs_sha256=expected)
    assert check_in_browser(portal, seal.svg, tmp_path).verdict == "VERIFIED"
    portal.browser.execute_script(
        """
        window.progressSeen = [];
        new MutationObserver(() => window.progressSeen.push(document.getElementById('outputs-progress-text').textContent))
          .observe(document.getElementById('outputs-progress-text'), {childList: true, characterData: true, subtree: true});
        """
    )

    same = pick_outputs(portal, outputs, folder=True)

    assert same["hash"] == expected
    assert same["match"] == "yes", same["text"]
    assert same["text"].startswith("These are the sealed outputs")
    assert same["progressHidden"] is True
    # Progress was shown while hashing, in files and bytes, up to the whole folder.
    progress = portal.browser.execute_script("return window.progressSeen")
    assert progress and progress[-1] == "12 of 12 files, 16.8 MB of 16.8 MB", progress

    changed = tmp_path / "changed" / "outputs"
    shutil.copytree(outputs, changed)
    deep = changed / "sub" / "dir" / "deep.txt"
    deep.write_bytes(b"deeP\n")
    different = pick_outputs(portal, changed, folder=True)

    assert different["hash"] == canonical_outputs_hash(changed) != expected
    assert different["match"] == "no"
    assert different["text"].startswith("These are NOT the sealed outputs")
    assert different["sealed"] == expected
    assert severe_console_messages(portal) == []
    save_screenshot(portal, "portal-outputs-differ.png")


def test_one_output_file_is_hashed_by_its_bytes(api: Api, portal: Portal, tmp_path: Path) -> None:
    output = tmp_path / "report.csv"
    output.write_bytes(b"id,value\n1,42\n")
    seal = make_seal(api, outputs_sha256=hashlib.sha256(output.read_bytes()).hexdigest())
    check_in_browser(portal, seal.svg, tmp_path)

    assert pick_outputs(portal, output, folder=False)["match"] == "yes"

    output.write_bytes(b"id,value\n1,43\n")
    shown = pick_outputs(portal, output, folder=False)
    assert (shown["match"], shown["hash"]) == ("no", hashlib.sha256(b"id,value\n1,43\n").hexdigest())


@pytest.mark.parametrize("extra", [1, 55, 56, 64])
def test_a_large_file_streams_through_the_pages_own_sha256(portal: Portal, tmp_path: Path, extra: int) -> None:
    # Sizes around the padding boundaries of the last block; above the threshold app.js streams the file.
    output = tmp_path / "large.bin"
    data = hashlib.sha256(str(extra).encode()).digest() * (STREAM_THRESHOLD // 32) + b"\xa5" * extra
    output.write_bytes(data)

    shown = pick_outputs(portal, output, folder=False)

    assert shown["hash"] == hashlib.sha256(data).hexdigest()
    assert shown["match"] == "unknown"  # no seal picked yet: the hash is shown, nothing is claimed


def test_outputs_picked_before_the_seal_are_compared_once_it_is_checked(api: Api, portal: Portal, tmp_path: Path) -> None:
    outputs = make_outputs(tmp_path / "outputs")
    (outputs / "big.bin").unlink()
    seal = make_seal(api, outputs_sha256=canonical_outputs_hash(outputs))
    assert pick_outputs(portal, outputs, folder=True)["match"] == "unknown"

    check_in_browser(portal, seal.svg, tmp_path)

    assert portal.browser.find_element(By.ID, "outputs-result").get_attribute("data-match") == "yes"


@pytest.mark.parametrize("name", ["a\\b.txt", "new\nline.txt", "carriage\rreturn.txt"])
def test_a_name_with_a_newline_or_backslash_cannot_be_hashed(portal: Portal, tmp_path: Path, name: str) -> None:
    outputs = tmp_path / "outputs"
    (outputs / "sub").mkdir(parents=True)
    (outputs / "sub" / name).write_bytes(b"x")
    (outputs / "fine.txt").write_bytes(b"y")

    shown = pick_outputs(portal, outputs, folder=True)

    assert shown["match"] == "error"
    assert "newline, carriage return or backslash" in shown["text"]
    assert json.dumps(name) in shown["text"] or json.dumps("./sub/" + name) in shown["text"]


# --- how the page is served and how it reads --------------------------------------------


def hosting_header_rules() -> list[dict[str, Any]]:
    """firebase.json's Hosting header rules (none until Hosting is configured)."""
    hosting = json.loads(FIREBASE_JSON.read_text()).get("hosting", {})
    return hosting.get("headers", []) if isinstance(hosting, dict) else []


def test_the_portal_is_served_with_a_strict_policy_and_runs_under_it(portal: Portal) -> None:
    for path in PORTAL_FILES:
        response = requests.get(portal.url + path, timeout=30)
        assert response.status_code == 200, path
        policy = response.headers["Content-Security-Policy"]
        assert "default-src 'self'" in policy and "unsafe-inline" not in policy, path
        assert response.headers["X-Content-Type-Options"] == "nosniff", path
    assert requests.get(portal.url + "/app.js", timeout=30).headers["Content-Type"].startswith("text/javascript")
    # The page loaded above under that policy, with no violation, failed load or exception.
    assert portal.browser.execute_script("return document.documentElement.dataset.ready") == "true"
    assert portal.browser.find_element(By.ID, "unsupported").get_attribute("hidden") is not None
    assert severe_console_messages(portal) == []
    html = requests.get(portal.url + "/", timeout=30).text
    assert "<script>" not in html and " style=" not in html and "<style" not in html
    assert html.count("<script") == 1 and '<script type="module" src="app.js"></script>' in html


def test_the_local_server_gives_the_portal_the_headers_hosting_gives_it(server_url: str) -> None:
    rules = hosting_header_rules()
    assert rules, "firebase.json declares no hosting headers for the portal"
    for path in PORTAL_FILES:
        headers = requests.get(server_url + path, timeout=30).headers
        assert "default-src 'self'" in headers.get("Content-Security-Policy", ""), path
        assert "unsafe-inline" not in headers["Content-Security-Policy"], path
        assert headers.get("X-Content-Type-Options") == "nosniff", path
        assert headers.get("Referrer-Policy") == "no-referrer", path


def test_every_control_is_labelled_and_reachable_by_keyboard(portal: Portal) -> None:
    driver = portal.browser
    unlabelled = driver.execute_script(
        "return [...document.querySelectorAll('input, button, select, textarea')]"
        ".filter((c) => !c.labels || c.labels.length === 0 || !c.labels[0].textContent.trim()).map((c) => c.id)"
    )
    assert unlabelled == []
    assert driver.find_element(By.ID, "summary").get_attribute("aria-live") == "polite"
    assert driver.find_element(By.ID, "outputs-result").get_attribute("aria-live") == "polite"
    driver.execute_script("document.activeElement.blur()")
    visited = []
    for _ in range(12):
        ActionChains(driver).send_keys(Keys.TAB).perform()
        visited.append(driver.switch_to.active_element.get_attribute("id") or driver.switch_to.active_element.tag_name)
    controls = [name for name in visited if name in ("seal-file", "outputs-folder", "outputs-file")]
    assert controls[:3] == ["seal-file", "outputs-folder", "outputs-file"], visited


def contrast_ratio(foreground: tuple[float, ...], background: tuple[float, ...]) -> float:
    """WCAG 2 contrast ratio of two sRGB colours (0-255 channels)."""

    def luminance(rgb: tuple[float, ...]) -> float:
        channels = [c / 255 for c in rgb[:3]]
        linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]

    lighter, darker = sorted((luminance(foreground), luminance(background)), reverse=True)
    return (lighter + 0.05) / (darker + 0.05)


def test_text_contrast_meets_wcag_aa_in_both_verdicts(api: Api, portal: Portal, tmp_path: Path) -> None:
    seal = make_seal(api)
    read_colours = """
        const parse = (c) => c.match(/[\\d.]+/g).map(Number);
        const out = [];
        for (const el of document.querySelectorAll('h1, h2, h3, p, li, dt, dd, label, code, .check-reason, .verdict, summary, a')) {
          if (!el.offsetParent || !el.textContent.trim()) continue;
          let bg = el, colour;
          for (; bg; bg = bg.parentElement) {
            colour = getComputedStyle(bg).backgroundColor;
            if (parse(colour)[3] !== 0 && !/gradient/.test(getComputedStyle(bg).backgroundImage)) break;
            // The header's gradient: measure against its lighter end, the worse case for its light text.
            if (/gradient/.test(getComputedStyle(bg).backgroundImage)) { colour = 'rgb(19, 79, 124)'; break; }
          }
          out.push([el.tagName + '.' + el.className + ' ' + el.textContent.trim().slice(0, 30), parse(getComputedStyle(el).color), parse(colour || 'rgb(255,255,255)')]);
        }
        return out;
    """
    for document in (seal.svg, seal.render(der=twin_signature(seal.der)[:-1] + b"\x01")):
        check_in_browser(portal, document, tmp_path)
        poor = [
            (what, round(contrast_ratio(tuple(fg), tuple(bg)), 2))
            for what, fg, bg in portal.browser.execute_script(read_colours)
            if contrast_ratio(tuple(fg), tuple(bg)) < 4.5
        ]
        assert poor == []


def test_the_page_fits_a_phone(api: Api, portal: Portal, tmp_path: Path) -> None:
    seal = make_seal(api, "a-run-id-long-enough-to-need-wrapping-on-a-narrow-phone-screen-" + "x" * 40)
    driver = portal.browser
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": 360, "height": 740, "deviceScaleFactor": 2, "mobile": True})
    try:
        check_in_browser(portal, seal.svg, tmp_path)
        assert driver.execute_script("return document.documentElement.clientWidth") == 360
        overflow = driver.execute_script("return document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0
        too_wide = driver.execute_script(
            "return [...document.querySelectorAll('body *')].filter((e) => e.getBoundingClientRect().right > 360.5).map((e) => e.tagName + '#' + e.id)"
        )
        assert too_wide == []
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    save_screenshot(portal, "portal-phone.png", width=360, phone=True)


# --- the verification link and pictures of the QR code -------------------------------------

def open_link(portal: Portal, fragment: str) -> PageVerdict:
    """Open the portal at /v#fragment, as a scanned link opens it, and return the page's verdict."""
    driver = portal.browser
    driver.get(portal.url + "/")  # a fresh page each time: the same fragment twice would not fire hashchange
    driver.get(f"{portal.url}/v#{fragment}")
    WebDriverWait(driver, WAIT_SECONDS, poll_frequency=POLL_SECONDS).until(
        lambda d: d.execute_script("const r = document.getElementById('result'); return r && r.dataset.state === 'done'"))
    return read_verdict(portal)


def read_verdict(portal: Portal) -> PageVerdict:
    """The verdict, checks and claims the page shows."""
    shown = portal.browser.execute_script(
        """
        const checks = {}, results = {}, claims = {};
        for (const item of document.querySelectorAll('#checks [data-check]')) {
          checks[item.dataset.check] = item.querySelector('.check-reason').textContent;
          results[item.dataset.check] = item.dataset.result;
        }
        if (!document.getElementById('claims-block').hidden) {
          const dl = document.getElementById('claims');
          for (const dt of dl.querySelectorAll('dt')) claims[dt.textContent] = dt.nextElementSibling.textContent;
        }
        return {verdict: document.getElementById('verdict').textContent,
                detail: document.getElementById('verdict-detail').textContent, checks, results, claims};
        """
    )
    return PageVerdict(**shown)


def verified_by(portal: Portal) -> dict[str, str]:
    """Which site checked the seal, and which site its link names, as the page says."""
    return portal.browser.execute_script(
        "const box = document.getElementById('verified-by');"
        "return {text: box.textContent, site: box.dataset.site, link: box.dataset.linkSite, hidden: box.hidden};"
    )


def test_a_link_opened_at_v_is_verified_in_the_browser_and_names_the_sites(api: Api, portal: Portal) -> None:
    bundle = api.sealed_run("job-1")
    fragment = bundle["verify_link"].split("#", 1)[1]
    shown = open_link(portal, fragment)
    assert shown.verdict == "VERIFIED", shown
    assert shown.checks == {"document": "ok", "key": "ok", "signature": "ok"}
    assert shown.claims["Seal ID"] == bundle["seal_id"] and shown.claims["Run ID"] == "job-1"
    # The page says which site checked it: this one, with the keys it publishes, and the link named it.
    by = verified_by(portal)
    assert by["site"] == by["link"] == portal.url and not by["hidden"]
    assert by["text"] == f"Checked by {portal.url}, with the keys this site publishes. The link names this site."
    # The fragment never left the browser: only the page's files and the published keys were asked for.
    asked = set(portal.server.take_requests())
    assert ("GET", "/v") in asked and ("GET", "/api/seal/public_keys") in asked
    assert asked <= {("GET", "/api/seal/public_keys"), LOG_PROOF} | {("GET", path) for path in PORTAL_FILES}
    assert severe_console_messages(portal) == []
    save_screenshot(portal, "portal-link-verified.png")
    save_screenshot(portal, "portal-link-verified-phone.png", width=390, phone=True)


def test_a_tampered_link_is_invalid_in_the_browser_as_in_the_api(api: Api, portal: Portal) -> None:
    from tests.test_verify_link import tampered_links

    link = api.sealed_run("job-1")["verify_link"]
    for name, tampered in tampered_links(link).items():
        shown = open_link(portal, tampered.split("#", 1)[1])
        assert shown.verdict == "INVALID", name
        service = api.post("/api/seal/verify", data=tampered, headers={"Content-Type": "text/uri-list"}).json()["checks"]
        assert shown.checks == {name: service[name] for name in ("document", "key", "signature")}, name


def test_the_browser_gives_each_shared_link_vector_its_document_check(portal: Portal, subtests: Any) -> None:
    vectors = json.loads((Path(__file__).resolve().parent / "vectors" / "verify_links.json").read_text())["vectors"]
    for vector in vectors:
        with subtests.test(vector=vector["name"]):
            shown = open_link(portal, vector["fragment"])
            assert shown.verdict == "INVALID"
            assert shown.checks["document"] == vector["document"]
            if vector["document"] == "ok":
                assert shown.checks["key"] == "key version is not trusted"


def rendered_badge(svg: str, width: int) -> Image.Image:
    """The badge rasterised by rsvg-convert."""
    png = subprocess.run(["rsvg-convert", "-w", str(width), "-b", "white"], input=svg.encode(), capture_output=True, check=True).stdout
    return Image.open(io.BytesIO(png)).convert("RGB")


@pytest.mark.parametrize(("name", "input_id"), [("screenshot.jpg", "seal-file"), ("photo.jpg", "seal-photo"), ("screenshot.png", "seal-file")])
def test_a_picture_of_the_badge_is_read_and_verified(api: Api, portal: Portal, tmp_path: Path, name: str, input_id: str) -> None:
    """A screenshot 800 px wide at JPEG quality 40, a photo turned 8 degrees at 1000 px, and a plain PNG (more in test_pictures.py)."""
    from tests.test_verify_link import jpeg, photo

    bundle = api.sealed_run("job-1")
    if name == "photo.jpg":
        picture = photo(rendered_badge(bundle["seal_svg"], 1000))
    elif name == "screenshot.jpg":
        picture = jpeg(rendered_badge(bundle["seal_svg"], 800), width=800, quality=40)
    else:
        picture = rendered_badge(bundle["seal_svg"], 860)
    path = tmp_path / name
    picture.save(path)
    driver = portal.browser
    driver.execute_script("document.getElementById('result').dataset.state = 'stale'")
    driver.find_element(By.ID, input_id).send_keys(str(path))
    WebDriverWait(driver, WAIT_SECONDS, poll_frequency=POLL_SECONDS).until(
        lambda d: d.execute_script("return document.getElementById('result').dataset.state") == "done")
    shown = read_verdict(portal)
    assert shown.verdict == "VERIFIED", shown
    assert shown.claims["Seal ID"] == bundle["seal_id"]
    # The QR code names the configured base URL, not this test server: the page says so, and that it checked it here.
    by = verified_by(portal)
    assert by["site"] == portal.url and by["link"] == AUDIENCE
    assert f"Checked by {portal.url}" in by["text"] and f"The link names another site: {AUDIENCE}." in by["text"]
    asked = set(portal.server.take_requests())
    assert asked <= {("GET", "/api/seal/public_keys"), LOG_PROOF} | {("GET", path) for path in PORTAL_FILES}, "the picture stayed in the browser"
    assert severe_console_messages(portal) == []


def test_a_broken_picture_is_not_a_seal(portal: Portal, tmp_path: Path) -> None:
    """A .png is read as a picture (for its QR code), so a broken one says the picture cannot be read."""
    shown = check_in_browser(portal, b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01", tmp_path, name="seal.png")
    assert shown.verdict == "INVALID" and shown.checks["document"].startswith("the picture could not be read")
    assert "This is not a usable seal" in shown.detail


def test_a_picture_without_a_qr_code_is_not_a_seal(portal: Portal, tmp_path: Path) -> None:
    path = tmp_path / "blank.png"
    Image.new("RGB", (400, 300), (240, 240, 240)).save(path)
    portal.browser.find_element(By.ID, "seal-file").send_keys(str(path))
    WebDriverWait(portal.browser, WAIT_SECONDS, poll_frequency=POLL_SECONDS).until(
        lambda d: d.execute_script("return document.getElementById('result').dataset.state") == "done")
    shown = read_verdict(portal)
    assert shown.verdict == "INVALID" and shown.checks["document"] == "no QR code found in the picture"
    assert "This is not a usable seal" in shown.detail
