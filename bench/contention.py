"""Contention benchmark on Google's Firestore emulator: optimistic commits (the design) vs a read-then-write transaction.

Run it from the repository root: `python -m bench.contention` (or `make bench`, which runs every benchmark).
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import os
import secrets
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pydantic
from google.cloud import firestore

from bench import harness
from shared import config, emulator, entitlements, errors, ledger_store, store
from shared.auth import Identity, PartnerCaller, Role
from shared.http import UNAVAILABLE_ERRORS
from shared.models import ConsumeRequest, IssueRequest

PROJECT = "gbx-bench"
DESIGN_SHAPES: tuple[tuple[int, int], ...] = ((40, 10), (40, 40), (100, 100), (100, 256))  # (consumers, runs in the grant)
SHARDING_SHAPE = (100, 256)  # also run with the grant in one document, for comparison
TRANSACTION_SHAPE = (40, 10)
SEQUENTIAL_CONSUMES = 200
WARMUP_CONSUMES = 30

# Every wait is bounded, so the whole benchmark stays well under three minutes even when something hangs.
DESIGN_DEADLINE_SECONDS = 25.0  # per concurrent shape; the design resolves 100 consumers in a few seconds
SEQUENTIAL_DEADLINE_SECONDS = 15.0
TRANSACTION_DEADLINE_SECONDS = 25.0
TRANSACTION_READ_TIMEOUT_SECONDS = 10.0
BARRIER_TIMEOUT_SECONDS = 20.0
CHECK_TIMEOUT_SECONDS = 15.0


# ---------------------------------------------------------------------------------------------
# Outcomes and measurements
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What one concurrent request ended in."""

    index: int
    kind: str  # "ok", "exhausted", "error" or "unfinished"
    seconds: float
    detail: str = ""
    value: Any = None


@dataclass
class ScenarioResult:
    """One row of the results table, plus what went wrong in it."""

    name: str
    consumers: int
    runs: int
    outcomes: list[Outcome]
    wall_seconds: float
    commit_attempts: int | None
    lost_races: int | None
    max_tries: int | None
    invariants: list[str] = field(default_factory=list)  # broken invariants; empty when all hold
    invariant_note: str = "hold"
    fatal: bool = True  # whether a broken invariant or an unexpected error fails the benchmark

    def count(self, kind: str) -> int:
        """How many requests ended in `kind`."""
        return sum(1 for outcome in self.outcomes if outcome.kind == kind)

    def error_summary(self) -> str:
        """`Type: message × n` for every distinct error, most frequent first."""
        counts = Counter(o.detail for o in self.outcomes if o.kind in ("error", "unfinished"))
        return "; ".join(f"{detail} × {n}" for detail, n in counts.most_common())


percentile = harness.percentile


def http_status(exc: BaseException) -> int:
    """The status `shared.http.handle` answers for `exc`: its own for an ApiError, 400 for validation, 503 for an outage, else 500."""
    if isinstance(exc, errors.ApiError):
        return exc.status
    if isinstance(exc, pydantic.ValidationError):
        return 400
    return 503 if isinstance(exc, UNAVAILABLE_ERRORS) else 500


def describe(exc: BaseException) -> str:
    """A short, stable description of an exception for counting: its type, the status the service would answer, its first line."""
    first_line = (str(exc).splitlines() or [""])[0][:90]
    text = f"{type(exc).__name__} [{http_status(exc)} via shared.http]: {first_line}"
    if exc.__cause__ is not None:
        # The transaction wrapper hides the server's reason (Aborted: …) in the cause.
        text += f" ← {type(exc.__cause__).__name__}: {(str(exc.__cause__).splitlines() or [''])[0][:120]}"
    return text


