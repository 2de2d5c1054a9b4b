"""Contention benchmark on Google's Firestore emulator: optimistic commits (the design) vs a read-then-write transaction."""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

# `python bench/contention.py` puts bench/ on sys.path, not the checkout that holds `shared`.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from google.api_core import exceptions as gexc  # noqa: E402
from google.cloud import firestore  # noqa: E402
from google.cloud.firestore_v1.base_query import FieldFilter  # noqa: E402

from shared import config, emulator, entitlements, errors, store  # noqa: E402
from shared.auth import Admin, Identity  # noqa: E402
from shared.models import ConsumeRequest, IssueRequest  # noqa: E402

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

# How `shared.http.handle` would answer an exception that is not an ApiError (STYLE.md rule 4).
UNAVAILABLE_EXCEPTIONS = (gexc.ServiceUnavailable, gexc.DeadlineExceeded, gexc.RetryError, gexc.InternalServerError, gexc.Aborted)


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


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of non-empty `values` (fraction in 0..1)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(fraction * len(ordered) + 0.5)))
    return ordered[rank - 1]


def describe(exc: BaseException) -> str:
    """A short, stable description of an exception for counting: its type, its HTTP equivalent and its first line."""
    status = "503" if isinstance(exc, UNAVAILABLE_EXCEPTIONS) else "500"
    first_line = (str(exc).splitlines() or [""])[0][:90]
    text = f"{type(exc).__name__} [{status} via shared.http]: {first_line}"
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
    barrier = threading.Barrier(count, action=lambda: (started.append(time.perf_counter()), released.set()))

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


class CommitCounter:
    """Wraps `store.commit_consume` to count commits tried, races lost, and tries per run_id (bench-only instrumentation)."""

    def __init__(self, inner: Callable[[str, str, store.Grant], None]) -> None:
        self._inner = inner
        self._lock = threading.Lock()
        self.attempts = 0
        self.lost = 0
        self.tries_by_run: Counter[str] = Counter()

    def __call__(self, principal: str, run_id: str, grant: store.Grant, *, charge_id: str) -> None:
        """Count, then commit as the service would."""
        with self._lock:
            self.attempts += 1
            self.tries_by_run[run_id] += 1
        try:
            self._inner(principal, run_id, grant, charge_id=charge_id)
        except store.Contended:
            with self._lock:
                self.lost += 1
            raise


@contextlib.contextmanager
def counting_commits() -> Iterator[CommitCounter]:
    """Instrument `store.commit_consume` for the duration of a scenario, then put the original back."""
    original = store.commit_consume
    counter = CommitCounter(original)
    store.commit_consume = counter  # type: ignore[assignment]
    try:
        yield counter
    finally:
        store.commit_consume = original  # type: ignore[assignment]


# ---------------------------------------------------------------------------------------------
# Scenario A: the design (entitlements.consume, optimistic commits)
# ---------------------------------------------------------------------------------------------


def issue_grant(principal: str, runs: int) -> str:
    """Issue `runs` runs to `principal` through the service; return the grant id."""
    return entitlements.issue(Admin(issued_by=None), IssueRequest(principal=principal, runs_total=runs)).grant_id


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
    grants = [g for g in store.all_grants(principal) if g.get("group", g["grant_id"]) == grant_id]
    if len(grants) != len(store.all_grants(principal)) or not grants:
        problems.append(f"expected only grant {grant_id} (or its shards), found {[g['grant_id'] for g in store.all_grants(principal)]}")
        return problems
    if len(grants) == 1:
        balances = sorted((o.value.balance for o in ok), reverse=True)
        if balances != list(range(runs - 1, runs - 1 - len(ok), -1)):
            # One document, each commit preconditioned on it as read: the balances are exactly, ...
            problems.append(f"returned balances are not R-1 … R-{len(ok)} once each: {balances}")
    remaining = sum(g["remaining"] for g in grants)
    if remaining != runs - len(ok):
        problems.append(f"grant remaining {remaining} != {runs} - {len(ok)} successes")
    ledger = store.ledger_for_grant(grant_id)
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
    if recorded != {run_id: "consumed" for run_id in charged}:
        problems.append(f"run records ({len(recorded)}) do not match the {len(charged)} charged run_ids in state consumed")
    return problems


