"""`tunehouse predict` and `tunehouse chat`: call a model (/v1/predictions and
/v1/chat/completions, streamed)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Annotated, Any

import typer
from rich.text import Text

from app.cli.client import Api, ApiKeyOption, BaseUrlOption, JsonOption, api
from app.cli.output import console, print_json, table

ModelId = Annotated[str, typer.Argument(help="A model id", show_default=False)]
PROMPT = Text("> ", style="bold")


def feature_row(text: str) -> list[float]:
    """'1.5,2,0' or '[1.5, 2, 0]' as a row of numbers."""
    try:
        values = json.loads(text) if text.lstrip().startswith("[") else text.split(",")
        return [float(v) for v in values]
    except (ValueError, TypeError):
        raise typer.BadParameter(
            f"{text!r} is not a row of numbers ('1.5,2,0' or '[1.5, 2, 0]')", param_hint="INPUTS"
        ) from None


def predict(
    model: ModelId,
    inputs: Annotated[
        list[str] | None,
        typer.Argument(
            help="Texts, or rows with --features; none: one per line of standard input",
            show_default=False,
        ),
    ] = None,
    features: Annotated[
        bool,
        typer.Option("--features", help="Each input is a row of numbers (a tabular model)"),
    ] = False,
    json_output: JsonOption = False,
    base_url: BaseUrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Predict with any model: labels and scores, a class, or generated text."""
    if not inputs and sys.stdin.isatty():
        raise typer.BadParameter("give at least one input", param_hint="INPUTS")
    texts = inputs or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise typer.BadParameter("give at least one input", param_hint="INPUTS")
    body: dict[str, Any] = {
        "model": model,
        "input": [feature_row(t) for t in texts] if features else texts,
    }
    with api(base_url, api_key) as client:
        answer = client.post("predictions", body)
    if json_output:
        print_json(answer)
        return
    data = answer["data"]
    if any("text" in p for p in data):
        table(
            ["#", "input", "text"], ([p["index"], texts[p["index"]], p.get("text")] for p in data)
        )
    else:
        table(
            ["#", "input", "label", "score"],
            ([p["index"], texts[p["index"]], p.get("label"), _score(p.get("score"))] for p in data),
        )


def _score(score: float | None) -> str:
    return "" if score is None else f"{score:.4f}"


def _turns(message: str | None) -> Iterator[str]:
    """The user's messages: the one given, else lines of standard input until it ends."""
    if message is not None:
        yield message
        return
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = console.input(PROMPT) if interactive else sys.stdin.readline()
        except EOFError:
            return
        if not interactive and not line:
            return
        if line.strip() in ("exit", "quit"):
            return
        if line.strip():
            yield line.strip()


def _streamed(client: Api, body: dict[str, Any]) -> str:
    """The answer, printed piece by piece as the tokens arrive; the whole of it."""
    pieces = []
    for chunk in client.stream("POST", "chat/completions", {**body, "stream": True}):
        for choice in chunk.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content") or ""
            if piece:
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(pieces)


def chat(
    model: ModelId,
    message: Annotated[
        str | None,
        typer.Argument(
            help="What to say; none: a conversation, one message per line of standard input",
            show_default=False,
        ),
    ] = None,
    system: Annotated[str | None, typer.Option(help="A system message first")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Most tokens of each answer")] = None,
    temperature: Annotated[float | None, typer.Option(help="0: always the likeliest")] = None,
    seed: Annotated[int | None, typer.Option(help="The same seed samples the same answer")] = None,
    json_output: Annotated[
        bool,
        typer.Option("--json", help="Print each whole chat completion as JSON (not streamed)"),
    ] = False,
    base_url: BaseUrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Chat with a generative model; the answer is printed as its tokens arrive."""
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    chosen = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}
    options = {k: v for k, v in chosen.items() if v is not None}
    with api(base_url, api_key) as client:
        for turn in _turns(message):
            messages.append({"role": "user", "content": turn})
            body = {"model": model, "messages": messages, **options}
            if json_output:
                completion = client.post("chat/completions", body)
                print_json(completion)
                answer = completion["choices"][0]["message"]["content"] or ""
            else:
                answer = _streamed(client, body)
            messages.append({"role": "assistant", "content": answer})
