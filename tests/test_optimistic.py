"""store.optimistic, the one read → decide → commit loop: what it retries, how often, and what it answers."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from shared import errors, store


def attempts_that(*outcomes: BaseException | str) -> tuple[list[int], Callable[[], str]]:
    """An attempt that raises or returns each outcome in turn, and the list counting its calls."""
    calls: list[int] = []

    def attempt() -> str:
        outcome = outcomes[len(calls)]
        calls.append(1)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return calls, attempt


def test_a_lost_race_is_decided_again() -> None:
    calls, attempt = attempts_that(store.Contended("race"), store.Contended("race"), "answer")
    assert store.optimistic(attempt) == "answer"
    assert len(calls) == 3


def test_contention_past_the_attempt_budget_is_the_services_own_503() -> None:
    calls, attempt = attempts_that(*[store.Contended("race")] * 5)
    with pytest.raises(errors.Unavailable, match="contention"):
        store.optimistic(attempt, max_attempts=5)
    assert len(calls) == 5


def test_a_lost_reply_is_re_read_a_bounded_number_of_times() -> None:
    calls, attempt = attempts_that(store.CommitUncertain("DeadlineExceeded"), "recognised its own write")
    assert store.optimistic(attempt) == "recognised its own write"
    outcomes = [store.CommitUncertain("DeadlineExceeded")] * (store.MAX_UNCERTAIN_COMMITS + 1)
    calls, attempt = attempts_that(*outcomes, "never reached")
    with pytest.raises(errors.Unavailable):
        store.optimistic(attempt)
    assert len(calls) == store.MAX_UNCERTAIN_COMMITS + 1


def test_a_decision_is_never_retried() -> None:
    calls, attempt = attempts_that(errors.EntitlementExhausted(), "never reached")
    with pytest.raises(errors.EntitlementExhausted):
        store.optimistic(attempt)
    assert len(calls) == 1


def test_contention_is_also_bounded_in_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "MAX_CONTENTION_SECONDS", 0.05)
    calls, attempt = attempts_that(*[store.Contended("race")] * 1000)
    with pytest.raises(errors.Unavailable, match="contention"):
        store.optimistic(attempt)
    assert 1 < len(calls) < 200
