"""Events for partners, on the real Firestore and Pub/Sub emulators: one event per committed change, none for replays or
refusals; low/exhausted once per crossing, also under a 100-runner fan-out; per-principal order; Pub/Sub stopped
(SIGSTOP) while requests go on; a function killed between its commit and its publish."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from google.cloud.firestore_v1.base_query import FieldFilter

from shared import config, events, store
from shared.config import REPO_ROOT
from tests.conftest import ADMIN_TOKEN, AUDIENCE, OPERATOR, RUNNER, Api, error_code

# Pull without waiting: the emulator answers a waiting pull only when its deadline passes.
pytestmark = [pytest.mark.filterwarnings("ignore:The return_immediately flag is deprecated"), pytest.mark.alone]

PARTNER_A = "partner-a@example.com"
PARTNER_B = "partner-b@example.com"
CONSUMED, LOW, EXHAUSTED = events.RUN_CONSUMED, events.BALANCE_LOW, events.BALANCE_EXHAUSTED


@dataclass(frozen=True)
class Message:
    """One delivered CloudEvent."""

    attributes: dict[str, str]
    data: dict[str, Any]
    ordering_key: str

    @property
    def type(self) -> str:
        return self.attributes["ce-type"]


class Subscription:
    """A subscription of this test on a topic (pull), created before anything it should see is published."""

    def __init__(self, topic: str | None = None, *, filter: str = "") -> None:
        from google.cloud import pubsub_v1  # type: ignore[attr-defined]

        self.client = pubsub_v1.SubscriberClient()
        self.name = self.client.subscription_path(os.environ["GOOGLE_CLOUD_PROJECT"], f"test-{uuid.uuid4().hex[:12]}")
        request = {"name": self.name, "topic": events.topic_path(topic), "enable_message_ordering": True, "filter": filter}
        self.client.create_subscription(request=request, timeout=10)
        self.received: list[Message] = []

    def pull(self, count: int, *, timeout: float = 30.0, settle: float = 1.0) -> list[Message]:
        """Everything delivered until `count` distinct ce-ids arrived (then `settle` seconds more), acknowledged."""
        deadline = time.monotonic() + timeout
        quiet_until: float | None = None
        while time.monotonic() < deadline:
            if quiet_until is None and len({m.attributes["ce-id"] for m in self.received}) >= count:
                quiet_until = time.monotonic() + settle
            if quiet_until is not None and time.monotonic() > quiet_until:
                break
            response = self.client.pull(request={"subscription": self.name, "max_messages": 1000, "return_immediately": True}, timeout=10)
            if response.received_messages:
                for received in response.received_messages:
                    message = received.message
                    self.received.append(Message(dict(message.attributes), json.loads(message.data), message.ordering_key))
                self.client.acknowledge(request={"subscription": self.name, "ack_ids": [r.ack_id for r in response.received_messages]})
            else:
                time.sleep(0.1)
        return self.received

    def distinct(self) -> list[Message]:
        """The first delivery of each ce-id, in delivery order; asserting that duplicates are identical."""
        first: dict[str, Message] = {}
        for message in self.received:
            seen = first.setdefault(message.attributes["ce-id"], message)
            assert seen == message, "a duplicate must carry the same attributes and data"
        return list(first.values())


@pytest.fixture
def subscription(api: Api) -> Subscription:
    """A fresh subscription on the events topic."""
    return Subscription()


def _issue(api: Api, runs: int, *, partner: str | None = None, key: str | None = None, principal: str = RUNNER) -> requests.Response:
    """Issue as the admin token; with `partner`, as that partner (its ID token beside the admin token)."""
    headers = {"X-GBX-ADMIN-TOKEN": ADMIN_TOKEN}
    if partner is not None:
        headers["Authorization"] = f"Bearer {api.token(partner)}"
    if key is not None:
        headers["Idempotency-Key"] = key
    return requests.post(api.base_url + "/api/entitlement/issue", json={"principal": principal, "runs_total": runs}, headers=headers, timeout=60)


def _unpublished() -> int:
    return len(list(store.client().collection(events.EVENTS).where(filter=FieldFilter("published", "==", False)).get()))


def test_every_committed_change_is_one_event_and_replays_and_refusals_none(api: Api, subscription: Subscription) -> None:
    issued = _issue(api, 1, partner=PARTNER_A, key="order-1")
    assert issued.status_code == 200
    grant_id = issued.json()["grant_id"]
    assert _issue(api, 1, partner=PARTNER_A, key="order-1").json()["replayed"] is True  # a replay: no event
    assert api.consume("job-1").status_code == 200
    assert api.consume("job-1").json()["replayed"] is True  # a replay: no event
    refused = api.consume("job-2")
    assert (refused.status_code, error_code(refused)) == (402, "entitlement_exhausted")  # a refusal: no event
    assert api.run_start("job-1").status_code == 200  # not an event of the contract
    bundle = api.run_complete("job-1").json()
    assert api.run_complete("job-1").status_code == 200  # a retry: the same seal, no second event
    redeemed = api.redeem(bundle["seal_svg"])
    assert redeemed.status_code == 200
    assert api.redeem(bundle["seal_svg"]).status_code == 409  # refused: no event

    messages = subscription.pull(5, settle=2.0)
    distinct = subscription.distinct()
    assert [m.type for m in distinct] == [events.GRANT_ISSUED, CONSUMED, EXHAUSTED, events.RUN_SEALED, events.SEAL_REDEEMED]
    issued_event, consumed, exhausted, sealed, redeemed_event = distinct
    assert issued_event.data == {"grant_id": grant_id, "principal": RUNNER, "plan_id": "standard", "runs_total": 1, "expires_at": None, "issued_by": PARTNER_A}
    assert consumed.data == {"run_id": "job-1", "principal": RUNNER, "grant_id": grant_id}
    # The grant of 1 run never took the partner's balance above the line (5): no `low`; from 1 to 0 is `exhausted`.
    assert exhausted.data == {"principal": RUNNER}
    assert sealed.data == {"run_id": "job-1", "principal": RUNNER, "seal_id": bundle["seal_id"], "verify_link": bundle["verify_link"]}
    assert redeemed_event.data == {"seal_id": bundle["seal_id"], "principal": RUNNER, "grant_id": redeemed.json()["grant_id"]}
    for message in distinct:
        attributes = message.attributes
        assert attributes["ce-specversion"] == "1.0" and attributes["ce-source"] == AUDIENCE and attributes["ce-subject"] == RUNNER
        assert attributes["content-type"] == "application/json" and attributes["ce-time"].endswith("Z")
        assert message.ordering_key == RUNNER
        # Bonus grants have no partner; every other event is the issuing partner's.
        assert attributes.get("ce-partner") == (None if message.type == events.SEAL_REDEEMED else PARTNER_A)
    assert consumed.attributes["ce-id"] == events.event_id(CONSUMED, RUNNER, "job-1")
    # Every recorded event is one of these, and each is marked published once out.
    recorded = {snap.id for snap in store.client().collection(events.EVENTS).get()}
    assert recorded == {m.attributes["ce-id"] for m in distinct}
    assert len(messages) >= 5
    assert events.publisher().flush(timeout=10) and _unpublished() == 0
    # Published, each carries the time after which the TTL policy deletes it: 30 days on.
    expiries = [snap.get(events.EXPIRE_FIELD) for snap in store.client().collection(events.EVENTS).get()]
    soon, late = (dt.datetime.now(dt.UTC) + events.PUBLISHED_RETENTION + dt.timedelta(minutes=m) for m in (-10, 10))
    assert len(expiries) == 5 and all(soon < expiry < late for expiry in expiries)


def test_low_fires_once_per_crossing_and_an_issue_re_arms_it(api: Api, subscription: Subscription) -> None:
    # Line 5 (GBX_LOW_BALANCE's default). 8 runs: low at 5, exhausted at 0; an issue of 10 re-arms both.
    _issue(api, 8, partner=PARTNER_A)
    for n in range(8):
        assert api.consume(f"job-{n}").status_code == 200
    _issue(api, 2, partner=PARTNER_A)  # 2: still at or below the line, so `low` stays disarmed; `exhausted` re-armed
    for n in range(8, 10):
        assert api.consume(f"job-{n}").status_code == 200
    _issue(api, 10, partner=PARTNER_A)  # 10: above the line, both re-armed
    for n in range(10, 16):
        assert api.consume(f"job-{n}").status_code == 200
    subscription.pull(3 + 10 + 6 + 4, settle=2.0)
    alerts = [(m.type, m.data.get("balance")) for m in subscription.distinct() if m.type in (LOW, EXHAUSTED)]
    assert alerts == [(LOW, 5), (EXHAUSTED, None), (EXHAUSTED, None), (LOW, 5)]
    # Each fired in the commit of the consume that crossed: its ce-time is that run's consumed_at.
    lows = [m for m in subscription.distinct() if m.type == LOW]
    assert lows[0].attributes["ce-time"] == next(m for m in subscription.distinct() if m.data.get("run_id") == "job-2").attributes["ce-time"]


def test_a_partner_s_line_counts_its_own_grants_only(api: Api, subscription: Subscription) -> None:
    _issue(api, 7, partner=PARTNER_A)
    _issue(api, 40, partner=PARTNER_B)  # B's grant expires with A's: runs are drawn from both
    for n in range(20):
        assert api.consume(f"job-{n}").status_code == 200
    subscription.pull(2 + 20, settle=2.0)
    distinct = subscription.distinct()
    consumed_from = Counter(m.attributes["ce-partner"] for m in distinct if m.type == CONSUMED)
    a_left = 7 - consumed_from[PARTNER_A]
    alerts = {(m.type, m.attributes["ce-partner"]) for m in distinct if m.type in (LOW, EXHAUSTED)}
    expected = {(LOW, PARTNER_A)} if a_left <= 5 else set()
    if a_left == 0:
        expected.add((EXHAUSTED, PARTNER_A))
    assert alerts == expected  # B's balance stays far above its line


def _together(count: int, call: Any) -> list[requests.Response]:
    barrier = threading.Barrier(count)

    def run(n: int) -> requests.Response:
        barrier.wait(timeout=60)
        return call(n)

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(run, range(count)))


def test_100_runners_draining_a_balance_fire_low_and_exhausted_exactly_once(api: Api, subscription: Subscription) -> None:
    # 80 runs in 20 documents: the first consumes are far above the line (no exact reads), the last 55 decide exactly.
    _issue(api, 80, partner=PARTNER_A)
    responses = _together(100, lambda n: api.consume(f"task-{n}"))
    assert Counter(r.status_code for r in responses) == {200: 80, 402: 20}
    subscription.pull(1 + 80 + 2, timeout=60, settle=3.0)
    types = Counter(m.type for m in subscription.distinct())
    assert types == {events.GRANT_ISSUED: 1, CONSUMED: 80, LOW: 1, EXHAUSTED: 1}
    (low,) = [m for m in subscription.distinct() if m.type == LOW]
    # Fired by the commit that crossed (5), or, had a consume far above the line read a balance more than the margin
    # too high, by the first exact commit after it (see docs/design.md): at or below the line either way.
    assert low.data["balance"] <= 5
    # Every event of the commits is in Firestore, and every one went out.
    assert len(store.client().collection(events.EVENTS).get()) == 83
    assert events.publisher().flush(timeout=30)


def test_one_principal_s_events_arrive_in_commit_order(api: Api, subscription: Subscription) -> None:
    _issue(api, 6, partner=PARTNER_A)
    for n in range(6):
        assert api.consume(f"job-{n}").status_code == 200
    _issue(api, 3, partner=PARTNER_A)
    subscription.pull(1 + 6 + 2 + 1, settle=2.0)
    sequence = [(m.type, m.data.get("run_id")) for m in subscription.distinct()]
    assert sequence == [
        (events.GRANT_ISSUED, None),
        (CONSUMED, "job-0"), (LOW, None),  # 6 -> 5: at the line
        (CONSUMED, "job-1"), (CONSUMED, "job-2"), (CONSUMED, "job-3"), (CONSUMED, "job-4"), (CONSUMED, "job-5"), (EXHAUSTED, None),
        (events.GRANT_ISSUED, None),
    ]


def test_pubsub_stopped_for_30_s_slows_no_request_and_loses_no_event(api: Api, subscription: Subscription, pubsub: Any) -> None:
    if pubsub.process is None:
        pytest.skip("the Pub/Sub emulator was started outside the suite: this test stops its own")
    _issue(api, 200, partner=PARTNER_A)
    usual = []
    for n in range(20):
        started = time.monotonic()
        assert api.consume(f"before-{n}").status_code == 200
        usual.append(time.monotonic() - started)
    assert events.publisher().flush(timeout=15)
    os.kill(pubsub.process.pid, signal.SIGSTOP)
    try:
        stopped_at = time.monotonic()
        during = []
        n = 0
        while time.monotonic() - stopped_at < 30:
            started = time.monotonic()
            response = api.consume(f"during-{n}")
            during.append(time.monotonic() - started)
            assert response.status_code == 200, response.text
            n += 1
            time.sleep(0.2)
    finally:
        os.kill(pubsub.process.pid, signal.SIGCONT)
    # Every request answered in its usual time: Pub/Sub is never waited on (the bounds leave room for a loaded machine,
    # far below the 10 s a publish is given before it is left to the sweeper).
    assert statistics.median(during) <= 2 * statistics.median(usual) + 0.1, (usual, during)
    assert max(during) <= 3 * max(usual) + 1.0, (usual, during)
    # Back: what the publisher gave up is published by the sweeper (as Cloud Scheduler calls it: the endpoint).
    events.publisher().flush(timeout=20)
    swept = api.post("/api/events/sweep", as_user=OPERATOR)
    assert swept.status_code == 200, swept.text
    if swept.json()["unpublished"]:
        assert events.sweep(grace_seconds=0).unpublished == 0
    subscription.pull(1 + 20 + n, timeout=60, settle=2.0)
    delivered = {m.attributes["ce-id"] for m in subscription.distinct()}
    assert {events.event_id(CONSUMED, RUNNER, f"during-{k}") for k in range(n)} <= delivered
    assert {events.event_id(CONSUMED, RUNNER, f"before-{k}") for k in range(20)} <= delivered


KILLED_AFTER_COMMIT = """
import os, sys
from shared import auth, entitlements, events, store
from shared.models import ConsumeRequest
# The process dies the moment its commit returns: before any publish.
store.after_commit[:] = [lambda batch: os._exit(9)]
entitlements.consume(auth.Identity(principal=sys.argv[1], operator=False), ConsumeRequest(run_id=sys.argv[2]))
"""


def test_a_function_killed_between_its_commit_and_its_publish_leaves_its_events_to_the_sweeper(api: Api, subscription: Subscription) -> None:
    _issue(api, 6, partner=PARTNER_A)
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_COMMIT, RUNNER, "job-1"], cwd=REPO_ROOT, env=os.environ.copy(), capture_output=True, text=True, timeout=120)
    assert killed.returncode == 9, killed.stderr
    assert store.read_run(RUNNER, "job-1") is not None  # committed
    consumed_id = events.event_id(CONSUMED, RUNNER, "job-1")
    low_id = events.event_id(LOW, RUNNER, f"{PARTNER_A}|consume|job-1")
    assert _unpublished() == 2  # the run's event and the crossing it decided, both recorded by the commit
    assert events.sweep(grace_seconds=0).published == 2
    subscription.pull(3, settle=1.0)
    assert [m.attributes["ce-id"] for m in subscription.distinct()][1:] == [consumed_id, low_id]
    assert _unpublished() == 0


def test_events_off_records_nothing(api: Api, subscription: Subscription, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(config.ENV_EVENTS, "0")
    config.get_config.cache_clear()
    _issue(api, 2, partner=PARTNER_A)
    assert api.consume("job-1").status_code == 200
    assert store.client().collection(events.EVENTS).get() == []
    monkeypatch.undo()
    config.get_config.cache_clear()


def test_events_add_no_round_trip_to_a_consume(api: Api, subscription: Subscription, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # The outbox rides in the consume's own commit and the publish runs beside the request: a consume that records a
    # run.consumed (and one that also crosses the low line) makes as many round trips as one with events off.
    def consume_lines(runs: int) -> list[dict[str, Any]]:
        capfd.readouterr()
        for n in range(runs):
            assert api.consume(f"trips-{uuid.uuid4().hex[:8]}-{n}").status_code == 200
        out = capfd.readouterr().out
        lines = [json.loads(text) for text in out.splitlines() if text.startswith("{")]
        return [line for line in lines if line.get("endpoint") == "consume"]

    _issue(api, 12, partner=PARTNER_A)
    with_events = consume_lines(10)  # the balance crosses the low line on the way
    assert [m.type for m in subscription.pull(12) if m.type == LOW] == [LOW]
    monkeypatch.setenv(config.ENV_EVENTS, "0")
    config.get_config.cache_clear()
    try:
        without = consume_lines(2)
    finally:
        monkeypatch.undo()
        config.get_config.cache_clear()
    assert {(line["round_trips"], line["commits"]) for line in with_events} == {(3, 1)}
    assert {(line["round_trips"], line["commits"]) for line in without} == {(3, 1)}


def test_partner_a_s_subscription_sees_a_s_events_and_not_b_s(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    # As local mode publishes (emulators before SDK 555 ignore subscription filters): also to each partner's topic.
    monkeypatch.setenv(config.ENV_EVENTS_PARTNER_TOPICS, "1")
    config.get_config.cache_clear()
    try:
        subscription_a = events.create_partner_subscription(PARTNER_A)
        puller = Subscription.__new__(Subscription)
        from google.cloud import pubsub_v1  # type: ignore[attr-defined]

        puller.client, puller.name, puller.received = pubsub_v1.SubscriberClient(), subscription_a, []
        _issue(api, 3, partner=PARTNER_A, principal="a-customer@example.com")
        _issue(api, 3, partner=PARTNER_B, principal="b-customer@example.com")
        puller.pull(1, settle=3.0)
        assert [(m.type, m.attributes["ce-partner"]) for m in puller.distinct()] == [(events.GRANT_ISSUED, PARTNER_A)]
    finally:
        events.publisher().flush(timeout=10)
        monkeypatch.undo()
        config.get_config.cache_clear()


@pytest.fixture(autouse=True)
def _no_leftover_stop(pubsub: Any) -> Iterator[None]:
    """Never leave the Pub/Sub emulator stopped, whatever a test did."""
    yield
    if pubsub.process is not None:
        os.kill(pubsub.process.pid, signal.SIGCONT)


def test_a_revoke_is_one_event_and_its_crossings_fire_in_its_commit(api: Api, subscription: Subscription) -> None:
    grant_id = _issue(api, 10, partner=PARTNER_A).json()["grant_id"]
    first = api.revoke(RUNNER, grant_id, 6, partner=PARTNER_A)  # 10 → 4: at or below the line (5)
    assert first.status_code == 200, first.text
    again = api.revoke(RUNNER, grant_id, 6, partner=PARTNER_A, key=None)
    assert (again.status_code, error_code(again)) == (409, "not_enough_runs")  # refused: no event
    rest = api.revoke(RUNNER, grant_id, partner=PARTNER_A)  # 4 → 0
    assert rest.json()["revoked"] == 4
    subscription.pull(5, settle=2.0)
    distinct = subscription.distinct()
    assert [(m.type, m.data.get("revoked"), m.data.get("balance")) for m in distinct] == [
        (events.GRANT_ISSUED, None, None), (events.GRANT_REVOKED, 6, None), (LOW, None, 4), (events.GRANT_REVOKED, 4, None), (EXHAUSTED, None, None)]
    assert distinct[1].data == {"grant_id": grant_id, "principal": RUNNER, "revoked": 6, "remaining": 4}
    assert {m.attributes["ce-partner"] for m in distinct} == {PARTNER_A}
