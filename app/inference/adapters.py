"""Loading and dropping LoRA adapters explicitly, with vLLM's routes and request shapes:
``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter``.

``lora_name`` is the id of a fine-tuned LoRA model of the caller's organization, found as every
inference route finds its model (another organization's is 404 ``model_not_found``). vLLM's
``lora_path`` names a directory to read: this server never reads a path a caller names (it
could point at another organization's files, or at anything on the machine), so ``lora_path``
is accepted only when it equals ``lora_name``, and the adapter is read from the server's own
storage. Loading makes the adapter (and its base) the cache's most recently used; unloading
takes it out of the cache (a request using it keeps it until it ends), a pinned one too (the
caller asked; it is pinned again when it next loads). Unloading an adapter that is not loaded is
a 404, as vLLM answers.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.api.deps import OrgDep, SessionDep, SettingsDep, StorageDep
from app.core.errors import InvalidRequest, NotFound
from app.core.kinds import KIND_CAUSAL_LM
from app.core.settings import Settings
from app.core.storage import Storage
from app.inference.registry import ModelCache
from app.inference.router import ERRORS, find_model, run_model
from app.models import Organization
from app.services.models import LoadableModel

router = APIRouter(tags=["inference"])

LoraName = Field(
    min_length=1,
    max_length=320,
    description="The id of a fine-tuned LoRA model of your organization.",
)


class LoadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: str = LoraName
    lora_path: str | None = Field(
        default=None,
        max_length=320,
        description="If given, must equal lora_name: adapters load from the server's own "
        "storage, never from a path a caller names.",
    )


class UnloadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: str = LoraName
    lora_int_id: int | None = Field(default=None, description="Accepted for vLLM; ignored.")


class LoraAdapterResponse(BaseModel):
    object: Literal["lora_adapter"] = "lora_adapter"
    lora_name: str
    base_model: str = Field(description="The base model the adapter applies to.")
    status: Literal["loaded", "unloaded"]


async def find_adapter(
    session: Session, settings: Settings, storage: Storage, org: Organization, name: str
) -> tuple[LoadableModel, str]:
    """The organization's LoRA model ``name``, and its base model's id."""
    model = await find_model(session, settings, storage, org, name)
    if model.kind != KIND_CAUSAL_LM:
        raise InvalidRequest(
            f"Model '{name}' is a {model.kind} model; only LoRA adapters of causal LMs load "
            "with this route.",
            param="lora_name",
            code="wrong_model_kind",
        )
    if model.base_path is None:
        raise InvalidRequest(
            f"Model '{name}' is a full model, not a LoRA adapter; it loads on its first request.",
            param="lora_name",
            code="not_a_lora_adapter",
        )
    bases = settings.registered_base_models()
    base = next((k for k, path in bases.items() if path == model.base_path), str(model.base_path))
    return model, base


@router.post("/load_lora_adapter", response_model=LoraAdapterResponse, responses=ERRORS)
async def load_lora_adapter(
    body: LoadLoraAdapterRequest,
    request: Request,
    org: OrgDep,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
) -> LoraAdapterResponse:
    if body.lora_path is not None and body.lora_path != body.lora_name:
        raise InvalidRequest(
            "lora_path must be omitted or equal lora_name: this server loads adapters from its "
            "own storage, never from a path in a request.",
            param="lora_path",
        )
    model, base = await find_adapter(session, settings, storage, org, body.lora_name)
    await run_model(request, model, "generate", lambda generator: None)
    return LoraAdapterResponse(lora_name=body.lora_name, base_model=base, status="loaded")


@router.post(
    "/unload_lora_adapter",
    response_model=LoraAdapterResponse,
    responses={**ERRORS, 404: {**ERRORS[404], "description": "No such model, or not loaded"}},
)
async def unload_lora_adapter(
    body: UnloadLoraAdapterRequest,
    request: Request,
    org: OrgDep,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
) -> LoraAdapterResponse:
    model, base = await find_adapter(session, settings, storage, org, body.lora_name)
    cache: ModelCache = request.app.state.model_cache
    # Releasing an adapter waits for a generation running on its base: not on the event loop.
    if not await run_in_threadpool(cache.unload, model.id):
        raise NotFound(
            f"The LoRA adapter '{body.lora_name}' is not loaded.",
            param="lora_name",
            code="lora_adapter_not_loaded",
        )
    return LoraAdapterResponse(lora_name=body.lora_name, base_model=base, status="unloaded")
