"""Fan-out benchmark: hundreds of runners of one principal consuming at once, over HTTP against the local server.

Run it from the repository root: `python -m bench.fanout` (or `make bench`, which runs every benchmark).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from google.cloud.firestore_v1.base_query import FieldFilter

from bench import harness
from gbx_client.identity import StaticToken
from gbx_client.service import RetryPolicy, Service
from shared import config, emulator, events, pubsub_emulator, store
from shared.endpoints import ENDPOINTS
from shared.local import LocalIssuer

PROJECT = "gbx-bench-fanout"
# (concurrent runners, consumes in all): every runner consumes its share one after another, as tasks of a job would.
LEVELS: tuple[tuple[int, int], ...] = ((1, 50), (50, 500), (200, 1000), (500, 1000))
# Many small grants that expire together (a partner issuing per order): runners, consumes, grants.
SMALL_GRANTS_LEVEL = (200, 1000)
SMALL_GRANTS = 100
# The race for the last runs: this many runners, one consume each, for this many runs.
LAST_RUNS_RACE = (100, 20)
THROUGHPUT_GOAL = 0.8  # 200 runners ÷ 50 runners
COMMITS_GOAL = 2.0  # commits tried per consume, 200 runners
RETRY_TIMEOUT_SECONDS = 120.0  # each consume, as gbx's default --retry-timeout
LEVEL_DEADLINE_SECONDS = 300.0
SERVER_START_SECONDS = 60.0
CONSUME_PATH = ENDPOINTS["consume"].path
ISSUE_PATH = ENDPOINTS["issue"].path


@dataclass
class Level:
    """One row: what the runners saw and what the server's log lines say."""

    name: str
    runners: int
    consumes: int
    label: str = ""
    wall_seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)  # final answers
    retried: Counter[str] = field(default_factory=Counter)  # what the clients retried ("HTTP 503", a connection error…)
    commits: int = 0  # commits tried by the charged consumes (the server's log lines)
    charged: int = 0  # consumes the log lines show as 200
    events: int = 0  # events recorded (and delivered: else a problem)
    events_seconds: float = 0.0  # from the level's end until the last of them arrived
    problems: list[str] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        """Answered consumes per second of wall time."""
        return sum(self.statuses.values()) / self.wall_seconds if self.wall_seconds else 0.0

    @property
    def commits_per_consume(self) -> float:
        """Commits tried per charged consume."""
        return self.commits / self.charged if self.charged else 0.0


