"""The API's limits and its request and response models: together, the OpenAPI schema.

Input rules, chosen so that bad input always gets a clear 4xx and never a 500:

- ``text`` must hold a non-space character and at most ``MAX_QUERY_CHARS`` characters
  (longer -> 422 rather than a silent cut; within the cap, the tokenizer still keeps only
  the model's context length, 77 tokens for CLIP, as in training).
- ``k`` must be in ``1..MAX_K`` (else 422); a ``k`` above the gallery size is clamped to it,
  and the response's ``k`` says how many were asked of the index.
- ``filters`` is a ``where`` expression string or a ``{column: value}`` object, both handed
  to the index, which binds every value as a parameter (never pasted into SQL).

(No ``from __future__ import annotations``: FastAPI reads these annotations at runtime.)
"""

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

MAX_QUERY_CHARS = 1000  # a long description is ~300 characters; CLIP reads 77 tokens
MAX_FILTER_CHARS = 2000
MAX_K = 1000
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
# pixels an uploaded query image may decode to (after JPEG draft decoding at <= 1/8 scale): 24 MP
# is ~72 MB of RGB; a 10000x10000 JPEG decodes at 1250x1250, a 10000x10000 PNG is refused (413)
MAX_UPLOAD_PIXELS = 24_000_000
MAX_BODY_BYTES = 1024 * 1024  # any other request body; a 1,000-character query is ~4 KB

# The filter field's description; create_app appends the index's columns to it in the schema.
FILTERS_DESCRIPTION = (
    "Metadata filter: either a `where` expression such as `camera = 'c3' AND time >= '2024-01-01'`, "
    "or an object of column -> value that must all match (each value compared as a bound parameter)."
)


class SearchRequest(BaseModel):
    """A text query."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"text": "a woman in a red coat with a black backpack", "k": 10}]},
    )
    text: str = Field(
        ...,
        min_length=1,
        max_length=MAX_QUERY_CHARS,
        pattern=r"\S",
        description=f"Description of the person, in natural language; at most "
        f"{MAX_QUERY_CHARS} characters and not only spaces.",
    )
    k: int = Field(
        10,
        ge=1,
        le=MAX_K,
        description=f"How many results to return (1..{MAX_K}); "
        "a k above the gallery size is clamped to the gallery size.",
    )
    filters: str | dict[str, str | int | float | bool] | None = Field(
        None, description=FILTERS_DESCRIPTION, examples=["camera = 'c3'", {"camera": "c3"}]
    )
    rescore: StrictBool = Field(
        False,
        description="Re-score the top candidates with the checkpoint's fusion encoder (ITM head) "
        "before returning the k best. Only on servers started with `--rescore` "
        "(`GET /stats` -> `rescore.available`); elsewhere a 422.",
    )

    @field_validator("filters")
    @classmethod
    def _check_filters(cls, v):
        if isinstance(v, str) and len(v) > MAX_FILTER_CHARS:
            raise ValueError(f"filter expression longer than {MAX_FILTER_CHARS} characters")
        if isinstance(v, dict):
            for key, value in v.items():
                if isinstance(value, float) and not math.isfinite(value):
                    raise ValueError(f"filter value for {key!r} must be a finite number")
        return v


class SearchHit(BaseModel):
    """One gallery item matching the query."""

    id: int = Field(..., description="Stable id of the gallery item in this index.")
    rank: int = Field(..., description="1 for the best match.")
    score: float = Field(..., description="Cosine similarity (after any re-ranking), or the re-scored value "
                         "when the response is `rescored`; higher is better.")
    cosine: float | None = Field(None, description="The dual encoder's cosine similarity, when `score` is "
                                 "a re-scored value; else null.")
    name: str = Field(..., description="File name of the image (no server path).")
    image_url: str = Field(..., description="URL of the full image (same auth as the API).")
    thumb_url: str = Field(..., description="URL of a small JPEG thumbnail.")
    metadata: dict[str, Any] = Field(..., description="width, height, mtime, sha256 and the gallery's CSV columns.")


class SearchResponse(BaseModel):
    """Ranked results, best first."""

    query: str = Field(..., description="The text searched for, or the uploaded file name.")
    k: int = Field(..., description="Number of results asked of the index (after clamping).")
    where: str | None = Field(None, description="The filter expression applied, if any.")
    results: list[SearchHit]
    took_ms: float = Field(..., description="Server time spent on this search.")
    rescored: bool = Field(False, description="Whether the top candidates were re-scored (`rescore: true`).")
    rescore_ms: float | None = Field(None, description="Time spent re-scoring (within took_ms), when rescored.")
    unknown_words: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="Query words no training caption used, each with the training words it was read as and "
                    "their weights, e.g. {\"scarlet\": {\"red\": 1.0}} ({} for a word left out; only for "
                    "checkpoints with a frozen word dictionary, {} otherwise).")


class ErrorItem(BaseModel):
    """One validation problem: where (``loc``), what (``msg``), and pydantic's ``type``."""

    loc: list[str | int]
    msg: str
    type: str


class ErrorResponse(BaseModel):
    """Any 4xx answer."""

    detail: str = Field(..., description="What was wrong, in one line.")
    errors: list[ErrorItem] | None = Field(None, description="Per-field validation errors.")


class Health(BaseModel):
    """Liveness."""

    status: str
    version: str


class Stats(BaseModel):
    """What is being served, and the server's counters."""

    items: int = Field(..., description="Number of images in the gallery.")
    embed_dim: int
    columns: list[str] = Field(..., description="Metadata columns usable in filters.")
    model: dict[str, Any] = Field(..., description="Fingerprint of the encoder that built the index.")
    index: dict[str, Any] = Field(..., description="The index's own info (sizes, search mode).")
    limits: dict[str, int]
    auth: bool = Field(..., description="Whether a token is required.")
    thumb_cache: dict[str, int]
    reloads: dict[str, int | str | None] = Field(
        ..., description="Index generations picked up since startup, and why the last reload failed (if it did)."
    )
    text_batches: dict[str, int] = Field(..., description="Encoder calls for text queries, and queries they served.")
    rescore: dict[str, Any] = Field(
        ..., description="Whether `rescore: true` is available and, if so, its k, mode and weight."
    )
    uptime_s: float


ERROR = {"model": ErrorResponse}  # the body of every documented 4xx
