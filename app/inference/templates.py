"""The chat template for base tokenizers that have none (docs/model-kinds.md).

Plain-text role headers, and the tokenizer's own ``eos_token`` after each assistant turn: no new
tokens, so no embedding resize, and generation stops where training taught it to. The template
is set when a causal-LM job starts and saved with the fine-tuned model's tokenizer, so
inference renders prompts exactly as training did. No torch here.
"""

from __future__ import annotations

from typing import Any

from app.inference.tool_calls import TOOLS_INSTRUCTION, TOOLS_PREAMBLE

# Newlines are written as '\n' string literals inside the tags, not as template text:
# transformers renders with trim_blocks, which would swallow a newline after a block tag.
# With ``tools`` (docs/tool-calling.md), the system turn lists them as JSON, an assistant's calls
# follow its content as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` lines, and a
# tool's answer is a "tool" turn; a conversation without tools renders as it always did.
DEFAULT_CHAT_TEMPLATE = (
    "{% set ns = namespace(skip=0) %}"
    "{% if tools %}"
    "{{ '### system:\\n' }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] + '\\n\\n' }}{% set ns.skip = 1 %}"
    "{% endif %}"
    "{{ " + repr(TOOLS_PREAMBLE) + " }}"
    "{% for tool in tools %}{{ tool | tojson + '\\n' }}{% endfor %}"
    "{{ " + repr(TOOLS_INSTRUCTION + "\n") + " }}"
    "{% endif %}"
    "{% for message in messages[ns.skip:] %}"
    "{{ '### ' + message['role'] + ':\\n' + (message['content'] or '') }}"
    "{% if message['tool_calls'] %}"
    "{% for call in message['tool_calls'] %}"
    "{% if not loop.first or message['content'] %}{{ '\\n' }}{% endif %}"
    "{{ '<tool_call>' + {'name': call['function']['name'], "
    "'arguments': call['function']['arguments']} | tojson + '</tool_call>' }}"
    "{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer: Any) -> bool:
    """Give ``tokenizer`` the default chat template when it has none; True when it was set."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return True
