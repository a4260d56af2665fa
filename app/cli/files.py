"""`tunehouse files`: upload, list, show and delete files (/v1/files)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from app.cli.client import Api, ApiKeyOption, BaseUrlOption, ClientError, JsonOption, api, path_of
from app.cli.output import console, fields, print_deleted, print_json, size, table, when

files_cli = typer.Typer(help="Upload, list, show and delete files.", no_args_is_help=True)

FileId = Annotated[str, typer.Argument(help="A file id (file-...)", show_default=False)]


def upload(client: Api, path: Path, purpose: str = "fine-tune") -> dict[str, Any]:
    """Upload a local file; a refused dataset says which file, and the server's line and
    reason."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise ClientError(f"Cannot read {path}: {exc.strerror}") from None
    with handle:
        try:
            file: dict[str, Any] = client.post(
                "files", None, files={"file": (path.name, handle)}, data={"purpose": purpose}
            )
        except ClientError as exc:  # a dataset's error names the file; others say which
            said = exc.message if path.name in exc.message else f"{path}: {exc.message}"
            raise ClientError(said) from None
    return file


def describe(file: dict[str, Any]) -> str:
    stats = file.get("stats") or {}
    rows = f", {stats['rows']} rows" if "rows" in stats else ""
    kind = f" {file['format']}" if file.get("format") else ""
    return f"{file['id']} ({file['filename']}, {size(file.get('bytes'))}{kind}{rows})"


@files_cli.command("upload")
def files_upload(
    path: Annotated[Path, typer.Argument(help="A local file", show_default=False)],
    purpose: Annotated[str, typer.Option(help="What the file is for")] = "fine-tune",
    json_output: JsonOption = False,
    base_url: BaseUrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Upload a file (a dataset is checked as it arrives: a bad row is refused with its line)."""
    with api(base_url, api_key) as client:
        file = upload(client, path, purpose)
    if json_output:
        print_json(file)
    else:
        console.print(f"Uploaded {describe(file)}")


@files_cli.command("list")
def files_list(
    purpose: Annotated[str | None, typer.Option(help="Only files of this purpose")] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first")] = 100,
    json_output: JsonOption = False,
    base_url: BaseUrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """List files, newest first."""
    with api(base_url, api_key) as client:
        listing = client.get("files", purpose=purpose, limit=limit)
    if json_output:
        print_json(listing)
        return
    table(
        ["id", "filename", "purpose", "format", "rows", "size", "created"],
        (
            [
                f["id"], f["filename"], f["purpose"], f.get("format"),
                (f.get("stats") or {}).get("rows"), size(f.get("bytes")), when(f["created_at"]),
            ]
            for f in listing["data"]
        ),
    )  # fmt: skip


@files_cli.command("show")
def files_show(
    file_id: FileId,
    json_output: JsonOption = False,
    base_url: BaseUrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Show a file: its format and the statistics of its rows."""
    with api(base_url, api_key) as client:
        file = client.get(path_of("files", file_id))
    if json_output:
        print_json(file)
        return
    fields(
        file["id"],
        [
            ("filename", file["filename"]),
            ("purpose", file["purpose"]),
            ("status", file.get("status")),
            ("format", file.get("format")),
            ("size", size(file.get("bytes"))),
            ("sha256", file.get("sha256")),
            ("created", when(file.get("created_at"))),
            ("expires", when(file.get("expires_at"))),
            *sorted((file.get("stats") or {}).items()),
        ],
    )


@files_cli.command("delete")
def files_delete(
    file_id: FileId,
    json_output: JsonOption = False,
    base_url: BaseUrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Delete a file."""
    with api(base_url, api_key) as client:
        deleted = client.delete(path_of("files", file_id))
    print_deleted(deleted, json_output)
