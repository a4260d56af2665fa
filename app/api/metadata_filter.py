"""The metadata filter of ``GET /v1/fine_tuning/jobs``, as OpenAI's SDK sends it
(``metadata[key]=value``, or ``metadata=null``), read from the query string."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from app.core.errors import InvalidRequest

MAX_METADATA_FILTERS = 16
# The filter as the SDK sends it (metadata[key]=value), stated for OpenAPI; list_jobs reads it
# from the query string itself (metadata_filter), as FastAPI has no deepObject parameters.
METADATA_PARAMETER: dict[str, Any] = {
    "name": "metadata",
    "in": "query",
    "required": False,
    "style": "deepObject",
    "explode": True,
    "description": "Jobs whose metadata holds every given pair: metadata[key]=value (at most "
    f"{MAX_METADATA_FILTERS} pairs, keys of 1-64 characters without '[', values up to "
    "512; an empty value matches an empty string). metadata=null lists the jobs created "
    "without metadata; the two forms cannot be combined.",
    "schema": {
        "anyOf": [
            {
                "type": "object",
                "maxProperties": MAX_METADATA_FILTERS,
                "propertyNames": {"minLength": 1, "maxLength": 64, "pattern": r"^[^\[]+$"},
                "additionalProperties": {"type": "string", "maxLength": 512},
            },
            {"type": "null"},
        ]
    },
}


def _bad_metadata(message: str) -> InvalidRequest:
    return InvalidRequest(message, param="metadata")


def metadata_filter(request: Request) -> tuple[dict[str, str], bool]:
    """The list's metadata filter from the query string: the metadata[key]=value pairs, and
    whether metadata=null (jobs without metadata) was asked for."""
    pairs: dict[str, str] = {}
    null = False
    for name, value in request.query_params.multi_items():
        if name == "metadata":
            if value != "null":
                raise _bad_metadata(
                    "Filter by metadata[key]=value pairs, or metadata=null for jobs created "
                    "without metadata."
                )
            null = True
        elif name.startswith("metadata["):
            key = name[len("metadata[") : -1] if name.endswith("]") else ""
            if not key or "[" in key:  # metadata[a][b] is not a key
                raise _bad_metadata(
                    f"'{name}' is not a metadata filter: send metadata[key]=value, with a key "
                    "of 1-64 characters without '['."
                )
            if key in pairs:
                raise _bad_metadata(f"metadata[{key}] is given more than once.")
            pairs[key] = value
    if null and pairs:
        raise _bad_metadata("metadata=null and metadata[key]=value cannot be combined.")
    if any("\x00" in k + v for k, v in pairs.items()):
        raise _bad_metadata("A metadata filter cannot hold a NUL character.")
    if len(pairs) > MAX_METADATA_FILTERS or any(
        len(k) > 64 or len(v) > 512 for k, v in pairs.items()
    ):
        raise _bad_metadata(
            f"Filter by at most {MAX_METADATA_FILTERS} metadata[key]=value pairs, keys up to 64 "
            "characters and values up to 512."
        )
    return pairs, null
