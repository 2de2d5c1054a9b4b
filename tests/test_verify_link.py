"""The seal's second channel: the verification link BASE/v#P.S, its QR code in seal.svg, and every place that takes it.

The QR code is read by an outside decoder (zxing-cpp), never by the generator that drew it, from PNGs that
rsvg-convert and headless Chromium render, degraded as prints and screenshots are: 800 px wide at JPEG quality
40, and a photo rotated 8 degrees at 1000 px (Pillow). The service, gbx and the format module run the same
shared vectors (tests/vectors/verify_links.json; test_portal.py runs them in the browser).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests
import zxingcpp
from PIL import Image

from gbx_client.seal_format import (
    QR_MAX_VERSION,
    SealDocumentInvalid,
    SealPayloadInvalid,
    b64url_decode,
    b64url_encode,
    canonical_json,
    decode_payload,
    inflate_payload,
    link_element,
    parse_seal_svg,
    parse_verify_link,
    render_seal_svg,
    verify_link,
)
from tests.conftest import AUDIENCE, RUNNER, Api, error_code

VECTORS = json.loads((Path(__file__).resolve().parent / "vectors" / "verify_links.json").read_text())
GBX = shutil.which("gbx", path=os.path.dirname(sys.executable))
RSVG = shutil.which("rsvg-convert")
CHROMIUM = "/usr/bin/chromium"
URI_LIST = {"Content-Type": "text/uri-list"}


# --- the outside decoder and the degradations ---------------------------------------------


def rsvg_png(svg: bytes, width: int) -> Image.Image:
    """The badge rasterised by librsvg (Debian's rsvg-convert), width px wide."""
    assert RSVG, "rsvg-convert is missing: make test installs librsvg2-bin (tools/ensure-browser.sh)"
    png = subprocess.run([RSVG, "-w", str(width), "-b", "white"], input=svg, capture_output=True, check=True).stdout
    return Image.open(io.BytesIO(png)).convert("RGB")


def chromium_png(svg: bytes, width: int, tmp_path: Path) -> Image.Image:
    """The badge rasterised by headless Chromium (a screenshot of the svg, scaled to width px)."""
    source = tmp_path / "seal.svg"
    source.write_bytes(svg)
    natural_width, natural_height = (int(parse_attr(svg, name)) for name in ("width", "height"))
    shot = tmp_path / f"chromium-{width}.png"
    subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-dev-shm-usage",
         f"--force-device-scale-factor={width / natural_width}", f"--window-size={natural_width},{natural_height}",
         f"--screenshot={shot}", source.as_uri()],
        capture_output=True, check=True, timeout=120,
    )
    image = Image.open(shot).convert("RGB")
    assert abs(image.width - width) <= 1, image.size
    return image


def parse_attr(svg: bytes, name: str) -> str:
    """An attribute of the root <svg> element."""
    head = svg.split(b"<svg", 1)[1].split(b">", 1)[0].decode()
    return head.split(f' {name}="', 1)[1].split('"', 1)[0]


def jpeg(image: Image.Image, *, width: int, quality: int) -> Image.Image:
    """The image scaled to width px and saved as a JPEG of that quality, read back."""
    scaled = image.resize((width, round(image.height * width / image.width)), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    scaled.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue()))


def photo(image: Image.Image) -> Image.Image:
    """A photo of a print: 1000 px wide, turned 8 degrees on a grey table, saved as a JPEG."""
    scaled = image.resize((1000, round(image.height * 1000 / image.width)), Image.Resampling.LANCZOS)
    turned = scaled.rotate(8, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=(150, 150, 150))
    buffer = io.BytesIO()
    turned.save(buffer, "JPEG", quality=75)
    return Image.open(io.BytesIO(buffer.getvalue()))