def run_together(count: int, request: Callable[[int], Outcome], *, deadline_seconds: float) -> tuple[list[Outcome], float]:
    """Run `request(i)` for i < count on as many threads, released at once; wait at most `deadline_seconds`.

    Threads are daemons so that a request stuck past the deadline cannot keep the benchmark alive; it is
    reported as `unfinished` instead.
    """
    results: list[Outcome | None] = [None] * count
    released = threading.Event()
    started: list[float] = []

    def release() -> None:
        started.append(time.perf_counter())
        released.set()

    barrier = threading.Barrier(count, action=release)

    def worker(index: int) -> None:
        try:
            barrier.wait(timeout=BARRIER_TIMEOUT_SECONDS)
        except threading.BrokenBarrierError:
            results[index] = Outcome(index, "error", 0.0, "BrokenBarrierError: threads did not start together")
            return
        results[index] = request(index)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True, name=f"bench-{i}") for i in range(count)]
    for thread in threads:
        thread.start()
    if not released.wait(timeout=BARRIER_TIMEOUT_SECONDS + 1):
        raise RuntimeError(f"{count} threads did not start within {BARRIER_TIMEOUT_SECONDS:.0f}s")
    start = started[0]
    deadline = start + deadline_seconds
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.perf_counter()))
    finished = [t for t in results if t is not None]
    wall = max((o.seconds for o in finished), default=0.0) if len(finished) == count else time.perf_counter() - start
    outcomes = [
        result if result is not None else Outcome(i, "unfinished", deadline_seconds, f"still running after {deadline_seconds:.0f}s")
        for i, result in enumerate(results)
    ]
    return outcomes, wall


class CommitTries:
    """Counts the commits each request tried and the races it lost, from the store's own record
    (`store.recording_attempts()`, per request thread); no production code is replaced or profiled."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_request: dict[int, int] = {}

    def run(self, index: int, request: Callable[[], Outcome]) -> Outcome:
        """Run one request and record how many commits it tried."""
        with store.recording_attempts() as record:
            try:
                return request()
            finally:
                with self._lock:
                    self._by_request[index] = record.count("commit")

    def totals(self, outcomes: list[Outcome]) -> tuple[int, int, int] | tuple[None, None, None]:
        """(commits tried, races lost, most tries of one request); a try is lost unless it charged its request's 200."""
        with self._lock:
            tries = dict(self._by_request)
        charged = sum(1 for o in outcomes if o.kind == "ok" and not o.value.replayed)
        attempts = sum(tries.values())
        return attempts, attempts - charged, max(tries.values(), default=0)


# ---------------------------------------------------------------------------------------------
# Scenario A: the design (entitlements.consume, optimistic commits)
# ---------------------------------------------------------------------------------------------


def issue_grant(principal: str, runs: int, *, max_shards: int = store.MAX_SHARDS) -> str:
    """Issue `runs` runs to `principal`; return the grant id.

    With the store's own limit this is the service's issue; with fewer shards, the store's commit of an issue
    with that limit (its `max_shards` seam), the way to keep a large grant in one document for comparison.
    """
    request = IssueRequest(principal=principal, runs_total=runs)
    if max_shards == store.MAX_SHARDS:
        return entitlements.issue(PartnerCaller(role=Role.ADMIN, email=None), request).grant_id
    grant_id = secrets.token_hex(16)
    # Without an Idempotency-Key the store keeps no issuance record, so fingerprint and response go unused.
    store.commit_issue(
        principal=request.principal,
        grant_id=grant_id,
        plan_id=request.plan_id,
        runs_total=request.runs_total,
        expires_at=None,
        issued_by="admin",
        idempotency_key_hash=None,
        fingerprint="",
        response={},
        max_shards=max_shards,
    )
    return grant_id


def consume_once(principal: str, run_id: str, index: int) -> Outcome:
    """One call of the service's consume, timed and classified."""
    began = time.perf_counter()
    try:
        response = entitlements.consume(Identity(principal, operator=False), ConsumeRequest(run_id=run_id))
    except errors.EntitlementExhausted:
        return Outcome(index, "exhausted", time.perf_counter() - began)
    except Exception as exc:  # noqa: BLE001 - every other exception is a finding, counted and reported
        return Outcome(index, "error", time.perf_counter() - began, describe(exc))
    return Outcome(index, "ok", time.perf_counter() - began, value=response)


