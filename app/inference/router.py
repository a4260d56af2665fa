"""Inference routes. Loading and running models happens in a worker thread, off the event loop."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.api.deps import OrgDep, SessionDep, SettingsDep, StorageDep
from app.core.errors import InvalidRequest
from app.inference.registry import ModelCache
from app.schemas import ErrorResponse, Prediction, PredictionRequest, PredictionResponse, Usage
from app.services.models import resolve_loadable

router = APIRouter(tags=["inference"])


def model_cache(request: Request) -> ModelCache:
    cache: ModelCache = request.app.state.model_cache
    return cache


@router.post(
    "/predictions",
    response_model=PredictionResponse,
    responses={
        400: {"model": ErrorResponse, "description": "Invalid input or wrong kind of model"},
        401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
        404: {"model": ErrorResponse, "description": "No such model for this organization"},
    },
)
def predict(
    body: PredictionRequest,
    request: Request,
    org: OrgDep,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
) -> PredictionResponse:
    inputs = [body.input] if isinstance(body.input, str) else body.input
    if not inputs:
        raise InvalidRequest("'input' must hold at least one text.", param="input")
    if len(inputs) > settings.max_prediction_inputs:
        raise InvalidRequest(
            f"'input' holds {len(inputs)} items; the limit is {settings.max_prediction_inputs}.",
            param="input",
        )
    loadable = resolve_loadable(session, settings, storage, org, body.model)
    session.close()  # the model runs long after the database is needed
    results, tokens = model_cache(request).get(loadable).predict(inputs)
    return PredictionResponse(
        model=body.model,
        data=[Prediction(index=i, **r) for i, r in enumerate(results)],
        usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
    )
