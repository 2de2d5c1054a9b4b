"""The seal log's Firestore access: pending entries, the sequenced index, tiles, the tree's state and the integrators' lease.

Collections:
- `log_pending/{seal_id}`: {entry (hex SHA-256 of seal.json), at}: created in run_complete's commit with the seal record.
- `log_entries/{seal_id}`: {index, entry}: created once, in the integration commit that sequences the seal.
- `log_tiles/{level}.{index}` (`entries.{index}` for entry bundles): {data}: the tile's bytes as of the latest checkpoint.
- `log/state`: {size, root, checkpoint (the signed note), updated_at}: every integration commit is preconditioned on
  its update time, so two integrators can never both extend one tree (a fork); the loser's commit fails whole.
- `log/lease`: {holder, until}: who integrates now, so that hundreds of completions do not all sign and race.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from google.cloud import firestore

from shared import store
from shared.store import LOG_PENDING, _commit, _rpc, client

LOG = "log"
LOG_ENTRIES = "log_entries"
LOG_TILES = "log_tiles"
STATE = "state"
LEASE = "lease"


@dataclass(frozen=True)
class LogState:
    """The tree as of its latest checkpoint (size 0 and no checkpoint before the first integration)."""

    size: int
    root: bytes
    checkpoint: bytes
    update_time: Any = field(default=None, repr=False, compare=False)


def _state_ref() -> firestore.DocumentReference:
    return client().collection(LOG).document(STATE)


def tile_doc_id(level: int | str, index: int) -> str:
    """`0.12`, `1.0`, `entries.12`."""
    return f"{level}.{index}"


def read_state() -> LogState:
    """The tree's latest state, with the update time the next integration is preconditioned on."""
    snap = _state_ref().get(**_rpc())
    if not snap.exists:
        return LogState(size=0, root=b"", checkpoint=b"")
    data = snap.to_dict() or {}
    return LogState(size=data["size"], root=bytes(data["root"]), checkpoint=bytes(data["checkpoint"]), update_time=snap.update_time)


def read_pending(limit: int) -> list[tuple[str, bytes]]:
    """Up to `limit` entries waiting to be sequenced, oldest first: (seal_id, entry)."""
    query = client().collection(LOG_PENDING).order_by("at").limit(limit)
    return [(snap.id, bytes.fromhex((snap.to_dict() or {})["entry"])) for snap in query.get(**_rpc())]


def is_pending(seal_id: str) -> bool:
    """Whether a seal's entry waits to be sequenced."""
    return bool(client().collection(LOG_PENDING).document(seal_id).get(**_rpc()).exists)


def read_index(seal_id: str) -> int | None:
    """The seal's index in the log, or None while it is not sequenced (or not a seal)."""
    snap = client().collection(LOG_ENTRIES).document(seal_id).get(**_rpc())
    return int((snap.to_dict() or {})["index"]) if snap.exists else None


def read_indexes(seal_ids: list[str]) -> dict[str, int]:
    """The indexes of those of `seal_ids` that are sequenced: one batched read for all the seals an instance waits for."""
    refs = [client().collection(LOG_ENTRIES).document(seal_id) for seal_id in seal_ids]
    return {snap.id: int((snap.to_dict() or {})["index"]) for snap in client().get_all(refs, **_rpc()) if snap.exists}


def read_tile(level: int | str, index: int) -> bytes | None:
    """A tile's bytes as of the latest checkpoint (a partial tile holds what is integrated), or None."""
    snap = client().collection(LOG_TILES).document(tile_doc_id(level, index)).get(**_rpc())
    return bytes((snap.to_dict() or {})["data"]) if snap.exists else None


def commit_integration(
    *, state: LogState, new_state: dict[str, Any], sequenced: Iterable[tuple[str, int, bytes]], tiles: dict[str, bytes]
) -> None:
    """One commit: the new state (unchanged since read, else Contended), each sequenced seal's index (created: once) and its
    pending entry deleted (it must still exist), and the changed tiles. Nothing of it is visible unless all of it is."""
    batch = client().batch()
    if state.update_time is None:
        batch.create(_state_ref(), new_state)
    else:
        batch.update(_state_ref(), new_state, option=client().write_option(last_update_time=state.update_time))
    for seal_id, index, entry in sequenced:
        batch.create(client().collection(LOG_ENTRIES).document(seal_id), {"index": index, "entry": entry.hex()})
        batch.delete(client().collection(LOG_PENDING).document(seal_id), option=client().write_option(exists=True))
    for doc_id, data in tiles.items():
        batch.set(client().collection(LOG_TILES).document(doc_id), {"data": data})
    _commit(batch)


