"""README.md's five-minute walk runs as written: its shell block, against `make run`'s server, answers what it says."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared import config, emulator
from tests.test_local import _env, _stop, _wait_healthy

REPO = config.REPO_ROOT
README_BASE = "BASE=http://127.0.0.1:8080"


def walk_script() -> str:
    """The first shell block after the README's "A five-minute walk" heading."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## A five-minute walk\n", 1)[1]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, "the walk has no ```sh block"
    return match.group(1)


@pytest.fixture
def walk_dir(tmp_path: Path, firestore_emulator: emulator.Emulator) -> Iterator[tuple[Path, str, dict[str, str]]]:
    """A folder laid out as a checkout where the walk runs (.venv and shared/ of this one), and `make run` serving it."""
    root = tmp_path / "checkout"
    root.mkdir()
    (root / ".venv").symlink_to(sys.prefix)  # the walk calls .venv/bin/python, as in a checkout after `make run`
    (root / "shared").symlink_to(REPO / "shared")
    port = emulator.free_port()
    # The walk's principal and run_id are fixed: a project of its own keeps it apart from every other test.
    env = _env(tmp_path / "local", GOOGLE_CLOUD_PROJECT=f"gbx-walk-{port}")
    server = subprocess.Popen(
        [sys.executable, "-m", "shared.local", "serve", "--port", str(port)], cwd=REPO, env={**env, "FIRESTORE_EMULATOR_HOST": firestore_emulator.host},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", server)
        yield root, f"http://127.0.0.1:{port}", env
    finally:
        _stop(server)


def test_the_readme_walk_runs_as_written(walk_dir: tuple[Path, str, dict[str, str]]) -> None:
    root, base, env = walk_dir
    script = walk_script()
    assert script.count(README_BASE) == 1
    # The only change: the port of this test's server instead of make run's default.
    result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script.replace(README_BASE, f"BASE={base}")], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    answers: list[Any] = [json.loads(line) if line.startswith("{") else line for line in lines]
    issued, checked, consumed, started, verified, keys, openssl, redeemed, again = answers
    assert issued["runs_total"] == 3 and issued["replayed"] is False and issued["issued_by"] == "partner@gbx.local", issued
    assert checked["available"] is True and checked["state"] == "new" and checked["balance"] == 3, checked
    assert consumed["balance"] == 2, consumed
    assert started["state"] == "started", started
    assert verified["status"] == "VERIFIED", verified
    assert keys["keys"], keys
    assert openssl == "Verified OK"
    assert redeemed["granted_runs"] == 1 and redeemed["balance"] == 3 and redeemed["replayed"] is False, redeemed
    assert again["error"]["code"] == "already_redeemed" and again["error"]["grant_id"] == redeemed["grant_id"], again
    bundle = json.loads((root / "bundle.json").read_text())
    assert (root / "seal.svg").read_text() == bundle["seal_svg"]
    # The offline check uses the published key of the seal's key version, not a key the bundle shipped.
    assert (root / "public_key.pem").read_text() == next(k["pem"] for k in keys["keys"] if k["key"] == bundle["key"])


def test_the_partner_walk_of_operations_md_shows_each_partner_its_own_grants(walk_dir: tuple[Path, str, dict[str, str]]) -> None:
    """docs/operations.md's local-mode partner walk, as written: two partners issue, each sees and revokes only its own."""
    root, base, env = walk_dir
    text = (REPO / "docs" / "operations.md").read_text()
    section = text.split("**In local mode** the partners", 1)[1]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match
    script = match.group(1)
    assert script.count("BASE=http://127.0.0.1:8080 ") == 1
    result = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", script.replace("BASE=http://127.0.0.1:8080 ", f"BASE={base} ")],
        cwd=root, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    issued_a, issued_b, usage_a, export_b, refused, revoked = [json.loads(line) for line in result.stdout.splitlines()]
    assert (issued_a["issued_by"], issued_b["issued_by"]) == ("partner@gbx.local", "partner2@gbx.local")
    assert usage_a["balance"] == 5 and [g["grant_id"] for g in usage_a["grants"]] == [issued_a["grant_id"]]
    assert [r["grant_id"] for r in export_b["rows"]] == [issued_b["grant_id"]]
    assert refused["error"]["code"] == "not_found"
    assert (revoked["grant_id"], revoked["revoked"], revoked["remaining"], revoked["balance"]) == (issued_a["grant_id"], 2, 3, 3)
