"""The seal format, once for the service and the runner client: canonical seal.json, base64url, seal.svg render and parse,
and the verification link BASE/v#P.S that the badge draws as a QR code.

Pure functions on the standard library, defusedxml and segno (the QR encoder): no Firestore, KMS, HTTP or
pydantic, so the client installs it alone and the service ships it with every function (deploy.sh stages
this package).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import unicodedata
import urllib.parse
import zlib
from collections.abc import Iterable
from dataclasses import MISSING, dataclass, fields
from typing import Any
from xml.etree.ElementTree import Element, ParseError
from xml.sax.saxutils import escape as _escape_text

import defusedxml.ElementTree
from defusedxml.common import DTDForbidden, EntitiesForbidden, ExternalReferenceForbidden

SEAL_NS = "urn:gbx:seal:v1"
SVG_NS = "http://www.w3.org/2000/svg"
MAX_SEAL_BYTES = 256 * 1024
# The verification link: BASE + VERIFY_PATH + "#" + P + "." + S, where P is the base64url of the raw DEFLATE
# (RFC 1951, no zlib header) of the exact seal.json bytes and S the base64url of the DER signature.
VERIFY_PATH = "/v"
# A seal.json is under a kilobyte; a link that inflates beyond this is not a seal (and not a zip bomb we expand).
MAX_LINK_PAYLOAD_BYTES = 16 * 1024
# The QR code of the link: error correction M at least (segno raises it when that costs no size), and a
# version small enough to decode from a badge rasterised at 800 px. A link too long for it is not drawn.
QR_ERROR = "m"
QR_MAX_VERSION = 25
QR_QUIET_ZONE = 4  # modules of light border the QR specification asks for
# The data mask, fixed. Choosing it (scoring all eight masks for patterns a reader may confuse) costs 30-35 ms of
# CPU per seal in segno, three quarters of drawing the code, on every run_complete. The scoring matters for
# regular data (long runs of one byte); a link is deflated seal.json and a signature in base64url, as irregular as
# random bytes. On 250 real seals' links segno's scoring spread its choice over the masks (3: 68 times, 2: 64,
# 7: 43, 6: 30, 5: 24, 4: 17), and under the picture tests' strongest degradation (a blur of half a module) the
# fixed mask and segno's own choice each left 1 of 250 codes unreadable to ZXing-C++: the choice buys nothing
# measurable here. The picture tests read codes drawn this way after blur, tilt, perspective and JPEG.
QR_MASK = 4
# A seal sits three levels deep (svg > metadata > seal); anything near this is not
# a badge but an attempt to make a tree walker recurse or allocate without end.
MAX_SEAL_DEPTH = 64

@dataclass(frozen=True)
class SealClaims:
    """The claims of seal.json, version 1: every claim is a string but `v`; the manifest hash is absent when the run had none."""

    v: int
    seal_id: str
    run_id: str
    principal: str
    project_id: str
    container_image: str
    inputs_sha256: str
    outputs_sha256: str
    consumed_at: str
    started_at: str
    completed_at: str
    issuer: str
    key: str
    run_manifest_sha256: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The claims as seal.json holds them: an absent manifest is left out, not null."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


# Derived from SealClaims, so the list of claims is written once.
REQUIRED_CLAIMS: frozenset[str] = frozenset(f.name for f in fields(SealClaims) if f.default is MISSING)
OPTIONAL_CLAIMS: frozenset[str] = frozenset(f.name for f in fields(SealClaims) if f.default is not MISSING)

SEAL_VERSION = "1"
SEAL_ALG = "ES256"
SEAL_ATTRIBUTES = ("version", "alg", "key", "payload", "signature")

_SVG_TAG = f"{{{SVG_NS}}}svg"
_METADATA_TAG = f"{{{SVG_NS}}}metadata"
_SEAL_TAG = f"{{{SEAL_NS}}}seal"

# fullmatch, not match with "$": "$" would also accept a trailing newline.
_B64URL_ALPHABET = re.compile(r"[A-Za-z0-9_-]*")


class SealDocumentInvalid(ValueError):
    """The upload is not a usable seal.svg (not XML, a DTD, no or several seal elements…); the message is the reason.

    The service answers it as 400 `invalid_seal`: the document is refused, not verified.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SealTooLarge(ValueError):
    """The upload is over MAX_SEAL_BYTES (the service answers 413 `payload_too_large`)."""


