"""The seal directory: seal.json, seal.sig, seal.svg, public_key.pem, verify_link.txt, VERIFY.md; and preseal.json while a seal is pending."""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gbx_client.errors import CantCreate, NoInput, ProtocolViolation, UsageError

PRESEAL = "preseal.json"
LINK_FILE = "verify_link.txt"
BUNDLE_FIELDS = ("seal_id", "seal_json", "signature", "alg", "key", "public_key_pem", "seal_svg")


@dataclass(frozen=True)
class Bundle:
    """run_complete's answer, checked for shape: the signed bytes, the DER signature, the badge and the key."""

    seal_id: str
    seal_json: bytes
    signature: bytes
    key: str
    public_key_pem: str
    seal_svg: bytes
    verify_link: str

    @classmethod
    def from_reply(cls, body: dict[str, Any]) -> Bundle:
        """Check the bundle's fields; ProtocolViolation names what is wrong."""
        missing = [name for name in BUNDLE_FIELDS if name not in body]
        if missing:
            raise ProtocolViolation(f"run_complete: the seal bundle lacks {', '.join(missing)}")
        if body["public_key_pem"] is None:
            raise ProtocolViolation("run_complete: the seal's key version is no longer trusted (public_key_pem is null)")
        text_fields = ("seal_id", "seal_json", "signature", "key", "public_key_pem", "seal_svg")
        if not all(isinstance(body[name], str) for name in text_fields):
            raise ProtocolViolation("run_complete: the seal bundle has fields that are not strings")
        try:
            signature = base64.b64decode(body["signature"], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ProtocolViolation("run_complete: the bundle's signature is not base64") from exc
        # verify_link came later than the other fields: a service without it still seals, only without a link.
        link = body.get("verify_link", "")
        if not isinstance(link, str):
            raise ProtocolViolation("run_complete: the bundle's verify_link is not a string")
        return cls(
            seal_id=body["seal_id"],
            seal_json=body["seal_json"].encode("utf-8"),
            signature=signature,
            key=body["key"],
            public_key_pem=body["public_key_pem"],
            seal_svg=body["seal_svg"].encode("utf-8"),
            verify_link=link,
        )


def prepare(seal_dir: Path) -> None:
    """Create the seal directory now, so an unwritable one fails before a run is charged."""
    try:
        seal_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=seal_dir, prefix=".gbx-probe-"):
            pass
    except OSError as exc:
        raise CantCreate(f"cannot write the seal directory {seal_dir}: {exc.strerror or exc}") from exc


