"""gbx's guards: verify's usage code for every usage error, gbx complete keeping the token at --url, and CMD dying with gbx."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RUNNER, Api
from tests.test_client import FAST, GBX, UNAVAILABLE, FaultProxy, Job, _handler, balance, run_state, serving


@pytest.fixture
def job(api: Api, tmp_path: Path) -> Job:
    """A job workspace for the runner, against the service (as in test_client)."""
    assert GBX is not None, "gbx is not installed in this virtualenv (pip install -e ./client)"
    return Job(root=tmp_path, url=api.base_url, token=api.token(RUNNER))


@pytest.fixture
def proxy(server_url: str) -> Iterator[FaultProxy]:
    """test_client's fault-injecting proxy in front of the service."""
    instance = FaultProxy(upstream=server_url)
    with serving(instance, _handler(instance)):
        yield instance


def _gbx(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GBX_")}
    assert GBX is not None
    return subprocess.run([GBX, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=60)


@pytest.mark.parametrize(
    "args",
    [
        ["verify", "seal.svg", "--public-key", "p.pem", "--no-such-option"],
        ["verify", "--no-such-option"],
        ["verify"],
        ["verify", "seal.svg", "--keys", "k.json", "--public-key", "p.pem"],
        ["verify", "seal.svg", "--retry-timeout", "soon"],
        ["verify", "seal.svg", "extra-argument", "--public-key", "p.pem"],
    ],
    ids=["unknown-option", "unknown-option-alone", "no-seal", "two-key-sources", "bad-value", "extra-argument"],
)
def test_verify_exits_2_for_every_usage_error(tmp_path: Path, args: list[str]) -> None:
    result = _gbx(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1].startswith("gbx: exit 2 (usage): ")


def test_other_commands_keep_64_for_an_unknown_option(tmp_path: Path) -> None:
    for command in (["hash", "--no-such-option", "."], ["complete", "seal", "--no-such-option"], ["run", "--no-such-option", "--", "true"]):
        result = _gbx(*command, cwd=tmp_path)
        assert result.returncode == 64, (command, result.stderr)
        assert "unrecognized arguments: --no-such-option" in result.stderr


def test_complete_never_sends_the_token_where_only_the_preseal_says(api: Api, job: Job, proxy: FaultProxy, server_url: str) -> None:
    api.issue(RUNNER, 1)
    proxy.always["run_complete"] = UNAVAILABLE
    proxy.retry_after = "0"
    pending = job.gbx(*job.args(url=proxy.url), "--retry-timeout", "1", *job.writes_outputs())
    assert pending.code == 75, pending.stderr
    del proxy.always["run_complete"]
    preseal_path = job.seal_dir / "preseal.json"
    honest = preseal_path.read_text()

    # A preseal.json edited to name another server: that server never hears from gbx.
    thief = FaultProxy(upstream=server_url)
    with serving(thief, _handler(thief)):
        preseal_path.write_text(json.dumps({**json.loads(honest), "url": thief.url}))
        refused = job.gbx("complete", str(job.seal_dir), "--url", proxy.url, *FAST)
        assert refused.code == 64, refused.stderr
        assert refused.last_line == f"gbx: exit 64 (usage): preseal.json names {thief.url}, not --url {proxy.url}: refusing to send the runner's token there"
        without_url = job.gbx("complete", str(job.seal_dir), *FAST)
        assert without_url.code == 64 and "missing --url (or GBX_URL)" in without_url.last_line
        assert sum(thief.received.values()) == 0
    assert preseal_path.exists() and run_state(api, "job-1") == "started"

    # The honest preseal completes at GBX_URL (a trailing "/" is the same base URL).
    preseal_path.write_text(honest)
    done = job.gbx("complete", str(job.seal_dir), *FAST, env=job.env(GBX_URL=proxy.url + "/"))
    assert done.code == 0, done.stderr
    assert run_state(api, "job-1") == "completed" and balance(api) == 0 and not preseal_path.exists()


def _alive(pid: int) -> bool:
    """Whether pid is a live process (a zombie waiting for a reaper counts as dead)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_kill_9_of_gbx_takes_cmd_with_it(api: Api, job: Job) -> None:
    api.issue(RUNNER, 1)
    pid_file = job.root / "cmd.pid"
    script = f'echo $$ > "{pid_file}.tmp" && mv "{pid_file}.tmp" "{pid_file}" && exec sleep 60'
    process = subprocess.Popen([GBX, *job.args(), "--", "sh", "-c", script], env=job.env(), cwd=job.root, start_new_session=True, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists():
            assert process.poll() is None and time.monotonic() < deadline, "CMD never started"
            time.sleep(0.05)
        cmd_pid = int(pid_file.read_text())
        assert _alive(cmd_pid)
        os.kill(process.pid, signal.SIGKILL)  # gbx alone, not its process group
        process.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(cmd_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(cmd_pid), "CMD outlived gbx"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # whatever is left of the test's own process group
    assert run_state(api, "job-1") == "started"


def test_verify_gives_up_on_an_unreachable_key_url_sooner_than_run(monkeypatch: pytest.MonkeyPatch) -> None:
    # A person waits for gbx verify: an unreachable --keys URL ends after 30 s by default, not run's 120.
    from gbx_client.cli import build_parser

    monkeypatch.delenv("GBX_RETRY_TIMEOUT", raising=False)
    verify = build_parser().parse_args(["verify", "seal", "--keys", "http://127.0.0.1:9/keys"])
    run = build_parser().parse_args(["run", "--url", "http://x", "--run-id", "r", "--image", "i", "--project", "p", "--inputs", "a", "--outputs", "b"])
    assert (verify.retry_timeout, run.retry_timeout) == (30.0, 120.0)