class SealPayloadInvalid(ValueError):
    """The seal element's payload is not a valid seal.json; the message is the reason.

    Apart from SealDocumentInvalid on purpose: a document that parses but carries a bad payload is a
    200 INVALID verification (``checks.document`` = the reason), not an HTTP error.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class SealElement:
    """The attributes of the one seal element, as found in the svg (payload and signature still base64url)."""

    version: str
    alg: str
    key: str
    payload: str
    signature: str


def canonical_json(claims: dict) -> bytes:
    """Return the canonical seal.json bytes: UTF-8, sorted keys, no insignificant whitespace."""
    # allow_nan=False: NaN/Infinity are not JSON, so they can never be part of a seal.
    return json.dumps(
        claims, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def b64url_encode(data: bytes) -> str:
    """Encode bytes as unpadded base64url text."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode unpadded base64url text strictly; raise ValueError for anything but the canonical encoding."""
    # Strictness matters: a signed payload must have exactly one textual form, or the
    # same seal could circulate as many different documents.
    if not isinstance(text, str) or _B64URL_ALPHABET.fullmatch(text) is None:
        raise ValueError("not unpadded base64url text")
    if len(text) % 4 == 1:
        raise ValueError("impossible base64url length")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error as exc:
        raise ValueError("not base64url") from exc
    # Non-zero unused bits in the last character decode to the same bytes as the
    # canonical text; re-encoding exposes them.
    if b64url_encode(data) != text:
        raise ValueError("non-canonical base64url encoding")
    return data


def parse_seal_svg(data: bytes) -> SealElement:
    """Parse an uploaded seal.svg safely and return its one seal element; raise SealDocumentInvalid if unusable."""
    # Size first: nothing about an oversized upload is worth parsing.
    if len(data) > MAX_SEAL_BYTES:
        raise SealTooLarge(f"a seal.svg is limited to {MAX_SEAL_BYTES} bytes")
    root = _parse_xml(data)
    if root.tag != _SVG_TAG:
        raise SealDocumentInvalid("the document is not an SVG image")
    seals = _find_seals(root)
    if not seals:
        raise SealDocumentInvalid("the document has no seal element")
    if len(seals) > 1:
        raise SealDocumentInvalid("the document has more than one seal element")
    seal, parent = seals[0]
    if parent is None or parent.tag != _METADATA_TAG:
        raise SealDocumentInvalid("the seal element is not inside <metadata>")
    missing = [name for name in SEAL_ATTRIBUTES if seal.get(name) is None]
    if missing:
        raise SealDocumentInvalid(f"the seal element lacks attributes: {', '.join(missing)}")
    element = SealElement(**{name: seal.attrib[name] for name in SEAL_ATTRIBUTES})
    if element.version != SEAL_VERSION:
        raise SealDocumentInvalid("unsupported seal version")
    if element.alg != SEAL_ALG:
        raise SealDocumentInvalid("unsupported seal algorithm")
    return element


def decode_payload(payload: str) -> tuple[dict[str, Any], bytes]:
    """Decode a seal element's payload into (claims, seal.json bytes); raise SealPayloadInvalid with the reason."""
    try:
        raw = b64url_decode(payload)
    except ValueError as exc:
        raise SealPayloadInvalid("payload is not base64url") from exc
    return decode_claims(raw), raw


