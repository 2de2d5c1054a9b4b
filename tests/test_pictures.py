"""A seal read from real pictures of its badge, by the portal in Chromium and by `gbx verify PICTURE`, both with ZXing-C++.

The badge of a genuine seal is rendered by rsvg-convert and degraded as phones, scanners and screenshots degrade it
(tests/degrade.py): turned 8 and 15 degrees and upside down, a phone held at an angle, out of focus, under uneven
light, JPEG quality 50, a print on a desk filling 60 % of a 1600x1200 photo, a low-resolution greyscale scan, a 480 px
phone screenshot. Each picture is first read by ZXing-C++ itself (zxing-cpp, the Python binding), then must be
VERIFIED by the portal (the vendored WebAssembly build of the same decoder: Chromium on Linux has no BarcodeDetector)
and by gbx. Pictures without exactly one code, or with a code that is not a link, are refused alike by both. Chromium,
chromedriver and rsvg-convert come from tools/ensure-browser.sh; without them these tests fail, never skip.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import segno
import zxingcpp
from PIL import Image
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests import degrade, test_portal
from tests.conftest import AUDIENCE, Api
from tests.test_portal import (
    DECODER_DIR,
    DECODER_FILES,
    LOG_PROOF,
    POLL_SECONDS,
    PORTAL_FILES,
    WAIT_SECONDS,
    PageVerdict,
    Portal,
    read_verdict,
    save_screenshot,
    severe_console_messages,
    verified_by,
)

# The portal's fixtures (its server on the session's emulator and KMS, this module's Chromium), found by name.
portal_server = test_portal.portal_server
browser = test_portal.browser
screenshots = test_portal.screenshots
portal = test_portal.portal

REPO = Path(__file__).resolve().parent.parent
APP_JS = REPO / "portal" / "app.js"
GBX = shutil.which("gbx", path=os.path.dirname(sys.executable))
NO_CODE = "no QR code found in the picture"
SEVERAL_CODES = "the picture holds more than one QR code"
NOT_A_LINK = "the picture's QR code is not a seal verification link (BASE/v#P.S)"
# The files the page loads from the vendored decoder; the rest of the folder is its manifest and licences.
LOADED = ("ponyfill.js", "zxing-exported.js", "zxing_reader.wasm")


def zxing_texts(picture: bytes) -> list[str]:
    """What ZXing-C++ (zxing-cpp) reads in a picture: the text of every QR code."""
    with Image.open(io.BytesIO(picture)) as image:
        found = zxingcpp.read_barcodes(image, formats=zxingcpp.BarcodeFormats(zxingcpp.BarcodeFormat.QRCode), text_mode=zxingcpp.TextMode.Plain)
    return [code.text for code in found]


def gbx_verify(picture: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """`gbx verify PICTURE --json` with the options given."""
    assert GBX, "gbx is not installed in the virtualenv"
    return subprocess.run([GBX, "verify", str(picture), "--json", *options], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "GBX_ID_TOKEN": ""})


def pick_picture(portal: Portal, path: Path, *, input_id: str = "seal-file") -> PageVerdict:
    """Pick a picture in the portal's seal input (or its camera input) and return the verdict it shows."""
    driver = portal.browser
    driver.execute_script("document.getElementById('result').dataset.state = 'stale'")
    driver.find_element(By.ID, input_id).send_keys(str(path))
    WebDriverWait(driver, WAIT_SECONDS, poll_frequency=POLL_SECONDS).until(
        lambda d: d.execute_script("return document.getElementById('result').dataset.state") == "done")
    return read_verdict(portal)


def decode_measures(portal: Portal) -> dict[str, list[float]]:
    """The page's own timings (performance.measure, ms): each picture's decode, and the decoder's one load."""
    return portal.browser.execute_script(
        "const out = {};"
        "for (const name of ['qr-decode', 'qr-decoder-load']) out[name] = performance.getEntriesByName(name).map((e) => e.duration);"
        "return out;"
    )


# --- every degraded picture, read by ZXing-C++, the portal and gbx ---------------------------------------


# Some codes sit on a knife edge under the strongest degradation: the blur of half a module left 2 of 500 real seals'
# codes unreadable to ZXing-C++ itself (with the fixed data mask and with segno's own choice alike; a fresh seal has
# fresh ids and times, so a fresh code). These tests hold our decoders to that reference, so such a seal is replaced
# by a fresh one, twice at most: a badge kind that ZXing cannot read three seals running fails the test.
FRESH_SEALS = 3


def reference_readable(api: Api, name: str) -> tuple[dict, bytes]:
    """A fresh seal and its badge degraded by `name`, which ZXing-C++ reads (see FRESH_SEALS)."""
    _, make = degrade.DEGRADATIONS[name]
    for attempt in range(1, FRESH_SEALS + 1):
        bundle = api.sealed_run(f"job-{attempt}")
        picture = make(bundle["seal_svg"].encode())
        if zxing_texts(picture) == [bundle["verify_link"]]:
            return bundle, picture
    pytest.fail(f"ZXing-C++ itself must read {name}: it read none of {FRESH_SEALS} fresh seals' badges")