def decoded(image: Image.Image) -> list[dict[str, Any]]:
    """Every QR code zxing-cpp finds: its text, version and error correction level."""
    return [
        {"text": found.text, "version": int(found.extra["Version"]), "ec": found.extra["ECLevel"]}
        for found in zxingcpp.read_barcodes(image, formats=zxingcpp.BarcodeFormat.QRCode)
    ]


def assert_reads_link(image: Image.Image, link: str) -> None:
    """The image holds exactly one QR code, of the link, version <= 25 at level M or better."""
    codes = decoded(image)
    assert [code["text"] for code in codes] == [link]
    assert codes[0]["version"] <= QR_MAX_VERSION and codes[0]["ec"] in ("M", "Q", "H")


# --- the format: one definition, the shared vectors -----------------------------------------


@pytest.mark.parametrize("vector", VECTORS["vectors"], ids=lambda vector: vector["name"])
def test_the_shared_vectors_decode_as_they_say(vector: dict[str, str]) -> None:
    try:
        element = link_element(vector["fragment"])
        _, raw = decode_payload(element.payload)
    except SealPayloadInvalid as exc:
        assert exc.reason == vector["document"]
        return
    assert vector["document"] == "ok"
    assert raw.hex() == vector["payload_hex"]
    assert element.key == VECTORS["key"]


def test_a_link_carries_the_exact_signed_bytes_and_signature() -> None:
    payload = canonical_json({"b": "\u00e9t\u00e9", "a": "x" * 300})
    signature = bytes(range(70))
    link = verify_link("https://gbx-prod.web.app/", payload=payload, signature=signature)
    base, fragment = link.split("#")
    assert base == "https://gbx-prod.web.app/v"
    packed, signature_text = fragment.split(".")
    assert inflate_payload(b64url_decode(packed)) == payload
    assert b64url_decode(signature_text) == signature and signature_text == b64url_encode(signature)
    assert parse_verify_link(link).site == "https://gbx-prod.web.app"
    assert parse_verify_link("http://127.0.0.1:8282/prefix/v#x.y").site == "http://127.0.0.1:8282/prefix"


@pytest.mark.parametrize("text", [
    "seal.svg", "https://gbx.example/v", "https://gbx.example/x#a.b", "ftp://gbx.example/v#a.b",
    "https://gbx.example/v?x=1#a.b", "https:///v#a.b", "https://gbx.example/v#a b",
])
def test_text_that_is_not_a_link_is_refused_as_a_document(text: str) -> None:
    with pytest.raises(SealDocumentInvalid, match="not a seal verification link"):
        parse_verify_link(text)


def test_a_link_too_long_for_a_version_25_code_is_not_drawn() -> None:
    payload = canonical_json({"run_id": os.urandom(900).hex()})
    svg = render_seal_svg(payload=payload, signature=b"s", key="k", link=verify_link("https://x.example", payload=payload, signature=b"s"))
    assert "link too long for a QR code" in svg and "shape-rendering" not in svg
    parse_seal_svg(svg.encode())  # the badge stays a seal.svg


# --- the service: the bundle, the badge, the API ---------------------------------------------


def test_the_bundle_carries_the_link_and_the_badge_draws_it_readably(api: Api, tmp_path: Path) -> None:
    """Done when: the QR decodes to the bundle's verify_link, which inflates to the exact signed bytes and verifies."""
    bundle = api.sealed_run("job-1")
    link = bundle["verify_link"]
    assert link.startswith(f"{AUDIENCE}/v#")
    element = link_element(parse_verify_link(link).fragment)
    assert b64url_decode(element.payload) == bundle["seal_json"].encode()
    assert b64url_decode(element.signature) == base64.b64decode(bundle["signature"])
    svg = bundle["seal_svg"].encode()
    for name, render in (("rsvg-convert", lambda width: rsvg_png(svg, width)), ("chromium", lambda width: chromium_png(svg, width, tmp_path))):
        full = render(860)
        assert_reads_link(full, link)
        assert_reads_link(jpeg(render(800), width=800, quality=40), link), f"{name}: 800 px at JPEG quality 40"
        assert_reads_link(photo(render(1000)), link), f"{name}: a photo turned 8 degrees at 1000 px"
    assert api.post("/api/seal/verify", data=link, headers=URI_LIST).json()["status"] == "VERIFIED"


