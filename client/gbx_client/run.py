"""`gbx run` and `gbx complete`: check → consume → hash inputs → run_start → CMD → hash outputs → run_complete → seal directory."""

from __future__ import annotations

import contextlib
import json
import shlex
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gbx_client import hashing, logproof, process, sealdir, verify
from gbx_client.errors import (
    CommandFailed,
    DataError,
    GbxError,
    Interrupted,
    NoInput,
    NotEntitled,
    ProtocolViolation,
    Refused,
    SealPending,
    Unreachable,
    UsageError,
)
from gbx_client.service import Reply, Service

CHECK = "/api/entitlement/check"
CONSUME = "/api/entitlement/consume"
RUN_START = "/api/entitlement/run_start"
RUN_COMPLETE = "/api/entitlement/run_complete"
RUN_STATES = ("new", "consumed", "started", "completed")

Say = Callable[[str], None]


@dataclass(frozen=True)
class Job:
    """Everything `gbx run` was asked to do."""

    run_id: str
    image: str
    project: str
    inputs: Path
    outputs: Path
    manifest: Path | None
    seal_dir: Path
    command: list[str]
    workers: int | None = None


@dataclass(frozen=True)
class Start:
    """What run_start records, and so what the seal must name."""

    container_image: str
    project_id: str
    inputs_sha256: str
    run_manifest_sha256: str | None

    def record(self) -> dict[str, str]:
        """The run_start fields as sent (the manifest hash only when there is one)."""
        fields = {"container_image": self.container_image, "project_id": self.project_id, "inputs_sha256": self.inputs_sha256}
        if self.run_manifest_sha256 is not None:
            fields["run_manifest_sha256"] = self.run_manifest_sha256
        return fields

    def claims(self) -> dict[str, str | None]:
        """The claims the seal must hold for this start (no run_manifest_sha256 claim when there was no manifest)."""
        return {**self.record(), "run_manifest_sha256": self.run_manifest_sha256}

    @classmethod
    def from_record(cls, record: Any) -> Start:
        """Read the start fields back from a preseal."""
        if not isinstance(record, dict) or not all(isinstance(record.get(name), str) for name in ("container_image", "project_id", "inputs_sha256")):
            raise UsageError("preseal.json: its start fields are missing")
        return cls(record["container_image"], record["project_id"], record["inputs_sha256"], record.get("run_manifest_sha256"))


def run_job(job: Job, service: Service, say: Say) -> str:
    """Run one job end to end and return its seal id; nothing is charged twice, whatever step a previous attempt died in."""
    # Everything that can fail locally fails before the run is charged.
    sealdir.prepare(job.seal_dir)
    # One seal directory holds one pending seal: another run's is never overwritten or removed (its outputs hash would be lost).
    sealdir.refuse_foreign_preseal(job.seal_dir, job.run_id)
    inputs = hashing.scan(job.inputs)
    manifest = hashing.scan(job.manifest) if job.manifest is not None else None
    if manifest is not None and manifest.is_dir:
        raise UsageError(f"--manifest {job.manifest} is a directory; it must be a file")

    state = _check(service, job.run_id, say)
    if state == "new":
        state = _consume(service, job.run_id, say)
    start = Start(
        container_image=job.image,
        project_id=job.project,
        inputs_sha256=_hash(say, "inputs", inputs, job.workers),
        run_manifest_sha256=_hash(say, "manifest", manifest, job.workers) if manifest is not None else None,
    )
    if state in ("started", "completed"):
        pending = sealdir.read_preseal(job.seal_dir, required=False)
        if pending is not None and pending["run_id"] == job.run_id and pending["url"] == service.base_url and pending["start"] == start.record():
            say(f"{job.seal_dir}/{sealdir.PRESEAL}: CMD already succeeded for this run, finishing its pending seal instead of running CMD again")
            with signals_to_pending(job.seal_dir, say, url=service.base_url) as guard:
                return complete_run(service, job.seal_dir, job.run_id, pending["outputs_sha256"], start, say, guard=guard)
    if state == "completed":
        say(f"run {job.run_id} is already completed: CMD is not run again; sealing the outputs found in {job.outputs}")
    else:
        _run_start(service, job.run_id, start, say)
        _run_command(job, say)
    # From here on a SIGTERM or SIGINT must not lose what CMD produced: it ends gbx as a pending seal (75).
    with signals_to_pending(job.seal_dir, say, url=service.base_url) as guard:
        try:
            listing = hashing.scan(job.outputs)
        except (NoInput, DataError) as exc:
            if state == "completed":
                raise
            # Charged and started, CMD has run: say how to go on, as for a CMD that failed.
            raise type(exc)(
                f"{exc}; no seal written, run {job.run_id} stays started (fix the outputs, then gbx run with the same run_id "
                "runs CMD again without a new charge)"
            ) from exc
        outputs = _hash(say, "outputs", listing, job.workers)
        return complete_run(service, job.seal_dir, job.run_id, outputs, start, say, guard=guard)


