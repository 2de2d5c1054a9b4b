"""Start and stop Google's Cloud Firestore emulator (local mode and tests), in its own process group."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

JAR_RELATIVE = Path("platform/cloud-firestore-emulator/cloud-firestore-emulator.jar")
MISSING_MESSAGE = (
    "The Cloud Firestore emulator was not found. It ships with the Google Cloud SDK: install the SDK "
    "(the emulator jar lives under <sdk>/platform/cloud-firestore-emulator/) and make sure `gcloud` is on "
    "PATH, or set GBX_FIRESTORE_EMULATOR_JAR to the jar. Java 17 or newer must be on PATH too."
)


class EmulatorMissing(RuntimeError):
    """The emulator (or Java) is not installed on this machine."""


class StartCancelled(Exception):
    """The caller asked to stop while the emulator was starting; it has been stopped."""


def find_jar() -> Path:
    """Locate the emulator jar: $GBX_FIRESTORE_EMULATOR_JAR, else under the SDK that holds `gcloud`."""
    explicit = os.environ.get("GBX_FIRESTORE_EMULATOR_JAR")
    if explicit:
        if not Path(explicit).is_file():
            raise EmulatorMissing(f"GBX_FIRESTORE_EMULATOR_JAR={explicit} is not a file. {MISSING_MESSAGE}")
        return Path(explicit)
    candidates: list[Path] = []
    gcloud = shutil.which("gcloud")
    if gcloud:
        # gcloud lives in <sdk>/bin (often behind a symlink from /usr/bin).
        candidates.append(Path(gcloud).resolve().parent.parent / JAR_RELATIVE)
    candidates += [Path("/usr/lib/google-cloud-sdk") / JAR_RELATIVE, Path("/opt/google-cloud-sdk") / JAR_RELATIVE]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise EmulatorMissing(MISSING_MESSAGE)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Emulator:
    """A running emulator: its address and process (leader of its own process group; None for one started elsewhere)."""

    host: str
    process: subprocess.Popen[bytes] | None
    project: str

    def clear(self) -> None:
        """Delete every document of the project's default database."""
        url = f"http://{self.host}/emulator/v1/projects/{self.project}/databases/(default)/documents"
        urllib.request.urlopen(urllib.request.Request(url, method="DELETE"), timeout=30).read()

    def stop(self) -> None:
        """End the whole process group (one started elsewhere is left alone)."""
        stop_process_group(self.process)


def start(
    *,
    project: str,
    port: int | None = None,
    rules: Path | None = None,
    log_path: Path | None = None,
    timeout: float = 60.0,
    cancelled: Callable[[], bool] | None = None,
) -> Emulator:
    """Start the emulator on 127.0.0.1 and return once it answers HTTP; `cancelled()` true stops it (StartCancelled).

    A caller that must react to signals while this runs should have its handler set a flag read by
    `cancelled` rather than raise: an exception raised inside Popen can leave a child without a handle.
    """
    jar = find_jar()
    java = shutil.which("java")
    if java is None:
        raise EmulatorMissing(MISSING_MESSAGE)
    port = port or free_port()
    cmd = [java, "-Duser.language=en", "-cp", str(jar), "com.google.cloud.datastore.emulator.firestore.CloudFirestore",
           "--host", "127.0.0.1", "--port", str(port)]
    if rules is not None:
        cmd += ["--rules", str(rules)]
    with open(log_path or os.devnull, "ab") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    emulator = Emulator(host=f"127.0.0.1:{port}", process=process, project=project)
    try:
        wait_until_ready(emulator.host, process, name="Firestore", timeout=timeout, log_path=log_path, cancelled=cancelled or (lambda: False))
    except BaseException:
        # Interrupted or failed while starting: the caller never gets the handle, so stop it here.
        emulator.stop()
        raise
    return emulator


def stop_process_group(process: subprocess.Popen[bytes] | None) -> None:
    """End an emulator's whole process group: the Java process survives a kill of a wrapper alone (None: started elsewhere)."""
    if process is None or process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass


def wait_until_ready(
    host: str, process: subprocess.Popen[bytes], *, name: str, timeout: float, log_path: Path | None, cancelled: Callable[[], bool]
) -> None:
    """Poll an emulator's port until it answers HTTP 200 (the Firestore and Pub/Sub emulators both do)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cancelled():
            raise StartCancelled()
        if process.poll() is not None:
            raise RuntimeError(f"the {name} emulator exited with code {process.returncode} (log: {log_path})")
        try:
            with urllib.request.urlopen(f"http://{host}/", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.1)
    raise RuntimeError(f"the {name} emulator did not answer within {timeout:.0f}s (log: {log_path})")
