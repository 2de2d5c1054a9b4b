"""deploy.sh: the dry run's commands, a re-runnable deployment (against a fake gcloud), self-contained staging."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROJECT = "gbx-demo"
REGION = "europe-west1"
PROJECT_NUMBER = "123456789012"  # what the fake gcloud answers; a dry run shows the placeholder PROJECT_NUMBER
SA_EMAIL = f"gbx-runtime@{PROJECT}.iam.gserviceaccount.com"
BUILD_SA_EMAIL = f"gbx-build@{PROJECT}.iam.gserviceaccount.com"
BUILD_ROLES = {"roles/logging.logWriter", "roles/artifactregistry.writer", "roles/storage.objectAdmin"}
KEY = f"projects/{PROJECT}/locations/{REGION}/keyRings/gbx/cryptoKeys/seal"
# Entry point (= directory under functions/) -> Cloud Function name.
FUNCTIONS = {
    "issue": "gbx-issue",
    "check": "gbx-check",
    "consume": "gbx-consume",
    "run_start": "gbx-run-start",
    "run_complete": "gbx-run-complete",
    "seal_verify": "gbx-seal-verify",
    "redeem_seal_once": "gbx-redeem-seal-once",
    "public_keys": "gbx-public-keys",
}
# Verifiers (and the key publisher) before the only signer, run_complete, which goes last.
VERIFIERS = ["seal_verify", "redeem_seal_once", "public_keys"]
DEPLOY_ORDER = [*VERIFIERS, "issue", "check", "consume", "run_start", "run_complete"]
APIS = [f"{api}.googleapis.com" for api in (
    "cloudfunctions", "run", "cloudbuild", "artifactregistry", "firestore", "cloudkms", "secretmanager", "iam", "logging")]
CLOUD_RUN_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
HEX_TOKEN = re.compile(r"[0-9a-f]{64}")
CHECKOUT_FILES = ["deploy.sh", "requirements.txt", "firestore.rules", "firestore.indexes.json", "firebase.json"]


# ---------------------------------------------------------------- helpers


@dataclass
class Deploy:
    """One run of deploy.sh: its result and the commands it showed ("+ " lines, parsed)."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def commands(self) -> list[list[str]]:
        return [shlex.split(line[2:]) for line in self.stdout.splitlines() if line.startswith("+ ")]

    def indexes(self, *prefix: str) -> list[int]:
        """Positions of the commands that start with `prefix`."""
        return [i for i, cmd in enumerate(self.commands) if cmd[: len(prefix)] == list(prefix)]

    def find(self, *prefix: str) -> list[list[str]]:
        return [self.commands[i] for i in self.indexes(*prefix)]


def flags(cmd: list[str]) -> dict[str, str]:
    """--name=value flags of a command (a bare --name maps to "")."""
    out: dict[str, str] = {}
    for arg in cmd:
        if arg.startswith("--"):
            name, _, value = arg[2:].partition("=")
            out[name] = value
    return out


def env_vars(value: str) -> dict[str, str]:
    """Parse a gcloud dict flag written with the ^;^ alternate delimiter."""
    assert value.startswith("^;^"), value
    return dict(item.split("=", 1) for item in value[3:].split(";"))


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
    # Local-mode modules and byte code must never be shipped, whether or not they exist yet.
    (root / "shared" / "local.py").write_text('"""local mode"""\n')
    (root / "shared" / "__pycache__").mkdir(exist_ok=True)
    (root / "shared" / "__pycache__" / "config.cpython-312.pyc").write_bytes(b"\0")
    for entry in FUNCTIONS:
        (root / "functions" / entry).mkdir(parents=True)
        (root / "functions" / entry / "main.py").write_text(f"# stub for {entry}\n")
    return root


def run_deploy(checkout: Path, args: list[str], *, path: str, env: dict[str, str] | None = None,
               cwd: Path | None = None) -> Deploy:
    """Run `bash deploy.sh ARGS` with a controlled PATH and environment."""
    full_env = {"PATH": path, "HOME": str(checkout.parent), "LANG": "C.UTF-8", **(env or {})}
    result = subprocess.run(["bash", str(checkout / "deploy.sh"), *args], cwd=cwd or checkout, env=full_env,
                            capture_output=True, text=True, timeout=120, check=False)
    return Deploy(result.returncode, result.stdout, result.stderr)


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
    result = run_deploy(sandbox["checkout"], DRY_ARGS, path=str(sandbox["path"]), env={"GBX_OPERATORS": "ops@example.com,b@x.y"})
    assert result.returncode == 0, result.stderr
    return result


