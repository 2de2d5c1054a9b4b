"""Overhead benchmark: each endpoint against its bare Firestore calls, each function's cold start against a bare import, verify against its bare work.

Run it from the repository root: `python -m bench.latency` (or `make bench`, which runs every benchmark).

Three comparisons, each measured interleaved (A, B, A, B … in random order) on one emulator, so that the
noise of a shared machine falls on both sides alike:

1. Requests: every endpoint through the app's own test client (`shared.local.create_app()`: the function,
   the wrapper, authentication, validation, the service, the store) ÷ the same Firestore calls made bare
   with the same `google.cloud.firestore` client (plus, for run_complete, the same signature).
2. Cold starts: a fresh interpreter that loads `functions/<name>/main.py` with
   `functions_framework.create_app` and answers one request ÷ a fresh interpreter that imports
   `functions_framework` and `google.cloud.firestore` and reads one document.
3. verify ÷ (defusedxml parse + SHA-256 + ECDSA verify + the two reads it needs), in part 1's table.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import defusedxml.ElementTree
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from google.cloud import firestore
from google.cloud.firestore_v1.base_query import FieldFilter

from bench import harness, netdelay
from shared import config, signing, store
from shared.endpoints import ENDPOINTS
from shared.local import LocalIssuer, create_app
from shared.models import IssueRequest

PROJECT = "gbx-bench"
AUDIENCE = "https://gbx-bench.example"
ADMIN_TOKEN = "bench-admin-token-0123456789"
IMAGE = "europe-docker.pkg.dev/acme/jobs/render:1.4@sha256:" + "0123456789abcdef" * 4
INPUTS_SHA256 = "ab" * 32
OUTPUTS_SHA256 = "cd" * 32
REPO_ROOT = config.REPO_ROOT

# Goals (ratios of medians), from the performance issue: requests ≤ 1.2×, verify ≤ 1.3×, cold start ≤ 1.15×.
REQUEST_GOAL = 1.2
# consume and check make their independent reads at once: they should beat the same calls made one after another.
PARALLEL_GOAL = 1.0
VERIFY_GOAL = 1.3
COLD_START_GOAL = 1.15

# The endpoints whose design is reads at once, measured again through a network: on the emulator beside the client a
# read is mostly client CPU (nothing to overlap on two cores); from a function to Firestore it is a network round trip
# of several milliseconds. The proxy adds NETWORK_DELAY_MS each way, less than production's round trip.
THROUGH_A_NETWORK = ("check", "consume", "consume, sharded grant", "seal_verify")
NETWORK_DELAY_MS = 1.0

DEFAULT_ROUNDS = 61  # in-process pairs per endpoint (odd: the median is one sample)
WARMUP_ROUNDS = 8
DEFAULT_COLD_ROUNDS = 5  # fresh-interpreter pairs per function
FIRESTORE_TIMEOUT_SECONDS = 10.0
CHILD_TIMEOUT_SECONDS = 120.0

SVG_NS = "http://www.w3.org/2000/svg"
SEAL_NS = "urn:gbx:seal:v1"


# ---------------------------------------------------------------------------------------------
# The service, configured as in the tests, and its callers
# ---------------------------------------------------------------------------------------------


def service_environment(folder: Path, issuer: LocalIssuer) -> dict[str, str]:
    """The service's configuration: local token issuer and local P-256 seal key (both in `folder`), this benchmark's admin token."""
    return {
        config.ENV_PROJECT: PROJECT,
        config.ENV_AUDIENCES: AUDIENCE,
        config.ENV_CERTS_URL: str(issuer.certs_path),
        config.ENV_ADMIN_TOKEN: ADMIN_TOKEN,
        config.ENV_OPERATORS: "operator@bench.example",
        config.ENV_SIGNER: "local",
        config.ENV_LOCAL_DIR: str(folder / "local"),
        config.ENV_ISSUER: "gbx-bench",
        # The partners' events are measured by bench.events (with the Pub/Sub emulator); here, the rest of each request.
        config.ENV_EVENTS: "0",
    }


@dataclass(frozen=True)
class Request:
    """One HTTP request, as the test client and a cold function's first request send it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes = b""
    # The path below the function's own URL (the seal log's function reads it: /checkpoint); others answer at any path.
    function_path: str = "/"

    def to_json(self) -> dict[str, Any]:
        """For a child interpreter's argument list."""
        # Only the query string (usage's ?principal=) and a path-reading function's path go along.
        query = self.path.partition("?")[2]
        url = self.function_path + (f"?{query}" if query else "")
        return {"method": self.method, "url": url, "headers": self.headers, "body": base64.b64encode(self.body).decode()}