def scenario_design(emu: emulator.Emulator, consumers: int, runs: int, *, shards: bool = True) -> ScenarioResult:
    """A: `consumers` threads consume distinct run_ids against one grant of `runs` runs (sharded as issue does, or not)."""
    emu.clear()
    principal = f"bench-design-{consumers}-{runs}@example.com"
    max_shards = store.MAX_SHARDS
    store.MAX_SHARDS = max_shards if shards else 1
    try:
        grant_id = issue_grant(principal, runs)
    finally:
        store.MAX_SHARDS = max_shards
    shard_count = len(store.all_grants(principal))
    with counting_commits() as counter:
        outcomes, wall = run_together(
            consumers, lambda i: consume_once(principal, f"job-{i:04d}", i), deadline_seconds=DESIGN_DEADLINE_SECONDS
        )
    name = f"A optimistic commit, {shard_count} grant document{'s' if shard_count > 1 else ''}"
    return _design_result(name, consumers, runs, outcomes, wall, counter, principal, grant_id)


# ---------------------------------------------------------------------------------------------
# Scenario C: one consumer, one request after another
# ---------------------------------------------------------------------------------------------


def scenario_sequential(emu: emulator.Emulator, count: int) -> ScenarioResult:
    """C: `count` consumes one after another on one grant: the uncontended cost (two reads and one commit)."""
    emu.clear()
    principal = "bench-sequential@example.com"
    grant_id = issue_grant(principal, count)
    outcomes: list[Outcome] = []
    began = time.perf_counter()
    with counting_commits() as counter:
        for i in range(count):
            if time.perf_counter() - began > SEQUENTIAL_DEADLINE_SECONDS:
                outcomes += [Outcome(j, "unfinished", 0.0, f"not run: past the {SEQUENTIAL_DEADLINE_SECONDS:.0f}s deadline") for j in range(i, count)]
                break
            outcomes.append(consume_once(principal, f"seq-{i:04d}", i))
    wall = time.perf_counter() - began
    return _design_result("C sequential", 1, count, outcomes, wall, counter, principal, grant_id)