def decode_claims(raw: bytes) -> dict[str, Any]:
    """Check that raw is a canonical seal.json with the documented claims and return them; raise SealPayloadInvalid."""
    try:
        # Decode explicitly: json.loads(bytes) would also guess UTF-16 and UTF-32.
        claims = json.loads(raw.decode("utf-8"), parse_constant=_reject_json_constant)
    except (ValueError, RecursionError) as exc:
        raise SealPayloadInvalid("payload is not UTF-8 JSON") from exc
    if not isinstance(claims, dict):
        raise SealPayloadInvalid("payload is not a JSON object")
    try:
        canonical = canonical_json(claims)
    except (ValueError, RecursionError) as exc:
        # Lone surrogates (from "\ud800" escapes) cannot be encoded back to UTF-8.
        raise SealPayloadInvalid("payload is not canonical JSON") from exc
    # Duplicate keys, whitespace, key order, escapes and number spellings all show up here.
    if canonical != raw:
        raise SealPayloadInvalid("payload is not canonical JSON")
    missing = REQUIRED_CLAIMS - claims.keys()
    if missing:
        raise SealPayloadInvalid(f"payload lacks claims: {_name_list(missing)}")
    unknown = claims.keys() - REQUIRED_CLAIMS - OPTIONAL_CLAIMS
    if unknown:
        raise SealPayloadInvalid(f"payload has unknown claims: {_name_list(unknown)}")
    # type() and not isinstance(): True == 1 in Python, and "v": true is not version 1.
    if type(claims["v"]) is not int or claims["v"] != 1:
        raise SealPayloadInvalid("payload version is not 1")
    not_strings = [name for name, value in claims.items() if name != "v" and not isinstance(value, str)]
    if not_strings:
        raise SealPayloadInvalid(f"payload claims are not strings: {_name_list(not_strings)}")
    return claims


# --- the verification link ---------------------------------------------------


@dataclass(frozen=True)
class VerifyLink:
    """A verification link split into the site it points at (BASE) and its fragment (P.S, not yet checked)."""

    site: str
    fragment: str


def verify_link(base_url: str, *, payload: bytes, signature: bytes) -> str:
    """The verification link BASE/v#P.S of a seal: the signed seal.json bytes deflated, and the DER signature."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)  # negative window bits: raw DEFLATE, no zlib header
    packed = deflate.compress(payload) + deflate.flush()
    return f"{base_url.rstrip('/')}{VERIFY_PATH}#{b64url_encode(packed)}.{b64url_encode(signature)}"


def parse_verify_link(link: str) -> VerifyLink:
    """Split a verification link; raise SealDocumentInvalid when the text is not one at all (the fragment is not checked)."""
    text = link.strip()
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError as exc:
        raise SealDocumentInvalid("not a seal verification link (BASE/v#P.S)") from exc
    if (
        parts.scheme not in ("http", "https")
        or not parts.netloc
        or not parts.path.endswith(VERIFY_PATH)
        or parts.query
        or "#" not in text
        or any(char.isspace() for char in text)
    ):
        raise SealDocumentInvalid("not a seal verification link (BASE/v#P.S)")
    site = f"{parts.scheme}://{parts.netloc}{parts.path[: -len(VERIFY_PATH)]}"
    return VerifyLink(site=site, fragment=text.split("#", 1)[1])


def read_seal_element(*, svg: bytes | None = None, link: str | None = None) -> SealElement:
    """The seal element of a seal.svg, or the one a verification link stands for (give one of the two).

    SealTooLarge or SealDocumentInvalid: the input is no seal at all. SealPayloadInvalid: a link whose
    fragment does not decode, which is a seal that fails its document check, as a bad payload in an svg is.
    """
    if link is not None:
        return link_element(parse_verify_link(link).fragment)
    if svg is None:
        raise TypeError("read_seal_element needs svg or link")
    return parse_seal_svg(svg)


def link_element(fragment: str) -> SealElement:
    """The seal element a link's fragment P.S stands for; raise SealPayloadInvalid when it does not decode.

    A link has no element of its own, so its key is the payload's: the later checks run as for a seal.svg.
    """
    payload, dot, signature = fragment.partition(".")
    if not dot or "." in signature:
        raise SealPayloadInvalid("the link is damaged or incomplete (cut off when copied?): its part after # is not payload.signature")
    try:
        packed = b64url_decode(payload)
    except ValueError as exc:
        raise SealPayloadInvalid("payload is not base64url") from exc
    raw = inflate_payload(packed)
    key = _claims_for_display(raw).get("key")
    return SealElement(
        version=SEAL_VERSION, alg=SEAL_ALG, key=key if isinstance(key, str) else "", payload=b64url_encode(raw), signature=signature
    )


def inflate_payload(packed: bytes) -> bytes:
    """Inflate a link's raw DEFLATE payload, bounded; raise SealPayloadInvalid if it is not exactly one complete stream."""
    inflate = zlib.decompressobj(-15)
    try:
        raw = inflate.decompress(packed, MAX_LINK_PAYLOAD_BYTES + 1)
    except zlib.error as exc:
        raise SealPayloadInvalid("payload does not inflate (raw DEFLATE)") from exc
    if len(raw) > MAX_LINK_PAYLOAD_BYTES:
        raise SealPayloadInvalid(f"payload inflates to more than {MAX_LINK_PAYLOAD_BYTES} bytes")
    # A truncated stream, or bytes after its end: either way not the deflated seal.json the link was made of.
    if not inflate.eof or inflate.unused_data or inflate.unconsumed_tail:
        raise SealPayloadInvalid("payload does not inflate (raw DEFLATE)")
    return raw