def design_invariants(principal: str, grant_id: str, runs: int, outcomes: list[Outcome]) -> list[str]:
    """Everything that must hold after consumers of distinct run_ids raced on one grant; the broken ones."""
    problems: list[str] = []
    ok = [o for o in outcomes if o.kind == "ok"]
    expected_ok = min(len(outcomes), runs)
    if len(ok) != expected_ok or sum(o.kind == "exhausted" for o in outcomes) != len(outcomes) - expected_ok:
        problems.append(f"expected {expected_ok} × 200 and {len(outcomes) - expected_ok} × 402, got {dict(Counter(o.kind for o in outcomes))}")
    if any(o.value.replayed for o in ok):
        problems.append("a first consume of a run_id answered replayed=true")
    all_grants = store.all_grants(principal)
    grants = [g for g in all_grants if g.get("group", g["grant_id"]) == grant_id]
    if len(grants) != len(all_grants) or not grants:
        problems.append(f"expected only grant {grant_id} (or its shards), found {[g['grant_id'] for g in all_grants]}")
        return problems
    if len(grants) == 1:
        # One document: the k charges left it at, ... R-k in commit order. Each answer is the balance read
        # before its commit less its charge: never below its own exact value, never above R-1 (docs/design.md).
        balances = sorted((o.value.balance for o in ok), reverse=True)
        exact = list(range(runs - 1, runs - 1 - len(ok), -1))
        if any(b > runs - 1 or b < e for b, e in zip(balances, exact, strict=True)):
            problems.append(f"returned balances are not each between its exact value and R-1: {balances}")
    remaining = sum(g["remaining"] for g in grants)
    if remaining != runs - len(ok):
        problems.append(f"grant remaining {remaining} != {runs} - {len(ok)} successes")
    ledger = ledger_store.ledger_for_grant(grant_id)
    for g in grants:
        shard_sum = sum(e["delta"] for e in ledger if e["shard"] == g["grant_id"])
        if shard_sum != g["remaining"]:
            problems.append(f"ledger sum {shard_sum} != remaining {g['remaining']} of {g['grant_id']}")
    issues = [e for e in ledger if e["reason"] == "issue"]
    consumes = [e for e in ledger if e["reason"] == "consume"]
    if sum(e["delta"] for e in issues) != runs or any(e["delta"] != -1 for e in consumes) or len(issues) + len(consumes) != len(ledger):
        problems.append(f"unexpected ledger entries: {Counter((e['reason'], e['delta']) for e in ledger)}")
    charged = {o.value.run_id for o in ok}
    if {e["ref"] for e in consumes} != charged or len(consumes) != len(charged):
        problems.append("ledger consume entries do not match the run_ids answered 200")
    run_docs = store.client().collection(store.PRINCIPALS).document(principal).collection(store.RUNS).get(timeout=CHECK_TIMEOUT_SECONDS)
    recorded = {snap.get("run_id"): snap.get("state") for snap in run_docs}
    if recorded != dict.fromkeys(charged, "consumed"):
        problems.append(f"run records ({len(recorded)}) do not match the {len(charged)} charged run_ids in state consumed")
    return problems


def scenario_design(emu: emulator.Emulator, consumers: int, runs: int, *, max_shards: int = store.MAX_SHARDS) -> ScenarioResult:
    """A: `consumers` threads consume distinct run_ids against one grant of `runs` runs, in at most `max_shards` documents."""
    emu.clear()
    principal = f"bench-design-{consumers}-{runs}-{max_shards}@example.com"
    grant_id = issue_grant(principal, runs, max_shards=max_shards)
    shard_count = len(store.all_grants(principal))
    tries = CommitTries()
    outcomes, wall = run_together(
        consumers, lambda i: tries.run(i, lambda: consume_once(principal, f"job-{i:04d}", i)), deadline_seconds=DESIGN_DEADLINE_SECONDS
    )
    if max_shards == store.MAX_SHARDS:
        name = f"A optimistic commit, {shard_count} grant document{'s' if shard_count > 1 else ''}"
    else:
        name = f"A optimistic commit, same grant kept in {shard_count} document{'s' if shard_count > 1 else ''}"
    return _design_result(name, consumers, runs, outcomes, wall, tries, principal, grant_id)


# ---------------------------------------------------------------------------------------------
# Scenario C: one consumer, one request after another
# ---------------------------------------------------------------------------------------------


