"""Races on one principal end exactly: every request gets its correct answer, none a 5xx."""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from shared import ledger_store, store
from tests.conftest import RUNNER, Api


def _together(count: int, call: Callable[[int], requests.Response]) -> list[requests.Response]:
    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(call, range(count)))


def test_40_consumers_of_10_runs(api: Api) -> None:
    grant_id = api.issue(RUNNER, 10).json()["grant_id"]
    responses = _together(40, lambda n: api.consume(f"job-{n}"))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 10 + [402] * 30
    assert all(r.json()["error"]["code"] == "entitlement_exhausted" for r in responses if r.status_code == 402)
    shards = store.all_grants(RUNNER)  # 10 runs: two shards of 5
    assert len(shards) == 2 and {g["remaining"] for g in shards} == {0} and {g["open"] for g in shards} == {False}
    ledger = ledger_store.ledger_for_grant(grant_id)
    assert sum(e["delta"] for e in ledger) == 10 - 10
    assert sorted(e["reason"] for e in ledger) == ["consume"] * 10 + ["issue"] * 2
    charged = {r.json()["run_id"] for r in responses if r.status_code == 200}
    assert {e["ref"] for e in ledger if e["reason"] == "consume"} == charged
    assert all(store.read_run(RUNNER, run_id).state == "consumed" for run_id in charged)


def test_20_consumes_of_one_run_id_charge_once(api: Api) -> None:
    grant_id = api.issue(RUNNER, 5).json()["grant_id"]
    responses = _together(20, lambda n: api.consume("same-run"))
    assert [r.status_code for r in responses] == [200] * 20
    assert sorted(r.json()["replayed"] for r in responses) == [False] + [True] * 19
    assert sum(g["remaining"] for g in store.all_grants(RUNNER)) == 4
    assert sum(e["delta"] for e in ledger_store.ledger_for_grant(grant_id)) == 4


def test_concurrent_issues_with_one_idempotency_key_make_one_grant(api: Api) -> None:
    responses = _together(10, lambda n: api.issue(RUNNER, 7, key="order-42"))
    assert [r.status_code for r in responses] == [200] * 10
    grant_ids = {r.json()["grant_id"] for r in responses}
    assert len(grant_ids) == 1
    assert sorted(r.json()["replayed"] for r in responses) == [False] + [True] * 9
    grants = store.all_grants(RUNNER)
    assert [g["runs_total"] for g in grants] == [7]
    assert [e["delta"] for e in ledger_store.ledger_for_principal(RUNNER)] == [7]


def test_concurrent_consumes_across_several_grants(api: Api) -> None:
    for runs in (3, 4, 5):
        api.issue(RUNNER, runs)
    responses = _together(30, lambda n: api.consume(f"job-{n}"))
    assert sorted(r.status_code for r in responses) == [200] * 12 + [402] * 18
    for grant in store.all_grants(RUNNER):
        assert grant["remaining"] == 0
        assert sum(e["delta"] for e in ledger_store.ledger_for_grant(grant["grant_id"])) == 0


def test_retries_racing_for_the_last_run_all_replay(api: Api) -> None:
    # Each round: one run left, ten copies of one consume at once. The loser copies must replay
    # (200, replayed) — a 402 would tell a runner it was not charged when it was.
    for round_ in range(8):
        principal = f"racer-{round_}@acme-prod.iam.gserviceaccount.com"
        api.issue(principal, 1)
        responses = _together(10, lambda n, principal=principal: api.consume("same", as_user=principal))
        assert [r.status_code for r in responses] == [200] * 10, [r.text for r in responses if r.status_code != 200]
        assert sorted(r.json()["replayed"] for r in responses) == [False] + [True] * 9
        checks = _together(5, lambda n, principal=principal: api.check("same", as_user=principal))
        assert [r.json()["state"] for r in checks] == ["consumed"] * 5


def test_100_consumers_of_a_sharded_grant_spread_over_its_shards(api: Api) -> None:
    group = api.issue(RUNNER, 96).json()["grant_id"]
    responses = _together(100, lambda n: api.consume(f"job-{n}"))
    assert sorted(r.status_code for r in responses) == [200] * 96 + [402] * 4
    shards = store.all_grants(RUNNER)
    assert len(shards) == 24 and {g["group"] for g in shards} == {group}
    entries = ledger_store.ledger_for_grant(group)
    for shard in shards:
        assert shard["remaining"] == 0
        assert sum(e["delta"] for e in entries if e["shard"] == shard["grant_id"]) == 0
    charged = {r.json()["run_id"] for r in responses if r.status_code == 200}
    used = {store.read_run(RUNNER, run_id).record.shard for run_id in charged}
    assert used == {g["grant_id"] for g in shards}
    # Balances reported by concurrent consumers are read in the attempt that charged, minus the charge:
    # never negative, never above what was left before this consume.
    assert all(0 <= r.json()["balance"] <= 95 for r in responses if r.status_code == 200)


def test_many_concurrent_lifecycles_on_one_instance(api: Api, capfd: pytest.CaptureFixture[str]) -> None:
    """Functions are deployed with request concurrency: one process serves many lifecycles at once, sharing
    its config, clients, signer and certificate cache. Every run is charged once, sealed once, and logged whole."""
    principals = [f"runner-{p}@acme-prod.iam.gserviceaccount.com" for p in range(4)]
    for principal in principals:
        assert api.issue(principal, 4).status_code == 200
    capfd.readouterr()

    def lifecycle(n: int) -> dict[str, int | str]:
        principal, run_id = principals[n % 4], f"run-{n // 4}"
        statuses = [api.check(run_id, as_user=principal).status_code, api.consume(run_id, as_user=principal).status_code]
        statuses.append(api.run_start(run_id, as_user=principal).status_code)
        sealed = api.run_complete(run_id, as_user=principal)
        statuses.append(sealed.status_code)
        statuses.append(api.verify(sealed.json()["seal_svg"], as_user=principal).status_code)
        assert statuses == [200] * 5, (principal, run_id, statuses)
        assert api.verify(sealed.json()["seal_svg"]).json()["status"] == "VERIFIED"
        return {"seal_id": sealed.json()["seal_id"], "principal": principal}

    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(lifecycle, range(12)))  # 3 runs for each of 4 principals, all at once
    assert len({r["seal_id"] for r in results}) == 12
    for principal in principals:
        assert api.check("next", as_user=principal).json()["balance"] == 1
        assert sum(e["delta"] for e in ledger_store.ledger_for_principal(principal)) == 1
    lines = capfd.readouterr().out.split("\n")
    assert lines[-1] == ""
    entries = [json.loads(line) for line in lines[:-1]]
    assert len([e for e in entries if e.get("status") == 200]) == 12 * 6 + 4