def complete_pending(seal_dir: Path, service_for: Callable[[str], Service], say: Say) -> str:
    """`gbx complete`: finish the run that SEAL_DIR/preseal.json describes and write its seal."""
    pending = sealdir.read_preseal(seal_dir, required=True)
    assert pending is not None
    service = service_for(str(pending["url"]))
    say(f"completing run {pending['run_id']} (pending since {pending.get('at', '?')}) at {service.base_url}")
    with signals_to_pending(seal_dir, say, url=service.base_url) as guard:
        return complete_run(
            service, seal_dir, str(pending["run_id"]), str(pending["outputs_sha256"]), Start.from_record(pending["start"]), say, guard=guard
        )


class _Signalled(BaseException):
    """A SIGTERM/SIGINT after CMD, raised by the handler; a BaseException so no library's `except Exception` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class SealGuard:
    """After CMD: a SIGTERM/SIGINT ends gbx with the pending seal (75) once preseal.json is on disk.

    One arriving before that (while the outputs are hashed) waits until the preseal is written; a second one
    ends gbx at once, as interrupted, and the run stays started.
    """

    def __init__(self) -> None:
        self.preseal: Path | None = None
        self.deferred: int | None = None
        self.sealed = False

    def handle(self, signum: int, _frame: object) -> None:
        """The signal handler (runs in the main thread, between bytecodes)."""
        if self.sealed:
            return  # the seal is written and the preseal gone: gbx is about to exit 0
        if self.preseal is not None or self.deferred is not None:
            raise _Signalled(signum)
        self.deferred = signum

    def pending(self, path: Path) -> None:
        """preseal.json is on disk: a signal from now on (or one held back) means seal pending."""
        self.preseal = path
        if self.deferred is not None:
            raise _Signalled(self.deferred)


def complete_command(seal_dir: Path, url: str) -> str:
    """The command that finishes a pending seal: gbx complete sends the token only to the --url the preseal names."""
    return f"gbx complete --url {url} {seal_dir}"


@contextlib.contextmanager
def signals_to_pending(seal_dir: Path, say: Say, *, url: str) -> Iterator[SealGuard]:
    """Install the SealGuard's handlers for SIGTERM and SIGINT; turn the signal into SealPending or Interrupted."""
    guard = SealGuard()
    previous = {signum: signal.signal(signum, guard.handle) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield guard
    except _Signalled as stop:
        name = _signal_name(stop.signum) or f"signal {stop.signum}"
        if guard.preseal is None:
            raise Interrupted(
                f"{name} received twice before the outputs were hashed: no seal is pending and the run stays started "
                "(gbx run with the same run_id runs CMD again without a new charge)",
                128 + stop.signum,
            ) from None
        raise SealPending(
            f"{name} received after CMD succeeded; the seal is pending in {guard.preseal}: finish it with "
            f"`{complete_command(seal_dir, url)}` (or gbx run with the same run_id, which does not run CMD again)"
        ) from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def complete_run(service: Service, seal_dir: Path, run_id: str, outputs_sha256: str, start: Start, say: Say, *, guard: SealGuard | None = None) -> str:
    """run_complete, then the seal directory, self-checked offline.

    preseal.json is written first (write-ahead): whatever ends gbx from here on (an outage, a refusal, a
    signal, kill -9), the outputs hash stays on disk for `gbx complete`; only the written, verified seal removes it.
    """
    preseal = {"run_id": run_id, "url": service.base_url, "outputs_sha256": outputs_sha256, "start": start.record()}
    path = sealdir.write_preseal(seal_dir, {**preseal, "error": "run_complete not answered yet"})
    if guard is not None:
        guard.pending(path)
    try:
        reply = service.post_json(RUN_COMPLETE, {"run_id": run_id, "outputs_sha256": outputs_sha256}, step="run_complete")
        if reply.status >= 500:
            raise Unreachable(f"run_complete: HTTP {reply.status}: {reply.message}")
        if reply.status != 200 and isinstance(error := refusal("run_complete", reply, run_id), Unreachable):
            raise error  # a 429: CMD has run, so its outputs hash is kept for later like any outage
    except Unreachable as exc:
        sealdir.write_preseal(seal_dir, {**preseal, "error": str(exc)})
        raise SealPending(f"{exc}; the seal is pending in {path}: finish it with `{complete_command(seal_dir, service.base_url)}`") from exc
    if reply.status != 200:
        error = refusal("run_complete", reply, run_id)
        if reply.status == 409 and reply.error_code == "run_state_conflict":
            # Sealed already (by a twin with this run_id) with other outputs: no run_complete can ever seal these, so a
            # kept preseal would only make every later run or `gbx complete` fail the same way; the hash goes in the message.
            sealdir.remove_preseal(seal_dir, run_id)
            raise type(error)(f"{error}; no seal written for these outputs (outputs_sha256 {outputs_sha256}); the run is sealed with other outputs") from None
        identity = " with a fresh identity (an ID token for this service's audience)" if reply.status in (401, 403) else " once that is fixed"
        raise type(error)(f"{error}; the seal is pending in {path}: finish it with `{complete_command(seal_dir, service.base_url)}`{identity}") from None
    try:
        bundle = sealdir.Bundle.from_reply(reply.json_object("run_complete"))
        claims = json.loads(bundle.seal_json)
    except (ProtocolViolation, ValueError) as exc:
        sealdir.write_preseal(seal_dir, {**preseal, "error": str(exc)})
        raise ProtocolViolation(f"run_complete answered an unusable seal bundle ({exc}); preseal.json written") from exc
    expected: dict[str, str | None] = {"run_id": run_id, "outputs_sha256": outputs_sha256, **start.claims()}
    differing = sorted(name for name, value in expected.items() if claims.get(name) != value) if isinstance(claims, dict) else ["claims"]
    if differing:
        # Only a completed run sealed earlier (by another gbx with this run_id) can differ.
        sealdir.remove_preseal(seal_dir, run_id)  # as for the 409 above: these can never be sealed under this run_id
        raise Refused(f"run {run_id} was sealed with other {', '.join(differing)}; no seal written for these (outputs_sha256 {outputs_sha256})")
    say(f"run_complete: seal {bundle.seal_id}")

    def self_check(directory: Path) -> None:
        result = verify.verify_seal(verify.load_seal(directory), verify.single_key(bundle.public_key_pem, "the seal bundle"), expected=expected)
        if not result.verified:
            raise ProtocolViolation(f"the service's seal does not verify offline ({result.first_failure()}); no seal file written")

    try:
        sealdir.write(seal_dir, bundle, run_id=run_id, base_url=service.base_url, self_check=self_check)
    except ProtocolViolation as exc:
        # Like an unusable bundle: the outputs hash stays pending, for a `gbx complete` once the service answers a good seal.
        sealdir.write_preseal(seal_dir, {**preseal, "error": str(exc)})
        raise ProtocolViolation(f"{exc}; {path} is kept: finish it with `{complete_command(seal_dir, service.base_url)}`") from exc
    if guard is not None:
        guard.sealed = True
    say(f"wrote {seal_dir}/ ({', '.join(verify.SEAL_FILES)}); verified offline")
    # The seal stands without it: a log that lags is said, and the proof can be fetched later.
    logproof.fetch_proof(service, seal_dir, bundle.seal_id, say)
    return bundle.seal_id


def _check(service: Service, run_id: str, say: Say) -> str:
    """check: the run's state ("new", "consumed", "started" or "completed"), or the refusal."""
    reply = service.post_json(CHECK, {"run_id": run_id}, step="check")
    if reply.status == 200:
        body = reply.json_object("check")
        state = body.get("state")
        if state not in ("new", "consumed"):
            raise ProtocolViolation(f"check: unexpected state {state!r}")
        resumed = " (consumed by an earlier attempt: no new charge)" if state == "consumed" else ""
        say(f"check: run {run_id} is {state}{resumed}, balance {body.get('balance')}")
        return str(state)
    state = _reused_state(reply)
    if state:
        say(f"check: run {run_id} is already {state} by this principal: resuming it, no new charge")
        return state
    raise refusal("check", reply, run_id)


def _consume(service: Service, run_id: str, say: Say) -> str:
    """consume: charge one run (a retry replays without a charge); "consumed", or the state a racing twin left."""
    reply = service.post_json(CONSUME, {"run_id": run_id}, step="consume")
    if reply.status == 200:
        body = reply.json_object("consume")
        charged = "already charged for this run_id, no new charge" if body.get("replayed") else "1 run charged"
        say(f"consume: {charged}, balance {body.get('balance')}")
        return "consumed"
    state = _reused_state(reply)
    if state:
        say(f"consume: run {run_id} is already {state}: resuming it, no new charge")
        return state
    raise refusal("consume", reply, run_id)


def _run_start(service: Service, run_id: str, start: Start, say: Say) -> None:
    """run_start: record image, project and hashes; an identical repeat is answered as before."""
    reply = service.post_json(RUN_START, {"run_id": run_id, **start.record()}, step="run_start")
    if reply.status != 200:
        raise refusal("run_start", reply, run_id)
    say(f"run_start: started at {reply.json_object('run_start').get('started_at')}")


def _run_command(job: Job, say: Say) -> None:
    """Run CMD; CommandFailed (with CMD's status) unless it exits 0."""
    say(f"run: {shlex.join(job.command)}")
    started = time.perf_counter()
    status = process.run_command(job.command)
    elapsed = time.perf_counter() - started
    if status != 0:
        how = f"was ended by {_signal_name(status - 128)}" if status > 128 and _signal_name(status - 128) else f"exited with status {status}"
        raise CommandFailed(
            f"CMD {how} after {elapsed:.1f} s; no seal written, run {job.run_id} stays started "
            "(gbx run with the same run_id runs it again without a new charge)",
            status,
        )
    say(f"CMD exited 0 after {elapsed:.1f} s")


def _hash(say: Say, label: str, listing: hashing.Listing, workers: int | None) -> str:
    """Hash a scanned path and report it in one line."""
    digest = hashing.hash_listing(listing, workers=workers)
    say(f"hash {label} {listing.path}: {digest.describe()}: {digest.sha256}")
    return digest.sha256


def _reused_state(reply: Reply) -> str:
    """The state a 409 run_id_reused names ("started"/"completed"), or ""."""
    if reply.status == 409 and reply.error_code == "run_id_reused" and reply.error_state in ("started", "completed"):
        return reply.error_state
    return ""


def refusal(step: str, reply: Reply, run_id: str) -> GbxError:
    """The gbx error for a final answer that is not a success."""
    detail = f"{step}: HTTP {reply.status} {reply.message}"
    if reply.status == 402:
        return NotEntitled(f"{detail}; CMD was not run")
    if reply.status in (401, 403):
        return Refused(f"{detail} (is the ID token for this service's audience?)")
    if reply.status in (409, 422):
        return Refused(f"{detail} (run {run_id})")
    if reply.status == 400:
        return UsageError(detail)
    if reply.status in (404, 405):
        return UsageError(f"{detail} (is --url the service's base URL?)")
    if reply.status == 429:
        return Unreachable(f"{detail} (the service is rate limiting)")
    return ProtocolViolation(detail)


def _signal_name(number: int) -> str:
    """SIGTERM for 15, or "" for a number that is no signal."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return ""