# ---------------------------------------------------------------- the dry run


def test_dry_run_succeeds_and_calls_nothing(dry: Deploy, sandbox: dict[str, Path]) -> None:
    assert not sandbox["record"].exists(), sandbox["record"].read_text()
    assert dry.commands, dry.stdout


def test_every_line_of_the_dry_run_is_a_command_a_note_or_the_summary(dry: Deploy) -> None:
    body, _, summary = dry.stdout.partition("\n\n")
    for line in body.splitlines():
        assert line.startswith(("+ ", "# ")), line
    assert "Function URLs" in summary


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
        ("secrets", "gbx-admin-token", "roles/secretmanager.secretAccessor"),
    }
    grants = [cmd for cmd in dry.commands if "add-iam-policy-binding" in cmd]
    assert {flags(cmd)["member"] for cmd in grants} == {f"serviceAccount:{SA_EMAIL}", f"serviceAccount:{BUILD_SA_EMAIL}"}
    kms_grant = dry.find("gcloud", "kms", "keys", "add-iam-policy-binding")[0]
    assert flags(kms_grant)["keyring"] == "gbx" and flags(kms_grant)["location"] == REGION


def test_build_service_account_is_created_with_the_build_roles(dry: Deploy) -> None:
    assert [cmd[4] for cmd in dry.find("gcloud", "iam", "service-accounts", "describe")] == [SA_EMAIL, BUILD_SA_EMAIL]
    assert [cmd[4] for cmd in dry.find("gcloud", "iam", "service-accounts", "create")] == ["gbx-runtime", "gbx-build"]
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
        ["--collection-group=" + index["collectionGroup"], "--query-scope=" + index["queryScope"].lower()]
        + [f"--field-config=field-path={f['fieldPath']},order={f['order'].lower()}" for f in index["fields"]]
        for index in document["indexes"]
    ]
    created = [cmd[5:] for cmd in dry.find("gcloud", "firestore", "indexes", "composite", "create")]
    assert [[arg for arg in cmd if arg != f"--project={PROJECT}"] for cmd in created] == expected
    assert all(f"--project={PROJECT}" in cmd for cmd in created)


def test_firestore_indexes_json_has_the_ledger_indexes() -> None:
    document = json.loads((REPO / "firestore.indexes.json").read_text())
    assert document["fieldOverrides"] == []
    shapes = {
        (index["collectionGroup"], index["queryScope"], tuple((f["fieldPath"], f["order"]) for f in index["fields"]))
        for index in document["indexes"]
    }
    assert shapes == {
        ("ledger", "COLLECTION", (("principal", "ASCENDING"), ("at", "DESCENDING"))),
        ("ledger", "COLLECTION", (("grant", "ASCENDING"), ("at", "ASCENDING"))),
    }


def test_firebase_json_points_at_the_rules_and_indexes() -> None:
    config = json.loads((REPO / "firebase.json").read_text())
    assert config["firestore"] == {"rules": "firestore.rules", "indexes": "firestore.indexes.json"}
    assert (REPO / config["firestore"]["rules"]).is_file()
    assert (REPO / config["firestore"]["indexes"]).is_file()


def test_rules_are_deployed_with_the_firebase_cli_last(dry: Deploy) -> None:
    assert dry.find("firebase", "deploy") == [["firebase", "deploy", "--only", "firestore:rules", "--project", PROJECT, "--non-interactive"]]
    assert dry.indexes("firebase", "deploy") == [len(dry.commands) - 1], "nothing waits on the rules"


def test_seal_key_is_an_ec_p256_signing_key(dry: Deploy) -> None:
    assert dry.find("gcloud", "kms", "keyrings", "create")[0][4] == "gbx"
    (create,) = dry.find("gcloud", "kms", "keys", "create")
    assert create[4] == "seal"
    assert flags(create)["purpose"] == "asymmetric-signing"
    assert flags(create)["default-algorithm"] == "ec-sign-p256-sha256"
    assert flags(create)["keyring"] == "gbx" and flags(create)["location"] == REGION
    (listing,) = dry.find("gcloud", "kms", "keys", "versions", "list")
    assert flags(listing)["format"] == "value(name,state)", "states, to wait for PENDING_GENERATION"
    assert flags(listing)["sort-by"] == "~createTime"
    assert "placeholder" in dry.stdout


