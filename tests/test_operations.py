"""Operating it: the ledger audit (paged, resumable, exact) and usage for partners, over HTTP on the emulator."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from typing import Any

import pytest
import requests

from shared import audit, config, ledger_store, store
from shared.models import USAGE_CSV_COLUMNS, format_time
from tests.conftest import ADMIN_TOKEN, OPERATOR, RUNNER, Api, error_code

OTHER = "nightly@beta-prod.iam.gserviceaccount.com"
AUDITOR = "gbx-audit@gbx-test.iam.gserviceaccount.com"
USAGE = "/api/entitlement/usage"
AUDIT = "/api/ledger/audit"


def _grant_docs() -> list[tuple[str, str, int]]:
    """(principal, document id, remaining) of every grant document."""
    return sorted(
        (snap.reference.parent.parent.id, snap.id, (snap.to_dict() or {})["remaining"])
        for snap in store.client().collection_group(store.GRANTS).get()
    )


def _log_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def audit_call(api: Api, as_user: str | None = OPERATOR) -> requests.Response:
    return api.post(AUDIT, as_user=as_user)


def usage_call(api: Api, query: str = f"principal={RUNNER}", *, admin: str | None = ADMIN_TOKEN, as_user: str | None = None,
               accept: str | None = None) -> requests.Response:
    headers = {}
    if admin is not None:
        headers["X-GBX-ADMIN-TOKEN"] = admin
    if as_user is not None:
        headers["Authorization"] = f"Bearer {api.token(as_user)}"
    if accept is not None:
        headers["Accept"] = accept
    return requests.get(f"{api.base_url}{USAGE}?{query}", headers=headers, timeout=60)


def honest_history(api: Api) -> None:
    """Two principals, grants of one and several documents, consumes, a sealed run and its redeemed seal."""
    assert api.issue(RUNNER, 5).status_code == 200
    assert api.issue(RUNNER, 12, plan_id="bulk").status_code == 200  # three documents of 4 runs
    assert api.issue(OTHER, 2).status_code == 200
    for n in range(4):
        assert api.consume(f"job-{n}").status_code == 200
    assert api.consume("o-1", as_user=OTHER).status_code == 200
    bundle = api.sealed_run("sealed-1", as_user=OTHER)
    assert api.redeem(bundle["seal_svg"], as_user=OTHER).status_code == 200


# ---------------------------------------------------------------- the audit


def test_the_audit_is_clean_on_honest_data(api: Api) -> None:
    honest_history(api)
    documents = _grant_docs()
    assert len(documents) == 7  # 5, 3 shards of 12, 2, the sealed run's 1 and the bonus run
    response = audit_call(api)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["checked_grants"] == len(documents) and body["mismatches"] == []
    assert body["pass_complete"] is True and body["pass_checked_grants"] == len(documents) and body["pass_mismatches"] == 0


def test_the_audit_names_exactly_the_grant_changed_behind_the_ledger_s_back(api: Api, capfd: pytest.CaptureFixture[str]) -> None:
    honest_history(api)
    (bulk,) = [g for g in store.all_grants(RUNNER) if g["plan_id"] == "bulk" and g["grant_id"] != g["group"]][:1]
    store.grant_ref(RUNNER, bulk["grant_id"]).update({"remaining": bulk["remaining"] + 7})
    capfd.readouterr()
    body = audit_call(api).json()
    assert body["mismatches"] == [{"principal": RUNNER, "grant_id": bulk["group"], "shard": bulk["grant_id"],
                                   "expected": bulk["remaining"], "found": bulk["remaining"] + 7}]
    assert body["checked_grants"] == 7 and body["pass_mismatches"] == 1
    errors = [line for line in _log_lines(capfd.readouterr().out) if line.get("event") == "ledger_mismatch"]
    assert len(errors) == 1 and errors[0]["severity"] == "ERROR"
    assert (errors[0]["principal"], errors[0]["grant_id"], errors[0]["shard"]) == (RUNNER, bulk["group"], bulk["grant_id"])
    # The ledger tool runs the same check on one principal.
    from shared import ledger

    assert ledger.audit(RUNNER, 10)[2] == [
        f"grant {bulk['group']} (document {bulk['grant_id']}): ledger sums to {bulk['remaining']}, grant holds {bulk['remaining'] + 7}"]
    assert ledger.audit(OTHER, 10)[2] == []


def test_a_split_moves_runs_between_documents_and_stays_clean(api: Api) -> None:
    """The consume rewrite may split a shard: -m on the old document, +m on a new one of the same group, reason `split`."""
    grant_id = api.issue(RUNNER, 5).json()["grant_id"]
    api.consume("job-1")
    batch = store.client().batch()
    new_id = f"{grant_id}-9"
    fields = {**store.grant_ref(RUNNER, grant_id).get().to_dict(), "runs_total": 2, "remaining": 2}
    batch.update(store.grant_ref(RUNNER, grant_id), {"remaining": 2})
    batch.create(store.grant_ref(RUNNER, new_id), fields)
    for shard, delta in ((grant_id, -2), (new_id, 2)):
        batch.create(store.client().collection(store.LEDGER).document(f"split-{shard}"),
                     {"principal": RUNNER, "grant": grant_id, "shard": shard, "delta": delta, "reason": "split", "ref": new_id,
                      "at": store.firestore.SERVER_TIMESTAMP})
    batch.commit()
    body = audit_call(api).json()
    assert (body["checked_grants"], body["mismatches"]) == (2, [])
    usage = usage_call(api).json()
    assert (usage["consumed"], usage["bonus"], usage["balance"]) == (1, 0, 4), "a split counts as nothing"
    assert [(g["grant_id"], g["remaining"]) for g in usage["grants"]] == [(grant_id, 4)]


def test_the_audit_pages_and_resumes_from_its_cursor(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """A budget of 0 s makes each call check exactly one page; the cursor in Firestore carries the pass across calls."""
    honest_history(api)
    tampered = _grant_docs()[4]  # a document in the third page of two
    store.grant_ref(tampered[0], tampered[1]).update({"remaining": tampered[2] - 1})
    monkeypatch.setenv(config.ENV_AUDIT_PAGE_SIZE, "2")
    monkeypatch.setenv(config.ENV_AUDIT_BUDGET, "0.000001")
    config.get_config.cache_clear()
    try:
        calls = [audit_call(api).json() for _ in range(4)]
        state, _ = ledger_store.read_audit_state()
        following = audit_call(api).json()
    finally:
        monkeypatch.undo()
        config.get_config.cache_clear()
    assert [c["checked_grants"] for c in calls] == [2, 2, 2, 1]
    assert [c["pass_complete"] for c in calls] == [False, False, False, True]
    assert [c["pass_checked_grants"] for c in calls] == [2, 4, 6, 7]
    assert [len(c["mismatches"]) for c in calls] == [0, 0, 1, 0] and [c["pass_mismatches"] for c in calls] == [0, 0, 1, 1]
    assert calls[2]["mismatches"][0]["shard"] == tampered[1]
    assert len({c["pass_started_at"] for c in calls}) == 1
    assert state["cursor"] is None and state["last_pass"]["checked_grants"] == 7 and state["last_pass"]["mismatches"] == 1
    # The call after a complete pass starts a new one.
    assert following["pass_checked_grants"] == 2 and following["pass_started_at"] > calls[0]["pass_started_at"]


def test_one_call_checks_page_after_page_within_its_budget(api: Api) -> None:
    honest_history(api)
    result = audit.run_audit(page_size=2, budget_seconds=60)
    assert (result.checked_grants, result.pass_complete, result.mismatches) == (7, True, [])


def test_overlapping_calls_keep_one_cursor(api: Api) -> None:
    """Two calls that read the same cursor: the second to save it loses the race and leaves the first's cursor."""
    honest_history(api)
    ledger_store.commit_audit_state({"cursor": None}, None)
    state, update_time = ledger_store.read_audit_state()
    first = audit.run_audit(page_size=3, budget_seconds=0)
    # A call that read the state before `first` saved it: its save is refused, its findings stand.
    with pytest.raises(store.Contended):
        ledger_store.commit_audit_state({"cursor": "principals/x/grants/y"}, update_time)
    assert first.pass_checked_grants == 3 and ledger_store.read_audit_state()[0]["cursor"] is not None


