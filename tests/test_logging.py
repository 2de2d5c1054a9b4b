"""Structured request logs: one JSON line per request, with trace; never a token, admin token or key."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ADMIN_TOKEN, PROJECT, RUNNER, Api


def _log_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_one_json_line_per_request_with_trace(api: Api, capfd: pytest.CaptureFixture[str]) -> None:
    capfd.readouterr()
    api.issue(RUNNER, 1)
    api.post("/api/entitlement/consume", {"run_id": "job-1"}, headers={"X-Cloud-Trace-Context": "105445aa7843bc8bf206b12000100000/1;o=1"})
    api.consume("job-2")
    lines = _log_lines(capfd.readouterr().out)
    assert [(line["endpoint"], line["status"]) for line in lines] == [("issue", 200), ("consume", 200), ("consume", 402)]
    for line in lines:
        assert {"severity", "message", "request_id", "endpoint", "principal", "status", "latency_ms"} <= set(line)
        assert isinstance(line["latency_ms"], float)
    assert lines[1]["principal"] == RUNNER and lines[1]["severity"] == "INFO"
    assert lines[1]["logging.googleapis.com/trace"] == f"projects/{PROJECT}/traces/105445aa7843bc8bf206b12000100000"
    assert lines[2]["severity"] == "WARNING"


def test_no_secret_reaches_a_log_line(api: Api, capfd: pytest.CaptureFixture[str], service_dir) -> None:
    capfd.readouterr()
    token = api.token()
    api.issue(RUNNER, 2)
    api.post("/api/entitlement/issue", {"principal": RUNNER, "runs_total": 1}, as_user=None, headers={"X-GBX-ADMIN-TOKEN": "wrong-" + ADMIN_TOKEN})
    api.post("/api/entitlement/consume", {"run_id": "job-1"}, as_user=None, headers={"Authorization": f"Bearer {token}"})
    api.post("/api/entitlement/consume", {"run_id": "job-2"}, as_user=None, headers={"Authorization": f"Bearer {token[:-5]}AAAAA"})
    api.post("/api/entitlement/consume", data=b"{not json " + token.encode(), headers={"Content-Type": "application/json"})
    bundle = api.sealed_run("job-3")
    captured = capfd.readouterr()
    output = captured.out + captured.err
    assert len(_log_lines(captured.out)) >= 8
    secrets = [ADMIN_TOKEN, token, token.split(".")[2], token.split(".")[1]]
    secrets += [line for line in (service_dir / "issuer" / "issuer-key.pem").read_text().splitlines() if "PRIVATE" not in line][:3]
    for secret in secrets:
        assert secret not in output
    assert "PRIVATE KEY" not in output
    # The signing path ran and was logged, and the seal's signature is not in the log either.
    assert ("run_complete", 200) in {(line["endpoint"], line["status"]) for line in _log_lines(captured.out)}
    assert bundle["signature"] not in output


def test_log_lines_count_the_commits_each_request_tried(api: Api, capfd: pytest.CaptureFixture[str]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    api.issue(RUNNER, 5)
    capfd.readouterr()
    with ThreadPoolExecutor(max_workers=10) as pool:
        statuses = list(pool.map(lambda n: api.consume(f"job-{n}").status_code, range(10)))
    assert sorted(statuses) == [200] * 5 + [402] * 5
    lines = [line for line in _log_lines(capfd.readouterr().out) if line["endpoint"] == "consume"]
    assert len(lines) == 10
    # Every commit tried either charged its request's run or lost a race: nothing is counted twice or missed.
    assert sum(line.get("commits", 0) for line in lines) == 5 + sum(line.get("races_lost", 0) for line in lines)
    assert all(line["commits"] >= 1 for line in lines if line["status"] == 200)
    # A request that wrote nothing (a check) tried no commit. Its reads went out at once, and on the way to a 402
    # (the balance is spent) it reads the run once more.
    api.check("job-never")
    (check,) = [line for line in _log_lines(capfd.readouterr().out) if line["endpoint"] == "check"]
    assert (check["status"], check["commits"], check["round_trips"]) == (402, 0, 2)


def test_log_lines_count_the_round_trips_made_one_after_another(api: Api, capfd: pytest.CaptureFixture[str]) -> None:
    api.issue(RUNNER, 3)
    svg = api.sealed_run("job-1")["seal_svg"]
    capfd.readouterr()
    api.verify(svg)
    api.redeem(svg)
    api.check("job-2")
    api.issue(RUNNER, 0)  # refused before any read
    lines = {line["endpoint"]: line for line in _log_lines(capfd.readouterr().out)}
    # verify: the seal record and its redemption in one request; redeem: that, then the redemption, its key and the
    # balance at once, then the commit; check: the balance and the run at once.
    assert lines["seal_verify"]["round_trips"] == 1
    assert (lines["redeem_seal_once"]["round_trips"], lines["redeem_seal_once"]["commits"]) == (3, 1)
    assert lines["check"]["round_trips"] == 1
    assert "round_trips" not in lines["issue"]