def test_admin_token_secret_is_generated_without_ever_showing_it(dry: Deploy) -> None:
    lines = [line for line in dry.stdout.splitlines() if "gcloud secrets versions add" in line]
    assert lines == [
        "+ openssl rand -hex 32 | tr -d '\\n' | gcloud secrets versions add gbx-admin-token --data-file=- --project=gbx-demo"
    ]
    assert dry.find("gcloud", "secrets", "create")[0][:4] == ["gcloud", "secrets", "create", "gbx-admin-token"]
    assert "gcloud secrets versions access latest --secret=gbx-admin-token" in dry.stdout
    assert not HEX_TOKEN.search(dry.stdout + dry.stderr)
    assert "GBX_ADMIN_TOKEN=" not in "".join(arg for cmd in dry.commands for arg in cmd if "set-env-vars" in arg)


def test_eight_gen2_functions_are_deployed(dry: Deploy) -> None:
    deploys = dry.find("gcloud", "functions", "deploy")
    assert [cmd[3] for cmd in deploys] == [FUNCTIONS[entry] for entry in DEPLOY_ORDER]
    for entry, cmd in zip(DEPLOY_ORDER, deploys):
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
        assert version in env["GBX_TRUSTED_KEY_VERSIONS"].split(",")
        assert env["GBX_OPERATORS"] == "ops@example.com,b@x.y"
        assert "GBX_ADMIN_TOKEN" not in env
        if entry == "issue":
            assert options["set-secrets"] == "GBX_ADMIN_TOKEN=gbx-admin-token:latest"
        else:
            assert not any("secret" in arg for arg in cmd), cmd


def test_nothing_binds_all_users(dry: Deploy) -> None:
    """The domain-restricted-sharing org policy forbids allUsers; the invoker IAM check is switched off instead."""
    assert not [cmd for cmd in dry.commands if "--allow-unauthenticated" in cmd]
    assert "allUsers" not in dry.stdout


def test_each_function_skips_the_invoker_iam_check_right_after_its_deploy(dry: Deploy) -> None:
    deploys = dry.indexes("gcloud", "functions", "deploy")
    for entry, position in zip(DEPLOY_ORDER, deploys):
        following = dry.commands[position + 1]
        assert following == ["gcloud", "run", "services", "update", FUNCTIONS[entry], f"--region={REGION}",
                             f"--project={PROJECT}", "--no-invoker-iam-check"]
    assert len([cmd for cmd in dry.commands if "--no-invoker-iam-check" in cmd]) == len(FUNCTIONS)


def test_verifiers_are_deployed_before_the_signer(dry: Deploy) -> None:
    """After a rotation the new key version is trusted everywhere before run_complete signs with it."""
    order = [cmd[3] for cmd in dry.find("gcloud", "functions", "deploy")]
    assert order[-1] == FUNCTIONS["run_complete"]
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
    """Every deploy carries both deterministic URLs of all eight functions, with and without a trailing slash."""
    (describe,) = dry.find("gcloud", "projects", "describe")
    assert describe == ["gcloud", "projects", "describe", PROJECT, "--format=value(projectNumber)"]
    assert dry.indexes("gcloud", "projects", "describe")[0] < dry.indexes("gcloud", "functions", "deploy")[0]
    expected = [url for name in FUNCTIONS.values() for url in deterministic_urls(name, "PROJECT_NUMBER")]
    for cmd in dry.find("gcloud", "functions", "deploy"):
        assert audiences(env_vars(flags(cmd)["set-env-vars"])["GBX_AUDIENCES"]) == expected
    assert f"https://gbx-issue-PROJECT_NUMBER.{REGION}.run.app/" in expected
    assert f"https://{REGION}-{PROJECT}.cloudfunctions.net/gbx-issue" in expected


def test_service_uris_not_known_before_are_added_after_all_deploys(dry: Deploy) -> None:
    last_deploy = dry.indexes("gcloud", "functions", "deploy")[-1]
    updates = [i for i in dry.indexes("gcloud", "run", "services", "update") if "--no-invoker-iam-check" not in dry.commands[i]]
    assert len(updates) == len(FUNCTIONS)
    assert min(updates) > last_deploy
    placeholders = {name: f"https://{name}-PLACEHOLDER.{REGION}.run.app" for name in FUNCTIONS.values()}
    expected = [url for name in FUNCTIONS.values()
                for url in [*deterministic_urls(name, "PROJECT_NUMBER"), placeholders[name], placeholders[name] + "/"]]
    for entry, position in zip(DEPLOY_ORDER, updates):
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
        assert url in dry.stdout.partition("\n\n")[2]  # the closing summary lists the URLs


