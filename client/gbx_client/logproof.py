"""The seal log for gbx: fetch a seal's tlog-proof into its seal directory, check one offline, and monitor the log (gbx log check)."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gbx_client import tlog
from gbx_client.errors import GbxError, UsageError
from gbx_client.service import Service

PROOF_FILE = "seal.tlog-proof"
# gbx run and gbx complete wait this long for the seal to be in a published checkpoint (the service's bound is 30 s).
PROOF_WAIT_SECONDS = 60.0


def logged_text(index: int, size: int) -> str:
    """`logged: entry N of M` (N counted from 1), as gbx verify and the portal say it."""
    return f"logged: entry {index + 1} of {size}"


def fetch_proof(service: Service, seal_dir: Path, seal_id: str, say: Callable[[str], None]) -> bool:
    """GET /api/log/proof for the seal (up to 60 s) and write seal.tlog-proof; False, said why, when there is none yet (not an error: the seal stands)."""
    policy = dataclasses.replace(service.policy, timeout=min(PROOF_WAIT_SECONDS, service.policy.timeout))
    anonymous = Service(service.base_url, identity=None, policy=policy, report=say)
    url = f"{service.base_url}/api/log/proof?seal_id={urllib.parse.quote(seal_id)}"
    later = f"fetch it later: curl -fsS '{url}' > {seal_dir / PROOF_FILE}"
    try:
        reply = anonymous.send("GET", url, step="log proof", auth=False)
    except GbxError as exc:
        say(f"no {PROOF_FILE} yet ({exc}); {later}")
        return False
    if reply.status != 200:
        say(f"no {PROOF_FILE}: HTTP {reply.status} {reply.message}; {later}")
        return False
    try:
        proof = tlog.parse_proof(reply.content)
        size = tlog.parse_checkpoint(tlog.split_note(proof.checkpoint)[0]).size
    except tlog.LogFormatError as exc:
        say(f"no {PROOF_FILE}: the service's proof is malformed ({exc}); {later}")
        return False
    _write_atomically(seal_dir / PROOF_FILE, reply.content)
    say(f"wrote {seal_dir / PROOF_FILE} ({logged_text(proof.index, size)}; gbx verify checks it)")
    return True


def check_proof(proof: bytes, *, seal_json: bytes, vkey: str) -> tuple[int, int]:
    """(index, tree size) of a seal's verified tlog-proof; tlog.LogFormatError or LogVerificationError when it does not verify."""
    checkpoint = tlog.verify_proof(proof, entry=tlog.entry_hash(seal_json), verifier=tlog.parse_vkey(vkey))
    return tlog.parse_proof(proof).index, checkpoint.size


def _write_atomically(path: Path, data: bytes) -> None:
    """Write a file whole or not at all (a crash never leaves half a proof or half a kept checkpoint)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------- gbx log check


@dataclass(frozen=True)
class MonitorResult:
    """What one `gbx log check` found: the kept checkpoint's size (None on first use) and the latest one's."""

    old_size: int | None
    new_size: int


class LogInconsistent(GbxError):
    """1: the log is inconsistent with the checkpoint kept (a rewritten history, a split view) or badly signed."""

    exit_code = 1
    name = "inconsistent"


def log_vkey(service: Service) -> str:
    """The log's vkey as the deployment publishes it (GET /api/seal/public_keys `log.vkey`)."""
    reply = service.send("GET", f"{service.base_url}/api/seal/public_keys", step="public_keys", auth=False)
    log = reply.body.get("log") if reply.status == 200 and isinstance(reply.body, dict) else None
    if not isinstance(log, dict) or not isinstance(log.get("vkey"), str):
        raise UsageError(f"{service.base_url}/api/seal/public_keys publishes no log key; give --log-key VKEY")
    return str(log["vkey"])


def check_log(service: Service, state: Path, vkey: str) -> MonitorResult:
    """Verify the latest checkpoint's signature and its consistency with the one kept in `state` (from tiles), then keep it.

    A missing `state` is first use: verify, keep. LogInconsistent for a bad signature, a fork or a damaged `state`.
    """
    try:
        verifier = tlog.parse_vkey(vkey)
    except tlog.LogFormatError as exc:
        raise UsageError(f"--log-key: {exc}") from exc
    base = f"{service.base_url}/log/"
    reply = service.send("GET", base + "checkpoint", step="checkpoint", auth=False)
    if reply.status != 200:
        raise LogInconsistent(f"{base}checkpoint: HTTP {reply.status} {reply.message}")
    note = reply.content
    try:
        new = tlog.open_checkpoint(note, verifier)
    except (tlog.LogFormatError, tlog.LogVerificationError) as exc:
        raise LogInconsistent(f"the log's latest checkpoint does not verify: {exc}") from exc
    old: tlog.Checkpoint | None = None
    if state.exists():
        try:
            old = tlog.open_checkpoint(state.read_bytes(), verifier)
        except OSError as exc:
            raise UsageError(f"cannot read --state {state}: {exc.strerror or exc}") from exc
        except (tlog.LogFormatError, tlog.LogVerificationError) as exc:
            raise LogInconsistent(f"the checkpoint kept in {state} does not verify ({exc}): damaged, or not this log's") from exc

        def read_tile(level: int, index: int, width: int) -> bytes:
            path = tlog.tile_path(level, index, width)
            tile = service.send("GET", base + path, step="tile", auth=False)
            if tile.status != 200 and width < tlog.TILE_WIDTH:
                # A partial tile may be gone once the full one exists (tlog-tiles): its prefix is the same hashes.
                tile = service.send("GET", base + tlog.tile_path(level, index), step="tile", auth=False)
            if tile.status != 200:
                raise tlog.LogVerificationError(f"{base}{path}: HTTP {tile.status}")
            return tile.content[: width * tlog.HASH_SIZE]

        try:
            tlog.prove_consistency(read_tile, old=old, new=new)
        except (tlog.LogFormatError, tlog.LogVerificationError) as exc:
            raise LogInconsistent(f"the log's checkpoint of {new.size} entries is not consistent with the one kept ({old.size}): {exc}") from exc
    try:
        _write_atomically(state, note)
    except OSError as exc:
        raise UsageError(f"cannot write --state {state}: {exc.strerror or exc}") from exc
    return MonitorResult(old_size=old.size if old is not None else None, new_size=new.size)
