"""Request and response models of the HTTP API (they are also its OpenAPI schema, with examples).

Policies the models document (and the service enforces):
- `history` is oldest first, newest last (the order of `/events`). Items the bundle does not know are
  skipped and listed in `unknown_items`; if none is left and there is no query, the request is a 422.
  A history longer than the model's `max_history` is cut to the newest items (`history_truncated`).
- A query is text: emoji and any script are fine; NUL and other control characters (except tab and
  newline) and lone UTF-16 surrogates are refused with 422, as are queries over `serve.max_query_chars`
  (enforced in the route, so the limit follows the config).
- Unknown JSON fields are refused (a typo such as `histroy` must not silently change the result).

The OpenAPI schema states these rules as far as JSON Schema can (patterns for ids and queries, the
"query, history or user_id" rule as an `anyOf`, integer item ids), so a schema-valid request is
only refused for what depends on server state: items not in the catalog (`unknown_items`), a user
without stored history (`no_history`), a bundle that fails its checks (`invalid_bundle`), or a
body over the size limit. `tests/test_service_fuzz.py` holds the service to exactly that.
"""

from __future__ import annotations

import math
import re
import unicodedata
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    WithJsonSchema,
    field_validator,
)

MAX_K = 1000
MAX_ID_CHARS = 256
INT_IDS = (-(2**53 - 1), 2**53 - 1)  # integer ids: JSON's exactly representable range (JavaScript's safe integers)
_ALLOWED_CONTROL = {"\t", "\n", "\r"}

# The text rules of `check_text` as JSON Schema patterns (ECMA-262 and Python `re` read them alike):
# no C0/C1 control characters except tab, newline and carriage return (lone surrogates cannot be
# sent as UTF-8 at all); ids must also hold a non-space character; path ids no '/'.
_TEXT_CHAR = r"[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]"
_ID_SOLID = r"[^\s\x00-\x1f\x7f-\x9f]"
TEXT_PATTERN = f"^{_TEXT_CHAR}*$"
ID_PATTERN = f"^{_TEXT_CHAR}*{_ID_SOLID}{_TEXT_CHAR}*$"
PATH_ID_PATTERN = ID_PATTERN.replace("[^", "[^/")


def _id_to_str(value: Any) -> Any:
    """Item ids are strings; JSON integers (MovieLens-style ids, within +-(2**53 - 1)) are taken as their text."""
    value = _integral(value)  # JSON Schema's integer includes 12.0
    if isinstance(value, int) and not isinstance(value, bool):
        if not INT_IDS[0] <= value <= INT_IDS[1]:
            raise ValueError("integer item ids must be within +-(2**53 - 1); send larger ids as strings")
        return str(value)
    return value