def render_seal_svg(*, payload: bytes, signature: bytes, key: str, alg: str = SEAL_ALG, link: str | None = None) -> str:
    """Render the seal.svg badge: visible text drawn from the payload, the signed payload in <metadata>, and the
    verification link (when given) as a QR code, which survives rasterising, printing and photographing."""
    # The visible lines are a courtesy for people; only the metadata is trusted. They
    # are drawn leniently (any payload renders) so tests can build broken seals too.
    claims = _claims_for_display(payload)
    seal_id = _claim(claims, "seal_id")
    image_name, image_digest = _split_image(_claim(claims, "container_image"))
    completed_at = _claim(claims, "completed_at")
    # (label, full value for the accessible description, value as drawn)
    lines = [
        ("Seal ID", seal_id, seal_id),
        ("Run ID", _claim(claims, "run_id"), _claim(claims, "run_id")),
        ("Image", image_name, image_name),
        ("Digest", image_digest, _shorten_digest(image_digest)),
        ("Project", _claim(claims, "project_id"), _claim(claims, "project_id")),
        ("Principal", _claim(claims, "principal"), _claim(claims, "principal")),
        ("Completed", completed_at, _display_time(completed_at)),
        ("Issuer", _claim(claims, "issuer"), _claim(claims, "issuer")),
    ]
    title = f"Sealed run {_clip(_clean(seal_id), 64)} \u2014 GBX Entitlements"
    # Full values for screen readers, but bounded so that the badge stays far below
    # MAX_SEAL_BYTES whatever the claims hold: a seal must always fit its own verifier.
    description = "; ".join(f"{label}: {_clip(_clean(full))}" for label, full, _ in lines)
    seal_element = (
        f'<gbx:seal xmlns:gbx="{SEAL_NS}" version="{SEAL_VERSION}" alg={_attr(alg)} key={_attr(key)}'
        f' payload="{b64url_encode(payload)}" signature="{b64url_encode(signature)}"/>'
    )
    rows = "\n".join(_row(index, label, shown) for index, (label, _, shown) in enumerate(lines))
    pill_text = _fit(f"SIGNED \u00b7 {_clean(alg)}", _PILL_WIDTH - 24, _PILL_FONT, bold=True)
    qr = _qr_code(link) if link is not None else None
    if qr is not None:
        description += "; QR code: the verification link, which carries the signed payload and its signature"
    return _SVG_TEMPLATE.format(
        **_SVG_LAYOUT,
        title=_escape_text(title),
        desc=_escape_text(description),
        seal=seal_element,
        rows=rows,
        pill_text=_escape_text(pill_text),
        qr=_qr_markup(qr, "no verification link" if link is None else "link too long for a QR code"),
        qr_caption=_escape_text(_QR_CAPTION) if qr is not None else "",
    )


# --- parsing helpers ---------------------------------------------------------


