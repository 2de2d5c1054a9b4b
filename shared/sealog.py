"""The seal log: every seal's entry sequenced into a tiled Merkle tree (C2SP tlog-tiles) with signed checkpoints, by the functions themselves.

Integration, without a server that runs forever (see docs/design.md, "The seal log"):
- run_complete creates the seal's pending entry in the commit that records the seal, answers, and then hands the
  entry to `integrate_in_background`: a thread of the same instance that integrates until the entry is in a
  published checkpoint (the run_complete service keeps its CPU after answering: deploy.sh sets it so);
- an integrator first takes the lease (`log/lease`, a few seconds); whoever holds it sequences every pending entry
  in batches of up to BATCH: read the state and the pending entries, grow the tiles, sign the new checkpoint
  (KMS, outside any commit) and commit it all at once, preconditioned on the state's update time;
- those who find the lease taken poll their own entry until it is sequenced, taking the lease when it frees;
- a scheduled catch-up (`log_integrate`, every minute) and the proof endpoint integrate too, so an entry left by
  an instance that died, or by a KMS or Firestore outage, goes into the next checkpoint.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import random
import re
import threading
import time
import uuid
from collections.abc import Callable

from google.api_core import exceptions as gexc

from gbx_client import tlog
from shared import errors, log_store, store
from shared.auth import Identity
from shared.config import get_config
from shared.log_models import LogIntegrateResponse, LogPath, LogProofQuery, LogResource
from shared.log_signing import get_log_signer
from shared.models import LogKeyInfo

# Entries per integration commit: each takes two writes (its index, its pending entry deleted), and the tiles a
# few more, within Firestore's 500 writes per commit.
BATCH = 200
# How long an integrator holds the lease; renewed on every batch.
LEASE_SECONDS = 10.0
# How often one who waits for its entry looks again (jittered, so hundreds of waiters do not read in step).
POLL_SECONDS = (0.2, 0.5)
# How long run_complete's background integration goes on for its own entry (the contract's bound is 30 s).
BACKGROUND_SECONDS = 30.0
# How long the proof endpoint waits for a pending entry before answering 503.
PROOF_WAIT_SECONDS = 10.0
CHECKPOINT_CACHE = "no-cache"
TILE_CACHE = "public, max-age=604800, immutable"
PROOF_CACHE = "no-store"
ENTRY_BYTES = 2 + tlog.HASH_SIZE  # an entry in a bundle: its big-endian uint16 length and its 32 bytes


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def origin() -> str:
    """The log's origin: the public base URL without its scheme, plus /log (local: 127.0.0.1:PORT/log)."""
    return re.sub(r"^[a-z][a-z0-9+.-]*://", "", get_config().public_url).rstrip("/") + "/log"


def verifier() -> tlog.NoteVerifier:
    """The note verifier of the log's checkpoints (its public key is fetched once, then cached)."""
    return tlog.NoteVerifier.from_public_key(origin(), get_log_signer().public_key())


def log_key_info() -> LogKeyInfo:
    """The log's origin and vkey, as public_keys publishes them."""
    return LogKeyInfo(origin=origin(), vkey=verifier().vkey)


def sign_checkpoint(checkpoint: tlog.Checkpoint) -> bytes:
    """The checkpoint as a signed note (Ed25519, key name = origin); `errors.Unavailable` when KMS is down."""
    signer = get_log_signer()
    return tlog.sign_note(checkpoint.text(), name=checkpoint.origin, public_key=signer.public_key(), sign=signer.sign)


def _tile_reader(overlay: dict[str, bytes] | None = None) -> Callable[[int, int, int], bytes]:
    """Read hash tiles from `overlay` (tiles about to be written) or Firestore, cut to the width asked for."""

    def read(level: int, index: int, width: int) -> bytes:
        doc_id = log_store.tile_doc_id(level, index)
        data = overlay.get(doc_id) if overlay is not None else None
        if data is None:
            data = log_store.read_tile(level, index)
        if data is None or len(data) < width * tlog.HASH_SIZE:
            raise tlog.LogVerificationError(f"tile {level}/{index} holds fewer than {width} hashes")
        return data[: width * tlog.HASH_SIZE]

    return read


