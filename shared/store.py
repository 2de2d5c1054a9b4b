"""All Firestore access: reads outside transactions, and optimistic atomic commits with preconditions."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import random
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar

from google.api_core import exceptions as gexc
from google.api_core import retry as gretry
from google.cloud import firestore
from google.cloud.firestore_v1.base_query import FieldFilter

from shared import errors
from shared.config import get_config
from shared.models import RunRecord

T = TypeVar("T")

PRINCIPALS = "principals"
GRANTS = "grants"
RUNS = "runs"
LEDGER = "ledger"
SEALS = "seals"
REDEMPTIONS = "redemptions"
ISSUANCES = "issuances"
REDEMPTION_KEYS = "redemption_keys"
# The seal log's entries waiting to be sequenced (shared/log_store.py holds the rest of the log's access).
LOG_PENDING = "log_pending"


# Every Firestore call is bounded: the client's defaults retry reads for 300 s and commits for 60 s,
# past the function's own timeout, so an outage would end in the platform's 504 instead of our 503.
# The bounds are configuration (GBX_FIRESTORE_TIMEOUT_SECONDS, GBX_FIRESTORE_RETRY_SECONDS): tests shorten them.
_TRANSIENT = gretry.if_exception_type(gexc.ServiceUnavailable, gexc.DeadlineExceeded, gexc.InternalServerError)


def _bounds() -> dict[str, Any]:
    config = get_config()
    retry = gretry.Retry(initial=0.1, maximum=1.0, multiplier=2.0, timeout=config.firestore_retry_seconds, predicate=_TRANSIENT)
    return {"retry": retry, "timeout": config.firestore_timeout_seconds}


def _rpc() -> dict[str, Any]:
    """Timeout and retry of one read: retried on transient errors within the configured budget. Each call is one
    round trip of the request (see `at_once` for reads that go together)."""
    _note("read")
    return _bounds()


def _commit_rpc() -> dict[str, Any]:
    """A commit is retried only on UNAVAILABLE (the request never reached Firestore, or a retry meets our own
    write and fails as Contended); a deadline may mean it was applied, which only a re-read can tell."""
    rpc = _bounds()
    return {**rpc, "retry": rpc["retry"].with_predicate(gretry.if_exception_type(gexc.ServiceUnavailable))}


# Reads that do not depend on each other go out together: one round trip instead of several.
# As many threads as an instance serves requests at once, several reads each: a read never queues behind another
# request's (they wait on the network, not the CPU). The last read of a group runs in the request's own thread.
_READERS = ThreadPoolExecutor(max_workers=256, thread_name_prefix="gbx-read")


def at_once(*reads: Callable[[], Any]) -> list[Any]:
    """Run independent reads side by side and return their results in order: one round trip of the request.

    The pool's threads do not carry the request's record, so the reads note nothing themselves; the group notes one
    round trip. Reads at once see no common snapshot: a caller whose decision depends on the order of two reads
    (this one read before that one) must re-read what it needs afterwards (see entitlements.check)."""
    _note("read")
    token = _recorded.set(None)  # the last read runs here, and notes nothing either
    try:
        futures = [_READERS.submit(read) for read in reads[:-1]]
        last = reads[-1]() if reads else None
        return [*(future.result() for future in futures), last] if reads else []
    finally:
        _recorded.reset(token)


# Plan (and ledger reason) of the one-run grant a redeemed seal gives.
SEAL_RERUN_PLAN = "seal_rerun"


class Contended(Exception):
    """The commit lost a race (a precondition failed or a document now exists): re-read and decide again."""


class CommitUncertain(Exception):
    """The commit's reply was lost (deadline exceeded, unavailable): it may have been applied; re-read to know."""


@functools.cache
def client() -> firestore.Client:
    """The process-wide Firestore client (the emulator when FIRESTORE_EMULATOR_HOST is set)."""
    config = get_config()
    return firestore.Client(project=config.project, database=config.firestore_database)


def sha256_hex(text: str) -> str:
    """Hex SHA-256 of a string: document ids for keys that are not safe ids themselves."""
    return hashlib.sha256(text.encode()).hexdigest()