def test_staging_ships_main_requirements_and_shared_only(dry: Deploy, sandbox: dict[str, Path]) -> None:
    checkout = sandbox["checkout"]
    for entry in FUNCTIONS:
        staged = checkout / "build" / "functions" / entry
        assert (staged / "main.py").read_text() == f"# stub for {entry}\n"
        assert (staged / "requirements.txt").read_bytes() == (REPO / "requirements.txt").read_bytes()
        assert (staged / "shared" / "__init__.py").is_file()
        assert not (staged / "shared" / "local.py").exists()
        assert not (staged / "shared" / "emulator.py").exists()
        assert not list(staged.rglob("__pycache__")) and not list(staged.rglob("*.pyc"))
        assert f"staged functions/{entry}/main.py" in dry.stdout


def test_build_dir_can_be_moved(sandbox: dict[str, Path], tmp_path: Path) -> None:
    result = run_deploy(sandbox["checkout"], DRY_ARGS, path=str(sandbox["path"]),
                        env={"GBX_BUILD_DIR": "elsewhere"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for entry, cmd in zip(DEPLOY_ORDER, result.find("gcloud", "functions", "deploy")):
        assert flags(cmd)["source"] == f"{tmp_path}/elsewhere/functions/{entry}"
        assert (tmp_path / "elsewhere" / "functions" / entry / "main.py").is_file()


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
])
def test_bad_usage_exits_2_before_doing_anything(sandbox: dict[str, Path], tmp_path: Path, args: list[str]) -> None:
    result = run_deploy(sandbox["checkout"], args, path=str(sandbox["path"]), env={"GBX_BUILD_DIR": str(tmp_path / "b")})
    assert result.returncode == 2
    assert "usage: deploy.sh --project PROJECT --region REGION [--dry-run]" in result.stderr
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


def test_the_script_is_strict_and_executable() -> None:
    script = REPO / "deploy.sh"
    assert os.access(script, os.X_OK)
    assert "set -euo pipefail" in script.read_text()
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0


# ---------------------------------------------------------------- a real run, against a fake gcloud