def test_the_api_verifies_a_link_with_the_same_checks_and_the_record(api: Api) -> None:
    bundle = api.sealed_run("job-1")
    link = bundle["verify_link"]
    by_link = api.post("/api/seal/verify", data=f"# a printed seal\r\n{link}\r\n", headers=URI_LIST)
    by_svg = api.verify(bundle["seal_svg"])
    assert by_link.status_code == 200 and by_link.json() == by_svg.json()
    assert by_link.json()["checks"] == {"document": "ok", "key": "ok", "signature": "ok", "record": "ok"}
    # A link is a seal everywhere one is taken: redeeming by its link, then verifying says redeemed.
    assert api.post("/api/entitlement/redeem_seal_once", data=link, headers=URI_LIST).status_code == 200
    assert api.post("/api/seal/verify", data=link, headers=URI_LIST).json()["redeemed"] is True


def tampered_links(link: str) -> dict[str, str]:
    """The link with one character of its payload, or of its signature, changed (still base64url)."""
    base, fragment = link.split("#")
    payload, signature = fragment.split(".")

    def flip(text: str, at: int) -> str:
        return text[:at] + ("A" if text[at] != "A" else "B") + text[at + 1 :]

    return {
        "payload start": f"{base}#{flip(payload, 0)}.{signature}",
        "payload middle": f"{base}#{flip(payload, len(payload) // 2)}.{signature}",
        "signature middle": f"{base}#{payload}.{flip(signature, len(signature) // 2)}",
        "signature end": f"{base}#{payload}.{flip(signature, len(signature) - 2)}",
        "signature of another seal": f"{base}#{payload}.{b64url_encode(bytes.fromhex('3006020101020101'))}",
    }


def test_a_tampered_link_is_invalid_in_the_api(api: Api) -> None:
    link = api.sealed_run("job-1")["verify_link"]
    for name, tampered in tampered_links(link).items():
        answer = api.post("/api/seal/verify", data=tampered, headers=URI_LIST)
        assert answer.status_code == 200, (name, answer.text)
        assert answer.json()["status"] == "INVALID", name
        assert error_code(api.post("/api/entitlement/redeem_seal_once", data=tampered, headers=URI_LIST)) == "seal_invalid"


def test_the_api_gives_each_shared_vector_its_document_check(api: Api) -> None:
    for vector in VECTORS["vectors"]:
        answer = api.post("/api/seal/verify", data=f"https://gbx.example/v#{vector['fragment']}", headers=URI_LIST)
        assert answer.status_code == 200, (vector["name"], answer.text)
        body = answer.json()
        assert body["status"] == "INVALID" and body["checks"]["document"] == vector["document"], vector["name"]
        if vector["document"] == "ok":
            assert body["checks"]["key"] == "key version is not trusted"


@pytest.mark.parametrize(("body", "reason"), [
    (b"seal.svg", "not a seal verification link (BASE/v#P.S)"),
    (b"https://a.example/v#x.y\r\nhttps://b.example/v#x.y\r\n", "send exactly one verification link (BASE/v#P.S) as text/uri-list"),
    (b"# only a comment\r\n", "send exactly one verification link (BASE/v#P.S) as text/uri-list"),
    (b"\xff", "the text/uri-list body is not UTF-8"),
])
def test_a_body_that_is_not_one_link_is_an_invalid_seal(api: Api, body: bytes, reason: str) -> None:
    answer = api.post("/api/seal/verify", data=body, headers=URI_LIST)
    assert answer.status_code == 400 and error_code(answer) == "invalid_seal"
    assert answer.json()["error"]["message"] == reason


