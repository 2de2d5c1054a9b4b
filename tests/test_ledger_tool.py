"""The operator ledger tool as an operator runs it (a subprocess): exit 0 ok, 1 mismatch, 2 could not run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from shared import emulator
from tests.conftest import PROJECT, RUNNER, Api


def ledger_tool(*args: str, env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run `python -m shared.ledger` from the repository with only the environment given (no credentials)."""
    base = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "NO_GCE_CHECK": "True", "GCE_METADATA_HOST": "127.0.0.1:9", "GBX_FIRESTORE_TIMEOUT_SECONDS": "2", "GBX_FIRESTORE_RETRY_SECONDS": "2"}
    return subprocess.run([sys.executable, "-m", "shared.ledger", *args], cwd=Path(__file__).resolve().parent.parent, env={**base, **env},
                          capture_output=True, text=True, timeout=120, check=False)


def test_on_the_emulator_without_a_project_it_reads_local_modes_project(api: Api, tmp_path: Path) -> None:
    api.issue(RUNNER, 2)
    local = ledger_tool(RUNNER, env={"FIRESTORE_EMULATOR_HOST": os.environ["FIRESTORE_EMULATOR_HOST"]}, tmp_path=tmp_path)
    assert (local.returncode, local.stdout, local.stderr) == (0, "", "")  # local mode's project holds nothing here
    ours = ledger_tool(RUNNER, "--project", PROJECT, env={"FIRESTORE_EMULATOR_HOST": os.environ["FIRESTORE_EMULATOR_HOST"]}, tmp_path=tmp_path)
    assert ours.returncode == 0, ours.stderr
    assert [line.split('"', 2)[1] for line in ours.stdout.splitlines()] == ["grant", "ledger"]


def test_without_credentials_it_exits_2_with_one_line(tmp_path: Path) -> None:
    result = ledger_tool(RUNNER, env={"GOOGLE_CLOUD_PROJECT": "my-project"}, tmp_path=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("ledger: could not run: no Google credentials")


def test_without_a_project_it_exits_2(tmp_path: Path) -> None:
    result = ledger_tool(RUNNER, env={}, tmp_path=tmp_path)
    assert (result.returncode, result.stderr) == (2, "ledger: could not run: no project (pass --project or set GOOGLE_CLOUD_PROJECT)\n")


def test_an_unreachable_firestore_exits_2_with_one_line(tmp_path: Path) -> None:
    result = ledger_tool(RUNNER, env={"FIRESTORE_EMULATOR_HOST": f"127.0.0.1:{emulator.free_port()}"}, tmp_path=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("ledger: could not run: Firestore answered ")


def test_help_documents_the_exit_status_and_the_local_recipe(tmp_path: Path) -> None:
    result = ledger_tool("--help", env={}, tmp_path=tmp_path)
    assert result.returncode == 0
    for text in ("Exit status:", "1  a grant's ledger does not sum", "2  the check could not run", "FIRESTORE_EMULATOR_HOST=127.0.0.1:PORT", "--project"):
        assert text in result.stdout