FAKE_GCLOUD = r'''
"""A stateful stand-in for gcloud: just enough of each command deploy.sh uses."""
import json, os, sys

STATE = os.environ["FAKE_GCLOUD_STATE"]
with open(STATE) as file:
    state = json.load(file)
argv = sys.argv[1:]
state["calls"].append(argv)
words = [a for a in argv if not a.startswith("-")]
opts = dict(a[2:].split("=", 1) if "=" in a else (a[2:], "") for a in argv if a.startswith("--"))


def done(out="", code=0, err=""):
    with open(STATE, "w") as file:
        json.dump(state, file)
    sys.stdout.write(out)
    sys.stderr.write(err)
    sys.exit(code)


def missing():
    done(code=1, err="ERROR: NOT_FOUND\n")


def parse_env(value):
    if value.startswith("^"):
        delim, value = value[1:].split("^", 1)
    else:
        delim = ","
    return dict(item.split("=", 1) for item in value.split(delim))


def grant(kind, name):
    binding = [kind, name, opts["member"], opts["role"]]
    if binding not in state["bindings"]:
        state["bindings"].append(binding)
    done()


project = opts.get("project")
match words[:3]:
    case ["services", "enable", *_]:
        state["apis"] = sorted(set(state["apis"]) | set(words[2:])); done()
    case ["iam", "service-accounts", "describe"]:
        done(words[3] + "\n") if words[3] in state["service_accounts"] else missing()
    case ["iam", "service-accounts", "create"]:
        state["service_accounts"].append(f"{words[3]}@{project}.iam.gserviceaccount.com"); done()
    case ["projects", "add-iam-policy-binding", name]:
        grant("project", name)
    case ["projects", "describe", name]:
        done(state["project_number"] + "\n")
    case ["firestore", "databases", "describe"]:
        done("FIRESTORE_NATIVE\n") if state["database"] else missing()
    case ["firestore", "databases", "create"]:
        state["database"] = opts["location"]; done()
    case ["firestore", "indexes", "composite"]:
        index = [opts["collection-group"]] + [a for a in argv if a.startswith("--field-config=")]
        if index in state["indexes"]:
            done(code=1, err="ERROR: (gcloud.firestore.indexes.composite.create) ALREADY_EXISTS: index already exists\n")
        state["indexes"].append(index); done()
    case ["secrets", "describe", name]:
        done(name + "\n") if name in state["secrets"] else missing()
    case ["secrets", "create", name]:
        state["secrets"][name] = []; done()
    case ["secrets", "versions", "list"]:
        done("".join(f"{i + 1}\n" for i, _ in enumerate(state["secrets"][words[3]])))
    case ["secrets", "versions", "add"]:
        state["secrets"][words[3]].append(sys.stdin.read()); done()
    case ["secrets", "add-iam-policy-binding", name]:
        grant("secret", name)
    case ["kms", "keyrings", "describe"]:
        done(words[3] + "\n") if words[3] in state["keyrings"] else missing()
    case ["kms", "keyrings", "create"]:
        state["keyrings"].append(words[3]); done()
    case ["kms", "keys", "describe"]:
        done("EC_SIGN_P256_SHA256\n") if state["key_versions"] else missing()
    case ["kms", "keys", "create"]:
        # A new asymmetric key's first version is generated while the caller waits: one listing.
        state["key_versions"] = {"1": "PENDING_GENERATION"}; state["generation_polls"] = 1; done()
    case ["kms", "keys", "add-iam-policy-binding"]:
        grant("kms_key", words[3])
    case ["kms", "keys", "versions"]:
        key = f"projects/{project}/locations/{opts['location']}/keyRings/{opts['keyring']}/cryptoKeys/{opts['key']}"
        newest_first = sorted(state["key_versions"].items(), key=lambda item: -int(item[0]))
        listing = "".join(f"{key}/cryptoKeyVersions/{v}\t{s}\n" for v, s in newest_first)
        state["generation_polls"] -= 1
        if state["generation_polls"] <= 0:
            state["key_versions"] = {v: "ENABLED" if s == "PENDING_GENERATION" else s for v, s in newest_first}
        done(listing)
    case ["functions", "describe", name]:
        done(state["functions"][name]["uri"] + "\n") if name in state["functions"] else missing()
    case ["functions", "deploy", name]:
        state["functions"][name] = {
            "uri": f"https://{name}-x7y8z9-ew.a.run.app",
            "env": parse_env(opts["set-env-vars"]),
            "secrets": opts.get("set-secrets"),
            "source": opts["source"],
            "build_service_account": opts.get("build-service-account"),
            "invoker_iam_check": True,  # assume the worst: a deploy switches it back on
        }
        done()
    case ["run", "services", "update"]:
        service = state["functions"][words[3]]
        if "no-invoker-iam-check" in opts:
            service["invoker_iam_check"] = False
        if "update-env-vars" in opts:
            service["env"].update(parse_env(opts["update-env-vars"]))
        done()
done(code=3, err=f"fake gcloud: unexpected command {argv}\n")
'''


@dataclass
class FakeCloud:
    """A stub checkout and a PATH whose gcloud keeps its state in a JSON file, whose firebase and sleep record."""

    checkout: Path
    state: Path
    path: str
    firebase: Path
    sleep: Path
    bin_dir: Path

    def update(self, **changes: object) -> None:
        """Change the project behind deploy.sh's back (a rotation, a stuck key version)."""
        self.state.write_text(json.dumps({**json.loads(self.state.read_text()), **changes}))