class Api:
    """Builds requests for the service and sends them through the app's test client."""

    def __init__(self, issuer: LocalIssuer, *, like: Api | None = None) -> None:
        """`like`: another thread's Api whose app and minted tokens this one shares, with a test client of its own."""
        self.issuer = issuer
        self.client = (like.client.application if like else create_app()).test_client()
        self._tokens: dict[str, str] = like._tokens if like else {}

    def token(self, principal: str) -> str:
        """An ID token for `principal` (minted once per principal; valid for an hour)."""
        if principal not in self._tokens:
            self._tokens[principal] = self.issuer.token(principal, audience=AUDIENCE)
        return self._tokens[principal]

    def json_request(self, endpoint: str, body: dict[str, Any], *, principal: str | None = None, key: str | None = None) -> Request:
        """A JSON POST as a user (ID token) or, without `principal`, as the admin."""
        headers = {"Content-Type": "application/json"}
        if principal is not None:
            headers["Authorization"] = f"Bearer {self.token(principal)}"
        else:
            headers["X-GBX-ADMIN-TOKEN"] = ADMIN_TOKEN
        if key is not None:
            headers["Idempotency-Key"] = key
        return Request("POST", ENDPOINTS[endpoint].path, headers, json.dumps(body).encode())

    def seal_request(self, endpoint: str, svg: bytes, *, principal: str) -> Request:
        """A raw seal.svg upload."""
        headers = {"Content-Type": "image/svg+xml", "Authorization": f"Bearer {self.token(principal)}"}
        return Request("POST", ENDPOINTS[endpoint].path, headers, svg)

    def send(self, request: Request) -> dict[str, Any]:
        """Send through the test client; the JSON body of a 200, else BenchmarkFailed."""
        response = self.client.open(request.path, method=request.method, headers=request.headers, data=request.body)
        if response.status_code != 200:
            raise harness.BenchmarkFailed(f"{request.method} {request.path} answered {response.status_code}: {response.get_data(as_text=True)[:300]}")
        return response.get_json()

    # Untimed set-up, through the same public API.

    def issue(self, principal: str, runs: int) -> dict[str, Any]:
        return self.send(self.json_request("issue", {"principal": principal, "runs_total": runs}))

    def issue_one_document(self, principal: str, runs: int) -> None:
        """A grant of `runs` kept in one document however large (the store's `max_shards` seam), so that it never runs out."""
        request = IssueRequest(principal=principal, runs_total=runs)
        # Without an Idempotency-Key the store keeps no issuance record, so fingerprint and response go unused.
        store.commit_issue(
            principal=request.principal, grant_id=os.urandom(16).hex(), plan_id=request.plan_id, runs_total=runs, expires_at=None,
            issued_by="admin", idempotency_key_hash=None, fingerprint="", response={}, max_shards=1,
        )

    def consumed(self, principal: str, run_id: str) -> str:
        self.send(self.json_request("consume", {"run_id": run_id}, principal=principal))
        return run_id

    def start_body(self, run_id: str) -> dict[str, Any]:
        return {"run_id": run_id, "container_image": IMAGE, "project_id": "acme-prod", "inputs_sha256": INPUTS_SHA256}

    def started(self, principal: str, run_id: str) -> str:
        self.consumed(principal, run_id)
        self.send(self.json_request("run_start", self.start_body(run_id), principal=principal))
        return run_id

    def sealed(self, principal: str, run_id: str) -> bytes:
        """Issue one run, consume, start and complete it: the seal.svg."""
        self.issue(principal, 1)
        self.started(principal, run_id)
        bundle = self.send(self.json_request("run_complete", {"run_id": run_id, "outputs_sha256": OUTPUTS_SHA256}, principal=principal))
        return str(bundle["seal_svg"]).encode()


# ---------------------------------------------------------------------------------------------
# The same Firestore calls, bare
# ---------------------------------------------------------------------------------------------


