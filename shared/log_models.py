"""Request and response models of the seal log's endpoints (the log's key in public_keys is models.LogKeyInfo)."""

from __future__ import annotations

from pydantic import Field

from shared.models import Model

SEAL_ID_PATTERN = r"^[A-Za-z0-9_-]{16,64}$"


class LogProofQuery(Model):
    """GET /api/log/proof: the query string."""

    seal_id: str = Field(pattern=SEAL_ID_PATTERN, description="The seal's id (16 to 64 characters of A-Z, a-z, 0-9, '_' and '-').")


class LogPath(Model):
    """GET /log/...: the path below /log/ (`checkpoint`, `tile/<L>/<N>[.p/<W>]` or `tile/entries/<N>[.p/<W>]`)."""

    path: str = Field(max_length=256, description="The resource below /log/.")


class LogResource(Model):
    """A resource of the log served as it is (a checkpoint, a tile, a proof): its bytes, media type and caching."""

    body: bytes
    media_type: str
    cache_control: str

    def csv(self) -> str:  # pragma: no cover - never asked: the log's endpoints do not answer CSV
        raise NotImplementedError


class LogIntegrateResponse(Model):
    """200 from log_integrate: what this call added to the log."""

    integrated: int = Field(description="Entries this call sequenced into the log (0 when none waited or another integrator held the lease).")
    size: int = Field(description="The log's size after this call, as its latest checkpoint says.")