def add_log_entry(batch: firestore.WriteBatch, seal_id: str, seal_json: str) -> None:
    """Create the seal's pending entry in the seal log in `batch` (run_complete's commit, and the backfill for seals from
    before the log): gbx_client.tlog.entry_hash (SHA-256 of the exact seal.json bytes) in hex. `create()`: one per seal.
    Written here, without the log's module, because run_complete's commit creates it."""
    batch.create(client().collection(LOG_PENDING).document(seal_id), {"entry": sha256_hex(seal_json), "at": firestore.SERVER_TIMESTAMP})


def run_doc_id(run_id: str) -> str:
    """A safe document id for a run_id: the prefix keeps `.`, `..` and `__x__` from being ids on their own."""
    return f"r:{run_id}"


def redemption_id(principal: str, seal_id: str) -> str:
    """Document id of a (principal, seal) redemption."""
    return sha256_hex(f"{principal}|{seal_id}")


def _ledger_id(reason: str, principal: str, ref: str) -> str:
    """Deterministic ledger id: `create()` then refuses a second entry for the same event."""
    return sha256_hex(f"{reason}|{principal}|{ref}")


# A large grant is written as several shard documents, so that hundreds of concurrent consumers of one
# principal (the tasks of one job starting at once) spread over as many documents instead of queueing on
# a few (a document takes about one write per second in production; on the emulator a lost race costs a
# re-read and a commit). A consumer reads one shard drawn at random, not all of them. Every shard
# carries `group` (the issued grant id), `open` (runs left), `spend_key` (its expiry, or FAR_FUTURE) and
# `slot` (a random number): the grant to spend first and a random open shard among all those that expire
# with it are each one indexed query of one document. Ledger entries and run records name the issued
# grant (`grant`) and the shard document they touched (`shard`).
SHARD_MIN_RUNS = 4
# 2 writes per shard (the document and its ledger entry) + the principal + the issuance record stay
# within a commit's 500 writes.
MAX_SHARDS = 240
# The spend key of a grant that never expires: it sorts after every real expiry.
FAR_FUTURE = dt.datetime(9999, 12, 31, tzinfo=dt.UTC)


