"""The seal log's benchmark: run_complete with the log ÷ without, integration delay at 1 and 200 runners, proofs at 10^3 and 10^5 entries.

Run it from the repository root: `python -m bench.sealog` (or `make bench`, which runs every benchmark).

1. run_complete through the app's test client, with the log (its pending entry in the commit, the background
   integration after the answer) ÷ without it (the same commit without the entry, no integration), interleaved.
2. Integration: the time from run_complete's answer to a published checkpoint that covers the seal, for runners
   completing one at a time and for 200 completing at once (p50 and p99). An observer reads the log's size every 20 ms.
3. A proof for one seal (GET /api/log/proof) in a log of 10^3 entries and in one of 10^5 (tiles written directly, as
   integration writes them), interleaved, with the tiles each proof reads.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import random
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import harness
from bench.latency import OUTPUTS_SHA256, PROJECT, Api, Request, service_configured
from gbx_client import tlog
from shared import config, log_signing, log_store, sealog, store

COMPLETE_ROUNDS = 31
ONE_RUNNER_SEALS = 20
FAN_OUT = 200
PROOF_ROUNDS = 31
OBSERVE_SECONDS = 0.02
LOG_GOAL = 1.1  # run_complete with the log ÷ without (median)
PROOF_GOAL = 1.5  # a proof at 10^5 entries ÷ at 10^3 (median)
INTEGRATION_GOAL = 10.0  # seconds from run_complete's answer to a published checkpoint covering the seal (p99)


@contextlib.contextmanager
def without_the_log() -> Iterator[None]:
    """run_complete as it was before the log: its commit without the pending entry, no background integration."""
    original_commit, original_background = store.commit_run_complete, sealog.integrate_in_background

    def commit(principal: str, run: store.Run, *, outputs_sha256: str, completed_at: Any, seal: dict[str, Any], extra: store.Extra = None) -> None:
        batch = store.client().batch()
        batch.update(
            store._run_ref(principal, run.run_id),
            {"state": "completed", "outputs_sha256": outputs_sha256, "completed_at": completed_at, "seal_id": seal["seal_id"]},
            option=store.client().write_option(last_update_time=run.update_time),
        )
        batch.create(store.client().collection(store.SEALS).document(seal["seal_id"]), {**seal, "created_at": store.firestore.SERVER_TIMESTAMP})
        if extra is not None:  # the events' outbox, as the real commit writes it
            extra(batch)
        store._commit(batch)

    store.commit_run_complete = commit  # type: ignore[assignment]
    sealog.integrate_in_background = lambda seal_id: threading.Thread()  # type: ignore[assignment]
    try:
        yield
    finally:
        store.commit_run_complete = original_commit  # type: ignore[assignment]
        sealog.integrate_in_background = original_background  # type: ignore[assignment]


def measure_complete(api: Api, rng: random.Random, rounds: int) -> tuple[list[float], list[float]]:
    """run_complete's answer time with and without the log, in random order each round."""
    principal = "complete@bench.example"
    api.issue_one_document(principal, 1_000_000)
    with_log: list[float] = []
    without: list[float] = []
    for i in range(-3, rounds):
        sides: list[tuple[list[float], bool]] = [(with_log, True), (without, False)]
        rng.shuffle(sides)
        for samples, logged in sides:
            run_id = api.started(principal, f"c-{i}-{logged}")
            request = api.json_request("run_complete", {"run_id": run_id, "outputs_sha256": OUTPUTS_SHA256}, principal=principal)
            with contextlib.nullcontext() if logged else without_the_log():
                began = time.perf_counter()
                api.send(request)
                elapsed = time.perf_counter() - began
            if i >= 0:
                samples.append(elapsed)
            sealog.join_background(30.0)  # each round starts with no integration running
    return with_log, without


