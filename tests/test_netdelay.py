"""bench/netdelay.py, the proxy through which bench.latency measures the reads-at-once endpoints: it passes gRPC to
the emulator unchanged and adds its delay each way (the README's "through a network" figures rest on both)."""

from __future__ import annotations

import statistics
import time

import pytest
from google.cloud import firestore

from bench import netdelay
from shared import emulator

DELAY = 0.02  # seconds each way: large beside a local read, so the test tells it apart from noise


def _median_read_seconds(document: firestore.DocumentReference, reads: int = 5) -> float:
    times = []
    for _ in range(reads):
        began = time.perf_counter()
        document.get(timeout=30)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def _client(project: str, host: str, monkeypatch: pytest.MonkeyPatch) -> firestore.Client:
    """A client of the emulator at `host` (the client takes its address from FIRESTORE_EMULATOR_HOST when made)."""
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", host)
    return firestore.Client(project=project)


def test_the_proxy_passes_reads_and_writes_and_adds_its_delay_each_way(firestore_emulator: emulator.Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    project = "gbx-netdelay-test"
    direct = _client(project, firestore_emulator.host, monkeypatch)
    direct.collection("probe").document("d").set({"n": 1})
    with netdelay.delayed(firestore_emulator.host, DELAY) as address:
        proxied = _client(project, address, monkeypatch)
        document = proxied.collection("probe").document("d")
        assert document.get(timeout=30).to_dict() == {"n": 1}
        document.set({"n": 2})
        assert direct.collection("probe").document("d").get(timeout=30).to_dict() == {"n": 2}
        through = _median_read_seconds(document)
    # A read is at least one round trip through the proxy: two delays more than the direct read.
    assert through >= 2 * DELAY, through
    assert through - _median_read_seconds(direct.collection("probe").document("d")) >= 1.5 * DELAY
