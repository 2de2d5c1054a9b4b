"""deploy.sh: the dry run's commands, a re-runnable deployment (against a fake gcloud and firebase), self-contained staging.

What deploy.sh deploys comes from the endpoint registry (shared/endpoints.py), and so do these tests' expectations.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import socketserver
import subprocess
import sys
import tempfile
import textwrap
import threading
import tomllib
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from shared import client_wheel, events
from shared import config as config_module
from shared.endpoints import ENDPOINTS, Caller, Keys, deploy_order, hosting_rewrites, route_glob

REPO = Path(__file__).resolve().parent.parent
PROJECT = "gbx-demo"
REGION = "europe-west1"
PROJECT_NUMBER = "123456789012"  # what the fake gcloud answers; a dry run shows the placeholder PROJECT_NUMBER
SA_EMAIL = f"gbx-runtime@{PROJECT}.iam.gserviceaccount.com"
BUILD_SA_EMAIL = f"gbx-build@{PROJECT}.iam.gserviceaccount.com"
BUILD_ROLES = {"roles/logging.logWriter", "roles/artifactregistry.writer", "roles/storage.objectAdmin"}
KEY = f"projects/{PROJECT}/locations/{REGION}/keyRings/gbx/cryptoKeys/seal"
# Entry point (= directory under functions/) -> Cloud Function name, as the registry declares them.
FUNCTIONS = {endpoint.name: endpoint.function_name for endpoint in ENDPOINTS.values()}
# The registry's deploy order: the verifiers (and the key publisher) first, the only signer last.
DEPLOY_ORDER = [endpoint.name for endpoint in deploy_order()]
VERIFIERS = [endpoint.name for endpoint in deploy_order() if endpoint.keys is Keys.VERIFY]
(SIGNER,) = [endpoint.name for endpoint in ENDPOINTS.values() if endpoint.keys is Keys.SIGN]
# Partners call these with the admin token; only they may read it.
ADMIN_ENTRIES = {endpoint.name for endpoint in ENDPOINTS.values() if endpoint.caller in (Caller.PARTNER, Caller.PARTNER_OR_OPERATOR)}
# Internal functions (the ledger audit): only gbx-audit may invoke them, through Cloud Run's IAM check; no Hosting rewrite.
INTERNAL = {endpoint.name for endpoint in ENDPOINTS.values() if endpoint.internal}
PUBLIC = [entry for entry in FUNCTIONS if entry not in INTERNAL]
AUDIT_SA_EMAIL = f"gbx-audit@{PROJECT}.iam.gserviceaccount.com"
APIS = [f"{api}.googleapis.com" for api in (
    "cloudfunctions", "run", "cloudbuild", "artifactregistry", "firestore", "cloudkms", "secretmanager", "iam", "logging",
    "firebaserules", "firebasehosting", "pubsub")]
CLOUD_RUN_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
HEX_TOKEN = re.compile(r"[0-9a-f]{64}")
# The runner client's wheel, as shared/client_wheel.py builds it for Hosting's /gbx/.
WHEEL_NAME = "gbx_client-{}-py3-none-any.whl".format(tomllib.loads((REPO / "client" / "pyproject.toml").read_text())["project"]["version"])
CHECKOUT_FILES = ["deploy.sh", "requirements.txt", "firestore.rules", "firestore.indexes.json", "firebase.json", "openapi.json"]
# Request concurrency and the whole CPU it needs (Cloud Run refuses concurrency > 1 below one CPU; --cpu needs --memory).
CONCURRENCY = {"concurrency": "40", "cpu": "1", "memory": "512Mi", "min-instances": "0"}
USAGE = "usage: deploy.sh --project PROJECT --region REGION [--site SITE] [--dry-run]"


# ---------------------------------------------------------------- helpers


@dataclass
class Deploy:
    """One run of deploy.sh: its result and the commands it showed ("+ " lines, parsed)."""

    returncode: int
    stdout: str
    stderr: str

    @functools.cached_property
    def commands(self) -> list[list[str]]:
        return [shlex.split(line[2:]) for line in self.stdout.splitlines() if line.startswith("+ ")]

    def indexes(self, *prefix: str) -> list[int]:
        """Positions of the commands that start with `prefix`."""
        return [i for i, cmd in enumerate(self.commands) if cmd[: len(prefix)] == list(prefix)]

    def find(self, *prefix: str) -> list[list[str]]:
        return [self.commands[i] for i in self.indexes(*prefix)]

    @property
    def summary(self) -> str:
        """What follows the commands and notes: the base URL, the function URLs, where the admin token is."""
        return self.stdout.partition("\n\n")[2]


def flags(cmd: list[str]) -> dict[str, str]:
    """--name=value flags of a command (a bare --name maps to "")."""
    out: dict[str, str] = {}
    for arg in cmd:
        if arg.startswith("--"):
            name, _, value = arg[2:].partition("=")
            out[name] = value
    return out


# firebase.json's own rewrites (the portal's paths, such as /v), which deploy.sh puts before the registry's.
TRACKED_REWRITES = json.loads((Path(__file__).resolve().parent.parent / "firebase.json").read_text())["hosting"]["rewrites"]


def effective_rewrites(region: str) -> list[dict[str, Any]]:
    """The rewrites of the Hosting config deploy.sh writes: the tracked ones, then every function's."""
    return TRACKED_REWRITES + hosting_rewrites(region)


def env_vars(value: str) -> dict[str, str]:
    """Parse a gcloud dict flag written with the ^;^ alternate delimiter."""
    assert value.startswith("^;^"), value
    return dict(item.split("=", 1) for item in value[3:].split(";"))


def base_urls(site: str = PROJECT) -> list[str]:
    """Firebase Hosting's two domains for a site, each without and with a trailing slash: first in GBX_AUDIENCES."""
    return [url for base in (f"https://{site}.web.app", f"https://{site}.firebaseapp.com") for url in (base, base + "/")]


def deterministic_urls(name: str, project_number: str) -> list[str]:
    """The URLs a gen2 function answers at whatever its serviceConfig.uri, each without and with a trailing slash."""
    bases = [f"https://{REGION}-{PROJECT}.cloudfunctions.net/{name}", f"https://{name}-{project_number}.{REGION}.run.app"]
    return [url for base in bases for url in (base, base + "/")]


def audiences(value: str) -> list[str]:
    """GBX_AUDIENCES as a list, after checking that it names no URL twice."""
    urls = value.split(",")
    assert len(urls) == len(set(urls)), value
    return urls


def make_shims(directory: Path, record: Path, names: list[str], exit_code: int = 1) -> None:
    """Commands that only record that they were called."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        shim = directory / name
        shim.write_text(f'#!/bin/sh\necho "{name} $*" >> "{record}"\nexit {exit_code}\n')
        shim.chmod(0o755)


def make_checkout(root: Path) -> Path:
    """A copy of the deployable parts of this repository, with stub functions (tests of the script only)."""
    root.mkdir(parents=True)
    for name in CHECKOUT_FILES:
        shutil.copy2(REPO / name, root / name)
    shutil.copytree(REPO / "shared", root / "shared", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "client" / "gbx_client", root / "client" / "gbx_client", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "client" / "pyproject.toml", root / "client" / "pyproject.toml")  # deploy.sh builds gbx's wheel for Hosting
    shutil.copytree(REPO / "portal", root / "portal")
    # Local-mode modules and byte code must never be shipped, whether or not they exist yet.
    (root / "shared" / "local.py").write_text('"""local mode"""\n')
    (root / "shared" / "__pycache__").mkdir(exist_ok=True)
    (root / "shared" / "__pycache__" / "config.cpython-312.pyc").write_bytes(b"\0")
    for entry in FUNCTIONS:
        (root / "functions" / entry).mkdir(parents=True)
        (root / "functions" / entry / "main.py").write_text(f"# stub for {entry}\n")
    return root


def run_deploy(checkout: Path, args: list[str], *, path: str, env: dict[str, str] | None = None,
               cwd: Path | None = None, python: str | None = sys.executable) -> Deploy:
    """Run `bash deploy.sh ARGS` with a controlled PATH and environment (GBX_PYTHON: this interpreter, unless None)."""
    full_env = {"PATH": path, "HOME": str(checkout.parent), "LANG": "C.UTF-8", **(env or {})}
    if python is not None:
        full_env.setdefault("GBX_PYTHON", python)
    result = subprocess.run(["bash", str(checkout / "deploy.sh"), *args], cwd=cwd or checkout, env=full_env,
                            capture_output=True, text=True, timeout=120, check=False)
    return Deploy(result.returncode, result.stdout, result.stderr)


def tree(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (dot files excepted, as Hosting's `ignore` does), by its relative path."""
    return {
        path.relative_to(directory).as_posix(): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(directory).parts)
    }


DRY_ARGS = ["--project", PROJECT, "--region", REGION, "--dry-run"]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A stub checkout plus shims for every command a dry run must not call."""
    base = tmp_path_factory.mktemp("deploy")
    record = base / "calls.log"
    make_shims(base / "shims", record, ["gcloud", "firebase", "curl", "openssl", "wget"])
    return {"checkout": make_checkout(base / "checkout"), "record": record, "path": f"{base / 'shims'}:/usr/bin:/bin"}


@pytest.fixture(scope="module")
def dry(sandbox: dict[str, Path]) -> Deploy:
    """The dry run of the stub checkout, staged into its build/ (no other test stages there)."""
    result = run_deploy(sandbox["checkout"], DRY_ARGS, path=str(sandbox["path"]), env={"GBX_OPERATORS": "ops@example.com,b@x.y"})
    assert result.returncode == 0, result.stderr
    return result


# ---------------------------------------------------------------- the registry


def test_function_directories_and_the_registry_agree() -> None:
    """Each functions/<name>/main.py is the registry's endpoint <name>: `<name> = function("<name>")`, and no other."""
    directories = {path.name for path in (REPO / "functions").iterdir() if path.is_dir() and path.name != "__pycache__"}
    assert directories == set(ENDPOINTS), "a functions/<name>/ directory without an endpoint, or an endpoint without one"
    for name in ENDPOINTS:
        module = ast.parse((REPO / "functions" / name / "main.py").read_text())
        defined = [
            (target.id, call.args[0].value)
            for node in module.body if isinstance(node, ast.Assign) and isinstance(call := node.value, ast.Call)
            and isinstance(call.func, ast.Name) and call.func.id == "function"
            and len(call.args) == 1 and isinstance(call.args[0], ast.Constant)
            for target in node.targets if isinstance(target, ast.Name)
        ]
        assert defined == [(name, name)], f"functions/{name}/main.py must define {name} = function({name!r})"


def test_the_registry_orders_verifiers_first_and_the_signer_last() -> None:
    assert DEPLOY_ORDER[-1] == SIGNER
    assert DEPLOY_ORDER[: len(VERIFIERS)] == VERIFIERS and VERIFIERS
    assert all(CLOUD_RUN_NAME.match(name) for name in FUNCTIONS.values())


def test_deploy_sh_follows_the_registry_not_a_list_of_its_own(sandbox: dict[str, Path], tmp_path: Path) -> None:
    """A registry without `check`, whose public_keys partners call, deploys exactly that: nothing is hard-coded."""
    checkout = make_checkout(tmp_path / "checkout")
    with (checkout / "shared" / "endpoints.py").open("a") as module:
        module.write(textwrap.dedent('''
            import dataclasses as _dataclasses
            del ENDPOINTS["check"]
            ENDPOINTS["public_keys"] = _dataclasses.replace(ENDPOINTS["public_keys"], caller=Caller.PARTNER)
        '''))
    shutil.rmtree(checkout / "functions" / "check")
    result = run_deploy(checkout, DRY_ARGS, path=str(sandbox["path"]))
    assert result.returncode == 0, result.stderr
    expected = [entry for entry in DEPLOY_ORDER if entry != "check"]
    deploys = result.find("gcloud", "functions", "deploy")
    assert [cmd[3] for cmd in deploys] == [FUNCTIONS[entry] for entry in expected]
    with_secret = {flags(cmd)["entry-point"] for cmd in deploys if "set-secrets" in flags(cmd)}
    assert with_secret == ADMIN_ENTRIES | {"public_keys"}
    rewrites = json.loads((checkout / "build" / "firebase.json").read_text())["hosting"]["rewrites"]
    assert [rule["run"]["serviceId"] for rule in rewrites if "run" in rule] == [FUNCTIONS[e] for e in PUBLIC if e != "check"]
    assert "gbx-check" not in result.stdout


