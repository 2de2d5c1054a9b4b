"""Review fixes of the runner client: one seal directory per pending run, the write-ahead preseal, refusals that keep it,
overlapping trees, names that cannot break gbx's last line, and the runner's token kept from CMD."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from gbx_client import sealdir
from tests.conftest import RUNNER, Api
from tests.test_client import DROP, FAST, GBX, SEAL_FILES, UNAVAILABLE, FaultProxy, Job, _handler, balance, coreutils_hash, run_state, serving


@pytest.fixture
def job(api: Api, tmp_path: Path) -> Job:
    """A job workspace for the runner, against the service (as in test_client)."""
    assert GBX is not None, "gbx is not installed in this virtualenv (pip install -e ./client)"
    return Job(root=tmp_path, url=api.base_url, token=api.token(RUNNER))


@dataclass
class RefusingProxy(FaultProxy):
    """test_client's fault proxy, which can also answer an endpoint with a final 4xx of its own."""

    refuse: dict[str, int] = field(default_factory=dict)
    tamper: set[str] = field(default_factory=set)  # forward, then flip the last byte of the reply's signature


def _refusing_handler(instance: RefusingProxy) -> type[BaseHTTPRequestHandler]:
    base: Any = _handler(instance)

    class Handler(base):  # type: ignore[misc,valid-type]
        def relay(self) -> None:
            endpoint = self.path.rsplit("/", 1)[-1]
            if endpoint in instance.tamper:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                response = instance.forward(self.command, self.path, dict(self.headers), body)
                bundle = response.json()
                signature = bytearray(base64.b64decode(bundle["signature"]))
                signature[-1] ^= 0x01
                bundle["signature"] = base64.b64encode(bytes(signature)).decode()
                self.reply(response.status_code, {"Content-Type": "application/json"}, json.dumps(bundle).encode())
                return
            status = instance.refuse.get(endpoint)
            if status is None:
                super().relay()
                return
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            payload = json.dumps({"error": {"code": "forbidden", "message": "the proxy refuses this identity", "status": status}}).encode()
            self.reply(status, {"Content-Type": "application/json"}, payload)

    return Handler


@pytest.fixture
def proxy(server_url: str) -> Iterator[RefusingProxy]:
    """test_client's fault-injecting proxy in front of the service."""
    instance = RefusingProxy(upstream=server_url)
    with serving(instance, _refusing_handler(instance)):
        yield instance


def _pending(job: Job, proxy: FaultProxy, run_id: str = "job-1") -> dict[str, object]:
    """Leave run_id with a pending seal in job.seal_dir (run_complete unreachable); return its preseal."""
    proxy.always["run_complete"] = UNAVAILABLE
    proxy.retry_after = "0"
    result = job.gbx(*job.args(url=proxy.url, run_id=run_id), "--retry-timeout", "1", *job.writes_outputs())
    assert result.code == 75, result.stderr
    del proxy.always["run_complete"]
    return json.loads((job.seal_dir / "preseal.json").read_text())


# 1. A seal directory holding another run's pending seal ------------------------------------------------


def test_another_runs_pending_seal_is_refused_before_any_charge(api: Api, job: Job, proxy: FaultProxy) -> None:
    api.issue(RUNNER, 2)
    preseal = _pending(job, proxy)
    assert balance(api) == 1

    other = job.gbx(*job.args(url=proxy.url, run_id="job-2"), *FAST, *job.writes_outputs())
    assert other.code == 73, other.stderr
    assert other.last_line.startswith("gbx: exit 73 (cant-create): ")
    assert "job-1" in other.last_line and f"`gbx complete --url URL {job.seal_dir}`" in other.last_line and "--seal-dir" in other.last_line
    # Nothing charged, CMD never ran, the pending seal is untouched.
    assert balance(api) == 1 and run_state(api, "job-2") == "new" and job.cmd_runs() == 1
    assert json.loads((job.seal_dir / "preseal.json").read_text()) == preseal

    done = job.gbx("complete", str(job.seal_dir), "--url", proxy.url, *FAST)
    assert done.code == 0, done.stderr
    assert job.seal_claims()["run_id"] == "job-1" and not (job.seal_dir / "preseal.json").exists()


def test_only_the_matching_preseal_is_ever_removed_or_replaced(tmp_path: Path) -> None:
    record = {"run_id": "job-1", "url": "http://x", "outputs_sha256": "0" * 64, "start": {}}
    sealdir.write_preseal(tmp_path, record)
    sealdir.remove_preseal(tmp_path, "job-2")
    assert (tmp_path / "preseal.json").exists()
    with pytest.raises(sealdir.CantCreate, match="job-1"):
        sealdir.write_preseal(tmp_path, {**record, "run_id": "job-2"})
    assert json.loads((tmp_path / "preseal.json").read_text())["run_id"] == "job-1"
    sealdir.remove_preseal(tmp_path, "job-1")
    assert not (tmp_path / "preseal.json").exists()


