"""The OpenAPI document says every status a route can answer.

Routes name their own errors (404 for an unknown object, 409 for a state conflict, 413 for a
large file, ...). The errors every route shares are added here, once, from what the route takes:
400 where it has parameters or a body (validation errors are 400, never FastAPI's 422), 401 and
429 where it needs an API key, 404 where its path or its ``after`` cursor names an object,
408 and 413 where it takes a body (with this server's limits in their descriptions), 500
everywhere. Every response documents the ``x-request-id`` header."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from app.core.metrics_access import restricted
from app.core.settings import Settings
from app.schemas import ErrorResponse

_ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
_REQUEST_ID = {
    "description": "The request's id, as the server logs name it",
    "schema": {"type": "string"},
}
_SHARED = {
    "400": "Invalid request: a parameter or the body is malformed or out of bounds",
    "401": "Missing or wrong API key",
    "404": "No such object in this organization",
    "429": "Rate limit reached for this API key",
    "500": "The server had an error (details are in its log, under the x-request-id)",
}
_METHODS = {"get", "put", "post", "delete", "patch", "head", "options"}


def install(app: FastAPI, settings: Settings) -> None:
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document_errors(build(), settings)
        assert app.openapi_schema is not None  # build() keeps its result there
        return app.openapi_schema

    # Replacing the method is how FastAPI documents customising the schema.
    app.openapi = openapi  # type: ignore[method-assign]


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR_REF}}}


def _shared_codes(operation: dict[str, Any]) -> list[str]:
    parameters = operation.get("parameters", [])
    codes = ["500"]
    if parameters or "requestBody" in operation:
        codes.append("400")
    if operation.get("security"):
        codes += ["401", "429"]
    # A path names an object; an ``after`` cursor names one too (an unknown one is a 404).
    if any(p.get("in") == "path" or p.get("name") == "after" for p in parameters):
        codes.append("404")
    return codes


def _is_fastapi_validation_error(response: dict[str, Any] | None) -> bool:
    schema = (response or {}).get("content", {}).get("application/json", {}).get("schema", {})
    return bool(schema.get("$ref", "").endswith("/HTTPValidationError"))


def _document_body_limits(operation: dict[str, Any], settings: Settings) -> None:
    """The bounds RequestGuard (app/api/guard.py) puts on a body, where a route takes one."""
    content = operation.get("requestBody", {}).get("content", {})
    if not content:
        return
    responses = operation["responses"]
    timeout = settings.request_body_timeout_seconds
    responses["408"] = _error(
        f"The request body stalled: nothing arrived for {timeout:g} s "
        "(request_body_timeout_seconds)"
    )
    if "multipart/form-data" in content:
        too_large = f"File over {settings.max_upload_bytes} bytes (max_upload_bytes)"
    else:
        too_large = f"Request body over {settings.max_json_body_bytes} bytes (max_json_body_bytes)"
    responses["413"] = _error(too_large)


def document_errors(schema: dict[str, Any], settings: Settings) -> None:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(error_schema.pop("$defs", {}))
    components.setdefault("ErrorResponse", error_schema)
    for item in schema.get("paths", {}).values():
        for method, operation in item.items():
            if method not in _METHODS:
                continue
            responses = operation.setdefault("responses", {})
            # Validation errors leave as a 400 envelope (app/api/errors.py), never as FastAPI's
            # 422; a route may still declare a 422 of its own.
            if _is_fastapi_validation_error(responses.get("422")):
                responses.pop("422")
            for code in _shared_codes(operation):
                responses.setdefault(code, _error(_SHARED[code]))
            _document_body_limits(operation, settings)
            for response in responses.values():
                response.setdefault("headers", {})["x-request-id"] = _REQUEST_ID
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    _document_metrics_access(schema, settings)


def _document_metrics_access(schema: dict[str, Any], settings: Settings) -> None:
    """/metrics refuses what ``metrics_allow`` and ``metrics_token`` keep out, when set."""
    operation = schema.get("paths", {}).get("/metrics", {}).get("get")
    if operation is None or not restricted(settings):
        return
    responses = operation.setdefault("responses", {})
    refused = []
    if settings.metrics_allow:
        refused.append("the client's address is not in metrics_allow")
    if settings.metrics_token is not None:
        schemes = schema["components"].setdefault("securitySchemes", {})
        schemes["MetricsToken"] = {
            "type": "http",
            "scheme": "bearer",
            "description": "The server's metrics_token",
        }
        operation["security"] = [{"MetricsToken": []}]
        refused.append("the bearer token is not metrics_token")
        responses["401"] = _error("No bearer token (metrics_token is set)")
    responses["403"] = _error("Refused: " + "; or ".join(refused))
    for code in ("401", "403"):
        if code in responses:
            responses[code].setdefault("headers", {})["x-request-id"] = _REQUEST_ID
