"""Crossings of a partner's low line: `balance.low` and `balance.exhausted`, once per crossing, decided in the commit
of the change that crosses it (see docs/design.md, "Events for partners").

The API a commit function uses beside `events.record`:

- `read_guard(principal, partner, now, delta=..., closes=...)` reads, before the commit, what deciding the change's
  crossing of the partner's low line needs: the partner's balance for the principal (one `sum` aggregation) and,
  only when this change may fire or re-arm an alert, the alert document and every open grant document of that
  partner for that principal (exact mode). `delta` is the change in runs (consume -1, revoke -runs, issue +runs);
  `closes`: the change empties a grant document. None without a partner (a bonus grant) or with events off.
  `with_guard(read, ...)` reads it concurrently with another read; a consume reads the balance itself beside its
  draw and, near the line, the exact mode's documents too (`may_be_near`, `near_reads`, `guard_from_balance`).
- `record_balance_change(batch, guard, delta=..., changed=[documents], ref=...)` (consume: -1 and the charged
  document; revoke: -runs and the documents it takes runs from, each already written in the batch with its own
  update-time precondition) holds, in exact mode, every other open document of the partner (a write of its own
  value under its update time) and the alert document, so the balance it computes is the balance at the commit, and
  records `balance.low` / `balance.exhausted` when that balance is at or below the line / 0 while they are armed,
  disarming them in the same commit. A lost race retries the whole attempt, which decides again.
- `record_issue(batch, guard, runs=...)` re-arms the alerts in an issue's commit; `max_shards_beside(guard)` is how
  many grant documents the issue may still write within a commit's 500 writes.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from google.cloud import firestore
from google.cloud.firestore_v1.base_query import FieldFilter

from shared import store
from shared.config import get_config
from shared.events import BALANCE_EXHAUSTED, BALANCE_LOW, enabled, record
from shared.models import RunRecord

T = TypeVar("T")

# One document per (principal, partner): whether `low` and `exhausted` are armed.
ALERTS = "alerts"


def _alert_ref(principal: str, partner: str) -> firestore.DocumentReference:
    return store.client().collection(ALERTS).document(store.sha256_hex(f"{principal}|{partner}"))


@dataclass(frozen=True)
class Guard:
    """What deciding a crossing of one (principal, partner) needs, read before the commit."""

    principal: str
    partner: str
    balance: int  # the partner's balance as aggregated (under fan-out it can only be too high)
    exact: bool  # the alert and the partner's open documents are read, and the commit is preconditioned on them
    # True: every open document is held (the balance at the commit is exact: `low`, issues). False (`exhausted`): one
    # other open document is held when there is one (the balance stays above 0), else the alert document.
    hold: bool = False
    docs: tuple[store.Grant, ...] = ()
    alert: dict[str, Any] | None = None
    alert_update_time: Any = field(default=None, repr=False, compare=False)


def read_guard(principal: str, partner: str | None, now: dt.datetime, *, delta: int, closes: bool = False) -> Guard | None:
    """Read what deciding a change of `delta` runs needs (see the module docstring and docs/design.md, "Events"); None
    without a partner or with events off. `closes`: the change takes the last run of a document (only such a change can
    leave the balance at 0)."""
    if partner is None or not enabled():
        return None
    return guard_from_balance(principal, partner, now, store.read_partner_balance(principal, partner, now), delta=delta, closes=closes)


@dataclass(frozen=True)
class Near:
    """The exact mode's reads made ahead, beside a request's other reads (see `may_be_near`): the alert document and the
    partner's open documents (`limit` of them at most)."""

    alert: firestore.DocumentSnapshot
    open_docs: list[firestore.DocumentSnapshot]


def _open_docs_limit() -> int:
    """Every open document within the margin: each holds at least one run, so a balance there is a handful of them."""
    config = get_config()
    return config.low_balance + config.events_exact_margin + 2


def _open_docs(principal: str, partner: str, now: dt.datetime) -> firestore.Query:
    """The partner's open documents for the principal that the exact mode holds, as many as the margin can have."""
    return store.partner_grants(principal, partner, now).where(filter=FieldFilter("open", "==", True)).limit(_open_docs_limit())


