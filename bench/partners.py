"""Partner benchmark: revoking every run of a 1,000,000-run grant against issuing it, and export pages deep into a walk.

Run it from the repository root: `python -m bench.partners` (or `make bench`, which runs every benchmark).

1. Revoke ÷ issue: per round, one grant of 1,000,000 runs (240 shard documents) is issued through the app's test
   client and then revoked whole (one request, one commit of 240 documents and 240 ledger entries); the two requests'
   times are compared as medians over the rounds. Goal: revoke ÷ issue ≤ 1.5.
2. Export paging: 10,000 grants of one partner (spread over 100 principals, a fifth of them with a run consumed), then repeated walks of 10 pages of 1,000 rows; page 10 ÷ page 1 by median. Goal ≤ 1.5.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

from bench import harness
from bench.latency import Api, Request, service_configured
from shared import config, entitlements, store
from shared.auth import Identity
from shared.endpoints import ENDPOINTS
from shared.models import ConsumeRequest

PROJECT = "gbx-bench-partners"
PARTNER = "partner@bench.example"
REVOKE_GOAL = 1.5
PAGE_GOAL = 1.5
DEFAULT_ROUNDS = 15  # issue/revoke pairs: cheap (half a second each), and the median of 7 moved by ±0.15x between runs
GRANTS = 10_000
PRINCIPALS = 100
PAGE_SIZE = 1000
DEFAULT_WALKS = 5


def revoke_versus_issue(api: Api, rounds: int) -> tuple[list[float], list[float]]:
    """Per round: issue a 1,000,000-run grant, then revoke it all; the two request times."""
    issued, revoked = [], []
    for i in range(rounds + 1):  # the first round warms both paths and is not counted
        principal = f"big-{i}@bench.example"
        began = time.perf_counter()
        grant = api.send(api.json_request("issue", {"principal": principal, "runs_total": 1_000_000}))
        middle = time.perf_counter()
        answer = api.send(api.json_request("revoke", {"principal": principal, "grant_id": grant["grant_id"]}))
        ended = time.perf_counter()
        if answer["revoked"] != 1_000_000 or answer["remaining"] != 0:
            raise harness.BenchmarkFailed(f"revoke answered {answer}")
        if i:
            issued.append(middle - began)
            revoked.append(ended - middle)
    return issued, revoked


def fill(grants: int) -> None:
    """`grants` two-run grants of PARTNER over PRINCIPALS principals, each in its own issue commit; a tenth of the runs consumed."""
    principals = [f"customer-{k}@bench.example" for k in range(PRINCIPALS)]

    def issue(i: int) -> None:
        # The issue commit itself (the request's balance read is no part of what the export reads).
        store.commit_issue(
            principal=principals[i % PRINCIPALS], grant_id=os.urandom(16).hex(), plan_id="standard", runs_total=2, expires_at=None,
            issued_by=PARTNER, idempotency_key_hash=None, fingerprint="", response={},
        )

    def consume(i: int) -> None:
        entitlements.consume(Identity(principal=principals[i % PRINCIPALS], operator=False), ConsumeRequest(run_id=f"run-{i}"))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(issue, range(grants)))
        list(pool.map(consume, range(grants // 5)))


def page_times(api: Api, walks: int) -> list[list[float]]:
    """Per walk, the time of each page of the export (PAGE_SIZE rows), as the partner."""
    window = "from=2020-01-01T00:00:00Z&to=2100-01-01T00:00:00Z"
    headers = {"Authorization": f"Bearer {api.token(PARTNER)}"}
    all_walks = []
    for _ in range(walks + 1):  # the first walk warms the path and is not counted
        times, token, rows = [], None, 0
        while True:
            query = f"{window}&page_size={PAGE_SIZE}" + (f"&page_token={token}" if token else "")
            began = time.perf_counter()
            page = api.send(Request("GET", f"{ENDPOINTS['export'].path}?{query}", headers))
            times.append(time.perf_counter() - began)
            rows += len(page["rows"])
            token = page["next_page_token"]
            if token is None:
                break
        if rows != GRANTS:
            raise harness.BenchmarkFailed(f"the walk listed {rows} rows, not {GRANTS}")
        all_walks.append(times)
    return all_walks[1:]


def main(argv: list[str] | None = None) -> int:
    """Start an emulator, measure, print the figures; 1 when a request failed (goals are reported, not enforced)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.partners",
        description=__doc__.splitlines()[0],
        epilog="Exit status: 0 measured (a missed goal is reported, not an error), 1 a request failed, 3 no emulator, 130 interrupted.",
    )
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help=f"issue/revoke pairs of 1,000,000 runs (default {DEFAULT_ROUNDS})")
    parser.add_argument("--walks", type=int, default=DEFAULT_WALKS, help=f"export walks of {GRANTS} rows (default {DEFAULT_WALKS})")
    args = parser.parse_args(argv)
    began = time.perf_counter()

    def body() -> None:
        with (
            tempfile.TemporaryDirectory(prefix="gbx-bench-keys-") as folder,
            service_configured(Path(folder)) as issuer,
            harness.running_emulator(PROJECT, name="partners"),
        ):
            os.environ[config.ENV_PARTNERS] = PARTNER
            # The emulator reads a whole collection for each query (production reads the index): give it time.
            os.environ[config.ENV_FIRESTORE_TIMEOUT] = "30"
            # Events off on both sides, as in bench.latency: what events cost a request is bench.events' measure, and
            # without a Pub/Sub emulator here each publish would only wait and fail.
            os.environ[config.ENV_EVENTS] = "0"
            config.get_config.cache_clear()
            with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
                api = Api(issuer)
                print("Revoke and issue of 1,000,000 runs …", file=sys.stderr, flush=True)
                issued, revoked = revoke_versus_issue(api, args.rounds)
                print(f"Issuing {GRANTS} grants …", file=sys.stderr, flush=True)
                fill(GRANTS)
                print("Export walks …", file=sys.stderr, flush=True)
                walks = page_times(api, args.walks)
            os.environ.pop(config.ENV_PARTNERS, None)
            os.environ.pop(config.ENV_FIRESTORE_TIMEOUT, None)
            os.environ.pop(config.ENV_EVENTS, None)
            issue_ms, revoke_ms = harness.median(issued) * 1000, harness.median(revoked) * 1000
            first_ms = harness.median([w[0] for w in walks]) * 1000
            last_ms = harness.median([w[-1] for w in walks]) * 1000
            print(harness.machine_line())
            print(f"Revoke of every run of a 1,000,000-run grant (240 documents), {args.rounds} rounds:")
            print(f"  issue {issue_ms:.0f} ms, revoke {revoke_ms:.0f} ms (medians): revoke ÷ issue = {revoke_ms / issue_ms:.2f}× (goal ≤ {REVOKE_GOAL}×)")
            print(f"Export of {GRANTS} grants in pages of {PAGE_SIZE} ({GRANTS // 5} runs of them consumed), {args.walks} walks:")
            middle = [harness.median([w[k] for w in walks]) * 1000 for k in range(len(walks[0]))]
            print("  page medians (ms): " + ", ".join(f"{t:.0f}" for t in middle))
            print(f"  page {len(walks[0])} ÷ page 1 = {last_ms / first_ms:.2f}× (goal ≤ {PAGE_GOAL}×)")
            print(f"({time.perf_counter() - began:.0f} s)")

    return harness.exit_status(body)


if __name__ == "__main__":
    sys.exit(main())
