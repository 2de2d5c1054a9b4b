"""The Firebase way to test: under `firebase emulators:exec`, FIRESTORE_EMULATOR_HOST names an emulator started outside
the suite, and the fixtures use it instead of starting their own; a test that must stop the emulator starts its own."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from google.cloud import firestore

from shared import emulator
from shared.config import REPO_ROOT

PROBE = textwrap.dedent(
    '''
    import os

    from tests.conftest import PROJECT, RUNNER, Api


    def test_a_test_that_stops_the_emulator_gets_its_own(stoppable_db, firestore_emulator) -> None:
        assert stoppable_db.process is not None and stoppable_db.host != firestore_emulator.host
        assert os.environ["FIRESTORE_EMULATOR_HOST"] == stoppable_db.host


    # Last: each test empties the database first, so what this one writes stays for the caller to read.
    def test_the_session_uses_the_emulator_it_was_given(api: Api, firestore_emulator) -> None:
        assert firestore_emulator.process is None  # not started (nor stopped) by the fixtures
        assert firestore_emulator.host == os.environ["FIRESTORE_EMULATOR_HOST"]
        assert api.issue(RUNNER, 2, key="outside-probe").status_code == 200
        print("PROJECT=" + PROJECT)
    '''
)


def test_the_fixtures_use_an_emulator_started_outside_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outside = emulator.start(project="gbx-outside", log_path=tmp_path / "outside.log")
    try:
        probe = tmp_path / "test_probe.py"
        probe.write_text(PROBE)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GBX_", "PYTEST_"))}
        env["FIRESTORE_EMULATOR_HOST"] = outside.host
        command = [
            sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "--rootdir", str(REPO_ROOT), "-c", str(REPO_ROOT / "pytest.ini"),
            "--confcutdir", str(REPO_ROOT / "tests"), str(probe), "-p", "tests.conftest",
        ]
        result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "2 passed" in result.stdout
        project = result.stdout.split("PROJECT=", 1)[1].split()[0]

        # What the probe's request wrote is in the outside emulator, under the session's project.
        with monkeypatch.context() as patch:
            patch.setenv("FIRESTORE_EMULATOR_HOST", outside.host)
            client = firestore.Client(project=project)
            documents = {snapshot.reference.path: snapshot.to_dict() for collection in client.collections() for snapshot in collection.stream()}
        assert documents, "the probe's grant was written elsewhere"
        # The emulator the probe was given still runs: the session did not stop what it did not start.
        assert outside.process is not None and outside.process.poll() is None
    finally:
        outside.stop()