@pytest.mark.parametrize("name", list(degrade.DEGRADATIONS))
def test_a_degraded_picture_is_verified_by_the_portal_and_by_gbx(api: Api, portal: Portal, tmp_path: Path, name: str) -> None:
    bundle, picture = reference_readable(api, name)
    path = tmp_path / degrade.DEGRADATIONS[name][0]
    path.write_bytes(picture)

    result = gbx_verify(path, "--keys", f"{api.base_url}/api/seal/public_keys")
    assert result.returncode == 0, (name, result.stdout, result.stderr)
    assert json.loads(result.stdout)["status"] == "VERIFIED" and json.loads(result.stdout)["seal_id"] == bundle["seal_id"]
    assert f"gbx: the picture's QR code points at {AUDIENCE}" in result.stderr

    camera = name in ("phone at an angle", "print on a desk, 1600x1200", "rotated 15 degrees")
    shown = pick_picture(portal, path, input_id="seal-photo" if camera else "seal-file")
    assert shown.verdict == "VERIFIED", (name, shown)
    assert shown.checks == {"document": "ok", "key": "ok", "signature": "ok"}
    assert shown.claims["Seal ID"] == bundle["seal_id"]
    assert verified_by(portal)["link"] == AUDIENCE
    asked = set(portal.server.take_requests())
    # The keys, and (the seal verified) its log proof by the public seal id: never the picture.
    assert asked <= {("GET", "/api/seal/public_keys"), LOG_PROOF} | {("GET", path) for path in PORTAL_FILES}, "the picture stayed in the browser"
    assert severe_console_messages(portal) == []
    if name == "print on a desk, 1600x1200":
        save_screenshot(portal, "portal-picture-verified.png")


# --- pictures that hold no seal -----------------------------------------------------------------------------


def two_badges(svg: bytes) -> bytes:
    """Two prints of badges side by side in one photo."""
    badge = degrade.render(svg, 700)
    both = Image.new("RGB", (1500, badge.height + 100), degrade.DESK)
    both.paste(badge, (30, 50))
    both.paste(badge, (770, 50))
    return degrade.jpeg(both, 85)


def other_code() -> bytes:
    """A photo of a QR code that is not a verification link (a web address)."""
    buffer = io.BytesIO()
    segno.make("https://example.com/menu?table=4", error="m").save(buffer, kind="png", scale=10, border=4)
    code = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    frame = Image.new("RGB", (code.width + 400, code.height + 300), degrade.GREY_TABLE)
    frame.paste(code, (200, 150))
    return degrade.jpeg(frame, 85)


def no_code() -> bytes:
    """A 1600x1200 photo of a desk with nothing on it."""
    return degrade.jpeg(degrade.empty_desk((1600, 1200)), 85)


@pytest.mark.parametrize(("case", "reason", "codes"), [("no code", NO_CODE, 0), ("two badges", SEVERAL_CODES, 2), ("another code", NOT_A_LINK, 1)])
def test_a_picture_without_exactly_one_seal_link_is_refused_by_both(api: Api, portal: Portal, tmp_path: Path, case: str, reason: str, codes: int) -> None:
    bundle = api.sealed_run("job-1")
    picture = {"no code": no_code, "two badges": lambda: two_badges(bundle["seal_svg"].encode()), "another code": other_code}[case]()
    path = tmp_path / "picture.jpg"
    path.write_bytes(picture)
    assert len(zxing_texts(picture)) == codes, "ZXing-C++ itself reads what the case says"

    result = gbx_verify(path, "--keys", f"{api.base_url}/api/seal/public_keys")
    assert result.returncode == 1, (case, result.stdout, result.stderr)
    assert json.loads(result.stdout)["checks"] == {"document": reason, "key": "not checked", "signature": "not checked"}
    assert result.stderr.splitlines()[-1] == f"gbx: exit 1 (invalid): document: {reason}"

    shown = pick_picture(portal, path)
    assert shown.verdict == "INVALID" and shown.checks["document"] == reason, shown
    assert "This is not a usable seal" in shown.detail


def test_gbx_refuses_a_file_that_is_not_a_picture_and_a_missing_one(tmp_path: Path) -> None:
    broken = tmp_path / "seal.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01")
    keys = tmp_path / "keys.json"
    keys.write_text('{"keys": []}')
    result = gbx_verify(broken, "--keys", str(keys))
    assert result.returncode == 1
    assert json.loads(result.stdout)["checks"]["document"].startswith("the picture could not be read (")
    text = tmp_path / "photo.jpg"
    text.write_text("not a picture")
    assert json.loads(gbx_verify(text, "--keys", str(keys)).stdout)["checks"]["document"] == "the picture could not be read (not a PNG, JPEG or WebP image)"
    missing = gbx_verify(tmp_path / "nothing.png", "--keys", str(keys))
    assert missing.returncode == 2 and "cannot read the picture" in missing.stderr


