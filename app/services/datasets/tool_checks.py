"""Checks of OpenAI's tool-calling fields in chat rows (docs/tool-calling.md): a row's ``tools``
and ``parallel_tool_calls``, an assistant message's ``tool_calls``, a tool message's
``tool_call_id``, and how they fit together in one conversation. Each raises ValueError(reason)
or returns the normalised value; ``checks.check_messages`` calls them.

OpenAI's legacy function calling (a row's ``functions``, a message's ``function_call``, the
``function`` role) is refused with a message that names its replacement."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

MAX_TOOLS = 128
MAX_CALLS = 128
# OpenAI's rule for a function's name.
FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
LEGACY = (
    "OpenAI's legacy function calling is not supported: use 'tools' instead of 'functions', "
    "'tool_calls' instead of 'function_call', and 'tool' messages instead of 'function' ones"
)


def _type_name(value: Any) -> str:
    from app.services.datasets.checks import type_name

    return type_name(value)


def _only(value: dict[str, Any], keys: tuple[str, ...], where: str, what: str) -> None:
    unknown = sorted(set(value) - set(keys))
    if unknown:
        names = ", ".join(f"'{key}'" for key in keys)
        raise ValueError(f"{where}: unknown field '{unknown[0]}' ({what} has only {names})")


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be an object, got {_type_name(value)}")
    return value


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where} must be a string, got {_type_name(value)}")
    if not FUNCTION_NAME.fullmatch(value):
        raise ValueError(
            f"{where} {value[:70]!r} is not a function name (1 to 64 letters, digits, _ or -)"
        )
    return value


def check_tools(tools: Any, field: str = "tools") -> list[dict[str, Any]]:
    """A row's ``tools``: OpenAI's function tools, each name once."""
    if not isinstance(tools, list):
        raise ValueError(f"field '{field}' must be an array, got {_type_name(tools)}")
    if not tools:
        raise ValueError(f"field '{field}' is empty (leave it out of a row without tools)")
    if len(tools) > MAX_TOOLS:
        raise ValueError(f"field '{field}' has {len(tools)} tools; at most {MAX_TOOLS}")
    normalised: list[dict[str, Any]] = []
    seen: set[str] = set()
    for index, tool in enumerate(tools):
        where = f"{field}[{index}]"
        _only(_object(tool, where), ("type", "function"), where, "a tool")
        if tool.get("type") != "function":
            raise ValueError(f"{where}: field 'type' must be \"function\"")
        if "function" not in tool:
            raise ValueError(f"{where}: missing required field 'function'")
        function = _object(tool["function"], f"{where}.function")
        keys = ("name", "description", "parameters", "strict")
        _only(function, keys, f"{where}.function", "a function")
        if "name" not in function:
            raise ValueError(f"{where}.function: missing required field 'name'")
        name = _name(function["name"], f"{where}.function.name")
        if name in seen:
            raise ValueError(f"{where}: a second tool named {name!r} (tool names are unique)")
        seen.add(name)
        checked: dict[str, Any] = {"name": name}
        if function.get("description") is not None:
            if not isinstance(function["description"], str):
                got = _type_name(function["description"])
                raise ValueError(f"{where}.function.description must be a string, got {got}")
            checked["description"] = function["description"]
        if function.get("parameters") is not None:
            checked["parameters"] = _object(
                function["parameters"], f"{where}.function.parameters (a JSON schema)"
            )
        if function.get("strict") is not None:
            if not isinstance(function["strict"], bool):
                got = _type_name(function["strict"])
                raise ValueError(f"{where}.function.strict must be a boolean, got {got}")
            checked["strict"] = function["strict"]
        normalised.append({"type": "function", "function": checked})
    return normalised


def check_parallel_tool_calls(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"field 'parallel_tool_calls' must be a boolean, got {_type_name(value)}")
    return value


def check_tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's ``tool_calls``; ``arguments`` must be a string holding a JSON
    object, as OpenAI's are."""
    if not isinstance(calls, list):
        raise ValueError(f"{where}: field 'tool_calls' must be an array, got {_type_name(calls)}")
    if not calls:
        raise ValueError(f"{where}: field 'tool_calls' is empty")
    if len(calls) > MAX_CALLS:
        raise ValueError(f"{where}: field 'tool_calls' has {len(calls)} calls; at most {MAX_CALLS}")
    normalised = []
    for index, call in enumerate(calls):
        at = f"{where}.tool_calls[{index}]"
        _only(_object(call, at), ("id", "type", "function"), at, "a tool call")
        for key in ("id", "function"):
            if key not in call:
                raise ValueError(f"{at}: missing required field '{key}'")
        if call.get("type", "function") != "function":
            raise ValueError(f"{at}: field 'type' must be \"function\"")
        if not isinstance(call["id"], str) or not call["id"].strip():
            raise ValueError(f"{at}: field 'id' must be a non-empty string")
        function = _object(call["function"], f"{at}.function")
        _only(function, ("name", "arguments"), f"{at}.function", "a call's function")
        for key in ("name", "arguments"):
            if key not in function:
                raise ValueError(f"{at}.function: missing required field '{key}'")
        name = _name(function["name"], f"{at}.function.name")
        arguments = function["arguments"]
        if not isinstance(arguments, str):
            raise ValueError(
                f"{at}.function.arguments must be a string holding JSON, "
                f"got {_type_name(arguments)}"
            )
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError as error:  # its msg and pos: "line 1 column 2" would mislead
            raise ValueError(
                f"{at}.function.arguments is not valid JSON ({error.msg} at character "
                f"{error.pos}): {arguments[:60]!r}"
            ) from None
        if not isinstance(parsed, dict):
            got = _type_name(parsed)
            raise ValueError(f"{at}.function.arguments must hold a JSON object, got {got}")
        function = {"name": name, "arguments": arguments}
        normalised.append({"id": call["id"], "type": "function", "function": function})
    return normalised


def check_conversation_calls(
    messages: Sequence[dict[str, Any]],
    tools: Sequence[dict[str, Any]] | None,
    *,
    parallel_tool_calls: bool | None = None,
    field: str = "messages",
    earlier: Sequence[dict[str, Any]] = (),
) -> None:
    """Normalised messages' calls against the tools and each other: every call names one of
    ``tools``, ids are unique, a tool message answers an earlier call (of ``earlier`` or of
    ``messages``), and with ``parallel_tool_calls`` false an assistant makes one call at most."""
    names = {tool["function"]["name"] for tool in tools or ()}
    call_ids = {call["id"] for m in earlier for call in m.get("tool_calls") or ()}
    for index, message in enumerate(messages):
        where = f"{field}[{index}]"
        for number, call in enumerate(message.get("tool_calls") or ()):
            at = f"{where}.tool_calls[{number}]"
            name = call["function"]["name"]
            if name not in names:
                known = f"the tools are {sorted(names)}" if names else "the row has no 'tools'"
                raise ValueError(f"{at} calls function {name!r}, which is not a tool ({known})")
            if call["id"] in call_ids:
                raise ValueError(f"{at}: id {call['id']!r} is used by an earlier call")
            call_ids.add(call["id"])
        if parallel_tool_calls is False and len(message.get("tool_calls") or ()) > 1:
            raise ValueError(
                f"{where} makes {len(message['tool_calls'])} tool calls, but the row sets "
                "'parallel_tool_calls' to false (one call per message)"
            )
        if message["role"] == "tool" and message["tool_call_id"] not in call_ids:
            raise ValueError(
                f"{where}: tool_call_id {message['tool_call_id'][:60]!r} answers no earlier "
                "tool call"
            )
