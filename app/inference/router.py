"""Inference routes: predictions for every kind of model, and embeddings. Models load and run
in worker threads, off the event loop."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from sqlalchemy.orm import Session

from app.api.deps import OrgDep, SessionDep, SettingsDep, StorageDep
from app.core.errors import InvalidRequest
from app.core.settings import Settings
from app.core.storage import Storage
from app.inference.registry import ModelCache, Use
from app.inference.schemas import (
    Embedding,
    EmbeddingRequest,
    EmbeddingResponse,
    Prediction,
    PredictionRequest,
    PredictionResponse,
    PredictionUsage,
    Usage,
)
from app.models import Organization
from app.schemas import ErrorResponse
from app.services.models import resolve_loadable

router = APIRouter(tags=["inference"])

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid input or wrong kind of model"},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
    404: {"model": ErrorResponse, "description": "No such model for this organization"},
}


def servable(
    request: Request,
    session: Session,
    settings: Settings,
    storage: Storage,
    org: Organization,
    model_id: str,
    use: Use,
) -> Any:
    """Find the organization's model and return it loaded for ``use``."""
    loadable = resolve_loadable(session, settings, storage, org, model_id)
    session.close()  # the model may run long after the database is needed
    cache: ModelCache = request.app.state.model_cache
    return cache.get(loadable, use)


def _inputs(value: Any, limit: int) -> list[Any]:
    inputs = [value] if isinstance(value, str) else list(value)
    if not inputs:
        raise InvalidRequest("'input' must hold at least one item.", param="input")
    if len(inputs) > limit:
        raise InvalidRequest(
            f"'input' holds {len(inputs)} items; the limit is {limit}.", param="input"
        )
    return inputs


@router.post(
    "/predictions",
    response_model=PredictionResponse,
    response_model_exclude_none=True,
    responses=ERRORS,
)
def predict(
    body: PredictionRequest,
    request: Request,
    org: OrgDep,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
) -> PredictionResponse:
    inputs = _inputs(body.input, settings.max_prediction_inputs)
    model = servable(request, session, settings, storage, org, body.model, "predict")
    results, tokens = model.predict(inputs)
    return PredictionResponse(
        model=body.model,
        data=[Prediction(index=i, **r) for i, r in enumerate(results)],
        usage=PredictionUsage(prompt_tokens=tokens, total_tokens=tokens),
    )


@router.post("/embeddings", response_model=EmbeddingResponse, responses=ERRORS)
def embeddings(
    body: EmbeddingRequest,
    request: Request,
    org: OrgDep,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
) -> EmbeddingResponse:
    texts = _inputs(body.input, settings.max_prediction_inputs)
    if any(not isinstance(t, str) or not t for t in texts):
        raise InvalidRequest("Every input must be a non-empty string.", param="input")
    model = servable(request, session, settings, storage, org, body.model, "embed")
    vectors, tokens = model.embed(texts)
    if body.dimensions is not None:
        if body.dimensions > len(vectors[0]):
            raise InvalidRequest(
                f"dimensions must be at most {len(vectors[0])} for this model.",
                param="dimensions",
            )
        vectors = [_renormalise(v[: body.dimensions]) for v in vectors]
    data = [
        Embedding(index=i, embedding=_encode(v, body.encoding_format))
        for i, v in enumerate(vectors)
    ]
    return EmbeddingResponse(
        data=data, model=body.model, usage=Usage(prompt_tokens=tokens, total_tokens=tokens)
    )


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return vector
    # OpenAI's base64: the raw little-endian float32 bytes.
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def _renormalise(vector: list[float]) -> list[float]:
    norm = float(np.linalg.norm(vector)) or 1.0
    return [x / norm for x in vector]