def _parse_xml(data: bytes) -> Element:
    """Parse with defusedxml, turning every way a hostile document can fail into SealDocumentInvalid."""
    try:
        return defusedxml.ElementTree.fromstring(
            data, forbid_dtd=True, forbid_entities=True, forbid_external=True
        )
    except DTDForbidden as exc:
        raise SealDocumentInvalid("the document has a DTD") from exc
    except EntitiesForbidden as exc:
        raise SealDocumentInvalid("the document declares entities") from exc
    except ExternalReferenceForbidden as exc:
        raise SealDocumentInvalid("the document has an external reference") from exc
    # ParseError: not well-formed. ValueError: e.g. "multi-byte encodings are not
    # supported". LookupError: an unknown encoding in the XML declaration. Recursion
    # and memory errors must not escape as 500s for a document the caller controls.
    except (ParseError, ValueError, LookupError, RecursionError, MemoryError) as exc:
        raise SealDocumentInvalid("the document is not well-formed XML") from exc


def _find_seals(root: Element) -> list[tuple[Element, Element | None]]:
    """Return every seal element with its parent, refusing documents nested too deeply."""
    # An explicit stack instead of recursion: depth is attacker-controlled, and
    # ElementTree elements do not know their parents.
    found: list[tuple[Element, Element | None]] = []
    stack: list[tuple[Element, int, Element | None]] = [(root, 1, None)]
    while stack:
        element, depth, parent = stack.pop()
        if depth > MAX_SEAL_DEPTH:
            raise SealDocumentInvalid("the document is nested too deeply")
        if element.tag == _SEAL_TAG:
            found.append((element, parent))
        stack.extend((child, depth + 1, element) for child in element)
    return found


def _reject_json_constant(name: str) -> Any:
    """Refuse NaN and Infinity, which Python's json accepts but JSON does not have."""
    raise ValueError(f"{name} is not JSON")


def _name_list(names: Iterable[str]) -> str:
    """List claim names for a reason string, bounded: unknown names come from the uploader."""
    ordered = sorted(names)
    shown = [name if len(name) <= 40 else name[:39] + "\u2026" for name in ordered[:5]]
    more = f" (and {len(ordered) - 5} more)" if len(ordered) > 5 else ""
    return ", ".join(shown) + more


# --- rendering helpers -------------------------------------------------------

_WIDTH = 860
_HEADER_BOTTOM = 96
_ROW_TOP = 136
_ROW_STEP = 36
_ROW_COUNT = 8
# The QR code takes the right of the body, 300 units square with its quiet zone: a version 25 code still
# gets over 2 px per module when the badge is rasterised 800 px wide (zxing-cpp reads 1.8 at JPEG quality 40).
_QR_SIZE = 300
_QR_X = _WIDTH - 24 - _QR_SIZE
_QR_Y = _HEADER_BOTTOM + 16
_FOOTER_TOP = _QR_Y + _QR_SIZE + 16
_HEIGHT = _FOOTER_TOP + 44
_LABEL_X = 32
_VALUE_X = 132
_VALUE_FONT = 14
_RULE_RIGHT = _QR_X - 20
_VALUE_WIDTH = _RULE_RIGHT - _VALUE_X
_PILL_WIDTH = 140
_PILL_X = _WIDTH - 32 - _PILL_WIDTH
_PILL_FONT = 11
_FOOTER_FONT = 11
_FOOTER_TEXT = "Only the signed payload counts, not the text of this picture"
_QR_CAPTION = "Scan the code to verify the signature"

_MISSING = "\u2014"  # an em dash stands in for a claim the payload lacks
_ELLIPSIS = "\u2026"
_TIME = re.compile(r"(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2}:\d{2})(?:\.\d+)?Z")
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")

# Advance widths (em/1000) of printable ASCII in DejaVu Sans, from space to "~";
# Verdana's are nearly the same. Text is measured with these to ellipsize it before
# it can overflow the badge: SVG 1.1 has no text-overflow.
_ASCII_WIDTHS = (
    318, 401, 460, 838, 636, 950, 780, 275, 390, 390, 500, 838, 318, 361, 318, 337,
    636, 636, 636, 636, 636, 636, 636, 636, 636, 636, 337, 337, 838, 838, 838, 531,
    1000, 684, 686, 698, 770, 632, 575, 775, 752, 295, 295, 656, 557, 863, 748, 787,
    603, 787, 695, 635, 611, 732, 684, 989, 685, 611, 685, 390, 337, 390, 838, 500,
    500, 613, 635, 550, 635, 615, 352, 635, 634, 278, 278, 579, 278, 974, 634, 612,
    635, 635, 411, 521, 392, 634, 592, 818, 592, 592, 525, 636, 337, 636, 838,
)
# Anything else (accents, CJK, symbols) is assumed wider than any ASCII glyph.
_OTHER_WIDTH = 1050
# Headroom for Verdana, whose glyphs run a few percent wider.
_WIDTH_MARGIN = 1.06
# Bold DejaVu Sans glyphs are up to 12% wider than regular ones.
_BOLD_FACTOR = 1.12

