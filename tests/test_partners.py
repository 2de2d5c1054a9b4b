"""Partners by identity: who may issue, see, revoke and export which grants; revoke's exactness under races; export paging."""

from __future__ import annotations

import concurrent.futures
import csv
import datetime as dt
import io
import os
import signal
import threading
from typing import Any

import pytest

from shared import audit, ledger_store, store
from shared.models import format_time
from tests.conftest import OPERATOR, PARTNER, PARTNER_B, RUNNER, Api, error_code

OTHER = "other@acme-prod.iam.gserviceaccount.com"
EXPORT = "/api/entitlement/export"
USAGE = "/api/entitlement/usage"


def _range(minutes: int = 10) -> dict[str, str]:
    now = dt.datetime.now(dt.UTC)
    return {"from": format_time(now - dt.timedelta(minutes=minutes)), "to": format_time(now + dt.timedelta(minutes=minutes))}


def _revoked_runs(grant_id: str) -> int:
    return -sum(e["delta"] for e in ledger_store.ledger_for_grant(grant_id) if e["reason"] == "revoke")


def _audit_is_clean() -> None:
    result = audit.run_audit(page_size=500, budget_seconds=60)
    assert result.mismatches == [], result.mismatches


# ---------------------------------------------------------------- who may call


def test_a_partner_issues_with_its_id_token_and_the_grant_records_it(api: Api) -> None:
    response = api.issue(RUNNER, 3, partner=PARTNER)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["issued_by"], body["balance"]) == (PARTNER, 3)
    assert {g["issued_by"] for g in store.all_grants(RUNNER)} == {PARTNER}
    # Its answer's balance counts its own grants only; the admin's counts all.
    api.issue(RUNNER, 5)
    assert api.issue(RUNNER, 1, partner=PARTNER_B).json()["balance"] == 1
    assert api.issue(RUNNER, 1).json()["balance"] == 3 + 5 + 1 + 1


def test_who_is_refused_on_the_partner_endpoints(api: Api) -> None:
    body = {"principal": RUNNER, "runs_total": 1}
    anonymous = api.post("/api/entitlement/issue", body, as_user=None)
    assert (anonymous.status_code, error_code(anonymous)) == (401, "unauthenticated")
    for who in (RUNNER, OPERATOR):  # a runner is no partner; an operator reads and revokes but does not issue
        refused = api.post("/api/entitlement/issue", body, as_user=who)
        assert (refused.status_code, error_code(refused)) == (403, "forbidden"), who
    grant_id = api.issue(RUNNER, 2, partner=PARTNER).json()["grant_id"]
    refused = api.revoke(RUNNER, grant_id, partner=RUNNER)
    assert (refused.status_code, error_code(refused)) == (403, "forbidden")
    assert api.get(USAGE, {"principal": RUNNER}, partner=RUNNER).status_code == 403
    assert api.get(EXPORT, _range(), partner=RUNNER).status_code == 403
    import requests

    assert requests.get(api.base_url + EXPORT, params=_range(), timeout=10).status_code == 401
    assert store.all_grants(RUNNER)[0]["remaining"] == 2


def test_idempotency_keys_are_each_partners_own(api: Api) -> None:
    a = api.issue(RUNNER, 2, key="order-1", partner=PARTNER)
    b = api.issue(RUNNER, 3, key="order-1", partner=PARTNER_B)
    admin = api.issue(RUNNER, 4, key="order-1")
    assert [r.status_code for r in (a, b, admin)] == [200, 200, 200]
    assert len({a.json()["grant_id"], b.json()["grant_id"], admin.json()["grant_id"]}) == 3
    again = api.issue(RUNNER, 2, key="order-1", partner=PARTNER)
    assert again.json() == {**a.json(), "replayed": True}
    other_body = api.issue(RUNNER, 9, key="order-1", partner=PARTNER)
    assert (other_body.status_code, error_code(other_body)) == (409, "idempotency_conflict")
    assert sum(g["runs_total"] for g in store.all_grants(RUNNER)) == 9