@pytest.fixture
def cloud(tmp_path: Path) -> FakeCloud:
    """A fresh project: nothing enabled, created or deployed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(f"#!{sys.executable}\n{FAKE_GCLOUD}")
    gcloud.chmod(0o755)
    make_shims(bin_dir, tmp_path / "firebase.log", ["firebase"], exit_code=0)
    make_shims(bin_dir, tmp_path / "sleep.log", ["sleep"], exit_code=0)  # waits take no time here
    make_shims(bin_dir, tmp_path / "curl.log", ["curl", "wget"])
    state = tmp_path / "state.json"
    state.write_text(json.dumps({
        "calls": [], "apis": [], "service_accounts": [], "bindings": [], "database": None, "indexes": [],
        "secrets": {}, "keyrings": [], "key_versions": {}, "generation_polls": 0, "functions": {},
        "project_number": PROJECT_NUMBER,
    }))
    return FakeCloud(checkout=make_checkout(tmp_path / "checkout"), state=state, path=f"{bin_dir}:/usr/bin:/bin",
                     firebase=tmp_path / "firebase.log", sleep=tmp_path / "sleep.log", bin_dir=bin_dir)


def run_for_real(cloud: FakeCloud) -> tuple[Deploy, dict]:
    """Run deploy.sh without --dry-run against the fake; return its result and the project's state after it."""
    cloud.update(calls=[])
    result = run_deploy(cloud.checkout, ["--project", PROJECT, "--region", REGION], path=cloud.path,
                        env={"FAKE_GCLOUD_STATE": str(cloud.state), "GBX_OPERATORS": "ops@example.com"})
    return result, json.loads(cloud.state.read_text())


def deploy_for_real(cloud: FakeCloud) -> tuple[Deploy, dict]:
    """run_for_real, which must succeed."""
    result, state = run_for_real(cloud)
    assert result.returncode == 0, result.stdout + result.stderr
    return result, state


def service_uri(name: str) -> str:
    return f"https://{name}-x7y8z9-ew.a.run.app"


def test_first_deployment_creates_everything(cloud: FakeCloud) -> None:
    result, state = deploy_for_real(cloud)
    assert set(APIS) <= set(state["apis"])
    assert state["service_accounts"] == [SA_EMAIL, BUILD_SA_EMAIL]
    assert state["database"] == REGION
    assert len(state["indexes"]) == 2
    member = f"serviceAccount:{SA_EMAIL}"
    assert sorted(state["bindings"]) == sorted([
        ["project", PROJECT, member, "roles/datastore.user"],
        ["secret", "gbx-admin-token", member, "roles/secretmanager.secretAccessor"],
        ["kms_key", "seal", member, "roles/cloudkms.signerVerifier"],
        *(["project", PROJECT, f"serviceAccount:{BUILD_SA_EMAIL}", role] for role in BUILD_ROLES),
    ])
    assert cloud.firebase.read_text() == f"firebase deploy --only firestore:rules --project {PROJECT} --non-interactive\n"
    assert "PENDING_GENERATION" in result.stdout and cloud.sleep.read_text() == "sleep 5\n", "the new key was waited for"

    (token,) = state["secrets"]["gbx-admin-token"]
    assert re.fullmatch(r"[0-9a-f]{64}", token), "one random line, without its newline"
    everything_shown = result.stdout + result.stderr + json.dumps(state["calls"]) + json.dumps(state["functions"])
    assert token not in everything_shown

    all_urls = [url for name in FUNCTIONS.values()
                for url in [*deterministic_urls(name, PROJECT_NUMBER), service_uri(name), service_uri(name) + "/"]]
    assert set(state["functions"]) == set(FUNCTIONS.values())
    for entry, name in FUNCTIONS.items():
        deployed = state["functions"][name]
        assert deployed["source"] == f"build/functions/{entry}"
        assert deployed["build_service_account"] == f"projects/{PROJECT}/serviceAccounts/{BUILD_SA_EMAIL}"
        assert deployed["invoker_iam_check"] is False
        assert audiences(deployed["env"].pop("GBX_AUDIENCES")) == all_urls
        assert deployed["env"] == {
            "GOOGLE_CLOUD_PROJECT": PROJECT, "GBX_ISSUER": PROJECT,
            "GBX_KMS_KEY_VERSION": f"{KEY}/cryptoKeyVersions/1", "GBX_TRUSTED_KEY_VERSIONS": f"{KEY}/cryptoKeyVersions/1",
            "GBX_OPERATORS": "ops@example.com",
        }
        assert deployed["secrets"] == ("GBX_ADMIN_TOKEN=gbx-admin-token:latest" if entry == "issue" else None)
    for name in FUNCTIONS.values():
        assert service_uri(name) in result.stdout.partition("\n\n")[2]