def may_be_near(balance: int, *, delta: int) -> bool:
    """Whether to read the exact mode's documents ahead for a change of `delta` runs, judged from the principal's
    balance (read in the request's first round trip, before the partner is known). The partner's balance is at most
    the principal's, so when this says yes the reads are made ahead for every change that may need them on a principal
    with one partner. When it says no, the partner's balance (read later) may still be near if other partners hold the
    difference: then `guard_from_balance` reads the documents itself, one round trip more for that consume only."""
    config = get_config()
    return enabled() and balance + delta <= config.low_balance + config.events_exact_margin


def near_reads(principal: str, partner: str, now: dt.datetime) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """The exact mode's two reads (the alert document, the open documents) as calls for `store.at_once`, beside the
    request's own reads; `Near(alert, list(open_docs))` is what they read."""
    return (
        functools.partial(_alert_ref(principal, partner).get, **store._bounds()),
        functools.partial(_open_docs(principal, partner, now).get, **store._bounds()),
    )


def guard_from_balance(
    principal: str, partner: str, now: dt.datetime, balance: int, *, delta: int, closes: bool = False, near: Near | None = None
) -> Guard:
    """The guard for a partner balance already read (under fan-out it can only be too high, never too low).

    Exact only where the commit may decide something: an issue within the margin of the line (it re-arms `low` only
    above the line) and a consume or revoke that may leave the balance at or below the line while `low` is armed (the
    read says so: then it is so) hold every open document of the partner; one that empties a document within the
    margin while `exhausted` is armed reads them and holds one other open document, or, when none is, the alert
    document. Everything else is the fast path: one aggregation, no other read. `near`: the alert and the open
    documents, read already beside the request's other reads (a consume); without it they are read here when needed.
    """
    config = get_config()
    line, margin = config.low_balance, config.events_exact_margin
    after = balance + delta
    if delta > 0:
        is_near = balance <= line + margin
    else:
        is_near = after <= line or (closes and after <= line + margin)
    if not is_near:
        return Guard(principal, partner, balance, exact=False)
    alert = near.alert if near is not None else _alert_ref(principal, partner).get(**store._rpc())
    armed = alert.to_dict() or {} if alert.exists else {}
    low = bool(armed.get("low_armed")) and after <= line
    if delta < 0 and not (low or (armed.get("exhausted_armed") and closes)):
        return Guard(principal, partner, balance, exact=False)  # nothing armed that this change could fire
    hold = delta > 0 or low
    limit = _open_docs_limit()
    snaps = near.open_docs if near is not None else list(_open_docs(principal, partner, now).get(**store._rpc()))
    if len(snaps) >= limit:
        return Guard(principal, partner, balance, exact=False)  # far above the line after all (issues since the read)
    return Guard(
        principal,
        partner,
        balance,
        exact=True,
        hold=hold,
        docs=tuple(store.grant_from_snapshot(s) for s in snaps),
        alert=alert.to_dict() if alert.exists else None,
        alert_update_time=alert.update_time if alert.exists else None,
    )


def with_guard(
    read: Callable[[], T], principal: str, partner: str | None, now: dt.datetime, *, delta: int, closes: bool = False
) -> tuple[T, Guard | None]:
    """`read()` and `read_guard(...)` at once (`store.at_once`: two reads in the time of one); the guard is None without
    a partner or events."""
    if partner is None or not enabled():
        return read(), None
    guard, value = store.at_once(functools.partial(read_guard, principal, partner, now, delta=delta, closes=closes), read)
    return value, guard