def write(seal_dir: Path, bundle: Bundle, *, run_id: str, base_url: str, self_check: Callable[[Path], None]) -> None:
    """Write the seal files into a scratch directory, self-check them there, then move them in; run_id's preseal goes last."""
    prepare(seal_dir)
    scratch = Path(tempfile.mkdtemp(dir=seal_dir, prefix=".gbx-seal-"))
    try:
        files = {
            "seal.json": bundle.seal_json,
            "seal.sig": bundle.signature,
            "seal.svg": bundle.seal_svg,
            "public_key.pem": bundle.public_key_pem.encode("utf-8"),
            "VERIFY.md": verify_md(bundle, base_url).encode("utf-8"),
        }
        if bundle.verify_link:
            files[LINK_FILE] = (bundle.verify_link + "\n").encode("utf-8")
        for name, data in files.items():
            (scratch / name).write_bytes(data)
        # The exact bytes on disk are checked, not the reply they came from.
        self_check(scratch)
        for name in files:
            os.replace(scratch / name, seal_dir / name)
    except OSError as exc:
        raise CantCreate(f"cannot write the seal directory {seal_dir}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    remove_preseal(seal_dir, run_id)


def verify_md(bundle: Bundle, base_url: str) -> str:
    """How to verify this seal: openssl, gbx verify offline, the verification link, and online."""
    claims = json.loads(bundle.seal_json)
    link_row = (
        f"| `{LINK_FILE}` | the verification link (seal.svg draws it as a QR code): seal.json deflated and the signature |\n"
        if bundle.verify_link else ""
    )
    link_section = f"""
## The verification link (and the badge's QR code)

`{LINK_FILE}` holds the link that seal.svg's QR code encodes: `BASE/v#P.S`, where P is seal.json (raw DEFLATE,
base64url) and S the signature (base64url). Opened in a browser it verifies the seal there, in the page, with
the keys of the site it names; the fragment after `#` is never sent to any server. The same checks from here:

    gbx verify "$(cat {LINK_FILE})" --keys {base_url}/api/seal/public_keys
    curl -s {base_url}/api/seal/verify -H "Authorization: Bearer $TOKEN" -H "Content-Type: text/uri-list" --data-binary @{LINK_FILE}

A picture of the badge (a print, a screenshot) carries the proof in its QR code, not in its visible text: only
what the link verifies counts. And a QR code can point at any site: trust the result only from a site (or a
keys document) you trust.
""" if bundle.verify_link else ""
    return f"""# Seal {bundle.seal_id}

Run `{claims.get("run_id")}` of `{claims.get("container_image")}` in project `{claims.get("project_id")}`,
for `{claims.get("principal")}`, completed at {claims.get("completed_at")}, sealed by `{claims.get("issuer")}`
with key `{bundle.key}`.

| File | What |
| --- | --- |
| `seal.json` | the signed claims, exactly the bytes that were signed |
| `seal.sig` | the ES256 signature (DER) of SHA-256(seal.json) |
| `seal.svg` | the badge; its `<metadata>` carries seal.json and the signature (base64url) |
| `public_key.pem` | the public key of `{bundle.key}` |
{link_row}| `seal.tlog-proof` | written beside them once the seal is in the public seal log (see below) |

## Offline, with openssl

    openssl dgst -sha256 -verify public_key.pem -signature seal.sig seal.json

prints `Verified OK`. That proves seal.json was signed with the key in public_key.pem. To know the key is
the service's, compare it with the key named `{bundle.key}` in {base_url}/api/seal/public_keys.

## Offline, with gbx

    gbx verify . --keys {base_url}/api/seal/public_keys --outputs OUTPUTS_DIR

checks the badge, that the key is one the service publishes, the signature, and that OUTPUTS_DIR holds
exactly the sealed outputs (outputs_sha256 `{claims.get("outputs_sha256")}`). Save the keys document
(`curl -s {base_url}/api/seal/public_keys > keys.json`) to verify without any network: `--keys keys.json`.

The outputs hash can be reproduced with coreutils:

    (cd OUTPUTS_DIR && find . -type f -print0 | LC_ALL=C sort -z | xargs -0r sha256sum) | sha256sum

## Online

    gbx verify . --online {base_url}

or with curl and a Google ID token:

    curl -s {base_url}/api/seal/verify -H "Authorization: Bearer $TOKEN" -H "Content-Type: image/svg+xml" --data-binary @seal.svg

The service also checks that it issued this very seal (its record), and says whether it was redeemed.

## The seal log

Every seal is appended to a public, append-only transparency log ({base_url}/log/, C2SP tlog-tiles) whose
checkpoints the service signs with a key of their own. `seal.tlog-proof` (a C2SP tlog-proof: the seal's entry,
its inclusion path and a signed checkpoint) shows this seal is in it; `gbx verify` checks it offline with the
log key that the public keys name, says `logged: entry N of M`, and `--require-log` makes a missing or bad
proof INVALID. When gbx could not fetch it at completion, fetch it now:

    curl -fsS '{base_url}/api/log/proof?seal_id={bundle.seal_id}' > seal.tlog-proof
{link_section}"""


def write_preseal(seal_dir: Path, record: dict[str, Any]) -> Path:
    """Write preseal.json (state "pending") atomically; return its path. Another run's pending seal is never replaced."""
    path = seal_dir / PRESEAL
    refuse_foreign_preseal(seal_dir, str(record["run_id"]))
    document = {"state": "pending", **record, "at": _now()}
    try:
        seal_dir.mkdir(parents=True, exist_ok=True)
        scratch = path.with_name(f".{PRESEAL}.tmp")
        scratch.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(scratch, path)
    except OSError as exc:
        raise CantCreate(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path


def read_preseal(seal_dir: Path, *, required: bool) -> dict[str, Any] | None:
    """Read a pending preseal.json; None when there is none and it is not required."""
    path = seal_dir / PRESEAL
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        if required:
            raise NoInput(f"{path}: no pending seal here") from exc
        return None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: unreadable: {exc}") from exc
    fields = ("run_id", "url", "outputs_sha256", "start")
    if not isinstance(document, dict) or document.get("state") != "pending" or not all(name in document for name in fields):
        raise UsageError(f"{path}: not a pending preseal written by gbx")
    return document


def remove_preseal(seal_dir: Path, run_id: str) -> None:
    """Remove preseal.json once run_id's seal is written; a preseal of any other run (or one unreadable) stays."""
    if _preseal_run_id(seal_dir) == run_id:
        with contextlib.suppress(FileNotFoundError):
            (seal_dir / PRESEAL).unlink()


def refuse_foreign_preseal(seal_dir: Path, run_id: str) -> None:
    """CantCreate when seal_dir holds the pending seal of another run: that run's outputs hash must not be lost."""
    other = _preseal_run_id(seal_dir)
    if other is not None and other != run_id:
        raise CantCreate(
            f"{seal_dir / PRESEAL} holds the pending seal of run {other}, not {run_id}: finish it with "
            f"`gbx complete --url URL {seal_dir}` (URL: the service its preseal.json names) or use another --seal-dir"
        )


def _preseal_run_id(seal_dir: Path) -> str | None:
    """The run_id a preseal.json names; None when there is none, or it names none."""
    try:
        document = json.loads((seal_dir / PRESEAL).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None
    run_id = document.get("run_id") if isinstance(document, dict) else None
    return run_id if isinstance(run_id, str) else None


def _now() -> str:
    """The current time in the contract's form (RFC 3339 UTC with Z)."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