def _design_result(
    name: str, consumers: int, runs: int, outcomes: list[Outcome], wall: float, counter: Any, principal: str, grant_id: str
) -> ScenarioResult:
    """A result of the design's scenarios (A, C), with its invariants checked once every request has finished."""
    result = ScenarioResult(
        name=name,
        consumers=consumers,
        runs=runs,
        outcomes=outcomes,
        wall_seconds=wall,
        commit_attempts=counter.attempts,
        lost_races=counter.lost,
        max_tries=max(counter.tries_by_run.values(), default=0),
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


def _consume_in_transaction(
    transaction: firestore.Transaction, *, principal: str, grant_ref: firestore.DocumentReference, run_id: str, tries: TryCounter
) -> int | None:
    """Read the grant inside the transaction, then take a run, create the run record and the ledger entry: the new balance, or None at 0."""
    tries.add(run_id)
    snapshot = grant_ref.get(transaction=transaction, timeout=TRANSACTION_READ_TIMEOUT_SECONDS)
    remaining = int(snapshot.get("remaining"))
    if remaining < 1:
        return None
    client = store.client()
    transaction.update(grant_ref, {"remaining": remaining - 1})
    transaction.create(
        client.collection(store.PRINCIPALS).document(principal).collection(store.RUNS).document(store.run_doc_id(run_id)),
        {"run_id": run_id, "principal": principal, "state": "consumed", "grant_id": grant_ref.id, "consumed_at": firestore.SERVER_TIMESTAMP},
    )
    transaction.create(
        client.collection(store.LEDGER).document(store.sha256_hex(f"txn-consume|{principal}|{run_id}")),
        {"principal": principal, "grant": grant_ref.id, "delta": -1, "reason": "consume", "ref": run_id, "at": firestore.SERVER_TIMESTAMP},
    )
    return remaining - 1


def transaction_consume_once(principal: str, grant_ref: firestore.DocumentReference, run_id: str, index: int, tries: TryCounter) -> Outcome:
    """One consume by transaction (the client's default of 5 attempts), timed and classified."""
    began = time.perf_counter()
    # A fresh `transactional` per call: the wrapper keeps the current transaction id on itself, so one
    # shared instance would mix up concurrent callers.
    body = firestore.transactional(_consume_in_transaction)
    try:
        balance = body(store.client().transaction(), principal=principal, grant_ref=grant_ref, run_id=run_id, tries=tries)
    except Exception as exc:  # noqa: BLE001 - counting these is the point of the scenario
        return Outcome(index, "error", time.perf_counter() - began, describe(exc))
    if balance is None:
        return Outcome(index, "exhausted", time.perf_counter() - began)
    return Outcome(index, "ok", time.perf_counter() - began, value=balance)


def transaction_invariants(principal: str, grant_ref: firestore.DocumentReference, runs: int, outcomes: list[Outcome]) -> list[str]:
    """A transaction is slow under contention, not wrong: the same balance invariants must hold."""
    problems: list[str] = []
    ok = sum(o.kind == "ok" for o in outcomes)
    remaining = int(grant_ref.get(timeout=CHECK_TIMEOUT_SECONDS).get("remaining"))
    if remaining != runs - ok:
        problems.append(f"grant remaining {remaining} != {runs} - {ok} successes")
    ledger = [s.to_dict() for s in store.client().collection(store.LEDGER).where(filter=FieldFilter("principal", "==", principal)).get(timeout=CHECK_TIMEOUT_SECONDS)]
    if sum(e["delta"] for e in ledger) != remaining:
        problems.append(f"ledger sum {sum(e['delta'] for e in ledger)} != grant remaining {remaining}")
    if ok > runs:
        problems.append(f"{ok} successes for {runs} runs")
    return problems


def scenario_transaction(emu: emulator.Emulator, consumers: int, runs: int) -> ScenarioResult:
    """B: the same race, each consumer running a read-then-write transaction on the one grant document."""
    emu.clear()
    principal = "bench-transaction@example.com"
    client = store.client()
    grant_ref = client.collection(store.PRINCIPALS).document(principal).collection(store.GRANTS).document("txn-grant")
    setup = client.batch()
    setup.create(grant_ref, {"principal": principal, "plan_id": "standard", "runs_total": runs, "remaining": runs, "expires_at": None})
    setup.create(
        client.collection(store.LEDGER).document(store.sha256_hex(f"txn-issue|{principal}")),
        {"principal": principal, "grant_id": grant_ref.id, "delta": runs, "reason": "issue", "ref": grant_ref.id, "at": firestore.SERVER_TIMESTAMP},
    )
    setup.commit()
    tries = TryCounter()
    outcomes, wall = run_together(
        consumers,
        lambda i: transaction_consume_once(principal, grant_ref, f"job-{i:04d}", i, tries),
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
            result.invariants.extend(transaction_invariants(principal, grant_ref, runs, outcomes))
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
    if result.invariants:
        invariants = "**BROKEN**"
    else:
        invariants = result.invariant_note
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


def machine_line() -> str:
    """nproc, Python, client library, Java and OS, for the record."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    java = "unknown"
    java_path = shutil.which("java")
    if java_path:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            probe = subprocess.run([java_path, "-version"], capture_output=True, text=True, timeout=10)
            java = (probe.stderr or probe.stdout).splitlines()[0].strip()
    library = importlib.metadata.version("google-cloud-firestore")
    return f"Machine: nproc {cpus}, Python {platform.python_version()}, google-cloud-firestore {library}, {java}, {platform.platform()}."


def print_report(results: list[ScenarioResult], total_seconds: float) -> None:
    """The results table, the details of anything unexpected, and what the figures mean."""
    order = {"A": 0, "B": 1, "C": 2}
    print()
    print(f"## Contention benchmark ({dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC)")
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
    print(
        "- Tries: commits attempted (A, C; counted by wrapping store.commit_consume) or transaction bodies run (B);"
        " lost races: tries that did not end the request (a failed precondition, or an aborted transaction)."
        " Commits/s: successful consumes per second of wall time. p50/p95: per-request latency of requests that"
        " got an answer (200 or 402)."
    )
    print(
        "- Invariants: A and C: exactly min(N, R) × 200 and the rest 402, grant remaining = R − successes = sum of"
        " the grant's ledger deltas, one ledger entry and one `consumed` run record per charged run_id, returned"
        " balances R−1, R−2, … once each. B: remaining = R − successes = ledger sum."
    )
    print(f"- {machine_line()} Total benchmark time {total_seconds:.1f}s.")
    print(
        "- These are Firestore **emulator** figures on one machine: the emulator runs in-process with locks and"
        " serialises commits differently from production Firestore, where a single document sustains about one"
        " write per second and contended transactions abort (ABORTED / contention) rather than wait. Read them for"
        " the shape (who wins, how many retries, whether anything fails), not as production throughput."
    )


# ---------------------------------------------------------------------------------------------
# Emulator lifecycle and main
# ---------------------------------------------------------------------------------------------


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM unwinds like Ctrl-C, so that `finally` stops the emulator."""
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while the emulator starts, so it is never left running without a handle to stop it."""
    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if pending:
        raise KeyboardInterrupt(f"signal {pending[0]} during emulator start")


def use_emulator(emu: emulator.Emulator) -> None:
    """Point the service's configuration and Firestore client at `emu` (both are cached on first use)."""
    os.environ["FIRESTORE_EMULATOR_HOST"] = emu.host
    os.environ[config.ENV_PROJECT] = PROJECT
    config.get_config.cache_clear()
    store.client.cache_clear()


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
    results.append(scenario_design(emu, consumers, runs, shards=False))
    print(f"C: {SEQUENTIAL_CONSUMES} sequential consumes …", file=sys.stderr, flush=True)
    results.append(scenario_sequential(emu, SEQUENTIAL_CONSUMES))
    print(f"B: {TRANSACTION_SHAPE[0]} transactions vs {TRANSACTION_SHAPE[1]} runs (at most {TRANSACTION_DEADLINE_SECONDS:.0f}s) …", file=sys.stderr, flush=True)
    results.append(scenario_transaction(emu, *TRANSACTION_SHAPE))
    return results


def main() -> int:
    """Start an emulator, run the scenarios, print the table; 1 when the design broke an invariant or erred."""
    began = time.perf_counter()
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    log_dir = Path(tempfile.mkdtemp(prefix="gbx-bench-"))
    log_path = log_dir / "firestore-emulator.log"
    emu: emulator.Emulator | None = None
    failed = True
    try:
        with deferred_signals():
            emu = emulator.start(project=PROJECT, log_path=log_path)
        use_emulator(emu)
        results = run_all(emu)
        print_report(results, time.perf_counter() - began)
        failed = any((r.invariants or r.count("error") or r.count("unfinished")) if r.fatal else r.invariants for r in results)
    except emulator.EmulatorMissing as exc:
        print(exc, file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        failed = False  # nothing to diagnose: drop the log with the emulator
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        if emu is not None:
            emu.stop()
        if failed:
            print(f"(emulator log kept at {log_path})", file=sys.stderr)
        else:
            shutil.rmtree(log_dir, ignore_errors=True)
    if failed:
        print("FAILED: the optimistic-commit design broke an invariant or ended a request in an error (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