def _integral(value: Any) -> Any:
    """JSON Schema's `integer` includes 10.0: a float with no fraction is that integer (booleans stay refused)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# Exactly the characters check_text refuses: category Cc (U+0000-001F, U+007F-009F) but tab, newline and
# carriage return, and category Cs (surrogates). One C-speed scan instead of a Python loop per character:
# a /search body holds up to max_history ids, and the loop was ~0.2 ms of a 50-id request.
_REFUSED_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def check_text(value: str, what: str) -> str:
    """Refuse control characters and lone surrogates (which cannot even be encoded as UTF-8)."""
    if _REFUSED_CHARS.search(value) is None:
        return value
    for ch in value:  # which one, for the message
        cat = unicodedata.category(ch)
        if cat == "Cs":
            raise ValueError(f"{what} contains a lone UTF-16 surrogate (U+{ord(ch):04X}); send valid Unicode")
        if cat == "Cc" and ch not in _ALLOWED_CONTROL:
            raise ValueError(f"{what} contains the control character U+{ord(ch):04X}")
    return value


def check_id(value: str, what: str = "id") -> str:
    """`check_text`, and not blank."""
    check_text(value, what)
    if not value.strip():
        raise ValueError("ids must not be blank")
    return value


_LEAP_SECOND = re.compile(r"^(\d{4}-\d\d-\d\d[T ]\d\d:\d\d:)60")


def _parse_time(value: Any) -> float:
    """Unix seconds (a number >= 0) or an ISO 8601 / RFC 3339 time (naive = UTC) -> Unix seconds.

    Times before 1970 given as text become negative Unix seconds (stored as given); RFC 3339's
    lowercase 't'/'z' and a leap second (:60, read as :59) are accepted.
    """
    if isinstance(value, bool):
        raise ValueError("must be Unix seconds or an ISO 8601 time, not a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError("must be a finite, non-negative Unix time")
        return seconds
    if not isinstance(value, str):
        raise ValueError("must be Unix seconds or an ISO 8601 time")
    text = _LEAP_SECOND.sub(r"\g<1>59", value.strip().upper())
    try:
        parsed = datetime.fromisoformat(text)
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
    except (ValueError, OverflowError):
        raise ValueError(f"{value[:40]!r} is neither Unix seconds nor an ISO 8601 time") from None


Timestamp = Annotated[
    float,
    BeforeValidator(_parse_time),
    WithJsonSchema({"anyOf": [{"type": "number", "minimum": 0}, {"type": "string", "format": "date-time"}]}),
]
_ID_TEXT = {"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS, "pattern": ID_PATTERN}
ItemId = Annotated[
    str,
    BeforeValidator(_id_to_str),
    Field(min_length=1, max_length=MAX_ID_CHARS),
    WithJsonSchema({"anyOf": [_ID_TEXT, {"type": "integer", "minimum": INT_IDS[0], "maximum": INT_IDS[1]}]}),
]
UserId = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS, json_schema_extra={"pattern": ID_PATTERN})]
K = Annotated[StrictInt, BeforeValidator(_integral)]


SOMETHING_TO_SEARCH = [
    {"required": ["query"], "properties": {"query": {"type": "string", "pattern": r"\S"}}},
    {"required": ["history"], "properties": {"history": {"type": "array", "minItems": 1}}},
    {"required": ["user_id"], "properties": {"user_id": {"type": "string"}, "history": {"type": "null"}}},
]


def _something_to_search(schema: dict[str, Any]) -> None:
    """A non-blank query, a non-empty history, or a user_id without `history` (whose stored history is used)."""
    schema["examples"] = [
        {"query": "red running shoes", "history": ["i0000012", "i0000345"], "k": 10},
        {"user_id": "u42", "query": "gift for dad", "k": 20, "exclude_history": False},
    ]
    schema["anyOf"] = SOMETHING_TO_SEARCH


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _SearchInput(_Strict):
    """(user_id, query, history): what h_t is computed from, for `/search` and `/embed` alike."""

    user_id: UserId | None = Field(
        None, description="Whose stored history to use when `history` is absent (ignored when it is given)."
    )
    query: str | None = Field(
        None,
        description="Query text (any language, emoji fine); blank means no query. At most serve.max_query_chars.",
        json_schema_extra={"pattern": TEXT_PATTERN},
    )
    history: list[ItemId] | None = Field(
        None,
        description="Clicked item ids, oldest first. Given: used as is (Redis is not read). Absent: read by user_id.",
    )

    @field_validator("query")
    @classmethod
    def _query_text(cls, value: str | None) -> str | None:
        return None if value is None else check_text(value, "query")

    @field_validator("user_id")
    @classmethod
    def _user(cls, value: str | None) -> str | None:
        return None if value is None else check_id(value)

    @field_validator("history")
    @classmethod
    def _history_ids(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            for item in value:
                check_id(item)
        return value


class SearchRequest(_SearchInput):
    """Search with a query, a history, or both; without `history`, the history is read from Redis by `user_id`."""

    k: K = Field(10, ge=1, le=MAX_K, description=f"How many items to return (1..{MAX_K}).")
    exclude_history: StrictBool = Field(True, description="Leave the history's items out of the results.")

    model_config = ConfigDict(extra="forbid", json_schema_extra=_something_to_search)


class ScoredItem(_Strict):
    item_id: str
    score: float = Field(description="Inner product of h_t and the item embedding (both unit length).")
    title: str | None = Field(None, description="The catalog title, where the bundle has one.")


class Timings(_Strict):
    """Milliseconds per stage of this request (the batch's share for featurize/encode/search)."""

    history: float = Field(description="Reading the history from Redis (0 when the request carried it).")
    featurize: float = Field(description="Resolving item ids, tokenising, gathering history features.")
    queue: float = Field(description="Waiting for the encoder (micro-batch forming and earlier batches).")
    encode: float = Field(description="The ONNX query encoder for this request's batch.")
    search: float = Field(description="FAISS top-k for the batch, plus exclusions.")
    total: float = Field(description="From the request's arrival to the response being built.")


class SearchResponse(_Strict):
    items: list[ScoredItem]
    model_version: str
    timings_ms: Timings
    history_used: int = Field(description="History items fed to the model (known, newest max_history).")
    history_truncated: int = Field(description="Known history items left out because the history was too long.")
    unknown_items: list[str] = Field(description="History item ids the bundle does not know (skipped), in order.")
    batch_size: int = Field(description="Requests encoded together with this one (micro-batching).")
    query_truncated: bool = Field(
        False, description="True when the query had more tokens than the bundle's max_query_tokens (the rest unread)."
    )
    degraded: bool = Field(
        False, description="True when the user's stored history could not be read (Redis down): query alone."
    )
    degraded_reason: str | None = Field(None, description="Why the answer is degraded (only when `degraded`).")

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "items": [{"item_id": "i0000077", "score": 0.83, "title": "Taya red mesh running shoes"}],
                    "model_version": "9cf4f4f53e11b1e0",
                    "timings_ms": {
                        "history": 0.0,
                        "featurize": 0.05,
                        "queue": 0.02,
                        "encode": 0.9,
                        "search": 0.1,
                        "total": 1.3,
                    },
                    "history_used": 2,
                    "history_truncated": 0,
                    "unknown_items": [],
                    "batch_size": 1,
                    "query_truncated": False,
                    "degraded": False,
                }
            ]
        },
    )


