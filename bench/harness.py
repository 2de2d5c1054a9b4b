"""What every benchmark shares: an emulator that a signal never orphans, the service pointed at it, and the machine's facts."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from shared import config, emulator, store

# Exit codes of every benchmark (and of `python -m bench`).
EXIT_OK = 0
EXIT_FAILED = 1  # a benchmark's own checks failed (a broken invariant, an unexpected status)
EXIT_NO_EMULATOR = 3  # the Firestore emulator (or Java) is not installed
EXIT_INTERRUPTED = 130


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: unwind, stop the emulator, exit 130.

    A KeyboardInterrupt, not an Exception: the service's own `except Exception` (a request's 500) must not
    swallow it when the signal lands inside a request.
    """


class BenchmarkFailed(Exception):
    """A benchmark's own checks failed; raised inside `running_emulator` so that the emulator's log is kept."""


def exit_status(body: Callable[[], None]) -> int:
    """Run a benchmark's body and turn its outcome into the exit status every benchmark documents."""
    try:
        body()
    except emulator.EmulatorMissing as exc:
        print(exc, file=sys.stderr)
        return EXIT_NO_EMULATOR
    except Interrupted:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BenchmarkFailed as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of non-empty `values` (fraction in 0..1)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(fraction * len(ordered) + 0.5)))
    return ordered[rank - 1]


def median(values: list[float]) -> float:
    """The median of non-empty `values` (the mean of the middle two for an even count)."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def point_service_at(host: str, project: str) -> None:
    """Point the service's configuration and Firestore client at the emulator at `host` (both are read once and cached)."""
    os.environ["FIRESTORE_EMULATOR_HOST"] = host
    os.environ[config.ENV_PROJECT] = project
    config.get_config.cache_clear()
    store.client.cache_clear()


@contextlib.contextmanager
def running_emulator(project: str, *, name: str) -> Iterator[emulator.Emulator]:
    """Start an emulator for `project`, point the service at it, and stop it however the block ends.

    While the emulator starts, SIGINT/SIGTERM only set a flag that `emulator.start(cancelled=...)` reads (an
    exception raised inside Popen could leave the Java process without a handle); once it runs, they raise
    `Interrupted`, which unwinds through this block and stops it. Its log is kept when the block fails.
    """
    pending: list[int] = []
    started: list[bool] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        pending.append(signum)
        if started:
            raise Interrupted(f"signal {signum}")

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    log_dir = Path(tempfile.mkdtemp(prefix=f"gbx-bench-{name}-"))
    log_path = log_dir / "firestore-emulator.log"
    emu: emulator.Emulator | None = None
    keep_log = True
    try:
        try:
            emu = emulator.start(project=project, log_path=log_path, cancelled=lambda: bool(pending))
        except emulator.StartCancelled as exc:
            raise Interrupted("signal during emulator start") from exc
        started.append(True)
        if pending:  # arrived after the last look of the readiness loop
            raise Interrupted(f"signal {pending[0]} during emulator start")
        point_service_at(emu.host, project)
        yield emu
        keep_log = False
    except Interrupted:
        keep_log = False  # nothing to diagnose
        raise
    finally:
        started.clear()  # a second signal from here on only sets the flag: the stop below always runs
        if emu is not None:
            emu.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if keep_log and emu is not None:
            print(f"(emulator log kept at {log_path})", file=sys.stderr)
        else:
            shutil.rmtree(log_dir, ignore_errors=True)


def java_version() -> str:
    """The first line of `java -version`, or 'unknown'."""
    java_path = shutil.which("java")
    if not java_path:
        return "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        probe = subprocess.run([java_path, "-version"], capture_output=True, text=True, timeout=10)
        return (probe.stderr or probe.stdout).splitlines()[0].strip()
    return "unknown"


def machine_line() -> str:
    """nproc, Python, client library, Java and OS, for the record."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    library = importlib.metadata.version("google-cloud-firestore")
    return f"Machine: nproc {cpus}, Python {platform.python_version()}, google-cloud-firestore {library}, {java_version()}, {platform.platform()}."