class Bare:
    """The Firestore calls (and the signature) of each endpoint, made directly with the service's own client.

    Same documents, same fields, same preconditions; none of the wrapper, authentication, validation,
    models, service logic or store helpers.
    """

    def __init__(self) -> None:
        self.db: firestore.Client = store.client()
        signer = signing.get_signer()
        if not isinstance(signer, signing.LocalSigner):
            raise harness.BenchmarkFailed("the latency benchmark signs with the local key (GBX_SIGNER=local)")
        self._public_pem = signer.public_keys()[0].pem  # creates the key file on first use
        key = serialization.load_pem_private_key(signer.key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self._key = key
        self._key_version = signer.key_version
        self._public_key = key.public_key()

    def _principal(self, principal: str) -> firestore.DocumentReference:
        return self.db.collection(store.PRINCIPALS).document(principal)

    def _run(self, principal: str, run_id: str) -> firestore.DocumentReference:
        return self._principal(principal).collection(store.RUNS).document(f"r:{run_id}")

    def _grants(self, principal: str) -> firestore.CollectionReference:
        return self._principal(principal).collection(store.GRANTS)

    def _balance(self, principal: str) -> int:
        """The sum aggregation of the unexpired grants' remaining runs."""
        query = self._grants(principal).where(filter=FieldFilter("spend_key", ">", dt.datetime.now(dt.UTC)))
        rows: Any = query.sum("remaining").get(timeout=FIRESTORE_TIMEOUT_SECONDS)
        return sum(int(aggregate.value) for row in rows for aggregate in row)

    def _first_to_spend(self, principal: str) -> firestore.DocumentSnapshot:
        """The one-document indexed query for the grant to spend first."""
        query = (
            self._grants(principal)
            .where(filter=FieldFilter("spend_key", ">", dt.datetime.now(dt.UTC)))
            .where(filter=FieldFilter("open", "==", True))
            .order_by("spend_key").order_by("created_at").order_by("group").limit(1)
        )
        return query.get(timeout=FIRESTORE_TIMEOUT_SECONDS)[0]

    def _ledger(self, batch: firestore.WriteBatch, *, principal: str, grant_id: str, shard: str, delta: int, reason: str, ref: str) -> None:
        entry_id = hashlib.sha256(f"{reason}|{principal}|{ref}".encode()).hexdigest()
        batch.create(
            self.db.collection(store.LEDGER).document(entry_id),
            {"principal": principal, "grant": grant_id, "shard": shard, "delta": delta, "reason": reason, "ref": ref, "at": firestore.SERVER_TIMESTAMP},
        )

    def _new_grant(self, batch: firestore.WriteBatch, principal: str, grant_id: str, *, runs: int, source: str, ref: str | None) -> None:
        batch.set(self._principal(principal), {"principal": principal, "last_issued_at": firestore.SERVER_TIMESTAMP}, merge=True)
        batch.create(
            self._principal(principal).collection(store.GRANTS).document(grant_id),
            {
                "group": grant_id, "open": True, "spend_key": store.FAR_FUTURE, "slot": random.random(), "principal": principal, "plan_id": "standard", "runs_total": runs, "remaining": runs, "expires_at": None,
                "created_at": firestore.SERVER_TIMESTAMP, "source": source, "ref": ref, "issued_by": None,
            },
        )

    def check(self, principal: str, run_id: str) -> None:
        """The balance, then the run."""
        self._balance(principal)
        self._run(principal, run_id).get(timeout=FIRESTORE_TIMEOUT_SECONDS)

    def consume(self, principal: str, run_id: str) -> None:
        """The grants read (the first to spend; a random draw among the open shards expiring with it; the balance),
        the run, one commit (shard − 1 preconditioned, run record, ledger entry): the bare minimum of one consume."""
        first = self._first_to_spend(principal)
        self._run(principal, run_id).get(timeout=FIRESTORE_TIMEOUT_SECONDS)
        upwards = random.random() < 0.5
        draw = (
            self._grants(principal)
            .where(filter=FieldFilter("open", "==", True))
            .where(filter=FieldFilter("issued_by", "==", first.get("issued_by")))
            .where(filter=FieldFilter("spend_key", "==", first.get("spend_key")))
            .where(filter=FieldFilter("slot", ">=" if upwards else "<", random.random()))
            .order_by("slot", direction=firestore.Query.ASCENDING if upwards else firestore.Query.DESCENDING)
            .limit(1)
            .get(timeout=FIRESTORE_TIMEOUT_SECONDS)
        )
        grant = draw[0] if draw else first
        self._balance(principal)
        batch = self.db.batch()
        batch.update(grant.reference, {"remaining": firestore.Increment(-1)}, option=self.db.write_option(last_update_time=grant.update_time))
        group = grant.get("group")
        batch.create(
            self._run(principal, run_id),
            {
                "run_id": run_id, "principal": principal, "state": "consumed", "grant_id": group, "shard": grant.id, "plan_id": "standard",
                "charge_id": os.urandom(12).hex(), "consumed_at": dt.datetime.now(dt.UTC),
            },
        )
        self._ledger(batch, principal=principal, grant_id=group, shard=grant.id, delta=-1, reason="consume", ref=run_id)
        batch.commit(timeout=FIRESTORE_TIMEOUT_SECONDS)

    def issue(self, principal: str, runs: int, key: str) -> None:
        """The key's issuance record, the grants (for the balance), one commit (principal, grant, ledger entry, issuance record)."""
        key_hash = hashlib.sha256(key.encode()).hexdigest()
        self.db.collection(store.ISSUANCES).document(key_hash).get(timeout=FIRESTORE_TIMEOUT_SECONDS)
        balance = self._balance(principal)
        grant_id = os.urandom(16).hex()
        batch = self.db.batch()
        self._new_grant(batch, principal, grant_id, runs=runs, source="issue", ref=key_hash)
        self._ledger(batch, principal=principal, grant_id=grant_id, shard=grant_id, delta=runs, reason="issue", ref=grant_id)
        response = {
            "grant_id": grant_id, "principal": principal, "plan_id": "standard", "runs_total": runs, "expires_at": None,
            "balance": balance + runs, "replayed": False,
        }
        batch.create(
            self.db.collection(store.ISSUANCES).document(key_hash),
            {"fingerprint": key_hash, "response": response, "principal": principal, "grant_id": grant_id, "created_at": firestore.SERVER_TIMESTAMP},
        )
        batch.commit(timeout=FIRESTORE_TIMEOUT_SECONDS)

    def run_start(self, principal: str, run_id: str) -> None:
        """The run, one preconditioned update."""
        run = self._run(principal, run_id).get(timeout=FIRESTORE_TIMEOUT_SECONDS)
        batch = self.db.batch()
        fields = {"container_image": IMAGE, "project_id": "acme-prod", "inputs_sha256": INPUTS_SHA256, "run_manifest_sha256": None}
        batch.update(run.reference, {**fields, "state": "started", "started_at": dt.datetime.now(dt.UTC)}, option=self.db.write_option(last_update_time=run.update_time))
        batch.commit(timeout=FIRESTORE_TIMEOUT_SECONDS)

    def run_complete(self, principal: str, run_id: str) -> None:
        """The run, the seal's signature, one commit (run completed preconditioned, seal record, the seal log's pending entry)."""
        run = self._run(principal, run_id).get(timeout=FIRESTORE_TIMEOUT_SECONDS)
        data = run.to_dict() or {}
        seal_id = base64.urlsafe_b64encode(os.urandom(24)).decode()
        now = dt.datetime.now(dt.UTC)
        claims = {
            "v": 1, "seal_id": seal_id, "run_id": run_id, "principal": principal, "project_id": data["project_id"],
            "container_image": data["container_image"], "inputs_sha256": data["inputs_sha256"], "outputs_sha256": OUTPUTS_SHA256,
            "consumed_at": data["consumed_at"].isoformat(), "started_at": data["started_at"].isoformat(), "completed_at": now.isoformat(),
            "issuer": "gbx-bench", "key": self._key_version,
        }
        payload = json.dumps(claims, sort_keys=True, separators=(",", ":")).encode()
        signature = self._key.sign(payload, ec.ECDSA(hashes.SHA256()))
        batch = self.db.batch()
        batch.update(
            run.reference,
            {"state": "completed", "outputs_sha256": OUTPUTS_SHA256, "completed_at": now, "seal_id": seal_id},
            option=self.db.write_option(last_update_time=run.update_time),
        )
        record = {
            "seal_id": seal_id, "principal": principal, "run_id": run_id, "payload": payload.decode(), "signature": base64.b64encode(signature).decode(),
            "key": self._key_version, "alg": "ES256", "public_key_pem": self._public_pem, "redeemable": True, "created_at": firestore.SERVER_TIMESTAMP,
        }
        batch.create(self.db.collection(store.SEALS).document(seal_id), record)
        # The seal log's pending entry, created with the seal (its integration runs after the answer: bench.sealog).
        batch.create(self.db.collection(store.LOG_PENDING).document(seal_id), {"entry": hashlib.sha256(payload).hexdigest(), "at": firestore.SERVER_TIMESTAMP})
        batch.commit(timeout=FIRESTORE_TIMEOUT_SECONDS)

    def _verified_claims(self, svg: bytes) -> dict[str, Any]:
        """defusedxml parse, SHA-256 of the payload, ECDSA verify of the digest: the seal's claims."""
        root = defusedxml.ElementTree.fromstring(svg, forbid_dtd=True, forbid_entities=True, forbid_external=True)
        seal = root.find(f"{{{SVG_NS}}}metadata/{{{SEAL_NS}}}seal")
        assert seal is not None
        payload = _b64url(seal.attrib["payload"])
        digest = hashlib.sha256(payload).digest()
        self._public_key.verify(_b64url(seal.attrib["signature"]), digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        return json.loads(payload)

    def verify(self, svg: bytes) -> None:
        """Parse and check the seal, then the two reads: its seal record and its redemption."""
        claims = self._verified_claims(svg)
        self.db.collection(store.SEALS).document(claims["seal_id"]).get(timeout=FIRESTORE_TIMEOUT_SECONDS)
        redemption_id = hashlib.sha256(f"{claims['principal']}|{claims['seal_id']}".encode()).hexdigest()
        self.db.collection(store.REDEMPTIONS).document(redemption_id).get(timeout=FIRESTORE_TIMEOUT_SECONDS)

    def redeem(self, svg: bytes) -> None:
        """verify's work, the grants (for the balance), one commit (redemption, principal, one-run grant, ledger entry)."""
        claims = self._verified_claims(svg)
        principal, seal_id = claims["principal"], claims["seal_id"]
        self.db.collection(store.SEALS).document(seal_id).get(timeout=FIRESTORE_TIMEOUT_SECONDS)
        redemption_id = hashlib.sha256(f"{principal}|{seal_id}".encode()).hexdigest()
        self.db.collection(store.REDEMPTIONS).document(redemption_id).get(timeout=FIRESTORE_TIMEOUT_SECONDS)
        self._balance(principal)
        grant_id = os.urandom(16).hex()
        batch = self.db.batch()
        batch.create(
            self.db.collection(store.REDEMPTIONS).document(redemption_id),
            {"principal": principal, "seal_id": seal_id, "grant_id": grant_id, "at": firestore.SERVER_TIMESTAMP},
        )
        self._new_grant(batch, principal, grant_id, runs=1, source="seal_rerun", ref=seal_id)
        self._ledger(batch, principal=principal, grant_id=grant_id, shard=grant_id, delta=1, reason="seal_rerun", ref=seal_id)
        batch.commit(timeout=FIRESTORE_TIMEOUT_SECONDS)

    def public_keys(self) -> None:
        """No Firestore call: the key's PEM, as the signer lists it."""
        self._public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# ---------------------------------------------------------------------------------------------
# Part 1: requests in-process, interleaved with their bare calls
# ---------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One endpoint's pair: `prepare(i)` sets up round i untimed and returns its two timed calls (app, bare)."""

    name: str
    goal: float | None
    prepare: Callable[[int], tuple[Callable[[], object], Callable[[], object] | None]]
    note: str = ""
    app_seconds: list[float] = field(default_factory=list)
    bare_seconds: list[float] = field(default_factory=list)
    app_cpu: list[float] = field(default_factory=list)  # CPU time of the calling thread: what the machine's load does not inflate
    bare_cpu: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        """Median through the app ÷ median bare."""
        if not self.bare_seconds:
            return None
        return harness.median(self.app_seconds) / harness.median(self.bare_seconds)

    def paired_ratios(self) -> list[float]:
        """app ÷ bare of each round (a noise gauge: a wide spread means a noisy machine)."""
        return [a / b for a, b in zip(self.app_seconds, self.bare_seconds, strict=False)]


def _numbered_on(prepare: Callable[[int], Any], offset: int) -> Callable[[int], Any]:
    return lambda i: prepare(i + offset)


@contextlib.contextmanager
def firestore_at(address: str, bare: Bare) -> Iterator[None]:
    """The service's client and the bare side's reach Firestore at `address` (host:port) inside, the emulator after."""
    previous, project = os.environ["FIRESTORE_EMULATOR_HOST"], config.get_config().project
    harness.point_service_at(address, project)
    bare.db = store.client()
    try:
        yield
    finally:
        harness.point_service_at(previous, project)
        bare.db = store.client()


def request_cases(api: Api, bare: Bare) -> list[Case]:
    """Every endpoint (and the test client's floor), each with the state its request needs."""
    check_principal = "check@bench.example"
    api.issue(check_principal, 50)  # 12 documents of 4 or 5 runs, as issue writes it
    consume_principal = "consume@bench.example"
    api.issue_one_document(consume_principal, 1_000_000)
    sharded_principal = "consume-sharded@bench.example"
    api.issue(sharded_principal, 1_000_000)  # 240 shards, as issue writes it
    lifecycle = "lifecycle@bench.example"
    api.issue_one_document(lifecycle, 1_000_000)
    verify_principal = "verify@bench.example"
    seal = api.sealed(verify_principal, "verify-run")

    def check(i: int) -> tuple[Callable[[], object], Callable[[], object]]:
        request = api.json_request("check", {"run_id": "never-consumed"}, principal=check_principal)
        return (lambda: api.send(request)), (lambda: bare.check(check_principal, "never-consumed"))

    def consume(i: int) -> tuple[Callable[[], object], Callable[[], object]]:
        request = api.json_request("consume", {"run_id": f"app-{i}"}, principal=consume_principal)
        return (lambda: api.send(request)), (lambda: bare.consume(consume_principal, f"bare-{i}"))

    def consume_sharded(i: int) -> tuple[Callable[[], object], Callable[[], object]]:
        request = api.json_request("consume", {"run_id": f"app-{i}"}, principal=sharded_principal)
        return (lambda: api.send(request)), (lambda: bare.consume(sharded_principal, f"bare-{i}"))

    def issue(i: int) -> tuple[Callable[[], object], Callable[[], object]]:
        request = api.json_request("issue", {"principal": f"issue-app-{i}@bench.example", "runs_total": 10}, key=f"app-{i}")
        return (lambda: api.send(request)), (lambda: bare.issue(f"issue-bare-{i}@bench.example", 10, f"bare-{i}"))

    def run_start(i: int) -> tuple[Callable[[], object], Callable[[], object]]:
        app_run, bare_run = api.consumed(lifecycle, f"start-app-{i}"), api.consumed(lifecycle, f"start-bare-{i}")
        request = api.json_request("run_start", api.start_body(app_run), principal=lifecycle)
        return (lambda: api.send(request)), (lambda: bare.run_start(lifecycle, bare_run))

    def run_complete(i: int) -> tuple[Callable[[], object], Callable[[], object]]:
        app_run, bare_run = api.started(lifecycle, f"complete-app-{i}"), api.started(lifecycle, f"complete-bare-{i}")
        request = api.json_request("run_complete", {"run_id": app_run, "outputs_sha256": OUTPUTS_SHA256}, principal=lifecycle)
        return (lambda: api.send(request)), (lambda: bare.run_complete(lifecycle, bare_run))

    def verify(i: int) -> tuple[Callable[[], object], Callable[[], object]]:
        request = api.seal_request("seal_verify", seal, principal=verify_principal)
        return (lambda: api.send(request)), (lambda: bare.verify(seal))

    def redeem(i: int) -> tuple[Callable[[], object], Callable[[], object]]:
        # A principal of its own for each side: both redeem with the same state around them.
        app_principal, bare_principal = f"redeem-app-{i}@bench.example", f"redeem-bare-{i}@bench.example"
        app_seal, bare_seal = api.sealed(app_principal, f"redeem-{i}"), api.sealed(bare_principal, f"redeem-{i}")
        request = api.seal_request("redeem_seal_once", app_seal, principal=app_principal)
        return (lambda: api.send(request)), (lambda: bare.redeem(bare_seal))

    def public_keys(i: int) -> tuple[Callable[[], object], Callable[[], object]]:
        request = Request("GET", ENDPOINTS["public_keys"].path, {})
        return (lambda: api.send(request)), bare.public_keys

    def healthz(i: int) -> tuple[Callable[[], object], None]:
        request = Request("GET", "/healthz", {})
        return (lambda: api.send(request)), None

    return [
        Case("check", PARALLEL_GOAL, check, "balance sum + run get, in sequence"),
        Case("consume", PARALLEL_GOAL, consume, "first-to-spend query + run get + slot draw + balance sum + commit of 3 writes, in sequence"),
        Case("consume, sharded grant", PARALLEL_GOAL, consume_sharded, "as consume, on a grant of 240 documents"),
        Case("issue (with Idempotency-Key)", REQUEST_GOAL, issue, "issuance get + balance sum + commit of 4 writes"),
        Case("run_start", REQUEST_GOAL, run_start, "run get + preconditioned update"),
        Case("run_complete", REQUEST_GOAL, run_complete, "run get + ECDSA sign + commit of 3 writes"),
        Case("seal_verify", VERIFY_GOAL, verify, "defusedxml parse + SHA-256 + ECDSA verify + seal get + redemption get"),
        Case("redeem_seal_once", REQUEST_GOAL, redeem, "verify's work + balance sum + commit of 4 writes"),
        Case("public_keys", None, public_keys, "no Firestore call: the key's PEM"),
        Case("healthz (test client floor)", None, healthz, "no service: what the test client and Flask alone cost"),
    ]


def measure_requests(cases: list[Case], *, rounds: int, warmup: int, rng: random.Random) -> None:
    """`warmup` untimed rounds, then `rounds` rounds; each round visits every case in random order and times its two calls in random order."""
    for round_index in range(-warmup, rounds):
        order = list(cases)
        rng.shuffle(order)
        for case in order:
            app_call, bare_call = case.prepare(round_index + warmup)
            sides: list[tuple[list[float], list[float], Callable[[], object]]] = [(case.app_seconds, case.app_cpu, app_call)]
            if bare_call is not None:
                sides.append((case.bare_seconds, case.bare_cpu, bare_call))
            rng.shuffle(sides)
            for samples, cpu_samples, call in sides:
                cpu_began = time.thread_time()
                began = time.perf_counter()
                call()
                elapsed = time.perf_counter() - began
                cpu = time.thread_time() - cpu_began
                if round_index >= 0:
                    samples.append(elapsed)
                    cpu_samples.append(cpu)
        if round_index >= 0 and round_index % 10 == 9:
            print(f"  requests: round {round_index + 1}/{rounds}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Part 2: cold starts in fresh interpreters, alternated with the bare import
# ---------------------------------------------------------------------------------------------

# Runs in a fresh interpreter from the repository root (the staged function's layout: main.py beside shared/).
# The clock starts at its first statement, so the interpreter's own start-up (the same for both) is left out.
CHILD = """\
import time
_began, _cpu = time.perf_counter(), time.process_time()
import base64, json, sys
mode, spec = sys.argv[1], json.loads(sys.argv[2])
if mode == "function":
    import functions_framework
    app = functions_framework.create_app(target=spec["target"], source=spec["source"])
    response = app.test_client().open(spec["url"], method=spec["method"], headers=spec["headers"], data=base64.b64decode(spec["body"]))
    status = response.status_code
else:
    import functions_framework
    import google.cloud.firestore
    client = google.cloud.firestore.Client(project=spec["project"])
    client.collection(spec["collection"]).document(spec["document"]).get(timeout=10)
    status = 200
seconds, cpu = time.perf_counter() - _began, time.process_time() - _cpu
print("\\n" + json.dumps({"seconds": seconds, "cpu": cpu, "status": status}))
"""


@dataclass
class ColdCase:
    """One function's fresh-interpreter starts, each with the untimed set-up its first request needs."""

    name: str
    prepare: Callable[[int], Request]
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # CPU time of the whole child (all its threads)


def run_child(mode: str, spec: dict[str, Any], env: dict[str, str], *, profile_imports: bool = False) -> tuple[float, float, str]:
    """Run CHILD once: (seconds and CPU seconds it measured, its stderr)."""
    command = [sys.executable, *(["-X", "importtime"] if profile_imports else []), "-c", CHILD, mode, json.dumps(spec)]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_SECONDS)
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError) as exc:
        raise harness.BenchmarkFailed(f"cold start ({mode} {spec.get('target', '')}) exited {done.returncode}: {done.stderr[-2000:]}") from exc
    if result["status"] != 200:
        raise harness.BenchmarkFailed(f"cold start of {spec.get('target')} answered {result['status']}: {done.stdout[-500:]}")
    return float(result["seconds"]), float(result["cpu"]), done.stderr


def cold_cases(api: Api) -> list[ColdCase]:
    """Every function, with a first request that succeeds (its state prepared in this process)."""
    principal = "cold@bench.example"
    api.issue_one_document(principal, 1_000_000)
    seal = api.sealed("cold-verify@bench.example", "cold-verify")
    # A seal whose log proof the cold proof function serves (it integrates the entry itself if no one has yet).
    logged_seal_id = json.loads(base64.urlsafe_b64decode(re.search(rb'payload="([^"]+)"', seal).group(1) + b"==").decode())["seal_id"]  # type: ignore[union-attr]
    counter = [0]

    def next_run(prefix: str) -> str:
        counter[0] += 1
        return f"{prefix}-{counter[0]}"

    def redeem(i: int) -> Request:
        owner = f"cold-redeem-{i}@bench.example"
        return api.seal_request("redeem_seal_once", api.sealed(owner, "cold-redeem"), principal=owner)

    preparers: dict[str, Callable[[int], Request]] = {
        "issue": lambda i: api.json_request("issue", {"principal": f"cold-issue-{i}@bench.example", "runs_total": 10}, key=f"cold-{i}"),
        "check": lambda i: api.json_request("check", {"run_id": "never-consumed"}, principal=principal),
        "consume": lambda i: api.json_request("consume", {"run_id": next_run("cold-consume")}, principal=principal),
        "run_start": lambda i: api.json_request("run_start", api.start_body(api.consumed(principal, next_run("cold-start"))), principal=principal),
        "run_complete": lambda i: api.json_request(
            "run_complete", {"run_id": api.started(principal, next_run("cold-complete")), "outputs_sha256": OUTPUTS_SHA256}, principal=principal
        ),
        "seal_verify": lambda i: api.seal_request("seal_verify", seal, principal="cold-verify@bench.example"),
        "redeem_seal_once": redeem,
        "public_keys": lambda i: Request("GET", ENDPOINTS["public_keys"].path, {}),
        "entitlement_usage": lambda i: Request("GET", f"{ENDPOINTS['entitlement_usage'].path}?principal={principal}", {"X-GBX-ADMIN-TOKEN": ADMIN_TOKEN}),
        "ledger_audit": lambda i: Request("POST", ENDPOINTS["ledger_audit"].path, {"Authorization": f"Bearer {api.token('operator@bench.example')}"}),
        "log_proof": lambda i: Request("GET", f"{ENDPOINTS['log_proof'].path}?seal_id={logged_seal_id}", {}),
        "seal_log": lambda i: Request("GET", "/log/checkpoint", {}, function_path="/checkpoint"),
        "log_integrate": lambda i: Request("POST", ENDPOINTS["log_integrate"].path, {"Authorization": f"Bearer {api.token('operator@bench.example')}"}),
        "revoke": lambda i: api.json_request(
            "revoke", {"principal": f"cold-revoke-{i}@bench.example", "grant_id": api.issue(f"cold-revoke-{i}@bench.example", 5)["grant_id"], "runs": 1}
        ),
        "events_sweep": lambda i: Request("POST", ENDPOINTS["events_sweep"].path, {"Authorization": f"Bearer {api.token('operator@bench.example')}"}),
        "export": lambda i: Request(
            "GET", f"{ENDPOINTS['export'].path}?from=2020-01-01T00:00:00Z&to=2100-01-01T00:00:00Z&page_size=100", {"X-GBX-ADMIN-TOKEN": ADMIN_TOKEN}
        ),
    }
    missing = set(ENDPOINTS) - set(preparers)
    if missing:
        raise harness.BenchmarkFailed(f"no cold-start request for {sorted(missing)}: add one to bench/latency.py")
    return [ColdCase(name, preparers[name]) for name in ENDPOINTS]


def measure_cold_starts(cases: list[ColdCase], env: dict[str, str], *, rounds: int, rng: random.Random) -> ColdCase:
    """Per round and function: the function's cold start and the bare import, in random order; returns the bare samples."""
    baseline_spec = {"project": PROJECT, "collection": store.PRINCIPALS, "document": "cold@bench.example"}
    baseline = ColdCase("bare", lambda i: Request("GET", "/", {}))
    # Once each, untimed: bytecode caches written and files in the page cache before anything counts.
    run_child("baseline", baseline_spec, env)
    for case in cases:
        run_child("function", _function_spec(case.name, case.prepare(-1)), env)
    for round_index in range(rounds):
        order = list(cases)
        rng.shuffle(order)
        for case in order:
            spec = _function_spec(case.name, case.prepare(round_index))
            pair = [("function", spec, case), ("baseline", baseline_spec, baseline)]
            rng.shuffle(pair)
            for mode, child_spec, samples in pair:
                seconds, cpu, _ = run_child(mode, child_spec, env)
                samples.seconds.append(seconds)
                samples.cpu.append(cpu)
        print(f"  cold starts: round {round_index + 1}/{rounds}", file=sys.stderr, flush=True)
    return baseline


def _function_spec(name: str, request: Request) -> dict[str, Any]:
    return {"target": name, "source": f"functions/{name}/main.py", **request.to_json()}


def import_profile(env: dict[str, str], case: ColdCase) -> list[tuple[str, float]]:
    """`python -X importtime`: the top-level packages a function's cold start imports beyond the bare one, by cumulative ms."""
    _, _, function_err = run_child("function", _function_spec(case.name, case.prepare(-2)), env, profile_imports=True)
    _, _, baseline_err = run_child("baseline", {"project": PROJECT, "collection": store.PRINCIPALS, "document": "x"}, env, profile_imports=True)
    baseline_modules = set(_imports(baseline_err))
    extra: dict[str, float] = {}
    for module, self_us in _imports(function_err).items():
        if module not in baseline_modules:
            top = module.split(".")[0] if not module.startswith(("google.", "shared.", "gbx_client.")) else ".".join(module.split(".")[:2])
            extra[top] = extra.get(top, 0.0) + self_us / 1000
    return sorted(extra.items(), key=lambda item: -item[1])


def _imports(stderr: str) -> dict[str, float]:
    """module → self µs, from -X importtime's lines (`import time: self | cumulative | name`)."""
    modules: dict[str, float] = {}
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _, name = line.removeprefix("import time:").split("|", 2)
        modules[name.strip()] = float(self_us)
    return modules


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}" if seconds < 0.1 else f"{seconds * 1000:.0f}"


