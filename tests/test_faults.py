"""Real faults: the Firestore emulator is stalled (SIGSTOP) while a commit is in flight and resumed (SIGCONT)
after the commit's deadline has passed. The caller must get the answer its request earned, never a 503 for a
write that was applied, nor a 409 against itself on retry."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from shared import config, ledger_store, store
from tests.conftest import RUNNER, Api, error_code


@pytest.fixture
def stall_next_commit(api: Api, stoppable_db: Any, short_firestore_budgets: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], list[str]]]:
    """Arm: the next commit is sent to an emulator stopped for longer than the commit's timeout."""
    pid = stoppable_db.process.pid
    stall_seconds = config.get_config().firestore_timeout_seconds + 1.5
    real_commit = store._commit
    timers: list[threading.Timer] = []

    def arm() -> list[str]:
        stalled: list[str] = []

        def stall_then_commit(batch: Any) -> Any:
            if not stalled:
                stalled.append("stalled")
                os.kill(pid, signal.SIGSTOP)
                timer = threading.Timer(stall_seconds, os.kill, (pid, signal.SIGCONT))
                timers.append(timer)
                timer.start()
            return real_commit(batch)

        monkeypatch.setattr(store, "_commit", stall_then_commit)
        return stalled

    try:
        yield arm
    finally:
        for timer in timers:
            timer.cancel()
        os.kill(pid, signal.SIGCONT)  # never leave an emulator stopped


def test_a_redeem_whose_commit_outlives_its_deadline_is_answered_as_applied(api: Api, stall_next_commit: Callable[[], list[str]]) -> None:
    svg = api.sealed_run()["seal_svg"]
    stalled = stall_next_commit()
    first = api.redeem(svg, headers={"Idempotency-Key": "bonus-1"})
    assert stalled == ["stalled"]
    assert first.status_code == 200, first.text
    assert first.json()["replayed"] is False
    grant_id = first.json()["grant_id"]
    # The caller's retry with its key is the first answer again, not someone else's redemption.
    again = api.redeem(svg, headers={"Idempotency-Key": "bonus-1"})
    assert again.status_code == 200 and again.json() == {**first.json(), "replayed": True}
    # Without the key it is 409, and the body names the grant this caller was given.
    plain = api.redeem(svg)
    assert (plain.status_code, error_code(plain)) == (409, "already_redeemed")
    assert plain.json()["error"]["grant_id"] == grant_id
    assert [g["grant_id"] for g in store.all_grants(RUNNER) if g["plan_id"] == store.SEAL_RERUN_PLAN] == [grant_id]
    assert [e["delta"] for e in ledger_store.ledger_for_grant(grant_id)] == [1]


def test_a_consume_whose_commit_outlives_its_deadline_charges_once(api: Api, stall_next_commit: Callable[[], list[str]]) -> None:
    api.issue(RUNNER, 3)
    stalled = stall_next_commit()
    response = api.consume("job-1")
    assert stalled == ["stalled"]
    assert response.status_code == 200, response.text
    assert response.json()["replayed"] is False and response.json()["balance"] == 2
    assert api.consume("job-1").json()["replayed"] is True
    assert api.check("job-2").json()["balance"] == 2