def test_the_first_deploy_already_accepts_the_deterministic_urls(cloud: FakeCloud) -> None:
    """No 401 window: the URLs a client can know in advance are in the environment the first revision starts with."""
    _, state = deploy_for_real(cloud)
    deploys = [call for call in state["calls"] if call[:2] == ["functions", "deploy"]]
    expected = [url for name in FUNCTIONS.values() for url in deterministic_urls(name, PROJECT_NUMBER)]
    assert [call[2] for call in deploys] == [FUNCTIONS[entry] for entry in DEPLOY_ORDER]
    for call in deploys:
        assert audiences(env_vars(flags(call)["set-env-vars"])["GBX_AUDIENCES"]) == expected
        assert "--allow-unauthenticated" not in call
    # Each deploy is followed at once by switching its invoker IAM check off.
    for position, call in enumerate(state["calls"]):
        if call[:2] == ["functions", "deploy"]:
            assert state["calls"][position + 1] == ["run", "services", "update", call[2], f"--region={REGION}",
                                                    f"--project={PROJECT}", "--no-invoker-iam-check"]


def test_a_second_deployment_creates_nothing_and_keeps_the_audiences(cloud: FakeCloud) -> None:
    _, first = deploy_for_real(cloud)
    result, second = deploy_for_real(cloud)
    creates = [call for call in second["calls"] if "create" in call or call[:3] == ["secrets", "versions", "add"]]
    assert creates == [
        call for call in second["calls"] if call[:4] == ["firestore", "indexes", "composite", "create"]
    ], "only index creates, which answer ALREADY_EXISTS"
    assert "index exists" in result.stdout
    assert not [call for call in second["calls"] if call[:3] == ["run", "services", "update"] and "--no-invoker-iam-check" not in call]
    assert len([call for call in second["calls"] if "--no-invoker-iam-check" in call]) == len(FUNCTIONS)
    assert second["secrets"] == first["secrets"], "the admin token is not rotated by a redeploy"
    assert second["bindings"] == first["bindings"]
    assert second["functions"] == first["functions"]
    assert cloud.sleep.read_text() == "sleep 5\n", "only the first run waited (for the new key)"
    # The audiences, service URIs included, ride along with each redeploy: there is no moment without them.
    for call in second["calls"]:
        if call[:2] == ["functions", "deploy"]:
            assert env_vars(flags(call)["set-env-vars"])["GBX_AUDIENCES"] == first["functions"][call[2]]["env"]["GBX_AUDIENCES"]


def test_after_a_rotation_the_newest_version_signs_once_generated_and_the_enabled_ones_are_trusted(cloud: FakeCloud) -> None:
    deploy_for_real(cloud)
    cloud.update(key_versions={"1": "DISABLED", "2": "ENABLED", "3": "PENDING_GENERATION"}, generation_polls=2)
    result, after = deploy_for_real(cloud)
    assert result.stdout.count("to leave PENDING_GENERATION") == 2
    for deployed in after["functions"].values():
        assert deployed["env"]["GBX_KMS_KEY_VERSION"] == f"{KEY}/cryptoKeyVersions/3"
        assert deployed["env"]["GBX_TRUSTED_KEY_VERSIONS"] == f"{KEY}/cryptoKeyVersions/3,{KEY}/cryptoKeyVersions/2"
    deployed_order = [call[2] for call in after["calls"] if call[:2] == ["functions", "deploy"]]
    assert deployed_order[-1] == FUNCTIONS["run_complete"], "the signer comes last"
    assert {FUNCTIONS[entry] for entry in VERIFIERS} == set(deployed_order[:len(VERIFIERS)])


def test_a_key_version_stuck_in_generation_stops_before_any_deploy(cloud: FakeCloud) -> None:
    deploy_for_real(cloud)
    cloud.update(key_versions={"1": "ENABLED", "2": "PENDING_GENERATION"}, generation_polls=1000)
    result, state = run_for_real(cloud)
    assert result.returncode == 1
    assert "still PENDING_GENERATION" in result.stderr
    assert not [call for call in state["calls"] if call[:2] == ["functions", "deploy"]]
    listings = [call for call in state["calls"] if call[:4] == ["kms", "keys", "versions", "list"]]
    assert 1 < len(listings) <= 30, "bounded"


def test_a_key_without_enabled_versions_stops_at_once(cloud: FakeCloud) -> None:
    deploy_for_real(cloud)
    cloud.update(key_versions={"1": "DISABLED"})
    result, state = run_for_real(cloud)
    assert result.returncode == 1
    assert "has no ENABLED version" in result.stderr
    assert cloud.sleep.read_text() == "sleep 5\n", "only the first run waited (for the new key)"
    assert not [call for call in state["calls"] if call[:2] == ["functions", "deploy"]]


