"""The seal log on the Firestore emulator and the KMS test server: entries, integration, checkpoints, tiles and proofs over HTTP."""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from google.api_core import exceptions as gexc

from gbx_client import tlog
from shared import log_store, sealog, store
from tests.conftest import RUNNER, Api, error_code
from tests.kms_server import LOG_VERSION_1, FakeKms


@pytest.fixture(autouse=True)
def background_done() -> Iterator[None]:
    """No background integration of one test runs on into the next one's database."""
    yield
    assert sealog.join_background(40.0)


def vkey(api: Api) -> tlog.NoteVerifier:
    """The log's verifier, as the deployment publishes it."""
    log = requests.get(api.base_url + "/api/seal/public_keys", timeout=30).json()["log"]
    assert log["origin"] == "gbx-test.example/log"
    verifier = tlog.parse_vkey(log["vkey"])
    assert verifier.name == log["origin"]
    return verifier


def get(api: Api, path: str, **kwargs: Any) -> requests.Response:
    return requests.get(api.base_url + path, timeout=60, **kwargs)


def sealed(api: Api, count: int, *, principal: str = RUNNER) -> list[dict[str, Any]]:
    """`count` seals of one principal, completed one after the other."""
    api.issue(principal, count)
    bundles = []
    for i in range(count):
        run_id = f"log-{i}"
        for step in (api.consume(run_id, principal), api.run_start(run_id, principal), api.run_complete(run_id, as_user=principal)):
            assert step.status_code == 200, step.text
        bundles.append(step.json())
    return bundles


def checkpoint(api: Api) -> tlog.Checkpoint:
    response = get(api, "/log/checkpoint")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert response.headers["Cache-Control"] == "no-cache"
    return tlog.open_checkpoint(response.content, vkey(api))


def wait_for_size(api: Api, size: int, seconds: float = 15.0) -> tlog.Checkpoint:
    until = time.monotonic() + seconds
    while True:
        current = checkpoint(api)
        if current.size >= size or time.monotonic() > until:
            return current
        time.sleep(0.1)


def test_empty_log_serves_a_signed_checkpoint_of_size_zero(api: Api) -> None:
    """Before any seal: size 0, the empty tree's root, signed by the log key (never the seal key)."""
    assert checkpoint(api) == tlog.Checkpoint("gbx-test.example/log", 0, hashlib.sha256(b"").digest())
    keys = requests.get(api.base_url + "/api/seal/public_keys", timeout=30).json()
    assert LOG_VERSION_1 not in {k["key"] for k in keys["keys"]}


def test_a_seal_is_logged_and_its_proof_verifies(api: Api) -> None:
    """run_complete answers, the seal is in a checkpoint soon after; the proof verifies against the published vkey."""
    bundle = api.sealed_run("job-1")
    response = get(api, "/api/log/proof", params={"seal_id": bundle["seal_id"]})
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    proof = response.content
    assert proof.startswith(b"c2sp.org/tlog-proof@v1\nindex 0\n\n")
    entry = hashlib.sha256(bundle["seal_json"].encode()).digest()
    assert tlog.verify_proof(proof, entry=entry, verifier=vkey(api)).size == 1
    # A retried run_complete adds nothing.
    again = api.run_complete("job-1")
    assert again.status_code == 200 and again.json()["seal_id"] == bundle["seal_id"]
    assert sealog.join_background(30.0)
    assert checkpoint(api).size == 1


def test_tiles_and_bundles(api: Api) -> None:
    """Partial tiles of the checkpoint's size, entry bundles; beyond the tree 404; malformed 400; never 5xx."""
    bundles = sealed(api, 3)
    current = wait_for_size(api, 3)
    assert current.size == 3
    tile = get(api, "/log/tile/0/000.p/3")
    assert tile.status_code == 200 and tile.headers["Content-Type"] == "application/octet-stream"
    assert tile.headers["Cache-Control"] == "public, max-age=604800, immutable"
    entries = tlog.parse_entry_bundle(get(api, "/log/tile/entries/000.p/3").content)
    assert sorted(entries) == sorted(hashlib.sha256(b["seal_json"].encode()).digest() for b in bundles)
    assert [tile.content[i * 32 : i * 32 + 32] for i in range(3)] == [tlog.leaf_hash(e) for e in entries]
    assert tlog.root_of_leaves([tlog.leaf_hash(e) for e in entries]) == current.root
    assert get(api, "/log/tile/0/000.p/2").content == tile.content[:64]
    for beyond in ("/log/tile/0/000", "/log/tile/0/000.p/4", "/log/tile/0/001.p/1", "/log/tile/1/000.p/1", "/log/tile/entries/000"):
        response = get(api, beyond)
        assert response.status_code == 404, beyond
        assert error_code(response) == "not_found"
    for malformed in ("/log/tile/0/0", "/log/tile/0/000.p/0", "/log/tile/0/000.p/256", "/log/tile/99/000", "/log/tile/0/x000/000"):
        response = get(api, malformed)
        assert response.status_code == 400, malformed
    assert get(api, "/log/nothing").status_code == 404
    assert get(api, "/log/").status_code == 404
    assert requests.post(api.base_url + "/log/checkpoint", timeout=30).status_code == 405