def grant_doc_ids(grant_id: str, runs_total: int, *, max_shards: int = MAX_SHARDS) -> list[tuple[str, int]]:
    """The documents (id, runs) an issued grant is written as: itself, or up to `max_shards` shards of at least SHARD_MIN_RUNS."""
    count = max(1, min(max_shards, runs_total // SHARD_MIN_RUNS))
    base, extra = divmod(runs_total, count)
    return [(shard_doc_id(grant_id, k), base + (1 if k < extra else 0)) for k in range(count)]


def spread_slots(count: int) -> list[float]:
    """Slots for a grant's shards, evenly spaced from a random offset: a random draw hits each shard alike."""
    offset = random.random()
    return [(offset + k / count) % 1.0 for k in range(count)]


def shard_doc_id(grant_id: str, k: int) -> str:
    """Document id of shard k of a grant: the first shard is the grant's own document, so `grants/{grant_id}` always exists."""
    return grant_id if k == 0 else f"{grant_id}-{k}"


@dataclass(frozen=True)
class Grant:
    """A grant (or one shard of a large grant) of runs to a principal, as read."""

    grant_id: str
    group: str
    principal: str
    plan_id: str
    runs_total: int
    remaining: int
    expires_at: dt.datetime | None
    created_at: dt.datetime | None
    spend_key: dt.datetime
    slot: float
    update_time: Any = field(repr=False, compare=False)
    # The partner that issued it (its events' `ce-partner`); None for a bonus (seal_rerun) grant.
    issued_by: str | None = None

    def usable(self, now: dt.datetime) -> bool:
        """True while the grant has runs left and has not expired."""
        return self.remaining > 0 and (self.expires_at is None or self.expires_at > now)


@dataclass(frozen=True)
class Run:
    """A run record (`consumed → started → completed`), as read, with the update time its commits are preconditioned on."""

    record: RunRecord
    update_time: Any = field(repr=False, compare=False)

    @property
    def run_id(self) -> str:
        """The caller's run_id."""
        return self.record.run_id

    @property
    def state(self) -> str:
        """consumed, started or completed."""
        return self.record.state


def _principal_ref(principal: str) -> firestore.DocumentReference:
    return client().collection(PRINCIPALS).document(principal)


def grant_ref(principal: str, grant_id: str) -> firestore.DocumentReference:
    """The document of one grant (or shard)."""
    return _principal_ref(principal).collection(GRANTS).document(grant_id)


def _run_ref(principal: str, run_id: str) -> firestore.DocumentReference:
    return _principal_ref(principal).collection(RUNS).document(run_doc_id(run_id))


def grant_from_snapshot(snap: firestore.DocumentSnapshot, data: dict[str, Any] | None = None) -> Grant:
    """A grant document as read, with the update time its commits are preconditioned on (`data`: its fields, when the
    caller decoded them already)."""
    data = (snap.to_dict() or {}) if data is None else data
    return Grant(
        grant_id=snap.id,
        group=data.get("group", snap.id),
        principal=data["principal"],
        plan_id=data["plan_id"],
        runs_total=data["runs_total"],
        remaining=data["remaining"],
        expires_at=data.get("expires_at"),
        created_at=data.get("created_at"),
        spend_key=data.get("spend_key") or data.get("expires_at") or FAR_FUTURE,  # as spending_fields writes it
        slot=data.get("slot", 0.0),
        update_time=snap.update_time,
        issued_by=grant_issued_by(data),
    )


def grant_issued_by(data: dict[str, Any]) -> str | None:
    """A grant document's partner: its `issued_by`; grants written before the field read as "admin", bonus grants as None."""
    if data.get("plan_id") == SEAL_RERUN_PLAN:
        return None
    return data.get("issued_by") or "admin"


def partner_grants(principal: str, partner: str, now: dt.datetime) -> firestore.Query:
    """The principal's unexpired grant documents issued by `partner` (composite indexes: issued_by ASC, spend_key ASC,
    remaining ASC for the balance's sum; issued_by ASC, open ASC, spend_key ASC for its open documents)."""
    return _unexpired(principal, now).where(filter=FieldFilter("issued_by", "==", partner))


def read_partner_balance(principal: str, partner: str, now: dt.datetime) -> int:
    """The partner's runs left for the principal: `sum(remaining)` of its unexpired grant documents issued by `partner`
    (one aggregation; partner endpoints answer it as a partner's balance, events decide crossings with it)."""
    return _aggregate(partner_grants(principal, partner, now).sum("remaining"))


def _grants(principal: str) -> firestore.CollectionReference:
    return _principal_ref(principal).collection(GRANTS)


def _unexpired(principal: str, now: dt.datetime) -> firestore.Query:
    return _grants(principal).where(filter=FieldFilter("spend_key", ">", now))


def read_first_to_spend(principal: str, now: dt.datetime) -> Grant | None:
    """The first open, unexpired shard in spending order (earliest expiry, then oldest), or None: one indexed query.

    Composite index: open ASC, spend_key ASC, created_at ASC, group ASC (firestore.indexes.json).
    """
    query = (
        _unexpired(principal, now)
        .where(filter=FieldFilter("open", "==", True))
        .order_by("spend_key")
        .order_by("created_at")
        .order_by("group")
        .limit(1)
    )
    return _first_grant(query)


def read_open_shard_at(principal: str, spend_key: dt.datetime, slot: float, *, upwards: bool, issued_by: str | None) -> Grant | None:
    """The open shard of `issued_by`'s grants expiring at `spend_key` whose `slot` is next to `slot` (above it, or below),
    or None: a random draw among every shard of every grant of that partner that expires then, in one indexed query of
    one document (a bonus grant's partner is None).

    Composite indexes: open ASC, issued_by ASC, spend_key ASC, slot ASC and slot DESC (firestore.indexes.json).
    """
    query = (
        _grants(principal)
        .where(filter=FieldFilter("open", "==", True))
        .where(filter=FieldFilter("issued_by", "==", issued_by))
        .where(filter=FieldFilter("spend_key", "==", spend_key))
        .where(filter=FieldFilter("slot", ">=" if upwards else "<", slot))
        .order_by("slot", direction=firestore.Query.ASCENDING if upwards else firestore.Query.DESCENDING)
        .limit(1)
    )
    return _first_grant(query)


def _first_grant(query: firestore.Query) -> Grant | None:
    """The one grant a `limit(1)` query finds, or None."""
    snaps = query.get(**_rpc())
    return grant_from_snapshot(snaps[0]) if snaps else None


def _aggregate(query: Any, *, read_time: dt.datetime | None = None) -> int:
    """The value of a one-aggregation query (`sum` or `count`), read once (as of `read_time` when given)."""
    rows: Any = query.get(read_time=read_time, **_rpc())
    # One row of one aggregation (the library's annotation says a flat list; it answers a list of rows).
    return sum(int(aggregate.value) for row in rows for aggregate in row)


def read_balance(principal: str, now: dt.datetime) -> int:
    """The unused runs of the principal's unexpired grants: one `sum` aggregation, not a read of every shard."""
    return _aggregate(_unexpired(principal, now).sum("remaining"))


def read_run(principal: str, run_id: str) -> Run | None:
    """The principal's run record for run_id, or None."""
    snap = _run_ref(principal, run_id).get(**_rpc())
    if not snap.exists:
        return None
    return Run(record=RunRecord.model_validate(snap.to_dict() or {}), update_time=snap.update_time)


# What the current request did to Firestore, when someone records it: "read" per read round trip, "commit" per
# commit tried, "contended" per lost race, "uncertain" per lost reply. Each request (thread) has its own.
_recorded: ContextVar[list[str] | None] = ContextVar("gbx_store_recorded", default=None)


@contextlib.contextmanager
def recording_attempts() -> Iterator[list[str]]:
    """Record, in the list yielded, every commit tried and every race or reply lost within this context."""
    record: list[str] = []
    token = _recorded.set(record)
    try:
        yield record
    finally:
        _recorded.reset(token)


def _note(event: str) -> None:
    record = _recorded.get()
    if record is not None:
        record.append(event)


# Called with each batch that committed (shared/events.py publishes the events a batch recorded).
after_commit: list[Callable[[firestore.WriteBatch], None]] = []
# What a commit function adds to its batch before committing it: the events of the change (shared/events.py).
Extra = Callable[[firestore.WriteBatch], None] | None


def _commit(batch: firestore.WriteBatch) -> list[Any]:
    """Commit a batch; a lost race becomes Contended, a lost reply CommitUncertain."""
    _note("commit")
    try:
        results: list[Any] = batch.commit(**_commit_rpc())
    except (gexc.FailedPrecondition, gexc.Conflict, gexc.NotFound) as exc:
        # Conflict covers AlreadyExists (a create lost) and Aborted; NotFound a precondition on a deleted doc.
        raise Contended(str(exc)) from exc
    except (gexc.DeadlineExceeded, gexc.ServiceUnavailable, gexc.RetryError) as exc:
        raise CommitUncertain(type(exc).__name__) from exc
    for hook in after_commit:
        hook(batch)
    return results


def _ledger(batch: firestore.WriteBatch | firestore.Transaction, *, principal: str, grant_id: str, shard: str, delta: int, reason: str, ref: str) -> None:
    """Append the ledger entry of a balance change to the batch that makes the change."""
    doc = client().collection(LEDGER).document(_ledger_id(reason, principal, ref))
    batch.create(
        doc,
        {"principal": principal, "grant": grant_id, "shard": shard, "delta": delta, "reason": reason, "ref": ref, "at": firestore.SERVER_TIMESTAMP},
    )


def spending_fields(*, remaining: int, expires_at: dt.datetime | None, slot: float) -> dict[str, Any]:
    """The fields consume's spending queries read: `open`, `spend_key` (the expiry, or FAR_FUTURE) and the random `slot`."""
    return {"open": remaining > 0, "spend_key": expires_at or FAR_FUTURE, "slot": slot}


def commit_spending_fields(path: str, fields: dict[str, Any], update_time: Any) -> None:
    """Add the fields it lacks to a grant document an earlier version wrote (unchanged since read, else Contended)."""
    batch = client().batch()
    batch.update(client().document(path), fields, option=client().write_option(last_update_time=update_time))
    _commit(batch)


def _grant_fields(
    *,
    group: str,
    slot: float,
    principal: str,
    plan_id: str,
    runs_total: int,
    expires_at: dt.datetime | None,
    source: str,
    ref: str | None,
    issued_by: str | None,
    lead: bool = True,
    shards: int = 1,
) -> dict[str, Any]:
    # `lead` marks the document that stands for the issued grant (its first shard, whose id is the grant id), and
    # `shards` says how many documents it has: the export lists grants by one indexed query of lead documents.
    return {
        "group": group,
        "lead": lead,
        "shards": shards,
        **spending_fields(remaining=runs_total, expires_at=expires_at, slot=slot),
        "principal": principal,
        "plan_id": plan_id,
        "runs_total": runs_total,
        "remaining": runs_total,
        "expires_at": expires_at,
        "created_at": firestore.SERVER_TIMESTAMP,
        "source": source,
        "ref": ref,
        "issued_by": issued_by,
        # Runs that left the document, by reason, and when the last one did (see write_consume); `counts` marks a
        # document counted since its issue (an older one's counters, created by its first Increment, miss earlier runs).
        "counts": True,
        "consumed": 0,
        "revoked": 0,
        "spent_at": None,
    }


def read_issuance(key_hash: str) -> dict[str, Any] | None:
    """The recorded issuance for an idempotency-key hash, or None."""
    snap = client().collection(ISSUANCES).document(key_hash).get(**_rpc())
    return snap.to_dict() if snap.exists else None


def commit_issue(
    *,
    principal: str,
    grant_id: str,
    plan_id: str,
    runs_total: int,
    expires_at: dt.datetime | None,
    issued_by: str,
    idempotency_key_hash: str | None,
    fingerprint: str,
    response: dict[str, Any],
    max_shards: int = MAX_SHARDS,
    extra: Extra = None,
) -> None:
    """One commit: the grant (or its shards), their ledger entries and (with a key) the issuance record that makes replays exact."""
    batch = client().batch()
    batch.set(_principal_ref(principal), {"principal": principal, "last_issued_at": firestore.SERVER_TIMESTAMP}, merge=True)
    docs = grant_doc_ids(grant_id, runs_total, max_shards=max_shards)
    for (doc_id, runs), slot in zip(docs, spread_slots(len(docs)), strict=True):
        fields = _grant_fields(
            group=grant_id, slot=slot, principal=principal, plan_id=plan_id, runs_total=runs, expires_at=expires_at, source="issue",
            ref=idempotency_key_hash, issued_by=issued_by, lead=doc_id == grant_id, shards=len(docs),
        )
        batch.create(grant_ref(principal, doc_id), fields)
        _ledger(batch, principal=principal, grant_id=grant_id, shard=doc_id, delta=runs, reason="issue", ref=doc_id)
    if idempotency_key_hash is not None:
        batch.create(
            client().collection(ISSUANCES).document(idempotency_key_hash),
            {"fingerprint": fingerprint, "response": response, "principal": principal, "grant_id": grant_id, "created_at": firestore.SERVER_TIMESTAMP},
        )
    if extra is not None:
        extra(batch)
    _commit(batch)


def write_consume(
    writer: firestore.WriteBatch | firestore.Transaction,
    principal: str,
    run_id: str,
    grant: Grant,
    *,
    charge_id: str,
    consumed_at: dt.datetime,
    precondition: bool = True,
) -> None:
    """The writes of one consume: a run off `grant`, the run record, the ledger entry (a batch, or a transaction's)."""
    # The update-time precondition is what makes a batch safe; a transaction's own reads lock instead.
    option = client().write_option(last_update_time=grant.update_time) if precondition else None
    # The precondition makes `remaining` as read exact: the last run closes the shard for the spend query.
    # `consumed` and `spent_at` (this commit's time, as the ledger entry's `at`) let the export count a range without
    # reading the ledger when the range holds all of the document's activity or none of it.
    change: dict[str, Any] = {"remaining": firestore.Increment(-1), "consumed": firestore.Increment(1), "spent_at": firestore.SERVER_TIMESTAMP}
    if grant.remaining <= 1:
        change["open"] = False
    writer.update(grant_ref(principal, grant.grant_id), change, option=option)
    writer.create(
        _run_ref(principal, run_id),
        {
            "run_id": run_id,
            "principal": principal,
            "state": "consumed",
            "grant_id": grant.group,
            "shard": grant.grant_id,
            "plan_id": grant.plan_id,
            "charge_id": charge_id,
            "consumed_at": consumed_at,
            "partner": grant.issued_by,
        },
    )
    _ledger(writer, principal=principal, grant_id=grant.group, shard=grant.grant_id, delta=-1, reason="consume", ref=run_id)


def commit_consume(principal: str, run_id: str, grant: Grant, *, charge_id: str, consumed_at: dt.datetime, extra: Extra = None) -> None:
    """One commit: take a run from `grant` (unchanged since read), create the run record, append the ledger entry."""
    batch = client().batch()
    write_consume(batch, principal, run_id, grant, charge_id=charge_id, consumed_at=consumed_at)
    if extra is not None:
        extra(batch)
    _commit(batch)


def commit_close_shard(principal: str, grant: Grant) -> None:
    """Mark a shard (unchanged since read) that holds no runs as closed, so the spending query passes it by."""
    batch = client().batch()
    batch.update(grant_ref(principal, grant.grant_id), {"open": False}, option=client().write_option(last_update_time=grant.update_time))
    _commit(batch)


def commit_run_start(principal: str, run: Run, metadata: dict[str, Any], *, started_at: dt.datetime) -> None:
    """Mark a consumed run (unchanged since read) started, with its metadata."""
    batch = client().batch()
    batch.update(
        _run_ref(principal, run.run_id),
        {**metadata, "state": "started", "started_at": started_at},
        option=client().write_option(last_update_time=run.update_time),
    )
    _commit(batch)


def commit_run_complete(principal: str, run: Run, *, outputs_sha256: str, completed_at: dt.datetime, seal: dict[str, Any], extra: Extra = None) -> None:
    """One commit: record the seal and mark the started run (unchanged since read) completed."""
    batch = client().batch()
    batch.update(
        _run_ref(principal, run.run_id),
        {"state": "completed", "outputs_sha256": outputs_sha256, "completed_at": completed_at, "seal_id": seal["seal_id"]},
        option=client().write_option(last_update_time=run.update_time),
    )
    batch.create(client().collection(SEALS).document(seal["seal_id"]), {**seal, "created_at": firestore.SERVER_TIMESTAMP})
    # The seal's log entry (SHA-256 of seal.json), created with the seal: once per seal, never for a retry.
    add_log_entry(batch, seal["seal_id"], seal["payload"])
    if extra is not None:
        extra(batch)
    _commit(batch)


def _read_documents(refs: list[firestore.DocumentReference]) -> list[dict[str, Any] | None]:
    """Several documents in one request (one round trip, one consistent read time), in the order asked; None where absent."""
    found = {snap.reference.path: snap for snap in client().get_all(refs, **_rpc())}
    return [found[ref.path].to_dict() if ref.path in found and found[ref.path].exists else None for ref in refs]


def read_seal_and_redemption(seal_id: str, principal: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The seal record and `principal`'s redemption of it, read together (verify needs both)."""
    seal, redemption = _read_documents([client().collection(SEALS).document(seal_id), client().collection(REDEMPTIONS).document(redemption_id(principal, seal_id))])
    return seal, redemption


def read_redemption_and_key(principal: str, seal_id: str, key_id: str | None) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """`principal`'s redemption of a seal and (with an Idempotency-Key) the key's record, at one read time: both are
    created in one commit, so either both or neither show."""
    refs = [client().collection(REDEMPTIONS).document(redemption_id(principal, seal_id))]
    if key_id is not None:
        refs.append(client().collection(REDEMPTION_KEYS).document(key_id))
    found = _read_documents(refs)
    return found[0], (found[1] if key_id is not None else None)


def read_seal(seal_id: str) -> dict[str, Any] | None:
    """The seal record, or None."""
    snap = client().collection(SEALS).document(seal_id).get(**_rpc())
    return snap.to_dict() if snap.exists else None


def grant_exists(principal: str, grant_id: str) -> bool:
    """Whether the grant was written (to recognise an applied commit whose reply was lost)."""
    return grant_ref(principal, grant_id).get(**_rpc()).exists


def redemption_key_id(caller: str, idempotency_key: str) -> str:
    """Document id of a redeem Idempotency-Key: keys are the caller's own (the ID token's principal), so namespaced by it."""
    return sha256_hex(f"{caller}|{idempotency_key}")


def commit_redeem(
    principal: str, seal_id: str, grant_id: str, *, key_hash: str | None = None, response: dict[str, Any] | None = None, extra: Extra = None
) -> None:
    """One commit: the redemption record (create: a second one fails), a one-run seal_rerun grant and its ledger entry,
    and (with an Idempotency-Key) the key's record that makes replays exact."""
    batch = client().batch()
    if key_hash is not None:
        batch.create(
            client().collection(REDEMPTION_KEYS).document(key_hash),
            {"principal": principal, "seal_id": seal_id, "grant_id": grant_id, "response": response, "created_at": firestore.SERVER_TIMESTAMP},
        )
    batch.create(
        client().collection(REDEMPTIONS).document(redemption_id(principal, seal_id)),
        {"principal": principal, "seal_id": seal_id, "grant_id": grant_id, "at": firestore.SERVER_TIMESTAMP},
    )
    batch.set(_principal_ref(principal), {"principal": principal}, merge=True)
    batch.create(
        grant_ref(principal, grant_id),
        _grant_fields(group=grant_id, slot=random.random(), principal=principal, plan_id=SEAL_RERUN_PLAN, runs_total=1, expires_at=None, source=SEAL_RERUN_PLAN, ref=seal_id, issued_by=None),
    )
    _ledger(batch, principal=principal, grant_id=grant_id, shard=grant_id, delta=1, reason=SEAL_RERUN_PLAN, ref=seal_id)
    if extra is not None:
        extra(batch)
    _commit(batch)


def all_grants(principal: str) -> list[dict[str, Any]]:
    """Every grant document of a principal, spent or not, as dicts with their `grant_id` (usage, tools and tests)."""
    return [{"grant_id": snap.id, **(snap.to_dict() or {})} for snap in read_principal_grant_docs(principal)]


# Races on one principal resolve in a few rounds; the budget is far above what contention needs, so
# that contention ends in each request's correct answer and only a Firestore outage ends in 503.
MAX_ATTEMPTS = 200
MAX_BACKOFF_SECONDS = 0.25
# Also bounded in time: Hosting gives up on a function after 60 s, Cloud Functions at its timeout.
MAX_CONTENTION_SECONDS = 50.0
# Re-reads after commits whose reply was lost: each costs up to a commit timeout, so few.
MAX_UNCERTAIN_COMMITS = 2


def optimistic(attempt: Callable[[], T], *, max_attempts: int = MAX_ATTEMPTS) -> T:
    """Run one read → decide → commit `attempt` until it answers.

    A lost race (Contended) is re-read and decided again after a jittered backoff. A commit whose
    reply was lost (CommitUncertain) is re-read too, a bounded number of times: every attempt
    recognises its own applied write on the re-read (a charge_id, a grant id chosen once per
    request), so an applied commit is answered as the success it was instead of a 503.
    """
    delays = gretry.exponential_sleep_generator(0.01, MAX_BACKOFF_SECONDS, 2.0)
    uncertain = 0
    deadline = time.monotonic() + MAX_CONTENTION_SECONDS
    for _ in range(max_attempts):
        if time.monotonic() > deadline:
            break
        try:
            return attempt()
        except Contended:
            _note("contended")
        except CommitUncertain:
            _note("uncertain")
            uncertain += 1
            if uncertain > MAX_UNCERTAIN_COMMITS:
                raise errors.Unavailable() from None
        time.sleep(next(delays))
    raise errors.Unavailable("too much contention: the optimistic commit did not succeed")


# ---------------------------------------------------------------- ledger audit and usage (read-only, but the audit's cursor)


def read_grant_page(after: str | None, limit: int) -> list[firestore.DocumentSnapshot]:
    """Up to `limit` grant documents of every principal, in path order, after the document path `after` (one query: one read time)."""
    query = client().collection_group(GRANTS).order_by("__name__").limit(limit)
    if after is not None:
        query = query.start_after({"__name__": client().document(after)})
    return list(query.get(**_rpc()))


def read_principal_grant_docs(principal: str) -> list[firestore.DocumentSnapshot]:
    """Every grant document of one principal, spent and expired ones too (one query: one read time)."""
    return list(_grants(principal).get(**_rpc()))


