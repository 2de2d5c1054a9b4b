"""A commit that was applied but whose reply was lost: the retry must recognise its own write.

Retrying such a commit fails (the run, grant or redemption now exists, or the precondition moved),
which the store reports as Contended. Here the next commit is applied and then reported as
Contended, which is exactly what the service sees in that case.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from shared import ledger_store, store
from tests.conftest import RUNNER, Api, error_code


@pytest.fixture
def lose_next_reply(monkeypatch: pytest.MonkeyPatch) -> Callable[..., list[str]]:
    """Arm: the next commit is applied, then (after `meanwhile`, if given) answered as a lost race."""

    def arm(meanwhile: Callable[[], object] | None = None) -> list[str]:
        real_commit = store._commit
        lost: list[str] = []

        def commit_then_lose_reply(batch):  # type: ignore[no-untyped-def]
            result = real_commit(batch)
            if not lost:
                lost.append("lost")
                if meanwhile is not None:
                    meanwhile()
                raise store.Contended("reply lost after the commit was applied")
            return result

        monkeypatch.setattr(store, "_commit", commit_then_lose_reply)
        return lost

    return arm


def test_issue_without_key_is_not_issued_twice(api: Api, lose_next_reply: Callable[[], list[str]]) -> None:
    lost = lose_next_reply()
    response = api.issue(RUNNER, 5)
    assert lost and response.status_code == 200
    assert response.json()["replayed"] is False
    assert [g["grant_id"] for g in store.all_grants(RUNNER)] == [response.json()["grant_id"]]
    assert [e["delta"] for e in ledger_store.ledger_for_principal(RUNNER)] == [5]


def test_issue_with_key_answers_as_the_first_issue(api: Api, lose_next_reply: Callable[[], list[str]]) -> None:
    lost = lose_next_reply()
    response = api.issue(RUNNER, 5, key="order-7")
    assert lost and response.status_code == 200
    assert response.json()["replayed"] is False and response.json()["balance"] == 5
    assert len(store.all_grants(RUNNER)) == 1
    assert api.issue(RUNNER, 5, key="order-7").json()["replayed"] is True


def test_consume_charges_once_and_is_not_a_replay(api: Api, lose_next_reply: Callable[[], list[str]]) -> None:
    api.issue(RUNNER, 3)
    lost = lose_next_reply()
    response = api.consume("job-1")
    assert lost and response.status_code == 200
    assert response.json() == {"run_id": "job-1", "principal": RUNNER, "balance": 2, "state": "consumed", "replayed": False}
    assert store.all_grants(RUNNER)[0]["remaining"] == 2
    assert api.consume("job-1").json()["replayed"] is True


def test_run_start_and_complete_read_back_their_own_write(api: Api, lose_next_reply: Callable[[], list[str]]) -> None:
    api.issue(RUNNER, 1)
    api.consume("job-1")
    lost = lose_next_reply()
    started = api.run_start("job-1")
    assert lost and started.status_code == 200
    assert started.json() == api.run_start("job-1").json()
    lost = lose_next_reply()
    bundle = api.run_complete("job-1")
    assert lost and bundle.status_code == 200
    assert api.run_complete("job-1").json() == bundle.json()
    assert len(list(store.client().collection("seals").get())) == 1


def test_redeem_is_answered_as_the_success_it_was(api: Api, lose_next_reply: Callable[[], list[str]]) -> None:
    bundle = api.sealed_run()
    lost = lose_next_reply()
    response = api.redeem(bundle["seal_svg"])
    assert lost and response.status_code == 200 and response.json()["balance"] == 1
    again = api.redeem(bundle["seal_svg"])
    assert (again.status_code, error_code(again)) == (409, "already_redeemed")
    assert len([g for g in store.all_grants(RUNNER) if g["plan_id"] == "seal_rerun"]) == 1


def test_consume_whose_run_started_before_the_re_read_is_still_its_own_charge(api: Api, lose_next_reply: Callable[..., list[str]]) -> None:
    api.issue(RUNNER, 3)

    def runner_retried_and_started() -> None:
        run = store.read_run(RUNNER, "job-1")
        assert run is not None
        store.commit_run_start(RUNNER, run, {"container_image": "x", "project_id": "acme-prod", "inputs_sha256": "ab" * 32, "run_manifest_sha256": None}, started_at=run.record.consumed_at)

    lost = lose_next_reply(runner_retried_and_started)
    response = api.consume("job-1")
    assert lost and response.status_code == 200 and response.json()["replayed"] is False
    assert store.all_grants(RUNNER)[0]["remaining"] == 2
    other = api.consume("job-1")  # anyone else asking now is told the run is taken
    assert (other.status_code, error_code(other)) == (409, "run_id_reused")
