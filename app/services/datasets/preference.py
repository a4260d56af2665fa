"""OpenAI's preference rows, which train with method "dpo":

    {"input": {"messages": [...], "tools": [...]?, "parallel_tool_calls": bool?},
     "preferred_output": [{"role": "assistant", ...}],
     "non_preferred_output": [{"role": "assistant", ...}]}

Each output is one assistant message that answers the input's conversation. The input's
messages, tools and the outputs are checked as chat rows are (``checks.check_chat_row``): the
input's conversation followed by each output is a chat row, so what a chat row may hold (tool
definitions, tool calls) a preference row may hold too. The normalised row keeps that shape,
with the chat checker's normalised messages."""

from __future__ import annotations

import re
from typing import Any

from app.services.datasets import checks
from app.services.datasets.checks import type_name
from app.services.datasets.limits import DatasetLimits
from app.services.datasets.statistics import FormatStats, Summary

PREFERENCE_KEYS = ("input", "preferred_output", "non_preferred_output")
OUTPUT_KEYS = ("preferred_output", "non_preferred_output")
INPUT_KEYS = ("messages", "tools", "parallel_tool_calls")
_MESSAGE_AT = re.compile(r"^messages\[(\d+)\]")


def _check_input(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"field 'input' must be an object, got {type_name(value)}")
    if "messages" not in value:
        raise ValueError("input: missing required field 'messages'")
    unknown = sorted(set(value) - set(INPUT_KEYS))
    if unknown:
        raise ValueError(
            f"input: unknown field '{unknown[0]}' (an input has only 'messages', 'tools' and "
            "'parallel_tool_calls')"
        )
    messages = value["messages"]
    if not isinstance(messages, list):
        raise ValueError(f"field 'input.messages' must be an array, got {type_name(messages)}")
    if not messages:
        raise ValueError("field 'input.messages' is empty")
    return value


def _check_output_shape(key: str, value: Any) -> dict[str, Any]:
    """The one assistant message an output holds."""
    if not isinstance(value, list):
        raise ValueError(
            f"field '{key}' must be an array holding one assistant message, got {type_name(value)}"
        )
    if len(value) != 1:
        raise ValueError(
            f"field '{key}' must hold exactly one assistant message, it holds {len(value)}"
        )
    message = value[0]
    if not isinstance(message, dict):
        raise ValueError(f"{key}[0] must be an object, got {type_name(message)}")
    if message.get("role") != "assistant":
        role = message.get("role")
        named = checks.shown(role) if isinstance(role, str) else type_name(role)
        raise ValueError(f"{key}[0]: role must be 'assistant', got {named}")
    return message


def _as_chat_row(row_input: dict[str, Any], output: dict[str, Any], key: str) -> dict[str, Any]:
    """The input's conversation followed by ``output``, checked as a chat row; errors name the
    preference row's fields (input.messages[i], preferred_output[0], ...)."""
    messages = row_input["messages"]
    chat = {**row_input, "messages": [*messages, output]}
    try:
        return checks.check_chat_row(chat)
    except ValueError as exc:
        reason = str(exc)
        at = _MESSAGE_AT.match(reason)
        if at is not None:
            index = int(at.group(1))
            where = f"{key}[0]" if index >= len(messages) else f"input.messages[{index}]"
            reason = where + reason[at.end() :]
        elif not reason.startswith(("field 'messages'", "no assistant", "every assistant")):
            reason = f"input: {reason}"
        raise ValueError(reason) from None


def _without_weight(message: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in message.items() if k != "weight"}


def check_preference_row(row: dict[str, Any]) -> dict[str, Any]:
    for key in PREFERENCE_KEYS:
        if key not in row:
            if key == "preferred_output":
                raise ValueError(
                    "missing required field 'preferred_output' (the reply to prefer, as an "
                    "array of one assistant message)"
                )
            raise ValueError(f"missing required field '{key}'")
    unknown = sorted(set(row) - set(PREFERENCE_KEYS))
    if unknown:
        raise ValueError(
            f"unknown field '{unknown[0]}' (a preference row has only 'input', "
            "'preferred_output' and 'non_preferred_output')"
        )
    row_input = _check_input(row["input"])
    outputs = {key: _check_output_shape(key, row[key]) for key in OUTPUT_KEYS}
    preferred = _as_chat_row(row_input, outputs["preferred_output"], "preferred_output")
    other = _as_chat_row(row_input, outputs["non_preferred_output"], "non_preferred_output")
    count = len(row_input["messages"])
    chosen = _without_weight(preferred["messages"][count])
    rejected = _without_weight(other["messages"][count])
    if chosen == rejected:
        raise ValueError(
            "preferred_output and non_preferred_output are the same message: a preference "
            "needs two different replies"
        )
    normalised_input = {k: v for k, v in preferred.items() if k != "messages"}
    normalised_input["messages"] = preferred["messages"][:count]
    return {
        "input": normalised_input,
        "preferred_output": [chosen],
        "non_preferred_output": [rejected],
    }


def _chars(message: dict[str, Any]) -> int:
    content = message.get("content")
    return len(content) if isinstance(content, str) else 0


class PreferenceStats(FormatStats):
    def __init__(self, limits: DatasetLimits) -> None:
        super().__init__(limits)
        self.input_messages = Summary()
        self.input_chars = Summary()
        self.preferred_chars = Summary()
        self.non_preferred_chars = Summary()

    def _add(self, row: dict[str, Any], number: int) -> None:
        messages = row["input"]["messages"]
        self.input_messages.add(len(messages))
        self.input_chars.add(sum(_chars(m) for m in messages))
        self.preferred_chars.add(_chars(row["preferred_output"][0]))
        self.non_preferred_chars.add(_chars(row["non_preferred_output"][0]))

    def _result(self) -> dict[str, Any]:
        return {
            "input_messages_per_row": self.input_messages.as_dict(),
            "input_chars": self.input_chars.as_dict(),
            "preferred_output_chars": self.preferred_chars.as_dict(),
            "non_preferred_output_chars": self.non_preferred_chars.as_dict(),
        }
