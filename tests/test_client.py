"""The installed `gbx` runner client, driven as a subprocess against the service (real emulator, KMS test server).

Faults come from a small threaded HTTP proxy in front of the service: 503 with Retry-After, connections
dropped before or after the service acted (a lost reply), replies cut mid-body, and a run_complete
that stays unreachable. Balances are asserted exactly after each scenario: nothing is charged twice.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gbx_client.errors import Unreachable
from gbx_client.identity import StaticToken
from gbx_client.seal_format import b64url_decode, b64url_encode, canonical_json, decode_payload, parse_seal_svg, render_seal_svg, verify_link
from gbx_client.service import RetryPolicy, Service
from tests.conftest import AUDIENCE, IMAGE, RUNNER, Api, error_code

PROJECT = "acme-prod"
GBX = shutil.which("gbx", path=os.path.dirname(sys.executable))
SEAL_FILES = {"seal.json", "seal.sig", "seal.svg", "public_key.pem", "verify_link.txt", "VERIFY.md", "seal.tlog-proof"}
# Small bounds keep fault scenarios fast; the defaults (120 s, 65 s) are for production.
FAST = ["--retry-timeout", "4", "--attempt-timeout", "10"]


def coreutils_hash(path: Path) -> str:
    """The canonical hash as coreutils computes it (the pipeline of docs/runner.md)."""
    if path.is_file():
        return subprocess.run(["sha256sum", str(path)], capture_output=True, check=True, text=True).stdout.split()[0]
    pipeline = '(cd "$1" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0r sha256sum) | sha256sum'
    done = subprocess.run(["bash", "-c", f"set -o pipefail; {pipeline}", "hash", str(path)], capture_output=True, check=True, text=True)
    return done.stdout.split()[0]


def balance(api: Api) -> int:
    """The runner's balance, read with check (which writes nothing)."""
    response = api.check("balance-probe")
    if response.status_code == 402:
        return 0
    assert response.status_code == 200, response.text
    return response.json()["balance"]


def run_state(api: Api, run_id: str) -> str:
    """The state of a run as check reports it: new, consumed, started or completed."""
    response = api.check(run_id)
    if response.status_code == 409:
        assert error_code(response) == "run_id_reused"
        return response.json()["error"]["state"]
    assert response.status_code in (200, 402), response.text
    return response.json()["state"] if response.status_code == 200 else "new"


@dataclass
class Result:
    """A finished gbx process."""

    code: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def last_line(self) -> str:
        """gbx's last stderr line, the one that tells its own exit codes from CMD's."""
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines else ""


@dataclass
class Job:
    """A workspace for one job: inputs, outputs, seal directory, and gbx run's arguments."""

    root: Path
    url: str
    token: str
    run_id: str = "job-1"

    def __post_init__(self) -> None:
        self.inputs = self.root / "in"
        self.outputs = self.root / "out"
        self.seal_dir = self.root / "seal"
        self.runs_log = self.root / "cmd-runs.log"
        (self.inputs / "sub").mkdir(parents=True)
        (self.inputs / "a.txt").write_text("alpha\n")
        (self.inputs / "sub" / "b.bin").write_bytes(bytes(range(256)) * 40)

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of gbx: no GBX_* or Cloud Run variables from the test process, the runner's token."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GBX_", "CLOUD_RUN_", "GOOGLE_"))}
        env["GBX_ID_TOKEN"] = self.token
        env.update(extra)
        return env

    def args(self, *extra: str, url: str | None = None, run_id: str | None = None) -> list[str]:
        """gbx run's options for this job."""
        return [
            "run", "--url", url or self.url, "--run-id", run_id or self.run_id, "--image", IMAGE, "--project", PROJECT,
            "--inputs", str(self.inputs), "--outputs", str(self.outputs), "--seal-dir", str(self.seal_dir), *extra,
        ]

    def writes_outputs(self, text: str = "result") -> list[str]:
        """A CMD that logs that it ran and writes the outputs from the inputs."""
        script = f'echo ran >> "{self.runs_log}"; mkdir -p "{self.outputs}"; cp -R "{self.inputs}/." "{self.outputs}/"; printf %s "{text}" > "{self.outputs}/result.txt"; echo CMD-STDOUT'
        return ["--", "sh", "-c", script]

    def cmd_runs(self) -> int:
        """How many times a CMD of writes_outputs ran."""
        return len(self.runs_log.read_text().splitlines()) if self.runs_log.exists() else 0

    def gbx(self, *args: str, env: dict[str, str] | None = None, stdin: str = "", timeout: float = 60) -> Result:
        """Run the installed gbx to its end."""
        started = time.monotonic()
        done = subprocess.run([GBX, *args], input=stdin, capture_output=True, text=True, env=env or self.env(), cwd=self.root, timeout=timeout)
        return Result(done.returncode, done.stdout, done.stderr, time.monotonic() - started)

    def seal_claims(self) -> dict[str, Any]:
        """The claims of the written seal.json."""
        return json.loads((self.seal_dir / "seal.json").read_bytes())


