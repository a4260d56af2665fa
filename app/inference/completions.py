"""/v1/chat/completions and /v1/completions, OpenAI's shapes, streamed as server-sent events
when asked: the first token leaves as soon as it exists. Both routes answer through ``_answer``;
what differs between them is a ``_Format``.

A completion runs in an inference slot (app/inference/concurrency.py) and stops generating when
its client goes away, streamed or not. All the choices of a request (its prompts, ``n`` samples of
each) are submitted to the model's decode engine at once and generated together; a streamed
answer interleaves their chunks, each choice's opening chunk first.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
from fastapi import APIRouter, Request
from pydantic import BaseModel

from app.api.deps import OrgDep, SessionDep, SettingsDep, StorageDep
from app.api.errors import error_body
from app.core.errors import InvalidRequest, TunehouseError
from app.core.ids import random_token
from app.core.settings import Settings
from app.inference.bounds import check_choices, tokens_per_choice
from app.inference.chat_tools import ToolUse, check_messages, tool_use
from app.inference.concurrency import HeldStream, inference_gate
from app.inference.protocols import TextGenerator
from app.inference.registry import Lease, ModelCache
from app.inference.router import ERRORS, find_model, run_model
from app.inference.sampling import Generation, GenerationParams
from app.inference.schemas import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Usage,
)
from app.services.models import LoadableModel

log = logging.getLogger(__name__)

router = APIRouter(tags=["inference"])

_STREAM: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE chunks"}
}

# The prompts of a request, as token ids, from the model's tokenizer.
Encode = Callable[[TextGenerator], list[list[int]]]


@dataclass(frozen=True)
class _Format:
    """What differs between a chat completion and a text completion."""

    id_prefix: str
    chunk_object: str
    # The fields of a streamed choice that carry a piece of text.
    piece: Callable[[str], dict[str, Any]]
    # One choice of the whole (non-streamed) answer, and the answer.
    choice: Callable[[int, Generation], BaseModel]
    answer: Callable[..., BaseModel]
    # The fields of the chunk that opens each streamed choice, if any.
    opening: dict[str, Any] | None = None
    # When set, a streamed choice is read whole before it is sent (a chat answer with tools is
    # parsed for calls): its last chunks, as (fields, finish reason), come from its generation.
    ending: Callable[[Generation], list[tuple[dict[str, Any], str | None]]] | None = None


def _chat_choice(use: ToolUse, index: int, result: Generation) -> ChatChoice:
    message, finish = use.answer(result)
    return ChatChoice(index=index, message=message, finish_reason=finish)


def chat_format(use: ToolUse) -> _Format:
    """The chat completion's format, reading the answer for tool calls as ``use`` says."""
    return _Format(
        id_prefix="chatcmpl",
        chunk_object="chat.completion.chunk",
        piece=lambda text: {"delta": {"content": text} if text else {}},
        choice=partial(_chat_choice, use),
        answer=ChatCompletion,
        opening={"delta": {"role": "assistant", "content": ""}},
        ending=use.stream_ending if use.parses else None,
    )


TEXT = _Format(
    id_prefix="cmpl",
    chunk_object="text_completion",
    piece=lambda text: {"text": text},
    choice=lambda index, result: CompletionChoice(
        index=index, text=result.text, finish_reason=result.finish_reason
    ),
    answer=Completion,
)


@router.post("/chat/completions", response_model=ChatCompletion, responses={**ERRORS, **_STREAM})
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    org: OrgDep,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
) -> Any:
    check_messages(body)
    use = tool_use(body)
    messages = [{**m.as_template_message(), "role": _role(m.role)} for m in body.messages]
    tokens_param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    max_tokens = body.max_completion_tokens or body.max_tokens
    params = _params(body, settings, 1, max_tokens, tokens_param, prompt_param="messages")
    model = await find_model(session, settings, storage, org, body.model)
    return await _answer(
        request,
        body,
        chat_format(use),
        model,
        lambda g: [g.chat_prompt(messages, use.tools, use.prefill)],
        params,
    )