def max_shards_beside(guard: Guard | None) -> int:
    """How many shards an issue may write beside the guard's writes within a commit's 500 (2 writes per shard, 4 others)."""
    extra = 0 if guard is None else len(guard.docs) + 2
    return min(store.MAX_SHARDS, (500 - 4 - extra) // 2)


def run_partner(principal: str, run: RunRecord) -> str | None:
    """The partner of a run's events: the one recorded at consume, else (runs consumed before events) its grant's."""
    if run.partner is not None or run.plan_id == store.SEAL_RERUN_PLAN:
        return run.partner
    snap = store.grant_ref(principal, run.shard).get(**store._rpc())
    return store.grant_issued_by(snap.to_dict() or {}) if snap.exists else "admin"


def _hold_document(batch: firestore.WriteBatch, principal: str, doc: store.Grant) -> None:
    """Precondition the commit on a document unchanged since read: a write of its own value, which does not move its
    update time."""
    batch.update(store.grant_ref(principal, doc.grant_id), {"remaining": doc.remaining}, option=store.client().write_option(last_update_time=doc.update_time))


def _hold(batch: firestore.WriteBatch, guard: Guard, changed: Sequence[store.Grant]) -> int:
    """Hold every open document of the guard but the changed ones; the partner's balance before the change, exact at
    the commit."""
    ids = {grant.grant_id for grant in changed}
    for doc in guard.docs:
        if doc.grant_id not in ids:
            _hold_document(batch, guard.principal, doc)
    return sum(doc.remaining for doc in guard.docs if doc.grant_id not in ids) + sum(grant.remaining for grant in changed)


def _write_alert(batch: firestore.WriteBatch, guard: Guard, fields: dict[str, Any]) -> None:
    """Write the alert document, preconditioned on the version read (created when there was none)."""
    ref = _alert_ref(guard.principal, guard.partner)
    if guard.alert_update_time is None:
        batch.create(ref, {"principal": guard.principal, "partner": guard.partner, **fields})
    else:
        batch.update(ref, fields, option=store.client().write_option(last_update_time=guard.alert_update_time))


def record_balance_change(
    batch: firestore.WriteBatch, guard: Guard | None, *, delta: int, changed: Sequence[store.Grant], ref: str, time: dt.datetime | None = None
) -> int | None:
    """In exact mode: hold the partner's documents, decide and record `balance.low` / `balance.exhausted` for a change of
    `delta` (< 0) runs taken from `changed`; the partner's balance after the commit (None outside exact mode)."""
    if guard is None or not guard.exact:
        return None
    alert = guard.alert or {}
    ids = {grant.grant_id for grant in changed}
    changed_after = sum(grant.remaining for grant in changed) + delta
    if guard.hold:
        after: int | None = _hold(batch, guard, changed) + delta
        low = bool(alert.get("low_armed")) and after is not None and after <= get_config().low_balance
    else:
        # Exact about whether another document is open, not about runs: hold one that is (the one with the most runs);
        # unchanged at the commit, it is still open, so the balance is not 0. None open: 0 once these are emptied
        # (only an issue opens a document, and it moves the alert document, which this commit then holds).
        others = [doc for doc in guard.docs if doc.grant_id not in ids]
        if others:
            _hold_document(batch, guard.principal, max(others, key=lambda doc: doc.remaining))
            return None
        after = 0 if changed_after == 0 else None
        low = False
    exhausted = bool(alert.get("exhausted_armed")) and after == 0
    if guard.alert is not None:
        fields: dict[str, Any] = {"low_armed": alert.get("low_armed", False) and not low, "exhausted_armed": alert.get("exhausted_armed", False) and not exhausted}
        # Written even unchanged: the precondition makes a concurrent issue (which always moves the document) retry us.
        _write_alert(batch, guard, fields)
    if low:
        record(batch, type=BALANCE_LOW, principal=guard.principal, partner=guard.partner, data={"principal": guard.principal, "balance": after},
               ref=f"{guard.partner}|{ref}", time=time)
    if exhausted:
        record(batch, type=BALANCE_EXHAUSTED, principal=guard.principal, partner=guard.partner, data={"principal": guard.principal},
               ref=f"{guard.partner}|{ref}", time=time)
    return after


def record_issue(batch: firestore.WriteBatch, guard: Guard | None, *, runs: int) -> None:
    """Re-arm the alerts in an issue's commit: `exhausted` always (the balance is at least `runs`), `low` when the balance
    after the issue is above the line (exact near the line), or when it was armed and has not fired yet."""
    if guard is None:
        return
    if guard.exact:
        after = _hold(batch, guard, ()) + runs
        low = after > get_config().low_balance or bool((guard.alert or {}).get("low_armed"))
        _write_alert(batch, guard, {"low_armed": low, "exhausted_armed": True, "armed_at": firestore.SERVER_TIMESTAMP})
    else:
        # Far above the line: no exact read, no precondition; the write always moves the document (armed_at), so an
        # exact consume that read the alert before it retries and sees this issue's runs.
        batch.set(_alert_ref(guard.principal, guard.partner),
                  {"principal": guard.principal, "partner": guard.partner, "low_armed": True, "exhausted_armed": True, "armed_at": firestore.SERVER_TIMESTAMP},
                  merge=True)