def _verdict(ratio: float | None, goal: float | None) -> str:
    if ratio is None or goal is None:
        return "—"
    return f"met (≤ {goal:.2f}×)" if ratio <= goal else f"**missed** (goal ≤ {goal:.2f}×)"


def _request_table(cases: list[Case]) -> None:
    print("| Endpoint | App median ms | Bare median ms | Ratio | Paired ratios p25–p75 | Goal | Overhead ms | Overhead CPU ms | Bare side |")
    print("| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |")
    for case in cases:
        app = harness.median(case.app_seconds)
        if case.bare_seconds:
            bare = harness.median(case.bare_seconds)
            paired = case.paired_ratios()
            cells = [
                _ms(bare),
                f"{case.ratio:.2f}×",
                f"{harness.percentile(paired, 0.25):.2f}–{harness.percentile(paired, 0.75):.2f}",
                _verdict(case.ratio, case.goal),
                f"{(app - bare) * 1000:.2f}",
                f"{(harness.median(case.app_cpu) - harness.median(case.bare_cpu)) * 1000:.2f}",
            ]
        else:
            cells = ["—", "—", "—", "—", "—", f"{harness.median(case.app_cpu) * 1000:.2f}"]
        print(f"| {case.name} | {_ms(app)} | " + " | ".join(cells) + f" | {case.note} |")
    print()


