"""Row checkers: a raw row in, the normalised row out, or a ValueError that says in words what
is wrong with it. One checker per format; ``formats.py`` registers them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from app.services.datasets import tool_checks

CHAT_ROLES = ("system", "user", "assistant")
ROLES = (*CHAT_ROLES, "tool")  # a tool's answer to an assistant's call
MESSAGE_KEYS = ("role", "content", "weight")
TOOL_MESSAGE_KEYS = {"assistant": ("tool_calls",), "tool": ("tool_call_id",)}
CHAT_ROW_KEYS = ("messages", "tools", "parallel_tool_calls")


def type_name(value: Any) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: an error message quotes a user's value
    without growing to the size of a line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _require_keys(row: dict[str, Any], keys: tuple[str, ...], what: str) -> None:
    """Every one of ``keys`` present, and nothing else."""
    for key in keys:
        if key not in row:
            raise ValueError(f"missing required field '{key}'")
    unknown = sorted(set(row) - set(keys))
    if unknown:
        names = " and ".join(f"'{key}'" for key in keys)
        raise ValueError(f"unknown field '{unknown[0]}' ({what} has only {names})")


def _check_string(row: dict[str, Any], key: str, *, allow_empty: bool = False) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise ValueError(f"field '{key}' must be a string, got {type_name(value)}")
    if not allow_empty and not value.strip():
        raise ValueError(f"field '{key}' is empty")
    return value


def _check_label(label: Any) -> str:
    if isinstance(label, bool) or not isinstance(label, str | int):
        raise ValueError(f"field 'label' must be a string or an integer, got {type_name(label)}")
    if isinstance(label, str) and not label.strip():
        raise ValueError("field 'label' is empty")
    return str(label)


def check_classification_row(row: dict[str, Any]) -> dict[str, Any]:
    _require_keys(row, ("text", "label"), "a classification row")
    return {"text": _check_string(row, "text"), "label": _check_label(row["label"])}


def _check_message(index: int, message: Any, field: str = "messages") -> dict[str, Any]:
    """One chat message, normalised: ``role``, ``content`` (None for an assistant message that
    only calls tools), ``weight``, and ``tool_calls`` or ``tool_call_id`` where given."""
    where = f"{field}[{index}]"
    if not isinstance(message, dict):
        raise ValueError(f"{where} must be an object, got {type_name(message)}")
    if "function_call" in message or message.get("role") == "function":
        raise ValueError(f"{where}: {tool_checks.LEGACY}")
    calls = message.get("tool_calls")
    required = ("role",) if calls is not None else ("role", "content")
    for key in required:
        if key not in message:
            raise ValueError(f"{where}: missing required field '{key}'")
    role = message["role"]
    if role not in ROLES:
        named = shown(role) if isinstance(role, str) else type_name(role)
        raise ValueError(f"{where}: unknown role {named} (use one of {', '.join(ROLES)})")
    unknown = sorted(set(message) - set(MESSAGE_KEYS) - set(TOOL_MESSAGE_KEYS.get(role, ())))
    if unknown:
        raise ValueError(
            f"{where}: unknown field '{unknown[0]}' (a message has only 'role', 'content' "
            "and 'weight'; an assistant message may have 'tool_calls', a tool message has "
            "'tool_call_id')"
        )
    content = message.get("content")
    if not isinstance(content, str) and not (calls is not None and content is None):
        raise ValueError(f"{where}: field 'content' must be a string, got {type_name(content)}")
    weight = message.get("weight", 1)
    if isinstance(weight, bool) or weight not in (0, 1):
        raise ValueError(f"{where}: field 'weight' must be 0 or 1, got {shown(weight)}")
    checked = {"role": role, "content": content, "weight": int(weight)}
    if calls is not None:
        checked["tool_calls"] = tool_checks.check_tool_calls(calls, where)
    if role == "tool":
        call_id = message.get("tool_call_id")
        if call_id is None:
            raise ValueError(f"{where}: missing required field 'tool_call_id'")
        if not isinstance(call_id, str) or not call_id:
            raise ValueError(f"{where}: field 'tool_call_id' must be a non-empty string")
        checked["tool_call_id"] = call_id
    return checked


def check_messages(
    messages: Any,
    tools: Any = None,
    *,
    parallel_tool_calls: Any = None,
    field: str = "messages",
    tools_field: str = "tools",
    earlier: Sequence[dict[str, Any]] = (),
) -> list[dict[str, Any]]:
    """A conversation (OpenAI's chat messages), normalised, with its calls checked against
    ``tools`` (a row's raw ``tools``, or None): for chat rows and for DPO rows' ``input``.
    ``field`` and ``tools_field`` name the two in messages (``input.messages``, ``input.tools``).
    ``earlier``: normalised messages before these (a DPO input's, for its outputs), whose calls
    a tool message here may answer. Raises ValueError(reason)."""
    if not isinstance(messages, list):
        raise ValueError(f"field '{field}' must be an array, got {type_name(messages)}")
    if not messages:
        raise ValueError(f"field '{field}' is empty")
    normalised = [_check_message(i, m, field) for i, m in enumerate(messages)]
    checked_tools = None if tools is None else tool_checks.check_tools(tools, tools_field)
    parallel = (
        None if parallel_tool_calls is None
        else tool_checks.check_parallel_tool_calls(parallel_tool_calls)
    )  # fmt: skip
    tool_checks.check_conversation_calls(
        normalised, checked_tools, parallel_tool_calls=parallel, field=field, earlier=earlier
    )
    return normalised


def check_chat_row(row: dict[str, Any]) -> dict[str, Any]:
    """A chat row: ``messages``, and optionally ``tools`` and ``parallel_tool_calls``."""
    if "functions" in row:
        raise ValueError(tool_checks.LEGACY)
    if "messages" not in row:
        raise ValueError("missing required field 'messages'")
    unknown = sorted(set(row) - set(CHAT_ROW_KEYS))
    if unknown:
        raise ValueError(
            f"unknown field '{unknown[0]}' (a chat row has only 'messages', 'tools' "
            "and 'parallel_tool_calls')"
        )
    tools, parallel = row.get("tools"), row.get("parallel_tool_calls")
    normalised = check_messages(row["messages"], tools, parallel_tool_calls=parallel)
    assistant = [m for m in normalised if m["role"] == "assistant"]
    if not assistant:
        raise ValueError("no assistant message: a chat row needs one to learn from")
    if not any(m["weight"] == 1 for m in assistant):
        raise ValueError("every assistant message has weight 0: there is nothing to learn from")
    checked: dict[str, Any] = {"messages": normalised}
    if tools is not None:
        checked["tools"] = tool_checks.check_tools(tools)
    if parallel is not None:
        checked["parallel_tool_calls"] = parallel
    return checked


def check_completion_row(row: dict[str, Any]) -> dict[str, Any]:
    _require_keys(row, ("prompt", "completion"), "a completion row")
    prompt = _check_string(row, "prompt", allow_empty=True)
    return {"prompt": prompt, "completion": _check_string(row, "completion")}


def check_text_row(row: dict[str, Any]) -> dict[str, Any]:
    _require_keys(row, ("text",), "a text row")
    return {"text": _check_string(row, "text")}


def _check_feature(index: int, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"features[{index}] must be a number, got {type_name(value)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"features[{index}] must be a finite number, got {shown(value)}")
    return number


def check_tabular_row(row: dict[str, Any]) -> dict[str, Any]:
    _require_keys(row, ("features", "label"), "a tabular row")
    features = row["features"]
    if not isinstance(features, list):
        kind = type_name(features)
        raise ValueError(f"field 'features' must be an array of numbers, got {kind}")
    if not features:
        raise ValueError("field 'features' is empty")
    values = [_check_feature(i, v) for i, v in enumerate(features)]
    return {"features": values, "label": _check_label(row["label"])}
