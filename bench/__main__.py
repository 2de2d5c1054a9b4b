"""Run every benchmark in order (`python -m bench`, `make bench`): contention, fan-out, latency, partners, events, the portal's picture decode, the seal log, and hashing when present."""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
import time
from collections.abc import Callable

from bench import harness
from shared import config

# In order; a module that is not in this checkout is skipped (bench.hash belongs to the runner client's work).
BENCHMARKS = ("bench.contention", "bench.fanout", "bench.latency", "bench.partners", "bench.events", "bench.pictures", "bench.sealog", "bench.hash")
OPTIONAL = frozenset({"bench.hash"})


def _load(name: str) -> Callable[[], int] | None:
    """A call of the benchmark's `main` with no options, or None when an optional one is not in this checkout."""
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if name in OPTIONAL and exc.name == name:
            return None
        raise
    benchmark = module.main
    # An empty argument list where `main` takes one, so that it does not read this command's own options.
    takes_argv = bool(inspect.signature(benchmark).parameters)

    def run() -> int:
        try:
            code = benchmark([]) if takes_argv else benchmark()
        except SystemExit as exc:
            code = exc.code
        return code if isinstance(code, int) else (harness.EXIT_OK if code is None else harness.EXIT_FAILED)

    return run


def main(argv: list[str] | None = None) -> int:
    """Run each benchmark with no arguments; the worst exit status wins (130 stops at once)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__.splitlines()[0],
        epilog=(
            "Each benchmark also runs alone: python -m bench.contention, python -m bench.fanout, python -m bench.latency, python -m bench.partners, python -m bench.events, python -m bench.pictures, python -m bench.sealog (see --help of each)."
            " Exit status: 0 all passed their checks, 1 one failed, 3 no Firestore emulator, 130 interrupted."
        ),
    )
    parser.add_argument("--only", action="append", choices=[name.removeprefix("bench.") for name in BENCHMARKS], help="run only this benchmark (repeatable)")
    args = parser.parse_args(argv)
    status = harness.EXIT_OK
    for name in BENCHMARKS:
        if args.only and name.removeprefix("bench.") not in args.only:
            continue
        run = _load(name)
        if run is None:
            print(f"(skipping {name}: not in this checkout)", file=sys.stderr)
            continue
        print(f"== {name}", file=sys.stderr, flush=True)
        began = time.perf_counter()
        # Each benchmark in the environment this command was given: one that points the service at its own emulators
        # (PUBSUB_EMULATOR_HOST, GBX_*) and stops them must not leave the next one talking to a stopped emulator.
        environment = dict(os.environ)
        try:
            code = run()
        finally:
            os.environ.clear()
            os.environ.update(environment)
            config.get_config.cache_clear()
        print(f"== {name}: exit {code} after {time.perf_counter() - began:.0f}s", file=sys.stderr, flush=True)
        if code in (harness.EXIT_INTERRUPTED, harness.EXIT_NO_EMULATOR):
            return code
        status = max(status, code)
    return status


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # between benchmarks, where no emulator runs
        print("\ninterrupted", file=sys.stderr)
        sys.exit(harness.EXIT_INTERRUPTED)
