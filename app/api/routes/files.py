"""/v1/files: upload (streamed), list, retrieve, content, delete."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from app.api.deps import OrgDep, SessionDep, SettingsDep, StorageDep
from app.api.presenters import file_object, list_response
from app.api.uploads import receive_request_upload
from app.schemas import DeletedResponse, ErrorResponse, FileObject, ListResponse
from app.services import files
from app.services.datasets import DatasetLimits

router = APIRouter(prefix="/files", tags=["files"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
    404: {"model": ErrorResponse, "description": "No such file in this organization"},
}

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "purpose": {"type": "string", "enum": list(files.UPLOAD_PURPOSES)},
                        "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
                        "expires_after[seconds]": {"type": "integer"},
                    },
                }
            }
        },
    }
}


@router.post(
    "",
    response_model=FileObject,
    openapi_extra=_UPLOAD_BODY,
    responses={
        400: {"model": ErrorResponse, "description": "Invalid form or dataset (line and reason)"},
        401: _ERRORS[401],
        413: {"model": ErrorResponse, "description": "File over the size limit"},
        507: {"model": ErrorResponse, "description": "The server's disk is full (disk_full)"},
    },
)
async def upload_file(
    request: Request, org: OrgDep, session: SessionDep, settings: SettingsDep, storage: StorageDep
) -> FileObject:
    upload = await receive_request_upload(request, org, session, settings, storage)
    try:
        # Validation reads the whole file: keep it off the event loop.
        limits = DatasetLimits.from_settings(settings)
        file = await run_in_threadpool(
            files.store_upload,
            session,
            storage,
            org,
            upload,
            limits,
            settings.storage_quota_bytes,
        )
        await run_in_threadpool(session.commit)
    finally:
        upload.discard()  # the temporary file, unless it was stored (a request cancelled here)
    return file_object(file)


@router.get("", response_model=ListResponse[FileObject], responses={401: _ERRORS[401]})
def list_files(
    org: OrgDep,
    session: SessionDep,
    purpose: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    after: Annotated[str | None, Query(max_length=64)] = None,
    order: Literal["asc", "desc"] = "desc",
) -> ListResponse[FileObject]:
    rows, more = files.list_files(
        session, org, purpose=purpose, limit=limit, after=after, descending=order == "desc"
    )
    data = [file_object(f) for f in rows]
    return list_response(data, more)


@router.get("/{file_id}", response_model=FileObject, responses=_ERRORS)
def retrieve_file(file_id: str, org: OrgDep, session: SessionDep) -> FileObject:
    return file_object(files.get_file(session, org, file_id))


@router.get(
    "/{file_id}/content",
    response_class=FileResponse,
    responses={**_ERRORS, 200: {"content": {"application/octet-stream": {}}}},
)
def file_content(file_id: str, org: OrgDep, session: SessionDep, storage: StorageDep) -> Any:
    # The session closes when this returns, before the file is sent.
    file = files.get_file(session, org, file_id)
    return FileResponse(
        files.file_path(storage, file),
        media_type="application/octet-stream",
        filename=file.filename,
    )


@router.delete(
    "/{file_id}",
    response_model=DeletedResponse,
    responses={
        **_ERRORS,
        409: {"model": ErrorResponse, "description": "A job not yet finished uses the file"},
    },
)
def delete_file(
    file_id: str, org: OrgDep, session: SessionDep, storage: StorageDep
) -> DeletedResponse:
    path = files.delete_file(session, storage, org, file_id)
    session.commit()
    path.unlink(missing_ok=True)
    return DeletedResponse(id=file_id, object="file")