def test_a_consume_racing_the_audit_is_never_a_mismatch(api: Api) -> None:
    """Documents and their ledger sums are read as of one instant: consumes committing meanwhile change neither side."""
    import threading

    api.issue(RUNNER, 40)
    done = threading.Event()

    def consume() -> None:
        for n in range(30):
            api.consume(f"race-{n}")
        done.set()

    thread = threading.Thread(target=consume)
    thread.start()
    results = []
    while not done.is_set():
        results.append(audit.run_audit(page_size=3, budget_seconds=60))
    thread.join()
    assert results and all(r.mismatches == [] for r in results)


@pytest.mark.parametrize(("as_user", "status"), [(None, 401), (RUNNER, 403), (OPERATOR, 200)])
def test_the_audit_is_for_operators(api: Api, as_user: str | None, status: int) -> None:
    response = audit_call(api, as_user=as_user)
    assert response.status_code == status, response.text
    if status != 200:
        assert error_code(response) == {401: "unauthenticated", 403: "forbidden"}[status]


def test_the_admin_token_is_not_an_operator_and_the_scheduler_s_account_is_an_auditor(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    response = api.post(AUDIT, as_user=None, headers={"X-GBX-ADMIN-TOKEN": ADMIN_TOKEN})
    assert (response.status_code, error_code(response)) == (401, "unauthenticated")
    assert audit_call(api, as_user=AUDITOR).status_code == 403
    monkeypatch.setenv(config.ENV_AUDITORS, AUDITOR.upper())
    config.get_config.cache_clear()
    try:
        assert audit_call(api, as_user=AUDITOR).status_code == 200
        # An auditor is no operator elsewhere: usage refuses it.
        assert usage_call(api, admin=None, as_user=AUDITOR).status_code == 403
    finally:
        monkeypatch.undo()
        config.get_config.cache_clear()


# ---------------------------------------------------------------- usage


def lifecycle(api: Api) -> str:
    """The issue's lifecycle: issue 5, consume 3, complete 1 and redeem its seal; the issued grant's id."""
    grant_id = api.issue(RUNNER, 5).json()["grant_id"]
    for n in range(1, 4):
        assert api.consume(f"job-{n}").status_code == 200
    assert api.run_start("job-1").status_code == 200
    bundle = api.run_complete("job-1").json()
    assert api.redeem(bundle["seal_svg"]).status_code == 200
    return grant_id


def test_usage_after_a_lifecycle_with_a_redeem(api: Api) -> None:
    grant_id = lifecycle(api)
    response = usage_call(api)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["principal"], body["consumed"], body["bonus"], body["balance"]) == (RUNNER, 3, 1, 3)
    assert (body["counted_from"], body["counted_to"]) == (None, None)
    issued, bonus = body["grants"]
    assert issued == {"grant_id": grant_id, "plan_id": "standard", "runs_total": 5, "remaining": 2, "expires_at": None}
    assert (bonus["plan_id"], bonus["runs_total"], bonus["remaining"], bonus["expires_at"]) == ("seal_rerun", 1, 1, None)
    # An operator gets the same answer.
    assert usage_call(api, admin=None, as_user=OPERATOR).json() == body