@router.post("/completions", response_model=Completion, responses={**ERRORS, **_STREAM})
async def completions(
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
    params = _params(body, settings, len(prompts), body.max_tokens, "max_tokens", "prompt")
    model = await find_model(session, settings, storage, org, body.model)
    return await _answer(
        request, body, TEXT, model, lambda g: [g.encode(text) for text in prompts], params
    )


def _role(role: str) -> str:
    # OpenAI's newer "developer" role is the system prompt of older templates.
    return "system" if role == "developer" else role


def _params(
    body: Any,
    settings: Settings,
    prompts: int,
    max_tokens: int | None,
    tokens_param: str,
    prompt_param: str,
) -> list[GenerationParams]:
    """The parameters of each of the ``n`` samples of a prompt, within the server's bounds."""
    if body.logprobs:
        raise InvalidRequest("logprobs are not supported.", param="logprobs")
    choices = check_choices(settings, prompts, body.n, prompt_param=prompt_param)
    per_choice = tokens_per_choice(settings, choices, max_tokens, param=tokens_param)
    return [
        GenerationParams(
            max_tokens=per_choice,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=body.stop_sequences(),
            # n samples of one request differ, yet a seeded request is repeatable.
            seed=None if body.seed is None else body.seed + index,
        )
        for index in range(body.n)
    ]


def _runs(
    prompts: list[list[int]], params: list[GenerationParams]
) -> list[tuple[list[int], GenerationParams]]:
    """One run per choice, in the order of the choices' indexes: each prompt's n samples."""
    return [(prompt, sample) for prompt in prompts for sample in params]


async def _answer(
    request: Request,
    body: Any,
    form: _Format,
    model: LoadableModel,
    encode: Encode,
    params: list[GenerationParams],
) -> Any:
    head = {
        "id": f"{form.id_prefix}-{random_token()}",
        "created": int(time.time()),
        "model": body.model,
    }
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunk_head = {**head, "object": form.chunk_object, "system_fingerprint": None}
        return await _stream(request, model, form, chunk_head, encode, params, include_usage)

    cancel = threading.Event()

    def generate(generator: TextGenerator) -> tuple[int, list[Generation]]:
        prompts = encode(generator)
        # Every choice of every prompt decodes at once (a cancel stops them all).
        results = generator.complete_all(_runs(prompts, params), cancel)
        return sum(map(len, prompts)), results

    prompt_tokens, results = await run_model(request, model, "generate", generate, cancel)
    completion_tokens = sum(result.completion_tokens for result in results)
    return form.answer(
        **head,
        choices=[form.choice(index, result) for index, result in enumerate(results)],
        usage=_usage(prompt_tokens, completion_tokens),
    )


async def _stream(
    request: Request,
    model: LoadableModel,
    form: _Format,
    head: dict[str, Any],
    encode: Encode,
    params: list[GenerationParams],
    include_usage: bool,
) -> HeldStream:
    """The answer as server-sent events. The slot and the model's lease are taken here, so a
    saturated server or a model that cannot load still answers with a status and an envelope;
    the stream gives them back when it ends."""
    cache: ModelCache = request.app.state.model_cache
    gate = inference_gate(request.app)
    slot = await gate.acquire()
    try:
        with anyio.CancelScope(shield=True):  # the lease a load returns must not be lost
            lease, prompts = await gate.run(_open, cache, model, encode)
    except BaseException:
        slot.release()
        raise
    cancel = threading.Event()
    events = _events(form, head, lease.servable, prompts, params, include_usage, cancel)
    return HeldStream(events, cancel, gate, slot, lease.close)


def _open(
    cache: ModelCache, model: LoadableModel, encode: Encode
) -> tuple[Lease[TextGenerator], list[list[int]]]:
    lease = cache.lease(model, "generate")
    try:
        return lease, encode(lease.servable)
    except BaseException:
        lease.close()
        raise


def _events(
    form: _Format,
    head: dict[str, Any],
    generator: TextGenerator,
    prompts: list[list[int]],
    params: list[GenerationParams],
    include_usage: bool,
    cancel: threading.Event,
) -> Iterator[str]:
    completion_tokens = 0
    runs = _runs(prompts, params)
    whole = [Generation() for _ in runs]  # each choice's text, when read whole (form.ending)
    try:
        if form.opening is not None:  # each choice opens before any of its pieces
            for index in range(len(runs)):
                yield _sse(_chunk(head, index, None, form.opening))
        # The choices decode together: their chunks interleave, as OpenAI's do.
        with closing(generator.generate(runs, cancel)) as pieces:
            for index, piece in pieces:
                if form.ending is not None:
                    whole[index].text += piece.text
                    if piece.finish_reason:
                        whole[index].finish_reason = piece.finish_reason
                        for fields, finish in form.ending(whole[index]):
                            yield _sse(_chunk(head, index, finish, fields))
                elif piece.text or piece.finish_reason:
                    fields = form.piece(piece.text)
                    yield _sse(_chunk(head, index, piece.finish_reason, fields))
                if piece.finish_reason:
                    completion_tokens += piece.completion_tokens
        if cancel.is_set():
            return
        if include_usage:
            usage = _usage(sum(map(len, prompts)), completion_tokens)
            yield _sse({**head, "choices": [], "usage": usage.model_dump()})
    except TunehouseError as exc:
        yield _sse(error_body(exc.message, type=exc.error_type, param=exc.param, code=exc.code))
    except Exception:
        # The status has been sent: the error goes in the stream, its details in the log.
        log.exception("generation failed mid-stream")
        yield _sse(error_body("The server had an error while generating.", type="server_error"))
    yield "data: [DONE]\n\n"


def _chunk(
    head: dict[str, Any], index: int, finish: str | None, fields: dict[str, Any]
) -> dict[str, Any]:
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