class LocalServer:
    """`python -m shared.local serve` on the benchmark's emulator, its log lines collected per principal."""

    def __init__(self, emu: emulator.Emulator, local_dir: Path, *, with_events: bool = True) -> None:
        self.port = emulator.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Events on, on the benchmark's Pub/Sub emulator (PUBSUB_EMULATOR_HOST), whose subscription checks every one arrived.
        env = {**os.environ, "FIRESTORE_EMULATOR_HOST": emu.host, config.ENV_PROJECT: PROJECT, config.ENV_LOCAL_DIR: str(local_dir), config.ENV_EVENTS: "1" if with_events else "0"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "shared.local", "serve", "--port", str(self.port)],
            cwd=config.REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        self.lines: list[dict[str, Any]] = []
        self.other: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            with self._lock:
                if isinstance(entry, dict):
                    self.lines.append(entry)
                else:
                    self.other.append(line.rstrip())

    def wait_ready(self) -> None:
        """Poll /healthz until it answers 200."""
        deadline = time.monotonic() + SERVER_START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise harness.BenchmarkFailed(f"the local server exited: {self.other[-5:]}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise harness.BenchmarkFailed("the local server did not answer /healthz")

    def log_lines(self, principal: str) -> list[dict[str, Any]]:
        """The consume log lines of `principal`."""
        with self._lock:
            return [e for e in self.lines if e.get("endpoint") == "consume" and e.get("principal") == principal]

    def stop(self) -> None:
        """SIGTERM, then SIGKILL of its process group."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, 15)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, 9)
            self.process.wait(timeout=10)


@contextlib.contextmanager
def local_server(emu: emulator.Emulator, *, with_events: bool = True) -> Iterator[tuple[LocalServer, LocalIssuer]]:
    """The local server and the issuer whose tokens it accepts."""
    with tempfile.TemporaryDirectory(prefix="gbx-bench-fanout-") as folder:
        issuer = LocalIssuer(Path(folder))
        issuer.ensure()
        server = LocalServer(emu, Path(folder), with_events=with_events)
        try:
            server.wait_ready()
            yield server, issuer
        finally:
            server.stop()


@contextlib.contextmanager
def running_pubsub(folder: Path) -> Iterator[None]:
    """The Pub/Sub emulator the local server publishes to (PUBSUB_EMULATOR_HOST for it and for this process)."""
    try:
        pubsub = pubsub_emulator.start(log_path=folder / "pubsub.log")
    except emulator.EmulatorMissing as exc:
        raise harness.BenchmarkFailed(str(exc)) from exc
    os.environ["PUBSUB_EMULATOR_HOST"] = pubsub.host
    try:
        yield
    finally:
        pubsub.stop()


def issue(server: LocalServer, principal: str, runs: int) -> None:
    """Issue `runs` runs to `principal` over HTTP, as a partner does."""
    response = requests.post(
        server.url + ISSUE_PATH,
        json={"principal": principal, "runs_total": runs},
        headers={"X-GBX-ADMIN-TOKEN": config.LOCAL_ADMIN_TOKEN},
        timeout=60,
    )
    if response.status_code != 200:
        raise harness.BenchmarkFailed(f"issue answered {response.status_code}: {response.text[:200]}")


def run_level(server: LocalServer, issuer: LocalIssuer, level: Level, *, runs: int, grants: int = 1, deliveries: Any = None) -> None:
    """`level.runners` threads consume `level.consumes` run_ids of one principal with `runs` runs in `grants` grants, released at once."""
    principal = f"fanout-{level.name}@bench.example"
    for _ in range(grants):
        issue(server, principal, runs // grants)
    token = issuer.token(principal)
    lock = threading.Lock()
    shares = [level.consumes // level.runners + (1 if i < level.consumes % level.runners else 0) for i in range(level.runners)]
    barrier = threading.Barrier(level.runners + 1)

    def runner(index: int) -> None:
        def report(text: str) -> None:
            # "consume: HTTP 503; retrying in 1.0 s" or "consume: ConnectionError: …; retrying…"
            reason = text.split(": ", 1)[-1].split(";", 1)[0]
            with lock:
                level.retried[reason] += 1

        service = Service(server.url, identity=StaticToken(token), policy=RetryPolicy(timeout=RETRY_TIMEOUT_SECONDS), report=report)
        barrier.wait(timeout=60)
        for k in range(shares[index]):
            began = time.perf_counter()
            try:
                reply = service.post_json(CONSUME_PATH, {"run_id": f"task-{index}-{k}"}, step="consume")
                status = reply.status
            except Exception as exc:  # noqa: BLE001 - an unreachable service is a finding, counted
                status = 0
                with lock:
                    level.problems.append(f"runner {index}: {type(exc).__name__}: {exc}"[:200])
            with lock:
                level.statuses[status] += 1
                level.latencies.append(time.perf_counter() - began)

    threads = [threading.Thread(target=runner, args=(i,), daemon=True) for i in range(level.runners)]
    for thread in threads:
        thread.start()
    barrier.wait(timeout=60)
    began = time.perf_counter()
    for thread in threads:
        thread.join(timeout=max(0.0, began + LEVEL_DEADLINE_SECONDS - time.perf_counter()))
    level.wall_seconds = time.perf_counter() - began
    if any(thread.is_alive() for thread in threads):
        level.problems.append(f"runners still running after {LEVEL_DEADLINE_SECONDS:.0f} s")
    check_level(server, principal, level, runs=runs)
    if deliveries is not None:
        check_events(principal, level, deliveries, issues=grants)


EVENTS_DEADLINE_SECONDS = 90.0


def check_events(principal: str, level: Level, deliveries: Any, *, issues: int) -> None:
    """Every event the level's commits recorded (its issues, each charged run, one low and one exhausted) arrives."""
    recorded = {snap.id for snap in store.client().collection(events.EVENTS).where(filter=FieldFilter("principal", "==", principal)).get()}
    kinds = Counter(snap.get("type") for snap in store.client().collection(events.EVENTS).where(filter=FieldFilter("principal", "==", principal)).get())
    expected = {events.GRANT_ISSUED: issues, events.RUN_CONSUMED: min(level.charged, level.consumes), events.BALANCE_LOW: 1, events.BALANCE_EXHAUSTED: 1}
    if dict(kinds) != expected:
        level.problems.append(f"events recorded {dict(kinds)}, expected {expected}")
    began = time.monotonic()
    if deliveries.wait_for(recorded, EVENTS_DEADLINE_SECONDS) is None:
        missing = len(recorded - deliveries.first.keys())
        level.problems.append(f"{missing} of {len(recorded)} events not delivered within {EVENTS_DEADLINE_SECONDS:.0f} s")
    level.events = len(recorded)
    level.events_seconds = time.monotonic() - began


def check_level(server: LocalServer, principal: str, level: Level, *, runs: int) -> None:
    """Exact balance and ledger, one charge per run_id, and the commits the log lines record."""
    expected_sold = min(runs, level.consumes)
    if level.statuses[200] != expected_sold or level.statuses[402] != level.consumes - expected_sold:
        level.problems.append(f"expected {expected_sold} × 200 and {level.consumes - expected_sold} × 402, got {dict(level.statuses)}")
    time.sleep(0.5)  # the last log lines are written after the last replies
    lines = server.log_lines(principal)
    charged = [e for e in lines if e.get("status") == 200]
    level.charged = len(charged)
    level.commits = sum(int(e.get("commits", 0)) for e in lines)
    grants = store.all_grants(principal)
    remaining = sum(g["remaining"] for g in grants)
    if remaining != runs - expected_sold:
        level.problems.append(f"grants hold {remaining} runs, expected {runs - expected_sold}")
    runs_read = list(store.client().collection(store.PRINCIPALS).document(principal).collection(store.RUNS).get())
    if len(runs_read) != expected_sold:
        level.problems.append(f"{len(runs_read)} run records, expected {expected_sold}")
    ledger = subprocess.run(
        [sys.executable, "-m", "shared.ledger", "--project", PROJECT, principal],
        cwd=config.REPO_ROOT, capture_output=True, text=True, timeout=120, env={**os.environ},
    )
    if ledger.returncode != 0:
        level.problems.append(f"the ledger tool exited {ledger.returncode}: {ledger.stderr.strip()[:300]}")
    entries = store.client().collection(store.LEDGER).where(filter=FieldFilter("principal", "==", principal)).get()
    refs = Counter(e.get("ref") for e in entries if e.get("reason") == "consume")
    if len(refs) != expected_sold or any(n != 1 for n in refs.values()):
        level.problems.append(f"{sum(refs.values())} consume ledger entries for {len(refs)} run_ids, expected {expected_sold} once each")


def fmt_status(counts: Counter[int]) -> str:
    """`200 × 998, 402 × 2`."""
    return ", ".join(f"{status or 'no answer'} × {n}" for status, n in sorted(counts.items()))


def report(levels: list[Level], race: Level) -> list[str]:
    """The Markdown tables and the goals; returns every problem seen."""
    print("| Concurrent runners | Consumes | Wall (s) | Throughput (/s) | p50 (s) | p99 (s) | Final statuses | Retried by clients | Commits per consume | Events delivered |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: |")
    for level in [*levels, race]:
        retried = ", ".join(f"{reason} × {n}" for reason, n in level.retried.most_common()) or "none"
        p50 = harness.percentile(level.latencies, 0.5) if level.latencies else 0.0
        p99 = harness.percentile(level.latencies, 0.99) if level.latencies else 0.0
        label = level.label or str(level.runners)
        print(
            f"| {label} | {level.consumes} | {level.wall_seconds:.1f} | {level.throughput:.1f} | {p50:.2f} | {p99:.2f} "
            f"| {fmt_status(level.statuses)} | {retried} | {level.commits_per_consume:.2f} | {level.events} (last {level.events_seconds:.1f} s after) |"
        )
    print()
    by_runners = {level.runners: level for level in levels if not level.label}
    problems = [f"{level.runners} runners: {problem}" for level in [*levels, race] for problem in level.problems]
    if 50 in by_runners and 200 in by_runners and by_runners[50].throughput:
        ratio = by_runners[200].throughput / by_runners[50].throughput
        verdict = "met" if ratio >= THROUGHPUT_GOAL else "MISSED"
        print(f"Throughput of 200 runners ÷ 50 runners: {ratio:.2f}× (goal ≥ {THROUGHPUT_GOAL}×: {verdict}).")
    if 200 in by_runners:
        per = by_runners[200].commits_per_consume
        print(f"Commits tried per consume with 200 runners: {per:.2f} (goal ≤ {COMMITS_GOAL}: {'met' if per <= COMMITS_GOAL else 'MISSED'}).")
    for level in [*levels, race]:
        seen = [reason for reason in level.retried if reason.startswith(("HTTP 5", "HTTP 429"))]
        if seen:
            problems.append(f"{level.runners} runners: clients were answered {', '.join(seen)}")
    print(harness.machine_line())
    return problems


def main(argv: list[str] | None = None) -> int:
    """Run every level, then the race for the last runs; print the tables."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.fanout",
        description=__doc__.splitlines()[0],
        epilog="Exit status: 0 measured and every check held, 1 a check failed, 3 no Firestore emulator, 130 interrupted.",
    )
    parser.add_argument("--levels", default=",".join(str(r) for r, _ in LEVELS), help="comma-separated runner counts to run, of 1,50,200,500 (default: all)")
    parser.add_argument("--no-events", action="store_true", help="the service with GBX_EVENTS=0 (to compare; the default publishes every event and checks it arrives)")
    args = parser.parse_args(argv)
    wanted = {int(part) for part in args.levels.split(",") if part}

    def body() -> None:
        with (
            harness.running_emulator(PROJECT, name="fanout") as emu,
            tempfile.TemporaryDirectory(prefix="gbx-bench-pubsub-") as pubsub_folder,
            running_pubsub(Path(pubsub_folder)),
            local_server(emu, with_events=not args.no_events) as (server, issuer),
        ):
            from bench.events import Deliveries

            deliveries = None if args.no_events else Deliveries(PROJECT)
            levels = []
            for runners, consumes in LEVELS:
                if runners not in wanted:
                    continue
                print(f"{runners} runners, {consumes} consumes…", file=sys.stderr, flush=True)
                level = Level(name=f"r{runners}", runners=runners, consumes=consumes)
                # Exactly the runs they consume: the last runs are spent while hundreds still draw shards.
                run_level(server, issuer, level, runs=consumes, deliveries=deliveries)
                levels.append(level)
            runners, consumes = SMALL_GRANTS_LEVEL
            print(f"{runners} runners, {consumes} consumes of {SMALL_GRANTS} grants of {consumes // SMALL_GRANTS} runs…", file=sys.stderr, flush=True)
            small = Level(name="small", runners=runners, consumes=consumes, label=f"{runners} ({SMALL_GRANTS} grants of {consumes // SMALL_GRANTS})")
            run_level(server, issuer, small, runs=consumes, grants=SMALL_GRANTS, deliveries=deliveries)
            levels.append(small)
            runners, runs = LAST_RUNS_RACE
            print(f"{runners} runners race for the last {runs} runs…", file=sys.stderr, flush=True)
            race = Level(name="race", runners=runners, consumes=runners, label=f"{runners} (race for the last {runs})")
            run_level(server, issuer, race, runs=runs, deliveries=deliveries)
            if deliveries is not None:
                deliveries.close()
            problems = report(levels, race)
            if problems:
                raise harness.BenchmarkFailed("; ".join(problems))

    return harness.exit_status(body)


if __name__ == "__main__":
    sys.exit(main())
