"""/v1/models: base models and the organization's fine-tuned models."""

from __future__ import annotations

from functools import partial

from fastapi import APIRouter, Request

from app.api.deps import OrgDep, SessionDep, SettingsDep, StorageDep
from app.api.presenters import list_response, model_object
from app.core.errors import InvalidRequest
from app.schemas import DeletedResponse, ErrorResponse, ListResponse, ModelObject
from app.services import models

router = APIRouter(prefix="/models", tags=["models"])

_401 = {"model": ErrorResponse, "description": "Missing or wrong API key"}
_404 = {"model": ErrorResponse, "description": "No such model for this organization"}


@router.get("", response_model=ListResponse[ModelObject], responses={401: _401})
def list_models(
    org: OrgDep, session: SessionDep, settings: SettingsDep
) -> ListResponse[ModelObject]:
    return list_response([model_object(m) for m in models.list_models(session, settings, org)])


# Model ids hold ':' and, for base models, '/': the path converter keeps them whole.
@router.get("/{model:path}", response_model=ModelObject, responses={401: _401, 404: _404})
def retrieve_model(
    model: str, org: OrgDep, session: SessionDep, settings: SettingsDep
) -> ModelObject:
    return model_object(models.get_model(session, settings, org, model))


@router.delete(
    "/{model:path}",
    response_model=DeletedResponse,
    responses={
        400: {"model": ErrorResponse, "description": "Base models cannot be deleted"},
        401: _401,
        404: _404,
    },
)
def delete_model(
    model: str,
    request: Request,
    org: OrgDep,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
) -> DeletedResponse:
    if models.is_base_model(settings, model):
        raise InvalidRequest(
            "Base models belong to the server and cannot be deleted.", param="model"
        )
    path = models.delete_model(session, storage, org, model)
    session.commit()
    remove_files = partial(storage.remove_tree, path)
    cache = getattr(request.app.state, "model_cache", None)
    if cache is None:  # a control process serves no model
        remove_files()
    else:  # after the last request of this process that uses the model
        cache.forget(model, then=remove_files)
    return DeletedResponse(id=model, object="model")