class Observer:
    """Reads the log's size every 20 ms and remembers when each size was first seen."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            size = log_store.read_state().size
            if not self.seen or size > self.seen[-1][1]:
                self.seen.append((time.perf_counter(), size))
            time.sleep(OBSERVE_SECONDS)

    def __enter__(self) -> Observer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def covered_at(self, index: int) -> float:
        """When a checkpoint covering entry `index` was first seen."""
        return next(at for at, size in self.seen if size > index)


def measure_integration(api: Api, runners: int, *, at_once: bool) -> list[float]:
    """Seconds from each run_complete's answer to a checkpoint covering its seal."""
    principals = [f"runner-{'many' if at_once else 'one'}-{k}@bench.example" for k in range(runners)]
    for p in principals:
        api.issue_one_document(p, 10)
        api.started(p, "fan")
    answered: dict[str, float] = {}
    lock = threading.Lock()
    # Each runner arrives with its request and ID token made (runners mint tokens on their own machines, so minting is
    # no part of the service's burst), and sends it through a test client of its own on the one app.
    requests = {p: api.json_request("run_complete", {"run_id": "fan", "outputs_sha256": OUTPUTS_SHA256}, principal=p) for p in principals}

    def complete(p: str) -> None:
        bundle = Api(api.issuer, like=api).send(requests[p])
        with lock:
            answered[bundle["seal_id"]] = time.perf_counter()

    with Observer() as observer:
        if at_once:
            threads = [threading.Thread(target=complete, args=(p,)) for p in principals]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        else:
            for p in principals:
                complete(p)
                sealog.join_background(30.0)
        if not sealog.join_background(60.0):
            raise harness.BenchmarkFailed("background integrations still running after 60 s")
        time.sleep(OBSERVE_SECONDS * 3)
    delays = []
    for seal_id, at in answered.items():
        index = log_store.read_index(seal_id)
        if index is None:
            raise harness.BenchmarkFailed(f"seal {seal_id} was never integrated")
        delays.append(max(0.0, observer.covered_at(index) - at))
    return delays