def print_report(
    cases: list[Case],
    cold: list[ColdCase],
    baseline: ColdCase | None,
    profile: dict[str, list[tuple[str, float]]],
    total_seconds: float,
    *,
    delayed: list[Case] | None = None,
    delay_ms: float = 0.0,
) -> None:
    """Both tables, the goals, and what the figures mean."""
    print()
    print(f"## Overhead benchmark ({dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC)")
    print()
    rounds = len(cases[0].app_seconds) if cases else 0
    print(f"### Requests in-process ({rounds} interleaved pairs each): the app's test client ÷ the same Firestore calls made bare")
    print()
    _request_table(cases)
    if delayed:
        print(
            f"### The reads-at-once endpoints through a network ({len(delayed[0].app_seconds)} interleaved pairs each): both sides reach the"
            f" emulator through a proxy in its own process that delivers every byte {delay_ms:g} ms after it arrived, each way"
        )
        print()
        _request_table(delayed)
    if cold and baseline is not None:
        base, base_cpu = harness.median(baseline.seconds), harness.median(baseline.cpu)
        print(f"### Cold starts ({len(cold[0].seconds)} fresh interpreters each, alternated with {len(baseline.seconds)} bare ones)")
        print()
        print(
            f"Bare: `import functions_framework, google.cloud.firestore` + a client + one document get:"
            f" median {_ms(base)} ms (range {_ms(min(baseline.seconds))}–{_ms(max(baseline.seconds))}), CPU {_ms(base_cpu)} ms."
        )
        print()
        print("| Function | Cold start median ms | Range ms | Ratio to bare | Goal | CPU median ms | CPU ratio |")
        print("| --- | ---: | ---: | ---: | --- | ---: | ---: |")
        for function in cold:
            ratio = harness.median(function.seconds) / base
            cpu = harness.median(function.cpu)
            print(
                f"| {function.name} | {_ms(harness.median(function.seconds))} | {_ms(min(function.seconds))}–{_ms(max(function.seconds))} | {ratio:.2f}× |"
                f" {_verdict(ratio, COLD_START_GOAL)} | {_ms(cpu)} | {cpu / base_cpu:.2f}× |"
            )
        print()
    for name, extra in profile.items():
        shown = ", ".join(f"{module} {ms:.0f}" for module, ms in extra[:12])
        print(f"- Imports of `{name}`'s cold start beyond the bare one (python -X importtime, self ms summed by package): {shown}.")
    print(
        "- Ratios are of medians. A request's bare side makes the same Firestore calls with the service's own client"
        " (run_complete also signs with the same key); overhead CPU is the difference of the calling thread's CPU-time"
        " medians, which the machine's load inflates far less than wall time. Cold starts are timed inside the fresh"
        " interpreter, from its first statement to the first response (interpreter start-up, the same for both, is left"
        " out); their CPU is the whole child's. The functions use the local seal key (GBX_SIGNER=local): with KMS the first"
        " verify, redeem, public_keys or run_complete also imports `google.cloud.kms` and calls KMS."
    )
    print(f"- {harness.machine_line()} Total benchmark time {total_seconds:.0f}s.")


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def service_configured(folder: Path) -> Iterator[LocalIssuer]:
    """The service's environment for this process (restored afterwards) and its token issuer."""
    issuer = LocalIssuer(folder / "issuer")
    issuer.ensure()
    values = service_environment(folder, issuer)
    saved = {name: os.environ.get(name) for name in [*values, config.ENV_LOCAL_MODE]}
    os.environ.update(values)
    os.environ.pop(config.ENV_LOCAL_MODE, None)
    config.get_config.cache_clear()
    signing.get_signer.cache_clear()
    try:
        yield issuer
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        config.get_config.cache_clear()
        signing.get_signer.cache_clear()