def test_usage_sums_a_sharded_grant_and_lists_other_principals_nothing(api: Api) -> None:
    expires = format_time(dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=30))
    grant_id = api.issue(RUNNER, 10, plan_id="bulk", expires_at=expires).json()["grant_id"]
    api.issue(OTHER, 3)
    api.consume("job-1")
    assert len(store.all_grants(RUNNER)) == 2
    body = usage_call(api).json()
    assert body["grants"] == [{"grant_id": grant_id, "plan_id": "bulk", "runs_total": 10, "remaining": 9, "expires_at": expires}]
    assert (body["balance"], body["consumed"], body["bonus"]) == (9, 1, 0)
    nobody = usage_call(api, "principal=nobody@example.com").json()
    assert (nobody["grants"], nobody["balance"], nobody["consumed"]) == ([], 0, 0)


def test_from_and_to_bound_the_counts_by_ledger_time(api: Api) -> None:
    lifecycle(api)
    entries = sorted(ledger_store.ledger_for_principal(RUNNER), key=lambda e: e["at"])
    assert [e["reason"] for e in entries] == ["issue", "consume", "consume", "consume", "seal_rerun"]
    second, last = entries[2]["at"], entries[4]["at"]

    def counts(query: str) -> tuple[int, int]:
        response = usage_call(api, f"principal={RUNNER}&{query}")
        assert response.status_code == 200, response.text
        return response.json()["consumed"], response.json()["bonus"]

    assert counts(f"from={format_time(second)}") == (2, 1)  # from is inclusive
    assert counts(f"to={format_time(second)}") == (1, 0)  # to is exclusive
    assert counts(f"from={format_time(second)}&to={format_time(last)}") == (2, 0)
    assert counts("from=2999-01-01T00:00:00Z") == (0, 0)
    body = usage_call(api, f"principal={RUNNER}&from=2020-01-01T00:00:00Z&to=2999-01-01T00:00:00Z").json()
    assert (body["consumed"], body["bonus"], body["balance"]) == (3, 1, 3)
    assert (body["counted_from"], body["counted_to"]) == ("2020-01-01T00:00:00Z", "2999-01-01T00:00:00Z")


