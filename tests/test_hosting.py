"""firebase.json's Hosting section: the portal, and the headers every answer of the base URL carries.

The same rules serve production (Firebase Hosting, from the effective config deploy.sh writes; see test_deploy.py for
its rewrites) and `make run` (shared/local.py applies them to the portal's files), so they are written in the subset
of Hosting's matching that reads the same in both: globs whose only wildcard is a whole `**` segment, and anchored
regular expressions without the constructs RE2 lacks.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from shared.endpoints import ENDPOINTS

REPO = Path(__file__).resolve().parent.parent
HOSTING = json.loads((REPO / "firebase.json").read_text())["hosting"]
PORTAL = REPO / HOSTING["public"]
# 'wasm-unsafe-eval' lets the page compile WebAssembly (the QR decoder, from this origin), and nothing else: no eval().
CSP = "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
SECURITY = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
# The portal's own files are not fingerprinted (no build step), so they are not cached for long: browsers revalidate.
STATIC = {**SECURITY, "Cache-Control": "no-cache"}
# The vendored QR decoder lives in a folder named after its exact version (portal/vendor/barcode-detector-X.Y.Z/):
# a new version is a new path, so its files (the 1 MB .wasm above all) are fetched once and kept.
VENDORED = {**SECURITY, "Cache-Control": "public, max-age=31536000, immutable"}
API = {**SECURITY, "Cache-Control": "no-store"}
API_PATHS = [endpoint.path for endpoint in ENDPOINTS.values() if endpoint.path.startswith("/api/")]


def portal_paths() -> list[str]:
    """Every request path of the portal's files, as Hosting serves them (dot files are ignored), plus / itself."""
    files = sorted(path.relative_to(PORTAL).as_posix() for path in PORTAL.rglob("*")
                   if path.is_file() and not any(part.startswith(".") for part in path.relative_to(PORTAL).parts))
    return ["/", *(f"/{name}" for name in files)]


def glob_regex(glob: str) -> str:
    """A Hosting glob of the portable kind (literal text and whole `**` segments) as a regular expression."""
    return "".join(".*" if part == "**" else re.escape(part) for part in re.split(r"(\*\*)", glob))


def matching_rules(path: str) -> list[dict]:
    """The header rules Hosting applies to a request path."""
    return [rule for rule in HOSTING["headers"]
            if re.fullmatch(glob_regex(rule["source"]) if "source" in rule else rule["regex"], path)]


def headers_for(path: str) -> dict[str, str]:
    """The headers firebase.json adds to the answer for `path`, after checking no two rules set the same one."""
    out: dict[str, str] = {}
    for rule in matching_rules(path):
        for header in rule["headers"]:
            assert header["key"] not in out, f"two rules set {header['key']} on {path}: the answer would depend on rule order"
            out[header["key"]] = header["value"]
    return out


def test_the_portal_is_the_public_folder_and_the_rewrites_come_from_the_registry() -> None:
    """The tracked config is region-free: deploy.sh adds the site and, for --region, the registry's rewrites after
    the tracked ones, which only send the portal's own paths to its page: /v, where verification links point."""
    assert HOSTING["public"] == "portal" and (PORTAL / "index.html").is_file()
    assert "site" not in HOSTING
    assert HOSTING["rewrites"] == [{"source": "/v", "destination": "/index.html"}]
    assert HOSTING["ignore"] == ["**/.*"]


def test_the_verification_links_path_gets_the_portals_headers() -> None:
    """/v is the portal's page under another path: the same strict CSP, revalidated, never an API path."""
    assert headers_for("/v") == STATIC
    assert "/v" not in API_PATHS


@pytest.mark.parametrize("path", [*(path for path in portal_paths() if not path.startswith("/vendor/")), "/index.html", "/openapi.json"])
def test_static_files_get_a_strict_csp_and_are_revalidated(path: str) -> None:
    assert headers_for(path) == STATIC


@pytest.mark.parametrize("path", [path for path in portal_paths() if path.startswith("/vendor/")])
def test_vendored_files_are_versioned_by_their_folder_and_cached_for_a_year(path: str) -> None:
    assert re.fullmatch(r"/vendor/[a-z-]+-[0-9]+\.[0-9]+\.[0-9]+/[^/]+", path), "a vendored file's folder names its exact version"
    assert headers_for(path) == VENDORED


@pytest.mark.parametrize("path", API_PATHS)
def test_api_answers_are_never_cached(path: str) -> None:
    """Hosting's CDN must never keep an API answer (the functions say no-store themselves too)."""
    assert headers_for(path) == API