MAX_BATCH_INPUTS = 1024  # hard cap of a batch body's `inputs` (serve.max_batch_inputs is the configured one)


def _batch_examples(schema: dict[str, Any]) -> None:
    schema["examples"] = [
        {
            "inputs": [
                {"query": "red running shoes", "history": ["i0000012", "i0000345"], "k": 5},
                {"user_id": "u42", "query": "gift for dad", "k": 5},
            ]
        }
    ]


class BatchSearchRequest(_Strict):
    """Many searches in one request (TEI's `inputs` habit): each input is a `/search` body.

    The inputs are encoded together (they join the same micro-batches as single requests), and the
    answer lists one result per input, in order. Any input that would fail alone fails the whole
    request, with the error naming it (`inputs[3].query`): nothing is half-answered.
    """

    inputs: list[SearchRequest] = Field(
        min_length=1, max_length=MAX_BATCH_INPUTS, description="The searches (at most serve.max_batch_inputs)."
    )

    model_config = ConfigDict(extra="forbid", json_schema_extra=_batch_examples)


class BatchSearchResponse(_Strict):
    results: list[SearchResponse] = Field(description="One result per input, in the order of `inputs`.")
    model_version: str
    timings_ms: dict[str, float] = Field(description="`total`: from arrival to the response being built.")


def _embed_input_rule(schema: dict[str, Any]) -> None:
    schema["anyOf"] = SOMETHING_TO_SEARCH
    schema["examples"] = [{"query": "gift mug", "history": ["i0000012"]}, {"user_id": "u42"}]