def test_gbx_reads_a_picture_whatever_its_name(api: Api, tmp_path: Path) -> None:
    """A picture is told by its first bytes too (a photo saved without an extension)."""
    bundle = api.sealed_run("job-1")
    path = tmp_path / "IMG_0001"
    path.write_bytes(degrade.rotated(bundle["seal_svg"].encode(), 8))
    result = gbx_verify(path, "--keys", f"{api.base_url}/api/seal/public_keys")
    assert result.returncode == 0, result.stderr


# --- the decoder: served by the deployment, loaded once, cached ------------------------------------------


def test_the_decoder_loads_once_and_the_wasm_is_cached_by_the_browser(api: Api, portal: Portal, tmp_path: Path) -> None:
    bundle = api.sealed_run("job-1")
    path = tmp_path / "desk.jpg"
    path.write_bytes(degrade.on_a_desk(bundle["seal_svg"].encode()))
    assert pick_picture(portal, path).verdict == "VERIFIED"
    assert pick_picture(portal, path).verdict == "VERIFIED"
    measures = decode_measures(portal)
    # The first picture loaded the decoder; the second reused it.
    assert len(measures["qr-decode"]) == 2 and len(measures["qr-decoder-load"]) == 1, measures
    first = portal.server.take_requests()
    # A new page (a reload) loads the module again from the browser's cache: the .wasm is not asked for again.
    portal.browser.get(portal.url + "/")
    WebDriverWait(portal.browser, WAIT_SECONDS, poll_frequency=POLL_SECONDS).until(
        lambda d: d.execute_script("return document.documentElement.dataset.ready === 'true'"))
    assert pick_picture(portal, path).verdict == "VERIFIED"
    again = portal.server.take_requests()
    wasm = ("GET", f"/vendor/{DECODER_DIR.name}/zxing_reader.wasm")
    assert first.count(wasm) <= 1 and wasm not in again, (first, again)
    assert severe_console_messages(portal) == []


def test_the_page_loads_the_decoder_only_for_a_picture(portal: Portal) -> None:
    """A seal.svg or a link never needs the decoder: a fresh page asks for none of its files."""
    portal.browser.get(portal.url + "/")
    WebDriverWait(portal.browser, WAIT_SECONDS, poll_frequency=POLL_SECONDS).until(
        lambda d: d.execute_script("return document.documentElement.dataset.ready === 'true'"))
    asked = {path for _, path in portal.server.take_requests()}
    assert not asked & set(DECODER_FILES), asked


def test_the_server_gives_the_decoder_its_type_and_a_years_cache(portal: Portal) -> None:
    for path in DECODER_FILES:
        response = requests.get(portal.url + path, timeout=30)
        assert response.status_code == 200, path
        assert response.headers["Cache-Control"] == "public, max-age=31536000, immutable", path
    assert requests.get(portal.url + DECODER_FILES[-1], timeout=30).headers["Content-Type"] == "application/wasm"


# --- the vendored files: pinned, recorded, licensed --------------------------------------------------------


def test_the_vendored_decoder_is_the_pinned_release_recorded_in_its_manifest() -> None:
    manifest = json.loads((DECODER_DIR / "manifest.json").read_text())
    version = manifest["version"]
    assert manifest["package"] == "barcode-detector" and DECODER_DIR.name == f"barcode-detector-{version}"
    assert all(part.isdigit() for part in version.split(".")) and len(version.split(".")) == 3, "an exact version"
    on_disk = {path.name for path in DECODER_DIR.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk, "every vendored file is recorded, and only those"
    for name, entry in manifest["files"].items():
        data = (DECODER_DIR / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"], name
    for name in LOADED:
        assert name in manifest["files"], name
    # The bundle names the .wasm it was built for (ZXING_WASM_SHA256) and the zxing-wasm version: the one beside it.
    chunk = (DECODER_DIR / "zxing-exported.js").read_text()
    assert f'"{manifest["files"]["zxing_reader.wasm"]["sha256"]}"' in chunk
    assert f"zxing-wasm@{manifest['zxing_wasm']}" in chunk
    assert manifest["files"]["zxing_reader.wasm"]["from"].startswith(f"zxing-wasm@{manifest['zxing_wasm']} ")
    for licence, words in (("LICENSE.barcode-detector.txt", "MIT License"), ("LICENSE.zxing-wasm.txt", "MIT License"), ("LICENSE.zxing-cpp.txt", "Apache License")):
        assert words in (DECODER_DIR / licence).read_text(), licence
    # The page loads this folder, and nothing of jsQR is left.
    assert f'const QR_DECODER_DIR = "./vendor/{DECODER_DIR.name}/";' in APP_JS.read_text()
    assert not list((REPO / "portal").rglob("*jsQR*")) and "jsQR" not in APP_JS.read_text()


def test_the_page_never_lets_the_decoder_fetch_from_a_cdn() -> None:
    """The package's default is a CDN (jsDelivr); app.js points locateFile at the vendored .wasm instead, and the CSP
    (default-src 'self') would block any other origin anyway."""
    app = APP_JS.read_text()
    assert "locateFile" in app and "zxing_reader.wasm" in app
    # Only XML namespace names (never fetched) look like addresses.
    assert set(re.findall(r"https?://[\w.-]+", app)) <= {"http://www.w3.org"}, "the page names no other site"