# 2. The write-ahead preseal, and signals after CMD ------------------------------------------------------


def _start_stuck_in_run_complete(job: Job, proxy: FaultProxy) -> subprocess.Popen[str]:
    """gbx run whose run_complete is unreachable (retried for a minute); returned once CMD ran and a preseal is on disk."""
    proxy.always["run_complete"] = DROP
    process = subprocess.Popen(
        [GBX, *job.args(url=proxy.url), "--retry-timeout", "60", *job.writes_outputs()],
        env=job.env(), cwd=job.root, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 20
    while not (proxy.received["run_complete"] and (job.seal_dir / "preseal.json").exists()):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            _, stderr = process.communicate(timeout=10)
            pytest.fail(f"no preseal.json while run_complete is being retried:\n{stderr}")
        time.sleep(0.05)
    return process


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_run_complete_retries_exits_seal_pending(api: Api, job: Job, proxy: FaultProxy, signum: int) -> None:
    api.issue(RUNNER, 1)
    process = _start_stuck_in_run_complete(job, proxy)
    preseal = json.loads((job.seal_dir / "preseal.json").read_text())
    assert preseal["run_id"] == "job-1" and preseal["outputs_sha256"] == coreutils_hash(job.outputs)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=20)
    assert process.returncode == 75, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("gbx: exit 75 (seal-pending): ") and re.search(rf"`gbx complete --url http://127\.0\.0\.1:\d+ {re.escape(str(job.seal_dir))}`", last)
    assert (job.seal_dir / "preseal.json").exists() and run_state(api, "job-1") == "started"

    del proxy.always["run_complete"]
    again = job.gbx(*job.args(url=proxy.url), *FAST, *job.writes_outputs())
    assert again.code == 0, again.stderr
    assert job.cmd_runs() == 1 and not (job.seal_dir / "preseal.json").exists()
    assert balance(api) == 0 and run_state(api, "job-1") == "completed"


def test_kill_9_during_run_complete_leaves_the_preseal_and_cmd_never_runs_again(api: Api, job: Job, proxy: FaultProxy) -> None:
    api.issue(RUNNER, 1)
    process = _start_stuck_in_run_complete(job, proxy)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate(timeout=10)
    assert (job.seal_dir / "preseal.json").exists()

    del proxy.always["run_complete"]
    done = job.gbx("complete", str(job.seal_dir), "--url", proxy.url, *FAST)
    assert done.code == 0, done.stderr
    assert job.cmd_runs() == 1 and job.seal_claims()["outputs_sha256"] == coreutils_hash(job.outputs)
    assert set(os.listdir(job.seal_dir)) == SEAL_FILES and balance(api) == 0


# 3. A refusal at run_complete keeps the write-ahead preseal --------------------------------------------


@pytest.mark.parametrize("status", [401, 403, 422])
def test_a_refused_run_complete_keeps_the_preseal_for_gbx_complete(api: Api, job: Job, proxy: RefusingProxy, status: int) -> None:
    api.issue(RUNNER, 1)
    proxy.refuse["run_complete"] = status
    refused = job.gbx(*job.args(url=proxy.url), *FAST, *job.writes_outputs())
    assert refused.code == 77, refused.stderr
    assert refused.last_line.startswith(f"gbx: exit 77 (refused): run_complete: HTTP {status}")
    assert re.search(rf"`gbx complete --url http://127\.0\.0\.1:\d+ {re.escape(str(job.seal_dir))}`", refused.last_line)
    if status in (401, 403):
        assert "fresh identity" in refused.last_line
    preseal = json.loads((job.seal_dir / "preseal.json").read_text())
    assert preseal["run_id"] == "job-1" and preseal["outputs_sha256"] == coreutils_hash(job.outputs)
    assert run_state(api, "job-1") == "started"

    del proxy.refuse["run_complete"]
    done = job.gbx("complete", str(job.seal_dir), "--url", proxy.url, *FAST)
    assert done.code == 0, done.stderr
    assert job.cmd_runs() == 1 and not (job.seal_dir / "preseal.json").exists() and balance(api) == 0