_SVG_TEMPLATE = """\
<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="{width}" height="{height}" \
viewBox="0 0 {width} {height}" role="img" aria-labelledby="gbx-title gbx-desc">
<title id="gbx-title">{title}</title>
<desc id="gbx-desc">{desc}</desc>
<metadata>{seal}</metadata>
<defs>
<linearGradient id="gbx-header" x1="0" y1="0" x2="1" y2="1">
<stop offset="0" stop-color="#0b2545"/>
<stop offset="1" stop-color="#134f7c"/>
</linearGradient>
<linearGradient id="gbx-medal" x1="0" y1="0" x2="0" y2="1">
<stop offset="0" stop-color="#f9dc7a"/>
<stop offset="1" stop-color="#d9a21b"/>
</linearGradient>
</defs>
<rect x="0.5" y="0.5" width="{inner_width}" height="{inner_height}" rx="16" fill="#ffffff" stroke="#d3dce6"/>
<path d="M0.5 16.5 A16 16 0 0 1 16.5 0.5 H{corner_right} A16 16 0 0 1 {right} 16.5 V{header_bottom} H0.5 Z" \
fill="url(#gbx-header)"/>
<path d="M0.5 {footer_top} H{right} V{corner_bottom} A16 16 0 0 1 {corner_right} {bottom} H16.5 \
A16 16 0 0 1 0.5 {corner_bottom} Z" fill="#f3f6f9"/>
<line x1="0.5" y1="{footer_top}" x2="{right}" y2="{footer_top}" stroke="#e1e8ef"/>
<circle cx="58" cy="48" r="29" fill="url(#gbx-medal)" stroke="#f9e7ae" stroke-width="2"/>
<circle cx="58" cy="48" r="22" fill="none" stroke="#fff6d6" stroke-width="1.5" stroke-dasharray="2 3"/>
<path d="M46 49 L54 57 L71 39" fill="none" stroke="#0b2545" stroke-width="4.5" \
stroke-linecap="round" stroke-linejoin="round"/>
<g font-family="DejaVu Sans, Verdana, sans-serif">
<text x="104" y="40" font-size="11" font-weight="bold" letter-spacing="2" fill="#9cc5ea">GBX ENTITLEMENTS</text>
<text x="103" y="70" font-size="26" font-weight="bold" fill="#ffffff">Sealed run</text>
<rect x="{pill_x}" y="34" width="{pill_width}" height="28" rx="14" fill="#ffffff" fill-opacity="0.12" \
stroke="#ffffff" stroke-opacity="0.4"/>
<text x="{pill_center}" y="52" font-size="{pill_font}" font-weight="bold" letter-spacing="0.5" fill="#ffffff" \
text-anchor="middle">{pill_text}</text>
{rows}
<text x="{label_x}" y="{footer_text_y}" font-size="{footer_font}" fill="#5b6b7c">{footer_text}</text>
<text x="{qr_center}" y="{footer_text_y}" font-size="{footer_font}" font-weight="bold" fill="#134f7c" \
text-anchor="middle">{qr_caption}</text>
</g>
{qr}
</svg>
"""
# Fixed geometry, filled into the template once so render_seal_svg only adds content.
_SVG_LAYOUT = {
    "width": _WIDTH,
    "height": _HEIGHT,
    "inner_width": _WIDTH - 1,
    "inner_height": _HEIGHT - 1,
    "right": _WIDTH - 0.5,
    "bottom": _HEIGHT - 0.5,
    "corner_right": _WIDTH - 16.5,
    "corner_bottom": _HEIGHT - 16.5,
    "header_bottom": _HEADER_BOTTOM,
    "footer_top": _FOOTER_TOP,
    "footer_text_y": _FOOTER_TOP + 27,
    "footer_font": _FOOTER_FONT,
    "footer_text": _escape_text(_FOOTER_TEXT),
    "label_x": _LABEL_X,
    "pill_x": _PILL_X,
    "pill_width": _PILL_WIDTH,
    "pill_center": _PILL_X + _PILL_WIDTH / 2,
    "pill_font": _PILL_FONT,
    "qr_center": _QR_X + _QR_SIZE / 2,
}


