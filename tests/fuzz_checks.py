"""Schemathesis hooks for `tests/test_service_fuzz.py` (loaded with SCHEMATHESIS_HOOKS).

`positive_data_acceptance_stateful` replaces schemathesis' `positive_data_acceptance`, which wants
every schema-valid request accepted. A schema cannot know server state, so this version also lets
a schema-valid request be refused when, and only when, the refusal is about that state:

- 422 `unknown_items`   the item ids are not in the served catalog;
- 422 `no_history`      a search by `user_id` alone, and Redis holds no history for that user;
- 422 `invalid_bundle`  `/admin/reload` named a folder that is not a valid bundle;
- 422 `unsupported_dimensions` `/v1/embeddings` asked for a dimension the served model does not have;
- 413 `payload_too_large` the body is over `serve.max_body_bytes` (a transport limit).

Any other 4xx for schema-valid input (e.g. a 422 `validation_error`) is a schema-conformance bug.
"""

from __future__ import annotations

import schemathesis

ACCEPTED = {"2xx", "3xx", 401, 403, 404, 409, 429}
STATE_DEPENDENT = {
    (422, "unknown_items"),
    (422, "no_history"),
    (422, "invalid_bundle"),
    (422, "unsupported_dimensions"),
    (413, "payload_too_large"),
}


@schemathesis.check
def positive_data_acceptance_stateful(ctx, response, case) -> bool | None:
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return None
    status = response.status_code
    if status < 400 or status >= 500 or status in ACCEPTED:
        return None  # 5xx is `not_a_server_error`'s job
    try:
        kind = response.json().get("type")
    except Exception:  # not our typed JSON error at all
        kind = None
    if (status, kind) in STATE_DEPENDENT:
        return None
    raise AssertionError(
        f"schema-valid request refused with {status} {kind!r}; only state-dependent refusals "
        f"{sorted(STATE_DEPENDENT)} are allowed: {response.text[:300]}"
    )