def main(argv: list[str] | None = None) -> int:
    """Start an emulator, measure, print the tables; 1 when a request did not answer 200 (goals are reported, not enforced)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.latency",
        description=__doc__.splitlines()[0],
        epilog="Exit status: 0 measured (a missed goal is reported, not an error), 1 a request failed, 3 no emulator, 130 interrupted.",
    )
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help=f"interleaved pairs per endpoint (default {DEFAULT_ROUNDS})")
    parser.add_argument("--cold-rounds", type=int, default=DEFAULT_COLD_ROUNDS, help=f"fresh-interpreter pairs per function; 0 skips cold starts (default {DEFAULT_COLD_ROUNDS})")
    parser.add_argument("--import-profile", action="store_true", help="also list what each function's cold start imports beyond the bare one (-X importtime)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random orders (default: a fresh one)")
    parser.add_argument(
        "--network-delay-ms", type=float, default=NETWORK_DELAY_MS,
        help=f"one-way delay of the second pass of {', '.join(THROUGH_A_NETWORK)} through a proxy; 0 skips it (default {NETWORK_DELAY_MS:g})",
    )
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    began = time.perf_counter()

    def body() -> None:
        with (
            tempfile.TemporaryDirectory(prefix="gbx-bench-keys-") as folder,
            service_configured(Path(folder)) as issuer,
            harness.running_emulator(PROJECT, name="latency") as emu,
        ):
            child_env = {**os.environ, "FIRESTORE_EMULATOR_HOST": emu.host}
            # The service writes one log line per request to stdout: a pipe's cost, not a terminal's, and not in the report.
            with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
                api = Api(issuer)
                print("Requests in-process …", file=sys.stderr, flush=True)
                bare = Bare()
                cases = request_cases(api, bare)
                cold = cold_cases(api) if args.cold_rounds > 0 else []  # before the rounds: a function without a cold case fails at once
                measure_requests(cases, rounds=args.rounds, warmup=WARMUP_ROUNDS, rng=rng)
                delayed: list[Case] = []
                if args.network_delay_ms > 0:
                    print(f"Requests through a network delay of {args.network_delay_ms:g} ms …", file=sys.stderr, flush=True)
                    # Fresh samples, and rounds numbered on from the first pass (each round's run ids are its own).
                    delayed = [
                        dataclasses.replace(c, prepare=_numbered_on(c.prepare, args.rounds + WARMUP_ROUNDS), app_seconds=[], bare_seconds=[], app_cpu=[], bare_cpu=[])
                        for c in cases
                        if c.name in THROUGH_A_NETWORK
                    ]
                    with netdelay.delayed(emu.host, args.network_delay_ms / 1000) as address, firestore_at(address, bare):
                        measure_requests(delayed, rounds=args.rounds, warmup=WARMUP_ROUNDS, rng=rng)
                baseline: ColdCase | None = None
                profile: dict[str, list[tuple[str, float]]] = {}
                if cold:
                    print("Cold starts …", file=sys.stderr, flush=True)
                    baseline = measure_cold_starts(cold, child_env, rounds=args.cold_rounds, rng=rng)
                    if args.import_profile:
                        profile = {case.name: import_profile(child_env, case) for case in cold}
            print_report(cases, cold, baseline, profile, time.perf_counter() - began, delayed=delayed, delay_ms=args.network_delay_ms)

    return harness.exit_status(body)


if __name__ == "__main__":
    sys.exit(main())