def scenario_sequential(emu: emulator.Emulator, count: int) -> ScenarioResult:
    """C: `count` consumes one after another on one grant: the uncontended cost (four reads and one commit)."""
    emu.clear()
    principal = "bench-sequential@example.com"
    # One document: the uncontended cost of one consume without a shard to draw.
    grant_id = issue_grant(principal, count, max_shards=1)
    outcomes: list[Outcome] = []
    tries = CommitTries()
    began = time.perf_counter()
    for i in range(count):
        if time.perf_counter() - began > SEQUENTIAL_DEADLINE_SECONDS:
            outcomes += [Outcome(j, "unfinished", 0.0, f"not run: past the {SEQUENTIAL_DEADLINE_SECONDS:.0f}s deadline") for j in range(i, count)]
            break
        outcomes.append(tries.run(i, functools.partial(consume_once, principal, f"seq-{i:04d}", i)))
    wall = time.perf_counter() - began
    return _design_result("C sequential, 1 grant document", 1, count, outcomes, wall, tries, principal, grant_id)


def _design_result(
    name: str, consumers: int, runs: int, outcomes: list[Outcome], wall: float, tries: CommitTries, principal: str, grant_id: str
) -> ScenarioResult:
    """A result of the design's scenarios (A, C), with its invariants checked once every request has finished."""
    attempts, lost, max_tries = tries.totals(outcomes)
    result = ScenarioResult(
        name=name,
        consumers=consumers,
        runs=runs,
        outcomes=outcomes,
        wall_seconds=wall,
        commit_attempts=attempts,
        lost_races=lost,
        max_tries=max_tries,
    )
    if result.count("unfinished"):
        result.invariants.append(f"{result.count('unfinished')} requests unfinished at the deadline; state not checked")
    else:
        result.invariants.extend(design_invariants(principal, grant_id, runs, outcomes))
    return result


def warm_up(emu: emulator.Emulator) -> None:
    """Open the gRPC channel and let the emulator's JVM compile its hot paths before anything is timed."""
    emu.clear()
    principal = "bench-warmup@example.com"
    issue_grant(principal, WARMUP_CONSUMES)
    for i in range(WARMUP_CONSUMES):
        consume_once(principal, f"warm-{i}", i)


# ---------------------------------------------------------------------------------------------
# Scenario B: the rejected alternative, a read-then-write transaction on the grant
# ---------------------------------------------------------------------------------------------