def test_seals_made_before_the_qr_code_keep_verifying(api: Api) -> None:
    """The QR code is drawing: the signed payload is unchanged, so a badge without one still verifies."""
    bundle = api.sealed_run("job-1")
    element = parse_seal_svg(bundle["seal_svg"].encode())
    old = render_seal_svg(payload=b64url_decode(element.payload), signature=b64url_decode(element.signature), key=element.key)
    assert "shape-rendering" not in old
    assert api.verify(old).json()["status"] == "VERIFIED"


# --- gbx verify LINK ---------------------------------------------------------------------


def gbx(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed gbx console script."""
    assert GBX, "gbx is not installed in the virtualenv"
    return subprocess.run([GBX, *args], capture_output=True, text=True, timeout=120, env={**os.environ, "GBX_ID_TOKEN": ""})


def test_gbx_verifies_a_link_with_the_same_key_options_and_exit_codes(api: Api, tmp_path: Path) -> None:
    link = api.sealed_run("job-1")["verify_link"]
    keys = f"{api.base_url}/api/seal/public_keys"
    result = gbx("verify", link, "--keys", keys, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "VERIFIED"
    assert f"the link points at {AUDIENCE}" in result.stderr
    saved = tmp_path / "keys.json"
    saved.write_text(requests.get(keys, timeout=30).text)
    assert gbx("verify", link, "--keys", str(saved)).returncode == 0
    # No key option: a usage error, as for a file.
    assert gbx("verify", link).returncode == 2
    for name, tampered in tampered_links(link).items():
        result = gbx("verify", tampered, "--keys", str(saved), "--json")
        assert result.returncode == 1, (name, result.stderr)
        assert json.loads(result.stdout)["status"] == "INVALID"
    # Not a link at all: the document check fails, exit 1 as for a file that is not a seal.
    assert gbx("verify", "https://gbx.example/nothing", "--keys", str(saved)).returncode == 1


def test_gbx_asks_the_service_about_a_link_online(api: Api) -> None:
    link = api.sealed_run("job-1")["verify_link"]
    token = api.token(RUNNER)
    result = subprocess.run([GBX or "gbx", "verify", link, "--online", api.base_url, "--json", "--audience", AUDIENCE],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "GBX_ID_TOKEN": token})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["checks"]["online"] == "ok"


def test_gbx_gives_each_shared_vector_its_document_check(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": []}))
    for vector in VECTORS["vectors"]:
        result = gbx("verify", f"https://gbx.example/v#{vector['fragment']}", "--keys", str(keys), "--json")
        assert result.returncode == 1, (vector["name"], result.stderr)
        assert json.loads(result.stdout)["checks"]["document"] == vector["document"], vector["name"]


def test_gbx_refuses_a_seal_directory_whose_link_is_not_its_seal(api: Api, tmp_path: Path) -> None:
    """The directory's verify_link.txt must carry exactly seal.svg's payload and signature (gbx run checks it before writing)."""
    bundle = api.sealed_run("job-1")
    keys = tmp_path / "keys.json"
    keys.write_text(requests.get(f"{api.base_url}/api/seal/public_keys", timeout=30).text)
    seal_dir = tmp_path / "seal"
    seal_dir.mkdir()
    (seal_dir / "seal.svg").write_text(bundle["seal_svg"])
    (seal_dir / "seal.json").write_text(bundle["seal_json"])
    (seal_dir / "seal.sig").write_bytes(base64.b64decode(bundle["signature"]))
    (seal_dir / "verify_link.txt").write_text(bundle["verify_link"] + "\n")
    assert gbx("verify", str(seal_dir), "--keys", str(keys)).returncode == 0
    (seal_dir / "verify_link.txt").write_text(tampered_links(bundle["verify_link"])["signature middle"] + "\n")
    result = gbx("verify", str(seal_dir), "--keys", str(keys), "--json")
    assert result.returncode == 1
    assert json.loads(result.stdout)["checks"]["document"] == "verify_link.txt is not the link of seal.svg's payload and signature"
