"""Admin routes (bearer API key): `POST /admin/reload` swaps the served bundle without a restart.

Authentication: `Authorization: Bearer <serve.admin_api_key>` (set it with the environment variable
`KARMA_SERVE__ADMIN_API_KEY`; keys are compared in constant time). Without a configured key the
admin routes are disabled (403 `admin_disabled`); a missing, malformed or wrong key is 401
`unauthorized` (with `WWW-Authenticate: Bearer`). The key is checked before the request body is
validated, but after it is parsed as JSON (FastAPI reads the body first), so malformed JSON is a
422 even without a key; nothing about the server is revealed by it.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.responses import Response

from service.errors import ErrorType, ServiceError
from service.responses import json_response
from service.schemas import ID_PATTERN, ErrorBody, check_id

MAX_PATH_CHARS = 4096

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="AdminKey",
    description="serve.admin_api_key (env KARMA_SERVE__ADMIN_API_KEY), sent as `Authorization: Bearer <key>`.",
)


async def require_admin(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    """Refuse the request unless admin routes are enabled and it carries the right bearer key."""
    key = request.app.state.svc.config.admin_api_key
    if key is None:
        raise ServiceError(
            ErrorType.ADMIN_DISABLED,
            "admin routes are disabled: no serve.admin_api_key is configured (set KARMA_SERVE__ADMIN_API_KEY)",
        )
    challenge = {"WWW-Authenticate": 'Bearer realm="karma-admin"'}
    if credentials is None:
        message = "admin routes need the header 'Authorization: Bearer <admin API key>'"
        raise ServiceError(ErrorType.UNAUTHORIZED, message, headers=challenge)
    if not hmac.compare_digest(credentials.credentials.encode(), key.encode()):
        raise ServiceError(ErrorType.UNAUTHORIZED, "wrong admin API key", headers=challenge)


class ReloadRequest(BaseModel):
    """Which bundle to serve next; without `bundle`, the served folder is read again (e.g. replaced in place)."""

    bundle: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_PATH_CHARS,
        description="Bundle folder on the server, relative to serve.bundle_root (or absolute, under it).",
        json_schema_extra={"pattern": ID_PATTERN},
    )

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"bundle": "2026-12-01"}]})

    @field_validator("bundle")
    @classmethod
    def _path_text(cls, value: str | None) -> str | None:
        return None if value is None else check_id(value, "bundle")


class ReloadResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_version: str = Field(description="The bundle now served (every new /search reports it).")
    previous_model_version: str
    bundle: str = Field(description="The bundle now served, relative to serve.bundle_root.")
    n_items: int
    embed_dim: int
    seconds: float = Field(description="Load + validate + probe + warm-up time.")


ADMIN_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "No `Authorization: Bearer` key, or the wrong one."},
    403: {"model": ErrorBody, "description": "Admin routes are disabled (no serve.admin_api_key configured)."},
    409: {"model": ErrorBody, "description": "Another reload is in progress."},
    413: {"model": ErrorBody, "description": "Body over serve.max_body_bytes."},
    422: {
        "model": ErrorBody,
        "description": "Bad request body, or `invalid_bundle`: the bundle failed a check (the old one keeps serving).",
    },
    503: {"model": ErrorBody, "description": "Not ready or draining."},
}

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])


@router.post("/reload", response_model=ReloadResponse, responses=ADMIN_RESPONSES, summary="Hot-reload the bundle")
async def reload(request: Request, body: Annotated[ReloadRequest | None, Body()] = None) -> Response:
    """Load a bundle beside the served one (validation, sessions, a probe inference, a warm-up batch),
    then swap atomically: requests in flight finish on the old bundle, new ones get the new bundle.

    A bundle that fails any check is refused with 422 `invalid_bundle` naming the problem, and the
    old bundle keeps serving. Bundles may differ in anything (dims, catalog, index type).
    """
    directory = Path(body.bundle) if body is not None and body.bundle is not None else None
    return json_response(await request.app.state.svc.reload(directory))