class TryCounter:
    """Counts how often transaction bodies ran (the client re-runs a body after every abort)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.tries = 0
        self.tries_by_run: Counter[str] = Counter()

    def add(self, run_id: str) -> None:
        """Record one run of the body for run_id."""
        with self._lock:
            self.tries += 1
            self.tries_by_run[run_id] += 1


def _consume_in_transaction(transaction: firestore.Transaction, *, principal: str, grant_id: str, run_id: str, tries: TryCounter) -> int | None:
    """Read the grant inside the transaction, then the writes of a consume: the new balance, or None at 0.

    The writes are the design's (the grant's `remaining`, the run record, the ledger entry in the store's
    schema); only the isolation differs: a transaction instead of an update-time precondition.
    """
    tries.add(run_id)
    grant = store.grant_from_snapshot(store.grant_ref(principal, grant_id).get(transaction=transaction, timeout=TRANSACTION_READ_TIMEOUT_SECONDS))
    if grant.remaining < 1:
        return None
    # The very writes of the design's consume (store.write_consume), without the precondition: the transaction isolates.
    store.write_consume(transaction, principal, run_id, grant, charge_id=secrets.token_hex(12), consumed_at=dt.datetime.now(dt.UTC), precondition=False)
    return grant.remaining - 1


def transaction_consume_once(principal: str, grant_id: str, run_id: str, index: int, tries: TryCounter) -> Outcome:
    """One consume by transaction (the client's default of 5 attempts), timed and classified."""
    began = time.perf_counter()
    # A fresh `transactional` per call: the wrapper keeps the current transaction id on itself, so one
    # shared instance would mix up concurrent callers.
    body = firestore.transactional(_consume_in_transaction)
    try:
        balance = body(store.client().transaction(), principal=principal, grant_id=grant_id, run_id=run_id, tries=tries)
    except Exception as exc:  # noqa: BLE001 - counting these is the point of the scenario
        return Outcome(index, "error", time.perf_counter() - began, describe(exc))
    if balance is None:
        return Outcome(index, "exhausted", time.perf_counter() - began)
    return Outcome(index, "ok", time.perf_counter() - began, value=balance)


def transaction_invariants(principal: str, grant_id: str, runs: int, outcomes: list[Outcome]) -> list[str]:
    """A transaction is slow under contention, not wrong: the same balance invariants must hold."""
    problems: list[str] = []
    ok = sum(o.kind == "ok" for o in outcomes)
    grants = store.all_grants(principal)
    remaining = sum(g["remaining"] for g in grants)
    if len(grants) != 1 or remaining != runs - ok:
        problems.append(f"grant remaining {remaining} (in {len(grants)} documents) != {runs} - {ok} successes")
    ledger = ledger_store.ledger_for_grant(grant_id)
    if sum(e["delta"] for e in ledger) != remaining:
        problems.append(f"ledger sum {sum(e['delta'] for e in ledger)} != grant remaining {remaining}")
    if sum(e["reason"] == "consume" for e in ledger) != ok:
        problems.append(f"{sum(e['reason'] == 'consume' for e in ledger)} consume ledger entries for {ok} successes")
    if ok > runs:
        problems.append(f"{ok} successes for {runs} runs")
    return problems


def scenario_transaction(emu: emulator.Emulator, consumers: int, runs: int) -> ScenarioResult:
    """B: the same race, each consumer running a read-then-write transaction on the one grant document."""
    emu.clear()
    principal = "bench-transaction@example.com"
    grant_id = issue_grant(principal, runs, max_shards=1)  # the transaction takes its runs from one document
    tries = TryCounter()
    outcomes, wall = run_together(
        consumers,
        lambda i: transaction_consume_once(principal, grant_id, f"job-{i:04d}", i, tries),
        deadline_seconds=TRANSACTION_DEADLINE_SECONDS,
    )
    finished = sum(o.kind in ("ok", "exhausted") for o in outcomes)
    result = ScenarioResult(
        name="B transaction",
        consumers=consumers,
        runs=runs,
        outcomes=outcomes,
        wall_seconds=wall,
        commit_attempts=tries.tries,
        lost_races=tries.tries - finished,
        max_tries=max(tries.tries_by_run.values(), default=0),
        fatal=False,  # errors are the expected finding here; only a broken balance fails the benchmark
    )
    if result.count("unfinished"):
        result.invariant_note = "not checked (transactions still in flight)"
    else:
        try:
            result.invariants.extend(transaction_invariants(principal, grant_id, runs, outcomes))
        except Exception as exc:  # noqa: BLE001 - a check that cannot read is reported, not fatal
            result.invariant_note = f"not checked ({describe(exc)})"
    return result


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def format_row(result: ScenarioResult) -> str:
    """One Markdown table row."""
    done = [o.seconds for o in result.outcomes if o.kind in ("ok", "exhausted")]
    p50 = f"{percentile(done, 0.50) * 1000:.1f}" if done else "—"
    p95 = f"{percentile(done, 0.95) * 1000:.1f}" if done else "—"
    ok = result.count("ok")
    per_second = f"{ok / result.wall_seconds:.1f}" if result.wall_seconds > 0 else "—"
    invariants = "**BROKEN**" if result.invariants else result.invariant_note
    cells = [
        result.name,
        str(result.consumers),
        str(result.runs),
        str(ok),
        str(result.count("exhausted")),
        str(result.count("error")),
        str(result.count("unfinished")),
        f"{result.wall_seconds:.2f}",
        per_second,
        "—" if result.commit_attempts is None else str(result.commit_attempts),
        "—" if result.lost_races is None else str(result.lost_races),
        "—" if result.max_tries is None else str(result.max_tries),
        p50,
        p95,
        invariants,
    ]
    return "| " + " | ".join(cells) + " |"


TABLE_HEADER = (
    "| Scenario | Consumers | Runs | 200 | 402 | Errors | Unfinished | Wall s | Commits/s | Tries | Lost races | Max tries/request | p50 ms | p95 ms | Invariants |\n"
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
)


def print_report(results: list[ScenarioResult], total_seconds: float) -> None:
    """The results table, the details of anything unexpected, and what the figures mean."""
    order = {"A": 0, "B": 1, "C": 2}
    print()
    print(f"## Contention benchmark ({dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC)")
    print()
    print(TABLE_HEADER)
    for result in sorted(results, key=lambda r: order[r.name[0]]):
        print(format_row(result))
    print()
    for result in results:
        if result.error_summary():
            print(f"- {result.name} ({result.consumers}×{result.runs}) errors: {result.error_summary()}")
        for problem in result.invariants:
            print(f"- {result.name} ({result.consumers}×{result.runs}) BROKEN INVARIANT: {problem}")
    counted = "commits tried (A, C: the store's own record of each request, store.recording_attempts; B: transaction bodies run)"
    print(
        f"- Tries: {counted}; lost races: tries that did not end the request (a failed precondition, or an aborted"
        " transaction). Commits/s: successful consumes per second of wall time. p50/p95: per-request latency of"
        " requests that got an answer (200 or 402)."
    )
    print(
        "- Invariants: A and C: exactly min(N, R) × 200 and the rest 402, grant remaining = R − successes = sum of"
        " the grant's ledger deltas, shard by shard, one ledger entry and one `consumed` run record per charged run_id,"
        " returned balances each between its exact value (R−1, R−2, … in commit order) and R−1 (one-document grants). B: remaining = R − successes = ledger sum."
    )
    print(f"- {harness.machine_line()} Total benchmark time {total_seconds:.1f}s.")
    print(
        "- These are Firestore **emulator** figures on one machine: the emulator runs in-process with locks and"
        " serialises commits differently from production Firestore, where a single document sustains about one"
        " write per second and contended transactions abort (ABORTED / contention) rather than wait. Read them for"
        " the shape (who wins, how many retries, whether anything fails), not as production throughput."
    )


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def run_all(emu: emulator.Emulator) -> list[ScenarioResult]:
    """Every scenario, in an order that keeps B's possibly stuck transactions from disturbing A and C."""
    warm_up(emu)
    results: list[ScenarioResult] = []
    for consumers, runs in DESIGN_SHAPES:
        print(f"A: {consumers} consumers vs {runs} runs …", file=sys.stderr, flush=True)
        results.append(scenario_design(emu, consumers, runs))
    # The same large grant kept in one document: what sharding saves.
    consumers, runs = SHARDING_SHAPE
    print(f"A: {consumers} consumers vs {runs} runs in one document …", file=sys.stderr, flush=True)
    results.append(scenario_design(emu, consumers, runs, max_shards=1))
    print(f"C: {SEQUENTIAL_CONSUMES} sequential consumes …", file=sys.stderr, flush=True)
    results.append(scenario_sequential(emu, SEQUENTIAL_CONSUMES))
    print(f"B: {TRANSACTION_SHAPE[0]} transactions vs {TRANSACTION_SHAPE[1]} runs (at most {TRANSACTION_DEADLINE_SECONDS:.0f}s) …", file=sys.stderr, flush=True)
    results.append(scenario_transaction(emu, *TRANSACTION_SHAPE))
    return results


def main(argv: list[str] | None = None) -> int:
    """Start an emulator, run the scenarios, print the table; 1 when the design broke an invariant or erred."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.contention",
        description=__doc__.splitlines()[0],
        epilog="Exit status: 0 every invariant held, 1 the design broke one or ended a request in an error, 3 no emulator, 130 interrupted.",
    )
    parser.parse_args(argv)
    began = time.perf_counter()

    def body() -> None:
        with harness.running_emulator(PROJECT, name="contention") as emu:
            # The optimistic commits alone: the partners' events are measured by bench.fanout and bench.events.
            os.environ[config.ENV_EVENTS] = "0"
            config.get_config.cache_clear()
            results = run_all(emu)
            print_report(results, time.perf_counter() - began)
            if any((r.invariants or r.count("error") or r.count("unfinished")) if r.fatal else r.invariants for r in results):
                # Raised inside the block, so that the emulator's log is kept for the diagnosis.
                raise harness.BenchmarkFailed("the optimistic-commit design broke an invariant or ended a request in an error (see above)")

    return harness.exit_status(body)


if __name__ == "__main__":
    sys.exit(main())
