"""`tunehouse jobs`: create fine-tuning jobs (uploading local files first), list, show and
follow them, cancel, pause and resume them (/v1/fine_tuning/jobs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from app.cli.client import Api, ApiKeyOption, BaseUrlOption, ClientError, JsonOption, api, path_of
from app.cli.files import describe, upload
from app.cli.follow import follow
from app.cli.output import console, fields, print_json, stderr, table, when

jobs_cli = typer.Typer(
    help="Create, list, show, follow, cancel, pause and resume fine-tuning jobs.",
    no_args_is_help=True,
)

JobId = Annotated[str, typer.Argument(help="A job id (ftjob-...)", show_default=False)]
JOBS = "fine_tuning/jobs"


def json_object(value: str | None, option: str) -> dict[str, Any]:
    if value is None:
        return {}
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not JSON: {exc}", param_hint=option) from None
    if not isinstance(parsed, dict):
        raise typer.BadParameter("must be a JSON object", param_hint=option)
    return parsed


def file_id(client: Api, value: str) -> str:
    """The id of a file: a local path is uploaded first, an id is taken as it is."""
    path = Path(value)
    if path.is_file():
        file = upload(client, path)
        stderr.print(f"Uploaded {describe(file)}")
        return str(file["id"])
    if value.startswith("file-"):
        return value
    raise ClientError(f"{value} is neither a local file nor a file id (file-...).")


def method_body(method: dict[str, Any], hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """``method`` (supervised unless it says otherwise) with ``hyperparameters`` merged into
    its own."""
    kind = method.get("type", "supervised")
    inner = dict(method.get(kind) or {})
    inner["hyperparameters"] = {**(inner.get("hyperparameters") or {}), **hyperparameters}
    return {**method, "type": kind, kind: inner}


@jobs_cli.command("create")
def jobs_create(
    training_file: Annotated[
        str, typer.Argument(help="A local file (uploaded first) or a file id", show_default=False)
    ],
    model: Annotated[
        str, typer.Option(help="A base model, or one of your fine-tuned models or checkpoints")
    ],
    validation_file: Annotated[
        str | None, typer.Option(help="A local file or a file id to evaluate on")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="n_epochs [default: auto]")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Rows per step [default: auto]")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="The peak learning rate")] = None,
    learning_rate_multiplier: Annotated[
        float | None, typer.Option(help="OpenAI's multiplier of the default rate")
    ] = None,
    hyperparameters: Annotated[
        str | None,
        typer.Option(help="More hyperparameters as JSON, e.g. '{\"warmup_ratio\": 0.1}'"),
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(
            help='The method as JSON, e.g. \'{"supervised": {"adapter": {"type": "lora"}}}\''
        ),
    ] = None,
    suffix: Annotated[str | None, typer.Option(help="Part of the fine-tuned model's name")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the run")] = None,
    device: Annotated[
        str | None, typer.Option(help="The worker queue to train on: cpu, gpu or a queue's name")
    ] = None,
    processes: Annotated[
        int | None, typer.Option(help="Processes that train it together, one per device")
    ] = None,
    follow_job: Annotated[
        bool, typer.Option("--follow", help="Then follow the job until it ends")
    ] = False,
    json_output: JsonOption = False,
    base_url: BaseUrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Start a fine-tuning job; local files are uploaded first."""
    flags = {
        "n_epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "learning_rate_multiplier": learning_rate_multiplier,
    }
    chosen = {
        **json_object(hyperparameters, "--hyperparameters"),
        **{k: v for k, v in flags.items() if v is not None},
    }
    body: dict[str, Any] = {"model": model}
    if chosen or method:
        body["method"] = method_body(json_object(method, "--method"), chosen)
    for name, value in (("suffix", suffix), ("seed", seed)):
        if value is not None:
            body[name] = value
    resources = {k: v for k, v in (("device", device), ("processes", processes)) if v is not None}
    if resources:
        body["resources"] = resources
    with api(base_url, api_key) as client:
        body["training_file"] = file_id(client, training_file)
        if validation_file:
            body["validation_file"] = file_id(client, validation_file)
        job = client.post(JOBS, body)
        if json_output:
            print_json(job)
        else:
            console.print(f"Created job {job['id']} ({job['status']})")
        if follow_job:
            raise typer.Exit(follow(client, job["id"], json_output))


