"""Start and stop Google's Pub/Sub emulator (local mode and tests), in its own process group, as shared/emulator.py does Firestore's."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shared.emulator import EmulatorMissing, free_port, stop_process_group, wait_until_ready

LIB_RELATIVE = Path("platform/pubsub-emulator/lib")
MISSING_MESSAGE = (
    "The Pub/Sub emulator was not found. It ships with the Google Cloud SDK (gcloud components install pubsub-emulator, "
    "or apt-get install google-cloud-cli-pubsub-emulator): its jar lives under <sdk>/platform/pubsub-emulator/lib/; "
    "make sure `gcloud` is on PATH, or set GBX_PUBSUB_EMULATOR_JAR to the jar. Java 17 or newer must be on PATH too. "
    "Or point PUBSUB_EMULATOR_HOST at an emulator you started."
)


def find_jar() -> Path:
    """Locate the emulator jar: $GBX_PUBSUB_EMULATOR_JAR, else under the SDK that holds `gcloud`."""
    explicit = os.environ.get("GBX_PUBSUB_EMULATOR_JAR")
    if explicit:
        if not Path(explicit).is_file():
            raise EmulatorMissing(f"GBX_PUBSUB_EMULATOR_JAR={explicit} is not a file. {MISSING_MESSAGE}")
        return Path(explicit)
    roots: list[Path] = []
    gcloud = shutil.which("gcloud")
    if gcloud:
        roots.append(Path(gcloud).resolve().parent.parent)
    roots += [Path("/usr/lib/google-cloud-sdk"), Path("/opt/google-cloud-sdk")]
    for root in roots:
        jars = sorted((root / LIB_RELATIVE).glob("cloud-pubsub-emulator-*.jar"))
        if jars:
            return jars[-1]
    raise EmulatorMissing(MISSING_MESSAGE)


@dataclass
class PubSubEmulator:
    """A running Pub/Sub emulator: its address and process (leader of its own process group; None for one started elsewhere)."""

    host: str
    process: subprocess.Popen[bytes] | None

    def stop(self) -> None:
        """End the whole process group (one started elsewhere is left alone)."""
        stop_process_group(self.process)


def start(*, port: int | None = None, log_path: Path | None = None, timeout: float = 60.0, cancelled: Callable[[], bool] | None = None) -> PubSubEmulator:
    """Start the emulator on 127.0.0.1 and return once it answers HTTP; `cancelled()` true stops it (StartCancelled)."""
    jar = find_jar()
    java = shutil.which("java")
    if java is None:
        raise EmulatorMissing(MISSING_MESSAGE)
    port = port or free_port()
    cmd = [java, "-jar", str(jar), "--host=127.0.0.1", f"--port={port}"]
    with open(log_path or os.devnull, "ab") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    emulator = PubSubEmulator(host=f"127.0.0.1:{port}", process=process)
    try:
        wait_until_ready(emulator.host, process, name="Pub/Sub", timeout=timeout, log_path=log_path, cancelled=cancelled or (lambda: False))
    except BaseException:
        emulator.stop()
        raise
    return emulator
