"""issue, check and consume over HTTP on the Firestore emulator: every status path, balances, expiry, ledger."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from shared import ledger_store, store
from tests.conftest import ADMIN_TOKEN, RUNNER, Api, error_code

OTHER = "other@acme-prod.iam.gserviceaccount.com"


def _future(days: int = 30) -> str:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(days=days)).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def test_issue_returns_the_grant_and_balance(api: Api) -> None:
    expires = _future()
    response = api.issue(RUNNER.upper(), 5, plan_id="pro", expires_at=expires)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"grant_id", "principal", "plan_id", "runs_total", "expires_at", "issued_by", "balance", "replayed"}
    assert body["principal"] == RUNNER and body["issued_by"] == "admin"
    assert (body["plan_id"], body["runs_total"], body["expires_at"], body["balance"], body["replayed"]) == ("pro", 5, expires, 5, False)
    again = api.issue(RUNNER, 2).json()
    assert again["plan_id"] == "standard" and again["expires_at"] is None and again["balance"] == 7


def test_issue_writes_one_ledger_entry_per_grant(api: Api) -> None:
    grant_id = api.issue(RUNNER, 4).json()["grant_id"]
    entries = ledger_store.ledger_for_grant(grant_id)
    assert [(e["delta"], e["reason"], e["principal"]) for e in entries] == [(4, "issue", RUNNER)]


def test_issue_requires_the_admin_token(api: Api) -> None:
    body = {"principal": RUNNER, "runs_total": 1}
    missing = api.post("/api/entitlement/issue", body, as_user=None)
    assert (missing.status_code, error_code(missing)) == (401, "unauthenticated")
    wrong = api.post("/api/entitlement/issue", body, as_user=None, headers={"X-GBX-ADMIN-TOKEN": ADMIN_TOKEN + "x"})
    assert (wrong.status_code, error_code(wrong)) == (403, "forbidden")
    # A runner's ID token verifies, but the runner is no partner.
    user = api.post("/api/entitlement/issue", body)
    assert (user.status_code, error_code(user)) == (403, "forbidden")


def test_issue_records_the_issuer_of_an_accompanying_id_token(api: Api) -> None:
    headers = {"X-GBX-ADMIN-TOKEN": ADMIN_TOKEN}
    response = api.post("/api/entitlement/issue", {"principal": RUNNER, "runs_total": 1}, as_user="Partner@Example.com", headers=headers)
    assert response.status_code == 200
    (grant,) = store.all_grants(RUNNER)
    assert grant["issued_by"] == "partner@example.com"
    headers["Authorization"] = "Bearer not-a-token"
    bad = api.post("/api/entitlement/issue", {"principal": RUNNER, "runs_total": 1}, as_user=None, headers=headers)
    assert (bad.status_code, error_code(bad)) == (401, "unauthenticated")
    assert len(store.all_grants(RUNNER)) == 1


def test_issue_rejects_out_of_range_values(api: Api) -> None:
    past = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)).replace(tzinfo=None).isoformat() + "Z"
    for fields in (
        {"runs_total": 0},
        {"runs_total": 1_000_001},
        {"runs_total": "3"},
        {"runs_total": 2.0},
        {"runs_total": True},
        {"runs_total": 1, "expires_at": past},
        {"runs_total": 1, "expires_at": "2099-01-01T00:00:00"},
        {"runs_total": 1, "expires_at": "tomorrow"},
        {"runs_total": 1, "expires_at": "2099-01-01T00:00:00+02:00"},
        {"runs_total": 1, "expires_at": "2099-01-01 00:00:00Z"},
        {"runs_total": 1, "expires_at": "2099-01-01t00:00:00z"},
        {"runs_total": 1, "expires_at": "4070908800"},
        {"runs_total": 1, "expires_at": 4070908800},
        {"runs_total": 1, "expires_at": "2099-01-01T00:00:00.123456789Z"},
        {"runs_total": 1, "expires_at": "2099-02-30T00:00:00Z"},
        {"runs_total": 1, "plan_id": ""},
        {"runs_total": 1, "plan_id": "a/b"},
        {"runs_total": 1, "colour": "red"},
    ):
        response = api.issue(RUNNER, **fields)
        assert (response.status_code, error_code(response)) == (400, "invalid_request"), fields
    for principal in ("", "no-at-sign", "a/b@example.com", "x@y"):
        response = api.issue(principal, 1)
        assert (response.status_code, error_code(response)) == (400, "invalid_request"), principal
    assert store.all_grants(RUNNER) == []


def test_idempotency_key_replays_the_first_response(api: Api) -> None:
    first = api.issue(RUNNER, 3, key="order-1")
    assert first.status_code == 200 and first.json()["replayed"] is False
    api.issue(RUNNER, 1)  # balance changes in between: the replay is still the first response
    replay = api.issue(RUNNER.upper(), 3, key="order-1", plan_id="standard")
    assert replay.status_code == 200
    assert replay.json() == {**first.json(), "replayed": True}
    conflict = api.issue(RUNNER, 4, key="order-1")
    assert (conflict.status_code, error_code(conflict)) == (409, "idempotency_conflict")
    assert sorted(g["runs_total"] for g in store.all_grants(RUNNER)) == [1, 3]


def test_idempotency_key_length_is_checked(api: Api) -> None:
    response = api.issue(RUNNER, 1, key="k" * 256)
    assert (response.status_code, error_code(response)) == (400, "invalid_request")
    assert api.issue(RUNNER, 1, key="k" * 255).status_code == 200


def test_check_new_run(api: Api) -> None:
    api.issue(RUNNER, 2)
    response = api.check("job-1")
    assert response.status_code == 200
    assert response.json() == {"run_id": "job-1", "principal": RUNNER, "available": True, "balance": 2, "state": "new"}
    assert store.read_run(RUNNER, "job-1") is None  # check writes nothing


def test_check_without_runs_is_402(api: Api) -> None:
    response = api.check("job-1")
    assert (response.status_code, error_code(response)) == (402, "entitlement_exhausted")


def test_check_after_consume_resumes_without_charge_even_at_zero_balance(api: Api) -> None:
    api.issue(RUNNER, 1)
    assert api.consume("job-1").status_code == 200
    response = api.check("job-1")
    assert response.status_code == 200
    assert response.json() == {"run_id": "job-1", "principal": RUNNER, "available": True, "balance": 0, "state": "consumed"}


def test_consume_charges_once_and_replays(api: Api) -> None:
    api.issue(RUNNER, 2)
    first = api.consume("job-1")
    assert first.status_code == 200
    assert first.json() == {"run_id": "job-1", "principal": RUNNER, "balance": 1, "state": "consumed", "replayed": False}
    again = api.consume("job-1")
    assert again.json() == {"run_id": "job-1", "principal": RUNNER, "balance": 1, "state": "consumed", "replayed": True}
    assert api.check("job-2").json()["balance"] == 1


def test_consume_at_zero_is_402_and_writes_nothing(api: Api) -> None:
    api.issue(RUNNER, 1)
    api.consume("job-1")
    response = api.consume("job-2")
    assert (response.status_code, error_code(response)) == (402, "entitlement_exhausted")
    assert store.read_run(RUNNER, "job-2") is None


@pytest.mark.parametrize("state", ["started", "completed"])
def test_check_and_consume_of_a_started_or_completed_run_are_409(api: Api, state: str) -> None:
    api.issue(RUNNER, 3)
    api.consume("job-1")
    api.run_start("job-1")
    if state == "completed":
        assert api.run_complete("job-1").status_code == 200
    for response in (api.check("job-1"), api.consume("job-1")):
        assert (response.status_code, error_code(response)) == (409, "run_id_reused")
        # The runner client learns the run's state from the body, not from the message.
        assert response.json()["error"]["state"] == state
    assert api.check("job-9").json()["balance"] == 2  # nothing charged again


def test_runs_are_namespaced_per_principal(api: Api) -> None:
    api.issue(RUNNER, 1)
    api.issue(OTHER, 1)
    assert api.consume("shared-id").status_code == 200
    # Another principal's run_id is invisible: the same id is new for OTHER and charges OTHER.
    assert api.check("shared-id", as_user=OTHER).json()["state"] == "new"
    response = api.consume("shared-id", as_user=OTHER)
    assert response.json()["replayed"] is False and response.json()["balance"] == 0


def test_run_ids_that_are_not_firestore_ids_work(api: Api) -> None:
    api.issue(RUNNER, 5)
    for run_id in (".", "..", "__x__", "a:b.c-d_e", "R" * 128):
        response = api.consume(run_id)
        assert response.status_code == 200, run_id
        assert response.json()["run_id"] == run_id
    assert api.check("x").status_code == 402


def test_invalid_run_ids_are_400(api: Api) -> None:
    api.issue(RUNNER, 1)
    for run_id in ("", "R" * 129, "a/b", "a b", "é", 7, None):
        response = api.post("/api/entitlement/consume", {"run_id": run_id})
        assert (response.status_code, error_code(response)) == (400, "invalid_request"), run_id


def test_earliest_expiring_grant_is_spent_first(api: Api) -> None:
    never = api.issue(RUNNER, 1).json()["grant_id"]
    late = api.issue(RUNNER, 1, expires_at=_future(60)).json()["grant_id"]
    soon = api.issue(RUNNER, 1, expires_at=_future(1)).json()["grant_id"]
    order = []
    for n in range(3):
        api.consume(f"job-{n}")
        order.append(store.read_run(RUNNER, f"job-{n}").record.grant_id)
    assert order == [soon, late, never]


def test_expired_grant_is_not_spent(api: Api) -> None:
    grant_id = api.issue(RUNNER, 2, expires_at=_future(1)).json()["grant_id"]
    # Let the grant expire by moving its expiry (and the spend key the queries order by) into the past, as time would.
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    store.client().collection("principals").document(RUNNER).collection("grants").document(grant_id).update({"expires_at": past, "spend_key": past})
    response = api.consume("job-1")
    assert (response.status_code, error_code(response)) == (402, "entitlement_exhausted")
    assert (api.check("job-1").status_code) == 402
    fresh = api.issue(RUNNER, 1).json()
    assert fresh["balance"] == 1  # the expired grant's runs do not count
    assert api.consume("job-1").json()["balance"] == 0


def test_ledger_sums_to_unused_runs_per_grant(api: Api) -> None:
    g1 = api.issue(RUNNER, 3).json()["grant_id"]
    for n in range(2):
        api.consume(f"job-{n}")
    api.consume("job-0")  # a replay charges nothing
    (grant,) = store.all_grants(RUNNER)
    assert grant["remaining"] == 1
    assert sum(e["delta"] for e in ledger_store.ledger_for_grant(g1)) == 1
    assert [e["reason"] for e in ledger_store.ledger_for_principal(RUNNER)].count("consume") == 2


def test_ledger_tool_prints_grants_and_entries_and_checks_sums(api: Api, capsys) -> None:
    from shared import ledger

    api.issue(RUNNER, 2)
    api.consume("job-1")
    capsys.readouterr()
    assert ledger.main([RUNNER.upper()]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [list(line)[0] for line in lines] == ["grant", "ledger", "ledger"]
    assert [line["ledger"]["delta"] for line in lines[1:]] == [-1, 2]  # newest first
    # A grant whose balance was changed without its ledger entry is reported.
    (grant,) = store.all_grants(RUNNER)
    store.client().collection("principals").document(RUNNER).collection("grants").document(grant["grant_id"]).update({"remaining": 5})
    assert ledger.main([RUNNER]) == 1
    assert "ledger sums to 1, grant holds 5" in capsys.readouterr().err


def test_replay_is_answered_after_the_grant_expired(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    from shared import entitlements

    expires = _future(1)
    first = api.issue(RUNNER, 2, key="short-lived", expires_at=expires).json()
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    monkeypatch.setattr(entitlements, "_now", lambda: later)
    replay = api.issue(RUNNER, 2, key="short-lived", expires_at=expires)
    assert replay.status_code == 200 and replay.json() == {**first, "replayed": True}
    fresh = api.issue(RUNNER, 2, key="another-key", expires_at=expires)
    assert (fresh.status_code, error_code(fresh)) == (400, "invalid_request")


def test_large_grants_are_sharded_and_the_ledger_holds_per_shard(api: Api) -> None:
    body = api.issue(RUNNER, 101, plan_id="bulk").json()
    assert body["runs_total"] == 101 and body["balance"] == 101
    grant_id = body["grant_id"]
    shards = {g["grant_id"]: g for g in store.all_grants(RUNNER)}
    assert set(shards) == {grant_id} | {f"{grant_id}-{k}" for k in range(1, 25)}
    assert sorted(g["runs_total"] for g in shards.values()) == [4] * 24 + [5]
    assert {g["group"] for g in shards.values()} == {grant_id} and {g["plan_id"] for g in shards.values()} == {"bulk"}
    assert {g["open"] for g in shards.values()} == {True} and len({g["slot"] for g in shards.values()}) == 25
    assert {g["spend_key"] for g in shards.values()} == {store.FAR_FUTURE}
    # The ledger names the issued grant (as the contract's data model does) and the shard it touched.
    entries = ledger_store.ledger_for_grant(grant_id)
    assert sorted((e["shard"], e["reason"], e["delta"]) for e in entries) == sorted((g, "issue", s["runs_total"]) for g, s in shards.items())
    assert api.check("x").json()["balance"] == 101
    api.consume("job-1")
    run = store.read_run(RUNNER, "job-1").record.model_dump()
    assert run["grant_id"] == grant_id and run["shard"] in shards
    assert sum(e["delta"] for e in ledger_store.ledger_for_grant(grant_id)) == 100
    from shared import ledger

    assert ledger.audit(RUNNER, 10)[2] == []


def test_shard_sizes() -> None:
    assert store.grant_doc_ids("g", 1) == [("g", 1)]
    assert store.grant_doc_ids("g", 7) == [("g", 7)]  # a tiny grant stays one document
    assert store.grant_doc_ids("g", 8) == [("g", 4), ("g-1", 4)]
    assert store.grant_doc_ids("g", 1_000_000) == [("g", 4167)] + [(f"g-{k}", 4167 if k < 160 else 4166) for k in range(1, 240)]
    assert sum(runs for _, runs in store.grant_doc_ids("g", 999_999)) == 999_999
    assert len(store.grant_doc_ids("g", 999_999)) == store.MAX_SHARDS
    # An issue's commit (2 writes a shard, the principal, the issuance record) stays within Firestore's 500 writes.
    assert 2 * store.MAX_SHARDS + 2 <= 500


def test_an_earlier_expiring_small_grant_is_still_spent_before_a_sharded_one(api: Api) -> None:
    api.issue(RUNNER, 200)
    soon = api.issue(RUNNER, 2, expires_at=_future(1)).json()["grant_id"]
    for n in range(2):
        api.consume(f"job-{n}")
        assert store.read_run(RUNNER, f"job-{n}").record.grant_id == soon