def test_two_partners_sending_one_key_at_once_each_get_their_own_grant(api: Api) -> None:
    start = threading.Barrier(8)

    def issue(i: int) -> dict[str, Any]:
        start.wait()
        partner = (PARTNER, PARTNER_B)[i % 2]
        response = api.issue(RUNNER, 1 + i % 2, key="same-key", partner=partner)
        assert response.status_code == 200, response.text
        return response.json()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(issue, range(8)))
    by_partner: dict[str, set[str]] = {}
    for answer in answers:
        by_partner.setdefault(answer["issued_by"], set()).add(answer["grant_id"])
    assert {p: len(ids) for p, ids in by_partner.items()} == {PARTNER: 1, PARTNER_B: 1}
    assert sorted((g["issued_by"], g["runs_total"]) for g in store.all_grants(RUNNER)) == [(PARTNER, 1), (PARTNER_B, 2)]
    assert sum(1 for a in answers if not a["replayed"]) == 2


# ---------------------------------------------------------------- revoke


def test_revoke_takes_back_exactly_the_runs_asked_for_with_ledger_entries(api: Api) -> None:
    grant_id = api.issue(RUNNER, 10, partner=PARTNER).json()["grant_id"]  # two shard documents
    api.consume("job-1")
    some = api.revoke(RUNNER, grant_id, 3, partner=PARTNER)
    assert some.status_code == 200, some.text
    assert some.json() == {"grant_id": grant_id, "principal": RUNNER, "revoked": 3, "remaining": 6, "balance": 6, "replayed": False}
    too_many = api.revoke(RUNNER, grant_id, 7, partner=PARTNER)
    assert (too_many.status_code, error_code(too_many)) == (409, "not_enough_runs")
    assert too_many.json()["error"]["remaining"] == 6
    rest = api.revoke(RUNNER, grant_id, partner=PARTNER)
    assert rest.json()["revoked"] == 6 and rest.json()["remaining"] == 0 and rest.json()["balance"] == 0
    assert _revoked_runs(grant_id) == 9
    assert all(not g["open"] and g["remaining"] == 0 for g in store.all_grants(RUNNER))
    # Nothing left: revoking all is 0 runs, revoking one is 409, and consume is 402.
    assert api.revoke(RUNNER, grant_id, partner=PARTNER).json()["revoked"] == 0
    assert api.revoke(RUNNER, grant_id, 1, partner=PARTNER).status_code == 409
    assert api.consume("job-2").status_code == 402
    _audit_is_clean()


def test_revoke_of_another_partners_or_an_unknown_grant_is_404(api: Api) -> None:
    mine = api.issue(RUNNER, 2, partner=PARTNER).json()["grant_id"]
    for response in (
        api.revoke(RUNNER, mine, partner=PARTNER_B),
        api.revoke(RUNNER, "0" * 32, partner=PARTNER),
        api.revoke(OTHER, mine, partner=PARTNER),
    ):
        assert (response.status_code, error_code(response)) == (404, "not_found")
    assert store.all_grants(RUNNER)[0]["remaining"] == 2
    # The admin and operators may revoke any grant.
    assert api.revoke(RUNNER, mine, 1).json()["revoked"] == 1
    assert api.revoke(RUNNER, mine, 1, partner=OPERATOR).json()["revoked"] == 1


def test_a_bonus_grant_is_revoked_only_by_the_admin_or_an_operator(api: Api) -> None:
    svg = api.sealed_run()["seal_svg"]
    bonus = api.redeem(svg).json()["grant_id"]
    assert api.revoke(RUNNER, bonus, partner=PARTNER).status_code == 404
    response = api.revoke(RUNNER, bonus, partner=OPERATOR)
    assert response.status_code == 200 and response.json()["revoked"] == 1
    assert _revoked_runs(bonus) == 1


