"""Events for partners: every committed change recorded in its own commit (an outbox), published to Pub/Sub as a CloudEvent.

The API a commit function uses (issue, consume, revoke, run_complete and redeem use it):

- `record(batch, type=..., principal=..., partner=..., data=..., ref=..., time=...)` adds the event to the batch that
  makes the change: `events/{ce-id}` is `create()`d with the change, so it exists if and only if the change
  committed, and a second record of the same (type, principal, ref) fails the commit as a replay would. The ce-id is
  `sha256(type|principal|ref)`: stable, so every publication of one event carries the same id and data. `partner`
  None (a bonus grant) publishes without `ce-partner`.

The crossings of a partner's low line (`balance.low`, `balance.exhausted`), decided in the commit of the change that
crosses it, are `shared/crossings.py`'s.

After the commit, `shared/store.py` calls `committed(batch)` (its after-commit hook), which hands the batch's events
to this process's publisher: a background thread, so no request waits on Pub/Sub. Events it could not publish
(Pub/Sub down, the instance stopped or throttled, a lost commit reply) stay unpublished in Firestore, and the
sweeper (`sweep`, the `events_sweep` function that Cloud Scheduler calls every minute) publishes them in commit
order. docs/design.md ("Events for partners") gives the argument.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import logging
import queue
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import firestore
from google.cloud.firestore_v1.base_query import FieldFilter

from shared import store
from shared.config import get_config
from shared.models import SweepResponse, format_time

EVENTS = "events"
# A published event stays this long (a partner's consumer may ask what was sent, an operator may replay it), then
# Firestore's TTL policy on the field (deploy.sh enables it) deletes it. The contract names no retention.
EXPIRE_FIELD = "expire_at"
PUBLISHED_RETENTION = dt.timedelta(days=30)

GRANT_ISSUED = "com.gbx.grant.issued.v1"
GRANT_REVOKED = "com.gbx.grant.revoked.v1"
RUN_CONSUMED = "com.gbx.run.consumed.v1"
BALANCE_LOW = "com.gbx.balance.low.v1"
BALANCE_EXHAUSTED = "com.gbx.balance.exhausted.v1"
RUN_SEALED = "com.gbx.run.sealed.v1"
SEAL_REDEEMED = "com.gbx.seal.redeemed.v1"
# The contract's table order: one commit's events are published in it.
TYPE_ORDER = (GRANT_ISSUED, GRANT_REVOKED, RUN_CONSUMED, BALANCE_LOW, BALANCE_EXHAUSTED, RUN_SEALED, SEAL_REDEEMED)

# A publish is given this long (the client's own retries included) before the event is left to the sweeper.
PUBLISH_TIMEOUT_SECONDS = 10.0
# After a failed publish, for this long each event is first checked for older unpublished events of its principal
# (left to the sweeper, which publishes in commit order), so that a principal's events never overtake its backlog.
DEGRADED_SECONDS = 180.0
# While Pub/Sub looks down (a publish failed this recently, or one has been unanswered this long), events are left to
# the sweeper at once: nothing is attempted, so an outage costs the process nothing.
PAUSE_AFTER_FAILURE_SECONDS = 5.0
STALLED_PUBLISH_SECONDS = 2.0
# Published events are marked so in Firestore in batches, at most this often while events keep coming.
MARK_EVERY_SECONDS = 0.5
# Events waiting in one process's publisher at most; beyond, they are left to the sweeper (memory stays bounded).
MAX_QUEUED = 10_000
# The sweeper reads this many unpublished events per page and stops starting new pages after its budget.
SWEEP_PAGE = 500
SWEEP_BUDGET_SECONDS = 45.0

_log = logging.getLogger(__name__)


def enabled() -> bool:
    """Whether events are recorded (GBX_EVENTS=0 turns them off)."""
    return get_config().events


def event_id(type: str, principal: str, ref: str) -> str:
    """The stable ce-id of the event of `type` about `principal` caused by `ref` (a grant, run, seal, or a crossing's commit)."""
    return store.sha256_hex(f"{type}|{principal}|{ref}")


def _events() -> firestore.CollectionReference:
    return store.client().collection(EVENTS)


@dataclass(frozen=True)
class Event:
    """An event as recorded: everything its CloudEvent is made of."""

    id: str
    type: str
    principal: str
    partner: str | None
    data: dict[str, Any]
    time: dt.datetime
    source: str
    n: int = 0

    def attributes(self) -> dict[str, str]:
        """The CloudEvents attributes (Pub/Sub binding, binary mode)."""
        attributes = {
            "ce-specversion": "1.0",
            "ce-id": self.id,
            "ce-source": self.source,
            "ce-type": self.type,
            "ce-time": format_time(self.time),
            "ce-subject": self.principal,
            "content-type": "application/json",
        }
        if self.partner is not None:
            attributes["ce-partner"] = self.partner
        return attributes

    def body(self) -> bytes:
        """The data, one JSON form for every publication."""
        return json.dumps(self.data, sort_keys=True, separators=(",", ":")).encode()


def _from_document(snap: firestore.DocumentSnapshot) -> Event:
    data = snap.to_dict() or {}
    return Event(id=snap.id, type=data["type"], principal=data["principal"], partner=data.get("partner"), data=json.loads(data["data"]),
                 time=data["time"], source=data["source"], n=data.get("n", 0))


def record(
    batch: firestore.WriteBatch,
    *,
    type: str,
    principal: str,
    partner: str | None,
    data: dict[str, Any],
    ref: str,
    time: dt.datetime | None = None,
) -> Event | None:
    """Add an event to the batch of the change it reports (None when events are off); published after the commit."""
    if not enabled():
        return None
    pending: list[Event] = batch.__dict__.setdefault("gbx_events", [])
    event = Event(
        id=event_id(type, principal, ref),
        type=type,
        principal=principal,
        partner=partner,
        data=data,
        time=time or dt.datetime.now(dt.UTC),
        source=get_config().public_url,
        n=len(pending),
    )
    batch.create(
        _events().document(event.id),
        {
            "type": event.type,
            "principal": principal,
            "partner": partner,
            # The data as its JSON text: one indexed string instead of an index entry per field of a map.
            "data": event.body().decode(),
            "time": event.time,
            "source": event.source,
            "n": event.n,
            # The commit's time: the sweeper publishes in commit order.
            "at": firestore.SERVER_TIMESTAMP,
            "published": False,
        },
    )
    pending.append(event)
    return event


# ---------------------------------------------------------------- publishing


@functools.cache
def _publisher() -> Any:
    """The process's Pub/Sub publisher client: message ordering on (the ordering key is the principal)."""
    from google.cloud import pubsub_v1  # type: ignore[attr-defined]
    from google.cloud.pubsub_v1.types import BatchSettings, PublisherOptions

    return pubsub_v1.PublisherClient(
        batch_settings=BatchSettings(max_latency=0.005),
        publisher_options=PublisherOptions(enable_message_ordering=True, timeout=PUBLISH_TIMEOUT_SECONDS),
    )


def topic_path(topic: str | None = None) -> str:
    """The full name of the events topic (or of another topic of the project)."""
    config = get_config()
    return f"projects/{config.project}/topics/{topic or config.events_topic}"


def partner_topic(partner: str) -> str:
    """The per-partner topic local mode also publishes to (emulators before SDK 555 ignore subscription filters)."""
    return f"{get_config().events_topic}-partner-{store.sha256_hex(partner)[:16]}"


def ensure_topic(topic: str | None = None) -> None:
    """Create the topic when it does not exist (local mode and tests; deploy.sh creates it in production)."""
    with contextlib.suppress(gexc.AlreadyExists):
        _publisher().create_topic(name=topic_path(topic), timeout=PUBLISH_TIMEOUT_SECONDS)


_partner_topics: set[str] = set()
_partner_topics_lock = threading.Lock()


def _publish(event: Event) -> Future[Any]:
    """Publish one event to the topic (and, in local mode, to its partner's topic); the future of the main publish."""
    client = _publisher()
    config = get_config()
    future: Future[Any] = client.publish(topic_path(), event.body(), ordering_key=event.principal, **event.attributes())
    if config.events_partner_topics and event.partner is not None:
        topic = partner_topic(event.partner)
        with _partner_topics_lock:
            if topic not in _partner_topics:
                ensure_topic(topic)
                _partner_topics.add(topic)
        client.publish(topic_path(topic), event.body(), ordering_key=event.principal, **event.attributes()).result(timeout=PUBLISH_TIMEOUT_SECONDS)
    return future


def _mark_published(ids: Iterable[str]) -> None:
    """Mark events published, 500 per commit (not through the optimistic loop: nothing else writes them), with the time
    after which Firestore's TTL policy on `expire_at` (deploy.sh) deletes them: unpublished events never expire."""
    ids = list(ids)
    fields = {"published": True, "published_at": firestore.SERVER_TIMESTAMP, EXPIRE_FIELD: dt.datetime.now(dt.UTC) + PUBLISHED_RETENTION}
    for start in range(0, len(ids), 500):
        batch = store.client().batch()
        for event_id_ in ids[start:start + 500]:
            batch.update(_events().document(event_id_), fields)
        batch.commit(**store._commit_rpc())



class Publisher:
    """The process's publisher: events are queued after their commit and published by one background thread."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Event] = queue.Queue(maxsize=MAX_QUEUED)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._failed_at = -1e9
        self._published: list[str] = []
        self._done = threading.Condition(self._lock)
        self._in_flight = 0
        self._outstanding: dict[str, float] = {}  # event id → when its publish started
        # Principals whose events this process left to the sweeper, and when it last did (see _publish_one).
        self._left: dict[str, float] = {}
        self._marked_at = 0.0
        # Published events and how long they waited (for the benchmark): (recorded time, published time).
        self.delays: list[float] = []

    def submit(self, events: Sequence[Event]) -> None:
        """Queue committed events (never blocks: a full queue leaves them to the sweeper)."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="gbx-events-publisher", daemon=True)
                self._thread.start()
            self._in_flight += len(events)
        for event in events:
            try:
                self._queue.put_nowait(event)
            except queue.Full:
                self._settle(1)

    def degraded(self) -> bool:
        """Whether a publish failed recently (events are then checked against their principal's backlog first)."""
        return time.monotonic() - self._failed_at < DEGRADED_SECONDS

    def _settle(self, count: int) -> None:
        with self._lock:
            self._in_flight -= count
            self._done.notify_all()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued event is published or given up (tests, benchmarks, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._in_flight > 0 or self._published:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._done.wait(left)
        return True

    def _run(self) -> None:
        while True:
            try:
                batch = [self._queue.get(timeout=0.05)]
            except queue.Empty:
                batch = []
            while batch and len(batch) < SWEEP_PAGE:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            # Threads of one process may queue in another order than they committed: the recorded time orders them.
            batch.sort(key=lambda e: (e.time, e.n))
            for event in batch:
                self._publish_one(event)
            # Marks go out in batches, at most every MARK_EVERY_SECONDS (or as soon as nothing else is waiting).
            if time.monotonic() - self._marked_at >= MARK_EVERY_SECONDS or (not batch and self._published):
                self._mark()

    def paused(self) -> bool:
        """Whether Pub/Sub looks down: a publish failed moments ago, or one has been waiting too long."""
        now = time.monotonic()
        if now - self._failed_at < PAUSE_AFTER_FAILURE_SECONDS:
            return True
        with self._lock:
            oldest = min(self._outstanding.values(), default=now)
        return now - oldest > STALLED_PUBLISH_SECONDS

    def _publish_one(self, event: Event) -> None:
        if self.paused():
            self._failed_at = max(self._failed_at, time.monotonic() - PAUSE_AFTER_FAILURE_SECONDS)  # degraded from here on
            self._leave(event)
            return
        if self.degraded() and time.monotonic() - self._left.get(event.principal, -1e9) < DEGRADED_SECONDS:
            # Behind its principal's backlog that this process left: the sweeper publishes them all in commit order.
            # Known from memory, not by a query per event: under load (when Pub/Sub stalls) a query per event would
            # add a read of the outbox to every request's event, just when Firestore has least to spare.
            self._leave(event)
            return
        try:
            with self._lock:
                self._outstanding[event.id] = time.monotonic()
            future = _publish(event)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the event stays for the sweeper
            self._failed(event, exc)
            return
        future.add_done_callback(functools.partial(self._finished, event))

    def _finished(self, event: Event, future: Future[Any]) -> None:
        exc = future.exception()
        if exc is not None:
            self._failed(event, exc)
            return
        with self._lock:
            self._outstanding.pop(event.id, None)
            self._published.append(event.id)
            self.delays.append((dt.datetime.now(dt.UTC) - event.time).total_seconds())
            self._in_flight -= 1

    def forget_left(self) -> None:
        """The backlog this process left is published (a sweep here found nothing waiting): publish directly again."""
        self._left.clear()

    def _leave(self, event: Event) -> None:
        """Leave the event to the sweeper, and this process's later events of its principal while degraded."""
        self._left[event.principal] = time.monotonic()
        self._settle(1)

    def _failed(self, event: Event, exc: BaseException) -> None:
        self._failed_at = time.monotonic()
        self._left[event.principal] = self._failed_at
        with self._lock:
            self._outstanding.pop(event.id, None)
        _log.warning("event %s not published (%s); the sweeper will publish it", event.id, type(exc).__name__)
        with contextlib.suppress(Exception):
            # An ordering key stops after a failure until resumed; the degraded check keeps the order from here on.
            _publisher().resume_publish(topic_path(), event.principal)
        self._settle(1)

    def _mark(self) -> None:
        self._marked_at = time.monotonic()
        with self._lock:
            ids, self._published = self._published, []
        if not ids:
            return
        try:
            _mark_published(ids)
        except Exception as exc:  # noqa: BLE001 - unmarked events are published again by the sweeper (same ce-id)
            _log.warning("could not mark %d events published (%s)", len(ids), type(exc).__name__)
        with self._lock:
            self._done.notify_all()


@functools.cache
def publisher() -> Publisher:
    """The process-wide publisher."""
    return Publisher()


def committed(batch: firestore.WriteBatch) -> None:
    """store's after-commit hook: hand the batch's events to the publisher."""
    pending: list[Event] | None = batch.__dict__.get("gbx_events")
    if pending:
        publisher().submit(pending)


store.after_commit.append(committed)


# ---------------------------------------------------------------- the sweeper


def sweep(*, grace_seconds: float | None = None, budget_seconds: float = SWEEP_BUDGET_SECONDS) -> SweepResponse:
    """Publish, in commit order, the events left unpublished for longer than the grace period; mark them published.

    A principal whose publish fails is skipped for the rest of the sweep (its later events must not overtake it).
    """
    config = get_config()
    grace = config.events_sweep_grace_seconds if grace_seconds is None else grace_seconds
    started = time.monotonic()
    published = failed = 0
    cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=grace)
    stalled: set[str] = set()
    after: firestore.DocumentSnapshot | None = None
    while time.monotonic() - started < budget_seconds:
        query = (
            _events()
            .where(filter=FieldFilter("published", "==", False))
            .where(filter=FieldFilter("at", "<=", cutoff))
            .order_by("at")
            .order_by("n")
            .limit(SWEEP_PAGE)
        )
        if after is not None:
            query = query.start_after(after)
        page = list(query.get(**store._rpc()))
        futures: list[tuple[Event, Future[Any]]] = []
        for snap in page:
            event = _from_document(snap)
            if event.principal in stalled:
                continue
            try:
                futures.append((event, _publish(event)))
            except Exception:  # noqa: BLE001 - left for the next sweep
                stalled.add(event.principal)
        done: list[str] = []
        for event, future in futures:
            try:
                future.result(timeout=max(0.1, PUBLISH_TIMEOUT_SECONDS - (time.monotonic() - started)))
                done.append(event.id)
            except (Exception, FutureTimeout):  # noqa: BLE001 - left for the next sweep
                stalled.add(event.principal)
                failed += 1
        for principal in stalled:
            with contextlib.suppress(Exception):
                _publisher().resume_publish(topic_path(), principal)
        if done:
            _mark_published(done)
        published += len(done)
        if len(page) < SWEEP_PAGE:
            break
        after = page[-1]
    left = store._aggregate(_events().where(filter=FieldFilter("published", "==", False)).count())
    if not left and not failed:
        # Nothing waits any more: this process's own events need not queue behind a backlog that is gone.
        publisher().forget_left()
    return SweepResponse(published=published, failed=failed, unpublished=left)


def events_sweep(caller: Any) -> SweepResponse:
    """POST /api/events/sweep: publish the events their requests left unpublished (Cloud Scheduler, every minute)."""
    from shared.http import log  # only the endpoint logs; local mode's and the tests' sweeps do not

    result = sweep()
    log({"severity": "WARNING" if result.failed else "INFO", "event": "events_sweep",
         "message": f"events sweep: {result.published} published, {result.failed} failed, {result.unpublished} unpublished", **result.model_dump()})
    return result



# ---------------------------------------------------------------- partners' subscriptions (local mode; deploy.sh partner-events in production)


def subscription_id(partner: str) -> str:
    """The id of a partner's subscription: `gbx-events-` and the email with `~` for `@` (deploy.sh names it the same)."""
    return f"{get_config().events_topic}-{partner.replace('@', '~')}"


def partner_filter(partner: str) -> str:
    """The subscription filter that lets through only the partner's events."""
    return f'attributes.ce-partner = "{partner}"'


def create_partner_subscription(partner: str) -> str:
    """Create (or find) the partner's pull subscription, filtered on its `ce-partner`, with message ordering; its full name.

    With partner topics on (local mode), it is attached to the partner's own topic as well as filtered: the emulators of
    SDKs before 555 accept a filter but do not apply it.
    """
    from google.cloud import pubsub_v1  # type: ignore[attr-defined]

    config = get_config()
    topic = partner_topic(partner) if config.events_partner_topics else None
    ensure_topic(topic)
    subscriber = pubsub_v1.SubscriberClient()
    name = subscriber.subscription_path(config.project, subscription_id(partner))
    request = {"name": name, "topic": topic_path(topic), "filter": partner_filter(partner), "enable_message_ordering": True}
    with contextlib.suppress(gexc.AlreadyExists):
        subscriber.create_subscription(request=request, timeout=PUBLISH_TIMEOUT_SECONDS)
    return name


def main(argv: list[str] | None = None) -> None:
    """`python -m shared.events subscribe EMAIL`: a partner's subscription on local mode's Pub/Sub emulator."""
    import argparse
    import os
    import sys

    from shared import config as config_module

    parser = argparse.ArgumentParser(prog="python -m shared.events", description="Partners' event subscriptions in local mode (deploy.sh partner-events in production).")
    commands = parser.add_subparsers(dest="command", required=True)
    subscribe = commands.add_parser("subscribe", help="create the partner's pull subscription (filtered on its ce-partner) on the emulator make run started")
    subscribe.add_argument("email", help="the partner's email (its grants' issued_by)")
    args = parser.parse_args(argv)
    os.environ[config_module.ENV_LOCAL_MODE] = "1"
    config_module.get_config.cache_clear()
    host_file = get_config().local_dir / LOCAL_PUBSUB_HOST_FILE
    if not os.environ.get("PUBSUB_EMULATOR_HOST"):
        if not host_file.is_file():
            sys.exit("no Pub/Sub emulator: start make run first (or set PUBSUB_EMULATOR_HOST)")
        os.environ["PUBSUB_EMULATOR_HOST"] = host_file.read_text().strip()
    name = create_partner_subscription(args.email.lower())
    print(name)
    print(f"export PUBSUB_EMULATOR_HOST={os.environ['PUBSUB_EMULATOR_HOST']}", file=sys.stderr)


# Where local mode's server writes the address of the Pub/Sub emulator it uses (read by `subscribe`).
LOCAL_PUBSUB_HOST_FILE = "pubsub-emulator-host"


if __name__ == "__main__":
    main()