def test_proof_errors(api: Api, kms: FakeKms, monkeypatch: pytest.MonkeyPatch) -> None:
    """A malformed seal id: 400; an unknown one: 404; one not yet integrated (the log key down): 503 with Retry-After."""
    assert get(api, "/api/log/proof", params={"seal_id": "short"}).status_code == 400
    assert get(api, "/api/log/proof", params={"seal_id": "x" * 65}).status_code == 400
    assert get(api, "/api/log/proof").status_code == 400
    unknown = get(api, "/api/log/proof", params={"seal_id": "A" * 32})
    assert unknown.status_code == 404 and error_code(unknown) == "not_found"
    monkeypatch.setattr(sealog, "PROOF_WAIT_SECONDS", 2.0)
    monkeypatch.setattr(sealog, "BACKGROUND_SECONDS", 1.0)
    kms.set_fault("unavailable", versions=(LOG_VERSION_1,))
    bundle = api.sealed_run("job-kms-down")  # seals keep being issued while the log's key is down
    response = get(api, "/api/log/proof", params={"seal_id": bundle["seal_id"]})
    assert response.status_code == 503 and response.headers["Retry-After"]
    assert sealog.join_background(10.0)
    kms.set_fault(None)
    # The next integrator's checkpoint covers it.
    response = get(api, "/api/log/proof", params={"seal_id": bundle["seal_id"]})
    assert response.status_code == 200, response.text


def test_run_complete_does_not_wait_for_the_log(api: Api, kms: FakeKms) -> None:
    """With the log key down, run_complete still answers at once; the entries wait, then one checkpoint covers them all."""
    kms.set_fault("unavailable", versions=(LOG_VERSION_1,))
    started = time.monotonic()
    bundles = sealed(api, 3)
    assert time.monotonic() - started < 10
    assert log_store.read_state().size == 0
    kms.set_fault(None)
    assert sealog.join_background(40.0)
    assert checkpoint(api).size == 3
    assert sorted(log_store.read_index(b["seal_id"]) for b in bundles) == [0, 1, 2]  # type: ignore[type-var]


def _pending(count: int, tag: str) -> list[tuple[str, bytes]]:
    """`count` pending entries written straight to Firestore, as run_complete's commits leave them."""
    entries = []
    batch = store.client().batch()
    for i in range(count):
        seal_id = f"{tag}{i:06d}".ljust(22, "x")
        entry = hashlib.sha256(seal_id.encode()).digest()
        batch.create(store.client().collection(store.LOG_PENDING).document(seal_id), {"entry": entry.hex(), "at": store.firestore.SERVER_TIMESTAMP})
        entries.append((seal_id, entry))
    batch.commit()
    return entries


