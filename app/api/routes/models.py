"""/v1/models: base models and the organization's fine-tuned models."""

from __future__ import annotations

import re
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.convertors import PathConvertor, register_url_convertor

from app.api.deps import AdminKeyDep, OrgDep, SessionDep, SettingsDep, StorageDep
from app.api.presenters import list_response, model_object
from app.api.uploads import receive_request_upload
from app.core.errors import InvalidRequest
from app.schemas import DeletedResponse, ErrorResponse, ListResponse, ModelObject
from app.services import lineage, merged_models, model_transfer, models


class ModelIdConvertor(PathConvertor):
    """A model id ('/' and ':' kept whole, as ``path``), except one that ends in "/content":
    that path is the model's content route."""

    regex = r".*(?<!/content)"


register_url_convertor("model_id", ModelIdConvertor())

router = APIRouter(prefix="/models", tags=["models"])

_401 = {"model": ErrorResponse, "description": "Missing or wrong API key"}
_404 = {"model": ErrorResponse, "description": "No such model for this organization"}


@router.get("", response_model=ListResponse[ModelObject], responses={401: _401})
def list_models(
    org: OrgDep, session: SessionDep, settings: SettingsDep
) -> ListResponse[ModelObject]:
    return list_response([model_object(m) for m in models.list_models(session, settings, org)])


_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "A tar (optionally gzip-compressed) of a Hugging "
                            "Face-format directory: config.json and .safetensors weights, at "
                            "its top or in one top-level directory. Only regular files and "
                            "directories; no links, absolute or '..' paths, or pickle files "
                            "(.bin, .pt, .pth, .ckpt, .pkl, .pickle). Up to max_upload_bytes, "
                            "packed and unpacked.",
                        },
                        "model": {
                            "type": "string",
                            "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
                            "description": "The model's name; its id is "
                            "'uploaded:<organization>/<name>'. Default: the archive's "
                            "top-level directory, else the file's name.",
                        },
                    },
                }
            }
        },
    }
}


@router.post(
    "",
    response_model=ModelObject,
    openapi_extra=_UPLOAD_BODY,
    responses={
        400: {"model": ErrorResponse, "description": "Not a safe safetensors model archive"},
        401: _401,
        403: {"model": ErrorResponse, "description": "The caller's key is not an admin key"},
        409: {"model": ErrorResponse, "description": "A model of that name exists"},
        413: {
            "model": ErrorResponse,
            "description": "File over the size limit or the storage quota",
        },
    },
)
async def upload_model(
    request: Request,
    _: AdminKeyDep,
    org: OrgDep,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
) -> ModelObject:
    """Upload a base model for this organization (admin keys only): a tar of a Hugging
    Face-format safetensors directory. It can then be served, by this organization only."""
    upload = await receive_request_upload(request, org, session, settings, storage)
    try:
        assert upload.path is not None
        row = await run_in_threadpool(
            model_transfer.store_uploaded_model,
            session,
            storage,
            org,
            upload.path,
            name=upload.fields.get("model") or None,
            filename=upload.filename,
            max_bytes=settings.max_upload_bytes,
        )
        try:
            await run_in_threadpool(session.commit)
        except BaseException:
            storage.remove_tree(storage.resolve(row.storage_path))
            raise
    finally:
        upload.discard()
    return model_object(models.get_model(session, settings, org, row.id))


# A model's content; "/{model:model_id}" takes no path that ends in "/content".
@router.get(
    "/{model:path}/content",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {
                model_transfer.TAR_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}
            },
            "description": "A tar of the model's directory: safetensors weights, config.json, "
            "tokenizer files and, for a LoRA model, adapter_config.json (the adapter only). "
            "With merged=true, a LoRA model's adapter merged into its base: a standalone "
            "directory (safetensors weights, config.json, tokenizer files).",
        },
        400: {
            "model": ErrorResponse,
            "description": "merged=true for a model that is not a LoRA adapter",
        },
        401: _401,
        404: _404,
        500: {
            "model": ErrorResponse,
            "description": "The merge failed or ran past merge_timeout_seconds",
        },
    },
)
def download_model(
    model: str,
    org: OrgDep,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    merged: Annotated[
        bool,
        Query(
            description="For a LoRA model: its adapter merged into its base (peft's "
            "merge_and_unload), a full model that loads with AutoModelForCausalLM alone. Made "
            "on the first such download (bounded by merge_timeout_seconds), then kept with "
            "the model and counted in its bytes. Any other model is refused with 400."
        ),
    ] = False,
) -> StreamingResponse:
    """Download one of this organization's models as a tar, streamed."""
    if merged:
        source = merged_models.merge_source(session, settings, storage, org, model)
        session.close()  # no connection held while the merge runs
        path, added = merged_models.merged_directory(source, settings.merge_timeout_seconds)
        if added:
            merged_models.count_merged_bytes(session, model, added)
            session.commit()
    else:
        path = model_transfer.model_directory(session, storage, org, model)
    # The session is function-scoped (app/api/deps.py): it is closed before the body is sent.
    name = re.sub(r"[^A-Za-z0-9._-]", "-", model) + ("-merged" if merged else "")
    return StreamingResponse(
        model_transfer.tar_stream(path),
        media_type=model_transfer.TAR_MEDIA_TYPE,
        headers={"Content-Disposition": f'attachment; filename="{name}.tar"'},
    )


# Model ids hold ':' and, for base models, '/': the model_id converter keeps them whole.
@router.get("/{model:model_id}", response_model=ModelObject, responses={401: _401, 404: _404})
def retrieve_model(
    model: str, org: OrgDep, session: SessionDep, settings: SettingsDep
) -> ModelObject:
    return model_object(models.get_model(session, settings, org, model))


@router.delete(
    "/{model:model_id}",
    response_model=DeletedResponse,
    responses={
        400: {"model": ErrorResponse, "description": "Base models cannot be deleted"},
        401: _401,
        404: _404,
        409: {"model": ErrorResponse, "description": "An active job continues from the model"},
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
    lineage.refuse_while_continued(session, org, model)
    path = models.delete_model(session, storage, org, model)
    session.commit()
    remove_files = partial(storage.remove_tree, path)
    cache = getattr(request.app.state, "model_cache", None)
    if cache is None:  # a control process serves no model
        remove_files()
    else:  # after the last request of this process that uses the model
        cache.forget(model, then=remove_files)
    return DeletedResponse(id=model, object="model")