def test_revoke_is_idempotent_with_a_key(api: Api) -> None:
    grant_id = api.issue(RUNNER, 5, partner=PARTNER).json()["grant_id"]
    first = api.revoke(RUNNER, grant_id, 2, partner=PARTNER, key="refund-7")
    again = api.revoke(RUNNER, grant_id, 2, partner=PARTNER, key="refund-7")
    assert again.json() == {**first.json(), "replayed": True}
    conflict = api.revoke(RUNNER, grant_id, 1, partner=PARTNER, key="refund-7")
    assert (conflict.status_code, error_code(conflict)) == (409, "idempotency_conflict")
    # Another partner's same key is its own (and that grant is not its own: 404).
    assert api.revoke(RUNNER, grant_id, 2, partner=PARTNER_B, key="refund-7").status_code == 404
    assert _revoked_runs(grant_id) == 2


@pytest.mark.parametrize(
    "body",
    [
        {"principal": RUNNER, "grant_id": "0" * 32, "runs": 0},
        {"principal": RUNNER, "grant_id": "0" * 32, "runs": 1_000_001},
        {"principal": RUNNER, "grant_id": "0" * 32, "runs": "2"},
        {"principal": RUNNER, "grant_id": "not-a-grant"},
        {"principal": "not an email", "grant_id": "0" * 32},
        {"principal": RUNNER, "grant_id": "0" * 32, "extra": True},
        {"grant_id": "0" * 32},
    ],
)
def test_revoke_refuses_bad_input(api: Api, body: dict[str, Any]) -> None:
    grant_id = api.issue(RUNNER, 2).json()["grant_id"]
    response = api.post("/api/entitlement/revoke", {**body, "grant_id": body["grant_id"]} if "grant_id" in body else body, as_user=PARTNER)
    assert (response.status_code, error_code(response)) == (400, "invalid_request")
    assert store.all_grants(RUNNER)[0]["remaining"] == 2 and _revoked_runs(grant_id) == 0


@pytest.mark.alone
def test_revoke_racing_40_consumers_of_one_sharded_grant_never_gives_a_run_twice(api: Api) -> None:
    runs = 200
    grant_id = api.issue(RUNNER, runs, partner=PARTNER).json()["grant_id"]  # 50 shard documents
    start = threading.Barrier(41)
    revoked: list[int] = []

    def consume(i: int) -> int:
        start.wait()
        charged = 0
        for k in range(8):
            response = api.consume(f"race-{i}-{k}")
            assert response.status_code in (200, 402), response.text
            charged += response.status_code == 200
        return charged

    def revoke() -> None:
        start.wait()
        response = api.revoke(RUNNER, grant_id, partner=PARTNER)
        assert response.status_code == 200, response.text
        revoked.append(response.json()["revoked"])

    with concurrent.futures.ThreadPoolExecutor(41) as pool:
        revoking = pool.submit(revoke)
        consumed = sum(pool.map(consume, range(40)))
        revoking.result()
    left = sum(g["remaining"] for g in store.all_grants(RUNNER))
    assert consumed + revoked[0] + left == runs
    assert _revoked_runs(grant_id) == revoked[0]
    runs_recorded = [e for e in ledger_store.ledger_for_grant(grant_id) if e["reason"] == "consume"]
    assert len(runs_recorded) == consumed
    _audit_is_clean()


