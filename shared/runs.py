"""Run lifecycle service: run_start records what runs (run_complete, which seals, lives in seals.py)."""

from __future__ import annotations

import datetime as dt

from shared import errors, store
from shared.auth import Identity
from shared.models import RunStartRequest, RunStartResponse, format_time

START_FIELDS = ("container_image", "project_id", "inputs_sha256", "run_manifest_sha256")


def run_start(caller: Identity, req: RunStartRequest) -> RunStartResponse:
    """Mark a consumed run started; an identical repeat is answered with the first started_at."""
    metadata = {name: getattr(req, name) for name in START_FIELDS}

    def attempt() -> RunStartResponse:
        run = store.read_run(caller.principal, req.run_id)
        if run is None:
            raise errors.LifecycleViolation(f"run_id {req.run_id!r} was not consumed by this principal")
        if run.state == "completed":
            raise errors.RunStateConflict(f"run_id {req.run_id!r} is already completed")
        if run.state == "started":
            assert run.record.started_at is not None
            if any(getattr(run.record, name) != value for name, value in metadata.items()):
                raise errors.RunStateConflict(f"run_id {req.run_id!r} was started with other metadata")
            return RunStartResponse(run_id=req.run_id, state="started", started_at=format_time(run.record.started_at))
        # The time is taken here, as consumed_at and completed_at are, so that response and record agree exactly.
        started_at = dt.datetime.now(dt.UTC)
        store.commit_run_start(caller.principal, run, metadata, started_at=started_at)
        return RunStartResponse(run_id=req.run_id, state="started", started_at=format_time(started_at))

    return store.optimistic(attempt)
