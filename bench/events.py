"""Events benchmark: consume with events on ÷ off and with Pub/Sub stopped, how long events wait, the catch-up after an outage.

Run it from the repository root: `python -m bench.events` (or `make bench`, which runs every benchmark). It starts the
Firestore and Pub/Sub emulators and calls the service in-process (its test client), one consume at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import harness
from shared import config, events, pubsub_emulator, signing
from shared.emulator import EmulatorMissing
from shared.local import LocalIssuer, create_app

PROJECT = "gbx-bench-events"
AUDIENCE = "https://gbx-bench-events.example"
ADMIN_TOKEN = "bench-events-admin-token"
DEFAULT_ROUNDS = 150
DEFAULT_OUTAGE_SECONDS = 60.0
# The sweeper's cadence in this benchmark: local mode's (production: Cloud Scheduler every minute).
SWEEP_EVERY_SECONDS = 10.0
RATIO_ON_GOAL = 1.15
RATIO_STOPPED_GOAL = 1.3


class Deliveries:
    """A pull subscription on the events topic, read by a streaming pull: when each ce-id first arrived."""

    def __init__(self, project: str = PROJECT) -> None:
        from google.cloud import pubsub_v1  # type: ignore[attr-defined]

        self.client = pubsub_v1.SubscriberClient()
        self.name = self.client.subscription_path(project, f"bench-{random.randrange(1 << 30)}")
        self.client.create_subscription(request={"name": self.name, "topic": events.topic_path(), "enable_message_ordering": True}, timeout=10)
        self.first: dict[str, tuple[float, dt.datetime]] = {}  # ce-id → (arrival, monotonic; ce-time)
        self._lock = threading.Lock()
        self._future = self.client.subscribe(self.name, callback=self._on_message)

    def _on_message(self, message: Any) -> None:
        arrived = time.monotonic()
        ce_time = dt.datetime.fromisoformat(message.attributes["ce-time"].replace("Z", "+00:00"))
        with self._lock:
            self.first.setdefault(message.attributes["ce-id"], (arrived, ce_time))
        message.ack()

    def waits(self, ids: set[str]) -> list[float]:
        """Seconds from each event's ce-time (the change's time) to its first arrival, with the monotonic offset applied."""
        offset = time.time() - time.monotonic()
        with self._lock:
            return [self.first[i][0] + offset - self.first[i][1].timestamp() for i in ids if i in self.first]

    def wait_for(self, ids: set[str], timeout: float) -> float | None:
        """Monotonic time at which the last of `ids` arrived, or None after `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if ids <= self.first.keys():
                    return max(self.first[i][0] for i in ids)
            time.sleep(0.1)
        return None

    def close(self) -> None:
        self._future.cancel()


@contextlib.contextmanager
def service(folder: Path, pubsub_host: str) -> Iterator[Any]:
    """The service's environment in this process (events on, the emulator's Pub/Sub) and its test client."""
    issuer = LocalIssuer(folder / "issuer")
    issuer.ensure()
    values = {
        config.ENV_PROJECT: PROJECT, config.ENV_AUDIENCES: AUDIENCE, config.ENV_CERTS_URL: str(issuer.certs_path),
        config.ENV_ADMIN_TOKEN: ADMIN_TOKEN, config.ENV_SIGNER: "local", config.ENV_LOCAL_DIR: str(folder / "local"),
        config.ENV_ISSUER: "gbx-bench", "PUBSUB_EMULATOR_HOST": pubsub_host, config.ENV_EVENTS: "1",
    }
    os.environ.update(values)
    os.environ.pop(config.ENV_LOCAL_MODE, None)
    config.get_config.cache_clear()
    signing.get_signer.cache_clear()
    yield issuer, create_app().test_client()


def set_events(on: bool) -> None:
    """Events on or off for the next requests (the configuration is read once per change)."""
    os.environ[config.ENV_EVENTS] = "1" if on else "0"
    config.get_config.cache_clear()


class Consumer:
    """One principal's consumes through the test client, timed."""

    def __init__(self, client: Any, issuer: LocalIssuer, principal: str) -> None:
        self.client, self.principal = client, principal
        self.headers = {"Content-Type": "application/json", "Authorization": f"Bearer {issuer.token(principal, audience=AUDIENCE)}"}
        self.count = 0
        self.run_ids: list[str] = []

    def issue(self, runs: int) -> None:
        response = self.client.post("/api/entitlement/issue", json={"principal": self.principal, "runs_total": runs},
                                    headers={"X-GBX-ADMIN-TOKEN": ADMIN_TOKEN})
        if response.status_code != 200:
            raise harness.BenchmarkFailed(f"issue answered {response.status_code}")

    def consume(self) -> float:
        run_id = f"run-{self.count}"
        self.count += 1
        began = time.perf_counter()
        response = self.client.post("/api/entitlement/consume", json={"run_id": run_id}, headers=self.headers)
        elapsed = time.perf_counter() - began
        if response.status_code != 200:
            raise harness.BenchmarkFailed(f"consume answered {response.status_code}: {response.get_data(as_text=True)[:200]}")
        self.run_ids.append(run_id)
        return elapsed


def consumed_ids(consumer: Consumer) -> set[str]:
    return {events.event_id(events.RUN_CONSUMED, consumer.principal, run_id) for run_id in consumer.run_ids}


def main(argv: list[str] | None = None) -> int:
    """Measure and print the table; 1 when a request failed or an event was lost (missed goals are reported)."""
    parser = argparse.ArgumentParser(prog="python -m bench.events", description=__doc__.splitlines()[0],
                                     epilog="Exit status: 0 measured, 1 a request failed or an event was not delivered, 3 no emulator, 130 interrupted.")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help=f"interleaved consumes per side (default {DEFAULT_ROUNDS})")
    parser.add_argument("--outage", type=float, default=DEFAULT_OUTAGE_SECONDS, help=f"seconds Pub/Sub is stopped for the catch-up (default {DEFAULT_OUTAGE_SECONDS:.0f})")
    args = parser.parse_args(argv)
    rng = random.Random()

    def body() -> None:
        with tempfile.TemporaryDirectory(prefix="gbx-bench-events-") as folder, harness.running_emulator(PROJECT, name="events"):
            try:
                pubsub = pubsub_emulator.start(log_path=Path(folder) / "pubsub.log")
            except EmulatorMissing as exc:
                raise harness.BenchmarkFailed(str(exc)) from exc
            assert pubsub.process is not None
            try:
                with service(Path(folder), pubsub.host) as (issuer, client), open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
                    events.ensure_topic()
                    deliveries = Deliveries()
                    lines = run(client, issuer, deliveries, pubsub.process.pid, rounds=args.rounds, outage=args.outage, rng=rng)
                    deliveries.close()
                print("\n".join(lines))
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pubsub.process.pid, signal.SIGCONT)
                pubsub.stop()

    return harness.exit_status(body)


def run(client: Any, issuer: LocalIssuer, deliveries: Deliveries, pid: int, *, rounds: int, outage: float, rng: random.Random) -> list[str]:
    """The three measurements; the report's lines."""
    off, on, stopped_side = (Consumer(client, issuer, f"{name}@bench.example") for name in ("off", "on", "stopped"))
    for consumer in (off, on, stopped_side):
        set_events(True)
        consumer.issue(20 * rounds + 400)  # far above the low line: the fast path, as almost every consume is
    for consumer in (off, on):  # warm-up
        set_events(consumer is on)
        for _ in range(10):
            consumer.consume()
    times: dict[str, list[float]] = {"off": [], "on": [], "stopped": [], "off (stopped round)": []}
    print("consume, events off and on…", file=sys.stderr, flush=True)
    for _ in range(rounds):
        for side in rng.sample(["off", "on"], 2):
            set_events(side == "on")
            times[side].append((on if side == "on" else off).consume())
    events.publisher().flush(timeout=30)
    on_ids = consumed_ids(on)
    if deliveries.wait_for(on_ids, 30) is None:
        raise harness.BenchmarkFailed("events of the events-on consumes were not all delivered")
    waits = deliveries.waits(on_ids - consumed_ids_prefix(on, 10))
    print("consume with Pub/Sub stopped…", file=sys.stderr, flush=True)
    os.kill(pid, signal.SIGSTOP)
    try:
        for _ in range(rounds):
            for side in rng.sample(["off (stopped round)", "stopped"], 2):
                set_events(side == "stopped")
                times[side].append((stopped_side if side == "stopped" else off).consume())
        print(f"catch-up: Pub/Sub stays stopped {outage:.0f} s while consumes go on…", file=sys.stderr, flush=True)
        set_events(True)
        outage_began = time.monotonic()
        while time.monotonic() - outage_began < outage:
            stopped_side.consume()
            time.sleep(0.25)
    finally:
        os.kill(pid, signal.SIGCONT)
    back = time.monotonic()
    stop_sweeping = threading.Event()

    def sweeper() -> None:
        while not stop_sweeping.wait(SWEEP_EVERY_SECONDS):
            with contextlib.suppress(Exception):
                events.sweep()

    thread = threading.Thread(target=sweeper, daemon=True)
    thread.start()
    try:
        last = deliveries.wait_for(consumed_ids(stopped_side), 180)
    finally:
        stop_sweeping.set()
    if last is None:
        raise harness.BenchmarkFailed("events recorded while Pub/Sub was stopped were not all delivered within 180 s of its return")
    catch_up = last - back
    return report(times, waits, catch_up, outage=outage, events_during=len(stopped_side.run_ids))


def consumed_ids_prefix(consumer: Consumer, count: int) -> set[str]:
    """The ce-ids of the first `count` consumes (the warm-up)."""
    return {events.event_id(events.RUN_CONSUMED, consumer.principal, run_id) for run_id in consumer.run_ids[:count]}


def report(times: dict[str, list[float]], waits: list[float], catch_up: float, *, outage: float, events_during: int) -> list[str]:
    """The Markdown table and the goals."""
    lines: list[str] = []

    def print(line: str = "") -> None:  # the report's lines, printed once the service's own output is no longer silenced
        lines.append(line)

    med = {side: harness.median(values) * 1000 for side, values in times.items()}
    ratio_on = med["on"] / med["off"]
    ratio_stopped = med["stopped"] / med["off (stopped round)"]
    print("| consume | median (ms) | p99 (ms) | n |")
    print("| --- | ---: | ---: | ---: |")
    for side, values in times.items():
        print(f"| events {side} | {med[side]:.1f} | {harness.percentile(values, 0.99) * 1000:.1f} | {len(values)} |")
    print()
    print(f"- consume, events on ÷ off: {ratio_on:.2f}× (goal ≤ {RATIO_ON_GOAL}×: {'met' if ratio_on <= RATIO_ON_GOAL else 'MISSED'}).")
    print(f"- consume, Pub/Sub stopped ÷ events off: {ratio_stopped:.2f}× (goal ≤ {RATIO_STOPPED_GOAL}×: {'met' if ratio_stopped <= RATIO_STOPPED_GOAL else 'MISSED'}).")
    print(f"- events wait before delivery (ce-time → first arrival at a subscriber), Pub/Sub up: p50 {harness.percentile(waits, 0.5) * 1000:.0f} ms, "
          f"p99 {harness.percentile(waits, 0.99) * 1000:.0f} ms ({len(waits)} events).")
    print(f"- catch-up: {events_during} events recorded while Pub/Sub was stopped {outage:.0f} s were all delivered {catch_up:.1f} s after it "
          f"came back (sweeper every {SWEEP_EVERY_SECONDS:.0f} s here; Cloud Scheduler runs it every 60 s in production).")
    print(f"- {harness.machine_line()}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