def test_a_firestore_outage_mid_revoke_is_503_and_the_keyed_retry_revokes_once(
    api: Api, stoppable_db: Any, short_firestore_budgets: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    grant_id = api.issue(RUNNER, 12, partner=PARTNER).json()["grant_id"]
    pid = stoppable_db.process.pid
    real_commit = store._commit
    timers: list[threading.Timer] = []

    def stall_then_commit(batch: Any) -> Any:
        if not timers:
            os.kill(pid, signal.SIGSTOP)
            timers.append(threading.Timer(20, os.kill, (pid, signal.SIGCONT)))
            timers[0].start()
        return real_commit(batch)

    monkeypatch.setattr(store, "_commit", stall_then_commit)
    try:
        first = api.revoke(RUNNER, grant_id, 5, partner=PARTNER, key="refund-9")
    finally:
        for timer in timers:
            timer.cancel()
        os.kill(pid, signal.SIGCONT)
    assert (first.status_code, error_code(first)) == (503, "unavailable")
    assert first.headers.get("Retry-After")
    retry = api.revoke(RUNNER, grant_id, 5, partner=PARTNER, key="refund-9")
    assert retry.status_code == 200, retry.text
    assert retry.json()["revoked"] == 5 and retry.json()["remaining"] == 7
    assert _revoked_runs(grant_id) == 5
    assert sum(g["remaining"] for g in store.all_grants(RUNNER)) == 7
    _audit_is_clean()


# ---------------------------------------------------------------- usage


def test_usage_by_a_partner_counts_its_own_grants_only(api: Api) -> None:
    soon = format_time(dt.datetime.now(dt.UTC) + dt.timedelta(days=1))
    mine = api.issue(RUNNER, 3, partner=PARTNER, expires_at=soon).json()["grant_id"]
    later = format_time(dt.datetime.now(dt.UTC) + dt.timedelta(days=2))
    api.issue(RUNNER, 4, partner=PARTNER_B, expires_at=later)
    api.issue(RUNNER, 5)
    for k in range(4):  # consume spends the grant that expires first: PARTNER's 3, then one of PARTNER_B's
        assert api.consume(f"job-{k}").status_code == 200
    own = api.get(USAGE, {"principal": RUNNER}, partner=PARTNER).json()
    assert [g["grant_id"] for g in own["grants"]] == [mine]
    assert (own["balance"], own["consumed"], own["bonus"]) == (0, 3, 0)
    everyone = api.get(USAGE, {"principal": RUNNER}, partner=OPERATOR).json()
    assert (everyone["balance"], everyone["consumed"], len(everyone["grants"])) == (8, 4, 3)
    assert api.get(USAGE, {"principal": RUNNER}, partner=PARTNER_B).json()["balance"] == 3
    assert api.get(USAGE, {"principal": RUNNER}).json()["balance"] == 8


# ---------------------------------------------------------------- export


def test_export_lists_the_callers_grants_with_runs_consumed_and_revoked_in_range(api: Api) -> None:
    soon = format_time(dt.datetime.now(dt.UTC) + dt.timedelta(days=1))  # spent before PARTNER_B's, which never expires
    a = api.issue(RUNNER, 3, partner=PARTNER, expires_at=soon).json()["grant_id"]
    b = api.issue(OTHER, 9, partner=PARTNER).json()["grant_id"]
    api.issue(RUNNER, 2, partner=PARTNER_B)
    api.consume("job-1")
    api.consume("job-2")
    api.revoke(OTHER, b, 4, partner=PARTNER)
    api.post("/api/entitlement/consume", {"run_id": "o-1"}, as_user=OTHER)
    response = api.get(EXPORT, _range(), partner=PARTNER)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["next_page_token"] is None
    rows = {row["grant_id"]: row for row in body["rows"]}
    assert list(rows) == [a, b]
    assert rows[a] == {"principal": RUNNER, "grant_id": a, "plan_id": "standard", "issued_by": PARTNER, "runs_total": 3, "remaining": 1,
                       "expires_at": soon, "consumed": 2, "revoked": 0, "bonus": False}
    assert (rows[b]["runs_total"], rows[b]["remaining"], rows[b]["consumed"], rows[b]["revoked"]) == (9, 4, 1, 4)
    # A range that ends before anything happened lists nothing; one that starts after counts nothing.
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    assert api.get(EXPORT, {"from": format_time(past - dt.timedelta(days=1)), "to": format_time(past)}, partner=PARTNER).json()["rows"] == []
    later = {"from": format_time(dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1)), "to": format_time(dt.datetime.now(dt.UTC) + dt.timedelta(minutes=2))}
    assert [(r["consumed"], r["revoked"]) for r in api.get(EXPORT, later, partner=PARTNER).json()["rows"]] == [(0, 0), (0, 0)]
    # The admin and operators see every grant, bonus ones too.
    svg = api.sealed_run("job-3")["seal_svg"]
    api.redeem(svg)
    everything = api.get(EXPORT, _range(), partner=OPERATOR).json()["rows"]
    assert len(everything) == 5 and [r["bonus"] for r in everything][-1] is True and everything[-1]["issued_by"] is None
    assert len(api.get(EXPORT, _range()).json()["rows"]) == 5
    assert len(api.get(EXPORT, _range(), partner=PARTNER).json()["rows"]) == 2


