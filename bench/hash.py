"""Runner client benchmark: `gbx hash` against the coreutils pipeline, and what `gbx run` adds to a run of its own.

Run it from the repository root: `python -m bench.hash` (or `make bench`, which runs every benchmark);
`python -m bench.hash --size-mib 64 --files 500 --reps 3 --run-reps 4` is a quick smoke run.

1. Hashing: a tree of SIZE MiB in FILES files (varied sizes, random bytes) is hashed by the installed
   `gbx hash DIR`, by `gbx hash --workers 1 DIR`, and by the pipeline of docs/runner.md
   `(cd DIR && find . -type f -print0 | LC_ALL=C sort -z | xargs -0r sha256sum) | sha256sum`, each as a
   fresh process, alternating their order every repetition after one untimed warm-up of each (the page
   cache is warm for all alike). All must print the same digest. Goal: gbx at least as fast.
2. Overhead: `gbx run ... -- true` on a one-file input against a local server (`python -m shared.local serve`
   on this benchmark's own emulator, local signing key), against the same four HTTP calls made bare with one
   requests session plus running `true`, interleaved. The difference of the medians is what gbx adds besides
   hashing and the service's latency: interpreter start, imports, retries' bookkeeping, the seal directory and
   its offline self-check. Goal: under 1 s.

Goals are reported, not enforced; the exit status is 1 only when the digests differ or a run fails.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import requests

from bench import harness
from shared import emulator
from shared.local import LocalIssuer

REPO_ROOT = Path(__file__).resolve().parent.parent
GBX = shutil.which("gbx", path=os.path.dirname(sys.executable)) or "gbx"
PIPELINE = '(cd "$1" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0r sha256sum) | sha256sum'
PROJECT = "gbx-bench-hash"
RUNNER = "bench-runner@gbx-bench.iam.gserviceaccount.com"
IMAGE = "europe-docker.pkg.dev/acme/jobs/render:1.4@sha256:" + "0123456789abcdef" * 4
SERVER_START_SECONDS = 60.0
MIB = 1024 * 1024


def make_tree(root: Path, *, size: int, files: int, seed: int = 7) -> None:
    """Write `files` files of varied sizes (0.5x to 1.5x the mean, 100 per directory) totalling exactly `size` bytes."""
    rng = random.Random(seed)
    weights = [rng.uniform(0.5, 1.5) for _ in range(files)]
    scale = size / sum(weights)
    sizes = [int(weight * scale) for weight in weights]
    sizes[-1] += size - sum(sizes)
    # Slices of one random pool at random offsets: random bytes without paying for 1 GiB of urandom.
    pool = os.urandom(8 * MIB)
    for index, length in enumerate(sizes):
        directory = root / f"d{index // 100:03d}"
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / f"f{index:05d}.bin", "wb") as out:
            remaining = length
            while remaining:
                start = rng.randrange(0, len(pool) // 2)
                chunk = pool[start : start + min(remaining, len(pool) // 2)]
                out.write(chunk)
                remaining -= len(chunk)


def timed(command: list[str]) -> tuple[float, str]:
    """Wall time of a command as a fresh process, and its first stdout word."""
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return time.perf_counter() - began, done.stdout.split()[0]


def bench_hashing(tree: Path, *, reps: int, size: int) -> tuple[list[str], bool, bool]:
    """Time each hasher `reps` times, alternating; (table lines, digests agree, goal met)."""
    hashers: dict[str, list[str]] = {
        "gbx hash": [GBX, "hash", str(tree)],
        "gbx hash --workers 1": [GBX, "hash", "--workers", "1", str(tree)],
        "coreutils pipeline": ["bash", "-c", f"set -o pipefail; {PIPELINE}", "pipeline", str(tree)],
    }
    digests = {name: timed(command)[1] for name, command in hashers.items()}  # warm-up, and the digests to compare
    times: dict[str, list[float]] = {name: [] for name in hashers}
    order = list(hashers)
    for rep in range(reps):
        for name in order if rep % 2 == 0 else reversed(order):
            seconds, digest = timed(hashers[name])
            times[name].append(seconds)
            digests[name] = digests[name] if digest == digests[name] else "differs"
    agree = len(set(digests.values())) == 1
    lines = ["| Hasher | median s | min s | max s | GiB/s (median) |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, values in times.items():
        middle = harness.median(values)
        lines.append(f"| {name} | {middle:.3f} | {min(values):.3f} | {max(values):.3f} | {size / (1024 ** 3) / middle:.2f} |")
    gbx, coreutils = harness.median(times["gbx hash"]), harness.median(times["coreutils pipeline"])
    lines.append("")
    lines.append(f"coreutils pipeline / gbx hash (medians): {coreutils / gbx:.2f}x; all digests {'agree: ' + digests['gbx hash'] if agree else 'DIFFER: ' + str(digests)}")
    return lines, agree, gbx <= coreutils


def free_port() -> int:
    """A local TCP port that is free right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def local_server(emu: emulator.Emulator, workdir: Path, admin_token: str) -> Iterator[str]:
    """`python -m shared.local serve` on this benchmark's emulator, in its own process; stopped by its pid."""
    port = free_port()
    env = {
        # The server starts its own Pub/Sub emulator: never one another benchmark named (and may have stopped).
        **{k: v for k, v in os.environ.items() if not k.startswith(("GBX_", "GOOGLE_", "K_SERVICE", "CLOUD_RUN", "PUBSUB_EMULATOR_HOST"))},
        "FIRESTORE_EMULATOR_HOST": emu.host,
        "GOOGLE_CLOUD_PROJECT": PROJECT,
        "GBX_LOCAL_DIR": str(workdir / "local"),
        "GBX_ADMIN_TOKEN": admin_token,
    }
    log = open(workdir / "server.log", "wb")  # noqa: SIM115 (closed in finally, after the process)
    server = subprocess.Popen([sys.executable, "-m", "shared.local", "serve", "--port", str(port)], cwd=REPO_ROOT, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_SECONDS
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            if server.poll() is not None or time.monotonic() > deadline:
                raise harness.BenchmarkFailed(f"the local server did not start (see {workdir / 'server.log'})")
            time.sleep(0.1)
        yield url
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def bench_overhead(emu: emulator.Emulator, workdir: Path, *, reps: int) -> tuple[list[str], bool, bool]:
    """Time `gbx run -- true` against the same calls made bare, interleaved; (table lines, all succeeded, goal met)."""
    admin = secrets.token_urlsafe(24)
    inputs = workdir / "input.txt"
    inputs.write_text("one small input\n")
    outputs = workdir / "outputs"
    outputs.mkdir()
    inputs_sha256 = subprocess.run(["sha256sum", str(inputs)], capture_output=True, text=True, check=True).stdout.split()[0]
    outputs_sha256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"  # an empty directory
    with local_server(emu, workdir, admin) as url:
        issuer = LocalIssuer(workdir / "local")
        token = issuer.token(RUNNER)
        issued = requests.post(url + "/api/entitlement/issue", json={"principal": RUNNER, "runs_total": 2 * reps + 2}, headers={"X-GBX-ADMIN-TOKEN": admin}, timeout=30)
        if issued.status_code != 200:
            raise harness.BenchmarkFailed(f"issue: HTTP {issued.status_code} {issued.text}")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GBX_", "CLOUD_RUN_"))} | {"GBX_ID_TOKEN": token}

        def with_gbx(index: int) -> bool:
            command = [
                GBX, "run", "--url", url, "--run-id", f"gbx-{index}", "--image", IMAGE, "--project", PROJECT, "--inputs", str(inputs),
                "--outputs", str(outputs), "--seal-dir", str(workdir / f"seal-{index}"), "--", "true",
            ]
            return subprocess.run(command, env=env, capture_output=True, check=False).returncode == 0

        def bare(index: int) -> bool:
            run_id = f"bare-{index}"
            headers = {"Authorization": f"Bearer {token}"}
            with requests.Session() as session:
                calls = [
                    ("check", {"run_id": run_id}),
                    ("consume", {"run_id": run_id}),
                    ("run_start", {"run_id": run_id, "container_image": IMAGE, "project_id": PROJECT, "inputs_sha256": inputs_sha256}),
                ]
                ok = all(session.post(f"{url}/api/entitlement/{name}", json=body, headers=headers, timeout=60).status_code == 200 for name, body in calls)
                ok = ok and subprocess.run(["true"], check=False).returncode == 0
                complete = session.post(f"{url}/api/entitlement/run_complete", json={"run_id": run_id, "outputs_sha256": outputs_sha256}, headers=headers, timeout=60)
                return ok and complete.status_code == 200

        def startup(_: int) -> bool:
            return subprocess.run([GBX, "--version"], capture_output=True, check=False).returncode == 0

        cases: dict[str, Callable[[int], bool]] = {"gbx run -- true": with_gbx, "bare HTTP calls + true": bare, "gbx --version (start-up alone)": startup}
        times: dict[str, list[float]] = {name: [] for name in cases}
        all_ok = with_gbx(-1) and bare(-1)  # warm-up: first connections, the key caches of the server
        for rep in range(reps):
            names = list(cases)
            random.Random(rep).shuffle(names)
            for name in names:
                began = time.perf_counter()
                all_ok = cases[name](rep) and all_ok
                times[name].append(time.perf_counter() - began)
    lines = ["| Case | median ms | p90 ms | min ms |", "| --- | ---: | ---: | ---: |"]
    for name, values in times.items():
        lines.append(f"| {name} | {harness.median(values) * 1000:.0f} | {harness.percentile(values, 0.9) * 1000:.0f} | {min(values) * 1000:.0f} |")
    overhead = harness.median(times["gbx run -- true"]) - harness.median(times["bare HTTP calls + true"])
    lines.append("")
    lines.append(f"gbx's own overhead per run (difference of medians): {overhead * 1000:.0f} ms (goal: under 1000 ms)")
    return lines, all_ok, overhead < 1.0


def main(argv: list[str] | None = None) -> int:
    """Build the tree, time the hashers, time a run's overhead, print Markdown tables; 1 when digests differ or a run failed."""
    parser = argparse.ArgumentParser(prog="python -m bench.hash", description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="total size of the tree in MiB (default 1024)")
    parser.add_argument("--files", type=int, default=10_000, help="number of files (default 10000)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions of each hasher (default 5)")
    parser.add_argument("--run-reps", type=int, default=10, help="timed repetitions of each overhead case (default 10)")
    parser.add_argument("--skip-run", action="store_true", help="only the hashing part (no emulator needed)")
    parser.add_argument("--dir", type=Path, default=None, help="where to build the tree (default: a temporary directory)")
    args = parser.parse_args(argv)
    size = args.size_mib * MIB
    workdir = Path(tempfile.mkdtemp(prefix="gbx-bench-hash-", dir=args.dir))
    ok = True
    keep = False  # a failed run keeps the server's log for diagnosis
    try:
        print(f"Machine: nproc {os.cpu_count()}, Python {platform.python_version()}, {_coreutils()}, {platform.platform()}, load {_load()}.")
        began = time.perf_counter()
        make_tree(workdir / "tree", size=size, files=args.files)
        print(f"\nTree: {args.files} files, {args.size_mib} MiB, written in {time.perf_counter() - began:.1f} s; {args.reps} repetitions, alternating.\n")
        lines, agree, fast = bench_hashing(workdir / "tree", reps=args.reps, size=size)
        print("\n".join(lines))
        print(f"Goal (gbx hash at least as fast as coreutils): {'met' if fast else 'NOT met'}")
        ok = ok and agree
        shutil.rmtree(workdir / "tree")  # free the page cache and disk before the second part
        if not args.skip_run:
            with harness.running_emulator(PROJECT, name="hash") as emu:
                lines, runs_ok, small = bench_overhead(emu, workdir, reps=args.run_reps)
            print(f"\nOverhead: {args.run_reps} repetitions of each case, shuffled, against a local server on the emulator.\n")
            print("\n".join(lines))
            print(f"Goal (gbx adds under 1 s): {'met' if small else 'NOT met'}")
            ok = ok and runs_ok
            if not runs_ok:
                keep = True
                print(f"a run failed; the server's log is kept at {workdir / 'server.log'}", file=sys.stderr)
    except emulator.EmulatorMissing as exc:
        print(exc, file=sys.stderr)
        return harness.EXIT_NO_EMULATOR
    except (harness.Interrupted, KeyboardInterrupt):
        print("\ninterrupted", file=sys.stderr)
        return harness.EXIT_INTERRUPTED
    except harness.BenchmarkFailed as exc:
        keep = True
        print(f"failed: {exc}", file=sys.stderr)
        return harness.EXIT_FAILED
    finally:
        shutil.rmtree(workdir / "tree", ignore_errors=True)
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return harness.EXIT_OK if ok else harness.EXIT_FAILED


def _coreutils() -> str:
    """The coreutils version, for the record."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(["sha256sum", "--version"], capture_output=True, text=True, timeout=5).stdout.splitlines()[0]
    return "sha256sum unknown"


def _load() -> str:
    """The 1-minute load average: the machine is shared, so say how busy it was."""
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "unknown"


if __name__ == "__main__":
    sys.exit(main())
