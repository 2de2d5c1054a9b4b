"""The emulator launcher: a clear message when the emulator is missing, and a clean stop."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared import emulator
from shared.config import REPO_ROOT


def test_missing_explicit_jar_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GBX_FIRESTORE_EMULATOR_JAR", str(tmp_path / "nope.jar"))
    with pytest.raises(emulator.EmulatorMissing, match="nope.jar is not a file.*Google Cloud SDK"):
        emulator.find_jar()


def test_no_sdk_anywhere_is_a_clear_failure_of_the_test_run(tmp_path: Path) -> None:
    # A Python that finds no gcloud and no SDK folder: the session fixture stops the run with the message.
    probe = tmp_path / "test_probe.py"
    probe.write_text("def test_needs_firestore(db):\n    pass\n")
    # No FIRESTORE_EMULATOR_HOST either: with it, the fixtures would use that emulator and never look for the SDK.
    env = {**{k: v for k, v in os.environ.items() if k != "FIRESTORE_EMULATOR_HOST"}, "PATH": str(Path(sys.executable).parent), "GBX_FIRESTORE_EMULATOR_JAR": ""}
    code = (
        "import sys, pathlib, pytest; from shared import emulator; "
        "emulator.JAR_RELATIVE = pathlib.Path('no/such/emulator.jar'); "
        f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '--rootdir', {str(REPO_ROOT)!r}, '-c', {str(REPO_ROOT / 'pytest.ini')!r}, "
        f"'--confcutdir', {str(REPO_ROOT / 'tests')!r}, {str(probe)!r}, '-p', 'tests.conftest']))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "Cloud Firestore emulator was not found" in result.stdout + result.stderr


def test_start_and_stop_end_the_java_process(tmp_path: Path) -> None:
    instance = emulator.start(project="gbx-launcher-test", log_path=tmp_path / "log")
    instance.clear()
    instance.stop()
    assert instance.process.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(instance.process.pid, 0)  # the whole group, Java included, is gone