@pytest.mark.parametrize("path", ["/log/checkpoint", "/log/tile/0/000", "/log/tile/entries/x001/000.p/7"])
def test_the_seal_log_keeps_its_own_caching(path: str) -> None:
    """Hosting adds no Cache-Control to the seal log: its function says it (no-cache for the checkpoint, a week and
    immutable for tiles), and Hosting's CDN follows it."""
    assert any(e.path == "/log/" for e in ENDPOINTS.values())
    assert headers_for(path) == SECURITY


def test_the_portal_has_the_files_the_header_rules_expect() -> None:
    """The no-cache rule covers top-level files and the immutable one vendor/'s; another subfolder would fall back to
    Hosting's default caching."""
    assert {"/index.html", "/app.js", "/style.css"} <= set(portal_paths())
    assert all(path.count("/") == 1 or path.startswith("/vendor/") for path in portal_paths()), "a portal subfolder needs a Cache-Control rule"


def test_every_rule_reads_the_same_in_hosting_and_in_the_local_server() -> None:
    """fnmatch's `*` and `?` cross `/` where Hosting's do not, and it has no `{a,b}`; RE2 has no lookaround or backreference."""
    for rule in HOSTING["headers"]:
        assert ("source" in rule) != ("regex" in rule), rule
        assert rule["headers"] and all(set(header) == {"key", "value"} for header in rule["headers"]), rule
        if "source" in rule:
            assert re.fullmatch(r"(/[A-Za-z0-9._-]+)*(/\*\*)*|\*\*", rule["source"]), rule["source"]
        else:
            assert rule["regex"].startswith("^") and rule["regex"].endswith("$"), rule["regex"]
            assert not re.search(r"\(\?[=!<]|\\[1-9]", rule["regex"]), rule["regex"]


def test_the_csp_allows_this_origin_only() -> None:
    directives = dict(directive.strip().split(" ", 1) for directive in CSP.split(";"))
    assert directives["default-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'", "default-src does not cover framing"
    # Scripts: this origin's, plus compiling WebAssembly (the QR decoder); never eval() or inline script.
    assert directives["script-src"] == "'self' 'wasm-unsafe-eval'"
    for loosening in ("unsafe-inline", "'unsafe-eval'", "*", "data:", "blob:", "http:", "https:"):
        assert loosening not in CSP
    assert not {"style-src", "img-src", "connect-src"} & directives.keys(), "all of them fall back to 'self'"


def test_the_local_server_serves_the_portal_with_the_same_headers() -> None:
    """`make run` (shared/local.py) applies firebase.json's rules to the portal's files, as Hosting does."""
    from shared.local import create_app

    client = create_app().test_client()
    for path in portal_paths():
        response = client.get(path)
        assert response.status_code == 200, path
        expected = VENDORED if path.startswith("/vendor/") else STATIC
        served = {key: response.headers.get(key) for key in expected}
        assert served == expected, path
        if path.endswith(".wasm"):
            # What WebAssembly.instantiateStreaming requires (Hosting serves .wasm so too).
            assert response.headers["Content-Type"] == "application/wasm", path


class InlineContent(HTMLParser):
    """What a `default-src 'self'` policy would block in a page: inline scripts, styles and handlers, other origins."""

    def __init__(self) -> None:
        super().__init__()
        self.blocked: list[str] = []
        self.in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = dict(attrs)
        self.in_script = tag == "script"
        if tag == "script" and not names.get("src"):
            self.blocked.append("inline <script>")
        if tag == "style":
            self.blocked.append("<style> element")
        for name, value in attrs:
            if name.startswith("on"):
                self.blocked.append(f"{name}= handler on <{tag}>")
            if name == "style":
                self.blocked.append(f"style= on <{tag}>")
            if name in {"src", "href", "action", "srcset", "poster", "data"} and value and \
                    re.match(r"\s*(https?:|//|data:|blob:|javascript:)", value, re.IGNORECASE) and tag != "a":
                self.blocked.append(f"{name}={value} on <{tag}>")

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self.in_script = False

    def handle_data(self, data: str) -> None:
        if self.in_script and data.strip():
            self.blocked.append("inline script text")


@pytest.mark.parametrize("page", sorted(PORTAL.glob("*.html")), ids=lambda page: page.name)
def test_the_portal_needs_nothing_the_csp_forbids(page: Path) -> None:
    parser = InlineContent()
    parser.feed(page.read_text())
    assert parser.blocked == []
    for script in PORTAL.glob("*.js"):
        assert not re.search(r"\beval\s*\(|\bnew\s+Function\s*\(|setAttribute\(\s*[\"']style", script.read_text()), script.name