def test_export_counts_a_range_that_cuts_through_a_grants_activity_from_the_ledger(api: Api) -> None:
    import time

    grant_id = api.issue(RUNNER, 8, partner=PARTNER).json()["grant_id"]
    api.consume("job-1")
    api.revoke(RUNNER, grant_id, 1, partner=PARTNER)
    time.sleep(0.05)
    middle = dt.datetime.now(dt.UTC)
    time.sleep(0.05)
    api.consume("job-2")
    api.consume("job-3")
    api.revoke(RUNNER, grant_id, 2, partner=PARTNER)
    end = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1)
    start = middle - dt.timedelta(minutes=5)

    def counts(low: dt.datetime, high: dt.datetime) -> tuple[int, int]:
        (row,) = api.get(EXPORT, {"from": format_time(low), "to": format_time(high)}, partner=PARTNER).json()["rows"]
        return row["consumed"], row["revoked"]

    assert counts(start, end) == (3, 3)  # the whole activity: from the grant's own counters
    assert counts(middle, end) == (2, 2)  # cuts through it: from the ledger
    assert counts(start, middle) == (1, 1)
    assert counts(end, end + dt.timedelta(minutes=1)) == (0, 0)  # after the last run left
    ledger = ledger_store.ledger_for_grant(grant_id)
    assert sum(-e["delta"] for e in ledger if e["reason"] == "consume" and e["at"] >= middle) == 2