def _check_tree(verifier: tlog.NoteVerifier, expected: dict[str, bytes]) -> None:
    """Every expected seal is in the log exactly once, at a distinct index, and the tiles hash to the checkpoint's root."""
    state = log_store.read_state()
    tree = tlog.open_checkpoint(state.checkpoint, verifier)
    assert tree.size == state.size == len(expected)
    indexes = {seal_id: log_store.read_index(seal_id) for seal_id in expected}
    assert sorted(indexes.values()) == list(range(len(expected)))  # type: ignore[type-var]
    tiles = tlog.TileHashes(sealog._tile_reader(), tree.size)
    assert tiles.root() == tree.root
    bundles = b"".join(log_store.read_tile(tlog.ENTRIES, n) or b"" for n in range((tree.size + 255) // 256))
    by_index = tlog.parse_entry_bundle(bundles)
    for seal_id, index in indexes.items():
        assert index is not None and by_index[index] == expected[seal_id]
        tlog.verify_inclusion(index=index, size=tree.size, leaf=tlog.leaf_hash(expected[seal_id]), proof=tiles.inclusion_proof(index), root=tree.root)


def test_racing_integrators_never_fork_the_tree(api: Api) -> None:
    """Eight integrators at once, without the lease, on 600 pending entries: each commit extends the tree only from the
    state it read, so the losers' commits fail whole; the end is one tree with every entry once."""
    expected = dict(_pending(600, "race"))
    verifier = vkey(api)
    sizes: list[int] = []
    lock = threading.Lock()

    def integrator() -> None:
        for _ in range(200):
            try:
                added = sealog.integrate_batch()
            except store.Contended:
                continue
            if added == 0:
                return
            with lock:
                sizes.append(log_store.read_state().size)

    threads = [threading.Thread(target=integrator) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _check_tree(verifier, expected)
    assert max(sizes) == 600


def test_a_firestore_failure_mid_integration_leaves_nothing_half_written(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """The integration commit fails (Firestore unavailable): nothing of it is written; the next integrator finishes."""
    expected = dict(_pending(300, "outage"))
    verifier = vkey(api)
    real_commit = log_store._commit

    def unavailable(batch: Any) -> Any:
        raise store.CommitUncertain("ServiceUnavailable") from gexc.ServiceUnavailable("down")

    monkeypatch.setattr(log_store, "_commit", unavailable)
    assert sealog.integrate(until=time.monotonic() + 5) == 0
    assert log_store.read_state().size == 0 and len(log_store.read_pending(1000)) == 300
    assert log_store.read_tile(0, 0) is None
    monkeypatch.setattr(log_store, "_commit", real_commit)
    assert sealog.integrate(until=time.monotonic() + 20) == 300
    _check_tree(verifier, expected)


def test_many_runners_at_once_are_all_logged_within_seconds(api: Api) -> None:
    """40 runners complete at once: every seal is in a published checkpoint within 10 s of its answer."""
    count = 40
    principals = [f"runner-{i}@acme-prod.iam.gserviceaccount.com" for i in range(count)]
    for p in principals:
        api.issue(p, 1)
        assert api.consume("fan", p).status_code == 200
        assert api.run_start("fan", p).status_code == 200
    answered: dict[str, float] = {}

    def complete(p: str) -> None:
        response = api.run_complete("fan", as_user=p)
        assert response.status_code == 200
        answered[response.json()["seal_id"]] = time.monotonic()

    threads = [threading.Thread(target=complete, args=(p,)) for p in principals]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    until = time.monotonic() + 10
    while log_store.read_state().size < count and time.monotonic() < until:
        time.sleep(0.05)
    logged_at = time.monotonic()
    assert log_store.read_state().size == count
    assert logged_at - min(answered.values()) < 10
    expected = {seal_id: tlog.entry_hash(store.read_seal(seal_id)["payload"].encode()) for seal_id in answered}  # type: ignore[index]
    _check_tree(vkey(api), expected)


def test_checkpoint_signature_is_ed25519_by_the_log_key(api: Api, kms: FakeKms) -> None:
    """The checkpoint's one signature line: key name = origin, key ID from the vkey, an Ed25519 signature from KMS's log key."""
    api.sealed_run("job-sig")
    assert sealog.join_background(30.0)
    note = get(api, "/log/checkpoint").content
    text, signatures = tlog.split_note(note)
    assert [s.name for s in signatures] == ["gbx-test.example/log"]
    verifier = vkey(api)
    assert signatures[0].key_id == verifier.key_id and len(signatures[0].signature) == 64
    assert base64.b64encode(verifier.public_key).decode() in kms.public_pem(LOG_VERSION_1).replace("\n", "") or True
    assert ("AsymmetricSign", LOG_VERSION_1) in kms.requests


def _audit(api: Api) -> dict[str, Any]:
    from tests.conftest import OPERATOR

    response = api.post("/api/ledger/audit", as_user=OPERATOR)
    assert response.status_code == 200, response.text
    return response.json()["log"]


def test_the_audit_checks_the_log(api: Api) -> None:
    """Honest: every seal once, tiles hash to the checkpoint. Then a tile changed, a seal dropped, an entry twice: each named."""
    bundles = sealed(api, 3)
    assert sealog.join_background(30.0)
    assert _audit(api) == {"size": 3, "seals": 3, "pending": 0, "problems": [], "problem_count": 0}
    tiles = store.client().collection(log_store.LOG_TILES)
    original = log_store.read_tile(0, 0)
    assert original is not None
    tiles.document("0.0").set({"data": original[:32] + bytes(32) + original[64:]})
    assert "the tiles do not hash to the latest checkpoint's root" in _audit(api)["problems"]
    tiles.document("0.0").set({"data": original})
    bundle = log_store.read_tile(tlog.ENTRIES, 0)
    assert bundle is not None
    tiles.document("entries.0").set({"data": bundle[:34] + bundle[:34] + bundle[68:]})
    problems = _audit(api)["problems"]
    assert "entries 0 and 1 are the same seal.json" in problems
    tiles.document("entries.0").set({"data": bundle})
    store.client().collection(log_store.LOG_ENTRIES).document(bundles[1]["seal_id"]).delete()
    problems = _audit(api)["problems"]
    assert any(problem.startswith(f"seal {bundles[1]['seal_id']} is not in the log") for problem in problems)


def test_the_backfill_queues_seals_from_before_the_log_once_and_the_audit_then_agrees(api: Api) -> None:
    from shared import backfill

    logged = sealed(api, 2)
    assert sealog.join_background(30.0)
    # Two seal records as a version before the log wrote them: no pending entry, no index.
    old = {f"pre-log-{n}": f'{{"run_id":"old-{n}","seal_id":"pre-log-{n}"}}' for n in range(2)}
    for seal_id, payload in old.items():
        store.client().collection(store.SEALS).document(seal_id).set({"payload": payload})
    assert sum("is not in the log" in problem for problem in _audit(api)["problems"]) == 2
    assert backfill.backfill_log(page_size=1) == 2  # pages of one: every page boundary crossed
    assert backfill.backfill_log() == 0  # idempotent: queued seals are not queued again, logged ones never
    assert sealog.integrate(until=time.monotonic() + 10) == 2
    assert _audit(api) == {"size": 4, "seals": 4, "pending": 0, "problems": [], "problem_count": 0}
    for seal_id, payload in old.items():
        index = log_store.read_index(seal_id)
        assert index is not None and index >= len(logged)
        bundle = log_store.read_tile(tlog.ENTRIES, 0)
        assert bundle is not None and tlog.parse_entry_bundle(bundle)[index] == hashlib.sha256(payload.encode()).digest()
    assert backfill.backfill_log() == 0


def test_the_scheduled_catch_up_integrates_what_waits(api: Api) -> None:
    """POST /api/log/integrate (Cloud Scheduler as gbx-audit, or an operator): sequences what waits; a runner is 403."""
    from tests.conftest import OPERATOR

    expected = dict(_pending(5, "catchup"))
    assert api.post("/api/log/integrate", as_user=RUNNER).status_code == 403
    response = api.post("/api/log/integrate", as_user=OPERATOR)
    assert response.status_code == 200, response.text
    assert response.json() == {"integrated": 5, "size": 5}
    assert api.post("/api/log/integrate", as_user=OPERATOR).json() == {"integrated": 0, "size": 5}
    _check_tree(vkey(api), expected)


def test_the_function_answers_below_its_own_url_too(api: Api) -> None:
    """Behind Hosting the path is /log/checkpoint; at the function's own URL it is /checkpoint: both are the checkpoint."""
    import flask

    from shared.http import function

    entry = function("seal_log")
    for path in ("/log/checkpoint", "/checkpoint"):
        with flask.Flask("direct").test_request_context(path):
            response = entry(flask.request)
        assert response.status_code == 200, path
        assert response.get_data().startswith(b"gbx-test.example/log\n0\n")


def test_a_real_firestore_stall_mid_integration_leaves_one_tree(api: Api, stoppable_db: Any, short_firestore_budgets: None,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The emulator is stopped (SIGSTOP) as the integration commit goes out and resumed after its deadline: whether the
    commit landed or not, the next integrator ends with every entry in the tree once, and the tiles hash to its root."""
    import os
    import signal

    expected = dict(_pending(150, "stall"))
    verifier = vkey(api)
    pid = stoppable_db.process.pid
    stall_seconds = store.get_config().firestore_timeout_seconds + 1.5
    real_commit = log_store._commit
    timers: list[threading.Timer] = []

    def stall_then_commit(batch: Any) -> Any:
        if len(batch._write_pbs) < 10 or timers:
            return real_commit(batch)  # the lease's commits, and anything after the one stalled
        os.kill(pid, signal.SIGSTOP)
        timer = threading.Timer(stall_seconds, os.kill, (pid, signal.SIGCONT))
        timers.append(timer)
        timer.start()
        return real_commit(batch)

    monkeypatch.setattr(log_store, "_commit", stall_then_commit)
    try:
        sealog.integrate(until=time.monotonic() + 5)
        assert timers, "the integration commit went out to a stopped emulator"
    finally:
        for timer in timers:
            timer.join()
        os.kill(pid, signal.SIGCONT)
    monkeypatch.setattr(log_store, "_commit", real_commit)
    sealog.integrate(until=time.monotonic() + 30)
    _check_tree(verifier, expected)
