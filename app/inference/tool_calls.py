"""Tool calling, shared by training and serving (docs/tool-calling.md). No torch here.

A conversation with tools is rendered through the model's chat template with ``tools=`` when the
template supports tools (it names both ``tools`` and ``tool_calls``: Tunehouse's default does,
as do Qwen's, Llama 3.1's, Mistral's). Otherwise Tunehouse's default rendering is used, on plain
messages any template can take: the tools are listed in the system prompt as JSON, an assistant's
call is written into its content as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
(the Hermes / Qwen format), and a tool's answer becomes a user turn wrapped in
``<tool_response>``. Either way the model answers calls in that ``<tool_call>`` format, which
``parse_tool_calls`` reads back (a whole answer that is one JSON object naming a tool, Llama 3.1's
format, is read as a call too).

Messages here are OpenAI's: an assistant's ``tool_calls`` carry ``arguments`` as a string holding
JSON; templates want a dict, so they are parsed before rendering.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from app.core.ids import random_token

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
# What the system prompt says before and after the tools' JSON (one tool a line); the default
# template (app/inference/templates.py) writes the same words.
TOOLS_PREAMBLE = "You may call one or more functions. The functions:\n<tools>\n"
TOOLS_INSTRUCTION = (
    "</tools>\nTo call a function, answer with "
    '<tool_call>{"name": <function name>, "arguments": <arguments as a JSON object>}</tool_call>'
)
_CALL = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)


def tools_prompt(tools: Sequence[dict[str, Any]]) -> str:
    """The system prompt's text listing ``tools`` (OpenAI's tool objects)."""
    listed = "".join(json.dumps(tool, ensure_ascii=False) + "\n" for tool in tools)
    return TOOLS_PREAMBLE + listed + TOOLS_INSTRUCTION


def call_text(name: str, arguments: Any) -> str:
    """One call as the model writes it."""
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}{body}{TOOL_CALL_CLOSE}"


def call_prefix(name: str | None) -> str:
    """What a prompt is prefilled with to make the model call a function (``name``, or any).
    It stops where tokenizers split anyway (before the name's letters, after the ``:`` that
    precedes the arguments), so the prompt's tokens are the ones training saw."""
    if name is None:
        return TOOL_CALL_OPEN + '{"name": "'
    return TOOL_CALL_OPEN + json.dumps({"name": name, "arguments": {}})[: -len(" {}}")]


def supports_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders tools and tool calls itself."""
    template = getattr(tokenizer, "chat_template", None)
    sources = list(template.values()) if isinstance(template, dict) else [template]
    return any(
        isinstance(source, str) and "tools" in source and "tool_calls" in source
        for source in sources
    )


def _arguments(value: Any) -> Any:
    """A call's arguments as the template wants them: a string holding JSON parsed."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _native(message: dict[str, Any]) -> dict[str, Any]:
    """A message for a template with tools support: calls' arguments as objects."""
    out = {key: value for key, value in message.items() if key != "weight" and value is not None}
    if message.get("tool_calls"):
        out["tool_calls"] = [
            {
                "id": call.get("id"),
                "type": "function",
                "function": {
                    "name": call["function"]["name"],
                    "arguments": _arguments(call["function"]["arguments"]),
                },
            }
            for call in message["tool_calls"]
        ]
    return out


def _plain(messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None) -> list:
    """The conversation as plain role/content messages (Tunehouse's default rendering)."""
    plain: list[dict[str, Any]] = []
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if message.get("tool_calls"):
            calls = [
                call_text(c["function"]["name"], _arguments(c["function"]["arguments"]))
                for c in message["tool_calls"]
            ]
            content = "\n".join(([content] if content else []) + calls)
        if role == "tool":
            answer = f"{TOOL_RESPONSE_OPEN}\n{content}\n{TOOL_RESPONSE_CLOSE}"
            if plain and plain[-1].get("tool_answers"):  # parallel calls' answers: one turn
                plain[-1]["content"] += "\n" + answer
                continue
            plain.append({"role": "user", "content": answer, "tool_answers": True})
            continue
        plain.append({"role": role, "content": content})
    if tools:
        listing = tools_prompt(tools)
        if plain and plain[0]["role"] == "system":
            plain[0]["content"] = f"{plain[0]['content']}\n\n{listing}"
        else:
            plain.insert(0, {"role": "system", "content": listing})
    return [{"role": m["role"], "content": m["content"]} for m in plain]


def render_chat(
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    tools: Sequence[dict[str, Any]] | None = None,
    *,
    add_generation_prompt: bool,
) -> str:
    """The conversation (OpenAI's messages, with tools) rendered as the model reads it."""
    uses_tools = bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    if not uses_tools:  # exactly as before tools existed
        chat = [{"role": m["role"], "content": m["content"]} for m in messages]
        rendered = tokenizer.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    elif supports_tools(tokenizer):
        rendered = tokenizer.apply_chat_template(
            [_native(m) for m in messages],
            tools=list(tools) if tools else None,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    else:
        rendered = tokenizer.apply_chat_template(
            _plain(messages, tools), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    return str(rendered)


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a string holding a JSON object, as OpenAI's


@dataclass(frozen=True)
class ParsedAnswer:
    content: str | None  # the text outside the calls; None when there is none
    tool_calls: list[ToolCall]


def _call(body: Any, names: set[str]) -> ToolCall | None:
    """A call read from its JSON, or None if it is not a well-formed call of a known tool."""
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError:
            return None
    if not isinstance(body, dict) or body.get("name") not in names:
        return None
    arguments = body.get("arguments", body.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    arguments_json = json.dumps(arguments, ensure_ascii=False)
    return ToolCall(f"call_{random_token()}", str(body["name"]), arguments_json)


def parse_tool_calls(text: str, tool_names: Sequence[str]) -> ParsedAnswer | None:
    """The calls a model's answer makes, with the text around them; None when it makes none or
    any is malformed (not JSON, an unknown function, an unclosed ``<tool_call>``): the caller
    then answers with the text as content."""
    names = set(tool_names)
    if TOOL_CALL_OPEN not in text:
        whole = text.strip()  # Llama 3.1's format: the answer is one JSON call
        call = _call(whole, names) if whole.startswith("{") else None
        return ParsedAnswer(None, [call]) if call else None
    calls = [_call(match.group(1).strip(), names) for match in _CALL.finditer(text)]
    rest = _CALL.sub("", text)
    if not calls or None in calls or TOOL_CALL_OPEN in rest or TOOL_CALL_CLOSE in rest:
        return None
    content = rest.strip()
    return ParsedAnswer(content or None, [call for call in calls if call is not None])