def populate(size: int, targets: list[int]) -> dict[int, str]:
    """A log of `size` entries written as integration writes it (tiles, bundles, state, signed checkpoint); seal ids for `targets`."""
    entries = [hashlib.sha256(f"bench-{size}-{i}".encode()).digest() for i in range(size)]
    tiles: dict[tuple[int, int], bytes] = {}

    def read(level: int, index: int, width: int) -> bytes:
        return tiles[(level, index)][: width * 32]

    tiles.update(tlog.append_to_tiles(read, 0, [tlog.leaf_hash(e) for e in entries]))
    docs = {log_store.tile_doc_id(level, index): data for (level, index), data in tiles.items()}
    for n in range(0, size, tlog.TILE_WIDTH):
        docs[log_store.tile_doc_id(tlog.ENTRIES, n // tlog.TILE_WIDTH)] = tlog.entry_bundle(entries[n : n + tlog.TILE_WIDTH])
    root = tlog.TileHashes(read, size).root()
    note = sealog.sign_checkpoint(tlog.Checkpoint(sealog.origin(), size, root))
    ids = {index: f"bench-seal-{size}-{index}".ljust(22, "x") for index in targets}
    db = store.client()
    items = list(docs.items())
    for start in range(0, len(items), 400):
        batch = db.batch()
        for doc_id, data in items[start : start + 400]:
            batch.set(db.collection(log_store.LOG_TILES).document(doc_id), {"data": data})
        batch.commit()
    batch = db.batch()
    batch.set(db.collection(log_store.LOG).document(log_store.STATE), {"size": size, "root": root, "checkpoint": note})
    for index, seal_id in ids.items():
        batch.set(db.collection(log_store.LOG_ENTRIES).document(seal_id), {"index": index, "entry": entries[index].hex()})
    batch.commit()
    return ids


def use_project(project: str) -> None:
    """Point the service at another project of the same emulator (untimed)."""
    os.environ[config.ENV_PROJECT] = project
    config.get_config.cache_clear()
    store.client.cache_clear()


def measure_proofs(api: Api, rng: random.Random, rounds: int) -> dict[int, tuple[list[float], list[int]]]:
    """Proof times and tile reads per proof, at 10^3 and 10^5 entries, interleaved."""
    sizes = {1000: f"{PROJECT}-log3", 100_000: f"{PROJECT}-log5"}
    targets: dict[int, dict[int, str]] = {}
    for size, project in sizes.items():
        use_project(project)
        print(f"  writing a log of {size} entries …", file=sys.stderr, flush=True)
        targets[size] = populate(size, [0, size // 3, size // 2 + 7, size - 1])
    reads = [0]
    original = log_store.read_tile

    def counted(level: int | str, index: int) -> bytes | None:
        reads[0] += 1
        return original(level, index)

    log_store.read_tile = counted  # type: ignore[assignment]
    results: dict[int, tuple[list[float], list[int]]] = {size: ([], []) for size in sizes}
    try:
        for i in range(-3, rounds):
            order = list(sizes.items())
            rng.shuffle(order)
            for size, project in order:
                use_project(project)
                seal_id = rng.choice(list(targets[size].values()))
                request = Request("GET", f"/api/log/proof?seal_id={seal_id}", {})
                reads[0] = 0
                began = time.perf_counter()
                response = api.client.open(request.path, method="GET")
                elapsed = time.perf_counter() - began
                if response.status_code != 200:
                    raise harness.BenchmarkFailed(f"proof at {size} entries answered {response.status_code}: {response.get_data(as_text=True)[:200]}")
                if i >= 0:
                    results[size][0].append(elapsed)
                    results[size][1].append(reads[0])
    finally:
        log_store.read_tile = original  # type: ignore[assignment]
        use_project(PROJECT)
    return results


def warm_up() -> None:
    """A few untimed writes: a fresh emulator's first commits can take longer than a call's deadline."""
    for attempt in range(10):
        try:
            store.client().collection("warmup").document(str(attempt)).set({"at": time.time()}, timeout=60)
            return
        except Exception:  # noqa: BLE001 - retried: the emulator is still starting up
            time.sleep(1)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds >= 0.1 else f"{seconds * 1000:.1f} ms"


def main(argv: list[str] | None = None) -> int:
    """Start an emulator, measure, print the report; 1 when a request failed or a seal was never integrated."""
    parser = argparse.ArgumentParser(prog="python -m bench.sealog", description=__doc__.splitlines()[0],
                                     epilog="Exit status: 0 measured (goals are reported), 1 a request failed, 3 no emulator, 130 interrupted.")
    parser.add_argument("--rounds", type=int, default=COMPLETE_ROUNDS, help=f"interleaved run_complete pairs (default {COMPLETE_ROUNDS})")
    parser.add_argument("--runners", type=int, default=FAN_OUT, help=f"runners completing at once (default {FAN_OUT})")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random orders")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    began = time.perf_counter()

    def body() -> None:
        with (
            tempfile.TemporaryDirectory(prefix="gbx-bench-keys-") as folder,
            service_configured(Path(folder)) as issuer,
            harness.running_emulator(PROJECT, name="sealog"),
        ):
            log_signing.get_log_signer.cache_clear()
            warm_up()
            with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
                api = Api(issuer)
                print("run_complete with and without the log …", file=sys.stderr, flush=True)
                with_log, without = measure_complete(api, rng, args.rounds)
                print("integration, one runner at a time …", file=sys.stderr, flush=True)
                one = measure_integration(api, ONE_RUNNER_SEALS, at_once=False)
                print(f"integration, {args.runners} runners at once …", file=sys.stderr, flush=True)
                many = measure_integration(api, args.runners, at_once=True)
                print("proofs at 10^3 and 10^5 entries …", file=sys.stderr, flush=True)
                proofs = measure_proofs(api, rng, PROOF_ROUNDS)
            ratio = harness.median(with_log) / harness.median(without)
            proof_ratio = harness.median(proofs[100_000][0]) / harness.median(proofs[1000][0])
            print(f"\nThe seal log ({time.perf_counter() - began:.0f} s)")
            print(harness.machine_line())
            print(f"run_complete, median of {len(with_log)}: with the log {_ms(harness.median(with_log))}, without {_ms(harness.median(without))}: "
                  f"{ratio:.2f}× (goal ≤ {LOG_GOAL}×{'' if ratio <= LOG_GOAL else ', MISSED'})")
            for label, delays in ((f"1 runner ({len(one)} seals one after the other)", one), (f"{len(many)} runners at once", many)):
                print(f"answer → checkpoint, {label}: p50 {_ms(harness.percentile(delays, 0.5))}, p99 {_ms(harness.percentile(delays, 0.99))}, "
                      f"max {_ms(max(delays))} (goal p99 ≤ {INTEGRATION_GOAL:.0f} s{'' if harness.percentile(delays, 0.99) <= INTEGRATION_GOAL else ', MISSED'})")
            for size, (times, reads) in proofs.items():
                print(f"proof at {size:>7,} entries: median {_ms(harness.median(times))}, tile reads {min(reads)}–{max(reads)}")
            print(f"proof at 10^5 ÷ at 10^3: {proof_ratio:.2f}× (goal ≤ {PROOF_GOAL}×{'' if proof_ratio <= PROOF_GOAL else ', MISSED'})")

    return harness.exit_status(body)


if __name__ == "__main__":
    sys.exit(main())