@jobs_cli.command("list")
def jobs_list(
    limit: Annotated[int, typer.Option(help="At most this many (1-100), newest first")] = 20,
    json_output: JsonOption = False,
    base_url: BaseUrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """List fine-tuning jobs, newest first."""
    with api(base_url, api_key) as client:
        listing = client.get(JOBS, limit=limit)
    if json_output:
        print_json(listing)
        return
    table(
        ["id", "status", "model", "steps", "fine-tuned model", "created"],
        (
            [
                j["id"], j["status"], j["model"], steps(j), j.get("fine_tuned_model"),
                when(j["created_at"]),
            ]
            for j in listing["data"]
        ),
    )  # fmt: skip


def steps(job: dict[str, Any]) -> str:
    if not job.get("total_steps"):
        return ""
    return f"{job.get('steps_completed') or 0}/{job['total_steps']}"


@jobs_cli.command("show")
def jobs_show(
    job_id: JobId,
    json_output: JsonOption = False,
    base_url: BaseUrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Show a job: its status, progress, hyperparameters, model or error."""
    with api(base_url, api_key) as client:
        job = client.get(path_of(JOBS, job_id))
    if json_output:
        print_json(job)
        return
    error = job.get("error") or {}
    fields(
        job["id"],
        [
            ("status", job["status"]),
            ("model", job["model"]),
            ("fine-tuned model", job.get("fine_tuned_model")),
            ("error", f"{error.get('message')} ({error.get('code')})" if error else None),
            ("steps", steps(job)),
            ("training file", job.get("training_file")),
            ("validation file", job.get("validation_file")),
            ("hyperparameters", job.get("hyperparameters")),
            ("method", (job.get("method") or {}).get("type")),
            ("suffix", job.get("suffix")),
            ("seed", job.get("seed")),
            ("trained tokens", job.get("trained_tokens")),
            ("attempt", job.get("attempt")),
            ("created", when(job.get("created_at"))),
            ("started", when(job.get("started_at"))),
            ("estimated finish", when(job.get("estimated_finish"))),
            ("finished", when(job.get("finished_at"))),
            ("result files", job.get("result_files")),
        ],
    )


@jobs_cli.command("follow")
def jobs_follow(
    job_id: JobId,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the events as JSON lines")
    ] = False,
    base_url: BaseUrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Follow a job until it ends: exit status 0 if it succeeded, 1 if not.

    A live progress bar in a terminal (step, loss, validation metrics, samples/s, ETA), one
    plain line per event otherwise.
    """
    with api(base_url, api_key) as client:
        code = follow(client, job_id, json_output)
    raise typer.Exit(code)


def _act(
    job_id: str, action: str, json_output: bool, base_url: str | None, key: str | None
) -> None:
    with api(base_url, key) as client:
        job = client.post(path_of(JOBS, job_id, action))
    if json_output:
        print_json(job)
    else:
        console.print(f"Job {job['id']} is {job['status']}")


@jobs_cli.command("cancel")
def jobs_cancel(
    job_id: JobId,
    json_output: JsonOption = False,
    base_url: BaseUrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Cancel a job (queued, running or paused)."""
    _act(job_id, "cancel", json_output, base_url, api_key)


@jobs_cli.command("pause")
def jobs_pause(
    job_id: JobId,
    json_output: JsonOption = False,
    base_url: BaseUrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Pause a job: a running one saves a checkpoint and frees its worker."""
    _act(job_id, "pause", json_output, base_url, api_key)


@jobs_cli.command("resume")
def jobs_resume(
    job_id: JobId,
    json_output: JsonOption = False,
    base_url: BaseUrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Resume a paused job from the checkpoint its pause saved."""
    _act(job_id, "resume", json_output, base_url, api_key)
