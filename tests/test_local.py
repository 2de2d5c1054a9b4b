"""Local mode as a user runs it: `python -m shared.local token|serve` in subprocesses."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import google.auth.jwt
import pytest
import requests

from shared import config, emulator
from shared.auth import verify_id_token
from shared.local import LocalIssuer

REPO = config.REPO_ROOT


def _env(local_dir: Path, **extra: str) -> dict[str, str]:
    """A user's environment: nothing of the test session's configuration."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GBX_") and k not in ("FIRESTORE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT", "K_SERVICE")}
    return {**env, config.ENV_LOCAL_DIR: str(local_dir), **extra}


def _local(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shared.local", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def _wait_healthy(url: str, process: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        try:
            if requests.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            time.sleep(0.1)
    raise AssertionError("local server did not become healthy")


def _stop(process: subprocess.Popen[str]) -> None:
    """End a `serve` left running by a failed test: SIGTERM first, so that it stops its emulator too."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _listening(host: str) -> bool:
    address, port = host.rsplit(":", 1)
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((address, int(port))) == 0


def test_token_command_prints_a_token_the_verifier_accepts(tmp_path: Path) -> None:
    result = _local("token", "Dev@Example.com", env=_env(tmp_path))
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    local_config = config.load_config({config.ENV_LOCAL_MODE: "1", config.ENV_LOCAL_DIR: str(tmp_path)})
    identity = verify_id_token(token, local_config)
    assert identity.principal == "dev@example.com" and identity.operator is False
    assert oct((tmp_path / "issuer-key.pem").stat().st_mode & 0o777) == "0o600"
    # A second call reuses the issuer key: both tokens verify against the same certificates.
    second = _local("token", "operator@gbx.local", env=_env(tmp_path)).stdout.strip()
    assert verify_id_token(second, local_config).operator is True


def test_serve_against_a_given_emulator_walks_the_lifecycle_and_stops_on_sigterm(tmp_path: Path, firestore_emulator: emulator.Emulator) -> None:
    port = emulator.free_port()
    env = _env(tmp_path, FIRESTORE_EMULATOR_HOST=firestore_emulator.host)
    process = subprocess.Popen([sys.executable, "-m", "shared.local", "serve", "--port", str(port)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, process)
        token = _local("token", "ci@acme-prod.iam.gserviceaccount.com", env=env).stdout.strip()
        user = {"Authorization": f"Bearer {token}"}
        issued = requests.post(url + "/api/entitlement/issue", json={"principal": "ci@acme-prod.iam.gserviceaccount.com", "runs_total": 1}, headers={"X-GBX-ADMIN-TOKEN": "local-admin-token"}, timeout=30)
        assert issued.status_code == 200
        consumed = requests.post(url + "/api/entitlement/consume", json={"run_id": "local-1"}, headers=user, timeout=30)
        assert consumed.json()["balance"] == 0
        started = requests.post(url + "/api/entitlement/run_start", json={"run_id": "local-1", "container_image": "job@sha256:" + "a" * 64, "project_id": "acme-prod", "inputs_sha256": "b" * 64}, headers=user, timeout=30)
        assert started.status_code == 200
        bundle = requests.post(url + "/api/entitlement/run_complete", json={"run_id": "local-1", "outputs_sha256": "c" * 64}, headers=user, timeout=30).json()
        assert bundle["key"].startswith("projects/local/") and '"issuer":"local"' in bundle["seal_json"]
        verified = requests.post(url + "/api/seal/verify", data=bundle["seal_svg"], headers={**user, "Content-Type": "image/svg+xml"}, timeout=30)
        assert verified.json()["status"] == "VERIFIED"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        _stop(process)


def test_serve_starts_and_stops_its_own_emulator(tmp_path: Path) -> None:
    port = emulator.free_port()
    process = subprocess.Popen([sys.executable, "-m", "shared.local", "serve", "--port", str(port)], cwd=REPO, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        match = re.search(r"Firestore emulator on (\S+)", first)
        assert match, first
        host = match.group(1)
        _wait_healthy(f"http://127.0.0.1:{port}", process)
        assert _listening(host)
        process.send_signal(signal.SIGINT)  # Ctrl-C
        assert process.wait(timeout=30) == 0
        assert not _listening(host), "the emulator outlived `serve`"
    finally:
        _stop(process)


def test_local_mode_refuses_to_start_in_the_cloud(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "shared.local", "serve", "--port", "1"], cwd=REPO, env=_env(tmp_path, K_SERVICE="gbx-consume"), capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "refusing to start local mode" in result.stderr


def test_serve_on_a_busy_port_fails_clearly_and_leaves_no_emulator(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "shared.local", "serve", "--port", str(port)], cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=90)
    assert result.returncode != 0 and f"Port {port} is in use on 127.0.0.1" in result.stderr and f"make run PORT={port + 1}" in result.stderr
    assert "Firestore emulator on" not in result.stdout  # refused before any emulator started


def test_sigterm_during_startup_leaves_no_emulator(tmp_path: Path) -> None:
    process = subprocess.Popen([sys.executable, "-m", "shared.local", "serve", "--port", str(emulator.free_port())], cwd=REPO, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # The emulator's log appears as soon as it is launched, before it answers.
    log = tmp_path / "firestore-emulator.log"
    deadline = time.monotonic() + 30
    while not log.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    finally:
        _stop(process)
    java = subprocess.run(["pgrep", "-f", "CloudFirestore"], capture_output=True, text=True).stdout.split()
    for pid in java:
        # Any emulator still running must be someone else's: ours inherited GBX_LOCAL_DIR=tmp_path.
        environ = Path(f"/proc/{pid}/environ")
        assert not environ.exists() or str(tmp_path).encode() not in environ.read_bytes(), "the emulator outlived SIGTERM during start-up"



def test_the_issuer_signs_with_the_key_on_disk_also_after_it_is_replaced(tmp_path: Path) -> None:
    """The signer is loaded once per key (cheap tokens for hundreds of threads), yet a key created anew is used at once."""
    issuer = LocalIssuer(tmp_path / "local")
    first = issuer.token("runner@example.com")
    assert issuer.token("runner@example.com") != "" and issuer.signer() is issuer.signer()  # loaded once
    old_certs = json.loads(issuer.certs_path.read_text())
    issuer.key_path.unlink()
    issuer.certs_path.unlink()
    second = issuer.token("runner@example.com")
    new_certs = json.loads(issuer.certs_path.read_text())
    assert new_certs.keys() != old_certs.keys()
    audience = config.LOCAL_AUDIENCE
    assert google.auth.jwt.decode(second, certs=new_certs, audience=audience)["email"] == "runner@example.com"
    assert google.auth.jwt.decode(first, certs=old_certs, audience=audience)["email"] == "runner@example.com"
    with pytest.raises(ValueError):
        google.auth.jwt.decode(second, certs=old_certs, audience=audience)