def test_export_as_csv_carries_the_next_page_token_in_a_header(api: Api) -> None:
    for _ in range(3):
        api.issue(RUNNER, 1, partner=PARTNER)
    window = _range()
    first = api.get(EXPORT, {**window, "page_size": "2"}, partner=PARTNER, headers={"Accept": "text/csv"})
    assert first.status_code == 200 and first.headers["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(first.text)))
    assert len(rows) == 2 and set(rows[0]) == {"principal", "grant_id", "plan_id", "issued_by", "runs_total", "remaining", "expires_at", "consumed", "revoked", "bonus"}
    token = first.headers["X-Next-Page-Token"]
    second = api.get(EXPORT, {**window, "page_size": "2", "page_token": token}, partner=PARTNER, headers={"Accept": "text/csv"})
    assert len(list(csv.DictReader(io.StringIO(second.text)))) == 1 and "X-Next-Page-Token" not in second.headers


def test_export_pages_list_every_grant_once_while_grants_are_issued_and_spent(api: Api) -> None:
    for k in range(25):
        api.issue(RUNNER if k % 2 else OTHER, 2, partner=PARTNER)
    window = _range(60)
    stop = threading.Event()
    issued_meanwhile: list[str] = []

    def busy() -> None:
        k = 0
        while not stop.is_set() and k < 40:
            issued_meanwhile.append(api.issue(RUNNER, 1, partner=PARTNER).json()["grant_id"])
            api.consume(f"busy-{k}")
            k += 1

    worker = threading.Thread(target=busy)
    worker.start()
    seen: list[str] = []
    token = None
    try:
        while True:
            params = {**window, "page_size": "4"} | ({"page_token": token} if token else {})
            page = api.get(EXPORT, params, partner=PARTNER).json()
            seen += [row["grant_id"] for row in page["rows"]]
            token = page["next_page_token"]
            if token is None:
                break
    finally:
        stop.set()
        worker.join()
    assert len(seen) == len(set(seen))
    all_ids = {g["group"] for g in store.all_grants(RUNNER) + store.all_grants(OTHER)}
    # Every grant issued before the walk ended is listed once (those issued after its last page may be missing).
    assert all_ids - set(seen) <= set(issued_meanwhile)
    assert len(seen) >= 25


@pytest.mark.parametrize(
    "params",
    [
        {"page_size": "0"},
        {"page_size": "1001"},
        {"page_size": "ten"},
        {"from": "2030-01-02T00:00:00Z", "to": "2030-01-01T00:00:00Z"},
        {"from": "2030-01-01T00:00:00Z", "to": "2030-01-01T00:00:00Z"},
        {"to": "2030-01-01T00:00:00Z", "from": None},
        {"page_token": "bm90LWEtdG9rZW4.AAAA"},
        {"unknown": "1"},
    ],
)
def test_export_refuses_bad_queries(api: Api, params: dict[str, Any]) -> None:
    query = {"from": "2026-01-01T00:00:00Z", "to": "2036-01-01T00:00:00Z", **params}
    response = api.get(EXPORT, {k: v for k, v in query.items() if v is not None}, partner=PARTNER)
    assert (response.status_code, error_code(response)) == (400, "invalid_request"), response.text


def test_a_page_token_works_only_for_its_own_caller_and_query(api: Api) -> None:
    for _ in range(3):
        api.issue(RUNNER, 1, partner=PARTNER)
        api.issue(RUNNER, 1, partner=PARTNER_B)
    window = _range()
    token = api.get(EXPORT, {**window, "page_size": "1"}, partner=PARTNER).json()["next_page_token"]
    assert token
    assert api.get(EXPORT, {**window, "page_size": "1", "page_token": token}, partner=PARTNER).status_code == 200
    for partner, params in (
        (PARTNER_B, window),  # another partner
        (None, window),  # the admin
        (PARTNER, {**window, "to": format_time(dt.datetime.now(dt.UTC) + dt.timedelta(hours=2))}),  # another query
    ):
        refused = api.get(EXPORT, {**params, "page_size": "1", "page_token": token}, partner=partner)
        assert (refused.status_code, error_code(refused)) == (400, "invalid_request")
    payload, _, mac = token.partition(".")
    tampered = payload[:-2] + ("A" if payload[-2] != "A" else "B") + payload[-1] + "." + mac
    refused = api.get(EXPORT, {**window, "page_size": "1", "page_token": tampered}, partner=PARTNER)
    assert (refused.status_code, error_code(refused)) == (400, "invalid_request")


# ---------------------------------------------------------------- grants written before partners


def test_grants_written_before_partners_read_as_the_admins_and_are_backfilled(api: Api) -> None:
    from shared import backfill

    old = {"principal": RUNNER, "plan_id": "standard", "created_at": dt.datetime.now(dt.UTC), "source": "issue", "ref": None,
           "expires_at": None, "open": True, "spend_key": store.FAR_FUTURE, "slot": 0.5}
    # An earlier version's sharded grant of 2 x 4 runs issued with the admin token alone, and a bonus grant.
    for doc_id, group, plan, slot in (("0" * 32, "0" * 32, "standard", 0.2), ("0" * 32 + "-1", "0" * 32, "standard", 0.7), ("b" * 32, "b" * 32, "seal_rerun", 0.4)):
        runs = 1 if plan == "seal_rerun" else 4
        store.grant_ref(RUNNER, doc_id).set({**old, "group": group, "plan_id": plan, "runs_total": runs, "remaining": runs, "slot": slot, "issued_by": None})
    # Before the backfill: the admin revokes it (issuer read as `admin`); the export does not list it yet.
    assert api.revoke(RUNNER, "0" * 32, 1).json()["revoked"] == 1
    assert api.get(EXPORT, _range()).json()["rows"] == []
    assert backfill.backfill() == 3
    assert backfill.backfill() == 0
    docs = {g["grant_id"]: (g["issued_by"], g["lead"], g["shards"]) for g in store.all_grants(RUNNER)}
    assert docs == {"0" * 32: ("admin", True, 2), "0" * 32 + "-1": ("admin", False, 1), "b" * 32: (None, True, 1)}
    rows = api.get(EXPORT, _range()).json()["rows"]
    assert sorted((r["grant_id"], r["issued_by"], r["runs_total"], r["remaining"], r["bonus"]) for r in rows) == [
        ("0" * 32, "admin", 8, 7, False), ("b" * 32, None, 1, 1, True)]
    assert api.revoke(RUNNER, "0" * 32, partner=PARTNER).status_code == 404


def test_a_revoke_that_keeps_losing_races_fences_the_grant_and_wins(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three commits lost to consumers, then the fence: consumers draw elsewhere, the revoke's commit lifts it."""
    soon = format_time(dt.datetime.now(dt.UTC) + dt.timedelta(days=1))  # spent first, so the consumers below race the revoke
    grant_id = api.issue(RUNNER, 40, partner=PARTNER, expires_at=soon).json()["grant_id"]
    other = api.issue(RUNNER, 5, partner=PARTNER_B).json()["grant_id"]
    real_commit = store._commit
    lost: list[int] = []

    def consume_first(batch: Any) -> Any:
        # Before each of the revoke's first three commits a consumer lands on the grant: the revoke loses its race.
        if len(lost) < 3 and any("/revocations/" in write.update.name for write in batch._write_pbs):
            lost.append(1)
            monkeypatch.setattr(store, "_commit", real_commit)
            assert api.consume(f"race-{len(lost)}").status_code == 200
            monkeypatch.setattr(store, "_commit", consume_first)
        return real_commit(batch)

    monkeypatch.setattr(store, "_commit", consume_first)
    response = api.revoke(RUNNER, grant_id, partner=PARTNER)
    monkeypatch.setattr(store, "_commit", real_commit)
    assert response.status_code == 200, response.text
    assert len(lost) == 3
    docs = [g for g in store.all_grants(RUNNER) if g["group"] == grant_id]
    assert all("fence" not in g and g["remaining"] == 0 and g["open"] is False for g in docs)
    consumed_here = sum(1 for e in ledger_store.ledger_for_grant(grant_id) if e["reason"] == "consume")
    assert response.json()["revoked"] + consumed_here == 40
    # The other grant was never fenced, and spending goes on from it.
    assert api.consume("after").status_code == 200
    assert store.read_run(RUNNER, "after").record.grant_id == other
    _audit_is_clean()


def test_a_stale_fence_is_lifted_by_the_ledger_audit(api: Api) -> None:
    from shared import partner_store

    grant_id = api.issue(RUNNER, 8, partner=PARTNER).json()["grant_id"]
    grant = partner_store.read_grant(RUNNER, grant_id)
    assert grant is not None
    # A revoke that fenced the grant and died: nothing can be spent from it meanwhile.
    partner_store.commit_fence(grant, revoke_id="dead", now=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=partner_store.FENCE_SECONDS + 1))
    assert api.consume("job-1").status_code == 402
    _audit_is_clean()
    docs = [g for g in store.all_grants(RUNNER) if g["group"] == grant_id]
    assert all("fence" not in g and g["open"] is True for g in docs)
    assert api.consume("job-1").status_code == 200
