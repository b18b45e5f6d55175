"""The one JSON response builder of the service (compact, UTF-8, no FastAPI encoder pass)."""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    return Response(body, status_code=status, headers=headers, media_type="application/json")