def _row(index: int, label: str, value: str) -> str:
    """Render one label/value line of the badge, with a hairline under all but the last."""
    y = _ROW_TOP + index * _ROW_STEP
    shown = _fit(_clean(value), _VALUE_WIDTH, _VALUE_FONT)
    line = (
        f'<text x="{_LABEL_X}" y="{y}" font-size="10.5" font-weight="bold" letter-spacing="1" '
        f'fill="#6b7a8c">{_escape_text(label.upper())}</text>\n'
        f'<text x="{_VALUE_X}" y="{y}" font-size="{_VALUE_FONT}" fill="#17212b">{_escape_text(shown)}</text>'
    )
    if index < _ROW_COUNT - 1:
        rule_y = y + 11
        line += f'\n<line x1="{_LABEL_X}" y1="{rule_y}" x2="{_RULE_RIGHT}" y2="{rule_y}" stroke="#edf1f5"/>'
    return line


def _qr_code(link: str) -> Any:
    """The QR code of the link (segno), or None when it needs a version above QR_MAX_VERSION at level M."""
    # Imported here: only rendering needs the encoder, and verifying (gbx verify, the service's verify) never renders.
    import segno
    from segno import DataOverflowError

    try:
        # boost_error: a higher error correction level whenever it fits in the same version, for free.
        qr = segno.make_qr(link, error=QR_ERROR, boost_error=True, mode="byte", version=None, mask=QR_MASK)
    except DataOverflowError:
        return None
    return qr if int(qr.version) <= QR_MAX_VERSION else None  # make_qr makes no Micro QR: an int


def _qr_markup(qr: Any, missing: str) -> str:
    """Draw the QR code in its framed panel (quiet zone included), or a note in the panel when there is none."""
    frame = (
        f'<rect x="{_QR_X + 0.5}" y="{_QR_Y + 0.5}" width="{_QR_SIZE - 1}" height="{_QR_SIZE - 1}" rx="10" '
        'fill="#ffffff" stroke="#d3dce6"/>'
    )
    if qr is None:
        center = _QR_X + _QR_SIZE / 2
        return (
            f'{frame}\n<text x="{center}" y="{_QR_Y + _QR_SIZE / 2}" font-family="DejaVu Sans, Verdana, sans-serif" '
            f'font-size="12" fill="#6b7a8c" text-anchor="middle">{_escape_text(missing)}</text>'
        )
    # One filled rectangle per run of dark modules: crisp at any scale, no hairline gaps between strokes.
    runs: list[str] = []
    for y, row in enumerate(qr.matrix):
        x = 0
        while x < len(row):
            if row[x] & 1:
                start = x
                while x < len(row) and row[x] & 1:
                    x += 1
                runs.append(f"M{start} {y}h{x - start}v1h{start - x}z")
            else:
                x += 1
    modules = len(qr.matrix) + 2 * QR_QUIET_ZONE
    scale = round(_QR_SIZE / modules, 6)
    offset = (_QR_SIZE - scale * (modules - 2 * QR_QUIET_ZONE)) / 2
    return (
        f'{frame}\n<path transform="translate({round(_QR_X + offset, 4)} {round(_QR_Y + offset, 4)}) scale({scale})" '
        f'fill="#0b2545" shape-rendering="crispEdges" d="{"".join(runs)}"/>'
    )


def _claims_for_display(payload: bytes) -> dict[str, Any]:
    """Read the payload's claims for display, or none if it is not a JSON object."""
    try:
        claims = json.loads(payload.decode("utf-8"))
    except (ValueError, RecursionError):
        return {}
    return claims if isinstance(claims, dict) else {}


