"""/v1/chat/completions and /v1/completions, OpenAI's shapes, streamed as server-sent events
when asked: the first token leaves as soon as it exists."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.api.deps import OrgDep, SessionDep, SettingsDep, StorageDep
from app.core.errors import InvalidRequest, TunehouseError
from app.core.ids import random_token
from app.core.settings import Settings
from app.inference.router import ERRORS, servable
from app.inference.sampling import GenerationParams
from app.inference.schemas import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionMessage,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Usage,
)

if TYPE_CHECKING:
    from app.inference.generation import Generator

router = APIRouter(tags=["inference"])

_STREAM = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE chunks"}}


def _params(body: Any, settings: Settings, max_tokens: int | None, index: int) -> GenerationParams:
    if body.logprobs:
        raise InvalidRequest("logprobs are not supported.", param="logprobs")
    if body.tools:
        raise InvalidRequest("tools are not supported.", param="tools")
    limit = settings.max_new_tokens
    if max_tokens is not None and max_tokens > limit:
        raise InvalidRequest(f"max_tokens is at most {limit} on this server.", param="max_tokens")
    return GenerationParams(
        max_tokens=max_tokens or min(256, limit),
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop_sequences(),
        # n samples of one request differ, yet a seeded request is repeatable.
        seed=None if body.seed is None else body.seed + index,
    )


def _chunk(head: dict[str, Any], index: int, finish: str | None, **fields: Any) -> dict[str, Any]:
    """One streamed chunk of one choice (chat chunks carry a delta, text chunks text)."""
    choice = {"index": index, **fields, "finish_reason": finish, "logprobs": None}
    return {**head, "choices": [choice]}


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _stream_events(
    make_chunk: Any,
    runs: list[tuple[list[int], GenerationParams]],
    generator: Generator,
    include_usage: bool,
    usage_chunk: Any,
    first_chunk: Any = None,
) -> StreamingResponse:
    cancel = threading.Event()
    events = _events(make_chunk, runs, generator, include_usage, usage_chunk, first_chunk, cancel)
    return StreamingResponse(_relay(events, cancel), media_type="text/event-stream")


async def _relay(events: Iterator[str], cancel: threading.Event) -> AsyncIterator[str]:
    """Send each event as it comes; if the client goes away, stop the generation at once (it
    holds the model's lock, which the next request is waiting for)."""
    try:
        while (event := await run_in_threadpool(next, events, None)) is not None:
            yield event
    finally:
        cancel.set()


def _events(
    make_chunk: Any,
    runs: list[tuple[list[int], GenerationParams]],
    generator: Generator,
    include_usage: bool,
    usage_chunk: Any,
    first_chunk: Any,
    cancel: threading.Event,
) -> Iterator[str]:
    prompt_tokens = completion_tokens = 0
    try:
        for index, (prompt, params) in enumerate(runs):
            if cancel.is_set():
                return
            prompt_tokens += len(prompt)
            if first_chunk is not None:
                yield _sse(first_chunk(index))
            for piece in generator.stream(prompt, params, cancel):
                if piece.text or piece.finish_reason:
                    yield _sse(make_chunk(index, piece.text, piece.finish_reason))
                if piece.finish_reason:
                    completion_tokens += piece.completion_tokens
        if include_usage:
            yield _sse(usage_chunk(_usage(prompt_tokens, completion_tokens).model_dump()))
    except TunehouseError as exc:
        yield _sse(
            {
                "error": {
                    "message": exc.message,
                    "type": exc.error_type,
                    "param": exc.param,
                    "code": exc.code,
                }
            }
        )
    except Exception:
        yield _sse(
            {
                "error": {
                    "message": "The server had an error while generating.",
                    "type": "api_error",
                    "param": None,
                    "code": None,
                }
            }
        )
    yield "data: [DONE]\n\n"


@router.post("/chat/completions", response_model=ChatCompletion, responses={**ERRORS, **_STREAM})
def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    org: OrgDep,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
) -> Any:
    generator: Generator = servable(
        request, session, settings, storage, org, body.model, "generate"
    )
    messages = [{"role": _role(m.role), "content": m.text()} for m in body.messages]
    prompt = generator.chat_prompt(messages)
    max_tokens = body.max_completion_tokens or body.max_tokens
    runs = [(prompt, _params(body, settings, max_tokens, i)) for i in range(body.n)]
    completion_id, created = f"chatcmpl-{random_token()}", int(time.time())
    head = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": body.model,
        "system_fingerprint": None,
    }

    if body.stream:

        def first(index: int) -> dict[str, Any]:
            return _chunk(head, index, None, delta={"role": "assistant", "content": ""})

        def chunk(index: int, text: str, finish: str | None) -> dict[str, Any]:
            return _chunk(head, index, finish, delta={"content": text} if text else {})

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _stream_events(
            chunk,
            runs,
            generator,
            include_usage,
            lambda usage: {**head, "choices": [], "usage": usage},
            first,
        )

    choices, completion_tokens = [], 0
    for index, (ids, params) in enumerate(runs):
        result = generator.complete(ids, params)
        completion_tokens += result.completion_tokens
        choices.append(
            ChatChoice(
                index=index,
                message=ChatCompletionMessage(content=result.text),
                finish_reason=result.finish_reason,  # type: ignore[arg-type]
            )
        )
    return ChatCompletion(
        id=completion_id,
        created=created,
        model=body.model,
        choices=choices,
        usage=_usage(len(prompt), completion_tokens),
    )


def _role(role: str) -> str:
    # OpenAI's newer "developer" role is the system prompt of older templates.
    return "system" if role == "developer" else role


@router.post("/completions", response_model=Completion, responses={**ERRORS, **_STREAM})
def completions(
    body: CompletionRequest,
    request: Request,
    org: OrgDep,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
) -> Any:
    if body.echo or body.suffix:
        raise InvalidRequest("echo and suffix are not supported.", param="echo")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts or len(prompts) > settings.max_prediction_inputs:
        raise InvalidRequest(
            "prompt must hold 1 or more prompts, within the limit.", param="prompt"
        )
    generator: Generator = servable(
        request, session, settings, storage, org, body.model, "generate"
    )
    runs = [
        (generator.encode(text), _params(body, settings, body.max_tokens, i))
        for text in prompts
        for i in range(body.n)
    ]
    completion_id, created = f"cmpl-{random_token()}", int(time.time())
    head = {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": body.model,
        "system_fingerprint": None,
    }

    if body.stream:

        def chunk(index: int, text: str, finish: str | None) -> dict[str, Any]:
            return _chunk(head, index, finish, text=text)

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _stream_events(
            chunk,
            runs,
            generator,
            include_usage,
            lambda usage: {**head, "choices": [], "usage": usage},
        )

    choices, prompt_tokens, completion_tokens = [], 0, 0
    for index, (ids, params) in enumerate(runs):
        result = generator.complete(ids, params)
        prompt_tokens += len(ids)
        completion_tokens += result.completion_tokens
        choices.append(
            CompletionChoice(
                index=index,
                text=result.text,
                finish_reason=result.finish_reason,  # type: ignore[arg-type]
            )
        )
    return Completion(
        id=completion_id,
        created=created,
        model=body.model,
        choices=choices,
        usage=_usage(prompt_tokens, completion_tokens),
    )
