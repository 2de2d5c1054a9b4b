"""The runner client stands on its own: its package, with only the dependencies its pyproject declares, and nothing of the service.

A wheel cannot be built offline here (the build backend comes from the index), so the package is laid
out as the wheel would lay it out (`[tool.setuptools] packages`), next to mirrors of only the declared
dependencies and theirs, in an interpreter without site-packages. An import of the service's stack,
an undeclared dependency, a module outside the package or a wrong console-script target fails here.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from packaging.requirements import Requirement

from gbx_client.seal_format import canonical_json, render_seal_svg

CLIENT = Path(__file__).resolve().parent.parent / "client"
# What the service runs on; the client must import none of it.
SERVER_STACK = ("shared", "functions", "functions_framework", "flask", "werkzeug", "pydantic", "google.cloud", "google.api_core", "grpc")


def _distributions(requirements: list[str]) -> set[str]:
    """The installed distributions that these requirements need, transitively (extras left out)."""
    needed: set[str] = set()
    pending = list(requirements)
    while pending:
        requirement = Requirement(pending.pop())
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = importlib.metadata.distribution(requirement.name).metadata["Name"]
        if name not in needed:
            needed.add(name)
            pending.extend(importlib.metadata.distribution(name).requires or [])
    return needed


def _mirror_distribution(name: str, target: Path) -> None:
    """Symlink one installed distribution's files (only those) into target, so namespace packages hold nothing else."""
    distribution = importlib.metadata.distribution(name)
    for file in distribution.files or []:
        if file.parts[0] == ".." or "__pycache__" in file.parts:
            continue
        source = Path(str(distribution.locate_file(file)))
        destination = target / file
        destination.parent.mkdir(parents=True, exist_ok=True)
        if source.exists() and not destination.exists():
            destination.symlink_to(source)


def test_client_runs_with_only_its_declared_dependencies(tmp_path: Path) -> None:
    project = tomllib.loads((CLIENT / "pyproject.toml").read_text())
    site = tmp_path / "site"
    for package in project["tool"]["setuptools"]["packages"]:
        shutil.copytree(CLIENT / package.replace(".", "/"), site / package.replace(".", "/"), ignore=shutil.ignore_patterns("__pycache__"))
    requirements = project["project"]["dependencies"]
    assert sorted(Requirement(r).name for r in requirements) == ["cryptography", "defusedxml", "google-auth", "requests", "segno"]
    deps = tmp_path / "deps"
    for name in _distributions(requirements):
        _mirror_distribution(name, deps)
    entry_module, entry_function = project["project"]["scripts"]["gbx"].split(":")

    # A seal signed here, for the isolated gbx to verify offline.
    key = ec.generate_private_key(ec.SECP256R1())
    claims = {
        "v": 1, "seal_id": "s1", "run_id": "r1", "principal": "runner@example.com", "project_id": "acme-prod",
        "container_image": "r/i@sha256:" + "0" * 64, "inputs_sha256": "1" * 64, "outputs_sha256": "2" * 64,
        "consumed_at": "2026-01-01T00:00:00Z", "started_at": "2026-01-01T00:00:01Z", "completed_at": "2026-01-01T00:00:02Z",
        "issuer": "local", "key": "k1",
    }
    payload = canonical_json(claims)
    (tmp_path / "seal.svg").write_text(render_seal_svg(payload=payload, signature=key.sign(payload, ec.ECDSA(hashes.SHA256())), key="k1"))
    # A picture of a badge: without the pictures extra (zxing-cpp, Pillow) gbx says which extra to install, exit 2.
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(64))
    (tmp_path / "key.pem").write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    script = f"""
import importlib, sys
sys.path[:0] = [{str(site)!r}, {str(deps)!r}]
main = getattr(importlib.import_module({entry_module!r}), {entry_function!r})
import gbx_client
import google.auth.transport.requests, google.oauth2.id_token  # gbx's default identity path
assert gbx_client.__file__.startswith({str(site)!r}), gbx_client.__file__
codes = [
    main(["hash", {str(site)!r}]),
    main(["verify", {str(tmp_path / "seal.svg")!r}, "--public-key", {str(tmp_path / "key.pem")!r}]),
    main(["run", "--url", "http://127.0.0.1:9", "--run-id", "r1", "--image", "r/i@sha256:" + "0" * 64, "--project", "acme-prod",
          "--inputs", {str(site)!r}, "--outputs", {str(tmp_path / "out")!r}, "--seal-dir", {str(tmp_path / "seal")!r},
          "--retry-timeout", "0.2", "--", "true"]),
    main(["verify", {str(tmp_path / "photo.jpg")!r}, "--public-key", {str(tmp_path / "key.pem")!r}]),
]
stack = {SERVER_STACK!r}
print(codes, sorted(name for name in sys.modules if any(name == s or name.startswith(s + ".") for s in stack)))
"""
    # -I: no user site, no PYTHON* variables; -S: no site-packages. Only the package and its dependencies can be imported.
    done = subprocess.run([sys.executable, "-I", "-S", "-c", script], capture_output=True, text=True, timeout=120, env={"GBX_ID_TOKEN": "t", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[0, 0, 69, 2] []", done.stdout + done.stderr
    assert "the pictures extra (pip install 'gbx-client[pictures]')" in done.stderr.splitlines()[-1]
    assert "gbx: exit 69 (unavailable): check: http://127.0.0.1:9/api/entitlement/check unreachable" in done.stderr