def try_lease(holder: str, *, seconds: float, now: dt.datetime) -> bool:
    """Take the integrators' lease for `seconds` unless another holder's lease still runs; False when someone else has it."""
    ref = client().collection(LOG).document(LEASE)
    snap = ref.get(**_rpc())
    data = snap.to_dict() or {} if snap.exists else {}
    if snap.exists and data.get("holder") != holder and data.get("until") and data["until"] > now:
        return False
    batch = client().batch()
    fields = {"holder": holder, "until": now + dt.timedelta(seconds=seconds)}
    if snap.exists:
        batch.update(ref, fields, option=client().write_option(last_update_time=snap.update_time))
    else:
        batch.create(ref, fields)
    try:
        _commit(batch)
    except (store.Contended, store.CommitUncertain):
        return False
    return True


def release_lease(holder: str, *, now: dt.datetime) -> None:
    """End our lease early (if it is still ours), so the next integrator need not wait for it to run out."""
    ref = client().collection(LOG).document(LEASE)
    snap = ref.get(**_rpc())
    if not snap.exists or (snap.to_dict() or {}).get("holder") != holder:
        return
    batch = client().batch()
    batch.update(ref, {"until": now}, option=client().write_option(last_update_time=snap.update_time))
    # Taken over meanwhile, or a lost reply: either way the lease runs out by itself.
    with contextlib.suppress(store.Contended, store.CommitUncertain):
        _commit(batch)


def read_entries_page(after: str | None, limit: int) -> list[tuple[str, int]]:
    """Up to `limit` sequenced seals (seal_id, index) in id order after `after` (the audit's walk)."""
    query = client().collection(LOG_ENTRIES).order_by("__name__").limit(limit)
    if after is not None:
        query = query.start_after({"__name__": client().collection(LOG_ENTRIES).document(after)})
    return [(snap.id, int((snap.to_dict() or {})["index"])) for snap in query.get(**_rpc())]


def read_seal_payloads_page(after: str | None, limit: int) -> list[tuple[str, str]]:
    """Up to `limit` seal records (seal_id, seal.json) in id order after `after` (the audit's walk: one query per page)."""
    query = client().collection(store.SEALS).order_by("__name__").select(["payload"]).limit(limit)
    if after is not None:
        query = query.start_after({"__name__": client().collection(store.SEALS).document(after)})
    return [(snap.id, str((snap.to_dict() or {}).get("payload", ""))) for snap in query.get(**_rpc())]


def unlogged(seal_ids: list[str]) -> list[str]:
    """Of these seals, those with neither a log index nor a pending entry: seals recorded before the log existed.

    Both read in one request, at one read time: a seal's pending entry is created with its record, and turned into its
    index in one commit, so at any single moment a seal made since the log has one or the other. (Two reads at
    different times could miss a seal being integrated between them and log it twice.)"""
    if not seal_ids:
        return []
    refs = [client().collection(coll).document(seal_id) for seal_id in seal_ids for coll in (LOG_ENTRIES, LOG_PENDING)]
    found = {snap.id for snap in client().get_all(refs, **_rpc()) if snap.exists}  # a seal's id, in either collection
    return [seal_id for seal_id in seal_ids if seal_id not in found]


def commit_backfilled(payloads: dict[str, str]) -> None:
    """Create pending entries (seal_id → its seal.json) for seals recorded before the log, in one commit: `create()`, so
    an entry a concurrent backfill created first fails the whole commit (store.Contended) rather than logging a seal twice."""
    batch = client().batch()
    for seal_id, seal_json in payloads.items():
        store.add_log_entry(batch, seal_id, seal_json)
    _commit(batch)
