"""Fan-out: hundreds of runners of one principal consuming at once, and the edges of the shard policy."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from shared import entitlements, ledger_store, store
from tests.conftest import RUNNER, Api, error_code

# Hundreds of concurrent runners: run alone (pytest.ini), not beside another file's tests on a 2-core machine.
pytestmark = pytest.mark.alone


def _future(days: int) -> str:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(days=days)).isoformat().replace("+00:00", "Z")


def _together(count: int, call: Callable[[int], list[requests.Response]]) -> list[requests.Response]:
    """`count` threads released at once, each making its calls; every response."""
    barrier = threading.Barrier(count)

    def run(n: int) -> list[requests.Response]:
        barrier.wait(timeout=60)
        return call(n)

    with ThreadPoolExecutor(max_workers=count) as pool:
        return [response for responses in pool.map(run, range(count)) for response in responses]


def _consume_as_gbx_does(api: Api, run_id: str) -> tuple[requests.Response, int]:
    """consume, retried with the same run_id on a 503 as the runner client retries it; the last answer and how many
    503s came before it. On two cores the emulator serves hundreds of concurrent reads slowly enough that a read can
    exhaust its retry budget: the contract's answer to that is 503 + Retry-After, and a retry may not charge twice."""
    for attempt in range(6):
        response = api.consume(run_id)
        if response.status_code != 503:
            return response, attempt
        time.sleep(min(float(response.headers.get("Retry-After", "1")), 2.0))
    return response, attempt


def _assert_ledger_exact(principal: str) -> None:
    """Every shard's ledger sums to its unused runs, and no run_id was charged twice."""
    grants = store.all_grants(principal)
    entries = ledger_store.ledger_for_principal(principal, limit=100_000)
    for grant in grants:
        assert sum(e["delta"] for e in entries if e["shard"] == grant["grant_id"]) == grant["remaining"]
        assert grant["open"] is (grant["remaining"] > 0)
    charges = Counter(e["ref"] for e in entries if e["reason"] == "consume")
    assert all(n == 1 for n in charges.values())
    runs = list(store.client().collection("principals").document(principal).collection("runs").get())
    assert {r.get("run_id") for r in runs} == set(charges)


def test_200_concurrent_consumers_of_one_principal_end_exact(api: Api) -> None:
    group = api.issue(RUNNER, 400).json()["grant_id"]
    assert len(store.all_grants(RUNNER)) == 100

    retried: set[int] = set()

    def runner(n: int) -> list[requests.Response]:
        answers = []
        for k in range(2):
            response, unavailable = _consume_as_gbx_does(api, f"task-{n}-{k}")
            answers.append(response)
            if unavailable:
                retried.add(id(response))
        return answers

    responses = _together(200, runner)
    assert Counter(r.status_code for r in responses) == {200: 400}
    assert all(0 <= r.json()["balance"] <= 399 for r in responses)
    # A retry after a 503 may find its first attempt committed (replayed); an unretried consume never replays.
    assert all(r.json()["replayed"] is False for r in responses if id(r) not in retried)
    assert {g["remaining"] for g in store.all_grants(RUNNER)} == {0}
    assert sum(e["delta"] for e in ledger_store.ledger_for_grant(group)) == 0
    _assert_ledger_exact(RUNNER)
    assert api.check("next").status_code == 402


def test_100_runners_race_for_the_last_20_runs(api: Api) -> None:
    api.issue(RUNNER, 20)
    responses = _together(100, lambda n: [_consume_as_gbx_does(api, f"task-{n}")[0]])
    assert Counter(r.status_code for r in responses) == {200: 20, 402: 80}
    assert all(error_code(r) == "entitlement_exhausted" for r in responses if r.status_code == 402)
    _assert_ledger_exact(RUNNER)
    assert sum(g["remaining"] for g in store.all_grants(RUNNER)) == 0


def test_tiny_grants_stay_one_document_and_close_when_spent(api: Api) -> None:
    one = api.issue(RUNNER, 1).json()["grant_id"]
    seven = api.issue(RUNNER, 7).json()["grant_id"]
    assert sorted(g["grant_id"] for g in store.all_grants(RUNNER)) == sorted([one, seven])
    balances = [api.consume(f"job-{n}").json()["balance"] for n in range(8)]
    assert balances == [7, 6, 5, 4, 3, 2, 1, 0]
    assert {(g["remaining"], g["open"]) for g in store.all_grants(RUNNER)} == {(0, False)}
    assert api.consume("job-8").status_code == 402
    _assert_ledger_exact(RUNNER)


