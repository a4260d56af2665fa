"""Inference routes: predictions for every kind of model, and embeddings. Each request finds its
model with a short database session, then waits for an inference slot (app/inference/
concurrency.py) and leases the model in an inference thread, off the event loop. A classifier,
tabular model or encoder then queues the request's rows for its batch thread (app/inference/
batching.py), and the request waits on the event loop, holding its slot but no thread; anything
else (a generative model's predictions, completions) runs in the inference thread."""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import numpy as np
from fastapi import APIRouter, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.api.deps import OrgDep, SessionDep, SettingsDep, StorageDep
from app.core.errors import InvalidRequest
from app.core.kinds import KIND_CAUSAL_LM, KIND_CLASSIFICATION, KIND_ENCODER
from app.core.settings import Quantization, Settings
from app.core.storage import Storage
from app.inference import generation_metrics  # noqa: F401 - registered from the start
from app.inference.batching import BatchPolicy
from app.inference.bounds import check_choices, check_tokens
from app.inference.concurrency import configure_torch_threads, inference_gate
from app.inference.protocols import Use
from app.inference.registry import Lease, ModelCache
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
from app.inference.servables import TextPredictor
from app.models import Organization
from app.schemas import ErrorResponse
from app.services.models import LoadableModel, resolve_loadable

router = APIRouter(tags=["inference"])

T = TypeVar("T")

# A request this small (inputs, and characters or numbers in all) is tokenized and queued on
# the event loop when its model is loaded; a bigger one does that in an inference thread.
SMALL_INPUTS, SMALL_INPUT_CHARACTERS = 8, 8192

# The kinds of model whose forward passes may run in int8.
QUANTIZABLE = (KIND_CLASSIFICATION, KIND_ENCODER)

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid input or wrong kind of model"},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
    404: {"model": ErrorResponse, "description": "No such model for this organization"},
    503: {
        "model": ErrorResponse,
        "description": "Inference is saturated: no slot came free in time, or the queue is full",
        "headers": {
            "Retry-After": {
                "description": "Seconds to wait before retrying",
                "schema": {"type": "integer"},
            }
        },
    },
}


async def find_model(
    session: Session, settings: Settings, storage: Storage, org: Organization, model_id: str
) -> LoadableModel:
    """The organization's model. The request's session is closed once it is found: a request
    that waits for a slot or runs a model holds no database connection."""

    def find() -> LoadableModel:
        try:
            return resolve_loadable(session, settings, storage, org, model_id)
        finally:
            session.close()

    return await run_in_threadpool(find)


async def run_model(
    request: Request,
    model: LoadableModel,
    use: Use,
    work: Callable[[Any], T],
    cancel: threading.Event | None = None,
) -> T:
    """``work(servable)`` in an inference slot, with ``model`` loaded for ``use`` and leased
    until ``work`` returns; ``cancel``, if given, is set when the client goes away meanwhile."""
    cache: ModelCache = request.app.state.model_cache
    settings: Settings = request.app.state.settings

    def leased() -> T:
        configure_torch_threads(settings)
        with cache.lease(model, use) as servable:
            return work(servable)

    gate = inference_gate(request.app)
    async with gate.slot():
        if cancel is None:
            return await gate.run(leased)
        return await gate.run_until_disconnect(request, cancel, leased)


async def run_batched(
    request: Request,
    model: LoadableModel,
    use: Use,
    submit: Callable[[Any, BatchPolicy], Future[T]],
    fallback: Callable[[Any], T],
    small: bool,
) -> T:
    """``submit(servable, policy)``'s answer, with ``model`` loaded for ``use`` and leased until
    that answer is ready. The request holds an inference slot throughout, and an inference
    thread only to lease the model and submit its rows; a servable that does not batch (it has
    no ``submit``) answers ``fallback(servable)`` in that thread. A ``small`` request whose
    model is loaded needs no thread at all."""
    cache: ModelCache = request.app.state.model_cache
    settings: Settings = request.app.state.settings
    policy = BatchPolicy.from_settings(settings)

    def enqueue(lease: Lease[Any]) -> Future[T]:
        try:
            if hasattr(lease.servable, "submit"):
                future = submit(lease.servable, policy)
            else:
                future = Future()
                future.set_result(fallback(lease.servable))
        except BaseException:
            lease.close()
            raise
        future.add_done_callback(lambda _: lease.close())
        return future

    def load_and_enqueue() -> Future[T]:
        configure_torch_threads(settings)
        return enqueue(cache.lease(model, use))

    gate = inference_gate(request.app)
    async with gate.slot():
        # A model in the cache and a few rows to tokenize: queued from the event loop, without
        # the two thread switches an inference thread costs (a third of a small request's time).
        lease = cache.lease_if_loaded(model, use) if small else None
        if lease is not None and hasattr(lease.servable, "submit"):
            future = enqueue(lease)
        else:
            if lease is not None:
                lease.close()
            future = await gate.run(load_and_enqueue)
        return await gate.wait(request, future)


def _inputs(value: Any, limit: int) -> list[Any]:
    inputs = [value] if isinstance(value, str) else list(value)
    if not inputs:
        raise InvalidRequest("'input' must hold at least one item.", param="input")
    if len(inputs) > limit:
        raise InvalidRequest(
            f"'input' holds {len(inputs)} items; the limit is {limit}.", param="input"
        )
    return inputs


def _small(inputs: list[Any]) -> bool:
    sizes = (len(item) if isinstance(item, str | list) else 1 for item in inputs)
    return len(inputs) <= SMALL_INPUTS and sum(sizes) <= SMALL_INPUT_CHARACTERS


def _quantization(asked: Quantization | None, settings: Settings, kind: str) -> Quantization:
    """The request's precision, else the deployment's for the kinds that have one."""
    if asked is None:
        return settings.inference_quantization if kind in QUANTIZABLE else "none"
    if asked == "int8" and kind not in QUANTIZABLE:
        raise InvalidRequest(
            f"'quantization': 'int8' serves {' and '.join(QUANTIZABLE)} models; this is a "
            f"{kind} model.",
            param="quantization",
        )
    return asked


@router.post(
    "/predictions",
    response_model=PredictionResponse,
    response_model_exclude_none=True,
    responses=ERRORS,
)
async def predict(
    body: PredictionRequest,
    request: Request,
    org: OrgDep,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
) -> PredictionResponse:
    inputs = _inputs(body.input, settings.max_prediction_inputs)
    model = await find_model(session, settings, storage, org, body.model)
    if model.kind == KIND_CAUSAL_LM:  # each input is a generation
        choices = check_choices(settings, len(inputs), 1, prompt_param="input")
        check_tokens(settings, choices, TextPredictor.max_tokens, param="input")
    quantization = _quantization(body.quantization, settings, model.kind)
    results, tokens = await run_batched(
        request,
        model,
        "predict",
        lambda predictor, policy: predictor.submit(inputs, policy, quantization),
        lambda predictor: predictor.predict(inputs),
        _small(inputs),
    )
    return PredictionResponse(
        model=body.model,
        data=[Prediction(index=i, **r) for i, r in enumerate(results)],
        usage=PredictionUsage(prompt_tokens=tokens, total_tokens=tokens),
    )


@router.post("/embeddings", response_model=EmbeddingResponse, responses=ERRORS)
async def embeddings(
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
    model = await find_model(session, settings, storage, org, body.model)
    quantization = _quantization(body.quantization, settings, model.kind)
    vectors, tokens = await run_batched(
        request,
        model,
        "embed",
        lambda embedder, policy: embedder.submit(texts, policy, quantization),
        lambda embedder: embedder.embed(texts),
        _small(texts),
    )
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