def _grow_bundles(size: int, entries: list[bytes]) -> dict[str, bytes]:
    """The entry bundles that change when `entries` are appended to a log of `size` entries."""
    changed: dict[str, bytearray] = {}
    for j, entry in enumerate(entries):
        position = size + j
        doc_id = log_store.tile_doc_id(tlog.ENTRIES, position // tlog.TILE_WIDTH)
        if doc_id not in changed:
            existing = log_store.read_tile(tlog.ENTRIES, position // tlog.TILE_WIDTH) if position % tlog.TILE_WIDTH else b""
            # The bundle as of the state read (a rival integrator may have grown it since: then our commit fails anyway).
            changed[doc_id] = bytearray((existing or b"")[: (position % tlog.TILE_WIDTH) * ENTRY_BYTES])
        changed[doc_id] += tlog.entry_bundle([entry])
    return {doc_id: bytes(data) for doc_id, data in changed.items()}


def integrate_batch() -> int:
    """Sequence up to BATCH pending entries into one new signed checkpoint, in one commit; how many (0: none waited).

    Raises store.Contended when another integrator extended the tree first (nothing of ours is written),
    store.CommitUncertain when the commit's reply was lost, errors.Unavailable when KMS could not sign.
    """
    state = log_store.read_state()
    pending = log_store.read_pending(BATCH)
    if not pending:
        return 0
    entries = [entry for _, entry in pending]
    hash_tiles = tlog.append_to_tiles(_tile_reader(), state.size, [tlog.leaf_hash(e) for e in entries])
    tiles = {log_store.tile_doc_id(level, index): data for (level, index), data in hash_tiles.items()}
    tiles.update(_grow_bundles(state.size, entries))
    size = state.size + len(entries)
    root = tlog.TileHashes(_tile_reader(tiles), size).root()
    note = sign_checkpoint(tlog.Checkpoint(origin(), size, root))
    sequenced = [(seal_id, state.size + i, entry) for i, (seal_id, entry) in enumerate(pending)]
    log_store.commit_integration(
        state=state,
        new_state={"size": size, "root": root, "checkpoint": note, "updated_at": _now()},
        sequenced=sequenced,
        tiles=tiles,
    )
    _note_sequenced({seal_id: index for seal_id, index, _ in sequenced})
    return len(entries)


def integrate(*, until: float, holder: str | None = None) -> int:
    """Take the lease and sequence every pending entry in batches until none waits or `until` (monotonic) passes; how many.

    0 when another integrator holds the lease. A batch that fails (KMS down, Firestore unavailable, another integrator
    first) ends this call: its entries stay pending for the next integrator.
    """
    holder = holder or uuid.uuid4().hex
    if not log_store.try_lease(holder, seconds=LEASE_SECONDS, now=_now()):
        return 0
    total = 0
    try:
        # At least one batch once the lease is ours (taking it may have taken long), then more until `until`.
        while total == 0 or time.monotonic() < until:
            added = integrate_batch()
            total += added
            if added == 0:
                break  # nothing waits (entries committed during a batch are taken by the next one)
            if not log_store.try_lease(holder, seconds=LEASE_SECONDS, now=_now()):
                break
    except (store.Contended, store.CommitUncertain, errors.Unavailable, gexc.GoogleAPIError) as exc:
        # Another integrator first, a lost reply, KMS or Firestore unavailable: nothing of this batch was written.
        _log_warning(f"seal log: integration stopped ({type(exc).__name__}); its entries wait for the next integrator")
    finally:
        with contextlib.suppress(gexc.GoogleAPIError):
            log_store.release_lease(holder, now=_now())
    return total


def _log_warning(message: str) -> None:
    from shared.http import log

    log({"severity": "WARNING", "message": message, "event": "seal_log"})


# Within one instance, one thread at a time (the leader) works for all the threads waiting for their seals: it tries
# the lease and integrates, or else reads the indexes of every waiting seal in one batched read; the others wait to be
# told. Hundreds of completions on one instance then cost one integrator and a read or two per poll interval, not
# hundreds of pollers (which would slow Firestore for everyone, run_complete included).
_sequenced: dict[str, int] = {}
_waiting: dict[str, int] = {}  # seal id -> how many threads wait for it
_sequenced_changed = threading.Condition()
_leader = threading.Lock()
MAX_REMEMBERED = 10_000


def _note_sequenced(indexes: dict[str, int]) -> None:
    with _sequenced_changed:
        if len(_sequenced) > MAX_REMEMBERED:
            _sequenced.clear()
        _sequenced.update(indexes)
        _sequenced_changed.notify_all()


def _lead(until: float) -> None:
    """One round of the leader: integrate if the lease is free; else (or when nothing was added) look up every waiting seal."""
    added = integrate(until=until)
    if added:
        return
    with _sequenced_changed:
        waiting = [seal_id for seal_id in _waiting if seal_id not in _sequenced]
    if waiting:
        _note_sequenced(log_store.read_indexes(waiting))


def wait_until_sequenced(seal_id: str, *, seconds: float, stop: threading.Event | None = None) -> int | None:
    """The seal's index once it is in a published checkpoint, integrating when nobody else does; None after `seconds` (or once `stop` is set)."""
    until = time.monotonic() + seconds
    with _sequenced_changed:
        _waiting[seal_id] = _waiting.get(seal_id, 0) + 1
    try:
        while stop is None or not stop.is_set():
            with _sequenced_changed:
                index = _sequenced.get(seal_id)
            if index is not None:
                return index
            now = time.monotonic()
            if now >= until:
                return None
            if _leader.acquire(blocking=False):
                try:
                    _lead(until)
                except gexc.GoogleAPIError:
                    pass  # Firestore slow or down: the next round tries again, until `seconds` pass
                finally:
                    _leader.release()
            with _sequenced_changed:
                if seal_id not in _sequenced:
                    _sequenced_changed.wait(timeout=max(0.0, min(random.uniform(*POLL_SECONDS), until - time.monotonic())))
        return None
    finally:
        with _sequenced_changed:
            _waiting[seal_id] -= 1
            if not _waiting[seal_id]:
                del _waiting[seal_id]


def integrate_in_background(seal_id: str) -> threading.Thread:
    """After run_complete answers: a thread that sees this seal's entry into a published checkpoint (run_complete never waits)."""

    def work() -> None:
        try:
            wait_until_sequenced(seal_id, seconds=BACKGROUND_SECONDS, stop=_stopping)
        except Exception as exc:  # noqa: BLE001 - a background thread has nobody to raise to: log it, the catch-up integrates
            _log_warning(f"seal log: background integration of {seal_id} failed ({type(exc).__name__}: {exc})")

    thread = threading.Thread(target=work, name=f"gbx-log-{seal_id[:8]}", daemon=True)
    with _background_lock:
        _background.add(thread)
    thread.start()
    return thread


_background: set[threading.Thread] = set()
_background_lock = threading.Lock()
_stopping = threading.Event()


def stop_background(timeout: float = 30.0) -> bool:
    """Make this process's background integrations give up waiting, and wait for them to end (tests: none outlives its test)."""
    _stopping.set()
    with _sequenced_changed:
        _sequenced_changed.notify_all()
    try:
        return join_background(timeout)
    finally:
        _stopping.clear()


def join_background(timeout: float) -> bool:
    """Wait for this process's background integrations to end (tests, benchmarks); False if some still run after `timeout`."""
    until = time.monotonic() + timeout
    with _background_lock:
        threads = list(_background)
    for thread in threads:
        thread.join(max(0.0, until - time.monotonic()))
    with _background_lock:
        _background.difference_update(t for t in threads if not t.is_alive())
        return not _background


# ---------------------------------------------------------------------------------------------- endpoints


def log_integrate(caller: Identity) -> LogIntegrateResponse:
    """POST /api/log/integrate (Cloud Scheduler, every minute): sequence what waits, for at most 50 s."""
    added = integrate(until=time.monotonic() + 50.0)
    return LogIntegrateResponse(integrated=added, size=log_store.read_state().size)


def _checkpoint_note(state: log_store.LogState) -> bytes:
    """The latest signed checkpoint; before the first integration, a freshly signed one of the empty tree."""
    return state.checkpoint or sign_checkpoint(tlog.Checkpoint(origin(), 0, tlog.EMPTY_ROOT))


def log_proof(query: LogProofQuery) -> LogResource:
    """GET /api/log/proof?seal_id=S: a c2sp.org/tlog-proof@v1 of the seal's entry in the latest checkpoint."""
    seal_id = query.seal_id
    index = log_store.read_index(seal_id)
    if index is None and not log_store.is_pending(seal_id):
        # Sequenced between the two reads (its pending entry is deleted in the commit that indexes it), or unknown.
        index = log_store.read_index(seal_id)
        if index is None:
            raise errors.NotFound("no seal with this id is in the log")
    if index is None:
        index = wait_until_sequenced(seal_id, seconds=PROOF_WAIT_SECONDS)
        if index is None:
            raise errors.Unavailable("the seal is not yet in a published checkpoint; retry")
    state = log_store.read_state()
    path = tlog.TileHashes(_tile_reader(), state.size).inclusion_proof(index)
    body = tlog.TlogProof(index=index, path=tuple(path), checkpoint=state.checkpoint).text()
    return LogResource(body=body, media_type="text/plain; charset=utf-8", cache_control=PROOF_CACHE)


def seal_log(resource: LogPath) -> LogResource:
    """GET /log/checkpoint and /log/tile/...: the log's checkpoint, hash tiles and entry bundles, as tlog-tiles serves them."""
    if resource.path == "checkpoint":
        note = _checkpoint_note(log_store.read_state())
        return LogResource(body=note, media_type="text/plain; charset=utf-8", cache_control=CHECKPOINT_CACHE)
    if not resource.path.startswith("tile/"):
        raise errors.NotFound()
    try:
        level, index, width = tlog.parse_tile_path(resource.path)
    except tlog.LogFormatError as exc:
        raise errors.InvalidRequest(str(exc)) from exc
    size = log_store.read_state().size
    available = tlog.tile_width(0 if level == tlog.ENTRIES else int(level), index, size)
    if width > available:
        raise errors.NotFound("no such tile in the log's latest checkpoint")
    data = log_store.read_tile(level, index)
    unit = ENTRY_BYTES if level == tlog.ENTRIES else tlog.HASH_SIZE
    if data is None or len(data) < width * unit:
        raise errors.NotFound("no such tile in the log's latest checkpoint")
    return LogResource(body=data[: width * unit], media_type="application/octet-stream", cache_control=TILE_CACHE)