@pytest.fixture
def job(api: Api, tmp_path: Path) -> Job:
    """A job workspace for the runner, against the service."""
    assert GBX is not None, "gbx is not installed in this virtualenv (pip install -e ./client)"
    return Job(root=tmp_path, url=api.base_url, token=api.token(RUNNER))


# ---------------------------------------------------------------------------------------------
# A proxy that fails chosen requests
# ---------------------------------------------------------------------------------------------

UNAVAILABLE = "503"  # answer 503 + Retry-After without forwarding
DROP = "drop"  # close the connection without forwarding or answering
LOSE = "lose"  # forward (the service acts), then close without answering: the reply is lost
CUT = "cut"  # forward, then send the headers and half the body and close
SLOW = "slow"  # wait longer than the client's attempt timeout, then forward
TOO_MANY = "429"  # answer 429 + Retry-After without forwarding: a burst limit, retried like a 503


@dataclass
class FaultProxy:
    """A threaded HTTP proxy in front of the service; each path has a queue of faults for its next requests."""

    upstream: str
    retry_after: str = "1"
    faults: dict[str, list[str]] = field(default_factory=dict)
    always: dict[str, str] = field(default_factory=dict)
    received: Counter[str] = field(default_factory=Counter)
    forwarded: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def fail(self, endpoint: str, *faults: str) -> None:
        """Queue faults for the next requests to /api/.../endpoint."""
        with self.lock:
            self.faults.setdefault(endpoint, []).extend(faults)

    def next_fault(self, endpoint: str) -> str:
        with self.lock:
            self.received[endpoint] += 1
            if endpoint in self.always:
                return self.always[endpoint]
            queue = self.faults.get(endpoint, [])
            return queue.pop(0) if queue else ""

    def forward(self, method: str, path: str, headers: dict[str, str], body: bytes) -> requests.Response:
        kept = {name: value for name, value in headers.items() if name.lower() in ("authorization", "content-type", "accept")}
        response = requests.request(method, self.upstream + path, headers=kept, data=body, timeout=30)
        with self.lock:
            self.forwarded[path.rsplit("/", 1)[-1]] += 1
        return response


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet: pytest shows failures, not traffic
            pass

        def do_GET(self) -> None:
            self.relay()

        def do_POST(self) -> None:
            self.relay()

        def relay(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            fault = proxy.next_fault(self.path.rsplit("/", 1)[-1])
            if fault in (UNAVAILABLE, TOO_MANY):
                status = int(fault)
                payload = b'{"error": {"code": "unavailable", "message": "proxy says try later", "status": %d}}' % status
                self.reply(status, {"Content-Type": "application/json", "Retry-After": proxy.retry_after}, payload)
                return
            if fault == DROP:
                self.close_connection = True
                return
            if fault == SLOW:
                time.sleep(1.5)
            response = proxy.forward(self.command, self.path, dict(self.headers), body)
            if fault == LOSE:
                self.close_connection = True
                return
            headers = {name: value for name, value in response.headers.items() if name.lower() in ("content-type", "retry-after", "x-request-id")}
            if fault == CUT:
                self.send_response(response.status_code)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(response.content)))
                self.end_headers()
                self.wfile.write(response.content[: len(response.content) // 2])
                self.close_connection = True
                return
            self.reply(response.status_code, headers, response.content)

        def reply(self, status: int, headers: dict[str, str], payload: bytes) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    return Handler


@contextlib.contextmanager
def serving(instance: FaultProxy, handler: type[BaseHTTPRequestHandler]) -> Iterator[None]:
    """Serve a proxy on a free local port (its `url`) until the block ends."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    # server_close() waits for requests still in flight (a SLOW one forwards late): none may reach the next test's database.
    server.daemon_threads = False
    server.block_on_close = True
    instance.url = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def proxy(server_url: str) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the service."""
    instance = FaultProxy(upstream=server_url)
    with serving(instance, _handler(instance)):
        yield instance


# ---------------------------------------------------------------------------------------------
# gbx run
# ---------------------------------------------------------------------------------------------


def test_full_run_seals_and_openssl_verifies(api: Api, job: Job) -> None:
    api.issue(RUNNER, 2)
    manifest = job.root / "manifest.json"
    manifest.write_text('{"steps": ["render"]}\n')
    script = f'cat > "{job.root}/stdin.txt"; mkdir -p "{job.outputs}/deep"; printf x > "{job.outputs}/deep/x"; echo CMD-STDOUT; echo CMD-STDERR >&2'
    result = job.gbx(*job.args("--manifest", str(manifest)), "--", "sh", "-c", script, stdin="fed to CMD")

    assert result.code == 0, result.stderr
    assert result.last_line.startswith("gbx: exit 0 (sealed): run job-1 sealed as ")
    # CMD's stdio is passed through; gbx says nothing on stdout.
    assert result.stdout == "CMD-STDOUT\n" and "CMD-STDERR" in result.stderr
    assert (job.root / "stdin.txt").read_text() == "fed to CMD"
    # One progress line per step, hashes with their sizes.
    for step in ("check: run job-1 is new", "consume: 1 run charged, balance 1", "hash inputs", "hash manifest", "run_start: started at", "hash outputs", "run_complete: seal"):
        assert step in result.stderr
    assert set(os.listdir(job.seal_dir)) == SEAL_FILES
    claims = job.seal_claims()
    assert claims["run_id"] == "job-1" and claims["container_image"] == IMAGE and claims["project_id"] == PROJECT and claims["principal"] == RUNNER
    assert claims["inputs_sha256"] == coreutils_hash(job.inputs)
    assert claims["outputs_sha256"] == coreutils_hash(job.outputs)
    assert claims["run_manifest_sha256"] == coreutils_hash(manifest)
    # The seal directory is self-consistent: the svg carries seal.json and seal.sig exactly.
    element = parse_seal_svg((job.seal_dir / "seal.svg").read_bytes())
    assert b64url_decode(element.payload) == (job.seal_dir / "seal.json").read_bytes()
    assert b64url_decode(element.signature) == (job.seal_dir / "seal.sig").read_bytes()
    openssl = subprocess.run(
        ["openssl", "dgst", "-sha256", "-verify", "public_key.pem", "-signature", "seal.sig", "seal.json"], cwd=job.seal_dir, capture_output=True, text=True
    )
    assert openssl.returncode == 0 and openssl.stdout.strip() == "Verified OK"
    verify_md = (job.seal_dir / "VERIFY.md").read_text()
    assert "openssl dgst -sha256 -verify public_key.pem -signature seal.sig seal.json" in verify_md and f"{api.base_url}/api/seal/public_keys" in verify_md
    # The verification link: the bundle's, named in VERIFY.md, carrying exactly seal.json and seal.sig.
    link = (job.seal_dir / "verify_link.txt").read_text().strip()
    assert link == verify_link(AUDIENCE, payload=(job.seal_dir / "seal.json").read_bytes(), signature=(job.seal_dir / "seal.sig").read_bytes())
    assert "verify_link.txt" in verify_md and 'gbx verify "$(cat verify_link.txt)"' in verify_md
    # The log proof's fetch, as VERIFY.md writes it, serves the same entry as the seal.tlog-proof gbx stored.
    (proof_url,) = re.findall(r"curl -fsS '([^']+)' > seal.tlog-proof", verify_md)
    fetched = requests.get(proof_url, timeout=30)
    assert fetched.status_code == 200
    assert fetched.text.splitlines()[:2] == (job.seal_dir / "seal.tlog-proof").read_text().splitlines()[:2]
    # The service agrees.
    online = api.verify((job.seal_dir / "seal.svg").read_bytes())
    assert online.json()["status"] == "VERIFIED"
    assert balance(api) == 1


def test_second_run_with_same_run_id_rewrites_the_seal_without_running_cmd(api: Api, job: Job) -> None:
    api.issue(RUNNER, 2)
    first = job.gbx(*job.args(), *job.writes_outputs())
    assert first.code == 0, first.stderr
    seal_json = (job.seal_dir / "seal.json").read_bytes()
    (job.seal_dir / "seal.svg").unlink()  # a seal directory that lost a file is rewritten whole

    again = job.gbx(*job.args(), *job.writes_outputs())
    assert again.code == 0, again.stderr
    assert "already completed: CMD is not run again" in again.stderr
    assert job.cmd_runs() == 1
    assert (job.seal_dir / "seal.json").read_bytes() == seal_json and set(os.listdir(job.seal_dir)) == SEAL_FILES
    assert balance(api) == 1

    # Other outputs under a completed run_id are refused; so are other inputs; nothing is charged or sealed.
    (job.outputs / "result.txt").write_text("tampered")
    other_outputs = job.gbx(*job.args(), *job.writes_outputs())
    assert other_outputs.code == 77, other_outputs.stderr
    assert "gbx: exit 77 (refused): run_complete: HTTP 409 run_state_conflict" in other_outputs.last_line
    (job.outputs / "result.txt").write_text("result")
    (job.inputs / "a.txt").write_text("other input\n")
    other_inputs = job.gbx(*job.args(), *job.writes_outputs())
    assert other_inputs.code == 77 and "sealed with other inputs_sha256" in other_inputs.last_line
    assert (job.seal_dir / "seal.json").read_bytes() == seal_json
    assert job.cmd_runs() == 1 and balance(api) == 1


def test_resume_after_gbx_is_killed_while_cmd_runs(api: Api, job: Job) -> None:
    api.issue(RUNNER, 1)
    started = job.root / "cmd-started"
    script = f'touch "{started}"; sleep 30'
    process = subprocess.Popen([GBX, *job.args(), "--", "sh", "-c", script], env=job.env(), cwd=job.root, start_new_session=True, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not started.exists():
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        assert time.monotonic() < deadline, "CMD never started"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the whole job dies: gbx and CMD, no chance to clean up
    process.wait(timeout=10)
    if process.stderr:
        process.stderr.close()
    assert run_state(api, "job-1") == "started" and balance(api) == 0

    resumed = job.gbx(*job.args(), *job.writes_outputs())
    assert resumed.code == 0, resumed.stderr
    assert "already started by this principal: resuming it, no new charge" in resumed.stderr
    assert job.cmd_runs() == 1 and job.seal_claims()["outputs_sha256"] == coreutils_hash(job.outputs)
    assert run_state(api, "job-1") == "completed" and balance(api) == 0


def test_resume_after_a_crash_between_consume_and_run_start(api: Api, job: Job) -> None:
    api.issue(RUNNER, 2)
    # A Cloud Run task that died right after consume; its retry has the same execution and task index.
    assert api.consume("render-nightly-x7k2p-0").status_code == 200
    assert balance(api) == 1
    token_file = job.root / "token"
    token_file.write_text(job.token)
    env = job.env(CLOUD_RUN_EXECUTION="render-nightly-x7k2p", CLOUD_RUN_TASK_INDEX="0", CLOUD_RUN_TASK_ATTEMPT="1", GOOGLE_CLOUD_PROJECT=PROJECT)
    del env["GBX_ID_TOKEN"]
    args = ["run", "--url", job.url, "--image", IMAGE, "--inputs", str(job.inputs), "--outputs", str(job.outputs), "--seal-dir", str(job.seal_dir)]
    result = job.gbx(*args, "--token-command", f'cat "{token_file}"', *job.writes_outputs(), env=env)
    assert result.code == 0, result.stderr
    assert "check: run render-nightly-x7k2p-0 is consumed (consumed by an earlier attempt: no new charge)" in result.stderr
    assert job.seal_claims()["run_id"] == "render-nightly-x7k2p-0" and job.seal_claims()["project_id"] == PROJECT
    assert balance(api) == 1 and run_state(api, "render-nightly-x7k2p-0") == "completed"


def test_resume_after_a_crash_between_run_complete_and_the_seal(api: Api, job: Job) -> None:
    api.issue(RUNNER, 1)
    # The earlier attempt got as far as run_complete, then died before writing the seal directory.
    job.outputs.mkdir()
    (job.outputs / "r.txt").write_text("done")
    assert api.consume("job-1").status_code == 200
    assert api.run_start("job-1", inputs_sha256=coreutils_hash(job.inputs)).status_code == 200
    bundle = api.run_complete("job-1", coreutils_hash(job.outputs)).json()

    result = job.gbx(*job.args(), *job.writes_outputs())
    assert result.code == 0, result.stderr
    assert job.cmd_runs() == 0
    assert (job.seal_dir / "seal.json").read_text() == bundle["seal_json"]
    assert (job.seal_dir / "seal.sig").read_bytes() == base64.b64decode(bundle["signature"])
    assert balance(api) == 0


def test_exhausted_balance_never_runs_cmd_and_is_not_retried(api: Api, job: Job, proxy: FaultProxy) -> None:
    result = job.gbx(*job.args(url=proxy.url), *FAST, *job.writes_outputs())
    assert result.code == 67, result.stderr
    assert result.last_line.startswith("gbx: exit 67 (not-entitled): check: HTTP 402 entitlement_exhausted")
    assert job.cmd_runs() == 0 and not job.outputs.exists()
    assert proxy.received == Counter({"check": 1})  # a 4xx is final: asked once, consume never called
    assert balance(api) == 0 and run_state(api, "job-1") == "new"


def test_failing_cmd_leaves_the_run_started_and_exits_with_its_status(api: Api, job: Job) -> None:
    api.issue(RUNNER, 1)
    failed = job.gbx(*job.args(), "--", "sh", "-c", "exit 3")
    assert failed.code == 3
    assert failed.last_line.startswith("gbx: exit 3 (cmd-failed): CMD exited with status 3")
    assert not (job.seal_dir / "seal.json").exists()
    assert run_state(api, "job-1") == "started" and balance(api) == 0

    # A CMD exiting with one of gbx's own codes is told apart by the last line only.
    as_unavailable = job.gbx(*job.args(), "--", "sh", "-c", "exit 69")
    assert as_unavailable.code == 69 and as_unavailable.last_line.startswith("gbx: exit 69 (cmd-failed)")
    killed = job.gbx(*job.args(), "--", "sh", "-c", "kill -TERM $$")
    assert killed.code == 128 + signal.SIGTERM and "CMD was ended by SIGTERM" in killed.last_line
    missing = job.gbx(*job.args(), "--", "no-such-command-gbx")
    assert missing.code == 127
    assert run_state(api, "job-1") == "started" and balance(api) == 0


def test_outputs_missing_after_cmd_say_the_run_can_go_on_without_a_new_charge(api: Api, job: Job) -> None:
    api.issue(RUNNER, 1)
    missing = job.gbx(*job.args(), "--", "true")  # CMD succeeds but writes no outputs
    assert missing.code == 66
    assert "no such file or directory" in missing.last_line and "run job-1 stays started" in missing.last_line
    assert "without a new charge" in missing.last_line
    assert run_state(api, "job-1") == "started" and balance(api) == 0
    again = job.gbx(*job.args(), *job.writes_outputs())  # as the message says: the same run_id, no second charge
    assert again.code == 0, again.stderr
    assert run_state(api, "job-1") == "completed" and balance(api) == 0


def test_signals_are_forwarded_to_cmd(api: Api, job: Job) -> None:
    api.issue(RUNNER, 1)
    ready, got = job.root / "ready", job.root / "got-term"
    script = f'trap \'echo TERM > "{got}"; exit 7\' TERM; touch "{ready}"; while :; do sleep 0.05; done'
    process = subprocess.Popen([GBX, *job.args(), "--", "sh", "-c", script], env=job.env(), cwd=job.root, start_new_session=True, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)  # to gbx only, as a job runner stopping a task does
    _, stderr = process.communicate(timeout=20)
    assert process.returncode == 7, stderr
    assert got.read_text() == "TERM\n"
    assert run_state(api, "job-1") == "started" and balance(api) == 0


def test_unavailable_answers_lost_replies_and_cut_bodies_are_retried(api: Api, job: Job, proxy: FaultProxy) -> None:
    api.issue(RUNNER, 2)
    proxy.fail("check", CUT)  # a reply cut mid-body
    proxy.fail("consume", UNAVAILABLE, LOSE)  # 503 + Retry-After, then charged but the reply is lost
    proxy.fail("run_start", DROP, LOSE)  # dropped before and after the service acted
    proxy.fail("run_complete", UNAVAILABLE, LOSE)  # 503, then sealed but the reply is lost
    result = job.gbx(*job.args(url=proxy.url), *FAST, *job.writes_outputs())
    assert result.code == 0, result.stderr
    assert result.seconds >= 2  # both Retry-After: 1 answers were honoured
    assert "consume: HTTP 503; retrying in 1.0 s" in result.stderr
    # (and the seal log's proof, fetched once after the seal: its last path segment carries the seal id)
    forwarded = Counter({name: count for name, count in proxy.forwarded.items() if not name.startswith("proof?seal_id=")})
    assert forwarded == Counter({"check": 2, "consume": 2, "run_start": 2, "run_complete": 2})
    assert sum(proxy.forwarded.values()) == sum(forwarded.values()) + 1
    # The lost consume was applied once; its retry replayed without a charge.
    assert "consume: already charged for this run_id, no new charge, balance 1" in result.stderr
    assert balance(api) == 1 and job.cmd_runs() == 1
    assert api.verify((job.seal_dir / "seal.svg").read_bytes()).json()["status"] == "VERIFIED"


def test_a_long_outage_is_retried_in_bounded_chains_and_4xx_never(api: Api, job: Job, proxy: FaultProxy) -> None:
    api.issue(RUNNER, 1)
    # urllib3 retries by recursion: many quick retries must end in "unreachable", never a RecursionError.
    proxy.always["check"] = UNAVAILABLE
    proxy.retry_after = "0"
    reports: list[str] = []
    service = Service(proxy.url, identity=StaticToken(job.token), policy=RetryPolicy(timeout=1.0, backoff=0.0, backoff_max=0.05, attempts_per_chain=5), report=reports.append)
    with pytest.raises(Unreachable, match="still answers HTTP 503 after 1 s"):
        service.post_json("/api/entitlement/check", {"run_id": "job-1"}, step="check")
    assert proxy.received["check"] > 3 * 6 and sum("after 5 retries" in line for line in reports) >= 3
    # A 429 that never ends is an outage like a 503: retried until --retry-timeout, then 69; CMD never runs.
    proxy.always["check"] = TOO_MANY
    asked_before = proxy.received["check"]
    limited = job.gbx(*job.args(url=proxy.url), *FAST, *job.writes_outputs())
    assert limited.code == 69 and "still answers HTTP 429 after 4 s" in limited.last_line
    assert proxy.received["check"] > asked_before + 1
    assert job.cmd_runs() == 0 and balance(api) == 1


def test_a_burst_answered_429_is_retried_honouring_retry_after(api: Api, job: Job, proxy: FaultProxy) -> None:
    # Cloud Run and Hosting answer 429 when hundreds of tasks start at once: gbx waits as asked and goes on.
    api.issue(RUNNER, 1)
    proxy.retry_after = "1"
    proxy.fail("consume", TOO_MANY, TOO_MANY)
    started = time.monotonic()
    result = job.gbx(*job.args(url=proxy.url), "--retry-timeout", "20", *job.writes_outputs())
    assert result.code == 0, result.stderr
    assert time.monotonic() - started >= 2.0  # two Retry-After: 1 waits
    assert result.stderr.count("consume: HTTP 429; retrying in") == 2
    assert proxy.received["consume"] == 3 and proxy.forwarded["consume"] == 1
    assert job.cmd_runs() == 1 and balance(api) == 0


def test_attempt_timeouts_are_retried(api: Api, job: Job, proxy: FaultProxy) -> None:
    api.issue(RUNNER, 1)
    proxy.fail("consume", SLOW)  # slower than the attempt timeout; the service still charges it
    result = job.gbx(*job.args(url=proxy.url), "--retry-timeout", "10", "--attempt-timeout", "0.5", *job.writes_outputs())
    assert result.code == 0, result.stderr
    assert "consume: ReadTimeoutError" in result.stderr
    assert balance(api) == 0 and run_state(api, "job-1") == "completed"


def test_unreachable_service_before_cmd(api: Api, job: Job) -> None:
    api.issue(RUNNER, 1)
    closed = _closed_port_url()
    result = job.gbx(*job.args(url=closed), "--retry-timeout", "1", *job.writes_outputs())
    assert result.code == 69, result.stderr
    assert result.last_line.startswith(f"gbx: exit 69 (unavailable): check: {closed}/api/entitlement/check unreachable for 1 s")
    assert job.cmd_runs() == 0 and balance(api) == 1


def test_run_complete_unreachable_writes_a_preseal_that_gbx_complete_finishes(api: Api, job: Job, proxy: FaultProxy) -> None:
    api.issue(RUNNER, 1)
    proxy.always["run_complete"] = UNAVAILABLE
    proxy.retry_after = "0"
    result = job.gbx(*job.args(url=proxy.url), "--retry-timeout", "1", *job.writes_outputs())
    assert result.code == 75, result.stderr
    assert result.last_line.startswith("gbx: exit 75 (seal-pending): run_complete:")
    assert re.search(rf"`gbx complete --url http://127\.0\.0\.1:\d+ {re.escape(str(job.seal_dir))}`", result.last_line)
    preseal = json.loads((job.seal_dir / "preseal.json").read_text())
    assert preseal["state"] == "pending" and preseal["run_id"] == "job-1" and preseal["url"] == proxy.url
    assert preseal["outputs_sha256"] == coreutils_hash(job.outputs) and "HTTP 503" in preseal["error"] and preseal["at"].endswith("Z")
    assert not (job.seal_dir / "seal.json").exists()
    assert run_state(api, "job-1") == "started" and balance(api) == 0

    still = job.gbx("complete", str(job.seal_dir), "--url", proxy.url, "--retry-timeout", "0.5")
    assert still.code == 75 and (job.seal_dir / "preseal.json").exists()

    del proxy.always["run_complete"]
    done = job.gbx("complete", str(job.seal_dir), "--url", proxy.url, *FAST)
    assert done.code == 0, done.stderr
    assert set(os.listdir(job.seal_dir)) == SEAL_FILES  # the preseal is gone
    assert job.seal_claims()["outputs_sha256"] == preseal["outputs_sha256"]
    openssl = subprocess.run(["openssl", "dgst", "-sha256", "-verify", "public_key.pem", "-signature", "seal.sig", "seal.json"], cwd=job.seal_dir, capture_output=True, text=True)
    assert openssl.stdout.strip() == "Verified OK"
    assert job.cmd_runs() == 1 and balance(api) == 0 and run_state(api, "job-1") == "completed"


def test_gbx_run_again_finishes_a_pending_seal_without_rerunning_cmd(api: Api, job: Job, proxy: FaultProxy) -> None:
    api.issue(RUNNER, 1)
    proxy.always["run_complete"] = DROP
    pending = job.gbx(*job.args(url=proxy.url), "--retry-timeout", "0.5", *job.writes_outputs())
    assert pending.code == 75, pending.stderr
    del proxy.always["run_complete"]
    again = job.gbx(*job.args(url=proxy.url), *FAST, *job.writes_outputs())
    assert again.code == 0, again.stderr
    assert "finishing its pending seal instead of running CMD again" in again.stderr
    assert job.cmd_runs() == 1 and not (job.seal_dir / "preseal.json").exists()
    assert balance(api) == 0


def test_usage_errors_are_caught_before_any_charge(api: Api, job: Job) -> None:
    api.issue(RUNNER, 1)
    unpinned = job.gbx("run", "--url", job.url, "--run-id", "job-1", "--image", "europe-docker.pkg.dev/acme/jobs/render:1.4", "--project", PROJECT,
                       "--inputs", str(job.inputs), "--outputs", str(job.outputs), "--", "true")
    assert unpinned.code == 64 and "must be pinned by digest" in unpinned.last_line
    no_cmd = job.gbx(*job.args())
    assert no_cmd.code == 64 and "no CMD" in no_cmd.last_line
    inside = job.gbx(*job.args("--seal-dir", str(job.outputs / "seal")), *job.writes_outputs())
    assert inside.code == 64 and "is inside --outputs" in inside.last_line
    (job.inputs / "link").symlink_to("a.txt")
    symlinked = job.gbx(*job.args(), *job.writes_outputs())
    assert symlinked.code == 65 and "symlinks are not hashed" in symlinked.last_line
    assert balance(api) == 1 and run_state(api, "job-1") == "new"


def test_run_help_documents_the_exit_codes() -> None:
    assert GBX is not None
    shown = subprocess.run([GBX, "run", "--help"], capture_output=True, text=True, check=True).stdout
    for code in ("64", "65", "66", "67", "69", "73", "74", "75", "76", "77", "78"):
        assert f"\n  {code:>3}  " in shown
    assert "told apart only by gbx's last stderr line" in shown and "128+N" in shown
    for variable in ("GBX_URL", "GBX_RUN_ID", "CLOUD_RUN_EXECUTION", "GBX_CONTAINER_IMAGE", "GOOGLE_CLOUD_PROJECT", "GBX_ID_TOKEN", "GBX_TOKEN_COMMAND", "GBX_RETRY_TIMEOUT"):
        assert variable in shown


def _closed_port_url() -> str:
    """A local URL nothing listens on."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# ---------------------------------------------------------------------------------------------
# gbx verify
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def sealed(api: Api, job: Job) -> Job:
    """A job sealed by gbx run."""
    api.issue(RUNNER, 1)
    result = job.gbx(*job.args(), *job.writes_outputs())
    assert result.code == 0, result.stderr
    return job


def test_verify_good_seal_offline(api: Api, sealed: Job) -> None:
    keys_url = f"{api.base_url}/api/seal/public_keys"
    keys_file = sealed.root / "keys.json"
    keys_file.write_text(requests.get(keys_url, timeout=10).text)
    seal_dir, svg = str(sealed.seal_dir), str(sealed.seal_dir / "seal.svg")

    by_url = sealed.gbx("verify", seal_dir, "--keys", keys_url, "--outputs", str(sealed.outputs))
    assert by_url.code == 0, by_url.stderr
    assert by_url.stdout.startswith("VERIFIED  seal ")
    for check in ("document", "key", "signature", "outputs"):
        assert f"  {check}" in by_url.stdout
    assert "run_id" in by_url.stdout and "job-1" in by_url.stdout

    as_json = sealed.gbx("verify", svg, "--keys", str(keys_file), "--json")
    assert as_json.code == 0, as_json.stderr
    body = json.loads(as_json.stdout)
    assert body["status"] == "VERIFIED" and body["checks"] == {"document": "ok", "key": "ok", "signature": "ok"}
    assert body["seal"] == sealed.seal_claims() and body["seal_id"] == body["seal"]["seal_id"]

    assert sealed.gbx("verify", svg, "--public-key", str(sealed.seal_dir / "public_key.pem")).code == 0
    # Without a key source even a seal directory is a usage error: its own public_key.pem proves nothing.
    own_key = sealed.gbx("verify", seal_dir)
    assert own_key.code == 2 and "no key to check against" in own_key.stderr
    online = sealed.gbx("verify", seal_dir, "--online", api.base_url, "--json")
    assert online.code == 0, online.stderr
    assert json.loads(online.stdout)["checks"]["online"] == "ok"


def test_verify_outputs_with_one_changed_byte(sealed: Job) -> None:
    keys = ["--public-key", str(sealed.seal_dir / "public_key.pem")]
    assert sealed.gbx("verify", str(sealed.seal_dir), *keys, "--outputs", str(sealed.outputs)).code == 0
    target = sealed.outputs / "sub" / "b.bin"
    data = bytearray(target.read_bytes())
    data[1000] ^= 0x01
    target.write_bytes(bytes(data))
    changed = sealed.gbx("verify", str(sealed.seal_dir), *keys, "--outputs", str(sealed.outputs), "--json")
    assert changed.code == 1
    body = json.loads(changed.stdout)
    assert body["status"] == "INVALID" and body["checks"]["signature"] == "ok"
    assert body["checks"]["outputs"] == f"{sealed.outputs} hashes to {coreutils_hash(sealed.outputs)}, the seal names {sealed.seal_claims()['outputs_sha256']}"


def test_verify_tampered_seals(api: Api, sealed: Job) -> None:
    keys = ["--keys", f"{api.base_url}/api/seal/public_keys"]
    svg = (sealed.seal_dir / "seal.svg").read_text()
    element = parse_seal_svg(svg.encode())
    claims, _ = decode_payload(element.payload)

    # Another outputs hash in the payload, signature kept.
    forged_payload = b64url_encode(canonical_json({**claims, "outputs_sha256": "0" * 64}))
    forged = sealed.root / "forged.svg"
    forged.write_text(svg.replace(element.payload, forged_payload))
    result = sealed.gbx("verify", str(forged), *keys, "--json")
    assert result.code == 1
    assert json.loads(result.stdout)["checks"] == {"document": "ok", "key": "ok", "signature": "signature does not match the payload"}

    # A seal directory whose seal.json was edited no longer agrees with its svg (and openssl says so too).
    (sealed.seal_dir / "seal.json").write_bytes(canonical_json({**claims, "project_id": "evil-project"}))
    edited = sealed.gbx("verify", str(sealed.seal_dir), *keys)
    assert edited.code == 1 and "seal.json differs from the payload in seal.svg" in edited.stdout
    openssl = subprocess.run(["openssl", "dgst", "-sha256", "-verify", "public_key.pem", "-signature", "seal.sig", "seal.json"], cwd=sealed.seal_dir, capture_output=True, text=True)
    assert openssl.returncode == 1 and "Verification failure" in openssl.stdout

    not_xml = sealed.root / "not.svg"
    not_xml.write_text("<svg")
    broken = sealed.gbx("verify", str(not_xml), *keys, "--json")
    assert broken.code == 1 and json.loads(broken.stdout)["checks"]["document"] == "the document is not well-formed XML"
    # Online, the service finds the same forgery.
    online = sealed.gbx("verify", str(forged), "--online", api.base_url)
    assert online.code == 1 and "signature does not match the payload" in online.stdout


def test_verify_foreign_seals(api: Api, sealed: Job) -> None:
    keys = ["--keys", f"{api.base_url}/api/seal/public_keys"]
    claims = sealed.seal_claims()
    foreign_key = ec.generate_private_key(ec.SECP256R1())

    def foreign_seal(name: str, key_name: str) -> Path:
        payload = canonical_json({**claims, "key": key_name})
        signature = foreign_key.sign(payload, ec.ECDSA(hashes.SHA256()))
        path = sealed.root / name
        path.write_text(render_seal_svg(payload=payload, signature=signature, key=key_name))
        return path

    # Signed by someone else under the service's key name: the signature fails.
    impostor = sealed.gbx("verify", str(foreign_seal("impostor.svg", claims["key"])), *keys, "--json")
    assert impostor.code == 1 and json.loads(impostor.stdout)["checks"]["signature"] == "signature does not match the payload"
    # Signed by someone else's key version: not trusted.
    other = sealed.gbx("verify", str(foreign_seal("other.svg", "projects/evil/locations/global/keyRings/k/cryptoKeys/k/cryptoKeyVersions/1")), *keys, "--json")
    assert other.code == 1 and json.loads(other.stdout)["checks"]["key"].startswith("key version is not trusted")
    # A forged seal directory shipping its own public key is never VERIFIED by default: without a key
    # source it is a usage error, and against the service's keys it is INVALID.
    foreign_dir = sealed.root / "foreign"
    foreign_dir.mkdir()
    shutil.copy(sealed.root / "impostor.svg", foreign_dir / "seal.svg")
    (foreign_dir / "public_key.pem").write_bytes(
        foreign_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    bare = sealed.gbx("verify", str(foreign_dir), "--json")
    assert bare.code == 2 and "VERIFIED" not in bare.stdout
    assert sealed.gbx("verify", str(foreign_dir), *keys).code == 1


def test_verify_usage_errors_exit_2(sealed: Job) -> None:
    missing = sealed.gbx("verify", str(sealed.root / "nothing.svg"), "--public-key", str(sealed.seal_dir / "public_key.pem"))
    assert missing.code == 2 and "cannot read the seal" in missing.last_line
    no_key = sealed.gbx("verify", str(sealed.seal_dir / "seal.svg"))
    assert no_key.code == 2 and "no key to check against" in no_key.last_line
    both = sealed.gbx("verify", str(sealed.seal_dir), "--keys", "k.json", "--public-key", "p.pem")
    assert both.code == 2
    unreachable = sealed.gbx("verify", str(sealed.seal_dir), "--keys", _closed_port_url() + "/api/seal/public_keys", "--retry-timeout", "0.5")
    assert unreachable.code == 69  # could not check is not INVALID
