"""`tunehouse jobs follow`: a job's events as they happen, until it ends.

The events stream (`GET /v1/fine_tuning/jobs/{id}/events?stream=true`) drives the display:
messages are printed as they come and metrics events give the loss, validation metrics and
throughput. Between metrics events (one every 10 steps or so) the job's own row, polled once a
second, moves the bar: its step, total steps, status and estimated finish. In a terminal that
is a live rich progress bar with the messages printed above it; elsewhere, one plain line per
event."""

from __future__ import annotations

import contextlib
import threading
import time
from datetime import datetime, timedelta
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from app.cli.client import Api, ClientError, path_of
from app.cli.output import console, print_json, stderr

POLL_SECONDS = 1.0
STATUS_STYLE = {
    "succeeded": "bold green",
    "failed": "bold red",
    "cancelled": "bold yellow",
    "paused": "yellow",
    "running": "bold cyan",
}
# Metrics shown, in this order, with their names.
METRICS = (
    ("train_loss", "loss"),
    ("valid_loss", "valid loss"),
    ("valid_accuracy", "valid accuracy"),
    ("valid_mean_token_accuracy", "valid token accuracy"),
)
LEVEL_STYLE = {"warn": "yellow", "error": "bold red"}


class Seen:
    """What is known of the job: its row as last polled and its latest metrics (validation
    figures kept from the last evaluation). Written by one thread each, read by the display:
    each write replaces a whole value."""

    def __init__(self, job: dict[str, Any]):
        self.job = job
        self.metrics: dict[str, Any] = {}

    @property
    def step(self) -> int:
        return max(int(self.job.get("steps_completed") or 0), int(self.metrics.get("step", 0)))

    @property
    def total(self) -> int | None:
        total = self.job.get("total_steps")
        return int(total) if total else None

    def eta(self) -> str:
        finish = self.job.get("estimated_finish")
        if self.job["status"] != "running" or not finish:
            return ""
        return "ETA " + str(timedelta(seconds=max(0, round(finish - time.time()))))

    def progress(self, step: int | None = None) -> str:
        return f"step {self.step if step is None else step}/{self.total or '?'}"

    def figures(self) -> str:
        metrics = self.metrics
        parts = [f"{name} {float(metrics[key]):.4f}" for key, name in METRICS if key in metrics]
        if "samples_per_second" in metrics:
            parts.append(f"{float(metrics['samples_per_second']):.1f} samples/s")
        return "  ".join(parts)


class View:
    """Shows the events as they come; a context that holds the display while it runs."""

    def __enter__(self) -> View:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def event(self, event: dict[str, Any]) -> None:
        raise NotImplementedError


def _clock(event: dict[str, Any]) -> str:
    return datetime.fromtimestamp(event["created_at"]).strftime("%H:%M:%S")


class LiveView(View):
    """A rich live display: the bar below, each message printed above it."""

    def __init__(self, seen: Seen, out: Console):
        self.seen = seen
        self.live = Live(console=out, get_renderable=self.render, refresh_per_second=4)

    def __enter__(self) -> View:
        self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.refresh()  # the final state stays on the screen
        self.live.stop()

    def event(self, event: dict[str, Any]) -> None:
        if event.get("type") == "metrics":
            return  # the bar shows it
        style = LEVEL_STYLE.get(event.get("level", ""), "")
        self.live.console.print(Text(f"{_clock(event)} {event['message']}", style=style))

    def render(self) -> RenderableType:
        seen = self.seen
        status = seen.job["status"]
        line = Table.grid(padding=(0, 2))
        line.add_row(
            Text(status, style=STATUS_STYLE.get(status, "")),
            ProgressBar(total=seen.total, completed=seen.step, width=40),
            Text(seen.progress()),
            Text(seen.eta()),
        )
        figures = seen.figures()
        return Group(line, Text(figures, style="dim")) if figures else line


class PlainView(View):
    """One line per event, for logs and pipes."""

    def __init__(self, seen: Seen, out: Console):
        self.seen, self.out = seen, out

    def event(self, event: dict[str, Any]) -> None:
        if event.get("type") == "metrics":
            seen, step = self.seen, (event.get("data") or {}).get("step")
            text = "  ".join(p for p in (seen.progress(step), seen.figures(), seen.eta()) if p)
        else:
            level = event.get("level", "info")
            text = event["message"] if level == "info" else f"{level}: {event['message']}"
        self.out.print(f"{_clock(event)} {text}", markup=False, soft_wrap=True)


class JsonView(View):
    """The events as JSON lines, as the stream sends them."""

    def event(self, event: dict[str, Any]) -> None:
        print_json(event)


def _poll(client: Api, job_id: str, stop: threading.Event, seen: Seen) -> None:
    while not stop.wait(POLL_SECONDS):
        # A failed poll is left to the next one; the stream says whether the server is gone.
        with contextlib.suppress(ClientError):
            seen.job = client.get(path_of("fine_tuning/jobs", job_id))


def follow(client: Api, job_id: str, json_output: bool = False) -> int:
    """Follow the job until it ends; 0 if it succeeded, 1 otherwise."""
    seen = Seen(client.get(path_of("fine_tuning/jobs", job_id)))
    view: View
    if json_output:
        view = JsonView()
    elif console.is_terminal:
        view = LiveView(seen, console)
    else:
        view = PlainView(seen, console)
    stop = threading.Event()
    poller = threading.Thread(target=_poll, args=(client, job_id, stop, seen), daemon=True)
    poller.start()
    try:
        with view:
            events = path_of("fine_tuning/jobs", job_id, "events")
            for event in client.stream("GET", events, params={"stream": "true"}):
                if event.get("type") == "metrics" and isinstance(event.get("data"), dict):
                    seen.metrics = {**seen.metrics, **event["data"]}
                view.event(event)
            stop.set()
            poller.join()  # no older answer lands after the last one
            seen.job = client.get(path_of("fine_tuning/jobs", job_id))
    except KeyboardInterrupt:
        stderr.print(f"Stopped following {job_id}; the job goes on.")
        return 130
    finally:
        stop.set()
    return outcome(seen.job, quiet=json_output)


def outcome(job: dict[str, Any], quiet: bool = False) -> int:
    """Say how the job ended (unless ``quiet``); its exit status."""
    status = job["status"]
    if status == "succeeded":
        if not quiet:
            said = Text.assemble(f"Job {job['id']} ", ("succeeded", "green"), ": ")
            console.print(said + Text(str(job.get("fine_tuned_model"))))
        return 0
    if not quiet:
        error = job.get("error") or {}
        reason = f": {error.get('message')} ({error.get('code')})" if error else ""
        stderr.print(Text.assemble(f"Job {job['id']} ", (status, "red"), reason))
    return 1
