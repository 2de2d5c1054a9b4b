"""The portal's seal log check in Chromium: tlog.js held to the shared vectors and transparency-dev/merkle's, and the
`log` line after the offline checks (entry N of M, or why not)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.support.ui import WebDriverWait

from gbx_client.seal_format import canonical_json, render_seal_svg
from shared import sealog, signing
from tests.conftest import Api
from tests.test_portal import POLL_SECONDS, WAIT_SECONDS, Portal, browser, check_in_browser, portal, portal_server, screenshots, severe_console_messages

__all__ = ["browser", "portal", "portal_server", "screenshots"]
VECTORS = Path(__file__).resolve().parent / "vectors"


@pytest.fixture(autouse=True)
def background_done() -> Iterator[None]:
    yield
    assert sealog.join_background(40.0)


def run_module(portal: Portal, body: str, *args: Any) -> Any:
    """Run `body` (an async function body with `tlog`, the imported portal/tlog.js, and `args`) in the page."""
    script = (
        "const done = arguments[arguments.length - 1]; const args = Array.from(arguments).slice(0, -1);"
        "import('/tlog.js').then(async (tlog) => { try { done(await (async () => {" + body + "})()); }"
        " catch (error) { done({error: String(error && error.stack || error)}); } });"
    )
    portal.browser.set_script_timeout(60)
    return portal.browser.execute_async_script(script, *args)


def test_tlog_js_gives_every_shared_vector_the_python_outcome(portal: Portal) -> None:
    """tests/vectors/tlog.json, made with gbx_client.tlog: ok with its `entry N of M`, or the same kind of failure."""
    vectors = json.loads((VECTORS / "tlog.json").read_text())["vectors"]
    outcomes = run_module(portal, """
        const out = {};
        for (const v of args[0]) {
          const proof = Uint8Array.from(atob(v.proof_b64), (c) => c.charCodeAt(0));
          try {
            const { index, size } = await tlog.verifyProof(proof, new TextEncoder().encode(v.seal_json), v.vkey);
            out[v.name] = { result: "ok", logged: `entry ${index + 1} of ${size}` };
          } catch (error) {
            out[v.name] = { result: error instanceof tlog.LogFormatError ? "format" : error instanceof tlog.LogVerificationError ? "verification" : "other: " + error };
          }
        }
        return out;
    """, vectors)
    assert "error" not in outcomes, outcomes
    for vector in vectors:
        expected = {"result": vector["result"], **({"logged": vector["logged"]} if vector["result"] == "ok" else {})}
        assert outcomes[vector["name"]] == expected, vector["name"]


def test_tlog_js_checks_inclusion_as_transparency_dev_merkle_does(portal: Portal) -> None:
    """Every inclusion vector of transparency-dev/merkle through tlog.js's verifyInclusion."""
    cases = json.loads((VECTORS / "merkle" / "vectors.json").read_text())["inclusion"]
    outcomes = run_module(portal, """
        const b = (s) => Uint8Array.from(atob(s || ""), (c) => c.charCodeAt(0));
        const out = [];
        for (const c of args[0]) {
          try {
            await tlog.verifyInclusion(c.leafIdx, c.treeSize, b(c.leafHash), (c.proof || []).map(b), b(c.root));
            out.push(false);
          } catch (error) {
            if (!(error instanceof tlog.LogVerificationError)) return { error: String(error) };
            out.push(true);
          }
        }
        return out;
    """, cases)
    assert outcomes == [case["wantErr"] for case in cases]


def log_line(portal: Portal) -> dict[str, str]:
    """The page's `log` line once its check is done."""
    WebDriverWait(portal.browser, WAIT_SECONDS, poll_frequency=POLL_SECONDS).until(
        lambda d: d.execute_script("return document.getElementById('log-line').dataset.state") == "done")
    return portal.browser.execute_script(
        "const line = document.getElementById('log-line');"
        "return {result: line.dataset.result, text: line.querySelector('.check-reason').textContent, hidden: line.hidden};")


def test_a_logged_seal_shows_its_entry(api: Api, portal: Portal, tmp_path: Path) -> None:
    """A seal from run_complete: VERIFIED offline, then `log: entry 2 of 2` checked in the browser with Ed25519."""
    api.issue("other@acme-prod.iam.gserviceaccount.com", 1)
    api.sealed_run("job-0", as_user="other@acme-prod.iam.gserviceaccount.com")
    bundle = api.sealed_run("job-1")
    shown = check_in_browser(portal, bundle["seal_svg"], tmp_path)
    assert shown.verdict == "VERIFIED"
    line = log_line(portal)
    assert line["result"] == "ok" and line["hidden"] is False
    assert line["text"] in ("entry 1 of 2", "entry 2 of 2")
    assert ("GET", "/api/log/proof") in portal.server.take_requests()
    assert severe_console_messages(portal) == []


def test_a_seal_not_in_the_log_says_so(api: Api, portal: Portal, tmp_path: Path) -> None:
    """Signed with the service's key but never issued (so never logged): VERIFIED offline, and the log line says why not."""
    api.sealed_run("job-1")
    claims = {"v": 1, "seal_id": "NeverIssuedNeverLogged0", "run_id": "x", "principal": "a@b.example", "project_id": "acme-prod",
              "container_image": "r/i@sha256:" + "0" * 64, "inputs_sha256": "a" * 64, "outputs_sha256": "b" * 64,
              "consumed_at": "2030-01-01T00:00:00Z", "started_at": "2030-01-01T00:00:01Z", "completed_at": "2030-01-01T00:00:02Z",
              "issuer": "gbx-test", "key": signing.get_signer().key_version}
    payload = canonical_json(claims)
    signature = signing.get_signer().sign(payload)
    svg = render_seal_svg(payload=payload, signature=signature.der, key=signature.key, alg=signature.alg)
    shown = check_in_browser(portal, svg, tmp_path)
    assert shown.verdict == "VERIFIED"
    assert log_line(portal) == {"result": "failed", "text": "not in this site's seal log", "hidden": False}
    # A seal that fails offline is not looked up at all.
    damaged = signature.der[:-1] + bytes([signature.der[-1] ^ 1])
    broken = check_in_browser(portal, render_seal_svg(payload=payload, signature=damaged, key=signature.key, alg=signature.alg), tmp_path)
    assert broken.verdict == "INVALID"
    assert portal.browser.execute_script("return document.getElementById('log-line').hidden") is True