def test_a_failing_firebase_deploy_is_a_warning_not_an_abort(cloud: FakeCloud) -> None:
    """No Firebase on the project, or no firebase login: everything else is deployed and the run succeeds."""
    make_shims(cloud.bin_dir, cloud.firebase, ["firebase"], exit_code=1)
    result, state = deploy_for_real(cloud)
    assert cloud.firebase.read_text().startswith("firebase deploy --only firestore:rules")
    assert "deploy.sh: warning: firebase deploy failed" in result.stderr
    assert "firestore.rules was NOT deployed" in result.stderr
    assert f"firebase deploy --only firestore:rules --project {PROJECT} --non-interactive" in result.stderr
    assert set(state["functions"]) == set(FUNCTIONS.values())
    assert all(not deployed["invoker_iam_check"] for deployed in state["functions"].values())
    assert "Function URLs:" in result.stdout


def test_without_the_firebase_cli_the_rules_command_is_printed(cloud: FakeCloud) -> None:
    (cloud.bin_dir / "firebase").unlink()
    result, state = deploy_for_real(cloud)
    assert "firebase CLI not found" in result.stderr
    assert "firestore.rules was NOT deployed" in result.stderr
    assert f"firebase deploy --only firestore:rules --project {PROJECT}" in result.stderr
    assert set(state["functions"]) == set(FUNCTIONS.values())


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
        if module.name not in {"local.py", "emulator.py"}:
            assert (directory / "shared" / module.name).read_bytes() == module.read_bytes(), module.name
    assert not (directory / "shared" / "local.py").exists()
    assert not (directory / "shared" / "emulator.py").exists()
    # The seal format ships once, from the client package the service shares it with.
    for module in (REPO / "client" / "gbx_client").glob("*.py"):
        assert (directory / "gbx_client" / module.name).read_bytes() == module.read_bytes(), module.name
    assert not list(directory.rglob("__pycache__"))


SERVE = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import functions_framework

    entry, method, repo = sys.argv[1:4]
    app = functions_framework.create_app(target=entry, source=str(Path("main.py").resolve()))
    response = app.test_client().open("/", method=method)
    import shared
    from_repo = sorted(
        name for name, module in list(sys.modules.items())
        if (getattr(module, "__file__", None) or "").startswith((repo + "/shared", repo + "/functions", repo + "/client"))
    )
    print(json.dumps({
        "status": response.status_code,
        "body": response.get_json(silent=True),
        "request_id": response.headers.get("X-Request-Id"),
        "shared": shared.__file__,
        "from_repo": from_repo,
    }))
''')


@pytest.mark.parametrize("entry", FUNCTIONS)
def test_each_staged_function_serves_its_endpoint_on_its_own(staged: Path, entry: str, tmp_path: Path) -> None:
    """functions-framework loads the staged main.py with nothing of the repository on sys.path (-I)."""
    directory = staged / entry
    wrong_method = "POST" if entry == "public_keys" else "GET"
    env = {
        "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "GOOGLE_CLOUD_PROJECT": "demo", "GBX_SIGNER": "local",
        "GBX_LOCAL_DIR": str(tmp_path / "local"), "GBX_AUDIENCES": "x", "GBX_ADMIN_TOKEN": "x",
    }
    result = subprocess.run([sys.executable, "-I", "-c", SERVE, entry, wrong_method, str(REPO)], cwd=directory, env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    served = json.loads(result.stdout.strip().splitlines()[-1])
    assert served["status"] == 405, served
    assert served["body"]["error"]["code"] == "method_not_allowed"
    assert served["body"]["error"]["status"] == 405
    assert isinstance(served["body"]["error"]["message"], str) and served["body"]["error"]["message"]
    assert served["request_id"]
    assert Path(served["shared"]).resolve().is_relative_to(directory.resolve())
    assert served["from_repo"] == []


def test_the_issue_documented_dry_run_works(sandbox: dict[str, Path], tmp_path: Path) -> None:
    result = run_deploy(sandbox["checkout"], ["--project", "demo", "--region", "europe-west1", "--dry-run"], path=str(sandbox["path"]), env={"GBX_BUILD_DIR": str(tmp_path / "b")})
    assert result.returncode == 0, result.stderr
    deploys = [line for line in result.stdout.splitlines() if line.startswith("+ gcloud functions deploy ")]
    assert len(deploys) == 8 and all("--project=demo" in line for line in deploys)
