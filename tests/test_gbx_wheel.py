"""gbx where the jobs are: the deployment's /gbx/ serves the client's wheel and its sha256, and a fresh virtualenv
installs it from there (dependencies from the package index, nothing of the service) as docs/runner.md says."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from email.parser import Parser
from pathlib import Path

import pytest
import requests

from shared import client_wheel, emulator
from tests.conftest import error_code
from tests.test_hosting import STATIC, headers_for
from tests.test_local import _env, _stop, _wait_healthy

REPO = Path(__file__).resolve().parent.parent
CLIENT = tomllib.loads((REPO / "client" / "pyproject.toml").read_text())["project"]
WHEEL_NAME = f"gbx_client-{CLIENT['version']}-py3-none-any.whl"
# The service's stack: a customer's image must get none of it.
SERVER_PACKAGES = {"flask", "werkzeug", "functions-framework", "pydantic", "google-cloud-firestore", "google-cloud-kms", "grpcio", "gbx-entitlements"}


def test_the_wheel_is_reproducible_and_holds_only_the_client(tmp_path: Path) -> None:
    first = client_wheel.build(tmp_path / "one")
    second = client_wheel.build(tmp_path / "two")
    assert first.name == WHEEL_NAME
    assert first.sha256 == second.sha256 == hashlib.sha256(first.path.read_bytes()).hexdigest(), "the same source must build the same bytes"
    assert (tmp_path / "one" / "SHA256SUMS").read_text() == f"{first.sha256}  {WHEEL_NAME}\n"
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == sorted(["index.html", "SHA256SUMS", WHEEL_NAME])
    with zipfile.ZipFile(first.path) as wheel:
        names = wheel.namelist()
        info = f"gbx_client-{CLIENT['version']}.dist-info"
        assert {name.split("/", 1)[0] for name in names} == {"gbx_client", info}
        shipped = {name.split("/", 1)[1] for name in names if name.startswith("gbx_client/")}
        assert shipped == {p.name for p in (REPO / "client" / "gbx_client").glob("*.py")}
        metadata = Parser().parsestr(wheel.read(f"{info}/METADATA").decode())
        # The dependencies, and the pictures extra's (gbx verify PICTURE), installed only when asked for.
        extras = [f'{requirement}; extra == "{extra}"' for extra, requirements in CLIENT["optional-dependencies"].items() for requirement in requirements]
        assert sorted(metadata.get_all("Requires-Dist") or []) == sorted(CLIENT["dependencies"] + extras)
        assert metadata.get_all("Provides-Extra") == ["pictures"]
        assert "gbx = gbx_client.cli:main" in wheel.read(f"{info}/entry_points.txt").decode()
        assert {entry.date_time for entry in wheel.infolist()} == {(1980, 1, 1, 0, 0, 0)}


@pytest.fixture
def local_server(tmp_path: Path, firestore_emulator: emulator.Emulator) -> Iterator[str]:
    """`make run` as a user runs it (python -m shared.local serve), on the session's emulator under a project of its own."""
    port = emulator.free_port()
    env = _env(tmp_path / "local", FIRESTORE_EMULATOR_HOST=firestore_emulator.host, GOOGLE_CLOUD_PROJECT=f"gbx-wheel-{port}")
    process = subprocess.Popen([sys.executable, "-m", "shared.local", "serve", "--port", str(port)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, process)
        yield url
    finally:
        _stop(process)


def _fresh_venv(root: Path) -> Path:
    """A new virtualenv with nothing installed (pip is this interpreter's, pointed at it with --python)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    return root / "bin" / "python"


def _pip_install(python: Path, requirement: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--disable-pip-version-check", requirement]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_make_run_serves_the_wheel_and_a_fresh_venv_installs_it(local_server: str, tmp_path: Path) -> None:
    index = requests.get(local_server + "/gbx/", timeout=30)
    assert index.status_code == 200 and index.headers["Content-Type"].startswith("text/html")
    assert {key: index.headers.get(key) for key in STATIC} == STATIC == headers_for("/gbx/"), "the headers Hosting gives /gbx/"
    link = re.search(r'href="([^"#]+\.whl)#sha256=([0-9a-f]{64})"', index.text)
    assert link and link.group(1) == WHEEL_NAME, index.text
    published = link.group(2)
    assert f'<code id="sha256">{published}</code>' in index.text
    # The pip line is ready to copy: it names this server, not a placeholder.
    assert f'pip install "gbx-client @ {local_server}/gbx/{WHEEL_NAME}#sha256={published}"' in index.text
    assert requests.get(local_server + "/gbx/SHA256SUMS", timeout=30).text == f"{published}  {WHEEL_NAME}\n"
    wheel = requests.get(f"{local_server}/gbx/{WHEEL_NAME}", timeout=30)
    assert wheel.status_code == 200 and hashlib.sha256(wheel.content).hexdigest() == published
    assert headers_for(f"/gbx/{WHEEL_NAME}") == STATIC
    assert client_wheel.build(tmp_path / "rebuilt").sha256 == published, "what make run serves is what deploy.sh stages"
    redirect = requests.get(local_server + "/gbx", timeout=30, allow_redirects=False)
    assert (redirect.status_code, redirect.headers["Location"]) == (301, "/gbx/")

    # The Cloud Run job example of docs/runner.md, with this server as the base URL and the published hash.
    runner_md = (REPO / "docs" / "runner.md").read_text()
    (dockerfile,) = re.findall(r"```dockerfile\n(.*?)```", runner_md, re.S)
    (arg,) = re.findall(r"^ARG GBX_WHEEL=(\S+)$", dockerfile, re.M)
    (requirement,) = re.findall(r'^RUN pip install [^"]*"([^"]+)"$', dockerfile, re.M)
    base, hash_placeholder = "https://gbx-prod.web.app", "<SHA256>"
    assert arg == f"{base}/gbx/{WHEEL_NAME}#sha256={hash_placeholder}", "the documented wheel must be the one this checkout builds"
    wheel_url = arg.replace(base, local_server).replace(hash_placeholder, published)

    python = _fresh_venv(tmp_path / "venv")
    tampered = _pip_install(python, requirement.replace("${GBX_WHEEL}", wheel_url.replace(published, "0" * 64)))
    assert tampered.returncode != 0 and "HASHES" in tampered.stderr.upper(), tampered.stderr
    installed = _pip_install(python, requirement.replace("${GBX_WHEEL}", wheel_url))
    assert installed.returncode == 0, installed.stderr
    version = subprocess.run([str(tmp_path / "venv" / "bin" / "gbx"), "--version"], capture_output=True, text=True, timeout=60)
    assert (version.returncode, version.stdout) == (0, f"gbx {CLIENT['version']}\n"), version.stderr
    listed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "list", "--format=freeze"], capture_output=True, text=True, timeout=120).stdout
    packages = {line.split("==")[0].lower() for line in listed.splitlines()}
    assert {"gbx-client", "google-auth", "requests", "cryptography", "defusedxml"} <= packages
    assert not packages & SERVER_PACKAGES, packages & SERVER_PACKAGES


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND"])
@pytest.mark.parametrize("path", ["/no/such/page", "/api/entitlement/no_such_endpoint", "/gbx/no-such.whl", "/.env"])
def test_an_unknown_path_is_404_for_every_method(server_url: str, method: str, path: str) -> None:
    response = requests.request(method, server_url + path, timeout=30)
    assert response.status_code == 404
    if method != "HEAD":
        assert error_code(response) == "not_found"


@pytest.mark.parametrize("path", ["/", "/index.html", "/openapi.json", "/healthz"])
def test_a_known_static_path_is_405_for_other_methods(server_url: str, path: str) -> None:
    response = requests.post(server_url + path, timeout=30)
    assert response.status_code == 405 and error_code(response) == "method_not_allowed"
    assert response.headers["Allow"] == "GET, HEAD"
