"""run_start: the lifecycle rules of the contract."""

from __future__ import annotations

import json

from shared import store
from shared.models import format_time
from tests.conftest import DIGEST, RUNNER, Api, error_code


def test_run_start_records_metadata(api: Api) -> None:
    api.issue(RUNNER, 1)
    api.consume("job-1")
    response = api.run_start("job-1", inputs_sha256="AB" * 32, run_manifest_sha256="cd" * 32)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"run_id", "state", "started_at"} and body["run_id"] == "job-1" and body["state"] == "started"
    assert body["started_at"].endswith("Z")
    run = store.read_run(RUNNER, "job-1").record.model_dump()
    assert run["state"] == "started" and run["inputs_sha256"] == "ab" * 32 and run["run_manifest_sha256"] == "cd" * 32


def test_run_start_repeat_with_same_metadata_returns_same_started_at(api: Api) -> None:
    api.issue(RUNNER, 1)
    api.consume("job-1")
    first = api.run_start("job-1").json()
    again = api.run_start("job-1")
    assert again.status_code == 200 and again.json() == first


def test_run_start_with_other_metadata_is_409(api: Api) -> None:
    api.issue(RUNNER, 1)
    api.consume("job-1")
    api.run_start("job-1")
    for fields in ({"project_id": "acme-other"}, {"inputs_sha256": "ef" * 32}, {"run_manifest_sha256": "00" * 32}):
        response = api.run_start("job-1", **fields)
        assert (response.status_code, error_code(response)) == (409, "run_state_conflict"), fields


def test_run_start_before_consume_is_422(api: Api) -> None:
    api.issue(RUNNER, 1)
    response = api.run_start("never-consumed")
    assert (response.status_code, error_code(response)) == (422, "lifecycle_violation")
    # Another principal's consumed run is not the caller's.
    api.consume("job-1")
    other = api.run_start("job-1", as_user="someone@else.example")
    assert (other.status_code, error_code(other)) == (422, "lifecycle_violation")


def test_run_start_of_completed_run_is_409(api: Api) -> None:
    api.issue(RUNNER, 1)
    api.consume("job-1")
    api.run_start("job-1")
    assert api.run_complete("job-1").status_code == 200
    response = api.run_start("job-1")
    assert (response.status_code, error_code(response)) == (409, "run_state_conflict")


def test_container_image_must_be_digest_pinned(api: Api) -> None:
    api.issue(RUNNER, 4)
    api.consume("job-1")
    for image in (
        "europe-docker.pkg.dev/acme/jobs/render:1.4",
        "render",
        f"render@sha256:{DIGEST[:-1]}",
        f"render@sha256:{DIGEST.upper()}",
        f"render@sha512:{DIGEST}",
        f"Render@sha256:{DIGEST}",
    ):
        response = api.run_start("job-1", container_image=image)
        assert (response.status_code, error_code(response)) == (400, "invalid_request"), image
        # Said in words, not as the regular expression.
        assert response.json()["error"]["message"] == (
            "container_image: must be a digest-pinned image, NAME[:TAG]@sha256:<64 lower-case hex> (a bare tag proves nothing)"
        )
    bad_project = api.run_start("job-1", project_id="Acme")
    assert bad_project.json()["error"]["message"].startswith("project_id: must be a Google Cloud project id: 6 to 30 characters")
    for n, image in enumerate((f"render@sha256:{DIGEST}", f"localhost:5000/a/b:v1@sha256:{DIGEST}", f"gcr.io/p/x@sha256:{DIGEST}")):
        api.consume(f"ok-{n}")
        assert api.run_start(f"ok-{n}", container_image=image).status_code == 200, image
        assert store.read_run(RUNNER, f"ok-{n}").record.container_image == image


def test_project_id_and_hashes_are_validated(api: Api) -> None:
    api.issue(RUNNER, 1)
    api.consume("job-1")
    for fields in (
        {"project_id": "short"},
        {"project_id": "Upper-case-1"},
        {"project_id": "ends-with-"},
        {"project_id": "x" * 31},
        {"inputs_sha256": "ab" * 31},
        {"inputs_sha256": "zz" * 32},
        {"run_manifest_sha256": 5},
        {"outputs_sha256": "ab" * 32},
    ):
        response = api.run_start("job-1", **fields)
        assert (response.status_code, error_code(response)) == (400, "invalid_request"), fields
    assert store.read_run(RUNNER, "job-1").state == "consumed"


def test_the_three_run_times_come_from_one_clock_and_match_the_seal(api: Api) -> None:
    api.issue(RUNNER, 1)
    api.consume("job-1")
    started_at = api.run_start("job-1").json()["started_at"]
    seal = json.loads(api.run_complete("job-1").json()["seal_json"])
    record = store.read_run(RUNNER, "job-1").record
    assert record.consumed_at <= record.started_at <= record.completed_at
    # The seal and the run_start answer say exactly what the record holds, to the microsecond.
    assert format_time(record.consumed_at) == seal["consumed_at"]
    assert format_time(record.started_at) == seal["started_at"] == started_at
    assert format_time(record.completed_at) == seal["completed_at"]