def test_usage_as_csv_parses(api: Api) -> None:
    grant_id = lifecycle(api)
    response = usage_call(api, accept="text/csv")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/csv") and response.headers["X-Request-Id"]
    assert response.headers["Cache-Control"] == "no-store"
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert tuple(csv.reader(io.StringIO(response.text)).__next__()) == USAGE_CSV_COLUMNS
    grants, total = rows[:-1], rows[-1]
    assert [(r["row"], r["grant_id"], r["plan_id"], r["runs_total"], r["remaining"], r["expires_at"]) for r in grants] == [
        ("grant", grant_id, "standard", "5", "2", ""), ("grant", grants[1]["grant_id"], "seal_rerun", "1", "1", "")]
    assert {r["principal"] for r in rows} == {RUNNER}
    assert (total["row"], total["runs_total"], total["remaining"], total["balance"], total["consumed"], total["bonus"]) == (
        "total", "6", "3", "3", "3", "1")
    # JSON is the default, and wins when preferred.
    assert usage_call(api, accept="application/json, text/csv;q=0.5").headers["Content-Type"] == "application/json"
    assert usage_call(api, accept="text/html").headers["Content-Type"] == "application/json"


@pytest.mark.parametrize("query", [
    "principal=not-an-email", "principal=", "", f"principal={RUNNER}&principal={OTHER}", f"principal={RUNNER}&since=2020-01-01T00:00:00Z",
    f"principal={RUNNER}&from=yesterday", f"principal={RUNNER}&to=2030-01-01T00:00:00%2B01:00",
    f"principal={RUNNER}&from=2030-01-02T00:00:00Z&to=2030-01-01T00:00:00Z",
])
def test_a_malformed_query_is_400(api: Api, query: str) -> None:
    response = usage_call(api, query)
    assert (response.status_code, error_code(response)) == (400, "invalid_request"), response.text


@pytest.mark.parametrize(("admin", "as_user", "status"), [
    (None, None, 401),  # nothing sent
    ("wrong-token", None, 403),  # as for issue
    (None, RUNNER, 403),  # an identity that is no operator
    (ADMIN_TOKEN, None, 200),
    (None, OPERATOR, 200),
])
def test_usage_authentication(api: Api, admin: str | None, as_user: str | None, status: int) -> None:
    response = usage_call(api, admin=admin, as_user=as_user)
    assert response.status_code == status, response.text
    if status != 200:
        assert error_code(response) == {401: "unauthenticated", 403: "forbidden"}[status]


def test_usage_with_the_admin_token_and_a_bad_id_token_is_401_as_for_issue(api: Api) -> None:
    response = requests.get(f"{api.base_url}{USAGE}?principal={RUNNER}", timeout=60,
                            headers={"X-GBX-ADMIN-TOKEN": ADMIN_TOKEN, "Authorization": "Bearer not-a-token"})
    assert (response.status_code, error_code(response)) == (401, "unauthenticated")
    # Authentication comes before the query: an anonymous caller learns nothing about validation.
    assert usage_call(api, "principal=bad", admin=None).status_code == 401