def test_without_the_registry_s_requirements_it_says_to_run_make_install(sandbox: dict[str, Path], tmp_path: Path) -> None:
    """No .venv and a python3 without pydantic (site-packages off): stop before staging or showing anything."""
    shims = tmp_path / "shims"
    shims.mkdir()
    (shims / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    (shims / "python3").chmod(0o755)
    result = run_deploy(sandbox["checkout"], DRY_ARGS, path=f"{shims}:{sandbox['path']}", python=None,
                        env={"GBX_BUILD_DIR": str(tmp_path / "b")})
    assert result.returncode == 1
    assert "cannot import shared.endpoints with python3: run make install first" in result.stderr
    assert "No module named 'pydantic'" in result.stderr
    assert result.commands == [] and not (tmp_path / "b").exists()


def test_a_missing_gbx_python_says_to_run_make_install(sandbox: dict[str, Path], tmp_path: Path) -> None:
    result = run_deploy(sandbox["checkout"], DRY_ARGS, path=str(sandbox["path"]), python=str(tmp_path / "nowhere"),
                        env={"GBX_BUILD_DIR": str(tmp_path / "b")})
    assert result.returncode == 1
    assert f"cannot import shared.endpoints with {tmp_path / 'nowhere'}: run make install first" in result.stderr
    assert result.commands == []


def test_the_checkout_s_venv_is_found_without_gbx_python(sandbox: dict[str, Path], tmp_path: Path) -> None:
    """`make install` makes .venv next to deploy.sh: used before any python3 on PATH (here one that always fails)."""
    checkout = make_checkout(tmp_path / "checkout")
    (checkout / ".venv").symlink_to(sys.prefix, target_is_directory=True)  # this test run's environment
    shims = tmp_path / "shims"
    shims.mkdir()
    (shims / "python3").write_text("#!/bin/sh\necho 'not this python' >&2\nexit 1\n")
    (shims / "python3").chmod(0o755)
    result = run_deploy(checkout, DRY_ARGS, path=f"{shims}:{sandbox['path']}", python=None)
    assert result.returncode == 0, result.stderr
    assert len(result.find("gcloud", "functions", "deploy")) == len(FUNCTIONS)
    assert "not this python" not in result.stderr


# ---------------------------------------------------------------- the dry run


def test_dry_run_succeeds_and_calls_nothing(dry: Deploy, sandbox: dict[str, Path]) -> None:
    assert not sandbox["record"].exists(), sandbox["record"].read_text()
    assert dry.commands, dry.stdout


def test_every_line_of_the_dry_run_is_a_command_a_note_or_the_summary(dry: Deploy) -> None:
    body, _, summary = dry.stdout.partition("\n\n")
    for line in body.splitlines():
        assert line.startswith(("+ ", "# ")), line
    assert "Base URL" in summary and "Function URLs" in summary


def test_apis_are_enabled_first(dry: Deploy) -> None:
    enables = dry.find("gcloud", "services", "enable")
    assert len(enables) == 1
    assert set(APIS) <= set(enables[0])
    assert f"--project={PROJECT}" in enables[0]
    assert dry.indexes("gcloud", "services", "enable")[0] == 0


def granted_to(dry: Deploy, email: str) -> set[tuple[str, str, str]]:
    """(resource kind, resource, role) of every grant the dry run shows for a service account."""
    return {
        (cmd[1], cmd[cmd.index("add-iam-policy-binding") + 1], flags(cmd)["role"])
        for cmd in dry.commands
        if "add-iam-policy-binding" in cmd and flags(cmd)["member"] == f"serviceAccount:{email}"
    }


def test_runtime_service_account_is_created_with_least_privilege(dry: Deploy) -> None:
    assert dry.find("gcloud", "iam", "service-accounts", "describe")[0][4] == SA_EMAIL
    assert dry.find("gcloud", "iam", "service-accounts", "create")[0][4] == "gbx-runtime"
    assert granted_to(dry, SA_EMAIL) == {
        ("projects", PROJECT, "roles/datastore.user"),
        ("kms", "seal", "roles/cloudkms.signerVerifier"),
        ("kms", "seal-log", "roles/cloudkms.signerVerifier"),
        ("secrets", "gbx-admin-token", "roles/secretmanager.secretAccessor"),
        ("pubsub", "gbx-events", "roles/pubsub.publisher"),
    }
    grants = [cmd for cmd in dry.commands if "add-iam-policy-binding" in cmd]
    assert {flags(cmd)["member"] for cmd in grants} == {f"serviceAccount:{SA_EMAIL}", f"serviceAccount:{BUILD_SA_EMAIL}",
                                                         f"serviceAccount:{AUDIT_SA_EMAIL}"}
    kms_grant = dry.find("gcloud", "kms", "keys", "add-iam-policy-binding")[0]
    assert flags(kms_grant)["keyring"] == "gbx" and flags(kms_grant)["location"] == REGION


def test_build_service_account_is_created_with_the_build_roles(dry: Deploy) -> None:
    assert [cmd[4] for cmd in dry.find("gcloud", "iam", "service-accounts", "describe")] == [SA_EMAIL, BUILD_SA_EMAIL, AUDIT_SA_EMAIL]
    assert [cmd[4] for cmd in dry.find("gcloud", "iam", "service-accounts", "create")] == ["gbx-runtime", "gbx-build", "gbx-audit"]
    assert granted_to(dry, BUILD_SA_EMAIL) == {("projects", PROJECT, role) for role in BUILD_ROLES}


def test_firestore_native_database_is_created(dry: Deploy) -> None:
    create = dry.find("gcloud", "firestore", "databases", "create")
    assert len(create) == 1
    options = flags(create[0])
    assert (options["database"], options["location"], options["type"], options["project"]) == (
        "(default)", REGION, "firestore-native", PROJECT)
    assert dry.indexes("gcloud", "firestore", "databases", "describe")[0] < dry.indexes("gcloud", "firestore", "databases", "create")[0]


def test_composite_indexes_come_from_firestore_indexes_json(dry: Deploy) -> None:
    document = json.loads((REPO / "firestore.indexes.json").read_text())
    expected = [
        ["--collection-group=" + index["collectionGroup"], "--query-scope=" + index["queryScope"].lower().replace("_", "-")]
        + [f"--field-config=field-path={f['fieldPath']},order={f['order'].lower()}" for f in index["fields"]]
        for index in document["indexes"]
    ]
    created = [cmd[5:] for cmd in dry.find("gcloud", "firestore", "indexes", "composite", "create")]
    assert [[arg for arg in cmd if arg not in (f"--project={PROJECT}", "--database=(default)")] for cmd in created] == expected
    assert all(f"--project={PROJECT}" in cmd and "--database=(default)" in cmd for cmd in created)


def test_firestore_indexes_json_has_only_composite_indexes() -> None:
    # Which indexes the queries need is tests/test_firestore_indexes.py's; deploy.sh handles this shape only
    # (collection indexes, and the export's collection-group ones).
    document = json.loads((REPO / "firestore.indexes.json").read_text())
    assert document["fieldOverrides"] == []
    assert document["indexes"] and {index["queryScope"] for index in document["indexes"]} == {"COLLECTION", "COLLECTION_GROUP"}


def test_firebase_json_points_at_the_rules_and_indexes() -> None:
    config = json.loads((REPO / "firebase.json").read_text())
    assert config["firestore"] == {"rules": "firestore.rules", "indexes": "firestore.indexes.json"}
    assert (REPO / config["firestore"]["rules"]).is_file()
    assert (REPO / config["firestore"]["indexes"]).is_file()


def test_rules_are_deployed_with_the_firebase_cli_last(dry: Deploy) -> None:
    assert dry.find("firebase", "deploy", "--only", "firestore:rules") == [
        ["firebase", "deploy", "--only", "firestore:rules", "--project", PROJECT, "--non-interactive"]]
    assert dry.indexes("firebase", "deploy", "--only", "firestore:rules") == [len(dry.commands) - 1], "nothing waits on the rules"


def test_seal_key_is_an_ec_p256_signing_key(dry: Deploy) -> None:
    assert dry.find("gcloud", "kms", "keyrings", "create")[0][4] == "gbx"
    (create,) = [cmd for cmd in dry.find("gcloud", "kms", "keys", "create") if cmd[4] == "seal"]
    assert flags(create)["purpose"] == "asymmetric-signing"
    assert flags(create)["default-algorithm"] == "ec-sign-p256-sha256"
    assert flags(create)["keyring"] == "gbx" and flags(create)["location"] == REGION
    (listing,) = dry.find("gcloud", "kms", "keys", "versions", "list")
    assert flags(listing)["format"] == "value(name,state)", "states, to wait for PENDING_GENERATION"
    assert flags(listing)["sort-by"] == "~createTime"
    assert "placeholder" in dry.stdout


def test_the_seal_log_has_an_ed25519_key_of_its_own(dry: Deploy) -> None:
    """EC_SIGN_ED25519 for checkpoints, never the seal key; the runtime may sign with it; every function knows its version 1."""
    (create,) = [cmd for cmd in dry.find("gcloud", "kms", "keys", "create") if cmd[4] == "seal-log"]
    assert flags(create)["default-algorithm"] == "ec-sign-ed25519" and flags(create)["purpose"] == "asymmetric-signing"
    assert flags(create)["keyring"] == "gbx" and flags(create)["location"] == REGION
    version = f"projects/{PROJECT}/locations/{REGION}/keyRings/gbx/cryptoKeys/seal-log/cryptoKeyVersions/1"
    for cmd in dry.find("gcloud", "functions", "deploy"):
        assert env_vars(flags(cmd)["set-env-vars"])["GBX_LOG_KEY_VERSION"] == version
    # run_complete integrates after its answer: its service keeps CPU between requests.
    (update,) = [cmd for cmd in dry.find("gcloud", "run", "services", "update", FUNCTIONS["run_complete"]) if "--no-invoker-iam-check" in cmd]
    assert "--no-cpu-throttling" in update
    assert not [cmd for cmd in dry.commands if "--no-cpu-throttling" in cmd and cmd[4] != FUNCTIONS["run_complete"]]


def test_admin_token_secret_is_generated_without_ever_showing_it(dry: Deploy) -> None:
    lines = [line for line in dry.stdout.splitlines() if "gcloud secrets versions add" in line]
    assert lines == [
        "+ openssl rand -hex 32 | tr -d '\\n' | gcloud secrets versions add gbx-admin-token --data-file=- --project=gbx-demo"
    ]
    assert dry.find("gcloud", "secrets", "create")[0][:4] == ["gcloud", "secrets", "create", "gbx-admin-token"]
    assert "gcloud secrets versions access latest --secret=gbx-admin-token" in dry.stdout
    assert not HEX_TOKEN.search(dry.stdout + dry.stderr)
    assert "GBX_ADMIN_TOKEN=" not in "".join(arg for cmd in dry.commands for arg in cmd if "set-env-vars" in arg)


def test_every_registry_function_is_deployed_as_a_gen2_function(dry: Deploy) -> None:
    deploys = dry.find("gcloud", "functions", "deploy")
    assert [cmd[3] for cmd in deploys] == [FUNCTIONS[entry] for entry in DEPLOY_ORDER]
    for entry, cmd in zip(DEPLOY_ORDER, deploys, strict=True):
        name = FUNCTIONS[entry]
        assert CLOUD_RUN_NAME.match(name), name
        options = flags(cmd)
        assert {"gen2", "trigger-http"} <= options.keys(), cmd
        assert options["runtime"] == "python312"
        assert options["entry-point"] == entry
        assert options["source"] == f"build/functions/{entry}"
        assert options["region"] == REGION
        assert options["project"] == PROJECT
        assert options["service-account"] == SA_EMAIL
        assert options["build-service-account"] == f"projects/{PROJECT}/serviceAccounts/{BUILD_SA_EMAIL}"
        env = env_vars(options["set-env-vars"])
        version = env["GBX_KMS_KEY_VERSION"]
        assert re.fullmatch(rf"{KEY}/cryptoKeyVersions/\d+", version)
        assert env["GOOGLE_CLOUD_PROJECT"] == PROJECT
        assert env["GBX_ISSUER"] == PROJECT
        assert env["GBX_PUBLIC_URL"] == f"https://{PROJECT}.web.app"  # where seals' verification links point
        assert version in env["GBX_TRUSTED_KEY_VERSIONS"].split(",")
        assert env["GBX_OPERATORS"] == "ops@example.com,b@x.y"
        assert "GBX_ADMIN_TOKEN" not in env
        if entry in ADMIN_ENTRIES:
            assert options["set-secrets"] == "GBX_ADMIN_TOKEN=gbx-admin-token:latest"
        else:
            assert not any("secret" in arg for arg in cmd), cmd
    assert {"issue", "revoke", "entitlement_usage", "export"} == ADMIN_ENTRIES


def test_functions_serve_concurrent_requests_on_a_whole_cpu(dry: Deploy) -> None:
    """gen2 concurrency needs at least one CPU (and --cpu needs --memory); THREADS lets the framework serve that many."""
    for cmd in dry.find("gcloud", "functions", "deploy"):
        options = flags(cmd)
        assert {key: options[key] for key in CONCURRENCY} == CONCURRENCY
        assert env_vars(options["set-env-vars"])["THREADS"] == CONCURRENCY["concurrency"]
    assert not [cmd for cmd in dry.commands if "--cpu-boost" in cmd or "--no-cpu-boost" in cmd], "left as Cloud Run has it"


@pytest.mark.parametrize(("knobs", "deploy_flags", "update_flag"), [
    ({"GBX_CONCURRENCY": "8", "GBX_MIN_INSTANCES": "2", "GBX_CPU_BOOST": "1"},
     {"concurrency": "8", "cpu": "1", "memory": "512Mi", "min-instances": "2"}, "--cpu-boost"),
    ({"GBX_CONCURRENCY": "1000", "GBX_CPU_BOOST": "0"},
     {"concurrency": "1000", "cpu": "1", "memory": "512Mi", "min-instances": "0"}, "--no-cpu-boost"),
])
def test_operator_knobs(sandbox: dict[str, Path], tmp_path: Path, knobs: dict[str, str], deploy_flags: dict[str, str],
                        update_flag: str) -> None:
    result = run_deploy(sandbox["checkout"], DRY_ARGS, path=str(sandbox["path"]), env={"GBX_BUILD_DIR": str(tmp_path / "b"), **knobs})
    assert result.returncode == 0, result.stderr
    deploys = result.find("gcloud", "functions", "deploy")
    assert len(deploys) == len(FUNCTIONS)
    for cmd in deploys:
        options = flags(cmd)
        assert {key: options[key] for key in deploy_flags} == deploy_flags
        assert env_vars(options["set-env-vars"])["THREADS"] == deploy_flags["concurrency"]
    # Startup CPU boost is a Cloud Run setting: set right after each deploy, with the invoker setting.
    invoker_updates = [cmd for cmd in result.commands if "--no-invoker-iam-check" in cmd or "--invoker-iam-check" in cmd]
    assert len(invoker_updates) == len(FUNCTIONS) and all(cmd[-1] == update_flag for cmd in invoker_updates)


@pytest.mark.parametrize(("name", "value"), [
    ("GBX_CONCURRENCY", "0"), ("GBX_CONCURRENCY", "1001"), ("GBX_CONCURRENCY", "08"), ("GBX_CONCURRENCY", "many"),
    ("GBX_MIN_INSTANCES", "-1"), ("GBX_MIN_INSTANCES", "1.5"), ("GBX_CPU_BOOST", "yes"),
])
def test_bad_knobs_exit_2_before_doing_anything(sandbox: dict[str, Path], tmp_path: Path, name: str, value: str) -> None:
    result = run_deploy(sandbox["checkout"], DRY_ARGS, path=str(sandbox["path"]), env={"GBX_BUILD_DIR": str(tmp_path / "b"), name: value})
    assert result.returncode == 2
    assert f"deploy.sh: {name} must be" in result.stderr
    assert result.stdout == "" and not (tmp_path / "b").exists()


def test_nothing_binds_all_users(dry: Deploy) -> None:
    """The domain-restricted-sharing org policy forbids allUsers; the invoker IAM check is switched off instead."""
    assert not [cmd for cmd in dry.commands if "--allow-unauthenticated" in cmd]
    assert "allUsers" not in dry.stdout


def test_each_function_skips_the_invoker_iam_check_right_after_its_deploy(dry: Deploy) -> None:
    deploys = dry.indexes("gcloud", "functions", "deploy")
    for entry, position in zip(DEPLOY_ORDER, deploys, strict=True):
        following = dry.commands[position + 1]
        check = "--invoker-iam-check" if entry in INTERNAL else "--no-invoker-iam-check"
        throttling = ["--no-cpu-throttling"] if entry == "run_complete" else []
        assert following == ["gcloud", "run", "services", "update", FUNCTIONS[entry], f"--region={REGION}",
                             f"--project={PROJECT}", check, *throttling]
    assert len([cmd for cmd in dry.commands if "--no-invoker-iam-check" in cmd]) == len(PUBLIC)


def test_only_the_audit_account_may_invoke_the_internal_functions(dry: Deploy) -> None:
    """Cloud Run's IAM check stays on for the audit, the log's catch-up and the events sweeper, whose one invoker is gbx-audit; Hosting has no rewrite to them."""
    assert {"ledger_audit", "log_integrate", "events_sweep"} == INTERNAL
    for entry in INTERNAL:
        position = dry.indexes("gcloud", "functions", "deploy", FUNCTIONS[entry])[0]
        assert "--invoker-iam-check" in dry.commands[position + 1]
        assert dry.commands[position + 2] == [
            "gcloud", "run", "services", "add-iam-policy-binding", FUNCTIONS[entry], f"--region={REGION}", f"--project={PROJECT}",
            f"--member=serviceAccount:{AUDIT_SA_EMAIL}", "--role=roles/run.invoker", "--format=none"]
        assert flags(dry.commands[position])["timeout"] == f"{ENDPOINTS[entry].timeout}s" == {"ledger_audit": "1800s", "log_integrate": "60s", "events_sweep": "120s"}[entry]
    assert granted_to(dry, AUDIT_SA_EMAIL) == {("run", FUNCTIONS[entry], "roles/run.invoker") for entry in INTERNAL}
    assert all(flags(cmd)["timeout"] == "60s" for cmd in dry.find("gcloud", "functions", "deploy") if flags(cmd)["entry-point"] in PUBLIC)
    assert all(env_vars(flags(cmd)["set-env-vars"])["GBX_AUDITORS"] == AUDIT_SA_EMAIL for cmd in dry.find("gcloud", "functions", "deploy"))


def test_verifiers_are_deployed_before_the_signer(dry: Deploy) -> None:
    """After a rotation the new key version is trusted everywhere before run_complete signs with it."""
    order = [cmd[3] for cmd in dry.find("gcloud", "functions", "deploy")]
    assert order[-1] == FUNCTIONS[SIGNER] == "gbx-run-complete"
    assert set(order[:len(VERIFIERS)]) == {FUNCTIONS[entry] for entry in VERIFIERS}


def test_everything_a_function_needs_exists_before_it_is_deployed(dry: Deploy) -> None:
    first_deploy = dry.indexes("gcloud", "functions", "deploy")[0]
    for prefix in [("gcloud", "services", "enable"), ("gcloud", "iam", "service-accounts", "create"),
                   ("gcloud", "projects", "add-iam-policy-binding"), ("gcloud", "projects", "describe"),
                   ("gcloud", "firestore", "databases", "create"),
                   ("gcloud", "secrets", "versions", "list"), ("gcloud", "secrets", "add-iam-policy-binding"),
                   ("gcloud", "kms", "keys", "create"), ("gcloud", "kms", "keys", "add-iam-policy-binding"),
                   ("gcloud", "kms", "keys", "versions", "list")]:
        positions = dry.indexes(*prefix)
        assert positions and max(positions) < first_deploy, prefix
    stdout = dry.stdout
    assert stdout.index("gcloud secrets versions add") < stdout.index("gcloud functions deploy")


def test_audiences_are_known_before_the_first_deploy(dry: Deploy) -> None:
    """Every deploy carries the base URLs and both deterministic URLs of every function, with and without a trailing slash."""
    (describe,) = dry.find("gcloud", "projects", "describe")
    assert describe == ["gcloud", "projects", "describe", PROJECT, "--format=value(projectNumber)"]
    assert dry.indexes("gcloud", "projects", "describe")[0] < dry.indexes("gcloud", "functions", "deploy")[0]
    expected = base_urls() + [url for entry in DEPLOY_ORDER for url in deterministic_urls(FUNCTIONS[entry], "PROJECT_NUMBER")]
    for cmd in dry.find("gcloud", "functions", "deploy"):
        assert audiences(env_vars(flags(cmd)["set-env-vars"])["GBX_AUDIENCES"]) == expected
    assert f"https://gbx-issue-PROJECT_NUMBER.{REGION}.run.app/" in expected
    assert f"https://{REGION}-{PROJECT}.cloudfunctions.net/gbx-issue" in expected


def test_one_token_for_the_base_url_is_accepted_by_every_function(dry: Deploy) -> None:
    """Hosting answers at SITE.web.app and SITE.firebaseapp.com; `aud` is compared exactly, so both forms of each."""
    for cmd in [*dry.find("gcloud", "functions", "deploy"), *dry.find("gcloud", "run", "services", "update")]:
        options = flags(cmd)
        if "no-invoker-iam-check" in options or "invoker-iam-check" in options:
            continue
        env = env_vars(options.get("set-env-vars") or options["update-env-vars"])
        assert audiences(env["GBX_AUDIENCES"])[:4] == [
            "https://gbx-demo.web.app", "https://gbx-demo.web.app/",
            "https://gbx-demo.firebaseapp.com", "https://gbx-demo.firebaseapp.com/"]


def test_service_uris_not_known_before_are_added_after_all_deploys(dry: Deploy) -> None:
    last_deploy = dry.indexes("gcloud", "functions", "deploy")[-1]
    updates = [i for i in dry.indexes("gcloud", "run", "services", "update")
               if "--no-invoker-iam-check" not in dry.commands[i] and "--invoker-iam-check" not in dry.commands[i]]
    assert len(updates) == len(FUNCTIONS)
    assert min(updates) > last_deploy
    placeholders = {name: f"https://{name}-PLACEHOLDER.{REGION}.run.app" for name in FUNCTIONS.values()}
    expected = base_urls() + [url for entry in DEPLOY_ORDER
                              for url in [*deterministic_urls(FUNCTIONS[entry], "PROJECT_NUMBER"),
                                          placeholders[FUNCTIONS[entry]], placeholders[FUNCTIONS[entry]] + "/"]]
    for entry, position in zip(DEPLOY_ORDER, updates, strict=True):
        cmd = dry.commands[position]
        assert cmd[4] == FUNCTIONS[entry]
        options = flags(cmd)
        assert options["region"] == REGION and options["project"] == PROJECT
        assert env_vars(options["update-env-vars"]).keys() == {"GBX_AUDIENCES"}
        assert audiences(env_vars(options["update-env-vars"])["GBX_AUDIENCES"]) == expected
    described = dry.find("gcloud", "functions", "describe")
    assert len(described) == 2 * len(FUNCTIONS), "once before the deploys, once after"
    assert all(flags(cmd)["format"] == "value(serviceConfig.uri)" for cmd in described)
    for url in placeholders.values():
        assert url in dry.summary  # the closing summary lists the URLs


def test_staging_ships_main_requirements_and_shared_only(dry: Deploy, sandbox: dict[str, Path]) -> None:
    checkout = sandbox["checkout"]
    for entry in FUNCTIONS:
        staged = checkout / "build" / "functions" / entry
        assert (staged / "main.py").read_text() == f"# stub for {entry}\n"
        assert (staged / "requirements.txt").read_bytes() == (checkout / "requirements.txt").read_bytes()
        assert (staged / "shared" / "__init__.py").is_file()
        assert not (staged / "shared" / "local.py").exists()
        assert not (staged / "shared" / "emulator.py").exists()
        assert not list(staged.rglob("__pycache__")) and not list(staged.rglob("*.pyc"))
        assert f"staged functions/{entry}/main.py" in dry.stdout


def test_build_dir_can_be_moved(sandbox: dict[str, Path], tmp_path: Path) -> None:
    result = run_deploy(sandbox["checkout"], DRY_ARGS, path=str(sandbox["path"]),
                        env={"GBX_BUILD_DIR": "elsewhere"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for entry, cmd in zip(DEPLOY_ORDER, result.find("gcloud", "functions", "deploy"), strict=True):
        assert flags(cmd)["source"] == f"{tmp_path}/elsewhere/functions/{entry}"
        assert (tmp_path / "elsewhere" / "functions" / entry / "main.py").is_file()
    (hosting,) = result.find("firebase", "deploy", "--only", "hosting")
    assert hosting[hosting.index("--config") + 1] == f"{tmp_path}/elsewhere/firebase.json"
    assert (tmp_path / "elsewhere" / "hosting" / "index.html").is_file()


@pytest.mark.parametrize("args", [
    [],
    ["--project", PROJECT],
    ["--region", REGION, "--dry-run"],
    ["--project", PROJECT, "--region"],
    ["--project", PROJECT, "--region", REGION, "--dry-run", "--force"],
    ["--project", PROJECT, "--region", REGION, "extra"],
    ["--project", "Bad_Project", "--region", REGION, "--dry-run"],
    ["--project", PROJECT, "--region", "europe west1", "--dry-run"],
    # Project IDs: up to 30 of [a-z0-9-], a letter first, no hyphen last, no domain scope.
    ["--project", "example.com:gbx-demo", "--region", REGION, "--dry-run"],
    ["--project", "gbx.demo", "--region", REGION, "--dry-run"],
    ["--project", "g" * 31, "--region", REGION, "--dry-run"],
    ["--project", "gbx-demo-", "--region", REGION, "--dry-run"],
    ["--project", "1gbx-demo", "--region", REGION, "--dry-run"],
    ["--project=GBX-demo", "--region", REGION, "--dry-run"],
    # Hosting site IDs: one DNS label of [a-z0-9-].
    ["--project", PROJECT, "--region", REGION, "--dry-run", "--site"],
    ["--project", PROJECT, "--region", REGION, "--dry-run", "--site", "Gbx-Site"],
    ["--project", PROJECT, "--region", REGION, "--dry-run", "--site=gbx-site-"],
    ["--project", PROJECT, "--region", REGION, "--dry-run", "--site", "gbx.example.com"],
    ["--project", PROJECT, "--region", REGION, "--dry-run", "--site", "g" * 64],
])
def test_bad_usage_exits_2_before_doing_anything(sandbox: dict[str, Path], tmp_path: Path, args: list[str]) -> None:
    result = run_deploy(sandbox["checkout"], args, path=str(sandbox["path"]), env={"GBX_BUILD_DIR": str(tmp_path / "b")})
    assert result.returncode == 2
    assert USAGE in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("project", ["gbx-d1", "g" * 30, "my-project-2024"])
def test_project_ids_at_the_limits_are_accepted(sandbox: dict[str, Path], tmp_path: Path, project: str) -> None:
    result = run_deploy(sandbox["checkout"], ["--project", project, "--region", REGION, "--dry-run"],
                        path=str(sandbox["path"]), env={"GBX_BUILD_DIR": str(tmp_path / "b")})
    assert result.returncode == 0, result.stderr
    assert result.find("gcloud", "iam", "service-accounts", "describe")[0][4] == f"gbx-runtime@{project}.iam.gserviceaccount.com"


def test_a_missing_function_stops_the_deployment(sandbox: dict[str, Path], tmp_path: Path) -> None:
    checkout = make_checkout(tmp_path / "checkout")
    (checkout / "functions" / "run_complete" / "main.py").unlink()
    result = run_deploy(checkout, DRY_ARGS, path=str(sandbox["path"]))
    assert result.returncode == 1
    assert "functions/run_complete/main.py is missing" in result.stderr
    assert result.commands == []


def test_a_missing_portal_stops_the_deployment(sandbox: dict[str, Path], tmp_path: Path) -> None:
    checkout = make_checkout(tmp_path / "checkout")
    (checkout / "portal" / "index.html").unlink()
    result = run_deploy(checkout, DRY_ARGS, path=str(sandbox["path"]))
    assert result.returncode == 1
    assert "portal/index.html is missing" in result.stderr
    assert result.commands == []


def test_the_script_is_strict_and_executable() -> None:
    script = REPO / "deploy.sh"
    assert os.access(script, os.X_OK)
    assert "set -euo pipefail" in script.read_text()
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0


# ---------------------------------------------------------------- the front door: Firebase Hosting


def test_hosting_is_deployed_after_the_functions_and_before_the_rules(dry: Deploy) -> None:
    firebase = [cmd for cmd in dry.commands if cmd[0] == "firebase"]
    assert firebase == [
        ["firebase", "hosting:sites:get", PROJECT, "--project", PROJECT, "--non-interactive"],
        ["firebase", "hosting:sites:create", PROJECT, "--project", PROJECT, "--non-interactive"],
        ["firebase", "deploy", "--only", "hosting", "--config", "build/firebase.json", "--project", PROJECT, "--non-interactive"],
        ["firebase", "deploy", "--only", "firestore:rules", "--project", PROJECT, "--non-interactive"],
    ], "a dry run finds no site, so it shows the create a first deployment runs"
    first_firebase = dry.commands.index(firebase[0])
    assert all(cmd[0] == "firebase" for cmd in dry.commands[first_firebase:])
    assert max(dry.indexes("gcloud", "run", "services", "update")) < first_firebase, "the rewrites name existing services"


def test_the_dry_run_prints_the_base_url(dry: Deploy) -> None:
    assert "Base URL (a dry run deploys nothing): https://gbx-demo.web.app\n" in dry.summary
    assert "gbx run --url https://gbx-demo.web.app" in dry.summary
    assert "https://gbx-demo.firebaseapp.com" in dry.summary
    assert dry.summary.index("Base URL") < dry.summary.index("Function URLs")


def test_the_effective_hosting_config_rewrites_every_path_to_its_function(dry: Deploy, sandbox: dict[str, Path]) -> None:
    """build/firebase.json: the tracked config, with the site and the registry's rewrites for --region."""
    build = sandbox["checkout"] / "build"
    config = json.loads((build / "firebase.json").read_text())
    hosting = config["hosting"]
    assert hosting["rewrites"] == effective_rewrites(REGION)
    functions = [rule for rule in hosting["rewrites"] if "run" in rule]
    assert [rule["source"] for rule in functions] == [route_glob(endpoint) for endpoint in ENDPOINTS.values() if not endpoint.internal]
    assert "/log/**" in [rule["source"] for rule in functions], "the seal log's checkpoint and tiles"
    for rule in functions:
        (endpoint,) = [e for e in ENDPOINTS.values() if route_glob(e) == rule["source"]]
        assert rule["run"] == {"serviceId": endpoint.function_name, "region": REGION}
        assert rule["run"]["serviceId"] in [cmd[3] for cmd in dry.find("gcloud", "functions", "deploy")]
    assert len({rule["source"] for rule in hosting["rewrites"]}) == len(PUBLIC) + len(TRACKED_REWRITES)
    assert hosting["site"] == PROJECT
    tracked = json.loads((sandbox["checkout"] / "firebase.json").read_text())
    assert {key: value for key, value in hosting.items() if key not in {"site", "public", "rewrites"}} == {
        key: value for key, value in tracked["hosting"].items() if key not in {"public", "rewrites"}}, "headers and ignore as tracked"


def test_the_effective_hosting_config_resolves_from_its_own_folder(dry: Deploy, sandbox: dict[str, Path]) -> None:
    """Firebase resolves `public` (and the rules and indexes) from the config's folder and refuses paths outside it."""
    checkout = sandbox["checkout"]
    build = checkout / "build"
    config = json.loads((build / "firebase.json").read_text())
    public = (build / config["hosting"]["public"]).resolve()
    assert public.is_relative_to(build.resolve()) and public.is_dir()
    staged = tree(public)
    wheel = staged.pop(f"gbx/{WHEEL_NAME}")
    sums = staged.pop("gbx/SHA256SUMS").decode()
    assert sums == f"{hashlib.sha256(wheel).hexdigest()}  {WHEEL_NAME}\n"
    assert f'href="{WHEEL_NAME}#sha256={hashlib.sha256(wheel).hexdigest()}"' in staged.pop("gbx/index.html").decode()
    assert staged == {**tree(checkout / "portal"), "openapi.json": (checkout / "openapi.json").read_bytes()}
    for key, tracked in json.loads((checkout / "firebase.json").read_text())["firestore"].items():
        copied = (build / config["firestore"][key]).resolve()
        assert copied.is_relative_to(build.resolve())
        assert copied.read_bytes() == (checkout / tracked).read_bytes()
    assert "staged Hosting: build/firebase.json, public folder build/hosting (portal/ + openapi.json + gbx/)" in dry.stdout


def test_extra_audiences_are_accepted_beside_the_base_urls(sandbox: dict[str, Path], tmp_path: Path) -> None:
    """GBX_EXTRA_AUDIENCES: custom Hosting domains, each without and with a trailing slash, after the site's own."""
    extra = " https://gbx.acme.example, https://runs.acme.example:8443/ "
    result = run_deploy(sandbox["checkout"], DRY_ARGS, path=str(sandbox["path"]), env={"GBX_BUILD_DIR": str(tmp_path / "b"), "GBX_EXTRA_AUDIENCES": extra})
    assert result.returncode == 0, result.stderr
    custom = ["https://gbx.acme.example", "https://gbx.acme.example/", "https://runs.acme.example:8443", "https://runs.acme.example:8443/"]
    for cmd in result.find("gcloud", "functions", "deploy"):
        urls = audiences(env_vars(flags(cmd)["set-env-vars"])["GBX_AUDIENCES"])
        assert urls[:8] == base_urls() + custom
        assert urls[8:] == [url for entry in DEPLOY_ORDER for url in deterministic_urls(FUNCTIONS[entry], "PROJECT_NUMBER")]


@pytest.mark.parametrize("extra", ["http://gbx.acme.example", "https://gbx.acme.example/path", "https://a.example;GBX_OPERATORS=x", "gbx.acme.example"])
def test_extra_audiences_must_be_https_origins(sandbox: dict[str, Path], tmp_path: Path, extra: str) -> None:
    result = run_deploy(sandbox["checkout"], DRY_ARGS, path=str(sandbox["path"]), env={"GBX_BUILD_DIR": str(tmp_path / "b"), "GBX_EXTRA_AUDIENCES": extra})
    assert result.returncode == 2 and "GBX_EXTRA_AUDIENCES: not an https:// origin" in result.stderr
    assert not result.commands


def test_site_and_region_shape_the_base_url_the_audiences_and_the_rewrites(sandbox: dict[str, Path], tmp_path: Path) -> None:
    """--site for a project whose default Hosting site has another ID; the rewrites follow --region."""
    build = tmp_path / "b"
    result = run_deploy(sandbox["checkout"], ["--project", PROJECT, "--region", "us-central1", "--site=gbx-demo-7f3a", "--dry-run"],
                        path=str(sandbox["path"]), env={"GBX_BUILD_DIR": str(build)})
    assert result.returncode == 0, result.stderr
    config = json.loads((build / "firebase.json").read_text())
    assert config["hosting"]["site"] == "gbx-demo-7f3a"
    assert config["hosting"]["rewrites"] == effective_rewrites("us-central1")
    for cmd in result.find("gcloud", "functions", "deploy"):
        urls = audiences(env_vars(flags(cmd)["set-env-vars"])["GBX_AUDIENCES"])
        assert urls[:4] == base_urls("gbx-demo-7f3a")
        assert not [url for url in urls if f"//{PROJECT}.web.app" in url or f"//{PROJECT}.firebaseapp.com" in url]
    assert [cmd[2] for cmd in result.commands if cmd[:2] in (["firebase", "hosting:sites:get"], ["firebase", "hosting:sites:create"])] == [
        "gbx-demo-7f3a", "gbx-demo-7f3a"]
    assert "Base URL (a dry run deploys nothing): https://gbx-demo-7f3a.web.app\n" in result.summary


# ---------------------------------------------------------------- a real run, against a fake gcloud and firebase

# The fake gcloud and firebase are this one bash script, under both names. It hands its name, working directory,
# arguments and (for --data-file=-) standard input to the test's FakeCloud over TCP and relays the answer: "o" lines
# to stdout, "e" lines to stderr, "x" the exit code. One Python process answers every call, instead of a Python
# interpreter started per call.
FAKE_CLI = r'''#!/bin/bash
export LC_ALL=C
exec 3<>/dev/tcp/127.0.0.1/@PORT@ || exit 99
stdin=""
for arg; do
  if [[ $arg == --data-file=- ]]; then stdin=$(cat; printf x); stdin=${stdin%x}; fi
done
printf '%s\0' "${0##*/}" "$PWD" "$#" "$@" "${#stdin}" >&3
printf '%s' "$stdin" >&3
while IFS= read -r -t 60 line <&3; do
  case $line in
    o*) printf '%s\n' "${line#o}" ;;
    e*) printf '%s\n' "${line#e}" >&2 ;;
    x*) exit "${line#x}" ;;
  esac
done
echo "fake ${0##*/}: no answer" >&2
exit 98
'''


class Answer(Exception):
    """What a fake command answers: stdout, exit code, stderr."""

    def __init__(self, out: str = "", code: int = 0, err: str = "") -> None:
        super().__init__(out, code, err)
        self.out, self.code, self.err = out, code, err


def missing() -> Answer:
    return Answer(code=1, err="ERROR: NOT_FOUND\n")


def parse_env(value: str) -> dict[str, str]:
    if value.startswith("^"):
        delim, value = value[1:].split("^", 1)
    else:
        delim = ","
    return dict(item.split("=", 1) for item in value.split(delim))


def fresh_project() -> dict:
    """A new project: nothing enabled, created or deployed; Firebase added, but no Hosting site yet."""
    return {
        "calls": [], "apis": [], "service_accounts": [], "bindings": [], "database": None, "indexes": [],
        "database_protection": None, "backup_schedules": {}, "scheduler_jobs": {}, "metrics": {}, "channels": {}, "policies": {},
        "topics": [], "subscriptions": {}, "ttls": [],
        "secrets": {}, "keyrings": [], "key_versions": {}, "generation_polls": 0, "functions": {}, "log_keys": [],
        "project_number": PROJECT_NUMBER,
        "firebase_added": True, "taken_sites": [], "sites": [], "firebase_calls": [], "hosting": {}, "rules": None,
    }


def gcloud(state: dict, argv: list[str], stdin: str, cwd: Path = REPO) -> Answer:
    """A stateful stand-in for gcloud: just enough of each command deploy.sh uses."""
    state["calls"].append(argv)
    words = [a for a in argv if not a.startswith("-")]
    opts = dict(a[2:].split("=", 1) if "=" in a else (a[2:], "") for a in argv if a.startswith("--"))

    def grant(kind: str, name: str) -> Answer:
        binding = [kind, name, opts["member"], opts["role"]]
        if binding not in state["bindings"]:
            state["bindings"].append(binding)
        return Answer()

    project = opts.get("project")
    match words[:3]:
        case ["services", "enable", *_]:
            state["apis"] = sorted(set(state["apis"]) | set(words[2:]))
            return Answer()
        case ["iam", "service-accounts", "describe"]:
            return Answer(words[3] + "\n") if words[3] in state["service_accounts"] else missing()
        case ["iam", "service-accounts", "create"]:
            state["service_accounts"].append(f"{words[3]}@{project}.iam.gserviceaccount.com")
            return Answer()
        case ["projects", "add-iam-policy-binding", name]:
            return grant("project", name)
        case ["projects", "describe", name]:
            return Answer(state["project_number"] + "\n")
        case ["iam", "service-accounts", "add-iam-policy-binding"]:
            return grant("service_account", words[3])
        case ["pubsub", "topics", "describe"]:
            return Answer(f"projects/{project}/topics/{words[3]}\n") if words[3] in state["topics"] else missing()
        case ["pubsub", "topics", "create"]:
            state["topics"].append(words[3])
            return Answer()
        case ["pubsub", "topics", "add-iam-policy-binding"]:
            return grant("topic", words[3])
        case ["pubsub", "subscriptions", "describe"]:
            return Answer(f"projects/{project}/subscriptions/{words[3]}\n") if words[3] in state["subscriptions"] else missing()
        case ["pubsub", "subscriptions", "create"] if opts.get("topic") in state["topics"]:
            state["subscriptions"][words[3]] = {key: value for key, value in opts.items() if key != "project"}
            return Answer()
        case ["pubsub", "subscriptions", "modify-push-config"] if words[3] in state["subscriptions"]:
            state["subscriptions"][words[3]].update({key: value for key, value in opts.items() if key != "project"})
            return Answer()
        case ["pubsub", "subscriptions", "add-iam-policy-binding"]:
            return grant("subscription", words[3])
        case ["firestore", "fields", "ttls"] if words[3] == "update" and state["database"] and "enable-ttl" in opts:
            state["ttls"] = sorted({*state["ttls"], f"{opts['collection-group']}.{words[4]}"})
            return Answer()
        case ["firestore", "databases", "describe"]:
            return Answer("FIRESTORE_NATIVE\n") if state["database"] else missing()
        case ["firestore", "databases", "create"]:
            state["database"] = opts["location"]
            return Answer()
        case ["firestore", "databases", "update"] if state["database"]:
            state["database_protection"] = {"pitr": "enable-pitr" in opts, "delete_protection": "delete-protection" in opts}
            return Answer()
        case ["firestore", "backups", "schedules"]:
            schedules = state["backup_schedules"]
            days = int(opts.get("retention", "0d").removesuffix("d"))
            if words[3] == "list":  # value(name.basename(),retention,weeklyRecurrence.day): daily schedules have no day
                return Answer("".join(f"{sid}\t{spec['retention']}\t{spec['day']}\n" for sid, spec in schedules.items()))
            if words[3] == "create":
                schedules[f"schedule-{len(schedules) + 1}"] = {"retention": f"{days * 86400}s", "day": opts.get("day-of-week", "")}
                return Answer()
            if words[3] == "update" and opts["backup-schedule"] in schedules:
                schedules[opts["backup-schedule"]]["retention"] = f"{days * 86400}s"
                return Answer()
        case ["run", "services", "add-iam-policy-binding"]:
            return grant("run_service", words[3])
        case ["scheduler", "jobs", "describe"]:
            return Answer(f"projects/{project}/locations/{opts['location']}/jobs/{words[3]}\n") if words[3] in state["scheduler_jobs"] else missing()
        case ["scheduler", "jobs", verb] if verb in ("create", "update") and words[3] == "http":
            if (verb == "create") == (words[4] in state["scheduler_jobs"]):
                return Answer(code=1, err=f"ERROR: {'ALREADY_EXISTS' if verb == 'create' else 'NOT_FOUND'}\n")
            state["scheduler_jobs"][words[4]] = {key: value for key, value in opts.items() if key != "project"}
            return Answer()
        case ["logging", "metrics", verb]:
            if verb == "describe":
                return Answer(words[3] + "\n") if words[3] in state["metrics"] else missing()
            state["metrics"][words[3]] = {"filter": opts["log-filter"], "description": opts["description"]}
            return Answer()
        case ["beta", "monitoring", "channels"]:
            if words[3] == "list":
                wanted = re.search(r'labels.email_address="([^"]+)"', opts["filter"])
                return Answer("".join(f"{name}\n" for name, email in state["channels"].items() if wanted and email == wanted[1]))
            name = f"projects/{project}/notificationChannels/{len(state['channels']) + 1001}"
            state["channels"][name] = opts["channel-labels"].removeprefix("email_address=")
            return Answer(name + "\n")
        case ["alpha", "monitoring", "policies"]:
            policies = state["policies"]
            if words[3] == "list":
                wanted = re.search(r'displayName="([^"]+)"', opts["filter"])
                return Answer("".join(f"{name}\n" for name, policy in policies.items() if wanted and policy["displayName"] == wanted[1]))
            policy = json.loads((cwd / opts["policy-from-file"]).read_text())
            name = words[4] if words[3] == "update" else f"projects/{project}/alertPolicies/{len(policies) + 1}"
            policies[name] = policy
            return Answer()
        case ["firestore", "indexes", "composite"]:
            index = [opts["collection-group"]] + [a for a in argv if a.startswith("--field-config=")]
            if index in state["indexes"]:
                return Answer(code=1, err="ERROR: (gcloud.firestore.indexes.composite.create) ALREADY_EXISTS: index already exists\n")
            state["indexes"].append(index)
            return Answer()
        case ["secrets", "describe", name]:
            return Answer(name + "\n") if name in state["secrets"] else missing()
        case ["secrets", "create", name]:
            state["secrets"][name] = []
            return Answer()
        case ["secrets", "versions", "list"]:
            return Answer("".join(f"{i + 1}\n" for i, _ in enumerate(state["secrets"][words[3]])))
        case ["secrets", "versions", "add"]:
            state["secrets"][words[3]].append(stdin)
            return Answer()
        case ["secrets", "add-iam-policy-binding", name]:
            return grant("secret", name)
        case ["kms", "keyrings", "describe"]:
            return Answer(words[3] + "\n") if words[3] in state["keyrings"] else missing()
        case ["kms", "keyrings", "create"]:
            state["keyrings"].append(words[3])
            return Answer()
        case ["kms", "keys", "describe", *_] if words[3] == "seal-log":
            return Answer("EC_SIGN_ED25519\n") if "seal-log" in state["log_keys"] else missing()
        case ["kms", "keys", "create", *_] if words[3] == "seal-log":
            state["log_keys"].append("seal-log")
            return Answer()
        case ["kms", "keys", "describe"]:
            return Answer("EC_SIGN_P256_SHA256\n") if state["key_versions"] else missing()
        case ["kms", "keys", "create"]:
            # A new asymmetric key's first version is generated while the caller waits: one listing.
            state["key_versions"] = {"1": "PENDING_GENERATION"}
            state["generation_polls"] = 1
            return Answer()
        case ["kms", "keys", "add-iam-policy-binding"]:
            return grant("kms_key", words[3])
        case ["kms", "keys", "versions"]:
            key = f"projects/{project}/locations/{opts['location']}/keyRings/{opts['keyring']}/cryptoKeys/{opts['key']}"
            newest_first = sorted(state["key_versions"].items(), key=lambda item: -int(item[0]))
            listing = "".join(f"{key}/cryptoKeyVersions/{v}\t{s}\n" for v, s in newest_first)
            state["generation_polls"] -= 1
            if state["generation_polls"] <= 0:
                state["key_versions"] = {v: "ENABLED" if s == "PENDING_GENERATION" else s for v, s in newest_first}
            return Answer(listing)
        case ["functions", "describe", name]:
            return Answer(state["functions"][name]["uri"] + "\n") if name in state["functions"] else missing()
        case ["functions", "deploy", name]:
            if "cpu" in opts and "memory" not in opts:
                return Answer(code=2, err="ERROR: (gcloud.functions.deploy) argument --memory: Must be specified.\n")
            if int(opts.get("concurrency", "1")) > 1 and float(opts.get("cpu", "0")) < 1:
                return Answer(code=1, err="ERROR: concurrency > 1 requires at least 1 CPU\n")
            state["functions"][name] = {
                "uri": f"https://{name}-x7y8z9-ew.a.run.app",
                "region": opts["region"],
                "env": parse_env(opts["set-env-vars"]),
                "secrets": opts.get("set-secrets"),
                "source": opts["source"],
                "build_service_account": opts.get("build-service-account"),
                "scaling": {key: opts.get(key) for key in CONCURRENCY},
                "invoker_iam_check": True,  # assume the worst: a deploy switches it back on
                "cpu_boost": None,
                "timeout": opts.get("timeout"),
            }
            return Answer()
        case ["run", "services", "update"]:
            service = state["functions"][words[3]]
            if "no-invoker-iam-check" in opts:
                service["invoker_iam_check"] = False
            if "invoker-iam-check" in opts:
                service["invoker_iam_check"] = True
            if "cpu-boost" in opts or "no-cpu-boost" in opts:
                service["cpu_boost"] = "cpu-boost" in opts
            if "update-env-vars" in opts:
                service["env"].update(parse_env(opts["update-env-vars"]))
            return Answer()
    return Answer(code=3, err=f"fake gcloud: unexpected command {argv}\n")


def firebase(state: dict, cwd: Path, argv: list[str]) -> Answer:
    """A stateful stand-in for the Firebase CLI: sites, `deploy --only hosting --config ...`, `deploy --only firestore:rules`."""
    state["firebase_calls"].append(argv)
    words, opts, args = [], {}, iter(argv)
    for arg in args:
        if arg == "--non-interactive":
            opts["non-interactive"] = ""
        elif arg.startswith("--"):
            opts[arg[2:]] = next(args)
        else:
            words.append(arg)
    if "non-interactive" not in opts:
        return Answer(code=4, err="fake firebase: would prompt\n")
    if not state["firebase_added"]:
        return Answer(code=1, err=f"Error: Failed to get Firebase project {opts['project']}. Please make sure the project "
                                  "exists and your account has permission to access it.\n")
    match words:
        case ["hosting:sites:get", site]:
            return Answer(f"Site {site}\n") if site in state["sites"] else Answer(code=1, err="Error: HTTP Error: 404\n")
        case ["hosting:sites:create", site]:
            if site in state["taken_sites"] or site in state["sites"]:
                return Answer(code=1, err=f"Error: HTTP Error: 400, Invalid name: `{site}` is reserved by another project\n")
            state["sites"].append(site)
            return Answer(f"Site {site} has been created\n")
        case ["deploy"] if opts.get("only") == "hosting":
            # As Firebase: paths resolve from the config's folder and may not leave it; the site and services must exist.
            config_path = cwd / opts["config"]
            project_dir = config_path.parent.resolve()
            hosting = json.loads(config_path.read_text())["hosting"]
            if hosting.get("site") not in state["sites"]:
                return Answer(code=1, err=f"Error: Hosting site {hosting.get('site')} not found\n")
            public = (project_dir / hosting["public"]).resolve()
            if not public.is_relative_to(project_dir) or not public.is_dir():
                return Answer(code=1, err=f"Error: {hosting['public']} is outside of project directory, or missing\n")
            for rule in hosting.get("rewrites", []):
                if "destination" in rule:
                    if not (public / rule["destination"].lstrip("/")).is_file():
                        return Answer(code=1, err=f"Error: rewrite destination {rule['destination']} is not in the public folder\n")
                    continue
                service = state["functions"].get(rule["run"]["serviceId"])
                if service is None or service["region"] != rule["run"]["region"]:
                    return Answer(code=1, err=f"Error: Cloud Run service {rule['run']} does not exist\n")
            state["hosting"][hosting["site"]] = {
                "rewrites": hosting["rewrites"], "headers": hosting["headers"],
                "files": {name: hashlib.sha256(data).hexdigest() for name, data in tree(public).items()},
            }
            return Answer("Deploy complete!\n")
        case ["deploy"] if opts.get("only") == "firestore:rules":
            config = json.loads((cwd / opts.get("config", "firebase.json")).read_text())
            state["rules"] = (cwd / config["firestore"]["rules"]).read_text()
            return Answer("Deploy complete!\n")
    return Answer(code=3, err=f"fake firebase: unexpected command {argv}\n")


class FakeCloudServer(socketserver.TCPServer):
    """Answers the fake CLIs one call at a time (deploy.sh calls them one after another)."""

    allow_reuse_address = True

    def __init__(self, state: dict) -> None:
        super().__init__(("127.0.0.1", 0), FakeCloudHandler)
        self.state = state


class FakeCloudHandler(socketserver.StreamRequestHandler):
    def field(self) -> str:
        data = bytearray()
        while (byte := self.rfile.read(1)) != b"\0":
            if not byte:
                raise EOFError("the fake CLI hung up")
            data += byte
        return data.decode("utf-8", "surrogateescape")

    def handle(self) -> None:
        state = self.server.state  # type: ignore[attr-defined]
        try:
            tool, cwd, count = self.field(), Path(self.field()), int(self.field())
            argv = [self.field() for _ in range(count)]
            stdin = self.rfile.read(int(self.field())).decode()
            answer = gcloud(state, argv, stdin, cwd) if tool == "gcloud" else firebase(state, cwd, argv)
        except Exception:  # noqa: BLE001 - shown to the test through deploy.sh's stderr
            answer = Answer(code=3, err=traceback.format_exc())
        lines = [b"o" + line.encode() for line in answer.out.splitlines()]
        lines += [b"e" + line.encode() for line in answer.err.splitlines()]
        self.wfile.write(b"\n".join([*lines, f"x{answer.code}".encode()]) + b"\n")


@dataclass
class FakeCloud:
    """A stub checkout and a PATH whose gcloud and firebase answer from `state`; sleep and curl only record."""

    checkout: Path
    state: dict
    path: str
    sleep: Path
    bin_dir: Path

    def update(self, **changes: object) -> None:
        """Change the project behind deploy.sh's back (a rotation, a stuck key version, no Firebase)."""
        self.state.update(changes)


@contextlib.contextmanager
def fake_cloud(directory: Path, state: dict, sleep_log: str = "") -> Iterator[FakeCloud]:
    """A stub checkout and a PATH whose gcloud and firebase answer from `state`, while the block runs."""
    server = FakeCloudServer(state)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        bin_dir = directory / "bin"
        bin_dir.mkdir()
        for name in ("gcloud", "firebase"):
            (bin_dir / name).write_text(FAKE_CLI.replace("@PORT@", str(server.server_address[1])))
            (bin_dir / name).chmod(0o755)
        make_shims(bin_dir, directory / "sleep.log", ["sleep"], exit_code=0)  # waits take no time here
        make_shims(bin_dir, directory / "curl.log", ["curl", "wget"])
        if sleep_log:
            (directory / "sleep.log").write_text(sleep_log)
        yield FakeCloud(checkout=make_checkout(directory / "checkout"), state=state, path=f"{bin_dir}:/usr/bin:/bin",
                        sleep=directory / "sleep.log", bin_dir=bin_dir)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[FakeCloud]:
    """A fresh project: nothing enabled, created or deployed."""
    with fake_cloud(tmp_path, fresh_project()) as fresh:
        yield fresh


@dataclass(frozen=True)
class FirstDeployment:
    """deploy.sh's first run on a fresh project: what it printed, the project after it, what it slept, its checkout."""

    result: Deploy
    state: dict
    sleep_log: str
    checkout: Path


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory) -> FirstDeployment:
    """One first deployment, shared by the tests that only read it (they must not change it)."""
    with fake_cloud(tmp_path_factory.mktemp("first"), fresh_project()) as fresh:
        result, state = deploy_for_real(fresh)
        return FirstDeployment(result, state, fresh.sleep.read_text(), fresh.checkout)


@pytest.fixture
def deployed(first: FirstDeployment, tmp_path: Path) -> Iterator[FakeCloud]:
    """A project as the first deployment left it (a copy), for the tests that go on from there."""
    with fake_cloud(tmp_path, copy.deepcopy(first.state), first.sleep_log) as project:
        yield project


def run_for_real(cloud: FakeCloud, *args: str) -> tuple[Deploy, dict]:
    """Run deploy.sh without --dry-run against the fake; return its result and (a copy of) the project's state after it."""
    cloud.update(calls=[], firebase_calls=[])
    result = run_deploy(cloud.checkout, ["--project", PROJECT, "--region", REGION, *args], path=cloud.path,
                        env={"GBX_OPERATORS": "ops@example.com"})
    return result, copy.deepcopy(cloud.state)


def deploy_for_real(cloud: FakeCloud, *args: str) -> tuple[Deploy, dict]:
    """run_for_real, which must succeed."""
    result, state = run_for_real(cloud, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result, state


@functools.cache
def gbx_folder() -> dict[str, bytes]:
    """What Hosting serves at /gbx/: the wheel built here from this repository (the build is reproducible, so these
    are the bytes deploy.sh staged from its checkout), its index and SHA256SUMS."""
    with tempfile.TemporaryDirectory() as tmp:
        client_wheel.build(Path(tmp) / "gbx", base_url=f"https://{PROJECT}.web.app")  # the site the tests deploy to
        return {f"gbx/{name}": data for name, data in tree(Path(tmp) / "gbx").items()}


def published(checkout: Path) -> dict[str, str]:
    """The files Hosting serves from a checkout, by SHA-256: the portal, openapi.json and gbx/."""
    files = {**tree(checkout / "portal"), "openapi.json": (checkout / "openapi.json").read_bytes(), **gbx_folder()}
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def service_uri(name: str) -> str:
    return f"https://{name}-x7y8z9-ew.a.run.app"


def test_first_deployment_creates_everything(first: FirstDeployment) -> None:
    result, state = first.result, first.state
    assert set(APIS) <= set(state["apis"])
    assert state["service_accounts"] == [SA_EMAIL, BUILD_SA_EMAIL, AUDIT_SA_EMAIL]
    assert state["database"] == REGION
    assert len(state["indexes"]) == len(json.loads((REPO / "firestore.indexes.json").read_text())["indexes"])
    member = f"serviceAccount:{SA_EMAIL}"
    assert sorted(state["bindings"]) == sorted([
        ["project", PROJECT, member, "roles/datastore.user"],
        ["secret", "gbx-admin-token", member, "roles/secretmanager.secretAccessor"],
        ["kms_key", "seal", member, "roles/cloudkms.signerVerifier"],
        ["kms_key", "seal-log", member, "roles/cloudkms.signerVerifier"],
        # The functions may publish to the events topic, and to nothing else in Pub/Sub.
        ["topic", "gbx-events", member, "roles/pubsub.publisher"],
        *(["project", PROJECT, f"serviceAccount:{BUILD_SA_EMAIL}", role] for role in BUILD_ROLES),
        *(["run_service", FUNCTIONS[entry], f"serviceAccount:{AUDIT_SA_EMAIL}", "roles/run.invoker"] for entry in INTERNAL),
    ])
    assert state["rules"] == (first.checkout / "firestore.rules").read_text()
    assert "PENDING_GENERATION" in result.stdout and first.sleep_log == "sleep 5\n", "the new key was waited for"

    (token,) = state["secrets"]["gbx-admin-token"]
    assert re.fullmatch(r"[0-9a-f]{64}", token), "one random line, without its newline"
    everything_shown = result.stdout + result.stderr + json.dumps(state["calls"]) + json.dumps(state["functions"])
    assert token not in everything_shown

    all_urls = base_urls() + [url for entry in DEPLOY_ORDER for name in [FUNCTIONS[entry]]
                              for url in [*deterministic_urls(name, PROJECT_NUMBER), service_uri(name), service_uri(name) + "/"]]
    assert set(state["functions"]) == set(FUNCTIONS.values())
    for entry, name in FUNCTIONS.items():
        deployed = state["functions"][name]
        assert deployed["source"] == f"build/functions/{entry}"
        assert deployed["region"] == REGION
        assert deployed["build_service_account"] == f"projects/{PROJECT}/serviceAccounts/{BUILD_SA_EMAIL}"
        assert deployed["invoker_iam_check"] is (entry in INTERNAL)
        assert deployed["scaling"] == CONCURRENCY and deployed["cpu_boost"] is None
        env = dict(deployed["env"])
        assert audiences(env.pop("GBX_AUDIENCES")) == all_urls
        assert env == {
            "GOOGLE_CLOUD_PROJECT": PROJECT, "GBX_ISSUER": PROJECT, "GBX_PUBLIC_URL": f"https://{PROJECT}.web.app",
            "GBX_KMS_KEY_VERSION": f"{KEY}/cryptoKeyVersions/1", "GBX_TRUSTED_KEY_VERSIONS": f"{KEY}/cryptoKeyVersions/1",
            "GBX_LOG_KEY_VERSION": KEY.replace("/cryptoKeys/seal", "/cryptoKeys/seal-log") + "/cryptoKeyVersions/1",
            "GBX_OPERATORS": "ops@example.com", "THREADS": "40", "GBX_AUDITORS": AUDIT_SA_EMAIL,
        }
        assert deployed["secrets"] == ("GBX_ADMIN_TOKEN=gbx-admin-token:latest" if entry in ADMIN_ENTRIES else None)
    for name in FUNCTIONS.values():
        assert service_uri(name) in result.summary


def test_first_deployment_puts_hosting_in_front_of_the_functions(first: FirstDeployment) -> None:
    """A project without a Hosting site gets one; the site rewrites every path to its function and serves the portal."""
    result, state = first.result, first.state
    assert state["firebase_calls"] == [
        ["hosting:sites:get", PROJECT, "--project", PROJECT, "--non-interactive"],
        ["hosting:sites:create", PROJECT, "--project", PROJECT, "--non-interactive"],
        ["deploy", "--only", "hosting", "--config", "build/firebase.json", "--project", PROJECT, "--non-interactive"],
        ["deploy", "--only", "firestore:rules", "--project", PROJECT, "--non-interactive"],
    ]
    hosting = state["hosting"][PROJECT]
    assert hosting["rewrites"] == effective_rewrites(REGION)
    assert hosting["headers"] == json.loads((first.checkout / "firebase.json").read_text())["hosting"]["headers"]
    assert hosting["files"] == published(first.checkout)
    assert "Base URL: https://gbx-demo.web.app\n" in result.summary
    assert "NOT deployed" not in result.stdout + result.stderr


def test_the_first_deploy_already_accepts_the_deterministic_urls(first: FirstDeployment) -> None:
    """No 401 window: the URLs a client can know in advance are in the environment the first revision starts with."""
    state = first.state
    deploys = [call for call in state["calls"] if call[:2] == ["functions", "deploy"]]
    expected = base_urls() + [url for entry in DEPLOY_ORDER for url in deterministic_urls(FUNCTIONS[entry], PROJECT_NUMBER)]
    assert [call[2] for call in deploys] == [FUNCTIONS[entry] for entry in DEPLOY_ORDER]
    for call in deploys:
        assert audiences(env_vars(flags(call)["set-env-vars"])["GBX_AUDIENCES"]) == expected
        assert "--allow-unauthenticated" not in call
    # Each deploy is followed at once by switching its invoker IAM check off.
    internal = {FUNCTIONS[entry] for entry in INTERNAL}
    for position, call in enumerate(state["calls"]):
        if call[:2] == ["functions", "deploy"]:
            check = "--invoker-iam-check" if call[2] in internal else "--no-invoker-iam-check"
            throttling = ["--no-cpu-throttling"] if call[2] == FUNCTIONS["run_complete"] else []
            assert state["calls"][position + 1] == ["run", "services", "update", call[2], f"--region={REGION}",
                                                    f"--project={PROJECT}", check, *throttling]


def test_a_second_deployment_creates_nothing_and_keeps_the_audiences(first: FirstDeployment, deployed: FakeCloud) -> None:
    result, second = deploy_for_real(deployed)
    creates = [call for call in second["calls"] if "create" in call or call[:3] == ["secrets", "versions", "add"]]
    assert creates == [
        call for call in second["calls"] if call[:4] == ["firestore", "indexes", "composite", "create"]
    ], "only index creates, which answer ALREADY_EXISTS"
    assert "index exists" in result.stdout
    assert not [call for call in second["calls"] if call[:3] == ["run", "services", "update"]
                and "--no-invoker-iam-check" not in call and "--invoker-iam-check" not in call]
    assert len([call for call in second["calls"] if "--no-invoker-iam-check" in call]) == len(PUBLIC)
    # What exists is updated, not created again: the audit's job, the metric, the policies; the backup schedule is left.
    assert [call[:4] for call in second["calls"] if call[0] in ("scheduler", "logging", "alpha") and "update" in call] == [
        *[["scheduler", "jobs", "update", "http"]] * len(INTERNAL), ["logging", "metrics", "update", "gbx-ledger-mismatches"],
        ["alpha", "monitoring", "policies", "update"], ["alpha", "monitoring", "policies", "update"]]
    assert second["backup_schedules"] == first.state["backup_schedules"] and second["policies"] == first.state["policies"]
    assert second["secrets"] == first.state["secrets"], "the admin token is not rotated by a redeploy"
    assert second["bindings"] == first.state["bindings"]
    assert second["functions"] == first.state["functions"]
    assert deployed.sleep.read_text() == "sleep 5\n", "only the first run waited (for the new key)"
    # The audiences, service URIs included, ride along with each redeploy: there is no moment without them.
    for call in second["calls"]:
        if call[:2] == ["functions", "deploy"]:
            assert env_vars(flags(call)["set-env-vars"])["GBX_AUDIENCES"] == first.state["functions"][call[2]]["env"]["GBX_AUDIENCES"]
    # The site exists now: found, not created again; Hosting is deployed again.
    assert [call[0] for call in second["firebase_calls"]] == ["hosting:sites:get", "deploy", "deploy"]
    assert second["sites"] == [PROJECT]
    # (Each test copies the portal from the repository, whose files may change between two copies.)
    assert second["hosting"] == {PROJECT: {**first.state["hosting"][PROJECT], "files": published(deployed.checkout)}}


def test_after_a_rotation_the_newest_version_signs_once_generated_and_the_enabled_ones_are_trusted(deployed: FakeCloud) -> None:
    cloud = deployed
    cloud.update(key_versions={"1": "DISABLED", "2": "ENABLED", "3": "PENDING_GENERATION"}, generation_polls=2)
    result, after = deploy_for_real(cloud)
    assert result.stdout.count("to leave PENDING_GENERATION") == 2
    for deployed in after["functions"].values():
        assert deployed["env"]["GBX_KMS_KEY_VERSION"] == f"{KEY}/cryptoKeyVersions/3"
        assert deployed["env"]["GBX_TRUSTED_KEY_VERSIONS"] == f"{KEY}/cryptoKeyVersions/3,{KEY}/cryptoKeyVersions/2"
    deployed_order = [call[2] for call in after["calls"] if call[:2] == ["functions", "deploy"]]
    assert deployed_order[-1] == FUNCTIONS[SIGNER], "the signer comes last"
    assert {FUNCTIONS[entry] for entry in VERIFIERS} == set(deployed_order[:len(VERIFIERS)])


def test_a_key_version_stuck_in_generation_stops_before_any_deploy(deployed: FakeCloud) -> None:
    cloud = deployed
    cloud.update(key_versions={"1": "ENABLED", "2": "PENDING_GENERATION"}, generation_polls=1000)
    result, state = run_for_real(cloud)
    assert result.returncode == 1
    assert "still PENDING_GENERATION" in result.stderr
    assert not [call for call in state["calls"] if call[:2] == ["functions", "deploy"]]
    assert state["firebase_calls"] == [], "nothing is deployed, Hosting neither"
    listings = [call for call in state["calls"] if call[:4] == ["kms", "keys", "versions", "list"]]
    assert 1 < len(listings) <= 30, "bounded"


def test_a_key_without_enabled_versions_stops_at_once(deployed: FakeCloud) -> None:
    cloud = deployed
    cloud.update(key_versions={"1": "DISABLED"})
    result, state = run_for_real(cloud)
    assert result.returncode == 1
    assert "has no ENABLED version" in result.stderr
    assert cloud.sleep.read_text() == "sleep 5\n", "only the first run waited (for the new key)"
    assert not [call for call in state["calls"] if call[:2] == ["functions", "deploy"]]


def test_operator_knobs_reach_the_functions(cloud: FakeCloud) -> None:
    result = run_deploy(cloud.checkout, ["--project", PROJECT, "--region", REGION], path=cloud.path,
                        env={"GBX_CONCURRENCY": "16", "GBX_MIN_INSTANCES": "1", "GBX_CPU_BOOST": "1"})
    assert result.returncode == 0, result.stderr
    for deployed in cloud.state["functions"].values():
        assert deployed["scaling"] == {"concurrency": "16", "cpu": "1", "memory": "512Mi", "min-instances": "1"}
        assert deployed["env"]["THREADS"] == "16"
        assert deployed["cpu_boost"] is True


def test_without_firebase_on_the_project_hosting_and_rules_are_warnings_not_an_abort(cloud: FakeCloud) -> None:
    """Firebase not added (or no firebase login): the functions are deployed, the run succeeds and says what to run later."""
    cloud.update(firebase_added=False)
    result, state = deploy_for_real(cloud)
    assert f"deploy.sh: warning: firebase failed (is Firebase added to {PROJECT}: firebase projects:addfirebase {PROJECT}?" in result.stderr
    assert result.stderr.count("firebase failed") == 1, "one hint for both steps"
    assert "Firebase Hosting (the base URL https://gbx-demo.web.app) was NOT deployed" in result.stderr
    assert f"firebase hosting:sites:create {PROJECT} --project {PROJECT} --non-interactive" in result.stderr
    assert f"firebase deploy --only hosting --config build/firebase.json --project {PROJECT} --non-interactive" in result.stderr
    assert "firestore.rules was NOT deployed" in result.stderr
    assert f"firebase deploy --only firestore:rules --project {PROJECT} --non-interactive" in result.stderr
    assert set(state["functions"]) == set(FUNCTIONS.values())
    assert all(not state["functions"][FUNCTIONS[entry]]["invoker_iam_check"] for entry in PUBLIC)
    assert state["hosting"] == {} and state["rules"] is None
    assert "Base URL: https://gbx-demo.web.app (NOT deployed" in result.summary
    assert "Function URLs:" in result.stdout


def test_a_site_id_taken_elsewhere_leaves_hosting_undeployed_and_the_rules_deployed(cloud: FakeCloud) -> None:
    """The default site of some older projects has another ID: the warning says so, and --site fixes it."""
    cloud.update(taken_sites=[PROJECT], sites=["gbx-demo-7f3a"])
    result, state = deploy_for_real(cloud)
    assert "Firebase Hosting (the base URL https://gbx-demo.web.app) was NOT deployed" in result.stderr
    assert state["hosting"] == {} and state["rules"] is not None
    result, state = deploy_for_real(cloud, "--site", "gbx-demo-7f3a")
    assert [call[0] for call in state["firebase_calls"]] == ["hosting:sites:get", "deploy", "deploy"]
    assert state["hosting"]["gbx-demo-7f3a"]["rewrites"] == effective_rewrites(REGION)
    assert "Base URL: https://gbx-demo-7f3a.web.app\n" in result.summary
    for deployed in state["functions"].values():
        assert audiences(deployed["env"]["GBX_AUDIENCES"])[:4] == base_urls("gbx-demo-7f3a")


def test_without_the_firebase_cli_the_commands_are_printed(cloud: FakeCloud) -> None:
    (cloud.bin_dir / "firebase").unlink()
    result, state = deploy_for_real(cloud)
    assert result.stderr.count("firebase CLI not found") == 1
    assert "Firebase Hosting (the base URL https://gbx-demo.web.app) was NOT deployed" in result.stderr
    assert f"firebase deploy --only hosting --config build/firebase.json --project {PROJECT}" in result.stderr
    assert "firestore.rules was NOT deployed" in result.stderr
    assert f"firebase deploy --only firestore:rules --project {PROJECT}" in result.stderr
    assert set(state["functions"]) == set(FUNCTIONS.values())
    assert state["firebase_calls"] == []


# ---------------------------------------------------------------- the real functions/, staged
# These need every functions/<entry>/main.py of the repository.


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """build/ of a dry run of this repository's own deploy.sh."""
    base = tmp_path_factory.mktemp("staged")
    make_shims(base / "shims", base / "calls.log", ["gcloud", "firebase", "curl", "openssl"])
    result = run_deploy(REPO, DRY_ARGS, path=f"{base / 'shims'}:/usr/bin:/bin", env={"GBX_BUILD_DIR": str(base / "build")},
                        cwd=base)
    assert result.returncode == 0, result.stderr
    assert not (base / "calls.log").exists()
    return base / "build" / "functions"


@pytest.mark.parametrize("entry", FUNCTIONS)
def test_each_staged_function_is_complete(staged: Path, entry: str) -> None:
    directory = staged / entry
    assert (directory / "main.py").read_bytes() == (REPO / "functions" / entry / "main.py").read_bytes()
    assert (directory / "requirements.txt").read_bytes() == (REPO / "requirements.txt").read_bytes()
    assert (directory / "shared" / "__init__.py").is_file()
    for module in (REPO / "shared").glob("*.py"):
        if module.name not in {"local.py", "emulator.py", "pubsub_emulator.py"}:
            assert (directory / "shared" / module.name).read_bytes() == module.read_bytes(), module.name
    for local_only in ("local.py", "emulator.py", "pubsub_emulator.py"):
        assert not (directory / "shared" / local_only).exists()
    # The seal format ships once, from the client package the service shares it with.
    for module in (REPO / "client" / "gbx_client").glob("*.py"):
        assert (directory / "gbx_client" / module.name).read_bytes() == module.read_bytes(), module.name
    assert not list(directory.rglob("__pycache__"))


SERVE = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import functions_framework

    repo, *functions = sys.argv[1:]
    for function in functions:
        directory, entry, method = function.split(":")
        # As on a fresh instance: none of the previous function's modules, nor its folder on sys.path.
        for name in [name for name in sys.modules if name == "main" or name.split(".")[0] in ("shared", "gbx_client")]:
            del sys.modules[name]
        sys.path[:] = [path for path in sys.path if not path.startswith(str(Path(directory).parent))]
        app = functions_framework.create_app(target=entry, source=str(Path(directory, "main.py")))
        response = app.test_client().open("/", method=method)
        import shared
        from_repo = sorted(
            name for name, module in list(sys.modules.items())
            if (getattr(module, "__file__", None) or "").startswith((repo + "/shared", repo + "/functions", repo + "/client"))
        )
        print("served:", json.dumps({  # the function logs JSON lines of its own
            "entry": entry,
            "status": response.status_code,
            "body": response.get_json(silent=True),
            "request_id": response.headers.get("X-Request-Id"),
            "shared": shared.__file__,
            "from_repo": from_repo,
        }))
''')


@pytest.fixture(scope="module")
def served(staged: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Each staged function's answer to a wrong method, loaded by functions-framework from its own folder.

    One interpreter (-I: nothing of the repository on sys.path, cwd outside it) loads them one after another, dropping
    the previous function's modules each time, so the third-party imports are paid once rather than per function.
    """
    home = tmp_path_factory.mktemp("served")
    env = {
        "PATH": "/usr/bin:/bin", "HOME": str(home), "GOOGLE_CLOUD_PROJECT": "demo", "GBX_SIGNER": "local",
        "GBX_LOCAL_DIR": str(home / "local"), "GBX_AUDIENCES": "x", "GBX_ADMIN_TOKEN": "x",
    }
    functions = [f"{staged / entry}:{entry}:{'POST' if ENDPOINTS[entry].method == 'GET' else 'GET'}" for entry in FUNCTIONS]
    result = subprocess.run([sys.executable, "-I", "-c", SERVE, str(REPO), *functions], cwd=home, env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line.removeprefix("served:")) for line in result.stdout.splitlines() if line.startswith("served:")]
    assert [answer["entry"] for answer in answers] == list(FUNCTIONS), result.stdout
    return {answer["entry"]: answer for answer in answers}


@pytest.mark.parametrize("entry", FUNCTIONS)
def test_each_staged_function_serves_its_endpoint_on_its_own(staged: Path, served: dict[str, dict], entry: str) -> None:
    """functions-framework loads the staged main.py with nothing of the repository on sys.path (-I)."""
    answer = served[entry]
    assert answer["status"] == 405, answer
    assert answer["body"]["error"]["code"] == "method_not_allowed"
    assert answer["body"]["error"]["status"] == 405
    assert isinstance(answer["body"]["error"]["message"], str) and answer["body"]["error"]["message"]
    assert answer["request_id"]
    assert Path(answer["shared"]).resolve().is_relative_to((staged / entry).resolve())
    assert answer["from_repo"] == []


def test_the_issue_documented_dry_run_works(sandbox: dict[str, Path], tmp_path: Path) -> None:
    result = run_deploy(sandbox["checkout"], ["--project", "demo", "--region", "europe-west1", "--dry-run"], path=str(sandbox["path"]), env={"GBX_BUILD_DIR": str(tmp_path / "b")})
    assert result.returncode == 0, result.stderr
    deploys = [line for line in result.stdout.splitlines() if line.startswith("+ gcloud functions deploy ")]
    assert len(deploys) == len(FUNCTIONS) and all("--project=demo" in line for line in deploys)
    assert "Base URL (a dry run deploys nothing): https://demo.web.app" in result.summary


# ---------------------------------------------------------------- operating it: data safety, the audit, alerts


def test_the_database_gets_point_in_time_recovery_delete_protection_and_a_daily_backup(dry: Deploy) -> None:
    (update,) = dry.find("gcloud", "firestore", "databases", "update")
    assert update == ["gcloud", "firestore", "databases", "update", "--database=(default)", "--enable-pitr", "--delete-protection",
                      f"--project={PROJECT}"]
    assert dry.indexes("gcloud", "firestore", "databases", "create")[0] < dry.indexes("gcloud", "firestore", "databases", "update")[0]
    (listing,) = dry.find("gcloud", "firestore", "backups", "schedules", "list")
    assert flags(listing)["format"] == "value(name.basename(),retention,weeklyRecurrence.day)"
    (create,) = dry.find("gcloud", "firestore", "backups", "schedules", "create")
    assert flags(create) == {"database": "(default)", "recurrence": "daily", "retention": "14d", "project": PROJECT}


@pytest.mark.parametrize(("args", "retention"), [(["--backup-retention", "98"], "98d"), (["--backup-retention=1"], "1d")])
def test_backup_retention_is_an_option_within_firestore_s_limit(sandbox: dict[str, Path], tmp_path: Path, args: list[str],
                                                               retention: str) -> None:
    result = run_deploy(sandbox["checkout"], [*DRY_ARGS, *args], path=str(sandbox["path"]), env={"GBX_BUILD_DIR": str(tmp_path / "b")})
    assert result.returncode == 0, result.stderr
    assert flags(result.find("gcloud", "firestore", "backups", "schedules", "create")[0])["retention"] == retention


@pytest.mark.parametrize("args", [["--backup-retention", "0"], ["--backup-retention", "99"], ["--backup-retention=7d"],
                                  ["--alert-email", "not-an-address"], ["--alert-email"]])
def test_bad_operations_options_exit_2(sandbox: dict[str, Path], tmp_path: Path, args: list[str]) -> None:
    result = run_deploy(sandbox["checkout"], [*DRY_ARGS, *args], path=str(sandbox["path"]), env={"GBX_BUILD_DIR": str(tmp_path / "b")})
    assert result.returncode == 2 and result.stdout == "" and USAGE in result.stderr


def test_a_restored_database_is_put_in_service_by_name(sandbox: dict[str, Path], tmp_path: Path) -> None:
    """The restore drill's last step: every Firestore command and every function names the restored database."""
    result = run_deploy(sandbox["checkout"], DRY_ARGS, path=str(sandbox["path"]),
                        env={"GBX_BUILD_DIR": str(tmp_path / "b"), "GBX_FIRESTORE_DATABASE": "restored-20261204"})
    assert result.returncode == 0, result.stderr
    firestore = [cmd for cmd in result.commands if cmd[:2] == ["gcloud", "firestore"]]
    assert firestore and all(flags(cmd)["database"] == "restored-20261204" for cmd in firestore)
    for cmd in result.find("gcloud", "functions", "deploy"):
        assert env_vars(flags(cmd)["set-env-vars"])["GBX_FIRESTORE_DATABASE"] == "restored-20261204"
    bad = run_deploy(sandbox["checkout"], DRY_ARGS, path=str(sandbox["path"]),
                     env={"GBX_BUILD_DIR": str(tmp_path / "c"), "GBX_FIRESTORE_DATABASE": "Bad_Name"})
    assert bad.returncode == 2 and "GBX_FIRESTORE_DATABASE" in bad.stderr


def test_the_service_reads_the_database_it_is_configured_with() -> None:
    assert config_module.load_config({"GOOGLE_CLOUD_PROJECT": "p"}).firestore_database == "(default)"
    assert config_module.load_config({"GOOGLE_CLOUD_PROJECT": "p", "GBX_FIRESTORE_DATABASE": "restored-1"}).firestore_database == "restored-1"


@pytest.mark.parametrize(
    ("entry", "schedule", "deadline"), [("ledger_audit", "0 * * * *", "1800s"), ("log_integrate", "* * * * *", "60s"), ("events_sweep", "* * * * *", "120s")]
)
def test_the_audit_runs_hourly_and_the_log_catch_up_and_events_sweeper_every_minute_as_their_own_account_with_oidc(
    dry: Deploy, entry: str, schedule: str, deadline: str
) -> None:
    assert set(INTERNAL) == {"ledger_audit", "log_integrate", "events_sweep"}
    name = FUNCTIONS[entry]
    url = f"https://{REGION}-{PROJECT}.cloudfunctions.net/{name}"
    (job,) = [job for job in dry.find("gcloud", "scheduler", "jobs", "create", "http") if job[5] == name]
    assert flags(job) == {
        "location": REGION, "project": PROJECT, "schedule": schedule, "time-zone": "Etc/UTC", "uri": url, "http-method": "POST",
        "oidc-service-account-email": AUDIT_SA_EMAIL, "oidc-token-audience": url, "attempt-deadline": deadline,
        "description": f"GBX: {name}, cron {schedule} UTC (see docs/operations.md)"}
    deploy = dry.find("gcloud", "functions", "deploy", name)[0]
    assert url in audiences(env_vars(flags(deploy)["set-env-vars"])["GBX_AUDIENCES"]), "the function accepts the job's token"
    assert dry.indexes("gcloud", "functions", "deploy", name)[0] < dry.indexes("gcloud", "scheduler", "jobs", "create")[0]


def test_the_events_topic_exists_before_any_function_and_only_the_runtime_account_may_publish(dry: Deploy) -> None:
    (create,) = dry.find("gcloud", "pubsub", "topics", "create", "gbx-events")
    (binding,) = dry.find("gcloud", "pubsub", "topics", "add-iam-policy-binding", "gbx-events")
    assert flags(binding)["member"] == f"serviceAccount:{SA_EMAIL}" and flags(binding)["role"] == "roles/pubsub.publisher"
    first_deploy = dry.indexes("gcloud", "functions", "deploy")[0]
    assert dry.indexes("gcloud", "pubsub", "topics", "create")[0] < first_deploy
    assert not [line for line in dry.commands if "pubsub" in line and "projects add-iam-policy-binding" in shlex.join(line)]


def test_published_events_expire_by_a_ttl_policy_on_the_field_the_publisher_writes(dry: Deploy, deployed: FakeCloud) -> None:
    (ttl,) = dry.find("gcloud", "firestore", "fields", "ttls", "update")
    assert ttl[5] == events.EXPIRE_FIELD and flags(ttl)["collection-group"] == events.EVENTS and "enable-ttl" in flags(ttl)
    assert dry.indexes("gcloud", "firestore", "databases", "create")[0] < dry.indexes("gcloud", "firestore", "fields", "ttls", "update")[0]
    assert deployed.state["ttls"] == [f"{events.EVENTS}.{events.EXPIRE_FIELD}"]


def test_partner_events_gives_a_partner_its_filtered_subscription_and_rights_on_it_alone(cloud: FakeCloud) -> None:
    deploy_for_real(cloud)

    def partner_events(*args: str) -> tuple[Deploy, dict]:
        cloud.update(calls=[], firebase_calls=[])
        result = run_deploy(cloud.checkout, ["partner-events", *args, "--project", PROJECT], path=cloud.path)
        return result, copy.deepcopy(cloud.state)

    result, state = partner_events("Partner-A@Example.com")
    assert result.returncode == 0, result.stderr
    name = "gbx-events-partner-a~example.com"
    assert state["subscriptions"][name] == {
        "topic": "gbx-events", "message-filter": 'attributes.ce-partner = "partner-a@example.com"', "enable-message-ordering": "",
        "ack-deadline": "60", "message-retention-duration": "7d"}
    assert ["subscription", name, "user:partner-a@example.com", "roles/pubsub.subscriber"] in state["bindings"]
    # Push: an OIDC token of gbx-events-push for the partner's URL; the existing subscription's push config is set.
    push = "https://billing.partner-a.example/gbx-events"
    result, state = partner_events("partner-a@example.com", "--push-endpoint", push)
    assert result.returncode == 0, result.stderr
    push_sa = f"gbx-events-push@{PROJECT}.iam.gserviceaccount.com"
    assert state["subscriptions"][name]["push-endpoint"] == push
    assert state["subscriptions"][name]["push-auth-service-account"] == push_sa and state["subscriptions"][name]["push-auth-token-audience"] == push
    assert push_sa in state["service_accounts"]


def test_a_log_based_metric_counts_the_audit_s_mismatch_lines(dry: Deploy) -> None:
    from shared import audit

    (metric,) = dry.find("gcloud", "logging", "metrics", "create")
    assert metric[4] == "gbx-ledger-mismatches"
    assert f'jsonPayload.event="{audit.MISMATCH_EVENT}"' in flags(metric)["log-filter"]
    assert "severity>=ERROR" in flags(metric)["log-filter"]


def policies_of(build: Path) -> dict[str, dict]:
    return {path.name: json.loads(path.read_text()) for path in sorted((build / "monitoring").glob("*.json"))}


def test_alert_policies_watch_mismatches_and_the_5xx_rate_and_notify_the_alert_email(sandbox: dict[str, Path], tmp_path: Path) -> None:
    build = tmp_path / "b"
    result = run_deploy(sandbox["checkout"], [*DRY_ARGS, "--alert-email", "oncall@example.com"], path=str(sandbox["path"]),
                        env={"GBX_BUILD_DIR": str(build)})
    assert result.returncode == 0, result.stderr
    (channel,) = result.find("gcloud", "beta", "monitoring", "channels", "create")
    assert flags(channel)["type"] == "email" and flags(channel)["channel-labels"] == "email_address=oncall@example.com"
    creates = result.find("gcloud", "alpha", "monitoring", "policies", "create")
    assert [flags(cmd)["policy-from-file"] for cmd in creates] == [f"{build}/monitoring/ledger-mismatch.json", f"{build}/monitoring/5xx-rate.json"]
    policies = policies_of(build)
    mismatch, errors = policies["ledger-mismatch.json"], policies["5xx-rate.json"]
    for policy in (mismatch, errors):
        assert policy["notificationChannels"] == [f"projects/{PROJECT}/notificationChannels/CHANNEL_ID"]
    (condition,) = mismatch["conditions"]
    assert 'metric.type="logging.googleapis.com/user/gbx-ledger-mismatches"' in condition["conditionThreshold"]["filter"]
    assert (condition["conditionThreshold"]["comparison"], condition["conditionThreshold"]["thresholdValue"]) == ("COMPARISON_GT", 0)
    (condition,) = errors["conditions"]
    threshold = condition["conditionThreshold"]
    assert 'metric.labels.response_code_class="5xx"' in threshold["filter"] and "5xx" not in threshold["denominatorFilter"]
    assert threshold["thresholdValue"] == 0.01 and threshold["duration"] == "300s"


def test_without_an_alert_email_the_policies_notify_no_one(dry: Deploy, sandbox: dict[str, Path]) -> None:
    assert not dry.find("gcloud", "beta", "monitoring", "channels")
    assert "no --alert-email" in dry.stdout
    assert all(policy["notificationChannels"] == [] for policy in policies_of(sandbox["checkout"] / "build").values())
    assert len(dry.find("gcloud", "alpha", "monitoring", "policies", "create")) == 2


def test_a_real_run_protects_backs_up_schedules_and_alerts_and_a_rerun_updates(cloud: FakeCloud) -> None:
    result, state = deploy_for_real(cloud, "--alert-email", "oncall@example.com")
    assert state["database_protection"] == {"pitr": True, "delete_protection": True}
    assert state["backup_schedules"] == {"schedule-1": {"retention": f"{14 * 86400}s", "day": ""}}
    assert set(state["scheduler_jobs"]) == {FUNCTIONS[entry] for entry in INTERNAL}
    assert set(state["metrics"]) == {"gbx-ledger-mismatches"}
    (channel,) = state["channels"]
    assert {p["displayName"] for p in state["policies"].values()} == {"GBX ledger mismatch", "GBX 5xx rate"}
    assert all(p["notificationChannels"] == [channel] for p in state["policies"].values())
    # A rerun with another retention updates the one schedule; the channel is found, not created again.
    result, again = deploy_for_real(cloud, "--alert-email", "oncall@example.com", "--backup-retention", "30")
    assert again["backup_schedules"] == {"schedule-1": {"retention": f"{30 * 86400}s", "day": ""}}
    assert again["channels"] == state["channels"] and len(again["policies"]) == 2
    assert not [call for call in again["calls"] if call[:4] == ["beta", "monitoring", "channels", "create"]]


# ---------------------------------------------------------------- every gcloud command parses with the real gcloud

# The real gcloud, with an empty configuration and no credentials, parses a command's arguments and then stops at
# "You do not currently have an active account selected" (exit 1) before any network call; a flag it does not know,
# or a malformed value, stops at the parser (exit 2, "unrecognized arguments" / "argument --x: ...").
GCLOUD_OFFLINE_ENV = {
    "CLOUDSDK_CORE_DISABLE_PROMPTS": "1", "CLOUDSDK_CORE_CHECK_GCE_METADATA": "false",
    "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "1", "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "1",
}
NO_ACCOUNT = "You do not currently have an active account selected"


def real_gcloud(command: list[str], home: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    gcloud_path = shutil.which("gcloud")
    assert gcloud_path, "the Google Cloud SDK (gcloud) is needed: the Firestore emulator comes with it"
    env = {"PATH": f"{Path(gcloud_path).parent}:/usr/bin:/bin", "HOME": str(home), "CLOUDSDK_CONFIG": str(home / "gcloud"),
           **GCLOUD_OFFLINE_ENV}
    return subprocess.run([gcloud_path, *command[1:]], env=env, cwd=cwd, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, check=False)


def gcloud_commands(lines: list[str]) -> list[list[str]]:
    """The gcloud commands of `+ ` lines, pipelines included."""
    commands = []
    for line in lines:
        for part in line.split(" | "):
            words = shlex.split(part)
            if words and words[0] == "gcloud":
                commands.append(words)
    return commands


def test_the_real_gcloud_parses_every_command(sandbox: dict[str, Path], first: FirstDeployment, deployed: FakeCloud,
                                              tmp_path: Path) -> None:
    """Every gcloud command deploy.sh shows in a dry run (with --alert-email) or runs on a redeploy (the update forms)."""
    dry_run = run_deploy(sandbox["checkout"], [*DRY_ARGS, "--alert-email", "oncall@example.com"], path=str(sandbox["path"]),
                         env={"GBX_BUILD_DIR": str(tmp_path / "b")})
    assert dry_run.returncode == 0, dry_run.stderr
    _, second = deploy_for_real(deployed, "--backup-retention", "30")
    # A partner's subscription, pull and push, as partner-events shows it.
    partner_runs = [run_deploy(sandbox["checkout"], ["partner-events", partner, "--project", PROJECT, "--dry-run", *push], path=str(sandbox["path"]))
                    for partner, push in (("partner@example.com", []), ("svc@p.iam.gserviceaccount.com", ["--push-endpoint", "https://partner.example/hook"]))]
    assert all(run.returncode == 0 for run in partner_runs), [run.stderr for run in partner_runs]
    shown = dry_run.stdout + "".join(run.stdout for run in partner_runs)
    commands = gcloud_commands([line[2:] for line in shown.splitlines() if line.startswith("+ ")])
    commands += [["gcloud", *call] for call in first.state["calls"] + second["calls"]]
    # One of each shape: the same words (resource names masked) with the same flags.
    shapes: dict[tuple, list[str]] = {}
    for command in commands:
        words = tuple("NAME" if word.startswith("gbx") or "@" in word or "/" in word else word for word in command if not word.startswith("-"))
        shapes.setdefault((words, frozenset(arg.split("=")[0] for arg in command if arg.startswith("-"))), command)
    assert any(cmd[1:4] == ["scheduler", "jobs", "update"] for cmd in shapes.values())
    assert any(cmd[1:5] == ["firestore", "backups", "schedules", "update"] for cmd in shapes.values())
    home = tmp_path / "home"
    home.mkdir()
    from concurrent.futures import ThreadPoolExecutor

    # gcloud reads the files a command names (the alert policies) while parsing: the redeploy's are relative to its checkout.
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda command: (command, real_gcloud(command, home, deployed.checkout)), shapes.values()))
    refused = [(shlex.join(command), result.returncode, result.stderr.strip()[:300])
               for command, result in results if result.returncode != 1 or NO_ACCOUNT not in result.stderr]
    assert refused == [], refused
    assert len(results) >= 35


def test_the_restore_drill_s_gcloud_commands_parse_with_the_real_gcloud(tmp_path: Path) -> None:
    """docs/operations.md's restore drill is exact commands: each gcloud line of it parses, its variables filled in."""
    text = (REPO / "docs" / "operations.md").read_text()
    drill = text.split("## The restore drill", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    values = {"$PROJECT": PROJECT, "$REGION": REGION, "$NEW": "restored-202612040500"}
    commands = []
    for line in drill.replace("\\\n", " ").splitlines():
        line = line.strip()
        if line.startswith("gcloud "):
            for name, value in values.items():
                line = line.replace(name, value)
            commands.append(shlex.split(line.split(" # ")[0]))
    assert {tuple(cmd[1:4]) for cmd in commands} >= {("firestore", "databases", "restore"), ("firestore", "export", f"gs://{PROJECT}-gbx-restore/restored-202612040500"),
                                                   ("firestore", "import", f"gs://{PROJECT}-gbx-restore/restored-202612040500"), ("scheduler", "jobs", "run")}
    home = tmp_path / "home"
    home.mkdir()
    refused = [(shlex.join(cmd), result.returncode, result.stderr.strip()[:300])
               for cmd in commands for result in [real_gcloud(cmd, home, home)]
               if result.returncode != 1 or NO_ACCOUNT not in result.stderr]
    assert refused == [], refused


def test_partners_are_onboarded_by_one_flag_that_every_function_carries(sandbox: dict[str, Path]) -> None:
    partners = "billing@partner-a.iam.gserviceaccount.com,desk@partner-b.example"
    result = run_deploy(sandbox["checkout"], [*DRY_ARGS, "--partners", partners], path=str(sandbox["path"]), env={"GBX_PARTNERS": "ignored@x.y"})
    assert result.returncode == 0, result.stderr
    deploys = result.find("gcloud", "functions", "deploy")
    assert deploys and all(env_vars(flags(cmd)["set-env-vars"])["GBX_PARTNERS"] == partners for cmd in deploys)
    # From the environment when the flag is absent; none at all when neither names any.
    from_env = run_deploy(sandbox["checkout"], DRY_ARGS, path=str(sandbox["path"]), env={"GBX_PARTNERS": "solo@partner.example"})
    assert {env_vars(flags(cmd)["set-env-vars"]).get("GBX_PARTNERS") for cmd in from_env.find("gcloud", "functions", "deploy")} == {"solo@partner.example"}
    for bad in ("not-an-email", "a@x.y;GBX_OPERATORS=me@x.y", "a@x.y,b"):
        refused = run_deploy(sandbox["checkout"], [*DRY_ARGS, f"--partners={bad}"], path=str(sandbox["path"]))
        assert refused.returncode == 2 and "--partners: not an email address" in refused.stderr, refused.stderr