class EmbedInput(_SearchInput):
    """What one h_t is computed from: the same (user_id, query, history) rules as `/search`."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_embed_input_rule)


EncodingFormat = Literal["float", "base64"]


def _embed_examples(schema: dict[str, Any]) -> None:
    schema["examples"] = [
        {"inputs": [{"query": "red running shoes", "history": ["i0000012", "i0000345"]}], "item_ids": ["i0000077"]}
    ]
    schema["anyOf"] = [
        {"required": ["inputs"], "properties": {"inputs": {"type": "array", "minItems": 1}}},
        {"required": ["item_ids"], "properties": {"item_ids": {"type": "array", "minItems": 1}}},
    ]


class EmbedRequest(_Strict):
    """Next-interest embeddings h_t (what `/search` searches the index with) and/or item vectors."""

    inputs: list[EmbedInput] = Field(
        default_factory=list,
        max_length=MAX_BATCH_INPUTS,
        description="h_t to compute (at most serve.max_batch_inputs).",
    )
    item_ids: list[ItemId] = Field(
        default_factory=list,
        max_length=MAX_K,
        description="Items whose embeddings (as the index holds them) to return; unknown ids are a 422.",
    )
    encoding_format: EncodingFormat = Field(
        "float", description="`float`: JSON numbers; `base64`: little-endian float32 bytes, base64 (4 bytes/value)."
    )

    model_config = ConfigDict(extra="forbid", json_schema_extra=_embed_examples)

    @field_validator("item_ids")
    @classmethod
    def _item_ids(cls, value: list[str]) -> list[str]:
        for item in value:
            check_id(item)
        return value


Vector = list[float] | str  # a float list, or base64 float32 with encoding_format=base64


class EmbedInfo(_Strict):
    history_used: int = Field(description="History items fed to the model (known, newest max_history).")
    history_truncated: int = Field(description="Known history items left out because the history was too long.")
    unknown_items: list[str] = Field(description="History item ids the bundle does not know (skipped).")
    query_truncated: bool = Field(description="The query had more tokens than the bundle's max_query_tokens.")
    degraded: bool = Field(description="The stored history could not be read (Redis down): query alone.")


class EmbedResponse(_Strict):
    model_version: str
    dim: int = Field(description="Embedding dimension (h_t and item vectors share it; both unit length).")
    embeddings: list[Vector] = Field(description="h_t per input, in order.")
    inputs: list[EmbedInfo] = Field(description="What each input's h_t was computed from, in order.")
    item_vectors: list[Vector] = Field(description="Per `item_ids` entry, in order.")
    timings_ms: dict[str, float]


def _openai_examples(schema: dict[str, Any]) -> None:
    schema["examples"] = [
        {"input": ["red running shoes", "gift for dad"], "model": "karma"},
        {"input": "gift for dad", "model": "karma", "user": "u42", "encoding_format": "base64"},
    ]


class OpenAIEmbeddingsRequest(BaseModel):
    """OpenAI's `/v1/embeddings` body: each `input` string is a query; `user` picks a stored history.

    Clients that already speak OpenAI's embeddings API (the `openai` SDK, LangChain, LlamaIndex) get
    h_t with no new code. `user` is the user id whose Redis history conditions every input (OpenAI
    meant it for abuse tracking; here it personalises); without it, h_t is the query's alone. Token
    arrays are refused (send text). `dimensions`, when given, must equal the model's dimension
    (h_t is not a Matryoshka embedding: a prefix of it is not a smaller embedding).
    """

    input: Annotated[
        str | list[str],
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "string", "pattern": ID_PATTERN},  # text with a non-space character
                    {"type": "array", "minItems": 1, "items": {"type": "string", "pattern": ID_PATTERN}},
                ]
            }
        ),
    ] = Field(description="One query or a list of queries (at most serve.max_batch_inputs), none blank.")
    model: str | None = Field(None, max_length=MAX_ID_CHARS, description="Accepted and ignored (one model is served).")
    encoding_format: EncodingFormat = Field("float", description="`float` or `base64` (little-endian float32).")
    dimensions: K | None = Field(None, description="Must equal the served dimension (else 422 unsupported_dimensions).")
    user: UserId | None = Field(None, description="User id whose stored click history conditions h_t.")

    model_config = ConfigDict(extra="forbid", json_schema_extra=_openai_examples)

    @field_validator("input", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        if isinstance(value, list) and any(not isinstance(v, str) for v in value):
            raise ValueError("token arrays are not supported: send the input as text")
        if isinstance(value, list) and not 1 <= len(value) <= MAX_BATCH_INPUTS:
            raise ValueError(f"give 1 to {MAX_BATCH_INPUTS} inputs")
        return value

    @field_validator("input")
    @classmethod
    def _input_text(cls, value: str | list[str]) -> str | list[str]:
        for text in [value] if isinstance(value, str) else value:
            check_text(text, "input")  # blank inputs are refused by the route, which can name input[i]
        return value

    @field_validator("user")
    @classmethod
    def _user_id(cls, value: str | None) -> str | None:
        return None if value is None else check_id(value, "user")


class OpenAIEmbedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Vector


class OpenAIUsage(BaseModel):
    prompt_tokens: int = Field(description="Query tokens read (at most max_query_tokens per input).")
    total_tokens: int


class OpenAIEmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIEmbedding]
    model: str = Field(description="The served model version.")
    usage: OpenAIUsage


class EventRequest(_Strict):
    """One click: appended to the user's history (bounded to the model's max_history, oldest dropped)."""

    user_id: UserId
    item_id: ItemId
    timestamp: Timestamp | None = Field(
        None, description="When it happened: ISO 8601 or Unix seconds (default: now). Stored, not re-ordered."
    )
    event_id: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_ID_CHARS,
        description=(
            "Idempotency key: a retry with the same id (within serve.event_id_ttl_s) records nothing and answers "
            "`duplicate: true`. Default: a fresh id per request (then a client's retry is a new click)."
        ),
        json_schema_extra={"pattern": ID_PATTERN},
    )

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"user_id": "u42", "item_id": "i0000012", "timestamp": 1767225600.0, "event_id": "c-7f3a9e01"}]
        },
    )

    @field_validator("user_id", "item_id")
    @classmethod
    def _ids(cls, value: str) -> str:
        return check_id(value)

    @field_validator("event_id")
    @classmethod
    def _event_id(cls, value: str | None) -> str | None:
        return None if value is None else check_id(value, "event_id")

    def epoch_seconds(self, now: float) -> float:
        return now if self.timestamp is None else self.timestamp


class EventResponse(_Strict):
    user_id: str
    item_id: str
    history_length: int = Field(description="Length of the user's stored history after this event.")
    event_id: str = Field(description="The event's id (the client's, or a fresh one).")
    duplicate: bool = Field(description="True when this event id was already recorded: nothing was appended.")


class HistoryItem(_Strict):
    item_id: str
    timestamp: float = Field(description="Unix seconds.")


class HistoryResponse(_Strict):
    user_id: str
    items: list[HistoryItem] = Field(description="Oldest first.")
    max_events: int = Field(description="How many events are kept per user (serve.history_max_events).")
    max_history: int = Field(description="How many of the newest the served model reads (the bundle's max_history).")


MAX_UPSERT_ITEMS = 1000  # hard cap of a POST /items body (serve.max_upsert_items is the configured one)
MAX_ITEM_TEXT_CHARS = 8192  # per text field
MAX_VISUAL_DIM = 4096


def _finite(values: list[float] | None) -> list[float] | None:
    if values is not None and not all(math.isfinite(v) for v in values):
        raise ValueError("visual values must be finite numbers (no NaN or infinity)")
    return values


ItemText = Annotated[str, Field(max_length=MAX_ITEM_TEXT_CHARS, json_schema_extra={"pattern": TEXT_PATTERN})]
MAX_VISUAL_VALUE = 1e6  # frozen visual vectors are unit-scale; far larger values would overflow the item tower
VisualValue = Annotated[float, Field(ge=-MAX_VISUAL_VALUE, le=MAX_VISUAL_VALUE)]


class NewItemBody(_Strict):
    """One item to add or replace: its id, its catalog text and, optionally, its visual vector."""

    item_id: ItemId
    text: ItemText | dict[str, ItemText] = Field(
        description=(
            "The item's text: an object of the bundle's text fields (`/info` items.text_fields, e.g. "
            '{"title": ..., "genres": ...}; this schema lists the served ones), or one string taken as the first field.'
        )
    )
    visual: list[VisualValue] | None = Field(
        None,
        max_length=MAX_VISUAL_DIM,
        description="The item's frozen visual vector, when the bundle has a visual block (`/info` "
        "items.visual_dim wide); absent: zeros, as training gave items without an image.",
    )

    @field_validator("item_id")
    @classmethod
    def _id(cls, value: str) -> str:
        return check_id(value, "item_id")

    @field_validator("text")
    @classmethod
    def _text(cls, value: str | dict[str, str]) -> str | dict[str, str]:
        for part in [value] if isinstance(value, str) else value.values():
            check_text(part, "text")
        return value

    @field_validator("visual")
    @classmethod
    def _visual(cls, value: list[float] | None) -> list[float] | None:
        return _finite(value)


class ItemsRequest(_Strict):
    """Items to index now, by id: a new id is added, an id already served is replaced (same row).
    An id given twice in one body: the later one counts (one entry in the answer)."""

    items: list[NewItemBody] = Field(
        min_length=1, max_length=MAX_UPSERT_ITEMS, description="At most serve.max_upsert_items items."
    )

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"items": [{"item_id": "new-42", "text": {"title": "Solar lantern", "genres": "Garden"}}]}]
        },
    )


class UpsertedItem(_Strict):
    item_id: str
    row: int = Field(description="The item's row in the served catalog (stable; new items get rows past the bundle's).")
    created: bool = Field(description="True: a new item; False: an item already served was replaced.")


class ItemsResponse(_Strict):
    items: list[UpsertedItem]
    model_version: str
    backend: str = Field(description="The index backend that holds them (serve.index_backend).")
    shared: bool = Field(description="True: every replica sees them and they survive restarts (Milvus).")
    note: str = Field(description="Where the change lives (this replica only, or every replica).")
    timings_ms: dict[str, float] = Field(description="encode (text + item encoders) and index, milliseconds.")


class DeletedItem(_Strict):
    item_id: str
    row: int
    model_version: str
    backend: str
    shared: bool
    note: str


class ErrorBody(_Strict):
    error: str = Field(description="What went wrong, readable.")
    type: str = Field(description="Machine-readable kind, e.g. validation_error, queue_full, redis_unavailable.")
    field: str | None = Field(None, description="The request field at fault, when there is one.")

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {"error": "k: Input should be less than or equal to 1000", "type": "validation_error", "field": "k"}
            ]
        },
    )


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorBody, "description": "Body over serve.max_body_bytes."},
    422: {"model": ErrorBody, "description": "Malformed JSON, wrong types, out-of-range values, unknown items."},
    429: {"model": ErrorBody, "description": "Encoder queue full; retry after Retry-After seconds."},
    503: {"model": ErrorBody, "description": "Not ready, draining, or Redis needed and down."},
}