def test_run_complete_with_other_outputs_is_refused_and_leaves_no_preseal(api: Api, job: Job) -> None:
    api.issue(RUNNER, 1)
    started, go = job.root / "cmd-started", job.root / "go"
    script = f'touch "{started}"; while [ ! -e "{go}" ]; do sleep 0.05; done; mkdir -p "{job.outputs}"; printf mine > "{job.outputs}/r.txt"'
    process = subprocess.Popen([GBX, *job.args(), "--", "sh", "-c", script], env=job.env(), cwd=job.root, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not started.exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    # A twin with the same run_id completes it with other outputs while this CMD still runs.
    assert api.run_complete("job-1", "0" * 64).status_code == 200
    go.touch()
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 77, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("gbx: exit 77 (refused): run_complete: HTTP 409 run_state_conflict")
    # These outputs can never be sealed under this run_id: no preseal is left to fail every later run the same
    # way, and the message names their hash instead.
    assert f"outputs_sha256 {coreutils_hash(job.outputs)}" in last
    assert not (job.seal_dir / "preseal.json").exists()
    assert not (job.seal_dir / "seal.json").exists() and balance(api) == 0


# 4. --outputs and --inputs must not overlap --------------------------------------------------------------


@pytest.mark.parametrize("outputs", ["in/out", "in", "."])
def test_overlapping_inputs_and_outputs_are_refused_before_any_charge(api: Api, job: Job, outputs: str) -> None:
    api.issue(RUNNER, 1)
    args = job.args("--outputs", str(job.root / outputs), "--seal-dir", str(job.root.parent / f"{job.root.name}-seal"))
    result = job.gbx(*args, *job.writes_outputs())
    assert result.code == 64, result.stderr
    assert result.last_line.startswith("gbx: exit 64 (usage): ") and "--outputs" in result.last_line and "--inputs" in result.last_line
    assert job.cmd_runs() == 0 and balance(api) == 1 and run_state(api, "job-1") == "new"


# 5. gbx verify --help names the key sources it requires ----------------------------------------------


def test_verify_help_says_a_key_source_is_required() -> None:
    assert GBX is not None
    shown = " ".join(subprocess.run([GBX, "verify", "--help"], capture_output=True, text=True, check=True).stdout.split())
    assert "else the seal directory's public_key.pem" not in shown
    assert "one of --keys, --public-key or --online is required" in shown.lower()


# 6. Names with a newline or CR cannot break gbx's last line -------------------------------------------


@pytest.mark.parametrize("name", ["x\ny", "x\ry"])
def test_gbx_hash_escapes_names_in_its_messages(tmp_path: Path, name: str) -> None:
    assert GBX is not None
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / name).write_text("data")
    done = subprocess.run([GBX, "hash", str(tree)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 65, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    escaped = name.replace("\n", "\\n").replace("\r", "\\r")
    assert last.startswith("gbx: exit 65 (data): ") and f"tree/{escaped}: a name with a newline" in last
    for missing_name in (f"no{name}such", "no\u2028such", "no\x85such"):
        missing = subprocess.run([GBX, "hash", str(tmp_path / missing_name)], capture_output=True, text=True, timeout=60)
        assert missing.returncode == 66 and missing.stderr.strip().splitlines()[-1].startswith("gbx: exit 66 (no-input): "), missing.stderr


def test_gbx_run_escapes_an_output_name_after_cmd(api: Api, job: Job) -> None:
    api.issue(RUNNER, 1)
    result = job.gbx(*job.args(), "--", "sh", "-c", f'mkdir -p "{job.outputs}" && touch "{job.outputs}/bad\nname"')
    assert result.code == 65, result.stderr
    assert result.last_line.startswith("gbx: exit 65 (data): ") and "bad\\nname" in result.last_line


# (a) The runner's bearer token is not handed to CMD ----------------------------------------------------


def test_cmd_does_not_receive_gbx_id_token(api: Api, job: Job) -> None:
    api.issue(RUNNER, 1)
    seen = job.root / "seen"
    result = job.gbx(*job.args(), "--", "sh", "-c", f'mkdir -p "{job.outputs}"; echo "${{GBX_ID_TOKEN-unset}}" > "{seen}"')
    assert result.code == 0, result.stderr
    assert seen.read_text() == "unset\n"


# (b) A seal that does not verify offline keeps the preseal -------------------------------------------


def test_a_seal_that_does_not_verify_offline_keeps_the_preseal(api: Api, job: Job, proxy: RefusingProxy) -> None:
    api.issue(RUNNER, 1)
    proxy.tamper.add("run_complete")
    bad = job.gbx(*job.args(url=proxy.url), *FAST, *job.writes_outputs())
    assert bad.code == 76, bad.stderr
    assert bad.last_line.startswith("gbx: exit 76 (protocol): the service's seal does not verify offline") and "preseal.json" in bad.last_line
    preseal = json.loads((job.seal_dir / "preseal.json").read_text())
    assert preseal["outputs_sha256"] == coreutils_hash(job.outputs) and "does not verify offline" in preseal["error"]
    assert not (job.seal_dir / "seal.json").exists()

    proxy.tamper.clear()
    done = job.gbx("complete", str(job.seal_dir), "--url", proxy.url, *FAST)
    assert done.code == 0, done.stderr
    assert job.cmd_runs() == 1 and not (job.seal_dir / "preseal.json").exists()