def _claim(claims: dict[str, Any], name: str) -> str:
    """Return a string claim for display, or a dash when it is absent or not a string."""
    value = claims.get(name)
    return value if isinstance(value, str) and value else _MISSING


def _split_image(image: str) -> tuple[str, str]:
    """Split NAME[:TAG]@sha256:HEX into its name and digest, shown on separate lines."""
    name, at, digest = image.rpartition("@")
    if not at or not name:
        return image, _MISSING
    return name, digest


def _shorten_digest(digest: str) -> str:
    """Shorten a sha256 digest the way registries do: the full value is in the payload."""
    match = _DIGEST.fullmatch(digest)
    if match is None:
        return digest
    hex_digits = match.group(1)
    return f"sha256:{hex_digits[:16]}{_ELLIPSIS}{hex_digits[-8:]}"


def _display_time(value: str) -> str:
    """Show an RFC 3339 UTC time as 'YYYY-MM-DD HH:MM:SS UTC', anything else as is."""
    match = _TIME.fullmatch(value)
    if match is None:
        return value
    return f"{match.group(1)} {match.group(2)} UTC"


def _clean(text: str) -> str:
    """Replace characters that XML forbids or that can disguise text (controls, bidi overrides)."""
    # Escaping cannot help here: a control character is illegal in XML 1.0 even as a
    # character reference, and one bad claim must not make the whole seal unparseable.
    return "".join(
        "\ufffd"
        if not _is_xml_char(char) or unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp")
        else char
        for char in text
    )


def _clip(text: str, limit: int = 256) -> str:
    """Shorten text to at most limit characters, keeping both ends."""
    if len(text) <= limit:
        return text
    half = (limit - 1) // 2
    return text[:half] + _ELLIPSIS + text[-half:]


def _text_width(text: str, font_size: float, *, bold: bool = False) -> float:
    """Estimate the rendered width of text in pixels, erring on the wide side."""
    units = sum(
        _ASCII_WIDTHS[ord(char) - 32] if 32 <= ord(char) < 127 else _OTHER_WIDTH for char in text
    )
    return units / 1000 * font_size * _WIDTH_MARGIN * (_BOLD_FACTOR if bold else 1.0)


def _fit(text: str, max_width: float, font_size: float, *, bold: bool = False) -> str:
    """Ellipsize text in the middle so that it fits; both ends of an id carry meaning."""
    if _text_width(text, font_size, bold=bold) <= max_width:
        return text
    budget = max_width - _text_width(_ELLIPSIS, font_size, bold=bold)
    head: list[str] = []
    tail: list[str] = []
    start, end = 0, len(text) - 1
    # Take characters alternately from both ends until the next one would not fit.
    while start <= end:
        take_head = len(head) <= len(tail)
        char = text[start] if take_head else text[end]
        if _text_width("".join(head) + "".join(tail) + char, font_size, bold=bold) > budget:
            break
        if take_head:
            head.append(char)
            start += 1
        else:
            tail.append(char)
            end -= 1
    return "".join(head) + _ELLIPSIS + "".join(reversed(tail))


def _attr(value: str) -> str:
    """Quote a value as an XML attribute that parses back to exactly the same string."""
    # Unlike display text, an attribute must round-trip exactly, so refuse rather
    # than silently alter a value that XML cannot carry.
    if not all(_is_xml_char(char) for char in value):
        raise ValueError("attribute value contains characters XML cannot carry")
    # Whitespace is escaped too: parsers normalise a literal tab or newline to a space.
    escaped = _escape_text(value, {'"': "&quot;", "\t": "&#9;", "\n": "&#10;", "\r": "&#13;"})
    return f'"{escaped}"'


def _is_xml_char(char: str) -> bool:
    """Say whether XML 1.0 allows this character at all (its Char production)."""
    code = ord(char)
    return (
        code in (0x9, 0xA, 0xD)
        or 0x20 <= code <= 0xD7FF
        or 0xE000 <= code <= 0xFFFD
        or 0x10000 <= code <= 0x10FFFF
    )
