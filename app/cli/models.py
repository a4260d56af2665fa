"""`tunehouse models`: the base models this server fine-tunes and serves, and your
fine-tuned ones (/v1/models)."""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Annotated

import httpx
import typer

from app.cli.client import (
    STREAM_TIMEOUT,
    Api,
    ApiKeyOption,
    BaseUrlOption,
    ClientError,
    JsonOption,
    api,
    error_message,
    path_of,
)
from app.cli.output import console, fields, print_deleted, print_json, table, when

models_cli = typer.Typer(
    help="List, show, delete, download and upload models.", no_args_is_help=True
)

ModelId = Annotated[str, typer.Argument(help="A model id", show_default=False)]


@models_cli.command("list")
def models_list(
    json_output: JsonOption = False,
    base_url: BaseUrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """List the base models and your fine-tuned models."""
    with api(base_url, api_key) as client:
        listing = client.get("models")
    if json_output:
        print_json(listing)
        return
    table(
        ["id", "owned by", "task", "base model", "created"],
        (
            [m["id"], m["owned_by"], m.get("task"), m.get("base_model"), when(m.get("created"))]
            for m in listing["data"]
        ),
    )


@models_cli.command("show")
def models_show(
    model: ModelId,
    json_output: JsonOption = False,
    base_url: BaseUrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Show a model: its task, base model, job and labels."""
    with api(base_url, api_key) as client:
        found = client.get(path_of("models", model))
    if json_output:
        print_json(found)
        return
    fields(
        found["id"],
        [
            ("owned by", found.get("owned_by")),
            ("task", found.get("task")),
            ("base model", found.get("base_model")),
            ("job", found.get("job_id")),
            ("labels", ", ".join(found.get("labels") or [])),
            ("created", when(found.get("created"))),
        ],
    )


@models_cli.command("delete")
def models_delete(
    model: ModelId,
    json_output: JsonOption = False,
    base_url: BaseUrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Delete a fine-tuned model (its checkpoints go with it)."""
    with api(base_url, api_key) as client:
        deleted = client.delete(path_of("models", model))
    print_deleted(deleted, json_output)


# A merged download's first byte waits for the merge (the server bounds it).
MERGE_TIMEOUT = httpx.Timeout(STREAM_TIMEOUT.read, connect=STREAM_TIMEOUT.connect, read=3600.0)


def _save(client: Api, model: str, output: Path, merged: bool = False) -> int:
    """Stream the model's tar into ``output`` (via a partial file); returns its bytes."""
    partial = output.with_name(output.name + ".part")
    written = 0
    try:
        with client.http.stream(
            "GET",
            path_of("models", model, "content").lstrip("/"),
            params={"merged": "true"} if merged else None,
            timeout=MERGE_TIMEOUT if merged else STREAM_TIMEOUT,
        ) as response:
            if not response.is_success:
                response.read()
                raise ClientError(error_message(response))
            with partial.open("wb") as sink:
                for chunk in response.iter_bytes():
                    sink.write(chunk)
                    written += len(chunk)
        partial.replace(output)
    except httpx.TimeoutException:
        raise ClientError(f"{client.base_url} did not answer in time.") from None
    except httpx.TransportError as exc:
        raise ClientError(f"Could not reach {client.base_url}: {exc}") from None
    except OSError as exc:
        raise ClientError(f"Cannot write {output}: {exc.strerror}") from None
    finally:
        partial.unlink(missing_ok=True)
    return written


@models_cli.command("download")
def models_download(
    model: ModelId,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="The tar file to write (default: <model>.tar)"),
    ] = None,
    extract: Annotated[
        Path | None,
        typer.Option("--extract", help="Also unpack the tar into this directory"),
    ] = None,
    merged: Annotated[
        bool,
        typer.Option(
            "--merged",
            help="For a LoRA model: its adapter merged into its base, a full model (the "
            "server merges it on the first such download)",
        ),
    ] = False,
    base_url: BaseUrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Download one of your models as a tar of its directory (safetensors, config, tokenizer)."""
    stem = "".join(c if c.isalnum() or c in "._-" else "-" for c in model)
    target = output or Path(stem + ("-merged" if merged else "") + ".tar")
    with api(base_url, api_key) as client:
        written = _save(client, model, target, merged)
    console.print(f"Saved {model} to {target} ({written} bytes)")
    if extract is not None:
        extract.mkdir(parents=True, exist_ok=True)
        with tarfile.open(target) as archive:
            archive.extractall(extract, filter="data")
        console.print(f"Extracted into {extract}")


@models_cli.command("upload")
def models_upload(
    archive: Annotated[Path, typer.Argument(help="A tar of a safetensors model directory")],
    name: Annotated[str | None, typer.Option("--name", help="The model's name")] = None,
    json_output: JsonOption = False,
    base_url: BaseUrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Upload a tar of a Hugging Face-format safetensors directory as a base model of your
    organization (an admin key)."""
    try:
        handle = archive.open("rb")
    except OSError as exc:
        raise ClientError(f"Cannot read {archive}: {exc.strerror}") from None
    with handle, api(base_url, api_key) as client:
        data = {"model": name} if name else {}
        created = client.request(
            "POST", "models", files={"file": (archive.name, handle)}, data=data, timeout=None
        )
    if json_output:
        print_json(created)
    else:
        console.print(f"Uploaded {created['id']}")
