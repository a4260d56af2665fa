"""Tools in /v1/chat/completions (docs/tool-calling.md): what a request's ``tools``,
``tool_choice`` and ``parallel_tool_calls`` ask for, and the answer read back from the model's
text. No torch here.

- ``tool_choice`` "none" renders no tools and reads no calls; "auto" (the default with tools)
  renders them and reads the calls the model makes; "required" prefills the prompt with the
  opening ``<tool_call>``, and a named function with the call's opening up to its arguments, so
  the model can only go on with a call (of that function). A model whose answer does not parse
  as calls still gets its text back as content: the choice is enforced by the prompt, not by
  constrained decoding.
- ``parallel_tool_calls`` false returns the first call only.
- A malformed call (not JSON, an unknown function, unclosed) is answered as content with the
  generation's own finish reason, never an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from app.core.errors import InvalidRequest
from app.inference.sampling import Generation
from app.inference.schemas import (
    CalledFunction,
    ChatCompletionMessage,
    ChatCompletionRequest,
    NamedToolChoice,
    ToolCall,
)
from app.inference.tool_calls import call_prefix, parse_tool_calls

ChatFinish = Literal["stop", "length", "tool_calls"]


@dataclass(frozen=True)
class ToolUse:
    """How one request uses tools: what the prompt holds and how the answer is read."""

    tools: list[dict[str, Any]] | None = None  # rendered and parsed; None: no tools
    prefill: str = ""  # the answer's opening, written into the prompt
    parallel: bool = True

    @property
    def parses(self) -> bool:
        return self.tools is not None

    def answer(self, result: Generation) -> tuple[ChatCompletionMessage, ChatFinish]:
        """The assistant message and finish reason of a generation."""
        text = self.prefill + result.text
        if self.tools is None:
            return ChatCompletionMessage(content=text), result.finish_reason
        names = [tool["function"]["name"] for tool in self.tools]
        parsed = parse_tool_calls(text, names)
        if parsed is None:
            return ChatCompletionMessage(content=text), result.finish_reason
        calls = parsed.tool_calls if self.parallel else parsed.tool_calls[:1]
        tool_calls = [
            ToolCall(id=c.id, function=CalledFunction(name=c.name, arguments=c.arguments))
            for c in calls
        ]
        return ChatCompletionMessage(content=parsed.content, tool_calls=tool_calls), "tool_calls"

    def stream_ending(self, result: Generation) -> list[tuple[dict[str, Any], str | None]]:
        """A buffered streamed choice's chunks (their fields and finish reason): the content,
        then each call as a ``tool_calls`` delta, as OpenAI streams them, then the finish."""
        message, finish = self.answer(result)
        chunks: list[tuple[dict[str, Any], str | None]] = []
        if message.content:
            chunks.append(({"delta": {"content": message.content}}, None))
        for index, call in enumerate(message.tool_calls or ()):
            delta = {"index": index, **call.model_dump()}
            chunks.append(({"delta": {"tool_calls": [delta]}}, None))
        chunks.append(({"delta": {}}, finish))
        return chunks


def tool_use(body: ChatCompletionRequest) -> ToolUse:
    """The request's use of tools, or InvalidRequest (400) for one that cannot be honoured."""
    choice = body.tool_choice
    if not body.tools:
        if choice is not None and choice != "none":
            raise InvalidRequest(
                "tool_choice is only allowed when tools are given.", param="tool_choice"
            )
        return ToolUse()
    names = [tool.function.name for tool in body.tools]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise InvalidRequest(
            f"tools: a second function named {duplicates[0]!r} (names are unique).", param="tools"
        )
    if choice == "none":
        return ToolUse()
    named = choice.function.name if isinstance(choice, NamedToolChoice) else None
    if named is not None and named not in names:
        raise InvalidRequest(
            f"tool_choice names function {named!r}, which is not one of the tools.",
            param="tool_choice",
        )
    prefill = call_prefix(named) if choice == "required" or named else ""
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools]
    return ToolUse(tools, prefill, body.parallel_tool_calls is not False)


def check_messages(body: ChatCompletionRequest) -> None:
    """What OpenAI requires of the messages beyond their shape: content on every message but an
    assistant's that calls tools, a tool message's ``tool_call_id``."""
    for index, message in enumerate(body.messages):
        where = f"messages[{index}]"
        if message.content is None and not (message.role == "assistant" and message.tool_calls):
            raise InvalidRequest(f"{where}: content is required.", param="messages")
        if message.role == "tool" and message.tool_call_id is None:
            raise InvalidRequest(f"{where}: a tool message needs tool_call_id.", param="messages")
        if message.tool_calls and message.role != "assistant":
            raise InvalidRequest(
                f"{where}: only an assistant message has tool_calls.", param="messages"
            )