def test_a_shard_that_ran_dry_is_never_drawn_while_others_have_runs(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    group = api.issue(RUNNER, 8).json()["grant_id"]  # two shards of 4
    slots = {g["grant_id"]: g["slot"] for g in store.all_grants(RUNNER)}
    last = max(slots, key=slots.__getitem__)
    monkeypatch.setattr(entitlements.random, "random", lambda: 0.0)  # from slot 0 upwards: the open shard with the lowest slot
    shards = []
    for n in range(8):
        response = api.consume(f"job-{n}")
        assert response.status_code == 200 and response.json()["balance"] == 7 - n
        shards.append(store.read_run(RUNNER, f"job-{n}").record.shard)
    # The lowest slot's shard until it ran dry and closed, then the other: never a lost race on an empty one.
    assert shards == [min(slots, key=slots.__getitem__)] * 4 + [last] * 4 and set(slots) == {group, f"{group}-1"}
    assert api.consume("job-8").status_code == 402
    _assert_ledger_exact(RUNNER)


def test_a_draw_past_the_last_slot_charges_the_first_shard_in_spending_order(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    group = api.issue(RUNNER, 40).json()["grant_id"]
    draws = iter([1.0, 0.0])  # a slot above every shard's, then upwards
    monkeypatch.setattr(entitlements.random, "random", lambda: next(draws))
    first = store.read_first_to_spend(RUNNER, dt.datetime.now(dt.UTC))
    assert first is not None and first.group == group
    assert api.consume("job-1").status_code == 200
    assert store.read_run(RUNNER, "job-1").record.shard == first.grant_id
    _assert_ledger_exact(RUNNER)


def test_many_small_grants_expiring_together_absorb_a_fan_out(api: Api) -> None:
    groups = {api.issue(RUNNER, 2).json()["grant_id"] for _ in range(40)}  # one document each
    responses = _together(100, lambda n: [_consume_as_gbx_does(api, f"task-{n}")[0]])
    assert Counter(r.status_code for r in responses) == {200: 80, 402: 20}
    assert {g["group"] for g in store.all_grants(RUNNER)} == groups
    assert {(g["remaining"], g["open"]) for g in store.all_grants(RUNNER)} == {(0, False)}
    _assert_ledger_exact(RUNNER)


def test_spending_order_holds_across_sharded_grants_under_concurrency(api: Api) -> None:
    never = api.issue(RUNNER, 100).json()["grant_id"]  # 25 shards, never expires
    later = api.issue(RUNNER, 40, expires_at=_future(2)).json()["grant_id"]  # 10 shards
    sooner = api.issue(RUNNER, 8, expires_at=_future(1)).json()["grant_id"]  # 2 shards
    responses = _together(30, lambda n: [_consume_as_gbx_does(api, f"task-{n}")[0]])
    assert Counter(r.status_code for r in responses) == {200: 30}
    # A grant is spent only once every shard of the one expiring before it is dry.
    left = Counter()
    for grant in store.all_grants(RUNNER):
        left[grant["group"]] += grant["remaining"]
    assert left == {sooner: 0, later: 40 - 22, never: 100}
    _assert_ledger_exact(RUNNER)


def test_issue_and_expiry_while_runners_fan_out(api: Api) -> None:
    first = api.issue(RUNNER, 200).json()["grant_id"]
    issued: list[str] = []

    def runner(n: int) -> list[requests.Response]:
        if n == 0:  # a partner tops up, with an earlier expiry, while the runners consume
            issued.append(api.issue(RUNNER, 12, expires_at=_future(1)).json()["grant_id"])
            return []
        return [_consume_as_gbx_does(api, f"task-{n}-{k}")[0] for k in range(2)]

    responses = _together(61, runner)
    assert Counter(r.status_code for r in responses) == {200: 120}
    assert sum(g["remaining"] for g in store.all_grants(RUNNER)) == 212 - 120
    _assert_ledger_exact(RUNNER)
    # From now on the top-up is spent first: it expires first.
    (topup,) = issued
    topup_left = sum(g["remaining"] for g in store.all_grants(RUNNER) if g["group"] == topup)
    for n in range(topup_left):
        assert api.consume(f"after-{n}").status_code == 200
        assert store.read_run(RUNNER, f"after-{n}").record.grant_id == topup
    # Every shard of the first grant expires (as time would): the balance is empty and consume says so.
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    for grant in store.all_grants(RUNNER):
        if grant["group"] == first:
            store.grant_ref(RUNNER, grant["grant_id"]).update({"expires_at": past, "spend_key": past})
    assert api.check("late").status_code == 402
    response = api.consume("late")
    assert (response.status_code, error_code(response)) == (402, "entitlement_exhausted")
    _assert_ledger_exact(RUNNER)


def test_a_lost_reply_on_a_sharded_grant_is_recognised_while_others_drain_its_shards(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    api.issue(RUNNER, 40)  # 10 shards
    real_commit = store._commit
    lost: list[str] = []

    def others_consume_meanwhile() -> None:
        # Other runners charge the same shards before the lost reply's request reads again.
        for n in range(6):
            assert api.consume(f"other-{n}").status_code == 200

    def commit_then_lose_reply(batch):  # type: ignore[no-untyped-def]
        result = real_commit(batch)
        if not lost:
            lost.append("lost")
            others_consume_meanwhile()
            raise store.CommitUncertain("DeadlineExceeded")
        return result

    monkeypatch.setattr(store, "_commit", commit_then_lose_reply)
    response = api.consume("job-1")
    assert lost and response.status_code == 200
    assert response.json()["replayed"] is False and response.json()["balance"] == 40 - 7
    assert sum(g["remaining"] for g in store.all_grants(RUNNER)) == 33
    assert api.consume("job-1").json()["replayed"] is True
    _assert_ledger_exact(RUNNER)


def test_a_spent_shard_still_marked_open_is_closed_and_passed_by(api: Api) -> None:
    spent = api.issue(RUNNER, 1, expires_at=_future(1)).json()["grant_id"]
    assert api.consume("job-1").status_code == 200
    # As an instance of an earlier version would leave it during a rollout: no runs, still marked open.
    store.grant_ref(RUNNER, spent).update({"open": True})
    later = api.issue(RUNNER, 2).json()["grant_id"]
    response = api.consume("job-2")
    assert response.status_code == 200 and response.json()["balance"] == 1
    assert store.read_run(RUNNER, "job-2").record.grant_id == later
    assert store.grant_ref(RUNNER, spent).get().get("open") is False
    _assert_ledger_exact(RUNNER)


def test_grants_written_before_the_fan_out_design_are_backfilled_then_spent_in_order(api: Api) -> None:
    from shared import backfill

    expires = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    old = {"principal": RUNNER, "plan_id": "standard", "created_at": dt.datetime.now(dt.UTC), "source": "issue", "ref": None, "issued_by": None}
    # An earlier version's sharded grant (two documents of 32) and a small one expiring sooner, with their ledger.
    for doc_id, group, runs, expiry in (("big", "big", 32, None), ("big-1", "big", 32, None), ("soon", "soon", 3, expires)):
        store.grant_ref(RUNNER, doc_id).set({**old, "group": group, "runs_total": runs, "remaining": runs, "expires_at": expiry})
        store.client().collection("ledger").document(f"issue-{doc_id}").set(
            {"principal": RUNNER, "grant": group, "shard": doc_id, "delta": runs, "reason": "issue", "ref": doc_id, "at": dt.datetime.now(dt.UTC)}
        )
    assert api.check("job-0").status_code == 402  # invisible to the spending query until backfilled
    assert backfill.backfill(page_size=2) == 3  # paged: a page of 2, then the rest
    assert backfill.backfill(page_size=2) == 0  # idempotent
    fields = {g["grant_id"]: (g["open"], g["spend_key"], 0 <= g["slot"] < 1) for g in store.all_grants(RUNNER)}
    assert fields == {"big": (True, store.FAR_FUTURE, True), "big-1": (True, store.FAR_FUTURE, True), "soon": (True, expires, True)}
    assert api.check("job-0").json()["balance"] == 67
    groups = []
    for n in range(5):
        assert api.consume(f"job-{n}").status_code == 200
        groups.append(store.read_run(RUNNER, f"job-{n}").record.grant_id)
    assert groups[:3] == ["soon"] * 3 and set(groups[3:]) == {"big"}
    _assert_ledger_exact(RUNNER)


def test_the_backfill_command_reports_what_it_did_and_why_it_could_not_run(api: Api) -> None:
    import os
    import subprocess
    import sys

    from shared.config import REPO_ROOT

    api.issue(RUNNER, 3)
    command = [sys.executable, "-m", "shared.backfill", "--project", os.environ["GOOGLE_CLOUD_PROJECT"]]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (0, "backfill: 0 grant documents updated, 0 seals from before the seal log queued for it\n")  # this version: nothing to add
    env = {k: v for k, v in os.environ.items() if k not in ("FIRESTORE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT")}
    refused = subprocess.run(command[:3], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and refused.stderr == "backfill: could not run: no project (pass --project or set GOOGLE_CLOUD_PROJECT)\n"
